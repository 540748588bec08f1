"""The Slurm launcher (``jobs.launcher = "slurm"``): reruns submitted with sbatch from a login
node, stopped with scancel, their ends learned from Slurm.

:class:`SlurmJobs` is the job table the dispatcher, telemetry and status use when jobs run
under Slurm; it has the local :class:`~argus_agent.jobs.supervisor.JobManager`'s interface
(``jobs/launcher.py``). Slurm places, limits, accounts and kills the jobs; this class only
bridges Argus' Rerun and Stop to it:

- **launch**: the launch spec the policy built for a local launch (as whom, where, argv,
  environment) is submitted with ``sbatch --parsable`` as the batch's owner (directly for a
  per-user agent, through ``runuser -u OWNER --`` for a system agent), with the resources
  recovered from the run's recorded ``SLURM_*`` variables (``slurm_resources``), the
  environment passed through a memfd (``--export-file``: no value on a command line, none
  of the sbatch process's own variables in the job), the working directory, and
  ``--output`` in an output directory the owner makes first (``slurm_files``). The record
  is written before sbatch runs and carries the batch id as the job's ``--comment``, so a
  submission whose answer was lost (an agent killed, sbatch timed out) is found in the queue.
  The returned record's ``pid`` is the Slurm job id (what the rerun is acked with);
- **stop**: ``scancel --signal=TERM --full ID`` for a job that runs, then plain ``scancel
  ID`` after the grace period; a job still pending is simply cancelled;
- **watching** (``slurm_watch.QueueWatch``, mixed in): one ``squeue`` for all of the
  agent's jobs every ``jobs.slurm_poll_s``; a job that ended is looked up with ``sacct``,
  ``scontrol show job`` or its exit file, its output copied into the agent's own
  ``output.log`` (read by the log tailer) and its end handed to ``on_ended``; ``sstat``
  readings go to ``on_usage`` (resource snapshots);
- **restarts** lose nothing: Slurm holds the jobs, the records hold their ids.

Tasks: the watcher (``QueueWatch._watch``), one grace timer per stop under way, one report
per job end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from argus_agent.config import JobSettings
from argus_agent.errors import ConfigError, JobError, LaunchError, PayloadError
from argus_agent.health import DEFAULT_STALL_S, Health
from argus_agent.jobs import slurm_files
from argus_agent.jobs.jobtable import JobTable
from argus_agent.jobs.policy import ENV_NAME_RE
from argus_agent.jobs.slurm_cli import INVALID_JOB, SlurmCommands, SlurmUnavailable
from argus_agent.jobs.slurm_resources import from_env, is_slurm_variable, sbatch_options
from argus_agent.jobs.slurm_store import ENDED_STATES, SlurmJobRecord, SlurmStore
from argus_agent.jobs.slurm_watch import OnUsage, QueueWatch, SlurmJob, Usage
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: How often a stop retries its final scancel while Slurm cannot be reached (seconds).
KILL_RETRY_S = 10.0

#: The job's ``--comment``: how a submission whose answer was lost is found again.
COMMENT_PREFIX = "argus-agent:"
#: The client programs a Slurm launcher cannot work without (sacct and sstat are optional).
REQUIRED = ("sbatch", "squeue", "scontrol", "scancel")
#: How long shutdown waits for job ends still being reported (retried at next start).
SHUTDOWN_REPORT_S = 10.0
#: Makes the output directory as the job's user, then runs sbatch (removing the directory
#: again when sbatch refuses the job). Constant text: the paths are positional parameters.
SUBMIT_SH = (
    'umask 022; mkdir -m 700 -- "$1" || exit 97; d=$1; shift; "$@"; rc=$?; '
    '[ "$rc" -eq 0 ] || rmdir -- "$d" 2>/dev/null; exit "$rc"'
)
MKDIR_FAILED = 97


class _NoCgroups:
    """What status says about cgroups when Slurm runs the jobs."""

    def status(self) -> dict[str, Any]:
        return {"mode": "none", "why": "jobs run under Slurm, which keeps their cgroups"}


class SlurmJobs(QueueWatch, JobTable[SlurmJobRecord]):
    """The jobs this agent submitted to Slurm. Use from one event loop."""

    def __init__(
        self,
        store: SlurmStore,
        settings: JobSettings,
        *,
        commands: SlurmCommands | None = None,
        on_ended: Callable[[JobRecord], Awaitable[None]] | None = None,
        on_usage: OnUsage | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.commands = commands or SlurmCommands(settings.slurm_command_timeout_s)
        #: Called once per job end; the end counts as reported once it returned.
        self.on_ended = on_ended
        #: Called with each sstat reading of the running jobs (resource snapshots).
        self.on_usage = on_usage
        self.health = Health(DEFAULT_STALL_S)
        self.cgroups = _NoCgroups()
        self.agent_uid = os.geteuid()
        #: Each running job's latest reading, for status (batch id → reading).
        self.latest: dict[str, Usage] = {}
        #: The last squeue failure (None while squeue answers), for status.
        self.queue_error: str | None = None
        self.last_tick_s: float | None = None
        self._jobs: dict[str, SlurmJob] = {}
        self._reports: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._copying: set[threading.Thread] = set()
        self._cpu_seen: dict[int, tuple[float, float]] = {}
        self._next_usage = 0.0

    def status(self) -> dict[str, Any]:
        """The launcher's part of `status`."""
        return {
            "launcher": "slurm",
            "accounting": self.commands.accounting_known,
            "queue_error": self.queue_error,
            "last_tick_ms": round(self.last_tick_s * 1000, 2) if self.last_tick_s else None,
            "missing_programs": self.commands.missing(),
        }

    # -- start-up ------------------------------------------------------------------------

    def adopt_existing(self) -> tuple[list[JobRecord], list[JobRecord]]:
        """Load the jobs of earlier agent runs and start watching. Call once at start-up,
        from the event loop. Raises ConfigError when sbatch and co. are not installed.

        Returns (jobs still in Slurm's hands, jobs whose end was not reported yet). A
        submission an earlier run did not see answered is looked for in the queue (one
        blocking squeue) and adopted, or ended as interrupted."""
        missing = [p for p in REQUIRED if self.commands.bins.get(p) is None]
        if missing:
            raise ConfigError(
                f'jobs.launcher = "slurm", but the agent\'s PATH lacks {", ".join(missing)}; '
                "install Slurm's client commands (Debian: slurm-client) on this host"
            )
        adopted: list[JobRecord] = []
        unreported: list[JobRecord] = []
        for record in self.store.load_all(quarantine=True):
            job = SlurmJob(record)
            self._jobs[record.batch_id] = job
            if record.ended_at is None and record.slurm_job_id is None:
                self._find_lost_submission(job)
            if job.record.ended_at is not None:
                job.ended.set()
                if not self.store.reported(record.batch_id):
                    unreported.append(job.record)
                continue
            adopted.append(job.record)
            if record.stop_requested_at is not None and not record.killed_after_grace:
                remaining = record.stop_requested_at + (record.stop_grace_s or 0) - time.time()
                job.killer = asyncio.create_task(self._kill_after(job, max(0.0, remaining)))
            log.info("Slurm job re-adopted", batch_id=record.batch_id, job=record.slurm_job_id)
        for record in unreported:
            self._report(record)
        self._watcher = asyncio.create_task(self._watch())
        return adopted, unreported

    def _find_lost_submission(self, job: SlurmJob) -> None:
        """A record written before sbatch ran but without its answer: find the job by its
        comment, or end the record (blocking: start-up only)."""
        record = job.record
        squeue = self.commands.bins["squeue"] or "squeue"
        argv = [squeue, "-h", "-t", "all", "-u", record.run_as or "root", "-o", "%i|%k"]
        try:
            done = subprocess.run(
                argv,
                env=self.commands.env,
                capture_output=True,
                text=True,
                timeout=self.settings.slurm_command_timeout_s,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            done, failure = None, str(exc)
        else:
            failure = done.stderr.strip()[:200] or f"exit status {done.returncode}"
        if done is None or done.returncode != 0:
            # An unreadable queue proves nothing: the record stays as it is (not ended) and
            # is looked for again at the next start; the job, if queued, keeps its record.
            log.error(
                "a submission interrupted by a restart cannot be looked up: squeue failed; "
                "it is looked for again when the agent next starts",
                batch_id=record.batch_id,
                error=failure,
            )
            return
        ids = [
            int(line.split("|", 1)[0])
            for line in done.stdout.splitlines()
            if line.partition("|")[2].strip() == COMMENT_PREFIX + record.batch_id
            and line.split("|", 1)[0].isdigit()
        ]
        if ids:
            job.record = record.with_changes(pid=ids[0], slurm_job_id=ids[0])
            log.info("a submission interrupted by a restart was found", job=ids[0])
        else:
            job.record = record.with_changes(
                ended_at=time.time(),
                exit_note="the submission was interrupted by an agent restart and no job of "
                "it is in the queue",
            )
        self.store.save(job.record)

    # -- launch --------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> SlurmJobRecord:
        """Submit the job described by ``spec`` (see the module doc). Returns its record
        (``pid``: the Slurm job id) once sbatch accepted it. Raises PayloadError (recorded
        resources refused), LaunchError (sbatch's own message) or JobError (exists)."""
        if spec.batch_id in self._jobs or (self.store.job_dir(spec.batch_id)).exists():
            raise JobError(f"a job for batch {spec.batch_id} already exists on this host")
        jobs = self.settings
        resources = from_env(spec.recorded_env)
        options = sbatch_options(
            resources,
            default_partition=jobs.slurm_partition,
            default_time_limit=jobs.slurm_time_limit,
            pin_node=jobs.slurm_pin_node,
            host=spec.host,
        )
        options += list(jobs.slurm_extra_args)
        if not any(o.startswith(("--job-name", "-J")) for o in options):
            # Else squeue shows "sbatch" (the script comes on stdin): say whose run it is.
            options.append(f"--job-name=argus-{spec.batch_id}")
        out_dir = (jobs.slurm_output_dir or spec.cwd) / slurm_files.output_dir_name(spec.batch_id)
        if "%" in str(out_dir) or "\\" in str(out_dir):
            raise PayloadError(
                f"the output directory {out_dir} holds % or \\, which Slurm reads as a pattern; "
                "set jobs.slurm_output_dir"
            )
        record = SlurmJobRecord(
            batch_id=spec.batch_id,
            cmd_id=spec.cmd_id,
            source_batch_id=spec.source_batch_id,
            requested_by=spec.requested_by,
            command_line=spec.command_line,
            argv=list(spec.argv),
            cwd=str(spec.cwd),
            log_path=str(self.store.job_dir(spec.batch_id) / slurm_files.OUTPUT_NAME),
            run_as=spec.identity.user,
            uid=spec.identity.uid,
            gid=spec.identity.gid,
            launched_at=time.time(),
            slurm_options=options,
            slurm_output_dir=str(out_dir),
            source_host=spec.host,
        )
        try:
            self.store.create(record)
        except FileExistsError:
            raise JobError(f"a job for batch {spec.batch_id} already exists on this host") from None
        except OSError as exc:
            raise LaunchError(f"cannot record the job: {exc.strerror or exc}") from None
        try:
            job_id = await self._submit(spec, record, options, out_dir)
        except BaseException:
            self.store.discard(spec.batch_id)
            raise
        record = record.with_changes(pid=job_id, slurm_job_id=job_id, slurm_state="PENDING")
        self.store.save(record)
        self._jobs[spec.batch_id] = SlurmJob(record)
        self._wake.set()
        log.info(
            "job submitted to Slurm",
            batch_id=spec.batch_id,
            job=job_id,
            run_as=spec.identity.user,
            cwd=str(spec.cwd),
            options=options,
        )
        return record

    async def _submit(
        self, spec: LaunchSpec, record: SlurmJobRecord, options: list[str], out_dir: Path
    ) -> int:
        """Run sbatch (as the owner when that is not the agent's user); the job id."""
        env = {
            k: v
            for k, v in spec.env.items()
            if ENV_NAME_RE.fullmatch(k) and not is_slurm_variable(k)
        }
        memfd = os.memfd_create("argus-agent-env", os.MFD_CLOEXEC)
        try:
            os.write(memfd, b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
            os.lseek(memfd, 0, os.SEEK_SET)
            argv = [
                "/bin/sh",
                "-c",
                SUBMIT_SH,
                "argus-agent-submit",
                str(out_dir),
                self.commands.bins["sbatch"] or "sbatch",
                "--parsable",
                "--export=ALL",
                f"--export-file={memfd}",
                f"--chdir={spec.cwd}",
                f"--output={out_dir / slurm_files.OUTPUT_NAME}",
                "--open-mode=append",
                f"--comment={COMMENT_PREFIX}{spec.batch_id}",
                *options,
            ]
            script = slurm_files.batch_script(spec.argv, str(out_dir), spec.batch_id)
            as_user = spec.identity.user if spec.identity.uid != self.agent_uid else None
            try:
                result = await self.commands.run(
                    argv, stdin=script.encode(), pass_fds=(memfd,), as_user=as_user
                )
            except SlurmUnavailable as exc:
                return await self._submission_lost(record, str(exc))
        finally:
            os.close(memfd)
        if result.rc == MKDIR_FAILED:
            raise LaunchError(f"cannot make the job's output directory: {result.message()}")
        if result.rc != 0:
            raise LaunchError(result.message())
        head = result.out.strip().split(";", 1)[0]
        if not head.isdigit():
            raise LaunchError(f"sbatch answered {result.out.strip()[:200]!r}, not a job id")
        return await self._verified(record, int(head))

    async def _verified(self, record: SlurmJobRecord, job_id: int) -> int:
        """The id sbatch printed, once the queue confirms it is the owner's job with this
        batch's comment. sbatch runs as the owner, whose other processes can write into its
        output: an id read from there is never trusted on its own (the agent acts on it,
        e.g. with scancel). A queue that names another job of the owner's with the comment
        wins; one that cannot be read leaves the id (stops run as the owner: Slurm itself
        refuses them for a job not the owner's)."""
        owner, comment = record.run_as or "root", COMMENT_PREFIX + record.batch_id
        try:
            found = await self.commands.jobs_with_comment(owner, comment)
        except SlurmUnavailable as exc:
            log.warning("cannot confirm the submitted job in the queue", job=job_id, error=str(exc))
            return job_id
        if job_id in found:
            return job_id
        if found:
            log.warning(
                "sbatch's answer names a job that is not this submission; using the queue's",
                answered=job_id,
                job=found[0],
            )
            return found[0]
        raise LaunchError(
            f"sbatch answered job {job_id}, which is not a job of {owner} for this batch; "
            "the submission is not in the queue"
        )

    async def _submission_lost(self, record: SlurmJobRecord, why: str) -> int:
        """sbatch did not answer: the job may still have been queued. Look for it by its
        comment; LaunchError when it is not there."""
        try:
            found = await self.commands.jobs_with_comment(
                record.run_as or "root", COMMENT_PREFIX + record.batch_id
            )
        except SlurmUnavailable as exc:
            raise LaunchError(f"{why}; and the queue cannot be read: {exc}") from None
        if not found:
            raise LaunchError(f"{why}; no job of it is in the queue")
        log.warning("sbatch did not answer but the job is queued", job=found[0], reason=why)
        return found[0]

    # -- stop ----------------------------------------------------------------------------

    async def stop(
        self, batch_id: str, requested_by: str | None, *, grace_s: float | None = None
    ) -> SlurmJobRecord:
        """Stop the job of ``batch_id``: ``scancel --signal=TERM --full`` now and plain
        ``scancel`` after the grace period (``grace_s``, else ``jobs.stop_grace_s``), or
        plain ``scancel`` at once for a job still pending. Returns once scancel answered;
        idempotent while a stop is under way (the first one's grace period stands).

        Raises JobError: no such job, it ended, it is still being submitted, scancel failed.
        """
        job = self._jobs.get(batch_id)
        if job is None:
            raise JobError(f"no job for batch {batch_id} on this host")
        record = job.record
        if not record.running or record.slurm_job_id is None:
            raise JobError(f"the job for batch {batch_id} already ended ({record.describe_exit()})")
        first = record.stop_requested_at is None
        if first:
            record = record.with_changes(
                stop_requested_by=requested_by,
                stop_requested_at=time.time(),
                stop_grace_s=self.settings.stop_grace_s if grace_s is None else grace_s,
            )
            job.record = record
            self.store.save(record)
        # The queue now, not at the last tick: a job that just started gets its grace.
        row = None
        with contextlib.suppress(SlurmUnavailable):
            row = (await self.commands.squeue([record.slurm_job_id])).get(record.slurm_job_id)
            if row is not None and row.state not in ENDED_STATES:
                self._update(job, row)
                record = job.record
        if first and row is not None and row.state in ENDED_STATES:
            self._ended_before_the_stop(job)
            raise JobError(
                f"Slurm job {record.slurm_job_id} already ended on its own ({row.state}); its "
                "end is reported as Slurm gives it"
            )
        pending = record.pending
        if (
            not pending
            and not record.killed_after_grace
            and (job.killer is None or job.killer.done())
        ):  # before the TERM: a TERM that fails still gets its cancel after the grace
            remaining = (record.stop_requested_at or time.time()) + (record.stop_grace_s or 0.0)
            job.killer = asyncio.create_task(
                self._kill_after(job, max(0.0, remaining - time.time()))
            )
        try:
            result = await self.commands.scancel(
                record.slurm_job_id, term=not pending, as_user=self._owner(record)
            )
        except SlurmUnavailable as exc:
            raise JobError(f"cannot stop Slurm job {record.slurm_job_id}: {exc}") from None
        ended = result.rc != 0 and (
            "already completing or completed" in result.err or INVALID_JOB in result.err
        )
        if result.rc != 0 and not ended:
            raise JobError(f"scancel of Slurm job {record.slurm_job_id} failed: {result.message()}")
        if ended and first:
            self._ended_before_the_stop(job)
            raise JobError(
                f"Slurm job {record.slurm_job_id} already ended on its own; its end is reported "
                "as Slurm gives it"
            )
        log.info("Slurm job stop", batch_id=batch_id, job=record.slurm_job_id, pending=pending)
        self._wake.set()
        return record

    def _ended_before_the_stop(self, job: SlurmJob) -> None:
        """The job ended on its own before a first stop reached it (the queue watcher had not
        seen it yet): forget the stop, so that its end is reported as its own (a job that
        completed is done, not "stopped on request"), and let the watcher learn it now."""
        if job.killer is not None:
            job.killer.cancel()
            job.killer = None
        job.record = job.record.with_changes(
            stop_requested_by=None, stop_requested_at=None, stop_grace_s=None
        )
        self.store.save(job.record)
        self._wake.set()

    async def _kill_after(self, job: SlurmJob, delay: float) -> None:
        """The end of a stop's grace period: cancel the job if it still runs, trying again
        every ``KILL_RETRY_S`` while scancel fails (Slurm unreachable), until the job ends."""
        await asyncio.sleep(delay)
        while not job.ended.is_set() and job.record.slurm_job_id is not None:
            record = job.record
            try:
                result = await self.commands.scancel(
                    record.slurm_job_id, as_user=self._owner(record)
                )
            except SlurmUnavailable as exc:
                error = str(exc)
            else:
                if result.rc == 0 or "already completing or completed" in result.err:
                    job.record = job.record.with_changes(killed_after_grace=True)
                    self.store.save(job.record)
                    self._wake.set()
                    return
                error = result.message()
            log.error(
                "cannot cancel the job after its grace period; trying again",
                job=record.slurm_job_id,
                error=error,
                retry_in_s=KILL_RETRY_S,
            )
            await asyncio.sleep(KILL_RETRY_S)

    def _owner(self, record: SlurmJobRecord) -> str | None:
        """Whom scancel runs as: the job's owner (Slurm then refuses a job that is not
        theirs), or None when that is the agent's own user."""
        if record.uid is not None and record.uid == self.agent_uid:
            return None
        return record.run_as

    # -- ends ----------------------------------------------------------------------------

    def _reported(self, record: SlurmJobRecord) -> None:
        self.store.mark_reported(record.batch_id)

    # -- housekeeping --------------------------------------------------------------------

    def prune(self, retention_s: float) -> int:
        """Forget jobs that ended more than ``retention_s`` ago and were reported (their
        directories in the state dir go; the output directories on the cluster stay)."""
        cutoff = time.time() - retention_s
        old = [
            b
            for b, j in self._jobs.items()
            if j.record.ended_at is not None
            and j.record.ended_at < cutoff
            and self.store.reported(b)
        ]
        for batch_id in old:
            self.store.discard(batch_id)
            del self._jobs[batch_id]
        return len(old)

    def reap_orphans(self) -> None:
        """Slurm's commands run as the agent's children in sessions of their own; one
        whose runuser was killed on a timeout ends up here (the agent is a subreaper)."""
        from argus_agent.jobs import reaper

        reaper.reap_orphans(self.commands.inflight)

    async def shutdown(self) -> None:
        """Stop watching; the jobs stay in Slurm's hands."""
        if self._reports:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reports_done(), SHUTDOWN_REPORT_S)
        self.health.forget("slurm queue")
        tasks = [t for t in (self._watcher, *(j.killer for j in self._jobs.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
