"""The queries both job tables answer alike (the local ``JobManager`` and ``SlurmJobs``):
a job's record by batch id, all records, the running ones, and waiting for a job's end.

A mixin over the table's ``_jobs`` (batch id → an entry with ``record`` and ``ended``); no
tasks or threads of its own.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Protocol, TypeVar

from argus_agent.jobs.store import JobRecord

R = TypeVar("R", bound=JobRecord)


class _Entry(Protocol[R]):  # type: ignore[misc]
    record: R
    ended: asyncio.Event


class JobTable(Generic[R]):
    """Read-only queries over ``self._jobs``."""

    _jobs: dict[str, _Entry[R]]

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
