"""The job table: launch jobs, watch them end, stop them, re-adopt them after a restart.

Owns the running jobs of this agent (keyed by the Argus batch id) and their records in the
state dir. Each job starts in a new session and process group, with stdout and stderr going
to its log file (never to a pipe the agent holds, so the job never blocks on the agent).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

from argus_agent.errors import JobError, LaunchError
from argus_agent.jobs import proctree
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord, JobStore
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: How often a job adopted from an earlier agent run (not our child) is checked for liveness.
ADOPTED_POLL_S = 1.0


@dataclass
class _Job:
    record: JobRecord
    watcher: asyncio.Task[None] | None = None
    stopper: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class JobManager:
    """The jobs this agent started. Use from one event loop."""

    def __init__(self, store: JobStore, *, stop_grace_s: float) -> None:
        self.store = store
        self.stop_grace_s = stop_grace_s
        self._jobs: dict[str, _Job] = {}

    # -- queries -------------------------------------------------------------------------

    def get(self, batch_id: str) -> JobRecord | None:
        """The record of the job for ``batch_id``, or None."""
        job = self._jobs.get(batch_id)
        return job.record if job else None

    def records(self) -> list[JobRecord]:
        """All known jobs, newest first."""
        return sorted((j.record for j in self._jobs.values()), key=lambda r: -r.launched_at)

    def running(self) -> list[JobRecord]:
        """Jobs that have not ended."""
        return [r for r in self.records() if r.running]

    async def wait_ended(self, batch_id: str, timeout: float | None = None) -> JobRecord:
        """Wait until the job has ended; raises TimeoutError or KeyError."""
        job = self._jobs[batch_id]
        await asyncio.wait_for(job.ended.wait(), timeout)
        return job.record

    # -- lifecycle -----------------------------------------------------------------------

    def adopt_existing(self) -> list[JobRecord]:
        """Load the job records of earlier agent runs. Jobs still alive (same pid *and*
        process start time) are watched again; the others are marked ended. Call once at
        start-up; returns the records re-adopted as running."""
        adopted = []
        for record in self.store.load_all():
            job = _Job(record)
            self._jobs[record.batch_id] = job
            if not record.running:
                job.ended.set()
                continue
            if proctree.is_same_process(record.pid, record.process_start_time):
                job.watcher = asyncio.create_task(self._watch_adopted(job))
                adopted.append(record)
                log.info("job re-adopted", batch_id=record.batch_id, pid=record.pid)
            else:
                self._finish(
                    job, exit_note="ended while the agent was not running; exit status unknown"
                )
        return adopted

    async def launch(self, spec: LaunchSpec) -> JobRecord:
        """Start the job described by ``spec`` and begin watching it.

        Returns once the exec succeeded. Raises LaunchError (nothing left running, no record
        kept) or JobError when a job for the batch already exists.
        """
        if spec.batch_id in self._jobs:
            raise JobError(f"a job for batch {spec.batch_id} already exists on this host")
        log_path = self.store.prepare(spec.batch_id)
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            self.store.discard(spec.batch_id)
            raise LaunchError(f"cannot open the job log {log_path}: {exc.strerror}") from None
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                cwd=spec.cwd,
                env=dict(spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        except OSError as exc:
            self.store.discard(spec.batch_id)
            what = exc.filename or spec.argv[0]
            raise LaunchError(f"cannot start {what}: {exc.strerror or exc}") from None
        finally:
            os.close(log_fd)
        start_time = proctree.process_start_time(process.pid) or time.time()
        record = JobRecord(
            batch_id=spec.batch_id,
            cmd_id=spec.cmd_id,
            source_batch_id=spec.source_batch_id,
            requested_by=spec.requested_by,
            command_line=spec.command_line,
            argv=list(spec.argv),
            cwd=str(spec.cwd),
            log_path=str(log_path),
            pid=process.pid,
            pgid=process.pid,
            process_start_time=start_time,
            launched_at=time.time(),
        )
        self.store.save(record)
        job = _Job(record)
        self._jobs[spec.batch_id] = job
        job.watcher = asyncio.create_task(self._watch_child(job, process))
        log.info("job started", batch_id=spec.batch_id, pid=process.pid, cwd=str(spec.cwd))
        return record

    async def stop(self, batch_id: str, requested_by: str | None) -> JobRecord:
        """Begin stopping the job of ``batch_id``: SIGTERM to its whole tree now, SIGKILL to
        whatever is left after the grace period (in the background). Returns at once after
        the SIGTERM; idempotent while a stop is under way.

        Raises JobError when this host has no running job for the batch.
        """
        job = self._jobs.get(batch_id)
        if job is None:
            raise JobError(f"no job for batch {batch_id} on this host")
        if not job.record.running:
            raise JobError(
                f"the job for batch {batch_id} already ended ({job.record.describe_exit()})"
            )
        if job.stopper is None or job.stopper.done():
            job.record = job.record.ended(
                stop_requested_by=requested_by, stop_requested_at=time.time()
            )
            self.store.save(job.record)
            job.stopper = asyncio.create_task(self._terminate(job))
            await asyncio.sleep(0)  # let the SIGTERM go out before we return
        return job.record

    async def _terminate(self, job: _Job) -> None:
        record = job.record
        signalled, killed = await proctree.terminate_tree(
            record.pid, record.process_start_time, record.pgid, self.stop_grace_s
        )
        log.info("job stopped", batch_id=record.batch_id, signalled=signalled, sigkilled=killed)

    async def shutdown(self) -> None:
        """Stop watching; running jobs are left running (a new agent re-adopts them)."""
        tasks = [t for j in self._jobs.values() for t in (j.watcher, j.stopper) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- watching ------------------------------------------------------------------------

    async def _watch_child(self, job: _Job, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if code < 0:
            self._finish(job, exit_signal=-code)
        else:
            self._finish(job, exit_code=code)

    async def _watch_adopted(self, job: _Job) -> None:
        record = job.record
        while proctree.is_same_process(record.pid, record.process_start_time):
            await asyncio.sleep(ADOPTED_POLL_S)
        self._finish(
            job, exit_note="ended; exit status unknown (job was re-adopted after an agent restart)"
        )

    def _finish(
        self,
        job: _Job,
        *,
        exit_code: int | None = None,
        exit_signal: int | None = None,
        exit_note: str | None = None,
    ) -> None:
        job.record = job.record.ended(
            ended_at=time.time(), exit_code=exit_code, exit_signal=exit_signal, exit_note=exit_note
        )
        try:
            self.store.save(job.record)
        except OSError as exc:
            log.error("cannot record job exit", batch_id=job.record.batch_id, error=str(exc))
        job.ended.set()
        log.info(
            "job ended",
            batch_id=job.record.batch_id,
            outcome=job.record.describe_exit(),
            signal_name=signal.Signals(exit_signal).name if exit_signal else None,
        )
