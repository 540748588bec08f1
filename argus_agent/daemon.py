"""The daemon: ``Agent.run()`` goes through start-up, serving and shutdown.

Start-up opens the state dir (ledger, job records, token), re-adopts jobs of an earlier run,
binds the control socket and tells systemd it is ready. Serving runs the channel until the
shutdown event is set. Shutdown stops the channel, leaves running jobs running and closes
everything. Signals are the CLI's business: it sets the event (tests set it directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from dataclasses import asdict
from typing import Any

from argus_agent import __version__
from argus_agent.argus_api import ArgusClient
from argus_agent.audit import AuditLog
from argus_agent.backoff import Backoff
from argus_agent.channels.base import sleep_unless
from argus_agent.channels.poll import PollChannel
from argus_agent.config import Settings
from argus_agent.control import SOCKET_NAME, ControlServer
from argus_agent.credentials import AgentCredentials, load_credentials
from argus_agent.dispatcher import Dispatcher
from argus_agent.errors import StateError
from argus_agent.fsutil import ensure_private_dir
from argus_agent.jobs import reaper
from argus_agent.jobs.store import JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.ledger import CommandLedger
from argus_agent.logsetup import get_logger
from argus_agent.outbox import Outbox
from argus_agent.sender import EventSender
from argus_agent.status import AgentState
from argus_agent.systemd import Notifier, watchdog_interval_s
from argus_agent.telemetry.gpu import GpuBackend, GpuReader, open_backend_async
from argus_agent.telemetry.manager import Telemetry

log = get_logger(__name__)

#: Acked commands are remembered this long (the server never redelivers acked ones).
LEDGER_RETENTION_S = 30 * 86400
SHUTDOWN_TIMEOUT_S = 10.0
PRUNE_EVERY_S = 3600.0


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
        self.jobs: JobManager | None = None
        self.state: AgentState | None = None
        self.ready = asyncio.Event()

    def _load_credentials(self) -> AgentCredentials:
        return load_credentials(self.settings.token_path)

    async def run(self, shutdown: asyncio.Event) -> None:
        """Run until ``shutdown`` is set. Raises StateError/ConfigError during start-up only."""
        settings = self.settings
        state_dir = settings.agent.state_dir
        try:
            ensure_private_dir(state_dir)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot create the state dir: {exc.strerror}") from None
        creds = self._credentials or self._load_credentials()
        if creds.server_url.rstrip("/") != settings.server.url:
            log.warning(
                "token file was issued by another server than the configured one",
                token_server=creds.server_url,
                configured=settings.server.url,
            )
        self.ledger = CommandLedger(state_dir / "state.db")
        self.ledger.prune(LEDGER_RETENTION_S)
        self.outbox = Outbox(
            state_dir / "outbox.db",
            max_bytes=int(settings.telemetry.outbox_max_mb * 1024 * 1024),
            chunk_size=min(100, settings.telemetry.send_batch_size),
        )
        await self.outbox.start()
        client = ArgusClient(settings.server.url, timeout_s=settings.server.timeout_s)
        self.jobs = JobManager(JobStore(state_dir / "jobs"), settings.jobs)
        gpu = GpuReader(
            self._gpu_backend
            or await open_backend_async(
                settings.telemetry.gpu if settings.telemetry.enabled else "none",
                timeout_s=max(5.0, settings.telemetry.gpu_timeout_s),
            ),
            timeout_s=settings.telemetry.gpu_timeout_s,
        )

        self.telemetry = Telemetry(
            settings.telemetry, self.outbox, self.jobs, gpu, hostname=settings.agent.hostname
        )
        self.jobs.on_ended = self.telemetry.job_ended
        await self.telemetry.start()
        reporter_token = events_token(settings)
        self.sender = EventSender(
            self.outbox,
            client,
            reporter_token,
            Backoff(settings.agent.backoff_initial_s, settings.agent.backoff_max_s),
            batch_size=settings.telemetry.send_batch_size,
        )
        # Jobs whose shim dies are re-parented to the agent, which then learns their status.
        subreaper = reaper.set_subreaper(True)
        adopted, ended_meanwhile = self.jobs.adopt_existing()
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
            owner_lookup=(
                functools.partial(client.batch_user, reporter_token) if reporter_token else None
            ),
            on_launch_failed=self.telemetry.launch_failed,
        )
        channel = PollChannel(
            client,
            creds,
            dispatcher,
            self.state.channel,
            settings.agent,
            server_poll_interval_s=creds.poll_interval_s or 10.0,
            reload_credentials=self._load_credentials if self._credentials is None else None,
        )
        control = ControlServer(state_dir / SOCKET_NAME, self.snapshot)
        try:
            await control.start()
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
        )
        self.notifier.ready(f"polling {settings.server.url}")
        self.ready.set()
        background = [
            asyncio.create_task(self._housekeeping(shutdown)),
            asyncio.create_task(self.telemetry.run(shutdown)),
            asyncio.create_task(self.sender.run(shutdown)),
        ]
        try:
            await channel.run(shutdown)
        finally:
            log.info(
                "agent stopping; running jobs are left running",
                running_jobs=len(self.jobs.running()),
            )
            self.notifier.stopping()
            shutdown.set()
            await self.jobs.shutdown()
            if subreaper:
                reaper.set_subreaper(False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*background, return_exceptions=True), SHUTDOWN_TIMEOUT_S
                )
            for task in background:
                task.cancel()
            await control.close()
            await self.outbox.close()
            gpu.close()
            await client.aclose()
            self.ledger.close()

    async def _housekeeping(self, shutdown: asyncio.Event) -> None:
        """Ping systemd's watchdog while the event loop runs, update STATUS, and prune old
        jobs and acked commands once an hour."""
        interval = min(watchdog_interval_s() or 30.0, 30.0)
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not shutdown.is_set():
            if self.state is not None:
                self.notifier.status(_one_line_status(self.state, self.jobs))
            if watchdog_interval_s() is not None:
                self.notifier.watchdog()
            if self.jobs is not None:
                self.jobs.reap_orphans()
            if time.monotonic() >= next_prune and self.jobs and self.ledger:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                self.jobs.prune(self.settings.jobs.retention_days * 86400)
                self.ledger.prune(LEDGER_RETENTION_S)
            await sleep_unless(shutdown, interval)

    def snapshot(self) -> dict[str, Any]:
        """The status document served on the control socket."""
        assert self.state is not None and self.jobs is not None and self.ledger is not None
        data = self.state.to_dict()
        data["uptime_s"] = round(time.time() - self.state.started_at, 1)
        data["commands"] = self.ledger.counts()
        if self.outbox is not None and self.sender is not None and self.telemetry is not None:
            stats = self.outbox.stats()
            data["telemetry"] = {
                "outbox_queued": stats.queued,
                "outbox_bytes": stats.bytes,
                "dropped": stats.dropped,
                "sender": asdict(self.sender.state),
                "gpu": self.telemetry.gpu.backend.name,
                "snapshots": self.telemetry.snapshots_sent,
                "last_tick_ms": round(self.telemetry.last_tick_s * 1000, 2)
                if self.telemetry.last_tick_s is not None
                else None,
            }
        data["jobs"] = [
            {
                "batch_id": r.batch_id,
                "pid": r.pid,
                "run_as": r.run_as,
                "state": r.state,
                "outcome": r.describe_exit(),
                "launched_at": r.launched_at,
                "ended_at": r.ended_at,
                "requested_by": r.requested_by,
                "command": r.command_line,
                "log_path": r.log_path,
            }
            for r in self.jobs.records()
        ]
        return data


def _one_line_status(state: AgentState, jobs: JobManager | None) -> str:
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
