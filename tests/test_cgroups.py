"""Every job in its own cgroup, on this machine's real cgroups (as root; see
``tests/cgroupenv.py`` for when these are skipped): placement before exec, a stop that
leaves nothing that ran in the cgroup, OOM kills reported with the reason, accounting from
cgroup files matching /proc's, re-adoption keeping placement and accounting, and the /proc
path (with the reason in status) where no cgroup subtree may be written."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argus_agent.config import JobSettings
from argus_agent.devserver import DevServer
from argus_agent.errors import LaunchError
from argus_agent.jobs import cgroupfs, proctree
from argus_agent.jobs.cgroups import cgroup_name
from argus_agent.jobs.policy import Identity
from argus_agent.jobs.procfs import PPID, signal_process, start_ticks, stat_fields
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobRecord, JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.views import format_jobs, format_status
from tests.cgroupenv import TestCgroup, cgroup_of, v1_cgroup_of
from tests.support import (
    FIXTURES,
    ArgusUser,
    RunningAgent,
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
