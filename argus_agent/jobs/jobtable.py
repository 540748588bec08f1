"""What both job tables do alike (the local ``JobManager`` and ``SlurmJobs``): the queries
(a job's record by batch id, all records, the running ones, waiting for a job's end) and
handing each end to ``on_ended`` in the background, remembering it was reported.

A mixin over the table's ``_jobs`` (batch id → an entry with ``record`` and ``ended``),
``on_ended`` and ``_reports`` (the report tasks in flight, one per ended job).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from argus_agent.jobs.store import JobRecord
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

R = TypeVar("R", bound=JobRecord)


class _Entry(Protocol[R]):  # type: ignore[misc]
    record: R
    ended: asyncio.Event


class JobTable(Generic[R]):
    """Queries over ``self._jobs``, and the reporting of ends."""

    _jobs: dict[str, _Entry[R]]
    _reports: set[asyncio.Task[None]]
    on_ended: Callable[[R], Awaitable[None]] | None

    def get(self, batch_id: str) -> R | None:
        """The record of the job for ``batch_id``, or None."""
        job = self._jobs.get(batch_id)
        return job.record if job else None

    def records(self) -> list[JobRecord]:
        """All known jobs, newest first."""
        return sorted((j.record for j in self._jobs.values()), key=lambda r: -r.launched_at)

    def running(self) -> list[JobRecord]:
        """Jobs that have not ended (for Slurm, pending in the queue included)."""
        return [r for r in self.records() if r.running]

    async def wait_ended(self, batch_id: str, timeout: float | None = None) -> JobRecord:
        """Wait until the job has ended; raises TimeoutError or KeyError."""
        job = self._jobs[batch_id]
        await asyncio.wait_for(job.ended.wait(), timeout)
        return job.record

    def _report(self, record: R) -> None:
        """Hand a job's end to ``on_ended`` in the background; once it returned, the table
        marks the end reported (``_reported``); a failure is retried at the next start."""

        async def report() -> None:
            try:
                if self.on_ended is not None:
                    await self.on_ended(record)
            except Exception:
                log.exception(
                    "reporting a job's end failed; it is retried at the next start",
                    batch_id=record.batch_id,
                )
                return
            self._reported(record)

        task = asyncio.create_task(report())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    def _reported(self, record: R) -> None:
        """Remember that the end of ``record`` was reported (each table its own way)."""
        raise NotImplementedError

    async def reports_done(self) -> None:
        """Wait until every job end handed to ``on_ended`` so far was reported."""
        while self._reports:
            await asyncio.gather(*list(self._reports), return_exceptions=True)
