"""The agent carrying on a job whose shim is gone: its output, its stop, its end.

A part of the job table (``supervisor.JobManager`` inherits it), in a module of its own:
when a job's shim was killed while the job runs, the agent takes the job over. An output
keeper carries the output into the log (``takeover.OutputKeeper``); a stop (one under way
when the shim died, one asked for later, and the stop of what the job left behind when it
ended) is the agent's own: through /proc (``proctree``: the job's main process, group,
tree and environment) and, when the job has a cgroup, through it too (``cgroups.terminate``:
nothing that ran in it survives, and what moved itself out of it is still found through
/proc); and the end is recorded in ``exit.json`` as the shim would have, with the exit
status when the job was re-parented to the agent (a child subreaper), the OOM kills and
memory peak of its cgroup. A job is recorded as ended only once its main process (pid and
start time) is gone, or a stop gave up on it as a process that would not die.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from argus_agent.config import JobSettings
from argus_agent.jobs import cgroupfs, proctree, reaper
from argus_agent.jobs.cgroups import in_another_jobs_cgroup, terminate, v2_mount
from argus_agent.jobs.store import JobRecord, JobStore
from argus_agent.jobs.takeover import OutputKeeper, OutputPipes
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

SHIM_PATH = Path(__file__).with_name("shim.py")
#: How often a job adopted from an earlier agent run (its shim is not our child) is checked.
ADOPTED_POLL_S = 0.5
SHIM_KILLED = "exit status unknown: supervisor was killed"
#: How long the agent keeps reading a taken-over job's pipes after the job ended.
TAKEOVER_DRAIN_S = 1.0
#: Grace between SIGTERM and SIGKILL for what a taken-over job left behind.
LEFTOVER_GRACE_S = 5.0
#: How often the agent's own stop looks for what is left of a job (a pass over /proc).
FALLBACK_POLL_S = 0.1


@dataclass
class Job:
    """One job of the job table: its record and the agent's tasks and pipes for it."""

    record: JobRecord
    watcher: asyncio.Task[None] | None = None
    fallback_stop: asyncio.Task[proctree.StopResult] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    #: The agent's own read ends of the job's output pipes (see ``takeover``).
    pipes: OutputPipes | None = None
    #: Whether a fallback stop ended while the job's main process ran on (logged once).
    missed_stop: bool = False


class _NotOf:
    """The processes a fallback stop of a job must leave alone: the shims and output
    keepers this agent started and the main processes of its other jobs. Looked up at each
    question, not copied when the stop begins: an output keeper started (or restarted)
    while the stop runs is never taken for one of the job's orphans."""

    def __init__(self, manager: CarryOn, job: Job) -> None:
        self.manager = manager
        self.job = job

    def __contains__(self, pid: object) -> bool:
        if pid in self.manager._spawned:
            return True
        return any(j is not self.job and j.record.pid == pid for j in self.manager._jobs.values())


def _has_cgroup(record: JobRecord) -> bool:
    """Whether the job has a cgroup that still exists (stops and facts go through it)."""
    return bool(record.cgroup) and os.path.isdir(record.cgroup.get(cgroupfs.V2, ""))


def main_process(record: JobRecord) -> tuple[bool, int | None]:
    """Whether the job's main process still runs, and its wait status once it was collected
    (it is a child of the agent once re-parented to it; None: not ours, or not collectable).
    It may exit between the two looks (a zombie is not "the same process"), so a process
    found gone is collected once more before concluding it left no status."""
    status = reaper.reap(record.pid) if record.pid is not None else None
    if status is not None:
        return False, status
    if proctree.is_same_process(record.pid, record.start_ticks):
        return True, None
    return False, reaper.reap(record.pid) if record.pid is not None else None


class CarryOn:
    """The job table's handling of jobs whose shim is gone (mixed into ``JobManager``)."""

    store: JobStore
    settings: JobSettings
    python: str
    _jobs: dict[str, Job]
    #: Shims and output keepers this process started (never a job's orphans).
    _spawned: set[int]

    if TYPE_CHECKING:

        def _ended(self, job: Job) -> None: ...

        def reap_orphans(self) -> None: ...

    def _stop_without_shim(self, job: Job) -> None:
        """The agent's own stop of a job whose shim is gone (once per job): what is left of
        the grace period from when the stop was asked for, then SIGKILL. Idempotent."""
        record = job.record
        if job.fallback_stop is not None or record.pid is None:
            return
        log.warning(
            "job supervisor is gone; the agent stops the job itself", batch_id=record.batch_id
        )
        self._start_fallback(job, self._grace_left(record), record.pid)

    def _grace_left(self, record: JobRecord) -> float:
        """What is left of the job's grace period, from when its stop was asked for."""
        grace = self.settings.stop_grace_s if record.stop_grace_s is None else record.stop_grace_s
        asked = record.stop_requested_at or time.time()
        return max(0.0, asked + grace - time.time())

    def _start_fallback(self, job: Job, grace_s: float, root: int | None) -> None:
        """Start the job's fallback stop task: through /proc (``proctree``: ``root`` and its
        tree, the job's group, its environment, orphans re-parented to the agent) and, when
        the job has a cgroup, through it as well (nothing that ran in it survives; a process
        that moved itself out of it is still found through /proc)."""
        record = job.record
        ticks = record.start_ticks if root is not None else None
        group = record.pgid or record.pid
        if _has_cgroup(record):
            assert record.cgroup is not None
            found = functools.partial(self._processes_outside_cgroups, job, root, ticks, group)
            job.fallback_stop = asyncio.create_task(
                terminate(
                    record.cgroup,
                    grace_s,
                    unkillable_wait_s=self.settings.unkillable_wait_s,
                    poll_s=FALLBACK_POLL_S,
                    others=found,
                )
            )
            return
        job.fallback_stop = asyncio.create_task(
            proctree.terminate_processes(
                root,
                ticks,
                group,
                record.batch_id,
                grace_s,
                poll_s=FALLBACK_POLL_S,
                unkillable_wait_s=self.settings.unkillable_wait_s,
                exclude=_NotOf(self, job),
            )
        )

    def _processes_outside_cgroups(
        self, job: Job, root: int | None, ticks: int | None, group: int | None
    ) -> dict[int, int]:
        """The processes of a job with a cgroup that /proc finds (``proctree``), less those
        in another job's cgroup: an orphan of another job re-parented to the agent may look
        like this job's, but its cgroup says whose it is. Blocking (a thread's)."""
        record = job.record
        assert record.cgroup is not None
        found = proctree.job_processes(
            root, ticks, group, record.batch_id, exclude=_NotOf(self, job)
        )
        mount = v2_mount() if found else None
        mine = record.cgroup[cgroupfs.V2]
        return {
            pid: started
            for pid, started in found.items()
            if not in_another_jobs_cgroup(pid, mine, mount)
        }

    def _stop_gave_up(self, job: Job) -> bool:
        """Whether the job's fallback stop ended, giving up on its main process (still
        running: the caller checked) as one that would not die. A stop that ended having
        missed it (neither stopped nor named) is started again, with what is left of the
        grace period: a job is never recorded as ended while its main process runs, unless
        a stop gave up on it."""
        record = job.record
        stop = job.fallback_stop
        if stop is None or not stop.done():
            return False
        if (
            stop.cancelled()
            or stop.exception() is not None
            or record.pid in stop.result().survivors
        ):
            return True
        if not job.missed_stop:
            job.missed_stop = True
            log.error(
                "the job's stop ended while its main process still runs; stopping it again",
                batch_id=record.batch_id,
                pid=record.pid,
            )
        self._start_fallback(job, self._grace_left(record), record.pid)
        return False

    async def _end_without_shim(self, job: Job, status: int | None) -> None:
        """The shim is gone and so is the job's main process: stop what the job left
        running (as the shim would have: nothing the job started outlives it), then record
        the end with ``status`` (None: unknown)."""
        survivors: list[int] | None = None
        if job.fallback_stop is None and self.settings.kill_leftovers:
            self._start_fallback(job, LEFTOVER_GRACE_S, None)
        if job.fallback_stop is not None:
            survivors = (await job.fallback_stop).survivors
        self.reap_orphans()
        self._write_exit(job, status, survivors)
        self._ended(job)

    def _stop_leftovers_later(self, job: Job) -> None:
        """At start-up, for a job that ended with its shim while the agent was away: stop
        what it left running, in the background (its end is reported meanwhile)."""
        if job.fallback_stop is None and self.settings.kill_leftovers and job.record.started:
            self._start_fallback(job, LEFTOVER_GRACE_S, None)

    async def _take_over(self, job: Job) -> None:
        """Carry on a job whose shim was killed: its output, its stop, its end. Returns once
        the job's main process ended and its end is recorded."""
        record = job.record
        log.error(
            "the job's supervisor was killed while the job runs; the agent carries the job "
            "on itself (output, stop and end)",
            batch_id=record.batch_id,
            pid=record.pid,
        )
        keeper = OutputKeeper(self.store.job_dir(record.batch_id), self.python, SHIM_PATH)
        await self._keep_output(job, keeper)
        await self._carry_on(job, keeper)

    async def _keep_output(self, job: Job, keeper: OutputKeeper) -> None:
        """Make sure an output keeper reads the job's pipes (one, not two: a keeper an
        earlier agent started goes on)."""
        if job.pipes is None or keeper.alive():
            return
        try:
            await keeper.start(job.pipes, job.record.log_path, self.settings.log_max_bytes)
            assert keeper.process is not None
            self._spawned.add(keeper.process.pid)
        except OSError as exc:
            log.error(
                "cannot start the job's output keeper; its output is lost",
                batch_id=job.record.batch_id,
                error=str(exc),
            )

    async def _carry_on(self, job: Job, keeper: OutputKeeper) -> None:
        record = job.record
        status = None
        assert record.pid is not None
        if record.stop_requested_at is not None:
            # A stop was under way when the shim died: the agent finishes it.
            self._stop_without_shim(job)
        while True:
            running, status = main_process(record)
            if not running:
                break
            if self._stop_gave_up(job):
                break  # a stop gave up on what would not die: the job is recorded as ended
            self.reap_orphans()
            if not keeper.alive():
                await self._keep_output(job, keeper)  # the keeper died: another one
            await asyncio.sleep(ADOPTED_POLL_S / 5)
        if job.fallback_stop is None and self.settings.kill_leftovers:
            # As the shim would: nothing the job started outlives it. Recorded as the job's
            # stop task, so a stop arriving now joins it instead of starting another.
            self._start_fallback(job, LEFTOVER_GRACE_S, None)
        survivors: list[int] = []
        killed_after_grace = False
        if job.fallback_stop is not None:
            result = await job.fallback_stop
            survivors = result.survivors
            killed_after_grace = result.killed > 0 and record.stop_requested_at is not None
        self.reap_orphans()
        await keeper.finish(TAKEOVER_DRAIN_S)
        if keeper.process is not None:
            self._spawned.discard(keeper.process.pid)
        self._write_exit(job, status, survivors, killed_after_grace=killed_after_grace)
        self._ended(job)

    def _write_exit(
        self,
        job: Job,
        status: int | None,
        survivors: list[int] | None,
        *,
        killed_after_grace: bool = False,
    ) -> None:
        """Record the end of a job whose shim could not (``exit.json``)."""
        note = None
        if survivors:
            note = (
                f"stop incomplete: process(es) {', '.join(map(str, survivors))} would not die "
                "after SIGKILL (uninterruptible sleep, or not permitted to signal them)"
            )
        elif status is None:
            note = SHIM_KILLED
        info = {
            "exit_code": os.WEXITSTATUS(status)
            if status is not None and os.WIFEXITED(status)
            else None,
            "exit_signal": os.WTERMSIG(status)
            if status is not None and os.WIFSIGNALED(status)
            else None,
            "ended_at": time.time(),
            "exit_note": note,
            "killed_after_grace": killed_after_grace,
            **self._memory_facts(job.record),
        }
        try:
            self.store.write_exit(job.record.batch_id, info)
        except OSError as exc:
            log.error("cannot record the job's end", batch_id=job.record.batch_id, error=str(exc))

    @staticmethod
    def _memory_facts(record: JobRecord) -> dict[str, int | None]:
        """OOM kills, memory peak and limit of the job's cgroup ({} without one)."""
        return cgroupfs.memory_facts(record.cgroup) if _has_cgroup(record) else {}
