"""Resource readings for every supervised job, in one pass over /proc per tick.

The naive way (psutil's ``children(recursive=True)`` per job, then one call per process and
metric) scans every pid of the host once per job. Here one pass reads ``/proc/<pid>/stat``
of every process once, builds the parent → children map, and walks each job's tree from its
shim (the shims are child subreapers, so a job's whole tree hangs below its shim). Only the
processes of job trees get a second read (``/proc/<pid>/io``). Blocking; call it off the
event loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


@dataclass(frozen=True)
class JobRef:
    """What the sampler needs to know of a job."""

    batch_id: str
    shim_pid: int
    cwd: str


@dataclass
class TreeReading:
    """One job's process tree at one moment, with rates since the previous reading."""

    pids: set[int]
    num_procs: int
    num_threads: int
    rss_bytes: int
    cpu_pct: float | None
    io_read_bps: float | None
    io_write_bps: float | None


@dataclass
class HostReading:
    """Host-wide figures at one moment."""

    cpu_pct: float | None
    ram_used_mb: float
    ram_total_mb: float


@dataclass
class _ProcStat:
    ppid: int
    state: str
    cpu_ticks: int
    threads: int
    rss_pages: int
    start_ticks: int


@dataclass
class _JobHistory:
    at: float
    boot_ticks: float  # clock ticks since boot at the reading
    cpu: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, start) → ticks
    io: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


def scan_processes(proc: str = "/proc") -> dict[int, _ProcStat]:
    """Every process's stat line, parsed (one pass)."""
    table: dict[int, _ProcStat] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"{proc}/{name}/stat", os.O_RDONLY)
        except OSError:
            continue
        try:
            data = os.read(fd, 1024)
        except OSError:
            continue
        finally:
            os.close(fd)
        # fields after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt
        # majflt cmajflt utime stime cutime cstime priority nice threads itreal starttime
        # vsize rss
        rest = data[data.rindex(b")") + 2 :].split(b" ", 23)
        table[int(name)] = _ProcStat(
            ppid=int(rest[1]),
            state=rest[0].decode(),
            cpu_ticks=int(rest[11]) + int(rest[12]),
            threads=int(rest[17]),
            rss_pages=int(rest[21]),
            start_ticks=int(rest[19]),
        )
    return table


def _io_bytes(pid: int, proc: str) -> tuple[int, int] | None:
    try:
        with open(f"{proc}/{pid}/io", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    read = write = 0
    for line in data.split(b"\n"):
        if line.startswith(b"read_bytes:"):
            read = int(line[11:])
        elif line.startswith(b"write_bytes:"):
            write = int(line[12:])
    return read, write


def _host_cpu_ticks(proc: str) -> tuple[int, int]:
    with open(f"{proc}/stat", "rb") as handle:
        fields = handle.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), idle


def _meminfo(proc: str) -> tuple[float, float]:
    total = available = 0
    with open(f"{proc}/meminfo", "rb") as handle:
        for line in handle:
            if line.startswith(b"MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith(b"MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return (total - available) / MIB, total / MIB


class Sampler:
    """Reads all jobs' trees and the host each tick; keeps what rates need between ticks."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._history: dict[str, _JobHistory] = {}
        self._host_prev: tuple[int, int] | None = None

    def read(self, jobs: list[JobRef]) -> tuple[HostReading, dict[str, TreeReading]]:
        """One tick: the host and every job's tree (jobs whose shim is gone are left out)."""
        now = time.monotonic()
        boot_ticks = _uptime_s(self.proc) * CLK_TCK
        table = scan_processes(self.proc)
        children: dict[int, list[int]] = {}
        for pid, stat in table.items():
            children.setdefault(stat.ppid, []).append(pid)
        readings = {}
        for job in jobs:
            if job.shim_pid not in table:
                continue
            readings[job.batch_id] = self._tree(job, table, children, now, boot_ticks)
        for gone in set(self._history) - {j.batch_id for j in jobs}:
            del self._history[gone]
        return self._host(), readings

    def _tree(
        self,
        job: JobRef,
        table: dict[int, _ProcStat],
        children: dict[int, list[int]],
        now: float,
        boot_ticks: float,
    ) -> TreeReading:
        pids: set[int] = set()
        stack = list(children.get(job.shim_pid, ()))
        while stack:
            pid = stack.pop()
            if table[pid].state in ("Z", "X"):
                continue
            pids.add(pid)
            stack.extend(children.get(pid, ()))
        prev = self._history.get(job.batch_id)
        history = _JobHistory(at=now, boot_ticks=boot_ticks)
        threads = rss = 0
        cpu_delta = 0
        io_read = io_write = 0
        io_known = False
        for pid in pids:
            stat = table[pid]
            threads += stat.threads
            rss += stat.rss_pages
            key = (pid, stat.start_ticks)
            history.cpu[key] = stat.cpu_ticks
            if prev is not None:
                if key in prev.cpu:
                    cpu_delta += stat.cpu_ticks - prev.cpu[key]
                elif stat.start_ticks >= prev.boot_ticks:
                    cpu_delta += stat.cpu_ticks  # started since the last tick: all of it
            io = _io_bytes(pid, self.proc)
            if io is not None:
                history.io[key] = io
                if prev is not None and key in prev.io:
                    io_known = True
                    io_read += max(0, io[0] - prev.io[key][0])
                    io_write += max(0, io[1] - prev.io[key][1])
        self._history[job.batch_id] = history
        cpu_pct = io_rbps = io_wbps = None
        if prev is not None and now > prev.at:
            elapsed = now - prev.at
            cpu_pct = round(max(0, cpu_delta) / CLK_TCK / elapsed * 100, 1)
            if io_known:
                io_rbps = round(io_read / elapsed, 1)
                io_wbps = round(io_write / elapsed, 1)
        return TreeReading(
            pids=pids,
            num_procs=len(pids),
            num_threads=threads,
            rss_bytes=rss * PAGE_SIZE,
            cpu_pct=cpu_pct,
            io_read_bps=io_rbps,
            io_write_bps=io_wbps,
        )

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
