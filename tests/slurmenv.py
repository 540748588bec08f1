"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's
packages, started by hand as root in a private directory, stopped and cleaned after.

:class:`SlurmCluster` writes ``slurm.conf`` and ``cgroup.conf`` (the lines measured in
``../shared/SLURM_SINGLE_NODE.md``), a private munge key and socket (so it never touches,
nor depends on, a munged or Slurm the machine may already run), picks free ports, starts
the three daemons in the foreground as children of this process, and waits until the node
is idle and slurmctld ran its first scheduler cycle (``sdiag``: jobs submitted before it
stay PENDING for up to 3 s). ``stop`` cancels every job, ends slurmstepd and every process
the jobs left (in Slurm's cgroups, where a SIGKILLed daemon leaves them), stops the daemons,
removes the cgroups Slurm made and the directory. Job ids start at a random ``FirstJobId``,
so two clusters one after the other never hand out the same ids.

Fixtures (wired in ``tests/conftest.py``):

- ``slurm_cluster`` (session): the cluster, started once (~3 s) for the session;
- ``slurm``: the same cluster for one test; at the test's end every job still in the queue
  is cancelled and the test fails if it left one (a job's processes would outlive it).

Where the machine cannot run one (not root, packages missing) a test that needs it is
skipped with the reason; in CI (``CI=true``, ``.ci/run`` installs the packages) it fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from argus_agent.config import Settings
from tests.leftovers import process_table

#: The programs a cluster needs (Debian: slurmctld, slurmd, slurm-client, munge).
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sdiag")
#: The cgroup v1 controllers ``proctrack/cgroup`` + ``task/cgroup`` use on a hybrid host.
V1_CONTROLLERS = ("freezer", "memory", "cpuset", "devices")
CGROUP_FS = Path("/sys/fs/cgroup")
START_TIMEOUT_S = 20.0
#: Partitions of the cluster: the default one, and a second one for resource tests.
PARTITIONS = ("debug", "second")
#: How long finished jobs stay visible to scontrol/squeue (slurm.conf ``MinJobAge``).
MIN_JOB_AGE_S = 300
#: Seconds between a scancel's SIGTERM and its SIGKILL (slurm.conf ``KillWait``).
KILL_WAIT_S = 2


def unavailable() -> str | None:
    """Why this machine cannot run a test cluster, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (munged, slurmctld and slurmd are started by the test as root)"
    missing = [p for p in PROGRAMS if shutil.which(p, path=_PATH) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y "
            "--no-install-recommends slurmctld slurmd slurm-client munge"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge package's user 'munge' does not exist"
    return None


def require_slurm() -> None:
    """Skip the test (fail it in CI) when the machine cannot run a test cluster."""
    why = unavailable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm tests must run in CI, but {why}", pytrace=False)
    pytest.skip(f"no Slurm here: {why}")


_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _meminfo_mb() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _v1_cgroups() -> bool:
    """Whether the v1 hierarchies ``proctrack/cgroup`` needs are mounted (hybrid hosts)."""
    return all((CGROUP_FS / c / "cgroup.procs").exists() for c in V1_CONTROLLERS)


@dataclass
class SlurmCluster:
    """One test cluster in ``root`` (see the module doc). Blocking; not thread-safe."""

    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    first_job_id: int = field(default_factory=lambda: random.randrange(10_000, 9_000_000))
    #: Whether jobs run in cgroups (OOM kills reported as OUT_OF_MEMORY); False where the
    #: host has no cgroup v1 hierarchies (then proctrack/linuxproc: RSS polling).
    cgroups: bool = field(default_factory=_v1_cgroups)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    memory_mb: int = field(default_factory=lambda: max(256, _meminfo_mb() - 512))
    #: More slurm.conf lines (the benchmark's ``SlurmdParameters=config_overrides``, to
    #: declare more CPUs than the machine has).
    extra_conf: list[str] = field(default_factory=list)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _cgroups_before: set[Path] = field(default_factory=set)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment a Slurm client needs to reach this cluster (``SLURM_CONF``)."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def jobcomp(self) -> Path:
        return self.root / "state" / "jobcomp.txt"

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait until jobs are
        scheduled. Raises RuntimeError (with the daemons' logs) when it does not come up;
        what was started is stopped again first."""
        self._cgroups_before = set(self._slurm_cgroups())
        try:
            self._write_files()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        munge = pwd.getpwnam("munge")
        self.root.chmod(0o755)  # munged (user munge) and job users reach conf and socket
        for sub, mode in (("etc", 0o755), ("state", 0o700), ("spool", 0o755), ("log", 0o755)):
            (self.root / sub).mkdir(mode=mode, exist_ok=True)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        ctld_port, slurmd_port = _free_port(), _free_port()
        track = (
            ["ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup"]
            if self.cgroups
            else ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none"]
        )
        mem_per_cpu = self.memory_mb // self.cpus
        lines = [
            f"ClusterName=argus{self.first_job_id}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_dir / 'munge.socket'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={mem_per_cpu}",
            "SchedulerParameters=batch_sched_delay=0",
            *track,
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=task=2",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            f"MinJobAge={MIN_JOB_AGE_S}",
            f"KillWait={KILL_WAIT_S}",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            f"FirstJobId={self.first_job_id}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'state' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'state' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITIONS[0]} Nodes={self.node} Default=YES MaxTime=INFINITE "
            "State=UP",
            f"PartitionName={PARTITIONS[1]} Nodes={self.node} MaxTime=INFINITE State=UP",
            *self.extra_conf,
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)
        # cgroup/v2 is fatal on a hybrid host ("Hybrid mode is not supported").
        cgroup_conf = ["CgroupPlugin=cgroup/v1", f"CgroupMountpoint={CGROUP_FS}"]
        if self.cgroups:
            cgroup_conf.append("ConstrainRAMSpace=yes")
        (self.root / "etc" / "cgroup.conf").write_text("\n".join(cgroup_conf) + "\n")
        self.jobcomp.touch(mode=0o644)

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                f"--socket={munge_dir / 'munge.socket'}",
                f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            user="munge",
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (munge_dir / "munge.socket").exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._tail(munge_dir / 'munged.log')}")
            time.sleep(0.02)

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        # A clean environment: no pytest marker (the leftover guard must not take slurmstepd
        # for a test's process; jobs carry the marker through the agent's environment).
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (kept for the process)
        try:
            self._procs[name] = subprocess.Popen(
                argv,
                env={"PATH": _PATH, "LC_ALL": "C.UTF-8", **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                start_new_session=True,
            )
        finally:
            out.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self._logs()}")
            state = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            cycles = self.run(["sdiag"], check=False)
            last = state.stdout.strip()
            if set(last.split()) == {"idle"} and _scheduler_cycles(cycles.stdout) >= 1:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the test cluster did not become ready (node {last!r}): {self._logs()}")

    # -- use -----------------------------------------------------------------------------

    def run(
        self, argv: list[str], *, check: bool = True, user: str | None = None, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (as ``user``, via runuser)."""
        prefix = ["runuser", "-u", user, "--"] if user else []
        env = {"PATH": _PATH, "LC_ALL": "C.UTF-8", **self.env}
        return subprocess.run(
            [*prefix, *argv],
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
            **kwargs,  # type: ignore[arg-type]
        )

    def submit(self, *options: str, script: str = "sleep 300", user: str | None = None) -> int:
        """``sbatch --parsable`` a job directly (not through an agent); its job id."""
        done = self.run(
            ["sbatch", "--parsable", "--output=/dev/null", *options],
            input=f"#!/bin/sh\n{script}\n",
            user=user,
        )
        return int(done.stdout.strip().split(";")[0])

    def queue(self) -> dict[int, str]:
        """Every job Slurm still lists: id → state (ended ones too, within MinJobAge)."""
        out = self.run(["squeue", "-h", "-t", "all", "-o", "%i %T"]).stdout
        return {int(i): s for i, s in (line.split() for line in out.splitlines() if line)}

    def active(self) -> dict[int, str]:
        """Jobs that have not ended (pending, running, completing, …)."""
        ended = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        ended |= {"PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        return {i: s for i, s in self.queue().items() if s not in ended}

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job ID`` as a dict (the first value of each key)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        info: dict[str, str] = {}
        for word in out.split():
            key, _, value = word.partition("=")
            info.setdefault(key, value)
        return info

    def cancel(self, job_id: int, timeout: float = 15.0) -> None:
        """Cancel one job and wait until it has ended."""
        self.run(["scancel", str(job_id)])
        deadline = time.monotonic() + timeout
        while job_id in self.active() and time.monotonic() < deadline:
            time.sleep(0.05)

    def cancel_all(self, timeout: float = 15.0) -> list[int]:
        """Cancel every job that has not ended and wait until none is left, nor a
        slurmstepd; the ids that were still active."""
        active = list(self.active())
        if active:
            self.run(["scancel", "--signal=KILL", "--full", *map(str, active)], check=False)
            self.run(["scancel", *map(str, active)], check=False)
        deadline = time.monotonic() + timeout
        while (self.active() or self._stepds()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return active

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, end every process of the cluster and its jobs, remove the
        cgroups Slurm made and the cluster's directory. Idempotent; never raises."""
        with contextlib.suppress(Exception):
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                self.cancel_all(timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._procs.clear()
        # slurmstepd and the jobs survive their daemons (SIGKILLed, or a cancel that timed
        # out): kill them, whatever cgroup they are in.
        self._kill_cgroup_members()
        for stepd in self._stepds():
            with contextlib.suppress(OSError):
                os.kill(stepd, signal.SIGKILL)
        self._remove_cgroups()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stepds(self) -> list[int]:
        """slurmstepd processes of this cluster (their spool dir is ours)."""
        found = []
        for proc in process_table().values():
            if proc.comm == "slurmstepd" and not proc.dead:
                with contextlib.suppress(OSError):
                    cwd = os.readlink(f"/proc/{proc.pid}/cwd")
                    if cwd.startswith(str(self.root)):
                        found.append(proc.pid)
        return found

    def _slurm_cgroups(self) -> list[Path]:
        """The cgroup directories Slurm makes: ``slurm`` (or ``slurm_<node>``) in each v1
        hierarchy."""
        found = []
        for controller in V1_CONTROLLERS:
            for name in ("slurm", f"slurm_{self.node}"):
                path = CGROUP_FS / controller / name
                if path.is_dir():
                    found.append(path)
        return found

    def _kill_cgroup_members(self) -> None:
        for base in self._slurm_cgroups():
            if base in self._cgroups_before:
                continue  # another Slurm's: not ours to touch
            for dirpath, _dirs, _files in os.walk(base):
                with contextlib.suppress(OSError, ValueError):
                    pids = (Path(dirpath) / "cgroup.procs").read_text().split()
                    if (Path(dirpath) / "freezer.state").exists():
                        (Path(dirpath) / "freezer.state").write_text("THAWED")
                    for pid in map(int, pids):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)

    def _remove_cgroups(self) -> None:
        deadline = time.monotonic() + 5
        for base in self._slurm_cgroups():
            if base in self._cgroups_before:
                continue
            while base.exists() and time.monotonic() < deadline:
                for dirpath, _dirs, _files in os.walk(base, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
                if base.exists():
                    time.sleep(0.05)

    # -- diagnostics ---------------------------------------------------------------------

    @staticmethod
    def _tail(path: Path, size: int = 1500) -> str:
        try:
            return path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def _logs(self) -> str:
        names = ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out")
        return "; ".join(f"{n}: {self._tail(self.root / 'log' / n, 800)}" for n in names)


def _scheduler_cycles(sdiag: str) -> int:
    """``Total cycles`` of the main scheduler in ``sdiag``'s output (0 when absent)."""
    for line in sdiag.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Total cycles":
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


@contextlib.contextmanager
def started_cluster(**options: Any) -> Iterator[SlurmCluster]:
    """A started test cluster in a fresh directory under /tmp, stopped and removed after.
    (pytest's basetemp is private to root: munged and job users could not reach it.)
    ``options``: SlurmCluster fields (``cpus``, ``cgroups``, ``extra_conf``…)."""
    root = Path(tempfile.mkdtemp(prefix="argus-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The session's test cluster (started at the first test that asks for it)."""
    require_slurm()
    with started_cluster() as cluster:
        yield cluster


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The test cluster for one test: jobs the test left in the queue are cancelled at its
    end, and fail it."""
    yield slurm_cluster
    left = slurm_cluster.cancel_all()
    if left:
        pytest.fail(f"the test left Slurm job(s) {left} in the queue (cancelled now)", False)


#: Settings of an agent whose launcher is Slurm, polling fast (for tests).
AGENT_FAST = {"launcher": "slurm", "slurm_poll_s": 0.2, "slurm_usage_interval_s": 5.0}


@pytest.fixture
def slurm_settings(
    slurm: SlurmCluster,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Callable[..., Settings]:
    """Settings of an agent whose launcher is this cluster (``SLURM_CONF`` in its env).
    Batches that record no working directory run in the test's (where their output
    directories go), not in the run-as user's home."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    default_cwd = tmp_path / "default-cwd"
    default_cwd.mkdir()

    def build(*, jobs: dict | None = None, **sections: dict) -> Settings:
        jobs = {**AGENT_FAST, "default_cwd": str(default_cwd), **(jobs or {})}
        return make_settings(jobs=jobs, **sections)

    return build
