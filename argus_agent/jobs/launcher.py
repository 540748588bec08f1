"""What the rest of the agent needs of a job table, and picking one (``jobs.launcher``).

Two job tables satisfy :class:`Launcher`: the local one
(:class:`~argus_agent.jobs.supervisor.JobManager`: each job under its own shim on this host,
records in ``<state>/jobs``) and the Slurm one (:class:`~argus_agent.jobs.slurm.SlurmJobs`:
jobs submitted with sbatch, records in ``<state>/slurm``). The dispatcher launches and stops
through it, telemetry reads its records and is told each job's end, the daemon re-adopts,
prunes and shuts it down, status lists its jobs. The two keep their records apart, so a
job of one is never touched by the other (a Slurm job id is no process id).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from argus_agent.config import JobSettings
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord


class Launcher(Protocol):
    """A job table (see the module doc). Used from one event loop."""

    #: The jobs settings, replaced by a config reload (read at each launch and stop).
    settings: JobSettings
    #: Called once per job end; the end counts as reported once it returned.
    on_ended: Callable[[JobRecord], Awaitable[None]] | None
    #: Its record store (``quarantined``: damaged records, for status).
    store: Any
    #: Whether jobs get cgroups (``status()``), for status.
    cgroups: Any

    def get(self, batch_id: str) -> JobRecord | None: ...

    def records(self) -> list[JobRecord]: ...

    def running(self) -> list[JobRecord]: ...

    async def wait_ended(self, batch_id: str, timeout: float | None = None) -> JobRecord: ...

    def adopt_existing(self) -> tuple[list[JobRecord], list[JobRecord]]: ...

    async def launch(self, spec: LaunchSpec) -> JobRecord: ...

    async def stop(
        self, batch_id: str, requested_by: str | None, *, grace_s: float | None = None
    ) -> JobRecord: ...

    def prune(self, retention_s: float) -> int: ...

    def reap_orphans(self) -> None: ...

    async def reports_done(self) -> None: ...

    async def shutdown(self) -> None: ...


def make_launcher(settings: JobSettings, state_dir: Path) -> Launcher:
    """The job table ``jobs.launcher`` asks for, its store under ``state_dir``."""
    if settings.launcher == "slurm":
        from argus_agent.jobs.slurm import SlurmJobs
        from argus_agent.jobs.slurm_store import SLURM_DIR, SlurmStore

        return SlurmJobs(SlurmStore(state_dir / SLURM_DIR), settings)
    from argus_agent.jobs.store import JobStore
    from argus_agent.jobs.supervisor import JobManager

    return JobManager(JobStore(state_dir / "jobs"), settings)
