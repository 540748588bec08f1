"""Benchmark: stopping jobs whose processes do everything to escape, with and without
per-job cgroups.

Each trial launches one job through the real job table (``JobManager``, a shim per job)
whose main process and a child ignore SIGTERM and whose grandchild leaves the session
(``setsid``), double-forks into a daemon that ignores SIGTERM too and clears its
environment; then presses Stop (grace period 1 s) and measures how long until none of the
job's processes is alive, and counts survivors 1 s after the grace period. Trials run one
after the other, first with a cgroup per job (a scratch cgroup v2 subtree, set up as the
agent sets up its own), then through /proc only (``jobs.cgroups = "off"``), in the same run.

Needs root and a writable cgroup v2 hierarchy for the first half.
Usage: python bench/stop.py [--trials 20] [--grace 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from argus_agent.config import JobSettings
from argus_agent.jobs import cgroupfs
from argus_agent.jobs.cgroups import mounts
from argus_agent.jobs.policy import Identity
from argus_agent.jobs.procfs import STATE, stat_fields
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.logsetup import configure

#: The job: a tree with a setsid + double-forked daemon, all ignoring SIGTERM (the tests' own).
ESCAPER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "escape_tree.py"


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[STATE] not in (b"Z", b"X")


async def _trials(
    manager: JobManager, work: Path, trials: int, grace: float, tag: str
) -> tuple[list[float], list[int]]:
    """Seconds from Stop to the last process gone, and survivors per trial."""
    program = ESCAPER
    times, survivors = [], []
    for i in range(trials):
        pid_file = work / f"{tag}-{i}.pids"
        argv = (sys.executable, str(program), str(pid_file))
        spec = LaunchSpec(
            batch_id=f"bench-{tag}-{i:02d}",
            cmd_id=f"c{i}",
            source_batch_id=None,
            requested_by=None,
            command_line=" ".join(argv),
            argv=argv,
            cwd=work,
            env={"PATH": os.defpath, "ARGUS_BATCH_ID": f"bench-{tag}-{i:02d}"},
            identity=Identity.of_uid(os.geteuid()),
        )
        await manager.launch(spec)
        while not pid_file.exists():
            await asyncio.sleep(0.01)
        pids = [int(p) for p in pid_file.read_text().split()]
        stopped = time.monotonic()
        await manager.stop(spec.batch_id, "bench")
        gone_at = None
        while time.monotonic() - stopped < grace + 1.0:
            if not any(_alive(p) for p in pids):
                gone_at = time.monotonic()
                break
            await asyncio.sleep(0.01)
        left = [p for p in pids if _alive(p)]
        survivors.append(len(left))
        times.append((gone_at or time.monotonic()) - stopped)
        await manager.wait_ended(spec.batch_id, timeout=30)
    await manager.reports_done()
    return times, survivors


async def _run(trials: int, grace: float) -> None:
    configure("warning")
    work = Path(tempfile.mkdtemp(prefix="argus-stop-bench-"))
    v2 = sorted(
        (m for m in mounts() if m[0] == "cgroup2"),
        key=lambda m: (m[1] != "/sys/fs/cgroup", m[1] != "/sys/fs/cgroup/unified"),
    )
    root = os.path.join(v2[0][1], f"argus-bench-{uuid.uuid4().hex[:8]}") if v2 else None
    results = {}
    try:
        for label, extra in (("cgroups", {"cgroup_root": root}), ("/proc", {"cgroups": "off"})):
            if label == "cgroups":
                if root is None:
                    print("cgroups: skipped, no cgroup v2 hierarchy")
                    continue
                os.mkdir(root)
            settings = JobSettings(stop_grace_s=grace, **extra)
            manager = JobManager(JobStore(work / label.strip("/") / "jobs"), settings)
            manager.adopt_existing()
            if label == "cgroups" and not manager.cgroups.enabled:
                print(f"cgroups: skipped, {manager.cgroups.why}")
                continue
            tag = label.strip("/")
            results[label] = (
                await _trials(manager, work, trials, grace, tag),
                manager.cgroups.mode,
            )
            await manager.shutdown()
    finally:
        if root and os.path.isdir(root):
            for base in [*_v1_bases(root), root]:
                cgroupfs.remove({"x": os.path.join(base, "jobs")})
                cgroupfs.remove({"x": base})
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}, "
        f"Python {platform.python_version()}; {trials} trials each, grace {grace:g} s; each "
        "job: main + child ignoring SIGTERM, setsid + double-forked daemon ignoring SIGTERM "
        "with a cleared environment"
    )
    print()
    print(f"{'stop via':<10} {'mode':<22} {'ok':>6} {'median s':>9} {'max s':>7} {'survivors':>10}")
    for label, ((times, survivors), mode) in results.items():
        ok = sum(1 for t, s in zip(times, survivors, strict=True) if s == 0 and t <= grace + 1)
        print(
            f"{label:<10} {mode:<22} {ok:>3}/{trials:<2} {statistics.median(times):9.2f} "
            f"{max(times):7.2f} {sum(survivors):10d}"
        )


def _v1_bases(root: str) -> list[str]:
    """Where the agent mirrored ``root`` in the v1 hierarchies (this process's cgroup there
    plus the subtree's name)."""
    name = os.path.basename(root)
    found = []
    for fstype, point, _mount_root, options in mounts():
        if fstype != "cgroup":
            continue
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, where = line.split(":", 2)
            if set(names.split(",")) & set(options.split(",")):
                found.append(os.path.join(point, where.lstrip("/"), name))
    return [f for f in found if os.path.isdir(f)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--grace", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(_run(args.trials, args.grace))
