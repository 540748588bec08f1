"""Resource readings for every supervised job: from its cgroup where it has one
(``cgroup_sampler``: a handful of reads per job), else at a cost close to the floor of
reading /proc, as described here.

The naive way (psutil's ``children(recursive=True)`` per job, then one call per process and
metric) scans every pid of the host once per job, and opens several files per process per
tick. Here:

- one ``listdir('/proc')`` tells which processes are new and which are gone, and is skipped
  when no process was created since the last tick (``/proc/loadavg`` names the newest pid);
- only a *new* process has its ``stat`` read to learn its parent, and so which job it belongs
  to (a job's processes are the descendants of its shim, which is a child subreaper, so
  membership never changes: a process outside every job can't later join one);
- each job process keeps its ``/proc/<pid>/stat`` and ``/proc/<pid>/io`` open, and every tick
  re-reads ``stat`` with one ``pread`` (no path lookup, no open/close). When the process
  ends, the read fails and the files are closed. An open file follows its process, never a
  later process that reuses the pid. At most half of the soft fd limit is used so; past it,
  files are opened when read;
- IO counters are read every ``io_window_s`` (5 s) rather than every tick, and IO rates are
  averages over that window (like ``iostat 5``): at 1 Hz that saves a third of the cost.

So a tick costs one small read per job process (plus a directory listing when processes were
created), whatever else runs on the host; none of it when every job has a cgroup. Blocking;
call it off the event loop. Not thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from argus_agent.jobs.procfs import (
    NUM_THREADS,
    PPID,
    RSS_PAGES,
    START_TICKS,
    STATE,
    STIME,
    UTIME,
    split_stat,
)
from argus_agent.telemetry.cgroup_sampler import CgroupSampler, TreeReading

__all__ = ["HostReading", "JobRef", "Sampler", "TreeReading", "disk_usage_mb"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


#: How often processes outside every job are classified again (catches reused pids).
RECLASSIFY_S = 60.0


def _fd_budget() -> int:
    """How many /proc files the sampler may keep open: half of the soft fd limit."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(0, soft // 2 - 64)


@dataclass(frozen=True)
class JobRef:
    """What the sampler needs to know of a job."""

    batch_id: str
    shim_pid: int
    cwd: str
    #: The job's cgroups (``cgroupfs`` paths dict): read from there, not from /proc.
    cgroup: dict[str, str] | None = None


@dataclass
class HostReading:
    """Host-wide figures at one moment."""

    cpu_pct: float | None
    ram_used_mb: float
    ram_total_mb: float


class _Member:
    """An open job process: its files and the counters of the previous tick."""

    __slots__ = ("batch_id", "cpu", "io", "io_fd", "pid", "start", "stat_fd")

    def __init__(self, pid: int, batch_id: str, stat_fd: int, io_fd: int) -> None:
        self.pid = pid
        self.batch_id = batch_id
        self.stat_fd = stat_fd
        self.io_fd = io_fd
        self.cpu: int | None = None
        self.io: tuple[int, int] | None = None
        self.start: int | None = None

    def close(self) -> None:
        for fd in (self.stat_fd, self.io_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _parse_io(data: bytes) -> tuple[int, int]:
    """(read_bytes, write_bytes) from /proc/<pid>/io."""
    tokens = data.split()
    if tokens[8] == b"read_bytes:" and tokens[10] == b"write_bytes:":
        return int(tokens[9]), int(tokens[11])
    found = dict(zip(tokens[::2], tokens[1::2], strict=False))
    return int(found[b"read_bytes:"]), int(found[b"write_bytes:"])


class Sampler:
    """Reads all jobs' trees and the host each tick; keeps what rates need between ticks."""

    def __init__(self, proc: str = "/proc", *, io_window_s: float = 5.0) -> None:
        self.proc = proc
        self.io_window_s = io_window_s
        self._io_at: float | None = None  # when IO counters were last read
        self._io_rates: dict[str, tuple[float, float]] = {}
        self._seen: set[int] = set()  # pids of the previous listing
        self._last_pid: int | None = None  # the newest pid at that listing
        self._job_of: dict[int, str | None] = {}  # pid -> batch id, None outside every job
        self._members: dict[int, _Member] = {}
        self._shims: dict[int, str] = {}
        self._rescanned_at = time.monotonic()
        self._fd_budget = _fd_budget()
        self._prev_at: float | None = None  # the previous tick
        self._proc_at: float | None = None  # the previous tick of the /proc path
        self._prev_boot_ticks: float = 0.0
        #: The cgroup path, for jobs that have cgroups.
        self.cgroups = CgroupSampler()
        self._host_prev: tuple[int, int] | None = None

    def _reclassify_outsiders(self, keep_jobs: set[str]) -> None:
        self._rescanned_at = time.monotonic()
        for pid, member in list(self._members.items()):
            if member.batch_id not in keep_jobs:
                member.close()
                del self._members[pid]
        self._job_of = {p: j for p, j in self._job_of.items() if j in keep_jobs}
        self._seen &= set(self._job_of)
        self._last_pid = None  # force a listing

    def close(self) -> None:
        """Close every file kept open."""
        self.cgroups.close()
        for member in self._members.values():
            member.close()
        self._members.clear()
        self._job_of.clear()
        self._seen.clear()

    def read(self, jobs: list[JobRef]) -> tuple[HostReading, dict[str, TreeReading]]:
        """One tick: the host and every job (jobs whose shim is gone are left out of the
        /proc path; jobs whose cgroup is gone out of the cgroup path)."""
        now = time.monotonic()
        read_io = self._io_at is None or now - self._io_at >= self.io_window_s - 0.05
        io_elapsed = now - self._io_at if self._io_at is not None else None
        if read_io:
            self._io_at = now
        elapsed = now - self._prev_at if self._prev_at is not None else None
        in_cgroups = {j.batch_id: j.cgroup for j in jobs if j.cgroup}
        readings = self.cgroups.read(in_cgroups, now, elapsed, io_elapsed, read_io)
        by_proc = [j for j in jobs if not j.cgroup]
        if by_proc or self._shims:
            readings.update(self._read_procs(by_proc, now, read_io, io_elapsed))
        self._prev_at = now
        return self._host(), readings

    def _read_procs(
        self, jobs: list[JobRef], now: float, read_io: bool, io_elapsed: float | None
    ) -> dict[str, TreeReading]:
        """The /proc path: one listing when processes were created, one read per process."""
        boot_ticks = _uptime_s(self.proc) * CLK_TCK
        shims = {j.shim_pid: j.batch_id for j in jobs}
        if shims != self._shims:
            # Jobs started or ended: forget the processes of ended jobs, and classify the
            # others outside every job again (a new shim's processes may be among them).
            # Members of continuing jobs keep their files and counters.
            self._shims = shims
            self._reclassify_outsiders(keep_jobs=set(shims.values()))
        elif now - self._rescanned_at >= RECLASSIFY_S:
            # A pid that ended and was reused between two listings would keep its old
            # classification; now and then, classify every outsider again.
            self._reclassify_outsiders(keep_jobs=set(shims.values()))
        if not jobs:
            self._proc_at = None  # a /proc job that comes later starts afresh
            return {}
        last_pid = _last_pid(self.proc)
        if last_pid is None or last_pid != self._last_pid or not self._seen:
            # Processes were created since the last tick: find and classify them.
            self._last_pid = last_pid
            listing = {int(n) for n in os.listdir(self.proc) if n.isdigit()}
            for pid in self._seen - listing:
                self._job_of.pop(pid, None)
                member = self._members.pop(pid, None)
                if member is not None:
                    member.close()
            for pid in listing - self._seen:
                self._classify(pid)
            self._seen = listing
        readings = self._read_members(jobs, now, boot_ticks, read_io, io_elapsed)
        self._prev_boot_ticks = boot_ticks
        self._proc_at = now
        return readings

    # -- membership ----------------------------------------------------------------------

    def _classify(self, pid: int, depth: int = 0) -> str | None:
        """The batch id of the job ``pid`` belongs to (None: none); opens its files if so."""
        if pid in self._job_of:
            return self._job_of[pid]
        if pid in self._shims:
            self._job_of[pid] = None  # the shim itself is not part of the job's tree
            return None
        try:
            with open(f"{self.proc}/{pid}/stat", "rb") as handle:
                ppid = int(split_stat(handle.read())[PPID])
        except (OSError, ValueError, IndexError):
            return None
        if ppid in self._shims:
            job = self._shims[ppid]
        elif ppid <= 1 or depth > 64:
            job = None
        else:
            job = self._classify(ppid, depth + 1)
        self._job_of[pid] = job
        if job is not None:
            self._open(pid, job)
        return job

    def _open(self, pid: int, job: str) -> None:
        """Track a job process, keeping its stat file open while the fd budget allows
        (past it, or on EMFILE, the file is opened at each tick instead)."""
        stat_fd = io_fd = -1
        if 2 * len(self._members) < self._fd_budget:
            try:
                stat_fd = os.open(f"{self.proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
                io_fd = os.open(f"{self.proc}/{pid}/io", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # no privilege for another user's io file, or EMFILE: read by path
        self._members[pid] = _Member(pid, job, stat_fd, io_fd)

    # -- readings ------------------------------------------------------------------------

    def _read_members(
        self,
        jobs: list[JobRef],
        now: float,
        boot_ticks: float,
        read_io: bool,
        io_elapsed: float | None,
    ) -> dict[str, TreeReading]:
        totals = {
            j.batch_id: [set(), 0, 0, 0, 0, 0, False] for j in jobs if j.shim_pid in self._seen
        }
        elapsed = now - self._proc_at if self._proc_at is not None else None
        pread = os.pread
        fresh_after = self._prev_boot_ticks if self._proc_at is not None else float("inf")
        by_job: dict[str, list[_Member]] = {}
        for member in self._members.values():
            by_job.setdefault(member.batch_id, []).append(member)
        dead: list[_Member] = []
        for batch_id, acc in totals.items():
            pids: set[int] = acc[0]
            threads = rss = cpu_delta = 0
            for member in by_job.get(batch_id, ()):
                try:
                    if member.stat_fd >= 0:
                        data = pread(member.stat_fd, 512, 0)
                    else:
                        with open(f"{self.proc}/{member.pid}/stat", "rb") as handle:
                            data = handle.read()
                    rest = split_stat(data)
                    if member.start is None:
                        member.start = int(rest[START_TICKS])
                    elif int(rest[START_TICKS]) != member.start:
                        raise ValueError("pid reused")  # only possible without a kept fd
                except (OSError, ValueError):
                    dead.append(member)
                    continue
                if rest[STATE] in (b"Z", b"X"):
                    continue
                cpu = int(rest[UTIME]) + int(rest[STIME])
                pids.add(member.pid)
                threads += int(rest[NUM_THREADS])
                rss += int(rest[RSS_PAGES])
                if member.cpu is not None:
                    cpu_delta += cpu - member.cpu
                elif member.start >= fresh_after:
                    cpu_delta += cpu  # started since the last tick: all its CPU time is new
                member.cpu = cpu
                if read_io:
                    self._read_io(member, acc)
            acc[1], acc[2], acc[3] = threads, rss, cpu_delta
        for member in dead:
            member.close()
            del self._members[member.pid]
            # Let a process that reuses the pid be classified afresh.
            self._job_of.pop(member.pid, None)
            self._seen.discard(member.pid)
            self._last_pid = None
        readings = {}
        for batch_id, (pids, threads, rss, cpu, io_r, io_w, io_known) in totals.items():
            rate = elapsed if elapsed and elapsed > 0 else None
            if read_io and io_known and io_elapsed:
                self._io_rates[batch_id] = (
                    round(max(0, io_r) / io_elapsed, 1),
                    round(max(0, io_w) / io_elapsed, 1),
                )
            io_rates = self._io_rates.get(batch_id)
            readings[batch_id] = TreeReading(
                pids=pids,
                num_procs=len(pids),
                num_threads=threads,
                rss_bytes=rss * PAGE_SIZE,
                cpu_pct=round(max(0, cpu) / CLK_TCK / rate * 100, 1) if rate else None,
                io_read_bps=io_rates[0] if io_rates else None,
                io_write_bps=io_rates[1] if io_rates else None,
            )
        for gone in set(self._io_rates) - set(totals):
            del self._io_rates[gone]
        return readings

    def _read_io(self, member: _Member, acc: list) -> None:
        try:
            if member.io_fd >= 0:
                io = _parse_io(os.pread(member.io_fd, 512, 0))
            else:
                with open(f"{self.proc}/{member.pid}/io", "rb") as handle:
                    io = _parse_io(handle.read())
        except (OSError, ValueError, IndexError, KeyError):
            return  # e.g. another user's process without privilege: no IO figures
        if member.io is not None:
            acc[4] += io[0] - member.io[0]
            acc[5] += io[1] - member.io[1]
            acc[6] = True
        member.io = io

    def _host(self) -> HostReading:
        total, idle = _host_cpu_ticks(self.proc)
        cpu_pct = None
        if self._host_prev is not None:
            d_total = total - self._host_prev[0]
            d_idle = idle - self._host_prev[1]
            if d_total > 0:
                cpu_pct = round(100 * (d_total - d_idle) / d_total, 1)
        self._host_prev = (total, idle)
        used, ram_total = _meminfo(self.proc)
        return HostReading(
            cpu_pct=cpu_pct, ram_used_mb=round(used, 1), ram_total_mb=round(ram_total, 1)
        )


def _host_cpu_ticks(proc: str) -> tuple[int, int]:
    with open(f"{proc}/stat", "rb") as handle:
        fields = handle.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), idle


def _meminfo(proc: str) -> tuple[float, float]:
    with open(f"{proc}/meminfo", "rb") as handle:
        data = handle.read()
    total = _meminfo_kib(data, b"MemTotal:") * 1024
    available = _meminfo_kib(data, b"MemAvailable:") * 1024
    return (total - available) / MIB, total / MIB


def _meminfo_kib(data: bytes, key: bytes) -> int:
    """One ``Key:  123 kB`` value of /proc/meminfo (0 when absent): found, not looped to,
    as this runs every tick."""
    at = data.find(key)
    if at < 0:
        return 0
    return int(data[at + len(key) : data.index(b"\n", at)].split()[0])


def _last_pid(proc: str) -> int | None:
    """The pid of the most recently created process (``/proc/loadavg``, last field): while it
    stays the same, no process was created and no listing of /proc is needed."""
    try:
        with open(f"{proc}/loadavg", "rb") as handle:
            return int(handle.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _uptime_s(proc: str = "/proc") -> float:
    with open(f"{proc}/uptime", "rb") as handle:
        return float(handle.read().split()[0])


def disk_usage_mb(path: str) -> tuple[float, float] | None:
    """(free, total) MiB of the filesystem holding ``path``, or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return round(st.f_bavail * st.f_frsize / MIB, 1), round(st.f_blocks * st.f_frsize / MIB, 1)
