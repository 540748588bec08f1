"""Launch policy: every rule a rerun must pass before anything runs. Pure functions.

Each check takes values (and, where the host must be consulted, a lookup function passed
in) and returns the cleaned value or raises PayloadError whose message is the reason acked
to the server. Nothing here starts a process; the tests call these directly.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argus_agent.errors import PayloadError

MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_BYTES = 256 * 1024
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
OVERRIDE_KEY_RE = re.compile(r"^[A-Za-z_+~][A-Za-z0-9_.\-/@+]{0,255}$")


@dataclass(frozen=True)
class Identity:
    """The OS user a job runs as."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @classmethod
    def of_uid(cls, uid: int, userdb: UserDb | None = None) -> Identity:
        """The identity of an existing user (with all its groups). Raises KeyError."""
        db = userdb or UserDb()
        entry = db.by_uid(uid)
        return cls(
            entry.pw_name,
            entry.pw_uid,
            entry.pw_gid,
            db.groups(entry.pw_name, entry.pw_gid),
            entry.pw_dir,
            entry.pw_shell,
        )

    def login_env(self) -> dict[str, str]:
        """HOME, USER, LOGNAME and SHELL for this user."""
        return {
            "HOME": self.home,
            "USER": self.user,
            "LOGNAME": self.user,
            "SHELL": self.shell or "/bin/sh",
        }


class UserDb:
    """How the policy looks up OS users; the default reads the system's (pwd, grp)."""

    def by_name(self, name: str) -> Any:
        """A ``pwd.struct_passwd``-like object; raises KeyError when unknown."""
        import pwd

        return pwd.getpwnam(name)

    def by_uid(self, uid: int) -> Any:
        """A ``pwd.struct_passwd``-like object; raises KeyError when unknown."""
        import pwd

        return pwd.getpwuid(uid)

    def groups(self, name: str, gid: int) -> tuple[int, ...]:
        """Every group of user ``name`` (what initgroups would set)."""
        return tuple(os.getgrouplist(name, gid))


def check_command(raw: Any) -> str:
    """The recorded command line: a non-empty string of at most 64 KiB with no NUL."""
    if raw is None:
        raise PayloadError("the source batch recorded no command (payload.command is null)")
    if not isinstance(raw, str):
        raise PayloadError(f"payload.command: expected a string, got {type(raw).__name__}")
    if not raw.strip():
        raise PayloadError("payload.command is empty")
    if "\x00" in raw:
        raise PayloadError("payload.command contains a NUL byte")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_COMMAND_BYTES:
        raise PayloadError(f"payload.command is {size} bytes; at most {MAX_COMMAND_BYTES} allowed")
    return raw


def check_overrides(raw: Any) -> dict[str, str | int | float | bool | None]:
    """Overrides: an object of safely shaped keys to scalar values (null means none)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PayloadError(f"payload.overrides: expected an object, got {type(raw).__name__}")
    for key, value in raw.items():
        if not OVERRIDE_KEY_RE.match(key):
            raise PayloadError(f"payload.overrides: key {key[:80]!r} has an unsafe shape")
        if not isinstance(value, str | int | float | bool) and value is not None:
            raise PayloadError(
                f"payload.overrides.{key}: expected a scalar, got {type(value).__name__}"
            )
        if isinstance(value, str) and "\x00" in value:
            raise PayloadError(f"payload.overrides.{key}: value contains a NUL byte")
    return dict(raw)


def is_denied(name: str, deny: Sequence[str]) -> bool:
    """Whether ``name`` is on the deny list (entries ending in ``*`` match a prefix)."""
    return any(name.startswith(d[:-1]) if d.endswith("*") else name == d for d in deny)


def check_env(raw: Any, deny: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The recorded environment: valid names, string values, ≤ 256 KiB in total.

    Returns (what is kept, the names dropped by the deny list).
    """
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise PayloadError(f"payload.env: expected an object, got {type(raw).__name__}")
    kept: dict[str, str] = {}
    dropped: list[str] = []
    total = 0
    for name, value in raw.items():
        if not ENV_NAME_RE.match(name):
            raise PayloadError(f"payload.env: {name[:80]!r} is not a valid variable name")
        if not isinstance(value, str):
            raise PayloadError(f"payload.env.{name}: expected a string, got {type(value).__name__}")
        if "\x00" in value:
            raise PayloadError(f"payload.env.{name}: value contains a NUL byte")
        total += len(name) + len(value.encode("utf-8", "surrogatepass")) + 2
        if is_denied(name, deny):
            dropped.append(name)
        else:
            kept[name] = value
    if total > MAX_ENV_BYTES:
        raise PayloadError(f"payload.env is {total} bytes; at most {MAX_ENV_BYTES} allowed")
    return kept, dropped


def check_host(raw: Any, hostname: str, aliases: Sequence[str]) -> None:
    """The batch must come from this host: its hostname or one of the configured aliases."""
    if not isinstance(raw, str) or not raw:
        raise PayloadError("payload.host is missing; cannot tell which host the batch ran on")
    names = {n.casefold() for n in (hostname, *aliases)}
    if raw.casefold() not in names:
        raise PayloadError(
            f"batch ran on host {raw[:255]!r}, not on this host ({hostname!r}); "
            "add it to agent.host_aliases if it is the same machine"
        )


def parse_time(raw: Any) -> float | None:
    """An ISO 8601 timestamp as epoch seconds (naive means UTC); None when unreadable."""
    if not isinstance(raw, str):
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def check_age(created_at: Any, now: float, max_age_s: float) -> None:
    """Refuse a command created more than ``max_age_s`` ago (the server redelivers old
    pending commands after an agent outage). A command without a readable time passes."""
    created = parse_time(created_at)
    if created is None:
        return
    age = now - created
    if age > max_age_s:
        raise PayloadError(
            f"command expired: created {age / 60:.0f} min ago, older than "
            f"jobs.max_command_age_s ({max_age_s:.0f} s); request the rerun again"
        )


def check_capacity(running: int, max_jobs: int | None) -> None:
    """Refuse a launch when ``max_jobs`` jobs already run."""
    if max_jobs is not None and running >= max_jobs:
        raise PayloadError(f"host is full: {running} job(s) running, jobs.max_jobs is {max_jobs}")


def resolve_identity(
    requested_by: Any,
    *,
    agent_uid: int,
    users: Mapping[str, str],
    run_as: str | None,
    allow_root: bool,
    userdb: UserDb,
    owner: str | None = None,
    allowed_requesters: Sequence[str] = (),
) -> Identity:
    """Who the job runs as. A per-user agent (not root) runs every job as itself, and only
    for the Argus user it was registered by (``owner``) or those in ``allowed_requesters``
    (``*``: anyone): Argus sends a host's commands to whichever agent of that host polled
    last, so another user's per-user agent must not run them. A system agent (root) maps the
    Argus user who asked (``jobs.users``), else uses ``jobs.run_as``; root only with
    ``allow_root``."""
    who = requested_by if isinstance(requested_by, str) and requested_by else None
    if agent_uid != 0:
        allowed = set(allowed_requesters) | ({owner} if owner else set())
        if not allowed:
            raise PayloadError(
                "this per-user agent does not know which Argus user it belongs to; "
                "re-register it (argus-agent register --force) or set jobs.allowed_requesters"
            )
        if "*" not in allowed and who not in allowed:
            raise PayloadError(
                f"Argus user {who!r} may not run jobs through this per-user agent of "
                f"{owner!r}; list them in jobs.allowed_requesters"
            )
        entry = userdb.by_uid(agent_uid)
    else:
        name = users.get(who) if who else None
        if name is None:
            name = run_as
        if name is None:
            raise PayloadError(
                f"Argus user {who!r} is not mapped to an OS user on this host "
                "(jobs.users) and jobs.run_as is not set"
            )
        try:
            entry = userdb.by_name(name)
        except KeyError:
            raise PayloadError(
                f"OS user {name!r} (for Argus user {who!r}) does not exist on this host"
            ) from None
    if entry.pw_uid == 0 and agent_uid == 0 and not allow_root:
        raise PayloadError("refusing to run a job as root; set jobs.allow_root = true to allow it")
    return Identity(
        user=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=userdb.groups(entry.pw_name, entry.pw_gid),
        home=entry.pw_dir,
        shell=entry.pw_shell,
    )


def usable_by(
    path: Path, uid: int, gids: Sequence[int], stat_fn: Callable[[Path], os.stat_result] = os.stat
) -> bool:
    """Whether user ``uid`` (with groups ``gids``) may enter ``path``: search (x) permission
    on the directory and every ancestor, by the owner / group / other bits."""
    if uid == 0:
        return True
    for directory in (*reversed(path.parents), path):
        info = stat_fn(directory)
        if info.st_uid == uid:
            bit = stat.S_IXUSR
        elif info.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def check_cwd(raw: Any, default: Path, identity: Identity) -> Path:
    """The working directory: absolute, existing, a directory the job's user can enter."""
    if raw is None:
        cwd = default
    elif not isinstance(raw, str) or not raw:
        raise PayloadError(f"payload.cwd: expected an absolute path, got {raw!r}")
    else:
        cwd = Path(raw)
    if "\x00" in str(cwd) or not cwd.is_absolute():
        raise PayloadError(f"payload.cwd: expected an absolute path, got {str(cwd)[:200]!r}")
    if not cwd.exists():
        raise PayloadError(f"working directory {cwd} does not exist on this host")
    if not cwd.is_dir():
        raise PayloadError(f"working directory {cwd} is not a directory")
    try:
        usable = usable_by(cwd, identity.uid, identity.groups)
    except OSError as exc:
        raise PayloadError(f"working directory {cwd}: {exc.strerror}") from None
    if not usable:
        raise PayloadError(f"working directory {cwd} is not accessible to user {identity.user}")
    return cwd
