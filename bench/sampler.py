"""Benchmark: the resource sampler against the naive psutil approach, in one run.

Builds 8 fake jobs of 100 processes each (a parent and 99 sleeping children, so a job's
tree hangs below its parent like it hangs below a shim) and times one sampling tick of all
jobs, both ways, over many ticks:

- argus-agent: one pass over /proc for all jobs (``telemetry.sampler.Sampler``);
- naive: per job ``psutil.Process(root).children(recursive=True)`` and, per process,
  ``cpu_times``, ``memory_info``, ``num_threads`` and ``io_counters`` (what an agent written
  the obvious way does).

CPU time is the process's own (user + system), so other load on the machine does not count;
ours is ticked at 1 Hz, as configured in production, and averaged (mean) over all ticks.
Usage: python bench/sampler.py [--jobs 8] [--procs 100] [--ticks 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import time

import psutil

from argus_agent.telemetry.sampler import JobRef, Sampler


def _spawn_job(procs: int) -> int:
    """A parent with procs - 1 sleeping children; returns the parent's pid."""
    pid = os.fork()
    if pid:
        return pid
    os.setsid()
    for _ in range(procs - 1):
        if os.fork() == 0:
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


def _cpu_per_tick(fn, ticks: int, hz: float | None = None) -> list[float]:
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


def main(jobs: int, procs: int, ticks: int) -> None:
    roots = [_spawn_job(procs) for _ in range(jobs)]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            sizes = [len(psutil.Process(r).children(recursive=True)) for r in roots]
            if all(s == procs - 1 for s in sizes):
                break
            time.sleep(0.1)
        sampler = Sampler()
        refs = [JobRef(f"job-{i}", root, "/") for i, root in enumerate(roots)]
        _, trees = sampler.read(refs)
        # The sampler counts a job's tree below its shim; here the parent stands in for the
        # shim, so each tree holds procs - 1 processes.
        assert all(t.num_procs == procs - 1 for t in trees.values()), trees
        ours = _cpu_per_tick(lambda: sampler.read(refs), ticks, hz=1.0)
        naive = _cpu_per_tick(lambda: _naive(roots), ticks)
        host_procs = len(psutil.pids())
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
            f"{platform.python_version()}; {jobs} jobs x {procs} processes, {host_procs} "
            f"processes on the host; {ticks} ticks each"
        )
        print()
        print(f"{'sampler':<32} {'CPU ms/tick':>12} {'p95 ms':>8} {'% core at 1 Hz':>15}")
        for label, values in (
            ("argus-agent (one /proc pass)", ours),
            ("naive psutil per job", naive),
        ):
            mean = statistics.mean(values) * 1000
            p95 = sorted(values)[int(len(values) * 0.95) - 1] * 1000
            print(f"{label:<32} {mean:12.2f} {p95:8.2f} {mean / 10:15.2f}")
        ratio = statistics.mean(naive) / statistics.mean(ours)
        print(f"{'naive / argus-agent':<32} {ratio:11.1f}x")
    finally:
        for root in roots:
            os.killpg(root, signal.SIGKILL)
        for root in roots:
            os.waitpid(root, 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--procs", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    main(args.jobs, args.procs, args.ticks)
