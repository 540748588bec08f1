"""Benchmark: job logs into log_line events, and what the shim costs a job that writes fast.

1. Tailing: a job log of N lines (with its stream sidecar), read by ``LogTailer`` and put
   durably into the outbox together with the log offset, as the agent does (no rate cap).
2. The job's own write speed: a Python job writing N lines as fast as it can, (a) straight
   into a file (the baseline: no agent at all), (b) under a shim, with the agent's telemetry
   tailing the log into the outbox at the same time. Compared by the time the job itself
   measures for its writes.

Usage: python bench/logs.py [--lines 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argus_agent.config import JobSettings, TelemetrySettings
from argus_agent.events import EventSource
from argus_agent.jobs.policy import Identity
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord, JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.logsetup import configure
from argus_agent.outbox import Outbox
from argus_agent.telemetry.gpu import GpuReader, NoGpuBackend
from argus_agent.telemetry.manager import Telemetry

SOURCE = EventSource(project="bench", host="bench-host", user="alice", command="python t.py")


async def tail_throughput(root: Path, lines: int) -> tuple[int, float]:
    job_dir = root / "jobs" / "bench-tail"
    job_dir.mkdir(parents=True)
    line = b"2026-11-26 10:00:00 INFO epoch 3 step 1234 loss=0.123456 lr=0.0001 tok/s=51234\n"
    with open(job_dir / "output.log", "wb") as handle:
        for _ in range(lines // 10_000):
            handle.write(line * 10_000)
    (job_dir / "output.streams").write_bytes(b"o" * lines)
    box = Outbox(root / "outbox-tail.db", max_bytes=8 << 30)
    await box.start()
    telemetry = Telemetry(
        TelemetrySettings(log_max_lines_per_s=0, lifecycle_events=False),
        box,
        JobManager(JobStore(root / "jobs-unused"), JobSettings()),
        GpuReader(NoGpuBackend(), timeout_s=1),
        hostname="bench-host",
    )
    record = JobRecord(
        batch_id="bench-tail",
        cmd_id="c",
        command_line="x",
        argv=["x"],
        cwd=str(root),
        log_path=str(job_dir / "output.log"),
        launched_at=time.time(),
    )
    started = time.perf_counter()
    await telemetry.job_ended(record)  # the agent's own path: read to the end, commit
    elapsed = time.perf_counter() - started
    sent = box.stats().queued
    await box.close()
    return sent, elapsed


def _identity() -> Identity:
    return Identity.of_uid(os.geteuid())


WRITER = (
    "import sys, time\n"
    "t = time.perf_counter()\n"
    "for i in range({n}):\n"
    "    sys.stdout.write(f'epoch 3 step {{i}} loss=0.123456 lr=0.0001 tok/s=51234\\n')\n"
    "sys.stdout.flush()\n"
    "print(f'WROTE {{time.perf_counter() - t:.4f}}', file=sys.stderr)\n"
)


def _writer(lines: int) -> list[str]:
    return [sys.executable, "-c", WRITER.format(n=lines)]


def direct_write(root: Path, lines: int) -> float:
    """The job's own time to write its lines, straight into a file."""
    with open(root / "direct.log", "wb") as out:
        done = subprocess.run(
            _writer(lines), stdout=out, stderr=subprocess.PIPE, check=True, text=True
        )
    return float(done.stderr.split()[-1])


async def supervised_write(root: Path, lines: int) -> tuple[float, int]:
    box = Outbox(root / "outbox-job.db", max_bytes=8 << 30)
    await box.start()
    manager = JobManager(JobStore(root / "jobs2"), JobSettings(log_max_bytes=1 << 33))
    telemetry = Telemetry(
        TelemetrySettings(interval_s=1.0, log_poll_s=0.1, log_max_lines_per_s=0),
        box,
        manager,
        GpuReader(NoGpuBackend(), timeout_s=1),
        hostname="bench-host",
    )
    manager.on_ended = telemetry.job_ended
    shutdown = asyncio.Event()
    runner = asyncio.create_task(telemetry.run(shutdown))
    spec = LaunchSpec(
        batch_id="bench-job",
        cmd_id="c",
        source_batch_id=None,
        requested_by=None,
        command_line="python writer",
        argv=tuple(_writer(lines)),
        cwd=root,
        env={"PATH": os.defpath},
        identity=_identity(),
    )
    record = await manager.launch(spec)
    ended = await manager.wait_ended("bench-job", timeout=600)
    await manager.reports_done()
    shutdown.set()
    await runner
    queued = box.stats().queued
    await box.close()
    await manager.shutdown()
    assert ended.exit_code == 0 and record.pid
    lines_out = Path(ended.log_path).read_text().splitlines()
    wrote = next(line for line in reversed(lines_out) if line.startswith("WROTE"))
    return float(wrote.split()[1]), queued


async def main(lines: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="argus-bench-logs-"))
    try:
        sent, tail_s = await tail_throughput(root, lines)
        direct_s = direct_write(root, lines)
        job_s, queued = await supervised_write(root, lines)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
            f"{platform.python_version()}; {lines} lines"
        )
        print()
        print(f"{'what':<58} {'seconds':>8} {'lines/s':>11}")
        print(
            f"{'tail a log into the outbox (durable, with offsets)':<58} {tail_s:8.2f} "
            f"{sent / tail_s:11.0f}"
        )
        print(
            f"{'job writing straight to a file (baseline)':<58} {direct_s:8.2f} "
            f"{lines / direct_s:11.0f}"
        )
        print(
            f"{'same job under a shim, agent tailing its log meanwhile':<58} {job_s:8.2f} "
            f"{lines / job_s:11.0f}"
        )
        print(
            f"job slowdown under the shim: {job_s / direct_s:.2f}x "
            f"({queued} log events queued for the server)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    configure("warning")
    asyncio.run(main(parser.parse_args().lines))
