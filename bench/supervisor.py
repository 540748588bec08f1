"""Benchmark: what a per-job supervisor (shim) costs.

Prints a table of
- memory per shim (RSS, and USS/PSS, which count only what the shim does not share), and
- launch-to-exec latency: from `JobManager.launch()` being called to its return, which is
  when the job's exec is known to have succeeded, compared with starting the same command
  directly with asyncio (no supervisor, the baseline), measured in the same run.

Usage: python bench/supervisor.py [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from argus_agent.config import JobSettings
from argus_agent.jobs.policy import Identity
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.logsetup import configure

ARGV = ("/bin/sh", "-c", "exec sleep 60")


def _identity() -> Identity:
    return Identity.of_uid(os.geteuid())


async def _supervised(jobs: int, root: Path) -> tuple[list[float], list[psutil.Process]]:
    manager = JobManager(JobStore(root / "jobs"), JobSettings(stop_grace_s=1.0))
    latencies, shims = [], []
    for i in range(jobs):
        spec = LaunchSpec(
            batch_id=f"bench-{i:04d}",
            cmd_id=f"c{i}",
            source_batch_id=None,
            requested_by=None,
            command_line=ARGV[-1],
            argv=ARGV,
            cwd=root,
            env={"PATH": os.defpath},
            identity=_identity(),
        )
        started = time.perf_counter()
        record = await manager.launch(spec)
        latencies.append(time.perf_counter() - started)
        shims.append(psutil.Process(record.shim_pid))
    await asyncio.sleep(0.5)  # let every shim settle into its loop
    return latencies, shims, manager


async def _direct(jobs: int) -> tuple[list[float], list[asyncio.subprocess.Process]]:
    latencies, procs = [], []
    for _ in range(jobs):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *ARGV,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        latencies.append(time.perf_counter() - started)
        procs.append(proc)
    return latencies, procs


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"{statistics.median(values) * 1000:8.1f} {p95 * 1000:8.1f}"


async def main(jobs: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="argus-bench-"))
    try:
        direct_lat, procs = await _direct(jobs)
        sup_lat, shims, manager = await _supervised(jobs, root)
        mem = [s.memory_full_info() for s in shims]
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus, "
            f"Python {platform.python_version()}, {jobs} jobs of `{ARGV[-1]}`"
        )
        print()
        print(f"{'launch-to-exec latency':<36} {'median ms':>9} {'p95 ms':>8}")
        print(f"{'direct asyncio subprocess (baseline)':<36} {_ms(direct_lat)}")
        print(f"{'under a shim (argus-agent)':<36} {_ms(sup_lat)}")
        ratio = statistics.median(sup_lat) / statistics.median(direct_lat)
        print(f"{'ratio shim / direct':<36} {ratio:9.1f}x")
        print()
        print(f"{'memory per shim':<36} {'mean MiB':>9} {'max MiB':>8}")
        for label, values in (
            ("RSS", [m.rss for m in mem]),
            ("USS (not shared)", [m.uss for m in mem]),
            ("PSS (proportional)", [m.pss for m in mem]),
        ):
            print(f"{label:<36} {statistics.mean(values) / 2**20:9.2f} {max(values) / 2**20:8.2f}")
        for record in manager.running():
            await manager.stop(record.batch_id, "bench")
        for record in manager.records():
            await manager.wait_ended(record.batch_id, timeout=10)
        for proc in procs:
            proc.kill()
            await proc.wait()
        await manager.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    configure("warning")
    asyncio.run(main(parser.parse_args().jobs))
