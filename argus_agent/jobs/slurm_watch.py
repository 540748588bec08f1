"""The Slurm launcher's look at the queue: states, ends, output and usage of its jobs.

A part of the job table (``slurm.SlurmJobs`` inherits it), in a module of its own. Every
``jobs.slurm_poll_s`` (sooner after a launch or a stop) one ``squeue`` call covers all of
the agent's jobs that have not ended. A job that squeue shows ended, or no longer lists, is
looked up: ``sacct`` where accounting is on, else ``scontrol show job`` while slurmctld
remembers it (``MinJobAge``), else squeue's own state, else the exit status the batch
script wrote into the job's output directory (``slurm_files``), else it is reported ended
with its status unknown. Its output is copied to the end first, then its end goes to
``on_ended``. A squeue that fails concludes nothing: the jobs stay as they were and
``queue_error`` (status) says why.

The running jobs' output files are copied into the agent's own logs at each look (all in
one thread, bounded: a hung shared filesystem costs one thread, and copying pauses until it
returns), and every ``jobs.slurm_usage_interval_s`` one ``sstat`` reads their CPU and memory
for ``on_usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from argus_agent.blocking import call_in_thread
from argus_agent.config import JobSettings
from argus_agent.health import Health
from argus_agent.jobs import slurm_files
from argus_agent.jobs.slurm_cli import QueueRow, SlurmCommands, SlurmUnavailable, parse_exit_code
from argus_agent.jobs.slurm_resources import NULLS
from argus_agent.jobs.slurm_store import ENDED_STATES, SlurmJobRecord, SlurmStore
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: States in which the job's processes run (its output grows, sstat can read it).
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED"})

Usage = dict[str, Any]
OnUsage = Callable[[list[tuple[SlurmJobRecord, Usage]]], Awaitable[None]]


@dataclass
class SlurmJob:
    """One job of the table: its record, whether it ended, the timer of a stop's grace."""

    record: SlurmJobRecord
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    killer: asyncio.Task[None] | None = None


class QueueWatch:
    """The job table's watching of the queue (mixed into ``SlurmJobs``)."""

    store: SlurmStore
    settings: JobSettings
    commands: SlurmCommands
    health: Health
    on_usage: OnUsage | None
    latest: dict[str, Usage]
    queue_error: str | None
    last_tick_s: float | None
    _jobs: dict[str, SlurmJob]
    _wake: asyncio.Event
    _copying: set[threading.Thread]
    _cpu_seen: dict[int, tuple[float, float]]
    _next_usage: float
    #: Hands a job's end to ``on_ended`` (``SlurmJobs._report``).
    _report: Callable[[SlurmJobRecord], None]

    async def _watch(self) -> None:
        """Look at the queue every ``jobs.slurm_poll_s`` (sooner after a launch or stop)."""
        while True:
            interval = self.settings.slurm_poll_s
            self.health.report("slurm queue", interval + 3 * self.settings.slurm_command_timeout_s)
            try:
                await self.tick()
            except Exception:
                log.exception("looking at the Slurm queue failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def tick(self) -> None:
        """One look at the queue: states, ends, output, and (when due) usage."""
        started = time.perf_counter()
        watched = [j for j in self._jobs.values() if not j.ended.is_set() and j.record.slurm_job_id]
        if not watched:
            self.latest = {}
            self.last_tick_s = time.perf_counter() - started
            return
        ids = [j.record.slurm_job_id for j in watched if j.record.slurm_job_id]
        try:
            rows = await self.commands.squeue(ids)
        except SlurmUnavailable as exc:
            if self.queue_error != str(exc):
                log.warning("cannot read the Slurm queue; jobs stay as they were", error=str(exc))
            self.queue_error = str(exc)
            return
        self.queue_error = None
        for job in watched:
            assert job.record.slurm_job_id is not None
            row = rows.get(job.record.slurm_job_id)
            if row is not None and row.state not in ENDED_STATES:
                self._update(job, row)
            else:
                await self._ended_in_slurm(job, row)
        await self._copy_output([j for j in watched if not j.ended.is_set()])
        running = [j for j in watched if j.record.slurm_state == "RUNNING"]
        if running and time.monotonic() >= self._next_usage:  # the first as soon as one runs
            self._next_usage = time.monotonic() + self.settings.slurm_usage_interval_s
            await self._read_usage(running)
        self.last_tick_s = time.perf_counter() - started

    def _update(self, job: SlurmJob, row: QueueRow) -> None:
        record = job.record
        changes: dict[str, Any] = {}
        if row.state != record.slurm_state:
            changes["slurm_state"] = row.state
            log.info("Slurm job state", batch_id=record.batch_id, job=row.job_id, state=row.state)
        if row.state in RUNNING_STATES and record.started_at is None:
            changes["started_at"] = time.time()
        # squeue says "None" for a job the scheduler has not looked at yet.
        reason = row.reason if row.state == "PENDING" and row.reason not in NULLS else None
        for key, value in (
            ("slurm_reason", reason),
            ("slurm_nodes", row.nodes or None),
            ("slurm_partition", row.partition or None),
        ):
            if getattr(record, key) != value:
                changes[key] = value
        if changes:
            job.record = record.with_changes(**changes)
            self.store.save(job.record)

    async def _ended_in_slurm(self, job: SlurmJob, row: QueueRow | None) -> None:
        """Learn how the job ended (sacct, scontrol, squeue's state, the exit file) and
        report it. A look-up that fails leaves it for the next tick."""
        record = job.record
        job_id = record.slurm_job_id
        assert job_id is not None
        state, exit_text, source, nodes = None, None, None, row.nodes if row else None
        note = None
        end_time = None
        try:
            if await self.commands.accounting():
                found = await self.commands.sacct(job_id)
                if found is not None and found[0] in ENDED_STATES:
                    state, exit_text, source = found[0], found[1], "sacct"
            if state is None:
                info = await self.commands.show_job(job_id)
                if info is not None and info.get("JobState") not in ENDED_STATES:
                    return  # squeue was ahead of (or behind) scontrol: next tick
                if info is not None:
                    state, exit_text = info.get("JobState"), info.get("ExitCode")
                    nodes, source = info.get("NodeList") or nodes, "scontrol"
                    end_time = _slurm_time(info.get("EndTime"))
        except SlurmUnavailable as exc:
            log.warning("cannot learn how a Slurm job ended yet", job=job_id, error=str(exc))
            return
        if state is None and row is not None:
            state, source = row.state, "squeue"
        if state is None:
            code = await self._blocking(
                lambda: slurm_files.read_exit_code(record.slurm_output_dir or "", record.uid)
            )
            if code is not None:
                state, exit_text, source = (
                    ("COMPLETED" if code == 0 else "FAILED"),
                    f"{code}:0",
                    "exit file",
                )
                note = "Slurm no longer knows the job; its batch script recorded this status"
            else:
                source = "unknown"
                note = (
                    "Slurm no longer knows the job (it ended while nobody watched and there is "
                    "no accounting) and it left no exit status"
                )
        code, sig = parse_exit_code(exit_text)
        exit_code = code if state == "COMPLETED" or code not in (None, 0) else None
        if state == "COMPLETED" and exit_code is None:
            exit_code = 0
        await self._copy_output([job], final=True)
        job.record = job.record.with_changes(
            slurm_state=state,
            slurm_exit=exit_text,
            slurm_nodes=nodes or job.record.slurm_nodes,
            slurm_reason=None,
            slurm_end_source=source,
            exit_code=exit_code,
            exit_signal=sig if sig and 0 < sig < 65 else None,
            exit_note=note,
            # Slurm's EndTime is whole seconds; the start the agent saw is its own clock's:
            # a job that ended within the second it started must not end before it began.
            ended_at=max(end_time or time.time(), job.record.started_at or 0.0),
        )
        self.store.save(job.record)
        job.ended.set()
        if job.killer is not None:
            job.killer.cancel()
        self.latest.pop(record.batch_id, None)
        self._cpu_seen.pop(job_id, None)
        log.info("Slurm job ended", batch_id=record.batch_id, outcome=job.record.describe_exit())
        self._report(job.record)

    async def _blocking(self, fn: Callable[[], Any]) -> Any:
        """A read of the shared filesystem, bounded (a hung mount costs one thread)."""
        try:
            return await call_in_thread(fn, self.settings.slurm_command_timeout_s, self._copying)
        except TimeoutError:
            log.warning(
                "the shared filesystem did not answer",
                timeout_s=self.settings.slurm_command_timeout_s,
            )
            return None

    async def _copy_output(self, jobs: list[SlurmJob], *, final: bool = False) -> None:
        """Copy what the jobs' output files gained into the agent's logs (all in one
        thread); note which cannot be read."""
        self._copying = {t for t in self._copying if t.is_alive()}
        if self._copying and not final:
            return  # an earlier copy still hangs on the filesystem
        work = [
            (j, j.record)
            for j in jobs
            if j.record.slurm_output_dir and (final or j.record.slurm_state in RUNNING_STATES)
        ]
        if not work:
            return
        cap = self.settings.log_max_bytes

        def copy_all() -> list[slurm_files.Copied]:
            results = []
            for _job, record in work:
                source = os.path.join(record.slurm_output_dir or "", slurm_files.OUTPUT_NAME)
                while True:  # a final copy takes all of it
                    got = slurm_files.copy_output(source, record.log_path, record.uid, cap)
                    if not final or got.copied == 0 or got.capped or got.unreadable:
                        break
                results.append(got)
            return results

        results = await self._blocking(copy_all)
        for (job, _record), got in zip(work, results or [], strict=False):
            if got.unreadable != job.record.log_unreadable:
                if got.unreadable:
                    log.warning(
                        "cannot read the job's output",
                        batch_id=job.record.batch_id,
                        why=got.unreadable,
                    )
                job.record = job.record.with_changes(log_unreadable=got.unreadable)
                self.store.save(job.record)

    async def _read_usage(self, jobs: list[SlurmJob]) -> None:
        """One sstat for the running jobs: CPU share since the last reading, memory."""
        if not jobs or self.commands.bins.get("sstat") is None:
            return
        try:
            usage = await self.commands.sstat([j.record.slurm_job_id or 0 for j in jobs])
        except SlurmUnavailable as exc:
            log.warning("sstat failed; no resource snapshot this time", error=str(exc))
            return
        now = time.monotonic()
        readings: list[tuple[SlurmJobRecord, Usage]] = []
        for job in jobs:
            job_id = job.record.slurm_job_id or 0
            got = usage.get(job_id)
            if got is None:
                continue
            seen = self._cpu_seen.get(job_id)
            self._cpu_seen[job_id] = (got.cpu_s, now)
            cpu_pct = (
                round(max(0.0, got.cpu_s - seen[0]) / (now - seen[1]) * 100, 1)
                if seen and now > seen[1]
                else None
            )
            reading: Usage = {
                "sampled_at": time.time(),
                "cpu_pct": cpu_pct,
                "rss_bytes": got.mem_bytes,
                "max_rss_bytes": got.max_rss_bytes,
                "tasks": got.tasks,
                "gpu_mem_mb": None,
            }
            self.latest[job.record.batch_id] = reading
            readings.append((job.record, reading))
        if readings and self.on_usage is not None:
            await self.on_usage(readings)


def _slurm_time(text: str | None) -> float | None:
    """scontrol's local ``2026-01-31T12:00:00`` as epoch seconds (None for Unknown)."""
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None
