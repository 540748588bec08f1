"""Slurm's commands as the agent runs them, and what they print, parsed.

:class:`SlurmCommands` runs ``sbatch``, ``squeue``, ``scontrol``, ``scancel``, ``sacct``,
``sstat`` and ``sinfo`` (found on the agent's ``PATH`` at start-up) as asyncio subprocesses,
each in a session of its own and under ``jobs.slurm_command_timeout_s``: one that takes
longer (a slurmctld that does not answer) is killed with its whole process group and
reported as :class:`SlurmUnavailable`. They run with a small fixed environment (``PATH``,
``LC_ALL=C`` for stable output, and the agent's ``SLURM_CONF`` if it has one), never a
job's: sbatch reads ``SBATCH_*`` variables as options, and a recorded environment must not
choose those. ``as_user`` runs a command as another OS user through ``runuser -u USER --``
(a system agent submitting for a batch's owner; Slurm's ``sbatch --uid`` is never used).

The parsers are pure functions of the text: ``squeue -o '%i|%T|%P|%N|%r'``, ``scontrol -o
show job``, ``sacct -P``, ``sstat -P`` and Slurm's ``ExitCode`` (``exit:signal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from argus_agent.logsetup import get_logger

log = get_logger(__name__)

PROGRAMS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "sstat", "sinfo")
#: Where runuser lives when the agent's PATH lacks the sbin directories.
SBIN_PATH = "/usr/sbin:/sbin"
SQUEUE_FORMAT = "%i|%T|%P|%N|%r"
#: squeue's and scontrol's answer for ids Slurm no longer (or never) knew.
INVALID_JOB = "Invalid job id specified"
ACCOUNTING_OFF = "accounting storage is disabled"
MAX_OUTPUT = 4 * 1024 * 1024


class SlurmUnavailable(Exception):
    """A Slurm command could not be run or did not answer (slurmctld down, timeout); the
    message says which and why. Nothing is concluded about any job from it."""


@dataclass(frozen=True)
class Result:
    """A finished Slurm command."""

    rc: int
    out: str
    err: str

    def message(self) -> str:
        """What it said on stderr (else stdout), or its exit status: for acks and logs."""
        text = (self.err or self.out).strip()
        return text[:2000] if text else f"exit status {self.rc}"


@dataclass(frozen=True)
class QueueRow:
    """One job as squeue shows it."""

    job_id: int
    state: str
    partition: str
    nodes: str
    reason: str


@dataclass(frozen=True)
class Usage:
    """What sstat reports of one job's running steps, summed: CPU time and memory."""

    cpu_s: float
    mem_bytes: int
    max_rss_bytes: int
    tasks: int


class SlurmCommands:
    """Runs Slurm's client commands for the agent. Use from one event loop."""

    def __init__(self, timeout_s: float, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("PATH") or os.defpath
        self.timeout_s = timeout_s
        self.bins = {name: shutil.which(name, path=path) for name in PROGRAMS}
        self.runuser = shutil.which("runuser", path=f"{path}:{SBIN_PATH}")
        self.env = {"PATH": path, "LC_ALL": "C"}
        if env.get("SLURM_CONF"):
            self.env["SLURM_CONF"] = env["SLURM_CONF"]
        #: Pids of the commands running now (``reaper.reap_orphans`` must leave them alone).
        self.inflight: set[int] = set()
        self._accounting: bool | None = None

    @property
    def accounting_known(self) -> bool | None:
        """Whether sacct answers, once asked (None before)."""
        return self._accounting

    def missing(self) -> list[str]:
        """The client programs not found on the agent's PATH."""
        return [name for name, path in self.bins.items() if path is None]

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        pass_fds: Sequence[int] = (),
        as_user: str | None = None,
        timeout_s: float | None = None,
    ) -> Result:
        """Run one command (``argv[0]`` a program name of PROGRAMS, or an absolute path);
        its result whatever its exit status. Raises SlurmUnavailable when it cannot be
        started or runs past the timeout (then it is killed with its process group)."""
        program = self.bins.get(argv[0], argv[0])
        if program is None or not os.path.isabs(program):
            raise SlurmUnavailable(f"{argv[0]} is not installed on this host (not on PATH)")
        full = [program, *argv[1:]]
        if as_user is not None:
            if self.runuser is None:
                raise SlurmUnavailable("runuser (util-linux) is not installed on this host")
            full = [self.runuser, "-u", as_user, "--", *full]
        try:
            proc = await asyncio.create_subprocess_exec(
                *full,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
                cwd="/",
            )
        except OSError as exc:
            raise SlurmUnavailable(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        self.inflight.add(proc.pid)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise SlurmUnavailable(f"{argv[0]} did not answer within {limit:g} s") from None
        finally:
            self.inflight.discard(proc.pid)
        return Result(
            proc.returncode if proc.returncode is not None else -1,
            out[:MAX_OUTPUT].decode(errors="replace"),
            err[:MAX_OUTPUT].decode(errors="replace"),
        )

    # -- queries -------------------------------------------------------------------------

    async def squeue(self, job_ids: Sequence[int]) -> dict[int, QueueRow]:
        """The jobs of ``job_ids`` Slurm still lists (ended ones within ``MinJobAge``), in
        one call. Raises SlurmUnavailable when squeue fails for another reason than ids
        Slurm no longer knows."""
        if not job_ids:
            return {}
        ids = ",".join(str(i) for i in job_ids)
        result = await self.run(["squeue", "-h", "-t", "all", "-j", ids, "-o", SQUEUE_FORMAT])
        if result.rc != 0:
            if INVALID_JOB in result.err:
                return {}  # every one of them is gone from slurmctld's memory
            raise SlurmUnavailable(f"squeue: {result.message()}")
        return parse_squeue(result.out)

    async def show_job(self, job_id: int) -> dict[str, str] | None:
        """``scontrol show job``: its fields, or None when Slurm no longer knows the job.
        Raises SlurmUnavailable."""
        result = await self.run(["scontrol", "-o", "show", "job", str(job_id)])
        if result.rc != 0:
            if INVALID_JOB in result.err:
                return None
            raise SlurmUnavailable(f"scontrol: {result.message()}")
        return parse_scontrol(result.out)

    async def accounting(self) -> bool:
        """Whether ``sacct`` can answer (accounting storage on). Only a definite answer is
        cached (it answered, or said accounting is disabled); a failure (slurmdbd down for a
        while, a timeout) says False for now and is asked again next time."""
        if self._accounting is None:
            try:
                result = await self.run(["sacct", "-n", "-P", "-X", "-j", "1", "-o", "JobID"])
            except SlurmUnavailable:
                return False
            if result.rc == 0 and ACCOUNTING_OFF not in result.err:
                self._accounting = True
            elif ACCOUNTING_OFF in result.err or ACCOUNTING_OFF in result.out:
                self._accounting = False
            else:
                log.info("sacct failed; accounting is asked again later", error=result.message())
                return False
        return self._accounting

    async def sacct(self, job_id: int) -> tuple[str, str] | None:
        """(state, ExitCode) from accounting, or None when it has no such job."""
        result = await self.run(
            ["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "JobID,State,ExitCode"]
        )
        if result.rc != 0:
            raise SlurmUnavailable(f"sacct: {result.message()}")
        return parse_sacct(result.out, job_id)

    async def sstat(self, job_ids: Sequence[int]) -> dict[int, Usage]:
        """The running steps' usage of each job, in one call (jobs without steps, or that
        ended meanwhile, are missing)."""
        if not job_ids:
            return {}
        ids = ",".join(str(i) for i in job_ids)
        fields = "JobID,NTasks,TresUsageInTot,MaxRSS"
        result = await self.run(["sstat", "-a", "-n", "-P", "-j", ids, "-o", fields])
        return parse_sstat(result.out)

    async def scancel(
        self, job_id: int, *, term: bool = False, as_user: str | None = None
    ) -> Result:
        """``scancel --signal=TERM --full ID`` (``term``: every process of the job gets
        SIGTERM, the batch script included), else plain ``scancel ID`` (cancel; SIGKILL
        after the cluster's KillWait). Never send TERM to a pending job: Slurm 22.05's
        scancel then waits for it to start. ``as_user``: run as the job's owner, so that
        Slurm refuses it for any job not theirs."""
        argv = ["scancel", "--signal=TERM", "--full", str(job_id)] if term else ["scancel"]
        if not term:
            argv.append(str(job_id))
        return await self.run(argv, as_user=as_user)

    async def node_names(self, partitions: Sequence[str] = ()) -> list[str]:
        """The names of the cluster's nodes (of ``partitions``, when given), sorted, each
        once, as ``sinfo -N`` lists them. Raises SlurmUnavailable when sinfo fails."""
        argv = ["sinfo", "-h", "-N", "-o", "%N"]
        if partitions:
            argv += ["-p", ",".join(partitions)]
        result = await self.run(argv)
        if result.rc != 0:
            raise SlurmUnavailable(f"sinfo: {result.message()}")
        return sorted({line.strip() for line in result.out.splitlines() if line.strip()})

    async def jobs_with_comment(self, user: str, comment: str) -> list[int]:
        """Ids of ``user``'s jobs whose comment is ``comment`` (a submission whose answer
        was lost)."""
        result = await self.run(["squeue", "-h", "-t", "all", "-u", user, "-o", "%i|%k"])
        if result.rc != 0:
            raise SlurmUnavailable(f"squeue: {result.message()}")
        found = []
        for line in result.out.splitlines():
            job, _, text = line.partition("|")
            if text.strip() == comment and job.strip().isdigit():
                found.append(int(job))
        return found


# -- parsers ---------------------------------------------------------------------------------


def parse_squeue(text: str) -> dict[int, QueueRow]:
    """Lines of ``squeue -o '%i|%T|%P|%N|%r'`` by job id (lines that do not parse, such as
    array tasks, are skipped)."""
    rows = {}
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) != 5 or not parts[0].strip().isdigit():
            continue
        job_id = int(parts[0])
        rows[job_id] = QueueRow(
            job_id, parts[1].strip(), parts[2].strip(), parts[3].strip(), parts[4].strip()
        )
    return rows


_KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z/:_]+)=(\S*)")


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol -o show job`` as key → value (the first of each key)."""
    found: dict[str, str] = {}
    for match in _KEY_VALUE.finditer(text):
        found.setdefault(match.group(1), match.group(2))
    return found


def parse_sacct(text: str, job_id: int) -> tuple[str, str] | None:
    """(state, ExitCode) of ``job_id`` in ``sacct -P -o JobID,State,ExitCode`` output;
    the state's first word (``CANCELLED by 0`` is CANCELLED)."""
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0].strip() == str(job_id):
            state = parts[1].split()[0] if parts[1].split() else ""
            return state, parts[2].strip()
    return None


def parse_exit_code(text: str | None) -> tuple[int | None, int | None]:
    """Slurm's ``ExitCode`` ``exit:signal`` as (exit code, signal); None for what it lacks."""
    if not text:
        return None, None
    code, _, sig = text.partition(":")
    return (
        int(code) if code.isdigit() else None,
        int(sig) if sig.isdigit() else None,
    )


def parse_duration(text: str) -> float | None:
    """Slurm's CPU time ``[D-][HH:]MM:SS[.sss]`` in seconds."""
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    if not 1 <= len(parts) <= 3:
        return None
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return days * 86400 + seconds


_SIZE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int | None:
    """Slurm's sizes (``58492K``, ``1.5G``, ``0``) in bytes."""
    match = re.fullmatch(r"([0-9.]+)([KMGTP]?)", text.strip())
    if match is None:
        return None
    try:
        return int(float(match.group(1)) * _SIZE[match.group(2)])
    except ValueError:
        return None


def parse_sstat(text: str) -> dict[int, Usage]:
    """``sstat -P -o JobID,NTasks,TresUsageInTot,MaxRSS`` summed per job over its steps."""
    usage: dict[int, Usage] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        job = parts[0].split(".")[0]
        if not job.isdigit():
            continue
        tres = dict(item.partition("=")[::2] for item in parts[2].split(",") if "=" in item)
        cpu = parse_duration(tres.get("cpu", "")) or 0.0
        mem = parse_size(tres.get("mem", "")) or 0
        rss = parse_size(parts[3]) or 0
        tasks = int(parts[1]) if parts[1].strip().isdigit() else 0
        old = usage.get(int(job), Usage(0.0, 0, 0, 0))
        usage[int(job)] = Usage(
            old.cpu_s + cpu, old.mem_bytes + mem, max(old.max_rss_bytes, rss), old.tasks + tasks
        )
    return usage
