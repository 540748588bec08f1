"""Per-job cgroups: accounting from cgroup files against /proc's figures, processes in
sub-cgroups, and an agent restart keeping placement and accounting of re-adopted jobs.
Split from test_cgroups.py by size."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
import time
from pathlib import Path

from argus_agent.devserver import DevServer
from argus_agent.jobs import cgroupfs
from argus_agent.jobs.cgroups import cgroup_name
from argus_agent.telemetry.cgroup_sampler import CgroupSampler
from argus_agent.telemetry.sampler import JobRef, Sampler
from tests.cgroupenv import TestCgroup, cgroup_of
from tests.support import (
    AgentProcess,
    ArgusUser,
    RunningAgent,
    agent_env,
    alive,
    eventually,
    register,
    server_events,
)

PY = shlex.quote(sys.executable)
FAST = {"interval_s": 0.5, "log_poll_s": 0.1}


async def test_snapshots_from_cgroups_match_the_proc_figures(
    argus: ArgusUser,
    make_settings,
    user_token: str,
    server: DevServer,
    tmp_path: Path,
    cgroup_root: TestCgroup,
) -> None:
    """The same job read both ways, in the same instant. Stated tolerance: the same number
    of processes and threads; RAM within 10 % + 32 MiB (a cgroup counts pages shared by
    the job's processes once and leaves out shared libraries others had cached, /proc's sum
    of RSS counts them in each process); CPU within 10 percentage points + 10 % (the cgroup
    also counts processes that ended between two readings)."""
    settings = make_settings(
        server={"token": user_token},
        telemetry=FAST,
        jobs={"cgroup_root": str(cgroup_root.path)},
    )
    await register(settings, user_token)
    ready = tmp_path / "ready"
    # Four processes that each hold 40 MiB and burn a little CPU.
    script = (
        "import os, sys, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0: break\n"
        "block = b'x' * (40 << 20)\n"
        "open(sys.argv[1], 'a').write('.')\n"
        "while True:\n"
        "    t = time.monotonic()\n"
        "    while time.monotonic() - t < 0.02: pass\n"
        "    time.sleep(0.08)\n"
    )
    program = tmp_path / "load.py"
    program.write_text(script)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"exec {PY} {program} {ready}"))
        await eventually(lambda: ready.exists() and len(ready.read_text()) == 4, what="load")
        job = running.agent.jobs.get(batch)
        assert job is not None and job.cgroup is not None and job.shim_pid is not None
        by_cgroup, by_proc = Sampler(), Sampler()
        refs_cgroup = [JobRef(batch, job.shim_pid, job.cwd, job.cgroup)]
        refs_proc = [JobRef(batch, job.shim_pid, job.cwd, None)]
        try:
            by_cgroup.read(refs_cgroup), by_proc.read(refs_proc)
            await asyncio.sleep(2.0)
            cg = by_cgroup.read(refs_cgroup)[1][batch]
            pr = by_proc.read(refs_proc)[1][batch]
        finally:
            by_cgroup.close()
            by_proc.close()
        assert cg.pids == pr.pids and cg.num_procs == pr.num_procs == 4
        assert cg.num_threads == pr.num_threads
        assert abs(cg.rss_bytes - pr.rss_bytes) <= 0.1 * pr.rss_bytes + (32 << 20), (cg, pr)
        assert cg.rss_bytes >= 4 * (40 << 20)
        assert cg.cpu_pct is not None and pr.cpu_pct is not None
        assert abs(cg.cpu_pct - pr.cpu_pct) <= 10 + 0.1 * pr.cpu_pct, (cg, pr)
        assert cg.mem_peak_bytes is not None and cg.mem_peak_bytes >= cg.rss_bytes
        assert pr.mem_peak_bytes is None
        # What reaches Argus: today's field names, plus the memory peak.
        snap = await eventually(
            lambda: [
                e
                for e in server_events(server.url, batch, "resource_snapshot")
                if e["data"]["num_procs"] == 4
            ],
            what="a snapshot of the job",
        )
        data = snap[-1]["data"]
        assert data["proc_ram_mb"] >= 160 and data["proc_ram_peak_mb"] >= data["proc_ram_mb"]
        assert data["proc_cpu_pct"] is not None and data["num_threads"] == cg.num_threads
        argus.stop(batch)
        await running.agent.jobs.wait_ended(batch, timeout=10)


def test_processes_in_cgroups_a_job_made_below_its_own_are_counted(
    cgroup_root: TestCgroup,
) -> None:
    """A root job may make cgroups below its own and move processes there: they stay the
    job's in its readings (number of processes and threads, the pids GPU use is matched
    to), as they do for its stop."""
    group = cgroup_root.path / "j"
    inner = group / "inner" / "deeper"
    inner.mkdir(parents=True)
    sleepers = [
        subprocess.Popen(
            ["sleep", "300"], preexec_fn=lambda where=where: cgroupfs.place({"v2": str(where)})
        )
        for where in (group, inner)
    ]
    sampler = CgroupSampler()
    try:
        paths = {"v2": str(group)}
        first = sampler.read({"b": paths}, time.monotonic(), None, None, False)["b"]
        assert first.pids == {p.pid for p in sleepers}
        assert first.num_procs == 2 and first.num_threads == 2
        # One leaves for the deeper cgroup: the job's count is the same a tick later.
        cgroupfs.place({"v2": str(inner)}, sleepers[0].pid)
        later = sampler.read({"b": paths}, time.monotonic() + 10, 10.0, None, False)["b"]
        assert later.pids == {p.pid for p in sleepers} and later.num_procs == 2
    finally:
        sampler.close()
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


class _AgentInSubtree(AgentProcess):
    """`argus-agent run` started inside the test's cgroup subtree, as systemd starts a unit
    with ``Delegate=yes``: its default cgroup root is that subtree."""

    def __init__(self, env: dict[str, str], log_path: Path, subtree: TestCgroup) -> None:
        super().__init__(env, log_path, preexec_fn=subtree.enter())


async def test_agent_restart_keeps_placement_and_accounting_of_readopted_jobs(
    argus: ArgusUser,
    make_settings,
    user_token: str,
    server: DevServer,
    tmp_path: Path,
    cgroup_root: TestCgroup,
) -> None:
    settings = make_settings(server={"token": user_token}, jobs={"stop_grace_s": 1.0})
    await register(settings, user_token)
    env = agent_env(
        settings,
        ARGUS_TOKEN=user_token,
        ARGUS_AGENT_TELEMETRY_INTERVAL_S="0.5",
    )
    first = _AgentInSubtree(env, tmp_path / "agent1.log", cgroup_root)
    try:
        status = await first.status()
        assert status["cgroups"]["mode"] != "none", status["cgroups"]
        assert status["cgroups"]["root"] == str(cgroup_root.path)
        # The agent left the subtree's root for a leaf of its own (no internal processes).
        assert cgroup_of(first.proc.pid) == str(cgroup_root.path / "agent")
        assert cgroup_root.members("") == []
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun's ack")
        pid = ack["pid"]
        job_cgroup = str(cgroup_root.jobs / cgroup_name(batch))
        assert cgroup_of(pid) == job_cgroup
    finally:
        first.kill()
    second = _AgentInSubtree(env, tmp_path / "agent2.log", cgroup_root)
    try:
        status = await second.status()
        assert cgroup_of(second.proc.pid) == str(cgroup_root.path / "agent")
        (job,) = [j for j in status["jobs"] if j["batch_id"] == batch]
        assert job["state"] == "running" and job["pid"] == pid
        assert cgroup_of(pid) == job_cgroup, "re-adopted in the cgroup it had"
        started_at = time.time()

        def fresh_cgroup_snapshot() -> list[dict]:
            return [
                e
                for e in server_events(server.url, batch, "resource_snapshot")
                if e["data"]["proc_ram_peak_mb"] is not None
                and e["data"]["num_procs"] == 1
                and e["timestamp"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started_at))
            ]

        await eventually(fresh_cgroup_snapshot, what="a snapshot read from the job's cgroup")
        argus.stop(batch)
        await eventually(lambda: not alive(pid), timeout=3, what="the job to stop")
        await eventually(
            lambda: server_events(server.url, batch, "batch_failed"), what="the job's end"
        )
        await eventually(lambda: not Path(job_cgroup).exists(), what="its cgroup removed")
    finally:
        assert second.stop() == 0
