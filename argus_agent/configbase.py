"""What every section of the configuration shares: the base model (unknown keys refused,
frozen), the user-name pattern, and the reference's key for a default computed on the host.
``config`` (the settings and loading) and ``jobsettings`` (the ``[jobs]`` section) build on
it."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
#: ``json_schema_extra`` key: how the reference shows a default computed on the host.
DEFAULT_TEXT = "default_text"


class Section(BaseModel):
    """A section of the configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
