"""Launch policy: every rule a rerun must pass before anything runs. Pure functions.

Each check takes values (and, where the host must be consulted, a lookup function passed
in) and returns the cleaned value or raises PayloadError whose message is the reason acked
to the server. Nothing here starts a process; the tests call these directly.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argus_agent.errors import PayloadError

MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_BYTES = 256 * 1024
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
OVERRIDE_KEY_RE = re.compile(r"^[A-Za-z_+~][A-Za-z0-9_.\-/@+]{0,255}$")
#: An ISO 8601 date-time (what Argus writes): the date part is ``YYYY-MM-DD``.
ISO_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
#: What an OS user name recorded by the SDK (``$USER``) may look like.
OS_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
#: A ``jobs.users`` value that lets an Argus account run batches of any OS user.
ANY_OWNER = "*"


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

    def gid_of(self, group: str) -> int | None:
        """The gid of group ``group``, or None when the host has no such group."""
        import grp

        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            return None


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
        if not OVERRIDE_KEY_RE.fullmatch(key):
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
        if not ENV_NAME_RE.fullmatch(name):
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
    """An ISO 8601 timestamp (``2026-01-31T12:00:00Z``; naive means UTC, as Argus writes
    them) as epoch seconds; None for anything else (RFC 2822 dates, epoch numbers,
    ``2020/01/01``)."""
    if not isinstance(raw, str) or not ISO_TIME_RE.match(raw):
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def check_age(created_at: Any, now: float, max_age_s: float, max_skew_s: float = 300.0) -> None:
    """Refuse a command created more than ``max_age_s`` ago (the server redelivers old
    pending commands after an agent outage). Fails closed: a command whose ``created_at``
    is missing or unreadable, or lies more than ``max_skew_s`` in the future (a server clock
    or a forged value that would never expire), is refused too."""
    created = parse_time(created_at)
    if created is None:
        shown = repr(created_at)[:80]
        raise PayloadError(
            f"command refused: its created_at {shown} is not an ISO 8601 time, so its age "
            "cannot be checked (jobs.max_command_age_s)"
        )
    age = now - created
    if age < -max_skew_s:
        raise PayloadError(
            f"command refused: its created_at {created_at[:40]!r} is {-age:.0f} s in the "
            f"future (more than jobs.max_clock_skew_s, {max_skew_s:.0f} s); check the clocks "
            "of this host and the server (NTP)"
        )
    if age > max_age_s:
        raise PayloadError(
            f"command expired: created {age / 60:.0f} min ago, older than "
            f"jobs.max_command_age_s ({max_age_s:.0f} s); request the rerun again"
        )


def check_capacity(running: int, max_jobs: int | None) -> None:
    """Refuse a launch when ``max_jobs`` jobs already run."""
    if max_jobs is not None and running >= max_jobs:
        raise PayloadError(f"host is full: {running} job(s) running, jobs.max_jobs is {max_jobs}")


@dataclass(frozen=True)
class BatchOwner:
    """The OS user a batch was recorded as running as, and where the agent learned it."""

    name: str
    source: str  # "batch" (GET /api/batches/{id} ``user``) or "env snapshot" (``USER``)


def owner_from_env(env: Any) -> BatchOwner | None:
    """The owner recorded in a rerun's env snapshot (its ``USER``), or None."""
    if isinstance(env, dict):
        user = env.get("USER")
        if isinstance(user, str) and user:
            return BatchOwner(user, "env snapshot")
    return None


def resolve_identity(
    requested_by: Any,
    owner: BatchOwner | None,
    *,
    agent_uid: int,
    users: Mapping[str, str],
    run_as: str | None,
    allow_root: bool,
    userdb: UserDb,
    agent_account: str | None = None,
    allowed_requesters: Sequence[str] = (),
    privileged_groups: Sequence[str] = (),
    allow_privileged_groups: bool = False,
) -> Identity:
    """Who the job runs as, and whether the Argus account that pressed Rerun may ask for it.

    The OS user comes from the batch's recorded ``owner`` (the user Argus recorded for the
    run), never from ``requested_by`` (the Argus account that pressed Rerun), which only
    decides whether the request is allowed:

    - A per-user agent (not root) runs a batch only when its owner is the agent's own OS user
      and the request comes from the Argus account that registered the agent
      (``agent_account``) or one in ``allowed_requesters`` (``*``: anyone).
    - A system agent (root) runs a batch as its owner only when ``users`` maps the requesting
      Argus account to that OS user or to ``*`` (any owner). With ``run_as`` set, every job
      runs as that one OS user instead, and the account must be mapped to it or to ``*``.
      Root only with ``allow_root``; a user in gid 0 or in one of ``privileged_groups``
      (root-equivalent: docker, lxd, disk, shadow…) only with ``allow_privileged_groups``.

    Raises PayloadError naming both the requester and the owner.
    """
    who = requested_by if isinstance(requested_by, str) and requested_by else None
    if owner is not None and not OS_USER_RE.fullmatch(owner.name):
        raise PayloadError(f"the batch's recorded user {owner.name[:64]!r} is not an OS user name")
    if agent_uid != 0:
        return _per_user_identity(who, owner, agent_uid, userdb, agent_account, allowed_requesters)
    if run_as is not None:
        name = run_as
        mapped = users.get(who) if who else None
        if mapped not in (run_as, ANY_OWNER):
            raise PayloadError(
                f"Argus user {who!r} may not run jobs on this host: jobs.run_as runs every job "
                f"as {run_as!r}, and jobs.users does not map {who!r} to {run_as!r} (or '*')"
            )
    else:
        if owner is None:
            raise PayloadError(_UNKNOWN_OWNER)
        name = owner.name
        mapped = users.get(who) if who else None
        if mapped is None:
            raise PayloadError(
                f"Argus user {who!r} is not mapped to an OS user on this host (jobs.users), "
                f"so it may not run batch owner {name!r}'s command"
            )
        if mapped not in (name, ANY_OWNER):
            raise PayloadError(
                f"Argus user {who!r} may run only {mapped!r}'s batches on this host "
                f"(jobs.users), and this batch belongs to OS user {name!r} "
                f"(from the {owner.source})"
            )
    try:
        entry = userdb.by_name(name)
    except KeyError:
        raise PayloadError(
            f"OS user {name!r} (owner of the batch, asked for by Argus user {who!r}) does not "
            "exist on this host"
        ) from None
    identity = _identity(entry, userdb)
    if identity.uid == 0:
        if not allow_root:
            raise PayloadError(
                "refusing to run a job as root; set jobs.allow_root = true to allow it"
            )
    elif not allow_privileged_groups:
        _check_groups(identity, privileged_groups, userdb)
    return identity


_UNKNOWN_OWNER = (
    "cannot tell which OS user this batch ran as: the batch records no user and its env "
    "snapshot no USER; give the agent a reporter token that can read the batch "
    "(ARGUS_TOKEN or server.token_file)"
)


def _per_user_identity(
    who: str | None,
    owner: BatchOwner | None,
    agent_uid: int,
    userdb: UserDb,
    agent_account: str | None,
    allowed_requesters: Sequence[str],
) -> Identity:
    allowed = set(allowed_requesters) | ({agent_account} if agent_account else set())
    if not allowed:
        raise PayloadError(
            "this per-user agent does not know which Argus user it belongs to; "
            "re-register it (argus-agent register --force) or set jobs.allowed_requesters"
        )
    if "*" not in allowed and who not in allowed:
        raise PayloadError(
            f"Argus user {who!r} may not run jobs through this per-user agent of "
            f"{agent_account!r}; list them in jobs.allowed_requesters"
        )
    identity = _identity(userdb.by_uid(agent_uid), userdb)
    if owner is None:
        raise PayloadError(_UNKNOWN_OWNER)
    if owner.name != identity.user:
        raise PayloadError(
            f"batch belongs to OS user {owner.name!r} (from the {owner.source}), but this "
            f"per-user agent runs as {identity.user!r}; Argus user {who!r} must rerun it "
            "where that user's agent (or a system agent) runs"
        )
    return identity


def _identity(entry: Any, userdb: UserDb) -> Identity:
    return Identity(
        user=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=userdb.groups(entry.pw_name, entry.pw_gid),
        home=entry.pw_dir,
        shell=entry.pw_shell,
    )


def _check_groups(identity: Identity, privileged: Sequence[str], userdb: UserDb) -> None:
    """Refuse a user whose groups give root or something close to it by a side door."""
    gids = {identity.gid, *identity.groups}
    if 0 in gids:
        raise PayloadError(
            f"refusing to run a job as {identity.user!r}: the user is in group 0 (root's "
            "group); set jobs.allow_privileged_groups = true to allow it"
        )
    for group in privileged:
        gid = userdb.gid_of(group)
        if gid is not None and gid in gids:
            raise PayloadError(
                f"refusing to run a job as {identity.user!r}: the user is in group {group!r}, "
                "which is close to root (jobs.privileged_groups); set "
                "jobs.allow_privileged_groups = true to allow it"
            )


#: Pseudo filesystems a job's working directory may not be in: their paths mean something
#: else for every process that resolves them (``/proc/self/cwd`` is the resolver's cwd).
PSEUDO_ROOTS = (Path("/proc"), Path("/sys"))
MAX_SYMLINKS = 40


def check_cwd(raw: Any, default: Path, identity: Identity) -> Path:
    """The working directory, resolved as the job's user would: absolute, existing, a
    directory the user can enter, reached through directories the user can search.

    The path is walked one name at a time, symlinks followed, each directory's search (x)
    permission checked for the job's user before the next name is looked up, so a refusal
    tells the requester nothing the job's user could not find out (not whether a file
    exists in another user's private directory, nor where a symlink in it points). Returns
    the resolved path, which is what the shim enters, only after dropping to the job's user:
    a symlink swapped after this check still gives the job nothing its user lacks. Refusals
    carry the path resolved so far in ``audit`` (for the local audit log only).
    """
    if raw is None:
        cwd = default
    elif not isinstance(raw, str) or not raw:
        raise PayloadError(f"payload.cwd: expected an absolute path, got {raw!r}")
    else:
        cwd = Path(raw)
    if "\x00" in str(cwd) or not cwd.is_absolute():
        raise PayloadError(f"payload.cwd: expected an absolute path, got {str(cwd)[:200]!r}")
    return _walk(cwd, identity)


def _walk(cwd: Path, identity: Identity) -> Path:
    """Resolve ``cwd`` like the kernel's path walk, as ``identity`` (see ``check_cwd``)."""
    current = Path("/")
    names = list(reversed(cwd.parts[1:]))
    links = 0

    def refuse(reason: str) -> PayloadError:
        return PayloadError(
            f"working directory {cwd} {reason}", audit={"resolved_cwd": str(current)}
        )

    while names:
        name = names.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        if not _searchable(current, identity):
            raise refuse(f"is not accessible to user {identity.user}")
        candidate = current / name
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            current = candidate
            raise refuse("does not exist on this host") from None
        except OSError as exc:
            current = candidate
            raise refuse(f"cannot be checked: {exc.strerror or exc}") from None
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise refuse("has too many levels of symbolic links")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
            names.extend(reversed([p for p in target.parts if p != "/"]))
            continue
        current = candidate
        if any(current == root or root in current.parents for root in PSEUDO_ROOTS):
            raise refuse(f"is in {current}, which is no place to run a job")
        if names and not stat.S_ISDIR(info.st_mode):
            raise refuse("is not a directory")
    if not current.is_dir():
        raise refuse("is not a directory")
    if not _searchable(current, identity):
        raise refuse(f"is not accessible to user {identity.user}")
    return current


def _searchable(directory: Path, identity: Identity) -> bool:
    """Whether ``identity`` may search (x) ``directory`` itself, by its mode bits."""
    if identity.uid == 0:
        return True
    try:
        info = os.stat(directory)
    except OSError:
        return False
    if info.st_uid == identity.uid:
        bit = stat.S_IXUSR
    elif info.st_gid in identity.groups or info.st_gid == identity.gid:
        bit = stat.S_IXGRP
    else:
        bit = stat.S_IXOTH
    return bool(info.st_mode & bit)
