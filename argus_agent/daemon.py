"""The daemon: ``Agent.run()`` goes through named phases, start-up → serve → shutdown.

**Start-up** (``_startup``) takes the state dir's lock (one agent per state dir), loads the
token, decides the server (the registered one), opens the ledger, the outbox, the HTTP
client, the GPU backend and the job table, re-adopts jobs of an earlier run, binds the
control socket and tells systemd it is ready. Each step registers its cleanup on an
``AsyncExitStack``, so a step that fails closes everything opened before it.

**Serve** (``_serve``) runs the loops until the shutdown event is set or a loop raises;
a loop that raises is logged with its traceback and takes the daemon down
(``LoopCrashedError``, exit 6) so that systemd restarts it.

**Shutdown** (``_shutdown``) lets the loops finish (bounded), leaves running jobs running
under their shims, and the exit stack closes what start-up opened, in reverse order.
Signals are the CLI's business: it sets the event (tests set it directly).

Tasks and threads, and who owns them::

    event loop (main thread)
    ├── channel        server.transport = "poll": PollChannel.run: poll → dispatcher → acks
    │                  (+ its heartbeat task); "auto"/"websocket": AutoChannel.run (channels/
    │                  auto.py): websocket sessions (receive loop, command worker, ticker),
    │                  polls while auto has no websocket (+ its heartbeat task)
    ├── sender         EventSender.run: outbox → events frames on the websocket while it is
    │                  open, else POST /api/events/batch
    ├── telemetry      Telemetry.run: sampler, log tailer, drop notices (one task each)
    ├── housekeeping   watchdog (only while ``health`` is good), STATUS=, reaping, pruning
    ├── served hosts   ServedHostsPoller.run (jobs.slurm_hosts only): polls every served
    │                  host name's registration, one task for all (channels/served.py)
    ├── job watchers   JobManager: one per job (shim exit, takeover of a job whose shim died);
    │                  jobs.launcher = "slurm": SlurmJobs' queue watcher and grace timers
    ├── job reports    JobManager / SlurmJobs: each job's end handed to telemetry
    └── control socket ControlServer: `argus-agent status` answers, and the operator's
                       drain, undrain and stop (actions.py)
    threads
    ├── outbox writer  Outbox: the only SQLite connection of outbox.db
    ├── to_thread      /proc scans of fallback stops, launch-spec file checks
    ├── GPU readers    GpuReader: NVML calls on daemon threads, each under a time limit
    └── child watchers asyncio: one waitpid thread per shim this process started

Every loop reports progress to ``self.health``; the watchdog is fed only while all are
within their deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from argus_agent import __version__
from argus_agent.actions import OperatorActions
from argus_agent.argus_api import ArgusClient
from argus_agent.audit import AuditLog
from argus_agent.backoff import Backoff
from argus_agent.channels.auto import AutoChannel, make_channel
from argus_agent.channels.base import Channel, sleep_unless
from argus_agent.channels.poll import PollChannel
from argus_agent.channels.served import ServedHostsPoller
from argus_agent.config import ServerSettings, Settings
from argus_agent.control import SOCKET_NAME, ControlServer
from argus_agent.credentials import AgentCredentials, load_credentials
from argus_agent.dispatcher import Dispatcher
from argus_agent.drain import DRAIN_FILE, DrainState
from argus_agent.errors import ConfigError, LoopCrashedError, ServerError, StateError
from argus_agent.fsutil import ensure_private_dir
from argus_agent.health import Health
from argus_agent.instance import LOCK_NAME, InstanceLock
from argus_agent.jobs import reaper
from argus_agent.jobs.launcher import Launcher, make_launcher
from argus_agent.jobs.slurm import SlurmJobs
from argus_agent.ledger import CommandLedger
from argus_agent.logsetup import get_logger
from argus_agent.outbox import Outbox
from argus_agent.protocol import Command, MalformedCommand
from argus_agent.registration import same_server
from argus_agent.sender import EventSender
from argus_agent.servedhosts import ServedRegistrations, served_path
from argus_agent.snapshot import build_snapshot
from argus_agent.status import AgentState
from argus_agent.systemd import Notifier, watchdog_interval_s
from argus_agent.telemetry.gpu import GpuBackend, GpuReader, open_backend_async
from argus_agent.telemetry.manager import Telemetry
from argus_agent.telemetry.slurm_usage import report_usage

log = get_logger(__name__)

#: Acked commands are remembered this long (the server never redelivers acked ones).
LEDGER_RETENTION_S = 30 * 86400
SHUTDOWN_TIMEOUT_S = 10.0
PRUNE_EVERY_S = 3600.0
#: How often housekeeping runs (and feeds the watchdog, at most half its interval).
HOUSEKEEPING_S = 5.0


@dataclass
class _Serving:
    """What start-up hands to serving."""

    channel: Channel
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _with_registered_server(settings: Settings, creds: AgentCredentials) -> Settings:
    """The settings to run with: the server this host registered with, unless config names
    one explicitly, in which case the two must agree (the agent token is never sent to
    another server than the one that issued it)."""
    registered = creds.server_url.rstrip("/")
    if "url" not in settings.server.model_fields_set:
        try:  # validated as if configured: plain http only to loopback, etc.
            server = ServerSettings.model_validate(
                {**settings.server.model_dump(exclude={"url"}), "url": registered}
            )
        except ValidationError as exc:
            reason = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(
                f"{settings.token_path}: the registered server {registered}: {reason}"
            ) from None
        return settings.model_copy(update={"server": server})
    if same_server(settings.server.url, registered):
        return settings
    raise ConfigError(
        f"server.url is {settings.server.url}, but this host is registered with "
        f"{registered} ({settings.token_path}); the agent token is only sent to the "
        "server that issued it: remove server.url (and ARGUS_URL) to use the registered "
        "server, or run `argus-agent register --force` to move to the new one"
    )


class Agent:
    """One agent process. Build it, then ``await run(shutdown_event)``."""

    def __init__(
        self,
        settings: Settings,
        *,
        credentials: AgentCredentials | None = None,
        notifier: Notifier | None = None,
        gpu_backend: GpuBackend | None = None,
    ) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self._credentials = credentials
        self._gpu_backend = gpu_backend
        self.outbox: Outbox | None = None
        self.telemetry: Telemetry | None = None
        self.sender: EventSender | None = None
        self.ledger: CommandLedger | None = None
        self.jobs: Launcher | None = None
        self.state: AgentState | None = None
        self.dispatcher: Dispatcher | None = None
        #: The command channel (``server.transport``: PollChannel or AutoChannel).
        self.channel: PollChannel | AutoChannel | None = None
        #: Polls the served host names' registrations (``jobs.slurm_hosts``), else None.
        self.served: ServedHostsPoller | None = None
        #: Progress of the long-running loops; the watchdog is fed only while all are healthy.
        self.health = Health(settings.agent.stall_timeout_s)
        self._reported_stuck: list[str] = []
        self.ready = asyncio.Event()
        #: Whether the operator drained this host (read at start-up; see drain.py).
        self.drain = DrainState(settings.agent.state_dir / DRAIN_FILE)

    def _load_credentials(self) -> AgentCredentials:
        return load_credentials(self.settings.token_path)

    async def run(self, shutdown: asyncio.Event) -> None:
        """Run until ``shutdown`` is set: start-up, serve, shutdown.

        Raises ConfigError/StateError when start-up fails (everything opened so far is
        closed again), and LoopCrashedError when a loop raised while serving (the daemon
        goes down so that systemd restarts it).
        """
        async with contextlib.AsyncExitStack() as stack:
            serving = await self._startup(stack)
            crashed = await self._serve(serving, shutdown)
            await self._shutdown(serving)
        if crashed is not None:
            name, exc = crashed
            raise LoopCrashedError(f"the {name} loop crashed: {type(exc).__name__}: {exc}")

    # -- start-up ------------------------------------------------------------------------

    async def _startup(self, stack: contextlib.AsyncExitStack) -> _Serving:
        """Open the state dir and everything in it, re-adopt jobs, bind the control socket,
        tell systemd we are ready. Every resource is registered on ``stack``, so a step that
        fails closes what the steps before it opened."""
        settings = self.settings
        state_dir = settings.agent.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot create the state dir: {exc.strerror}") from None
        lock = InstanceLock(state_dir / LOCK_NAME)
        lock.acquire()  # before anything else touches the state dir (a second agent stops)
        stack.callback(lock.release)
        try:
            ensure_private_dir(state_dir)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot use the state dir: {exc.strerror}") from None
        self.drain.load()  # before any command can arrive
        creds = self._credentials or self._load_credentials()
        settings = self.settings = _with_registered_server(settings, creds)
        reporter_token = events_token(settings)
        self.ledger = CommandLedger(state_dir / "state.db")
        stack.callback(self.ledger.close)
        self.ledger.prune(LEDGER_RETENTION_S)
        self.outbox = Outbox(
            state_dir / "outbox.db",
            max_bytes=int(settings.telemetry.outbox_max_mb * 1024 * 1024),
            chunk_size=min(100, settings.telemetry.send_batch_size),
        )
        await self.outbox.start()
        stack.push_async_callback(self.outbox.close)
        client = ArgusClient(settings.server.url, timeout_s=settings.server.timeout_s)
        stack.push_async_callback(client.aclose)
        self.jobs = make_launcher(settings.jobs, state_dir)  # local shims, or Slurm
        gpu = GpuReader(
            self._gpu_backend
            or await open_backend_async(
                settings.telemetry.gpu if settings.telemetry.enabled else "none",
                timeout_s=max(5.0, settings.telemetry.gpu_timeout_s),
            ),
            timeout_s=settings.telemetry.gpu_timeout_s,
        )
        stack.callback(gpu.close)
        self.telemetry = Telemetry(
            settings.telemetry, self.outbox, self.jobs, gpu, hostname=settings.agent.hostname
        )
        self.telemetry.health = self.health
        self.jobs.on_ended = self.telemetry.job_ended
        if isinstance(self.jobs, SlurmJobs):  # sstat readings become resource snapshots
            self.jobs.on_usage = functools.partial(report_usage, self.telemetry)
            self.jobs.health = self.health
        await self.telemetry.start()
        self.sender = EventSender(
            self.outbox,
            client,
            reporter_token,
            Backoff(settings.agent.backoff_initial_s, settings.agent.backoff_max_s),
            batch_size=settings.telemetry.send_batch_size,
            auth_retry_s=settings.agent.auth_retry_s,
        )
        self.sender.health = self.health
        # Jobs whose shim dies are re-parented to the agent, which then learns their status.
        if reaper.set_subreaper(True):
            stack.callback(reaper.set_subreaper, False)
        adopted, ended_meanwhile = self.jobs.adopt_existing()
        stack.push_async_callback(self.jobs.shutdown)
        self.jobs.prune(settings.jobs.retention_days * 86400)
        self.state = AgentState(
            version=__version__,
            pid=os.getpid(),
            started_at=time.time(),
            server_url=settings.server.url,
            agent_id=creds.agent_id,
            hostname=settings.agent.hostname,
            state_dir=str(state_dir),
        )
        dispatcher = Dispatcher(
            self.ledger,
            self.jobs,
            settings,
            AuditLog(state_dir / "audit.log"),
            agent_account=creds.owner,
            drain=self.drain,
            owner_lookup=(
                functools.partial(client.batch_user, reporter_token) if reporter_token else None
            ),
            on_launch_failed=functools.partial(self._report_refused_rerun, client, reporter_token),
        )
        self.dispatcher = dispatcher
        channel = make_channel(
            settings.server.transport,
            client,
            creds,
            dispatcher,
            self.state.channel,
            settings.agent,
            server_poll_interval_s=creds.poll_interval_s or 10.0,
            reload_credentials=self._load_credentials if self._credentials is None else None,
            compression=settings.server.websocket_compression,
        )
        channel.health = self.health
        self.channel = channel
        if not isinstance(channel, PollChannel):
            self.sender.transport = channel  # events go over the websocket while it is open
        if settings.jobs.slurm_hosts and isinstance(self.jobs, SlurmJobs):
            self.served = ServedHostsPoller(
                client,
                dispatcher,
                settings,
                ServedRegistrations(served_path(settings.token_path)),
                own_names=[settings.agent.hostname, *settings.agent.host_aliases],
                user_token=reporter_token,
                list_nodes=self.jobs.commands.node_names,
                server_poll_interval_s=creds.poll_interval_s or 10.0,
            )
            self.served.health = self.health
            self.served.adopt_saved()
            if isinstance(channel, AutoChannel):  # one websocket announces every name
                channel.served = self.served.announced
                self.served.covered = channel.covered
                self.served.on_change = channel.reannounce
        control = ControlServer(
            state_dir / SOCKET_NAME,
            self.snapshot,
            OperatorActions(self.drain, dispatcher, dispatcher.audit).handlers(),
            dispatcher.audit,
        )
        try:
            await control.start()
            stack.push_async_callback(control.close)
        except StateError as exc:
            log.warning("status socket unavailable", error=str(exc))
        log.info(
            "agent started",
            version=__version__,
            agent_id=creds.agent_id,
            server=settings.server.url,
            hostname=settings.agent.hostname,
            readopted_jobs=len(adopted),
            ended_while_away=len(ended_meanwhile),
            gpu=gpu.backend.name,
            transport=settings.server.transport,
        )
        self.notifier.ready(f"serving {settings.server.url} ({settings.server.transport})")
        self.ready.set()
        return _Serving(channel)

    async def _report_refused_rerun(
        self,
        client: ArgusClient,
        token: str | None,
        command: Command | MalformedCommand,
        reason: str,
    ) -> None:
        """End a refused rerun's batch with ``batch_failed`` (Argus v0.3.0 would leave it
        ``requested`` for ever), but only while it is still ``requested``: a stale or forged
        command never turns a running or finished batch into a failed one. A batch the
        reporter token cannot read is reported (a rerun batch belongs to whoever pressed
        Rerun, often not the agent's token)."""
        assert self.telemetry is not None
        if token is not None and command.batch_id is not None:
            try:
                status = (await client.batch(token, command.batch_id)).get("status")
            except ServerError:
                status = None
            if status is not None and status != "requested":
                log.info(
                    "refused rerun's batch is no longer requested; it is left as it is",
                    batch_id=command.batch_id,
                    status=status,
                )
                return
        await self.telemetry.launch_failed(command, reason)

    # -- serving -------------------------------------------------------------------------

    async def _serve(
        self, serving: _Serving, shutdown: asyncio.Event
    ) -> tuple[str, BaseException] | None:
        """Run the loops until ``shutdown`` is set or one of them raises. Returns the loop
        that crashed and its error, or None."""
        assert self.telemetry is not None and self.sender is not None
        loops: dict[str, Awaitable[None]] = {
            "channel": serving.channel.run(shutdown),
            "housekeeping": self._housekeeping(shutdown),
            "telemetry": self.telemetry.run(shutdown),
            "sender": self.sender.run(shutdown),
        }
        if self.served is not None:
            loops["served_hosts"] = self.served.run(shutdown)
        tasks = {asyncio.create_task(coro, name=name): name for name, coro in loops.items()}
        serving.tasks = set(tasks)
        crashed: tuple[str, BaseException] | None = None
        stopper = asyncio.create_task(shutdown.wait())
        pending: set[asyncio.Task[Any]] = {*tasks, stopper}
        while not shutdown.is_set() and crashed is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is stopper or task.cancelled():
                    continue
                exc = task.exception()
                if exc is not None:
                    crashed = (tasks[task], exc)
                    log.error(
                        "a loop of the agent crashed; stopping so that systemd restarts it",
                        loop=tasks[task],
                        exc_info=exc,
                    )
        stopper.cancel()
        shutdown.set()
        return crashed

    # -- shutdown ------------------------------------------------------------------------

    async def _shutdown(self, serving: _Serving) -> None:
        """Let the loops finish (bounded), leave running jobs running. What start-up opened
        is closed by the exit stack after this returns."""
        assert self.jobs is not None
        log.info(
            "agent stopping; running jobs are left running",
            running_jobs=len(self.jobs.running()),
        )
        self.notifier.stopping()
        if serving.tasks:
            _done, late = await asyncio.wait(serving.tasks, timeout=SHUTDOWN_TIMEOUT_S)
            for task in late:
                log.warning("a loop did not stop in time; cancelled", loop=task.get_name())
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _housekeeping(self, shutdown: asyncio.Event) -> None:
        """Feed systemd's watchdog while every loop is healthy (see ``health``), keep its
        STATUS current, reap orphans of jobs, and prune old jobs and acked commands once an
        hour."""
        interval = min(watchdog_interval_s() or HOUSEKEEPING_S, HOUSEKEEPING_S)
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not shutdown.is_set():
            self.health.report("housekeeping", interval)
            problem = self.health.describe()
            if self.state is not None:
                line = _one_line_status(self.state, self.jobs)
                self.notifier.status(f"{line}; {problem}" if problem else line)
            if problem is None and watchdog_interval_s() is not None:
                self.notifier.watchdog()
            stuck = sorted(self.health.overdue())
            if problem is not None and stuck != self._reported_stuck:
                log.error("the agent is unhealthy; systemd's watchdog is not fed", loops=problem)
            self._reported_stuck = stuck
            if self.jobs is not None:
                self.jobs.reap_orphans()
            if time.monotonic() >= next_prune and self.jobs and self.ledger:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                self.jobs.prune(self.settings.jobs.retention_days * 86400)
                self.ledger.prune(LEDGER_RETENTION_S)
            await sleep_unless(shutdown, interval)

    def snapshot(self) -> dict[str, Any]:
        """The status document served on the control socket (built in ``snapshot.py``)."""
        return build_snapshot(self)


def _one_line_status(state: AgentState, jobs: Launcher | None) -> str:
    running = len(jobs.running()) if jobs else 0
    return f"{state.channel.state}; {running} job(s) running"


def events_token(settings: Settings) -> str | None:
    """The reporter token for events: ARGUS_TOKEN or ``server.token`` (both land in
    ``server.token``), else the first line of ``server.token_file``; None when none is set or
    the file cannot be read or holds no reporter token (logged: only telemetry needs it).
    Raises InsecureTokenFileError (fatal at start-up, exit 4) when group or others may read
    ``server.token_file``."""
    from argus_agent.credentials import read_user_token
    from argus_agent.errors import InsecureTokenFileError

    if settings.server.token:
        return settings.server.token
    path = settings.server.token_file
    if path is None:
        return None
    try:
        return read_user_token(path)
    except InsecureTokenFileError:
        raise
    except StateError as exc:
        log.error("server.token_file unusable; events will not be sent", error=str(exc))
        return None
