"""Reading the configuration's sources: the TOML file and the environment.

Owns what the raw values are before validation: the parsed file (refused when it holds
``server.token`` but others may read it), the ``ARGUS_AGENT_<SECTION>_<KEY>`` and SDK
variables mapped to their keys and decoded by the shape of the field (one value stays a
string that pydantic reads as TOML would read the scalar; a list or a table is JSON; empty
unsets a key whose default is unset), and the one-line-per-source listing that
``argus-agent config check`` prints. ``config.py`` owns the model and passes its sections in,
so nothing here imports it.
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from argus_agent.configerrors import shown_value
from argus_agent.credentials import shared_mode_fix
from argus_agent.errors import ConfigError
from argus_agent.logsetup import redact_text

ENV_PREFIX = "ARGUS_AGENT_"
#: Reserved; never a setting.
CONFIG_ENV = "ARGUS_AGENT_CONFIG"
#: The variables Argus' own SDK reads, honoured after the ``ARGUS_AGENT_*`` ones.
SDK_ENV = {"ARGUS_URL": ("server", "url"), "ARGUS_TOKEN": ("server", "token")}
#: Keys whose values are never shown (messages, ``config check``, the redacted dump).
SECRET_KEYS = frozenset({("server", "token")})

Sections = Mapping[str, type[BaseModel]]
EnvValue = tuple[tuple[str, str], Any, str]


def value_kind(annotation: Any) -> Literal["list", "table", "scalar"]:
    """Whether a field holds a list, a table or one value (``X | None`` looks at ``X``)."""
    for candidate in (annotation, *get_args(annotation)):
        origin = get_origin(candidate) or candidate
        if origin is list:
            return "list"
        if origin is dict:
            return "table"
    return "scalar"


def may_be_unset(annotation: Any) -> bool:
    """Whether a field accepts None (its value may be left unset)."""
    return type(None) in get_args(annotation)


def read_toml(path: Path, label: str) -> dict[str, Any]:
    """The parsed file. A file that holds ``server.token`` must be private to its owner
    (as the token files are): ConfigError names the file, its mode and the ``chmod``."""
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
            server = raw.get("server")
            if isinstance(server, dict) and server.get("token"):
                problem = shared_mode_fix(path, os.fstat(handle.fileno()).st_mode)
                if problem is not None:
                    raise ConfigError(f"{path}: holds server.token but is {problem}")
            return raw
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: expected a TOML file, got a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from None


def gather(
    path: Path,
    explicit: bool,
    env: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, Any]],
    sections: Sections,
) -> tuple[dict[str, Any], dict[tuple[str, ...], str], str]:
    """The merged raw values (file, then environment, then ``overrides``), where each
    (section, key) came from, and the file's label for messages. The file may be absent
    unless ``explicit``."""
    raw: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    label = path.name
    if path.exists() or explicit:
        raw = read_toml(path, label)
        for section, values in raw.items():
            if isinstance(values, dict):
                for key in values:
                    origin[(section, key)] = label
    for key, value, source in env_values(env, sections):
        raw.setdefault(key[0], {})
        if not isinstance(raw[key[0]], dict):
            raise ConfigError(f"{label}: {key[0]}: expected a table (a [{key[0]}] section)")
        raw[key[0]][key[1]] = value
        origin[key] = source
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
        for key in values:
            origin[(section, key)] = "command line"
    return raw, origin, label


def env_values(env: Mapping[str, str], sections: Sections) -> list[EnvValue]:
    """The environment's overrides as ((section, key), value, origin label), in precedence
    order. An ``ARGUS_AGENT_*`` name that is no setting raises ConfigError."""
    found: list[EnvValue] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = env_key(name, sections, strict=True)
        assert key is not None  # strict: an unknown name raised
        found.append((key, _env_value(name, key, env[name], sections), f"environment {name}"))
    for name, key in SDK_ENV.items():
        if env.get(name):
            found.append((key, env[name], f"environment {name}"))
    return found


def env_key(name: str, sections: Sections, *, strict: bool) -> tuple[str, str] | None:
    """``ARGUS_AGENT_JOBS_STOP_GRACE_S`` → ``("jobs", "stop_grace_s")``. An unknown name
    raises ConfigError listing what exists when ``strict``, else gives None."""
    section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
    if section not in sections or not key:
        if not strict:
            return None
        known = ", ".join(f"{ENV_PREFIX}{s.upper()}_<KEY>" for s in sections)
        raise ConfigError(f"environment {name}: unknown setting; expected one of {known}")
    if key not in sections[section].model_fields:
        if not strict:
            return None
        raise ConfigError(
            f"environment {name}: {section}.{key}: unknown key; expected one of "
            + ", ".join(sorted(sections[section].model_fields))
        )
    return section, key


def _env_value(name: str, key: tuple[str, str], text: str, sections: Sections) -> Any:
    """The value of variable ``name`` for ``key``: the string itself for one value, JSON
    for a list or a table, None when empty and the key may be unset. JSON that does not
    parse is one line naming the variable, the key and the shape expected."""
    annotation = sections[key[0]].model_fields[key[1]].annotation
    kind = value_kind(annotation)
    if text == "" and may_be_unset(annotation):
        return None
    # A list given as one string stays a string: jobs.shell splits it like a shell would,
    # and any other list answers "expected a list of strings" naming the variable.
    if kind == "scalar" or not text.lstrip().startswith(("[", "{")):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        shape = 'a list as JSON, e.g. ["a", "b"]'
        if kind == "table":
            shape = 'a table as JSON, e.g. {"alice": "alice"}'
        raise ConfigError(
            f"environment {name}: {key[0]}.{key[1]}: expected {shape} ({exc.msg} at character "
            f"{exc.pos}), got {shown_value(list(key), text)}"
        ) from None


def describe(path: Path, explicit: bool, env: Mapping[str, str], sections: Sections) -> list[str]:
    """One line per source, lowest precedence first: the file (or that it is absent) and
    each variable with its value and key, a token's value never shown."""
    if path.exists():
        lines = [f"file {path}"]
    else:
        lines = [f"file {path}: not found" + ("" if explicit else "; built-in defaults apply")]
    names = sorted(n for n in env if n.startswith(ENV_PREFIX) and n != CONFIG_ENV)
    names += [n for n in SDK_ENV if env.get(n)]
    for name in names:
        key = SDK_ENV.get(name) or env_key(name, sections, strict=False)
        value = redact_text(env[name])
        shown = shlex.quote(value if len(value) <= 200 else value[:200] + "...")
        if key in SECRET_KEYS:
            shown = "<redacted>"
        where = f"{key[0]}.{key[1]}" if key else "unknown setting"
        lines.append(f"environment {name}={shown} ({where})")
    if not names:
        lines.append(f"environment: no {ENV_PREFIX}*, ARGUS_URL or ARGUS_TOKEN variable set")
    return lines
