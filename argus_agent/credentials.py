"""The agent token file (``token.json``): written atomically with mode 0600, read with checks.

Holds ``{server_url, agent_id, agent_token, registered_at}``. The daemon refuses a file that
group or others can read, and says which ``chmod`` fixes it.
"""

from __future__ import annotations

import json
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from argus_agent.errors import InsecureTokenFileError, NotRegisteredError, StateError
from argus_agent.fsutil import atomic_write, ensure_private_dir


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
    """Write ``creds`` to ``path`` atomically (temp file, fsync, rename) with mode 0600.

    Creates the parent directory with mode 0700 when missing. Raises StateError.
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
    if check_mode and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureTokenFileError(
            f"{path}: token file is readable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); fix it with `chmod 600 {path}`"
        )
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


def read_user_token(path: Path) -> str:
    """Read an ``em_live_`` reporter token from a file (``--token-file``); raises StateError."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise StateError(f"{path}: cannot read the token file: {exc.strerror}") from None
    if not token.startswith("em_live_"):
        raise StateError(f"{path}: expected an Argus reporter token starting with 'em_live_'")
    return token
