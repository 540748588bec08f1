"""The host names this agent serves besides its own (``jobs.slurm_hosts``) and their
registrations with the server.

Argus v0.3.0 hands a host's commands to the agent registered under that exact host name, so
a login-node agent that serves compute nodes holds one registration (agent id and token) per
served name. They live in ``served_hosts.json`` next to ``token.json``, written atomically
with mode 0600 and read with the same checks::

    {"server_url": "...", "hosts": {"gpu-node-01": {"agent_id": "agent-…",
                                                    "agent_token": "ag_live_…",
                                                    "registered_at": "…"}, …}}

``served_names`` decides the names (the configured list, or every node ``sinfo`` reports),
``register_served`` registers the names that have no registration yet (every one of them
with ``force``). ``argus-agent register`` uses both; so does the daemon
(``channels/served.py``), which registers names that appear later (a node added to the
cluster) with the reporter token. Registrations with another server than the one in use are
ignored (the tokens are only ever sent to the server that issued them).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from argus_agent.argus_api import ArgusClient
from argus_agent.config import Settings
from argus_agent.credentials import refuse_shared_token_file
from argus_agent.errors import ServerError, StateError
from argus_agent.fsutil import atomic_write, ensure_private_dir
from argus_agent.jobs.slurm_cli import SlurmUnavailable
from argus_agent.jobsettings import JobSettings
from argus_agent.logsetup import get_logger
from argus_agent.protocol import CMD_ID_RE
from argus_agent.registration import same_server
from argus_agent.slurmconfig import EVERY_NODE, HOST_RE, MAX_HOSTS

log = get_logger(__name__)

SERVED_FILE = "served_hosts.json"
#: Registrations sent at once (a first `register` of a 256-node cluster).
REGISTER_CONCURRENCY = 8
#: Capabilities announced for a served name (its reruns go through Slurm).
SERVED_CAPABILITIES = ["rerun", "stop", "slurm"]

#: Lists the nodes of the given partitions (all when none): ``SlurmCommands.node_names``.
NodeLister = Callable[[Sequence[str]], Awaitable[list[str]]]


@dataclass(frozen=True)
class ServedHost:
    """One served host name's registration."""

    hostname: str
    agent_id: str
    agent_token: str = field(repr=False)
    registered_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


async def served_names(
    jobs: JobSettings, own: Iterable[str], list_nodes: NodeLister | None
) -> list[str]:
    """The host names to serve besides ``own`` (this agent's hostname and aliases): the
    configured ones, or with ``["*"]`` every node ``list_nodes`` reports. Names sinfo reports
    that do not look like host names are left out (logged). Raises SlurmUnavailable (from
    ``list_nodes``) when the node list cannot be read."""
    if jobs.slurm_hosts == [EVERY_NODE]:
        if list_nodes is None:
            raise StateError('jobs.slurm_hosts = ["*"] needs Slurm\'s sinfo on this host')
        names = []
        listed = await list_nodes(jobs.slurm_partitions)
        if not listed:  # a partition filter that matches nothing, or an odd answer
            where = f" in {', '.join(jobs.slurm_partitions)}" if jobs.slurm_partitions else ""
            raise SlurmUnavailable(f"sinfo listed no nodes{where}")
        if len(listed) > MAX_HOSTS:
            log.warning("sinfo listed more nodes than are served", listed=len(listed))
            listed = listed[:MAX_HOSTS]
        for name in listed:
            if HOST_RE.fullmatch(name):
                names.append(name)
            else:
                log.warning("sinfo reported a node name that is not a host name", node=name[:80])
    else:
        names = list(jobs.slurm_hosts)
    mine = {name.casefold() for name in own}
    return sorted({name for name in names if name.casefold() not in mine})


class ServedRegistrations:
    """``served_hosts.json``: load and save the registrations of the served names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, server_url: str) -> dict[str, ServedHost]:
        """The registrations made with ``server_url`` (none when the file is missing or was
        written for another server). Raises InsecureTokenFileError when group or others may
        read it, StateError when it is unreadable or malformed."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        refuse_shared_token_file(self.path, info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{self.path}: not a regular file")
        try:
            data = json.loads(self.path.read_bytes())
            if not same_server(str(data["server_url"]), server_url):
                return {}
            return {
                name: ServedHost(
                    hostname=name,
                    agent_id=str(entry["agent_id"]),
                    agent_token=str(entry["agent_token"]),
                    registered_at=str(entry.get("registered_at", "")),
                )
                for name, entry in dict(data["hosts"]).items()
                if isinstance(name, str)
                and HOST_RE.fullmatch(name)
                and CMD_ID_RE.fullmatch(str(entry["agent_id"]))
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(
                f"{self.path}: unreadable served-host registrations ({type(exc).__name__}); "
                "run `argus-agent register --force` to register the served host names anew"
            ) from None

    def merge(
        self, server_url: str, made: dict[str, ServedHost], keep: Iterable[str] | None = None
    ) -> dict[str, ServedHost]:
        """Add the registrations just ``made`` to what the file holds *now* (another
        process, `register` or the daemon, may have written it meanwhile), keeping only the
        names in ``keep`` when given; all under an exclusive lock on ``<file>.lock``, so two
        writers never undo each other's tokens. Returns what was saved. Raises StateError."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            ensure_private_dir(self.path.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"{lock_path}: cannot open: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            hosts = {**self.load(server_url), **made}
            if keep is not None:
                hosts = forget_unserved(hosts, keep)
            self.save(server_url, hosts)
            return hosts
        finally:
            os.close(fd)  # closing releases the lock

    def save(self, server_url: str, hosts: dict[str, ServedHost]) -> None:
        """Write all of ``hosts`` at once, mode 0600. Raises StateError naming the path."""
        body = {
            "server_url": server_url,
            "hosts": {
                name: {k: v for k, v in asdict(host).items() if k != "hostname"}
                for name, host in sorted(hosts.items())
            },
        }
        try:
            ensure_private_dir(self.path.parent)
            atomic_write(self.path, json.dumps(body, indent=1).encode() + b"\n", mode=0o600)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write: {exc.strerror}") from None


async def register_served(
    client: ArgusClient,
    user_token: str,
    names: Sequence[str],
    existing: dict[str, ServedHost],
    *,
    force: bool = False,
) -> tuple[dict[str, ServedHost], dict[str, str]]:
    """Register each of ``names`` that has no registration in ``existing`` (every one with
    ``force``: the server then rotates their tokens), ``REGISTER_CONCURRENCY`` at a time.
    Returns (the new registrations, the names that failed with the server's reason)."""
    todo = [name for name in names if force or name not in existing]
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
    made: dict[str, ServedHost] = {}
    failed: dict[str, str] = {}

    async def one(name: str) -> None:
        async with gate:
            try:
                result = await client.register(user_token, name, SERVED_CAPABILITIES)
            except ServerError as exc:
                failed[name] = str(exc)
                return
            except Exception as exc:  # one name's trouble never takes the others down
                log.exception("registering a served host name failed", hostname=name)
                failed[name] = f"agent error: {exc!r}"
                return
            made[name] = ServedHost(name, result.agent_id, result.agent_token)

    await asyncio.gather(*(one(name) for name in todo))
    return made, failed


def served_path(token_path: Path) -> Path:
    """Where the served names' registrations live: beside the agent token."""
    return token_path.with_name(SERVED_FILE)


def forget_unserved(hosts: dict[str, ServedHost], names: Iterable[str]) -> dict[str, ServedHost]:
    """``hosts`` less the names no longer served (their registrations stay on the server
    until it forgets them; the agent just stops polling them)."""
    keep = set(names)
    return {name: host for name, host in hosts.items() if name in keep}


async def register_configured(
    settings: Settings, user_token: str, *, force: bool
) -> tuple[list[str], dict[str, ServedHost], dict[str, str]]:
    """`argus-agent register`'s part for the served names: decide them (sinfo for
    ``["*"]``), register those without a registration (all with ``force``) and save.
    Returns (the served names, the new registrations, the failures with the server's
    reason). Raises SlurmUnavailable when sinfo fails, StateError for the file."""
    from argus_agent.jobs.slurm_cli import SlurmCommands

    commands = SlurmCommands(settings.jobs.slurm_command_timeout_s)
    names = await served_names(
        settings.jobs,
        [settings.agent.hostname, *settings.agent.host_aliases],
        commands.node_names if commands.bins.get("sinfo") else None,
    )
    store = ServedRegistrations(served_path(settings.token_path))
    known = store.load(settings.server.url)  # with force too: a name that fails keeps its own
    client = ArgusClient(settings.server.url, timeout_s=settings.server.timeout_s)
    try:
        made, failed = await register_served(client, user_token, names, known, force=force)
    finally:
        await client.aclose()
    if made:
        store.merge(settings.server.url, made, keep=names)
    return names, made, failed
