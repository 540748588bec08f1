"""The job table: launch jobs under their shims, watch them end, stop them, re-adopt them.

Owns the jobs of this agent (keyed by the Argus batch id). Each job runs under its own shim
process (``shim.py``), which owns the job's process, its log and its exit status, so the
agent can stop, crash or be upgraded without the job noticing. On start-up the agent
re-adopts every job recorded in the state dir: a job whose shim is alive (same pid **and**
start time) is watched again; a job that ended meanwhile is reported with the exit status its
shim recorded.

A killed shim never kills its job: the agent holds read ends of the job's output pipes
(``takeover.OutputPipes``), and when a shim dies before recording an exit status while its
job runs, the agent takes the job over (``carryon``, mixed in here): an output keeper
process carries the output into the log (``takeover.OutputKeeper``, which outlives an agent
restart), the agent stops the job itself on request (``proctree``, or the job's cgroup),
learns the exit status when the job was re-parented to it (the agent is a child subreaper,
see ``reaper``), and reports the end ("exit status unknown: supervisor was killed" when the
kernel gave the status to someone else).

Where the agent may write a cgroup subtree (``cgroups``), each job gets cgroups of its own,
made before its launch and recorded in its ``job.json``, so a restarted agent keeps using
them: the shim places the job in them, stops end with the cgroup killed, the OOM killer's
kills are read from them, and the agent's own stop of a job whose shim is gone kills the
cgroup besides hunting processes through /proc (a process may move itself out of it). They
are removed once the job's end was reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from argus_agent.config import JobSettings
from argus_agent.errors import JobError, LaunchError
from argus_agent.jobs import cgroupfs, proctree, reaper
from argus_agent.jobs.carryon import ADOPTED_POLL_S, SHIM_PATH, CarryOn, Job, main_process
from argus_agent.jobs.cgroups import CgroupInUse, Cgroups, remove_job
from argus_agent.jobs.jobtable import JobTable
from argus_agent.jobs.procfs import signal_process
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord, JobRecordError, JobStore
from argus_agent.jobs.takeover import OutputPipes
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

__all__ = ["SHIM_PATH", "JobManager", "mark_reported"]

#: How long the shim may take to report that the exec succeeded or failed.
LAUNCH_TIMEOUT_S = 30.0
#: How long shutdown waits for job ends still being reported (they are retried at next start).
SHUTDOWN_REPORT_S = 10.0
LOST = "the job's supervisor ended without recording an exit status"


class JobManager(CarryOn, JobTable[JobRecord]):
    """The jobs this agent supervises. Use from one event loop."""

    def __init__(
        self,
        store: JobStore,
        settings: JobSettings,
        *,
        python: str | None = None,
        on_ended: Callable[[JobRecord], Awaitable[None]] | None = None,
        cgroups: Cgroups | None = None,
    ):
        self.store = store
        self.settings = settings
        #: Whether and where jobs get cgroups; set up by ``adopt_existing`` (its ``status()``
        #: says why not, when not).
        self.cgroups = cgroups or Cgroups(settings)
        self.python = python or sys.executable
        #: Called once per job end (also for jobs that ended while the agent was away); the
        #: end counts as reported only once it returned.
        self.on_ended = on_ended
        self._jobs: dict[str, Job] = {}
        self._reports: set[asyncio.Task[None]] = set()
        #: Shims and output keepers this process started: asyncio waits for them, so
        #: ``reap_orphans`` must not, and no fallback stop takes them for a job's orphans.
        self._spawned: set[int] = set()

    # -- start-up ------------------------------------------------------------------------

    def adopt_existing(self) -> tuple[list[JobRecord], list[JobRecord]]:
        """Set up cgroups (``Cgroups.start``: the agent may move into its own leaf), then
        load the jobs of earlier agent runs. Call once at start-up.

        Returns (jobs re-adopted as running, jobs found to have ended while the agent was
        away). Jobs that had ended before are loaded quietly; cgroups of reported ones that
        were left (a crash between report and removal) are removed.
        """
        self.cgroups.start()
        adopted: list[JobRecord] = []
        ended_meanwhile: list[JobRecord] = []
        # Damaged records are moved to jobs/.quarantine and listed in store.quarantined.
        for record in self.store.load_all(quarantine=True):
            job = Job(record)
            self._jobs[record.batch_id] = job
            if record.ended_at is not None:
                job.ended.set()
                if not _was_reported(self.store, record):
                    ended_meanwhile.append(record)
                else:
                    remove_job(record.batch_id, record.cgroup)
                continue
            try:  # one job that cannot be adopted never keeps the others from it
                same_boot = record.boot_id in (None, proctree.boot_id())
                if same_boot and (
                    proctree.is_same_process(record.shim_pid, record.shim_start_ticks)
                    or proctree.is_same_process(record.pid, record.start_ticks)
                ):
                    job.pipes = OutputPipes.attach(record.shim_pid, record.pid, record.output_pipes)
                    job.watcher = asyncio.create_task(self._watch_adopted(job))
                    adopted.append(record)
                    log.info("job re-adopted", batch_id=record.batch_id, pid=record.pid)
                    continue
            except Exception as exc:
                del self._jobs[record.batch_id]
                path = self.store.job_dir(record.batch_id)
                self.store.set_aside(
                    record.batch_id, JobRecordError(path, f"cannot be adopted: {exc!r}")
                )
                continue
            note = (
                "the launch was interrupted by an agent restart"
                if not record.started
                else "the job and its supervisor ended while the agent was away; exit status "
                "unknown"
            )
            self._mark_lost(job, note)
            self._stop_leftovers_later(job)
            ended_meanwhile.append(job.record)
        for record in ended_meanwhile:
            log.info(
                "job ended while the agent was away",
                batch_id=record.batch_id,
                outcome=record.describe_exit(),
            )
            self._report(record)
        return adopted, ended_meanwhile

    # -- launch --------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> JobRecord:
        """Start the job described by ``spec`` under a new shim and begin watching it.

        Returns once the job's exec succeeded. Raises LaunchError (nothing left running, no
        record kept) or JobError when a job for the batch already exists.
        """
        if spec.batch_id in self._jobs:
            raise JobError(f"a job for batch {spec.batch_id} already exists on this host")
        job_dir = self.store.job_dir(spec.batch_id)
        if (job_dir / "job.json").exists():  # before making cgroups another job may own
            raise JobError(f"a job for batch {spec.batch_id} already exists on this host")
        try:
            cgroup = self.cgroups.create_job(spec.batch_id)
        except CgroupInUse as exc:
            log.error("cannot give the job its cgroup", batch_id=spec.batch_id, error=str(exc))
            raise LaunchError(str(exc)) from None
        except OSError as exc:
            cgroup = None
            log.warning(
                "cannot make the job's cgroup; it runs without one (tracked through /proc)",
                batch_id=spec.batch_id,
                error=exc.strerror or str(exc),
            )
        intent = JobRecord(
            batch_id=spec.batch_id,
            cmd_id=spec.cmd_id,
            source_batch_id=spec.source_batch_id,
            requested_by=spec.requested_by,
            command_line=spec.command_line,
            argv=list(spec.argv),
            cwd=str(spec.cwd),
            log_path=str(job_dir / "output.log"),
            run_as=spec.identity.user,
            uid=spec.identity.uid,
            gid=spec.identity.gid,
            launched_at=time.time(),
            cgroup=cgroup,
        )
        try:
            self.store.create(intent)
        except FileExistsError:
            remove_job(spec.batch_id, cgroup)
            raise JobError(f"a job for batch {spec.batch_id} already exists on this host") from None
        except OSError as exc:
            remove_job(spec.batch_id, cgroup)
            reason = exc.strerror or exc
            raise LaunchError(f"cannot create the job directory {job_dir}: {reason}") from None
        try:
            process, answer = await self._start_shim(spec, job_dir, intent.log_path, cgroup)
        except LaunchError:
            self.store.discard(spec.batch_id)
            remove_job(spec.batch_id, cgroup)
            raise
        record = self.store.load(spec.batch_id)
        job = Job(record)
        job.pipes = OutputPipes.attach(process.pid, record.pid, record.output_pipes)
        self._jobs[spec.batch_id] = job
        self._spawned.add(process.pid)
        job.watcher = asyncio.create_task(self._watch_child(job, process))
        log.info(
            "job started",
            batch_id=spec.batch_id,
            pid=answer["pid"],
            shim_pid=process.pid,
            run_as=spec.identity.user,
            cwd=str(spec.cwd),
            cgroup=cgroup[cgroupfs.V2] if cgroup else None,
        )
        return record

    async def _start_shim(
        self, spec: LaunchSpec, job_dir: Path, log_path: str, cgroup: dict[str, str] | None
    ) -> tuple[asyncio.subprocess.Process, dict]:
        launch_spec = {
            "job_dir": str(job_dir),
            "argv": list(spec.argv),
            "cwd": str(spec.cwd),
            "env": dict(spec.env),
            "uid": spec.identity.uid,
            "gid": spec.identity.gid,
            "groups": list(spec.identity.groups),
            "log_path": log_path,
            "log_max_bytes": self.settings.log_max_bytes,
            "stop_grace_s": self.settings.stop_grace_s,
            "kill_leftovers": self.settings.kill_leftovers,
            "unkillable_wait_s": self.settings.unkillable_wait_s,
            "cgroup": cgroup,
        }
        shim_log = os.open(job_dir / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = await asyncio.create_subprocess_exec(
                self.python,
                "-I",
                "-S",
                str(SHIM_PATH),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=shim_log,
                cwd=job_dir,
                env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"},
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start the job supervisor: {exc.strerror or exc}") from None
        finally:
            os.close(shim_log)
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps(launch_spec).encode())
            await process.stdin.drain()
            process.stdin.close()
            line = await asyncio.wait_for(process.stdout.readline(), LAUNCH_TIMEOUT_S)
            answer = json.loads(line) if line else {"ok": False, "error": _shim_died(job_dir)}
        except (TimeoutError, ConnectionError, ValueError) as exc:
            await _end_shim(process)
            reason = str(exc) or type(exc).__name__
            raise LaunchError(f"the job supervisor did not answer: {reason}") from None
        if not answer.get("ok"):
            await process.wait()
            raise LaunchError(str(answer.get("error") or "the job supervisor failed"))
        return process, answer

    # -- stop ----------------------------------------------------------------------------

    async def stop(
        self, batch_id: str, requested_by: str | None, *, grace_s: float | None = None
    ) -> JobRecord:
        """Begin stopping the job of ``batch_id``: its shim sends SIGTERM to the whole tree
        now and SIGKILL to whatever is left after the grace period (``grace_s``, else
        ``jobs.stop_grace_s``). Returns at once; idempotent while a stop is under way (the
        first stop's grace period stands).

        Raises JobError when this host has no running job for the batch.
        """
        job = self._jobs.get(batch_id)
        if job is None:
            raise JobError(f"no job for batch {batch_id} on this host")
        record = job.record
        if not record.running:
            raise JobError(f"the job for batch {batch_id} already ended ({record.describe_exit()})")
        if record.stop_requested_at is None:
            record = record.with_changes(
                stop_requested_by=requested_by,
                stop_requested_at=time.time(),
                stop_grace_s=self.settings.stop_grace_s if grace_s is None else grace_s,
            )
            job.record = record
            self.store.write_stop(record)
        if proctree.is_same_process(record.shim_pid, record.shim_start_ticks):
            assert record.shim_pid is not None
            signal_process(record.shim_pid, record.shim_start_ticks, signal.SIGTERM)
        else:
            self._stop_without_shim(job)
        return record

    # -- housekeeping --------------------------------------------------------------------

    def prune(self, retention_s: float) -> int:
        """Forget jobs that ended more than ``retention_s`` ago and whose end was reported
        (their dirs are removed)."""
        cutoff = time.time() - retention_s
        reported = [
            j.record
            for j in self._jobs.values()
            if j.record.ended_at is not None and _was_reported(self.store, j.record)
        ]
        # Cgroups a process that would not die kept are tried again; such a job is kept
        # (and listed) until they are gone.
        kept = {r.batch_id for r in reported if not remove_job(r.batch_id, r.cgroup)}
        old = [
            r.batch_id
            for r in reported
            if r.ended_at is not None and r.ended_at < cutoff and r.batch_id not in kept
        ]
        for batch_id in old:
            self.store.discard(batch_id)
            del self._jobs[batch_id]
        if old:
            log.info("pruned old jobs", count=len(old))
        return len(old)

    def reap_orphans(self) -> None:
        """Collect exited orphans of jobs re-parented to the agent (see ``reaper``), never a
        job's main process (its watcher collects that one, with its status) nor a shim."""
        roots = {j.record.pid for j in self._jobs.values() if j.record.pid and not j.ended.is_set()}
        reaper.reap_orphans({*self._spawned, *roots})

    async def shutdown(self) -> None:
        """Stop watching; running jobs are left running under their shims."""
        if self._reports:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reports_done(), SHUTDOWN_REPORT_S)
        tasks = [t for j in self._jobs.values() for t in (j.watcher, j.fallback_stop) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- watching ------------------------------------------------------------------------

    async def _watch_child(self, job: Job, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        self._spawned.discard(process.pid)
        await self._after_shim(job)

    async def _watch_adopted(self, job: Job) -> None:
        record = job.record
        while proctree.is_same_process(record.shim_pid, record.shim_start_ticks):
            await asyncio.sleep(ADOPTED_POLL_S)
        await self._after_shim(job)

    async def _after_shim(self, job: Job) -> None:
        """The job's shim is gone: report the end it recorded, or take the job over."""
        record = job.record
        if (self.store.job_dir(record.batch_id) / "exit.json").exists():
            self._ended(job)
            return
        running, status = main_process(record)
        if running:
            await self._take_over(job)
            return
        await self._end_without_shim(job, status)

    def _ended(self, job: Job) -> None:
        try:
            record = self.store.load(job.record.batch_id)
        except JobRecordError as exc:
            # Its end is known, its status damaged: reported as unknown, the file left as it
            # is (the next start quarantines the directory, once the end was reported).
            self.store.set_aside(job.record.batch_id, exc, move=False)
            record = job.record.with_changes(
                ended_at=time.time(), exit_note=f"exit status unreadable: {exc}"
            )
        except (OSError, ValueError, TypeError) as exc:
            log.error("cannot read the job's state", batch_id=job.record.batch_id, error=str(exc))
            record = job.record
        if record.ended_at is None:
            self._mark_lost(job, LOST)
            record = job.record
        job.record = record
        job.ended.set()
        if job.pipes is not None:
            job.pipes.close()
            job.pipes = None
        log.info("job ended", batch_id=record.batch_id, outcome=record.describe_exit())
        self._report(record)

    def _reported(self, record: JobRecord) -> None:
        mark_reported(self.store, record)
        remove_job(record.batch_id, record.cgroup)  # its end is out: nothing left to read

    def _mark_lost(self, job: Job, note: str) -> None:
        try:
            self.store.write_lost_exit(job.record.batch_id, note, self._memory_facts(job.record))
            job.record = self.store.load(job.record.batch_id)
        except (OSError, ValueError, TypeError):
            job.record = job.record.with_changes(ended_at=time.time(), exit_note=note)
        job.ended.set()


async def _end_shim(process: asyncio.subprocess.Process) -> None:
    """Make a shim that did not answer go away, with whatever it may have started: SIGTERM
    (it stops the job's tree, or kills a job it is still starting), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 5.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _shim_died(job_dir: Path) -> str:
    try:
        tail = (job_dir / "shim.log").read_text()[-300:].strip()
    except OSError:
        tail = ""
    return "the job supervisor exited before starting the job" + (f": {tail}" if tail else "")


def _was_reported(store: JobStore, record: JobRecord) -> bool:
    return (store.job_dir(record.batch_id) / "reported").exists()


def mark_reported(store: JobStore, record: JobRecord) -> None:
    """Remember that the end of this job was reported (so a restart does not report it again)."""
    with contextlib.suppress(OSError):
        (store.job_dir(record.batch_id) / "reported").touch(mode=0o600)
