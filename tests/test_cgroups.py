"""Every job in its own cgroup, on this machine's real cgroups (as root; see
``tests/cgroupenv.py`` for when these are skipped): placement before exec, a stop that
leaves nothing that ran in the cgroup, OOM kills reported with the reason, accounting from
cgroup files matching /proc's, re-adoption keeping placement and accounting, and the /proc
path (with the reason in status) where no cgroup subtree may be written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from argus_agent.config import JobSettings, load_settings
from argus_agent.devserver import DevServer
from argus_agent.errors import ConfigError, LaunchError
from argus_agent.jobs import cgroupfs, proctree
from argus_agent.jobs.cgroups import Cgroups, cgroup_name, mounts
from argus_agent.jobs.policy import Identity
from argus_agent.jobs.procfs import PPID, signal_process, start_ticks, stat_fields
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord, JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.telemetry.cgroup_sampler import CgroupSampler
from argus_agent.telemetry.sampler import JobRef, Sampler
from argus_agent.views import format_jobs, format_status
from tests.cgroupenv import TestCgroup, cgroup_of, require_cgroups, v1_cgroup_of, v2_mount
from tests.support import (
    FIXTURES,
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


def _pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


async def test_stop_leaves_nothing_that_ran_in_the_jobs_cgroup(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path, cgroup_root: TestCgroup
) -> None:
    grace = 1.0
    settings = make_settings(jobs={"stop_grace_s": grace, "cgroup_root": str(cgroup_root.path)})
    await register(settings, user_token)
    pid_file = tmp_path / "pids"
    async with RunningAgent(settings) as running:
        status = running.agent.jobs.cgroups.status()
        assert status["mode"] == "cgroup-v2+v1-memory" or status["mode"] == "cgroup-v2", status
        batch = argus.rerun(
            argus.record_batch(f"exec {PY} {FIXTURES / 'escape_tree.py'} {pid_file}")
        )
        await eventually(pid_file.exists, what="the job's tree")
        pids = _pids(pid_file)
        job = running.agent.jobs.get(batch)
        assert job is not None and job.cgroup is not None
        job_cgroup = str(cgroup_root.jobs / cgroup_name(batch))
        assert job.cgroup["v2"] == job_cgroup
        # Placed before exec: every process of the job, the daemon too, and not the shim.
        for pid in pids:
            assert cgroup_of(pid) == job_cgroup, pid
        assert sorted(cgroup_root.members(f"jobs/{cgroup_name(batch)}")) == sorted(pids)
        assert cgroup_of(job.shim_pid) != job_cgroup
        if "memory" in job.cgroup:
            mirror = v1_cgroup_of(pids[-1], "memory")
            assert job.cgroup["memory"].endswith(mirror), (job.cgroup, mirror)
        argus.stop(batch)
        started = time.monotonic()
        await eventually(
            lambda: not any(alive(p) for p in pids),
            timeout=grace + 1,
            what="every process of the job to be gone within grace + 1 s",
        )
        assert time.monotonic() - started <= grace + 1
        ended = await running.agent.jobs.wait_ended(batch, timeout=5)
        assert ended.exit_signal == signal.SIGKILL and ended.killed_after_grace
        await running.agent.jobs.reports_done()
        assert not Path(job_cgroup).exists(), "removed once the end was reported"
        assert all(not Path(p).exists() for p in job.cgroup.values())


async def test_a_job_whose_shim_was_killed_is_stopped_through_its_cgroup(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path, cgroup_root: TestCgroup
) -> None:
    """The agent's own stop (the shim is gone): the orphaned daemon, re-parented to the
    agent and without ARGUS_BATCH_ID, is still in the cgroup, and dies with it."""
    grace = 1.0
    settings = make_settings(jobs={"stop_grace_s": grace, "cgroup_root": str(cgroup_root.path)})
    await register(settings, user_token)
    pid_file = tmp_path / "pids"
    async with RunningAgent(settings) as running:
        command = f"exec {PY} {FIXTURES / 'escape_tree.py'} {pid_file}"
        batch = argus.rerun(argus.record_batch(command))
        await eventually(pid_file.exists, what="the job's tree")
        pids = _pids(pid_file)
        job = running.agent.jobs.get(batch)
        assert job is not None and job.cgroup is not None and job.shim_pid is not None
        os.kill(job.shim_pid, signal.SIGKILL)
        await eventually(lambda: not alive(job.shim_pid), what="the shim gone")
        argus.stop(batch)
        started = time.monotonic()
        await eventually(
            lambda: not any(alive(p) for p in pids),
            timeout=grace + 1.5,
            what="every process of the job gone",
        )
        assert time.monotonic() - started <= grace + 1.5
        ended = await running.agent.jobs.wait_ended(batch, timeout=10)
        assert ended.exit_note is None or "would not die" not in ended.exit_note
        await running.agent.jobs.reports_done()
        assert not Path(job.cgroup["v2"]).exists()


def _escape_cgroup(target: Path) -> str:
    """A job command whose main process (the shell, then ``sleep``) moves itself out of
    its cgroup into ``target`` (root may), then sleeps."""
    return f"echo $$ > {target / 'cgroup.procs'}; exec sleep 301"


def _kill(pid: int | None, ticks: int | None) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``ticks``."""
    if pid is not None and ticks is not None:
        signal_process(pid, ticks, signal.SIGKILL)


async def test_a_job_that_left_its_cgroup_is_stopped_by_the_agent_after_its_shim_died(
    argus: ArgusUser, make_settings, user_token: str, cgroup_root: TestCgroup
) -> None:
    """The agent's own stop (the shim is gone) of a job whose main process moved itself out
    of its cgroup: the cgroup is empty, the /proc path still finds and stops the process,
    and the job is recorded as ended only once it is gone."""
    grace = 1.0
    settings = make_settings(jobs={"stop_grace_s": grace, "cgroup_root": str(cgroup_root.path)})
    await register(settings, user_token)
    pid = ticks = None
    try:
        async with RunningAgent(settings) as running:
            batch = argus.rerun(argus.record_batch(_escape_cgroup(cgroup_root.path)))
            job = await eventually(
                lambda: (
                    (r := running.agent.jobs.get(batch))
                    and r.pid
                    and cgroup_of(r.pid) == str(cgroup_root.path)
                    and r
                ),
                what="the job out of its cgroup",
            )
            pid, ticks = job.pid, start_ticks(job.pid)
            assert job.cgroup is not None and cgroupfs.procs_recursive(job.cgroup["v2"]) == []
            os.kill(job.shim_pid, signal.SIGKILL)
            await eventually(lambda: not alive(job.shim_pid), what="the shim gone")
            argus.stop(batch)
            deadline = time.monotonic() + grace + 1.5
            while alive(pid) and time.monotonic() < deadline:
                record = running.agent.jobs.get(batch)
                assert record is not None and record.ended_at is None, (
                    f"recorded as ended ({record.describe_exit()}) while pid {pid} runs"
                )
                await asyncio.sleep(0.05)
            assert not alive(pid), "the job's main process outside its cgroup was not stopped"
            ended = await running.agent.jobs.wait_ended(batch, timeout=10)
            assert ended.exit_signal == signal.SIGTERM, ended.describe_exit()
            assert ended.exit_note is None, ended.exit_note
            await running.agent.jobs.reports_done()
    finally:
        _kill(pid, ticks)


async def test_a_job_that_left_its_cgroup_is_stopped_by_its_shim(
    argus: ArgusUser, make_settings, user_token: str, cgroup_root: TestCgroup
) -> None:
    """The same job, its shim alive: the shim's stop reaches it through the process tree."""
    grace = 1.0
    settings = make_settings(jobs={"stop_grace_s": grace, "cgroup_root": str(cgroup_root.path)})
    await register(settings, user_token)
    pid = ticks = None
    try:
        async with RunningAgent(settings) as running:
            batch = argus.rerun(argus.record_batch(_escape_cgroup(cgroup_root.path)))
            job = await eventually(
                lambda: (
                    (r := running.agent.jobs.get(batch))
                    and r.pid
                    and cgroup_of(r.pid) == str(cgroup_root.path)
                    and r
                ),
                what="the job out of its cgroup",
            )
            pid, ticks = job.pid, start_ticks(job.pid)
            argus.stop(batch)
            await eventually(lambda: not alive(pid), timeout=grace + 1.5, what="the job stopped")
            ended = await running.agent.jobs.wait_ended(batch, timeout=10)
            assert ended.exit_signal == signal.SIGTERM, ended.describe_exit()
            await running.agent.jobs.reports_done()
    finally:
        _kill(pid, ticks)


async def test_the_agents_own_stop_leaves_other_jobs_processes_alone(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path, cgroup_root: TestCgroup
) -> None:
    """Two jobs whose shims were killed: the second's daemon (no ARGUS_BATCH_ID, out of
    its session, re-parented to the agent) looks like an orphan of the first to /proc, but
    it is in the second job's cgroup, so the first one's stop leaves it alone."""
    settings = make_settings(jobs={"stop_grace_s": 0.5, "cgroup_root": str(cgroup_root.path)})
    await register(settings, user_token)
    pid_file = tmp_path / "daemon"
    async with RunningAgent(settings) as running:
        first = argus.rerun(argus.record_batch("exec sleep 300"))
        await eventually(lambda: argus.acked(first, "rerun"), what="the first job")
        second = argus.rerun(
            argus.record_batch(
                f"env -u ARGUS_BATCH_ID {PY} {FIXTURES / 'double_fork.py'} {pid_file} & "
                "exec sleep 300"
            )
        )
        await eventually(pid_file.exists, what="the second job's daemon")
        daemon = int(pid_file.read_text())
        jobs = [running.agent.jobs.get(first), running.agent.jobs.get(second)]
        for job in jobs:
            os.kill(job.shim_pid, signal.SIGKILL)
        await eventually(
            lambda: (fields := stat_fields(daemon)) and int(fields[PPID]) == os.getpid(),
            what="the daemon re-parented to the agent",
        )
        argus.stop(first)
        ended = await running.agent.jobs.wait_ended(first, timeout=10)
        assert ended.exit_signal == signal.SIGTERM
        assert alive(daemon), "the first job's stop killed the second job's daemon"
        assert running.agent.jobs.get(second).running
        argus.stop(second)
        await running.agent.jobs.wait_ended(second, timeout=10)
        await eventually(lambda: not alive(daemon), what="the daemon stopped with its job")
        await running.agent.jobs.reports_done()


async def test_a_taken_over_job_is_not_recorded_as_ended_while_its_main_process_runs(
    argus: ArgusUser,
    make_settings,
    user_token: str,
    cgroup_root: TestCgroup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should the agent's own stop miss the job's main process (here its /proc search is
    made to find nothing, and the process left its cgroup), the job stays ``stopping``
    while that process runs, and ends, with its real status, once it is gone."""
    settings = make_settings(jobs={"stop_grace_s": 0.5, "cgroup_root": str(cgroup_root.path)})
    await register(settings, user_token)
    pid = ticks = None
    try:
        async with RunningAgent(settings) as running:
            batch = argus.rerun(argus.record_batch(_escape_cgroup(cgroup_root.path)))
            job = await eventually(
                lambda: (
                    (r := running.agent.jobs.get(batch))
                    and r.pid
                    and cgroup_of(r.pid) == str(cgroup_root.path)
                    and r
                ),
                what="the job out of its cgroup",
            )
            pid, ticks = job.pid, start_ticks(job.pid)
            monkeypatch.setattr(proctree, "job_processes", lambda *_a, **_k: {})
            os.kill(job.shim_pid, signal.SIGKILL)
            await eventually(lambda: not alive(job.shim_pid), what="the shim gone")
            argus.stop(batch)
            await asyncio.sleep(2.0)
            record = running.agent.jobs.get(batch)
            assert alive(pid)
            assert record is not None and record.ended_at is None, record.describe_exit()
            assert record.state == "stopping"
            _kill(pid, ticks)
            ended = await running.agent.jobs.wait_ended(batch, timeout=10)
            assert ended.exit_signal == signal.SIGKILL, ended.describe_exit()
            await running.agent.jobs.reports_done()
    finally:
        _kill(pid, ticks)


async def test_oom_killed_job_is_reported_with_the_reason(
    argus: ArgusUser,
    make_settings,
    user_token: str,
    server: DevServer,
    cgroup_root: TestCgroup,
) -> None:
    settings = make_settings(
        server={"token": user_token},
        telemetry=FAST,
        jobs={"cgroup_root": str(cgroup_root.path), "memory_max": "64M"},
    )
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        limits = running.agent.jobs.cgroups.status()["limits"]
        assert limits["memory_max"].startswith("67108864 via cgroup"), limits
        batch = argus.rerun(argus.record_batch(f"exec {PY} {FIXTURES / 'eat_memory.py'} 512"))
        await eventually(lambda: running.agent.jobs.get(batch), what="the launch")
        record = await running.agent.jobs.wait_ended(batch, timeout=30)
        assert record.exit_signal == signal.SIGKILL
        assert record.oom_kills and record.oom_kills >= 1
        assert record.memory_limit_bytes == 64 << 20
        assert record.memory_peak_bytes is not None and record.memory_peak_bytes > 48 << 20
        reason = record.describe_exit()
        assert reason.startswith("killed by the kernel OOM killer (memory peak "), reason
        assert reason.endswith(" of 64.0 MiB)"), reason
        failed = await eventually(
            lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
        )
        assert failed[0]["data"]["error"] == reason
        assert reason in format_jobs([record])  # what `argus-agent jobs` prints


async def test_an_oom_killed_command_the_shell_did_not_exec_is_reported_as_oom_killed(
    argus: ArgusUser,
    make_settings,
    user_token: str,
    server: DevServer,
    cgroup_root: TestCgroup,
) -> None:
    """The common case: the shell (``/bin/sh -c``) runs the command as a child and exits
    128 + 9 when the OOM killer killed it. The reason still leads with the OOM kill (the
    exit code after it), and the status job table says ``OOM``."""
    settings = make_settings(
        server={"token": user_token},
        telemetry=FAST,
        jobs={"cgroup_root": str(cgroup_root.path), "memory_max": "64M"},
    )
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        # The shell must run `exit` afterwards, so it cannot exec python in its place.
        command = f"{PY} {FIXTURES / 'eat_memory.py'} 512; exit $?"
        batch = argus.rerun(argus.record_batch(command))
        await eventually(lambda: running.agent.jobs.get(batch), what="the launch")
        record = await running.agent.jobs.wait_ended(batch, timeout=30)
        assert record.exit_code == 137 and record.exit_signal is None, record.describe_exit()
        assert record.oom_kills and record.oom_kills >= 1
        reason = record.describe_exit()
        assert reason.startswith("killed by the kernel OOM killer (memory peak "), reason
        assert reason.endswith(" of 64.0 MiB); exit code 137"), reason
        failed = await eventually(
            lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
        )
        assert failed[0]["data"]["error"] == reason
        assert reason in format_jobs([record])
        (row,) = [
            line for line in format_status(running.agent.snapshot()).splitlines() if batch in line
        ]
        assert " OOM " in row, row
        await running.agent.jobs.reports_done()


def test_the_oom_kill_leads_the_reason_only_when_it_ended_the_job() -> None:
    """137 (128 + SIGKILL) or SIGKILL with OOM kills and no stop: the OOM killer ended the
    job. A stop's SIGKILL, or another exit, keeps the OOM kill as a secondary remark."""
    base = JobRecord(
        batch_id="b",
        cmd_id="c",
        command_line="x",
        argv=["x"],
        cwd="/",
        log_path="/l",
        launched_at=1.0,
        ended_at=2.0,
        oom_kills=1,
        memory_peak_bytes=64 << 20,
        memory_limit_bytes=64 << 20,
    )
    oom = "killed by the kernel OOM killer (memory peak 64.0 MiB of 64.0 MiB)"
    assert base.with_changes(exit_signal=9).describe_exit() == oom
    assert base.with_changes(exit_code=137).describe_exit() == f"{oom}; exit code 137"
    assert base.with_changes(exit_code=1).describe_exit() == (
        f"exit code 1; a process of the job was {oom}"
    )
    stopped = base.with_changes(exit_code=137, stop_requested_at=1.5, stop_requested_by="bob")
    assert stopped.describe_exit().startswith("exit code 137, stopped on request of bob")
    assert base.with_changes(exit_code=137, oom_kills=0).describe_exit() == "exit code 137"


async def test_a_cgroup_left_where_a_jobs_goes_is_made_afresh_or_fails_the_launch(
    cgroup_root: TestCgroup, tmp_path: Path
) -> None:
    """The job's cgroup directory exists already (an earlier job of the batch left it): a
    process running in it fails the launch, naming both, and is left alone; an empty one is
    made afresh and the job runs in it. Never a job without its cgroup."""
    jobs = JobManager(
        JobStore(tmp_path / "jobs"), JobSettings(cgroup_root=cgroup_root.path, stop_grace_s=0.5)
    )
    jobs.adopt_existing()
    assert jobs.cgroups.enabled
    batch = "b-leftover"
    leftover = cgroup_root.jobs / cgroup_name(batch)
    leftover.mkdir()
    spec = LaunchSpec(
        batch_id=batch,
        cmd_id="c-1",
        source_batch_id=None,
        requested_by="alice",
        command_line="exec sleep 300",
        argv=("/bin/sh", "-c", "exec sleep 300"),
        cwd=tmp_path,
        env={"PATH": os.defpath},
        identity=Identity.of_uid(os.geteuid()),
    )
    squatter = subprocess.Popen(
        ["sleep", "300"], preexec_fn=lambda: cgroupfs.place({"v2": str(leftover)})
    )
    try:
        with pytest.raises(LaunchError) as refused:
            await jobs.launch(spec)
        assert f"{leftover} exists already" in str(refused.value)
        assert str(squatter.pid) in str(refused.value)
        assert jobs.get(batch) is None and not (tmp_path / "jobs" / batch).exists()
        assert squatter.poll() is None and cgroupfs.procs(str(leftover)) == [squatter.pid]
    finally:
        squatter.kill()
        squatter.wait()
    await eventually(lambda: not cgroupfs.procs(str(leftover)), what="the leftover emptied")
    (leftover / "sub").mkdir()  # a root job may have made cgroups of its own
    record = await jobs.launch(spec)
    try:
        assert record.cgroup is not None and record.cgroup["v2"] == str(leftover)
        assert cgroup_of(record.pid) == str(leftover)
        assert not (leftover / "sub").exists(), "made afresh"
        await jobs.stop(batch, "alice")
        await jobs.wait_ended(batch, timeout=10)
        await jobs.reports_done()
        assert not leftover.exists()
    finally:
        await jobs.shutdown()


def test_kill_without_cgroup_kill_freezes_and_kills_every_member(
    cgroup_root: TestCgroup, tmp_path: Path
) -> None:
    """The kill of kernels before 5.14 (no ``cgroup.kill``): freeze, SIGKILL, thaw."""
    group = cgroup_root.path / "k"
    group.mkdir()
    pid_file = tmp_path / "pids"

    def enter() -> None:
        cgroupfs.place({"v2": str(group)})

    job = subprocess.Popen(
        [sys.executable, str(FIXTURES / "escape_tree.py"), str(pid_file)],
        preexec_fn=enter,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = _pids(pid_file)
        assert sorted(cgroupfs.procs(str(group))) == sorted(pids)
        assert cgroupfs.signal_members(str(group), signal.SIGTERM) == 3  # all ignore it
        time.sleep(0.1)
        assert all(alive(p) for p in pids)
        assert cgroupfs.kill(str(group), use_kill_file=False) == "freeze"
        job.wait(5)
        deadline = time.monotonic() + 2
        while cgroupfs.procs(str(group)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cgroupfs.procs(str(group)) == []
        assert not any(alive(p) for p in pids)
        assert cgroupfs.read_keyed(str(group / "cgroup.events"))["frozen"] == 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


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


async def test_without_a_writable_subtree_jobs_run_through_proc_and_status_says_why(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    settings = make_settings(jobs={"cgroup_root": str(not_a_cgroup)})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        status = running.agent.snapshot()["cgroups"]
        assert status["mode"] == "none"
        assert f"{not_a_cgroup} is not a cgroup v2 directory" in status["why"]
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun's ack")
        job = running.agent.jobs.get(batch)
        assert job is not None and job.cgroup is None and job.pid == ack["pid"]
        argus.stop(batch)
        ended = await running.agent.jobs.wait_ended(batch, timeout=10)
        assert ended.exit_signal == signal.SIGTERM
        assert not alive(ack["pid"])


def _detect_in_child(settings: JobSettings, become: Callable[[], None]) -> dict:
    """``Cgroups.start()`` in a forked child after ``become()`` (changing its user or its
    cgroup, which the test process must keep); returns the child's status and its final
    cgroup as ``status["_in"]``."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            become()
            cgroups = Cgroups(settings)
            cgroups.start()
            answer = {**cgroups.status(), "_in": cgroup_of(os.getpid())}
            os.write(write_end, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read()
    os.waitpid(child, 0)
    return json.loads(answer)


def test_a_per_user_agent_without_delegation_says_why(cgroup_root: TestCgroup) -> None:
    """An agent whose user may not write the subtree (no ``Delegate=yes``) uses /proc."""

    def become_nobody() -> None:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)

    status = _detect_in_child(JobSettings(cgroup_root=cgroup_root.path), become_nobody)
    assert status["mode"] == "none"
    assert f"{cgroup_root.path} is not writable by uid 65534" in status["why"]
    assert not (cgroup_root.path / "jobs").exists()


def test_an_agent_started_in_its_units_agent_leaf_takes_the_unit_as_its_subtree(
    cgroup_root: TestCgroup,
) -> None:
    """``DelegateSubgroup=agent`` (systemd 254+) starts the agent in ``<unit>/agent``: the
    unit's cgroup is the subtree, and the agent stays where it is."""
    leaf = cgroup_root.path / "agent"
    leaf.mkdir()

    def enter_leaf() -> None:
        cgroupfs.place({"v2": str(leaf)})

    status = _detect_in_child(JobSettings(), enter_leaf)
    assert status["mode"] != "none", status
    assert status["root"] == str(cgroup_root.path)
    assert status["agent_cgroup"] == status["_in"] == str(leaf)


def test_an_agent_started_in_its_subtree_moves_into_a_leaf_of_its_own(
    cgroup_root: TestCgroup,
) -> None:
    """Plain ``Delegate=yes``: started in the subtree's root, the agent moves to ``agent``
    (and leaves the subtree's own controllers alone, see ``Cgroups._enable_controllers``)."""

    def enter_root() -> None:
        cgroupfs.place({"v2": str(cgroup_root.path)})

    status = _detect_in_child(JobSettings(), enter_root)
    assert status["root"] == str(cgroup_root.path)
    assert status["agent_cgroup"] == status["_in"] == str(cgroup_root.path / "agent")
    subtree_control = (cgroup_root.path / "cgroup.subtree_control").read_text().split()
    assert subtree_control == [], "the root a unit starts the agent in keeps no controllers"


def test_an_agent_in_the_hierarchys_root_cgroup_does_not_claim_it() -> None:
    """Not started by a unit with ``Delegate=yes`` (the root cgroup is nobody's subtree):
    /proc, and status says why. Detected in a child moved to the root cgroup."""
    require_cgroups()
    mount = v2_mount()
    assert mount is not None

    def enter_hierarchy_root() -> None:
        cgroupfs.place({"v2": mount})

    status = _detect_in_child(JobSettings(), enter_hierarchy_root)
    assert status["mode"] == "none" and status["_in"] == mount
    assert f"the agent runs in the root cgroup of {mount}" in status["why"]


def test_batch_ids_become_safe_cgroup_names() -> None:
    assert cgroup_name("b-0123abcd") == "b-0123abcd"
    assert cgroup_name("rerun_x-1") == "rerun_x-1"
    odd = cgroup_name("../cgroup.procs")
    assert "/" not in odd and "." not in odd
    assert cgroup_name("a.b") != cgroup_name("a_b")
    assert len(cgroup_name("x" * 500)) <= 100
    assert cgroup_name("rerun-32cb88b98944") == "rerun-32cb88b98944"
    # An id that looks like another id's escaped name is not that name.
    assert cgroup_name("x.y") == "x_y__b24ca9b75eb7"
    assert cgroup_name("x_y__b24ca9b75eb7") != "x_y__b24ca9b75eb7"


_SAFE_CHARS = "abcdef0123456789xyzABZ_-"
#: Batch ids of every kind, and ones shaped like escaped names (``<safe>__<12 hex>``).
_IDS = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=_SAFE_CHARS + "./ ", max_size=90),
    st.builds(
        lambda head, sep, tail: f"{head}{sep}{tail}",
        st.text(alphabet=_SAFE_CHARS, max_size=85),
        st.sampled_from(["-", "_", "__", "-_"]),
        st.text(alphabet="0123456789abcdef", min_size=12, max_size=12),
    ),
)


#: ... and other ids' cgroup names, used as batch ids.
_IDS_AND_NAMES = st.one_of(_IDS, _IDS.map(cgroup_name))


@given(_IDS_AND_NAMES, _IDS_AND_NAMES)
def test_two_batch_ids_never_share_a_cgroup_name(first: str, second: str) -> None:
    for name in (cgroup_name(first), cgroup_name(second)):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name), name
    if first != second:
        assert cgroup_name(first) != cgroup_name(second)


@given(_IDS)
def test_an_escaped_name_used_as_a_batch_id_gets_a_name_of_its_own(batch_id: str) -> None:
    name = cgroup_name(batch_id)
    if name != batch_id:
        assert cgroup_name(name) != name


def test_mountinfo_paths_are_unescaped(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "50 31 0:40 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
        "23 1 0:21 / /sys rw - sysfs sysfs rw\n"
    )
    assert mounts(str(info)) == [
        ("cgroup2", "/sys/fs/cgroup/unified", "/", "rw"),
        ("cgroup", "/sys/fs/cgroup/memory", "/", "rw,memory"),
        ("cgroup2", "/mnt/with space", "/sub", "rw"),
    ]


def test_oom_reason_names_peak_and_limit() -> None:
    facts = {"oom_kills": 2, "memory_peak_bytes": 65_712_000_000, "memory_limit_bytes": 67 << 30}
    assert cgroupfs.oom_reason(facts) == (
        "killed by the kernel OOM killer (memory peak 61.2 GiB of 67.0 GiB)"
    )
    assert cgroupfs.oom_reason({**facts, "oom_kills": 0}) is None


def test_cgroup_settings_errors_are_one_line_naming_key_value_and_expectation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    for body, expected in (
        ('memory_max = "lots"', "jobs.memory_max: expected a size in bytes, e.g. "),
        ('cgroups = "on"', "jobs.cgroups: expected one of 'auto' or 'off', got 'on'"),
        ('cgroup_root = "rel/x"', "jobs.cgroup_root: expected an absolute path"),
        ("cpu_max = 0", "jobs.cpu_max: expected a number >= 0.01, got 0"),
    ):
        path.write_text(f"[jobs]\n{body}\n")
        with pytest.raises(ConfigError) as caught:
            load_settings(path, environ={})
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    path.write_text('[jobs]\nmemory_max = "1.5G"\ncpu_max = 2.5\npids_max = 512\n')
    jobs = load_settings(path, environ={}).jobs
    assert (jobs.memory_max, jobs.cpu_max, jobs.pids_max) == (3 << 29, 2.5, 512)
