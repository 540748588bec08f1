"""Benchmark: the resource sampler three ways, in one run: per-job cgroups, one pass over
/proc, and the naive psutil approach.

Builds 8 fake jobs of 100 processes each. Each job hangs below a stand-in for its shim (a
parent outside the job, as the real shim is): the job's first process joins a cgroup of its
own (made like the agent makes them, ``jobs.cgroups.Cgroups``, under a scratch subtree of
the cgroup v2 hierarchy and, on a hybrid host, of the v1 memory and blkio hierarchies) and
forks the other 99, which sleep. Then one sampling tick of all jobs is timed, over many
ticks:

- cgroups: ``telemetry.sampler.Sampler`` with each job's cgroup paths (a handful of reads
  per job: ``cgroup.procs``, ``cgroup.threads``, ``cpu.stat``, ``memory.stat``, the peak;
  IO every 5 s);
- /proc: the same sampler without cgroup paths (one ``stat`` read per process, ``io`` every
  5 s, a listing of /proc when processes were created);
- naive: per job ``psutil.Process(root).children(recursive=True)`` and, per process,
  ``cpu_times``, ``memory_info``, ``num_threads`` and ``io_counters`` (what an agent written
  the obvious way does).

CPU time is the process's own (user + system), so other load on the machine does not count;
the two sampler paths are ticked at 1 Hz, as configured in production, and averaged (mean)
over all ticks, so the IO counters read every 5th tick are included; naive is ticked back
to back. Needs root and a writable cgroup v2 hierarchy (else the cgroup column is skipped,
saying why). Usage: python bench/sampler.py [--jobs 8] [--procs 100] [--ticks 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import time
import uuid
from collections.abc import Callable

import psutil

from argus_agent.config import JobSettings
from argus_agent.jobs import cgroupfs
from argus_agent.jobs.cgroups import Cgroups, mounts
from argus_agent.logsetup import configure
from argus_agent.telemetry.sampler import JobRef, Sampler


def _spawn_job(procs: int, cgroup: dict[str, str] | None) -> int:
    """A stand-in shim whose one child joins ``cgroup`` and forks procs - 1 more; returns
    the stand-in's pid."""
    shim = os.fork()
    if shim:
        return shim
    os.setsid()
    if os.fork() == 0:
        if cgroup:
            cgroupfs.place(cgroup)
        for _ in range(procs - 1):
            if os.fork() == 0:
                signal.pause()
                os._exit(0)
        signal.pause()
        os._exit(0)
    signal.pause()
    os._exit(0)


def _naive(roots: list[int]) -> dict[int, tuple]:
    out = {}
    for root in roots:
        totals = [0.0, 0, 0, 0, 0, 0]
        procs = psutil.Process(root).children(recursive=True)
        for proc in procs:
            try:
                cpu = proc.cpu_times()
                totals[0] += cpu.user + cpu.system
                totals[1] += proc.memory_info().rss
                totals[2] += proc.num_threads()
                io = proc.io_counters()
                totals[3] += io.read_bytes
                totals[4] += io.write_bytes
                totals[5] += 1
            except psutil.Error:
                continue
        out[root] = tuple(totals)
    return out


def _cpu_per_tick(fn: Callable[[], object], ticks: int, hz: float | None = None) -> list[float]:
    """CPU time of each call; with ``hz``, calls are paced like a real sampler's ticks (so
    work done every few ticks, like reading IO counters, is counted at its true rate)."""
    samples = []
    next_at = time.monotonic()
    for _ in range(ticks):
        if hz:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1 / hz
        started = time.process_time()
        fn()
        samples.append(time.process_time() - started)
    return samples


def _scratch_cgroups() -> tuple[Cgroups | None, str | None, str]:
    """A scratch cgroup subtree for the jobs, set up as the agent sets up its own; with why
    there is none."""
    v2 = sorted(
        (m for m in mounts() if m[0] == "cgroup2"),
        key=lambda m: (m[1] != "/sys/fs/cgroup", m[1] != "/sys/fs/cgroup/unified"),
    )
    if not v2:
        return None, None, "no cgroup v2 hierarchy"
    root = os.path.join(v2[0][1], f"argus-bench-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(root)
    except OSError as exc:
        return None, None, f"cannot make {root}: {exc.strerror}"
    cgroups = Cgroups(JobSettings(cgroup_root=root))
    cgroups.start()
    if not cgroups.enabled:
        os.rmdir(root)
        return None, None, str(cgroups.why)
    return cgroups, root, cgroups.mode


def _remove_subtree(cgroups: Cgroups, root: str) -> None:
    dirs = [os.path.dirname(d) for d in cgroups.v1.values()]  # <base>/jobs -> <base>
    for path in [*(os.path.join(d, "jobs") for d in dirs), *dirs]:
        cgroupfs.remove({"x": path})
    cgroupfs.remove({"v2": os.path.join(root, "jobs")})
    cgroupfs.remove({"v2": root})


def _row(label: str, values: list[float]) -> str:
    mean = statistics.mean(values) * 1000
    p95 = sorted(values)[int(len(values) * 0.95) - 1] * 1000
    return f"{label:<34} {mean:12.3f} {p95:8.3f} {mean / 10:15.3f}"


def main(jobs: int, procs: int, ticks: int) -> None:
    configure("warning")
    cgroups, root, mode = _scratch_cgroups()
    paths = [cgroups.create_job(f"bench-{i}") if cgroups else None for i in range(jobs)]
    shims = [_spawn_job(procs, p) for p in paths]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            sizes = [len(psutil.Process(s).children(recursive=True)) for s in shims]
            if all(n == procs for n in sizes):
                break
            time.sleep(0.1)
        by_proc = Sampler()
        proc_refs = [JobRef(f"job-{i}", s, "/") for i, s in enumerate(shims)]
        _, trees = by_proc.read(proc_refs)
        assert all(t.num_procs == procs for t in trees.values()), trees
        proc_ticks = _cpu_per_tick(lambda: by_proc.read(proc_refs), ticks, hz=1.0)
        cgroup_ticks = None
        if cgroups:
            by_cgroup = Sampler()
            cgroup_refs = [JobRef(f"job-{i}", s, "/", paths[i]) for i, s in enumerate(shims)]
            _, trees = by_cgroup.read(cgroup_refs)
            assert all(t.num_procs == procs for t in trees.values()), trees
            cgroup_ticks = _cpu_per_tick(lambda: by_cgroup.read(cgroup_refs), ticks, hz=1.0)
        roots = [psutil.Process(s).children()[0].pid for s in shims]
        naive = _cpu_per_tick(lambda: _naive(roots), ticks)
        host_procs = len(psutil.pids())
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}, "
            f"Python {platform.python_version()}; {jobs} jobs x {procs} processes, "
            f"{host_procs} processes on the host; {ticks} ticks each; cgroups: {mode}"
        )
        print()
        print(f"{'sampler':<34} {'CPU ms/tick':>12} {'p95 ms':>8} {'% core at 1 Hz':>15}")
        if cgroup_ticks:
            print(_row("argus-agent, cgroups", cgroup_ticks))
        print(_row("argus-agent, one /proc pass", proc_ticks))
        print(_row("naive psutil per job", naive))
        if cgroup_ticks:
            cg = statistics.mean(cgroup_ticks)
            print(f"{'/proc / cgroups':<34} {statistics.mean(proc_ticks) / cg:11.1f}x")
            print(f"{'naive / cgroups':<34} {statistics.mean(naive) / cg:11.1f}x")
        ratio = statistics.mean(naive) / statistics.mean(proc_ticks)
        print(f"{'naive / /proc':<34} {ratio:11.1f}x")
    finally:
        for shim in shims:
            os.killpg(shim, signal.SIGKILL)
        for shim in shims:
            os.waitpid(shim, 0)
        if cgroups and root:
            for p in paths:
                if p:
                    cgroupfs.kill(p["v2"])
            time.sleep(0.2)
            for p in paths:
                if p:
                    cgroupfs.remove(p)
            _remove_subtree(cgroups, root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--procs", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    main(args.jobs, args.procs, args.ticks)
