"""Token files: the agent token (``token.json``), written atomically with mode 0600 and read
with checks, and the reporter token file (``register --token-file``, ``server.token_file``).

``token.json`` holds ``{server_url, agent_id, agent_token, registered_at}``. Every token file
that group or others can access is refused with the ``chmod`` that fixes it
(``shared_mode_fix`` holds that one check, for this module and for the config file).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from argus_agent.errors import InsecureTokenFileError, NotRegisteredError, StateError
from argus_agent.fsutil import GROUP_OR_OTHER, atomic_write, ensure_private_dir


@dataclass(frozen=True)
class AgentCredentials:
    """What registering this host gave us."""

    server_url: str
    agent_id: str
    agent_token: str = field(repr=False)
    registered_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    poll_interval_s: float | None = None
    #: The Argus user whose token registered this agent (None when not known).
    owner: str | None = None


def save_credentials(path: Path, creds: AgentCredentials) -> None:
    """Write ``creds`` to ``path`` whole or not at all (``atomic_write``) with mode 0600.

    Creates the parent directory with mode 0700 when missing (and tightens it to 0700, see
    ``ensure_private_dir``). Raises StateError naming the path; on failure an existing token
    file is left as it was.
    """
    try:
        ensure_private_dir(path.parent)
        atomic_write(path, json.dumps(asdict(creds), indent=2).encode() + b"\n", mode=0o600)
    except OSError as exc:
        raise StateError(f"{path}: cannot write the token file: {exc.strerror}") from None


def load_credentials(path: Path, *, check_mode: bool = True) -> AgentCredentials:
    """Read the token file; blocks on a small read.

    Raises NotRegisteredError when it is missing, InsecureTokenFileError when group or others
    may read it (``check_mode``), StateError when it is unreadable or malformed.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise NotRegisteredError(
            f"{path}: no agent token: register this host first with `argus-agent register`"
        ) from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the token file: {exc.strerror}") from None
    if check_mode:
        refuse_shared_token_file(path, info.st_mode)
    try:
        data = json.loads(path.read_text())
        return AgentCredentials(
            server_url=str(data["server_url"]),
            agent_id=str(data["agent_id"]),
            agent_token=str(data["agent_token"]),
            registered_at=str(data.get("registered_at", "")),
            poll_interval_s=_positive_or_none(data.get("poll_interval_s")),
            owner=data["owner"] if isinstance(data.get("owner"), str) else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"missing key {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        raise StateError(
            f"{path}: token file is unreadable or malformed ({reason}); "
            "re-register with `argus-agent register --force`"
        ) from None


def _positive_or_none(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def shared_mode_fix(path: Path, st_mode: int) -> str | None:
    """None when group and others have no access to the file; else the part of the error
    that says so and how to fix it: ``"readable by group or others (mode 0644); fix it with
    `chmod 600 PATH`"``."""
    if not st_mode & GROUP_OR_OTHER:
        return None
    return (
        f"readable by group or others (mode {stat.S_IMODE(st_mode):04o}); "
        f"fix it with `chmod 600 {path}`"
    )


def refuse_shared_token_file(path: Path, st_mode: int) -> None:
    """Raise InsecureTokenFileError when group or others have any access to a token file."""
    problem = shared_mode_fix(path, st_mode)
    if problem is not None:
        raise InsecureTokenFileError(f"{path}: token file is {problem}")


def read_user_token(path: Path) -> str:
    """Read an ``em_live_`` reporter token from a file (``register --token-file``,
    ``server.token_file``): the first line, stripped. Blocks on a small read.

    Raises InsecureTokenFileError when group or others may access the file, StateError when
    it is unreadable or does not hold a reporter token. The token is never in a message.
    """
    try:
        with path.open("rb") as handle:
            refuse_shared_token_file(path, os.fstat(handle.fileno()).st_mode)
            text = handle.read().decode()
    except OSError as exc:
        raise StateError(f"{path}: cannot read the token file: {exc.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token.startswith("em_live_"):
        raise StateError(f"{path}: expected an Argus reporter token starting with 'em_live_'")
    return token
