"""Telemetry of the supervised jobs: snapshots each tick, log lines as they come, lifecycle
events when a job ends, and notices of dropped events. Everything goes to the outbox.

Owns one task per concern. The job table tells it which jobs exist; it never changes jobs.
When a job ends it first reads the job's log to the end, then queues ``batch_done`` or
``batch_failed``, so the lifecycle event comes after the job's last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable

from argus_agent.config import TelemetrySettings
from argus_agent.events import EventKind, EventSource, OutEvent, make_event
from argus_agent.health import DEFAULT_STALL_S, Health
from argus_agent.jobs.store import JobRecord
from argus_agent.jobs.supervisor import JobManager
from argus_agent.logsetup import get_logger
from argus_agent.outbox import LogOffset, Outbox
from argus_agent.protocol import Command, MalformedCommand
from argus_agent.telemetry.gpu import GpuDevice, GpuReader
from argus_agent.telemetry.logs import LogTailer
from argus_agent.telemetry.sampler import HostReading, JobRef, Sampler, TreeReading, disk_usage_mb

log = get_logger(__name__)

DROP_CHECK_S = 30.0
#: Ticks at which the sampler costs more than this share of a core are logged (once).
KIND_NAMES = {"snapshot": "resource snapshot(s)", "log": "log line(s)"}


def lifecycle_event(record: JobRecord, source: EventSource) -> OutEvent:
    """``batch_done`` for a job that exited 0 on its own, else ``batch_failed`` saying why."""
    elapsed = None
    if record.ended_at and (record.started_at or record.launched_at):
        # Never negative: start and end may come from different clocks (Slurm's whole
        # seconds, the agent's own).
        elapsed = max(0.0, round(record.ended_at - (record.started_at or record.launched_at), 3))
    common = {
        "exit_code": record.exit_code,
        "exit_signal": record.exit_signal,
        "elapsed_s": elapsed,
        "total_elapsed_s": elapsed,
        "agent": "argus-agent",
    }
    if record.exit_code == 0 and not record.stop_requested_at:
        event_type, data = "batch_done", {"n_done": 1, "n_failed": 0, **common}
    else:
        event_type = "batch_failed"
        data = {"error": record.describe_exit(), "n_done": 0, "n_failed": 1, **common}
    return make_event(
        event_type,
        EventKind.LIFECYCLE,
        record.batch_id,
        source,
        data,
        timestamp=record.ended_at,
        event_id=lifecycle_event_id(record.batch_id, record.cmd_id),
    )


def lifecycle_event_id(batch_id: str, cmd_id: str) -> str:
    """The one event id of a job's end: reported again after a crash, Argus de-duplicates it."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"argus-agent:{batch_id}:{cmd_id}").hex


def snapshot_data(
    host: HostReading,
    tree: TreeReading,
    gpus: list[GpuDevice] | None,
    disk: tuple[float, float] | None,
) -> dict:
    """The ``resource_snapshot`` data of one job: Argus' field names plus extras."""
    data: dict = {
        "cpu_util_pct": host.cpu_pct,
        "ram_mb": host.ram_used_mb,
        "ram_total_mb": host.ram_total_mb,
        "disk_free_mb": disk[0] if disk else None,
        "disk_total_mb": disk[1] if disk else None,
        "proc_cpu_pct": tree.cpu_pct,
        "proc_ram_mb": round(tree.rss_bytes / (1024 * 1024), 1),
        # The job's memory peak, kept by its cgroup (None for a job tracked through /proc).
        "proc_ram_peak_mb": (
            round(tree.mem_peak_bytes / (1024 * 1024), 1)
            if tree.mem_peak_bytes is not None
            else None
        ),
        "num_procs": tree.num_procs,
        "num_threads": tree.num_threads,
        "io_read_bytes_per_s": tree.io_read_bps,
        "io_write_bytes_per_s": tree.io_write_bps,
        "proc_gpu_mem_mb": None,
        "gpu_util_pct": None,
        "gpu_mem_mb": None,
        "gpu_mem_total_mb": None,
        "gpu_temp_c": None,
        "gpus": [],
    }
    if not gpus:
        return data
    used = [(g, sum(m for p, m in g.processes.items() if p in tree.pids)) for g in gpus]
    mine = [(g, m) for g, m in used if any(p in tree.pids for p in g.processes)]
    scope = mine or used  # the job's GPUs; the host's when the job uses none
    data["gpu_scope"] = "job" if mine else "host"
    data["proc_gpu_mem_mb"] = round(sum(m for _, m in mine), 1) if mine else 0.0
    utils = [g.util_pct for g, _ in scope if g.util_pct is not None]
    data["gpu_util_pct"] = round(sum(utils) / len(utils), 1) if utils else None
    mems = [g.mem_used_mb for g, _ in scope if g.mem_used_mb is not None]
    data["gpu_mem_mb"] = round(sum(mems), 1) if mems else None
    totals = [g.mem_total_mb for g, _ in scope if g.mem_total_mb is not None]
    data["gpu_mem_total_mb"] = round(sum(totals), 1) if totals else None
    temps = [g.temp_c for g, _ in scope if g.temp_c is not None]
    data["gpu_temp_c"] = max(temps) if temps else None
    data["gpus"] = [
        {
            "index": g.index,
            "uuid": g.uuid,
            "name": g.name,
            "util_pct": g.util_pct,
            "mem_used_mb": g.mem_used_mb,
            "mem_total_mb": g.mem_total_mb,
            "temp_c": g.temp_c,
            "proc_mem_mb": round(m, 1),
        }
        for g, m in mine
    ]
    return data


class Telemetry:
    """Produces every event of the supervised jobs into the outbox."""

    def __init__(
        self,
        settings: TelemetrySettings,
        outbox: Outbox,
        jobs: JobManager,
        gpu: GpuReader,
        *,
        hostname: str,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.jobs = jobs
        self.gpu = gpu
        self.hostname = hostname
        self.sampler = Sampler()
        self._tailers: dict[str, LogTailer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._offsets: dict[str, LogOffset] = {}
        self.snapshots_sent = 0
        #: Where the loops report progress (the daemon shares its own).
        self.health = Health(DEFAULT_STALL_S)
        self.last_tick_s: float | None = None
        #: Set by ``apply_settings`` to cut the sampler's wait short (a new interval).
        self._reloaded = asyncio.Event()
        #: Each running job's latest reading, for status: batch id → ``{"sampled_at",
        #: "cpu_pct", "rss_bytes", "gpu_mem_mb"}`` (replaced whole each tick).
        self.latest: dict[str, dict[str, float | None]] = {}

    def source(self, record: JobRecord) -> EventSource:
        """The ``source`` block of a job's events."""
        return EventSource(
            project=self.settings.project,
            host=self.hostname,
            user=record.run_as,
            command=record.command_line,
        )

    async def start(self) -> None:
        """Load the committed log offsets; call before any job end is reported, so that a
        log is never read again from its start."""
        self._offsets = await self.outbox.log_offsets()

    async def run(self, shutdown: asyncio.Event) -> None:
        """Produce until ``shutdown`` is set (after ``start``)."""
        # Both loops run whatever telemetry.enabled and .logs say and idle while switched
        # off: a config reload (``apply_settings``) may switch them either way.
        tasks = [
            asyncio.create_task(self._drop_notices(shutdown)),
            asyncio.create_task(self._sample_loop(shutdown)),
            asyncio.create_task(self._log_loop(shutdown)),
        ]
        stopper = asyncio.create_task(shutdown.wait())
        try:
            done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()  # a loop that raised takes the daemon down (see daemon.py)
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- job end -------------------------------------------------------------------------

    async def job_ended(self, record: JobRecord) -> None:
        """Read the job's log to the end, then queue its lifecycle event (if configured).
        Returns once both are durable in the outbox."""
        if self.settings.enabled and self.settings.logs:
            await self._tail(record, final=True)
        if self.settings.enabled and self.settings.lifecycle_events:
            await self.outbox.put([lifecycle_event(record, self.source(record))])
        self._tailers.pop(record.batch_id, None)
        self._locks.pop(record.batch_id, None)

    async def launch_failed(self, command: Command | MalformedCommand, error: str) -> None:
        """End a rerun's new batch with ``batch_failed`` whose error is ``error``: the agent
        refused the rerun (policy, bad cwd, expired, malformed…) or its exec failed. Argus
        v0.3.0 would otherwise leave the batch ``requested`` for ever. Queued in the outbox
        (if lifecycle events are on), sent when a reporter token is available; its event id
        is the job's lifecycle event id, so a report repeated (after a restart) or one that
        meets the job's own end is de-duplicated by the server. A command without a batch id
        reports nothing."""
        if not (self.settings.enabled and self.settings.lifecycle_events):
            return
        if command.batch_id is None:
            return
        cmd_id = command.id if isinstance(command, Command) else command.cmd_id
        event_id = lifecycle_event_id(command.batch_id, cmd_id or "")
        source = EventSource(project=self.settings.project, host=self.hostname)
        data = {
            "error": error[:2000],
            "n_done": 0,
            "n_failed": 1,
            "agent": "argus-agent",
        }
        await self.outbox.put(
            [
                make_event(
                    "batch_failed",
                    EventKind.LIFECYCLE,
                    command.batch_id,
                    source,
                    data,
                    event_id=event_id,
                )
            ]
        )

    # -- snapshots -----------------------------------------------------------------------

    async def _sample_loop(self, shutdown: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not shutdown.is_set():
            self.health.report("sampler")
            try:
                if self.settings.enabled:
                    await self.sample_once()
            except Exception:
                log.exception("resource sampling failed; trying again next tick")
            next_at += self.settings.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspend, overload): skip, don't burst
                next_at = time.monotonic() + self.settings.interval_s
                delay = self.settings.interval_s
            self.health.report("sampler", delay)
            if await self._pause(shutdown, delay):
                next_at = time.monotonic()  # a reload: sample now, then on the new interval

    async def _pause(self, shutdown: asyncio.Event, delay: float) -> bool:
        """Wait ``delay`` seconds, less when shutdown is set or a reload changed the
        settings; True in the last case."""
        waits = [asyncio.ensure_future(e.wait()) for e in (shutdown, self._reloaded)]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        reloaded = self._reloaded.is_set()
        self._reloaded.clear()
        return reloaded and not shutdown.is_set()

    def apply_settings(self, settings: TelemetrySettings) -> None:
        """Use ``settings`` (a config reload): the switches, intervals and the log rate limit
        take effect at once; the GPU backend and the outbox keep what they opened with."""
        self.settings = settings
        for tailer in self._tailers.values():
            tailer.set_rate(settings.log_max_lines_per_s)
        self._reloaded.set()

    async def sample_once(self) -> int:
        """Take one snapshot of every running job and queue it; returns how many."""
        running = [r for r in self.jobs.running() if r.shim_pid]
        if not running:
            self.latest = {}
            return 0
        refs = [JobRef(r.batch_id, r.shim_pid or 0, r.cwd, r.cgroup) for r in running]
        started = time.perf_counter()
        host, trees, disks = await asyncio.to_thread(self._read_procs, refs)
        gpus = await self.gpu.read()
        self.last_tick_s = time.perf_counter() - started
        events = []
        latest: dict[str, dict[str, float | None]] = {}
        now = time.time()
        for record in running:
            tree = trees.get(record.batch_id)
            if tree is None:
                continue
            data = snapshot_data(host, tree, gpus, disks.get(record.cwd))
            latest[record.batch_id] = {
                "sampled_at": now,
                "cpu_pct": tree.cpu_pct,
                "rss_bytes": tree.rss_bytes,
                "gpu_mem_mb": data["proc_gpu_mem_mb"],
            }
            events.append(
                make_event(
                    "resource_snapshot",
                    EventKind.SNAPSHOT,
                    record.batch_id,
                    self.source(record),
                    data,
                )
            )
        self.latest = latest
        await self.outbox.put(events)
        self.snapshots_sent += len(events)
        return len(events)

    def _read_procs(
        self, refs: list[JobRef]
    ) -> tuple[HostReading, dict[str, TreeReading], dict[str, tuple[float, float] | None]]:
        host, trees = self.sampler.read(refs)
        disks = {cwd: disk_usage_mb(cwd) for cwd in {r.cwd for r in refs}}
        return host, trees, disks

    # -- logs ----------------------------------------------------------------------------

    async def _log_loop(self, shutdown: asyncio.Event) -> None:
        while not shutdown.is_set():
            self.health.report("log tailer")
            on = self.settings.enabled and self.settings.logs  # may change on a reload
            for record in self._tail_candidates(self.jobs.records()) if on else ():
                try:
                    await self._tail(record, final=False)
                except Exception:
                    log.exception("reading a job's log failed", batch_id=record.batch_id)
            self.health.report("log tailer", self.settings.log_poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shutdown.wait(), self.settings.log_poll_s)

    @staticmethod
    def _tail_candidates(records: Iterable[JobRecord]) -> list[JobRecord]:
        return [r for r in records if r.running]

    async def _tail(self, record: JobRecord, *, final: bool) -> None:
        """Queue the job's new log lines; with ``final``, until the end of its log."""
        lock = self._locks.setdefault(record.batch_id, asyncio.Lock())
        async with lock:
            current = self.jobs.get(record.batch_id)
            if not final and (current is None or not current.running):
                return  # ended meanwhile: job_ended reads the rest
            at = record.ended_at if final else None
            tailer = self._tailers.get(record.batch_id)
            if tailer is None:
                tailer = LogTailer(
                    record.batch_id,
                    record.log_path,
                    self.source(record),
                    max_lines_per_s=self.settings.log_max_lines_per_s,
                    start=self._offsets.get(record.batch_id),
                    chunk_size=self.outbox.chunk_size,
                )
                self._tailers[record.batch_id] = tailer
            # Read the next chunk while the previous one is being committed.
            reading = asyncio.ensure_future(asyncio.to_thread(tailer.read, final=final, at=at))
            while True:
                got = await reading
                if got is None:
                    return
                chunks, offset = got
                reading = asyncio.ensure_future(asyncio.to_thread(tailer.read, final=final, at=at))
                try:
                    await self.outbox.put((), [offset], chunks=chunks)
                except BaseException:
                    # The tailer ran ahead of what is committed: start over from the last
                    # committed offset (after the read in flight is done with the tailer).
                    await asyncio.gather(reading, return_exceptions=True)
                    self._tailers.pop(record.batch_id, None)
                    raise
                self._offsets[record.batch_id] = offset

    # -- drops ---------------------------------------------------------------------------

    async def _drop_notices(self, shutdown: asyncio.Event) -> None:
        while not shutdown.is_set():
            try:
                await self.report_drops()
                await self.forget_gone()
            except Exception:
                log.exception("reporting dropped events failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shutdown.wait(), DROP_CHECK_S)

    async def forget_gone(self) -> None:
        """Drop the log offsets of jobs the job table no longer knows (pruned)."""
        known = {r.batch_id for r in self.jobs.records()}
        for batch_id in [b for b in self._offsets if b not in known]:
            await self.outbox.forget_log_offset(batch_id)
            del self._offsets[batch_id]
            self._locks.pop(batch_id, None)

    async def report_drops(self) -> int:
        """Tell each batch how many of its events a full outbox dropped (once per drop)."""
        drops = await self.outbox.unreported_drops()
        for batch_id, counts in drops.items():
            what = ", ".join(f"{n} {KIND_NAMES.get(k, k)}" for k, n in sorted(counts.items()))
            text = (
                f"[argus-agent] {what} of this batch were dropped: the agent's outbox was "
                "full (the server was unreachable for long); lifecycle events are kept"
            )
            source = EventSource(project=self.settings.project, host=self.hostname)
            notice = make_event(
                "log_line",
                EventKind.NOTICE,
                batch_id,
                source,
                {"line": text, "message": text, "level": "warning", "stream": "agent"},
            )
            await self.outbox.mark_drops_reported(batch_id, counts, notice)
            log.warning("told a batch about dropped events", batch_id=batch_id, counts=counts)
        return len(drops)
