"""Job control you can trust as root: cwd, identity, signals and supervision under attack.

Real users (``useradd``, as root; skipped otherwise), real processes, a real tmpfs for a full
disk and a real (v1) freezer cgroup for a process that SIGKILL cannot end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from argus_agent.jobs import proctree
from argus_agent.jobs.supervisor import SHIM_PATH
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
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users, mounts)")
FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def os_users() -> Iterator[Callable[..., pwd.struct_passwd]]:
    """Creates real OS users (removed with their homes at the end)."""
    made: list[str] = []

    def make(*groups: str) -> pwd.struct_passwd:
        name = f"argt{uuid.uuid4().hex[:8]}"
        extra = ["--groups", ",".join(groups)] if groups else []
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", *extra, name],
            check=True,
            capture_output=True,
        )
        made.append(name)
        return pwd.getpwnam(name)

    yield make
    for name in made:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@pytest.fixture
def open_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="argus-jc-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _ended(running: RunningAgent, batch: str):
    record = running.agent.jobs.get(batch)
    return record if record is not None and record.ended_at is not None else None


def _audit(settings) -> list[dict]:
    lines = (settings.agent.state_dir / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines]


# -- 1. the working directory ---------------------------------------------------------------


@needs_root
def test_the_job_enters_its_working_directory_only_as_its_user(os_users, tmp_path: Path) -> None:
    """Even a cwd that slipped past the agent's check (a symlink swapped after it) gives the
    job nothing: the supervisor enters it after dropping to the job's user."""
    user = os_users()
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec = {
        "job_dir": str(job_dir),
        "argv": ["/bin/sh", "-c", "pwd"],
        "cwd": str(private),
        "env": {"PATH": "/usr/bin:/bin"},
        "uid": user.pw_uid,
        "gid": user.pw_gid,
        "groups": [user.pw_gid],
        "log_path": str(job_dir / "output.log"),
        "log_max_bytes": 4096,
        "stop_grace_s": 1.0,
    }
    shim = subprocess.run(
        [sys.executable, "-I", "-S", str(SHIM_PATH)],
        input=json.dumps(spec).encode(),
        capture_output=True,
        timeout=30,
        cwd=job_dir,
    )
    answer = json.loads(shim.stdout.splitlines()[0])
    assert answer["ok"] is False, "the job must not start in a directory its user can't enter"
    assert answer["error"] == (
        f"cannot enter working directory {private} as uid {user.pw_uid}: Permission denied"
    )
    assert not (job_dir / "started.json").exists()


@needs_root
async def test_a_symlink_into_another_users_private_dir_is_refused_and_audited(
    argus: ArgusUser, make_settings, user_token: str, os_users, open_dir: Path
) -> None:
    alice, bob = os_users(), os_users()
    bob_home = Path(bob.pw_dir)
    project = bob_home / "project"
    project.mkdir()
    project.chmod(0o755)
    bob_home.chmod(0o700)
    link = open_dir / "link"
    link.symlink_to(project)
    settings = make_settings(
        server={"token": user_token},
        jobs={"users": {"alice": alice.pw_name}, "run_as": None, "allow_root": False},
    )
    await register(settings, user_token)
    async with RunningAgent(settings):
        batch = argus.rerun(argus.record_batch("pwd", cwd=str(link), user=alice.pw_name))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="refusal")
    assert cmd["status"] == "failed"
    # The requester learns nothing about bob's home; the audit log records where it led.
    assert cmd["error"] == f"working directory {link} is not accessible to user {alice.pw_name}"
    refusal = next(a for a in _audit(settings) if a["batch_id"] == batch)
    assert refusal["action"] == "refuse" and refusal["cwd"] == str(link)
    assert refusal["resolved_cwd"].startswith(str(bob_home))


async def test_proc_self_cwd_no_longer_starts_the_job_in_the_agents_job_dir(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    """It meant the job dir of the shim that resolved it; now it is refused."""
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings):
        batch = argus.rerun(argus.record_batch("pwd -P", cwd="/proc/self/cwd"))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="refusal")
    assert cmd["status"] == "failed"
    assert cmd["error"].startswith("working directory /proc/self/cwd is in /proc")
    assert not (settings.agent.state_dir / "jobs" / batch).exists()


# -- 2. the job runs as the batch's owner ---------------------------------------------------


@needs_root
async def test_an_admin_rerunning_a_users_batch_runs_it_as_that_user(
    argus: ArgusUser, make_settings, user_token: str, os_users
) -> None:
    owner, admins_own = os_users(), os_users()
    # alice (the Argus account pressing Rerun) may rerun anyone's batch; her own OS user is
    # another one: the job must still run as the batch's owner.
    settings = make_settings(
        server={"token": user_token},
        jobs={"users": {"alice": "*", "carol": admins_own.pw_name}, "run_as": None},
    )
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("id -un; echo $HOME", user=owner.pw_name))
        ended = await eventually(lambda: _ended(running, batch), what="job end")
        assert ended.exit_code == 0, Path(ended.log_path).read_text()
        assert Path(ended.log_path).read_text().split() == [owner.pw_name, owner.pw_dir]
        assert ended.run_as == owner.pw_name
    launch = next(a for a in _audit(settings) if a["batch_id"] == batch)
    assert launch["requested_by"] == "alice" and launch["run_as"] == owner.pw_name
    assert launch["owner"] == owner.pw_name and launch["owner_source"] == "batch"


@needs_root
async def test_a_requester_not_mapped_to_the_owner_is_refused_naming_both(
    argus: ArgusUser, make_settings, user_token: str, os_users
) -> None:
    owner, other = os_users(), os_users()
    settings = make_settings(
        server={"token": user_token},
        jobs={"users": {"alice": other.pw_name}, "run_as": None},
    )
    await register(settings, user_token)
    async with RunningAgent(settings):
        batch = argus.rerun(argus.record_batch("id", user=owner.pw_name))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="refusal")
    assert cmd["status"] == "failed"
    assert cmd["error"] == (
        f"Argus user 'alice' may run only {other.pw_name!r}'s batches on this host "
        f"(jobs.users), and this batch belongs to OS user {owner.pw_name!r} (from the batch)"
    )


@needs_root
async def test_a_user_in_a_root_equivalent_group_is_refused(
    argus: ArgusUser, make_settings, user_token: str, os_users
) -> None:
    owner = os_users("disk")
    settings = make_settings(
        server={"token": user_token}, jobs={"users": {"alice": "*"}, "run_as": None}
    )
    await register(settings, user_token)
    async with RunningAgent(settings):
        batch = argus.rerun(argus.record_batch("id", user=owner.pw_name))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="refusal")
    assert cmd["status"] == "failed"
    assert "is in group 'disk', which is close to root" in cmd["error"]


# -- 7. signals reach only the processes they are meant for ---------------------------------


async def test_a_reused_process_group_id_is_never_signalled() -> None:
    """A job whose leader is gone and whose group id now leads an unrelated group: the
    fallback stop must leave that group alone."""
    stranger = subprocess.Popen(["sh", "-c", "sleep 300 & exec sleep 300"], start_new_session=True)
    try:
        await eventually(
            lambda: len(proctree.descendants(stranger.pid)) == 1, what="the stranger's child"
        )
        (member,) = proctree.descendants(stranger.pid)
        ticks = proctree.start_ticks(stranger.pid)
        assert ticks is not None
        # The job's recorded leader had this pid (and so this group id) but another start.
        result = await proctree.terminate_processes(
            stranger.pid, ticks - 1000, stranger.pid, None, 0.2, unkillable_wait_s=0.5
        )
        assert result.signalled == 0
        assert alive(stranger.pid) and alive(member), "strangers must not be signalled"
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait()


def test_a_recycled_pid_is_not_signalled() -> None:
    from argus_agent.jobs.procfs import signal_process

    victim = subprocess.Popen(["sleep", "300"])
    try:
        ticks = proctree.start_ticks(victim.pid)
        assert ticks is not None
        assert not signal_process(victim.pid, ticks - 1, signal.SIGKILL)
        assert alive(victim.pid)
        assert signal_process(victim.pid, ticks, signal.SIGKILL)
        victim.wait(5)
    finally:
        victim.kill()
        victim.wait()


# -- 8. a stop ends even when a process cannot be killed ------------------------------------


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """``pid`` frozen in a v1 freezer cgroup (SIGKILL cannot end it until thawed)."""
    group = FREEZER / f"argus-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")
        yield
    finally:
        (group / "freezer.state").write_text("THAWED")
        with contextlib.suppress(OSError):
            for line in (group / "cgroup.procs").read_text().split():
                os.kill(int(line), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@needs_root
@pytest.mark.skipif(not (FREEZER / "cgroup.procs").exists(), reason="no v1 freezer hierarchy")
async def test_a_stop_ends_with_the_unkillable_pids_named(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 0.5, "unkillable_wait_s": 1.0})
    await register(settings, user_token)
    pid_file = tmp_path / "child"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"sleep 300 & echo $! > {pid_file}; wait"))
        await eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), what="pid")
        stuck = int(pid_file.read_text())
        with frozen(stuck):
            argus.stop(batch)
            ended = await eventually(
                lambda: _ended(running, batch), timeout=15, what="the stop to give up"
            )
            assert ended.exit_note is not None
            assert f"process(es) {stuck} would not die" in ended.describe_exit()
            assert ended.exit_signal == signal.SIGTERM  # the job's shell itself did end


# -- 9. the operator's grace period is the one used -----------------------------------------


async def test_a_raised_stop_grace_reaches_running_jobs(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 0.5})
    await register(settings, user_token)
    ready = tmp_path / "ready"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"exec {PY} {FIXTURES / 'ignore_term.py'} {ready}"))
        await eventually(ready.exists, what="the job to ignore SIGTERM")
        record = running.agent.jobs.get(batch)
        # The operator raised the grace (a restart would do this); the job's shim was given
        # the old one at launch: the stop must use the new one.
        running.agent.jobs.settings = settings.jobs.model_copy(update={"stop_grace_s": 3.0})
        argus.stop(batch)
        await eventually(lambda: argus.acked(batch, "stop"), what="stop ack")
        await asyncio.sleep(1.5)
        assert alive(record.pid), "SIGKILLed after the old grace: the new one never arrived"
        ended = await eventually(lambda: _ended(running, batch), timeout=10, what="job end")
        assert ended.exit_signal == signal.SIGKILL and ended.killed_after_grace


# -- 10. a full disk does not lose a job's exit status --------------------------------------


@needs_root
async def test_a_full_disk_when_a_job_ends_keeps_its_exit_status(
    argus: ArgusUser, make_settings, user_token: str, server, tmp_path: Path
) -> None:
    state = tmp_path / "st"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], check=True)
    try:
        settings = make_settings(server={"token": user_token})
        await register(settings, user_token)
        go = tmp_path / "go"
        async with RunningAgent(settings) as running:
            batch = argus.rerun(
                argus.record_batch(f"while [ ! -e {go} ]; do sleep 0.05; done; exit 7")
            )
            await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
            record = running.agent.jobs.get(batch)
            filler = state / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as handle:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            go.touch()
            await eventually(lambda: not alive(record.pid), what="the job to exit")
            await asyncio.sleep(1.0)
            exit_file = state / "jobs" / batch / "exit.json"
            assert not exit_file.exists(), "the disk is full"
            assert alive(record.shim_pid), "the shim keeps the status while it can't write it"
            assert running.agent.jobs.get(batch).running
            filler.unlink()
            ended = await eventually(lambda: _ended(running, batch), timeout=15, what="end")
            assert ended.exit_code == 7
            failed = await eventually(
                lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
            )
            assert failed[0]["data"]["error"].startswith("exit code 7")
    finally:
        subprocess.run(["umount", "--lazy", str(state)], check=False)


# -- 13. a job that kills its own supervisor does not escape Stop ---------------------------


async def test_a_job_that_kills_its_shim_and_daemonises_is_still_stopped(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 1.0})
    await register(settings, user_token)
    pid_file = tmp_path / "daemon"
    escape = (
        f"sleep 1; kill -9 $PPID; {PY} {FIXTURES / 'double_fork.py'} {pid_file} & "
        f"exec {PY} {FIXTURES / 'ignore_term.py'} {tmp_path / 'ready'}"
    )
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(escape))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        await eventually(pid_file.exists, what="the daemon")
        daemon = int(pid_file.read_text())
        await eventually(lambda: not alive(record.shim_pid), what="shim killed by its job")
        assert os.getsid(daemon) != os.getsid(record.pid), "it left the job's session"
        argus.stop(batch)
        await eventually(lambda: argus.acked(batch, "stop"), what="stop ack")
        await eventually(
            lambda: not alive(daemon) and not alive(record.pid),
            timeout=8,
            what="the job and its daemon to be gone",
        )
        ended = await eventually(lambda: _ended(running, batch), timeout=15, what="job end")
        assert ended.exit_signal == signal.SIGKILL  # it ignored SIGTERM


# -- review findings: the takeover under stress ---------------------------------------------


async def test_a_stop_under_way_when_the_shim_dies_is_finished_by_the_agent(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 1.5})
    await register(settings, user_token)
    ready = tmp_path / "ready"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"exec {PY} {FIXTURES / 'ignore_term.py'} {ready}"))
        await eventually(ready.exists, what="the job to ignore SIGTERM")
        record = running.agent.jobs.get(batch)
        argus.stop(batch)
        await eventually(lambda: argus.acked(batch, "stop"), what="stop ack")
        os.kill(record.shim_pid, signal.SIGKILL)  # during the grace period
        ended = await eventually(lambda: _ended(running, batch), timeout=10, what="job end")
        assert not alive(record.pid)
        assert ended.exit_signal == signal.SIGKILL and ended.killed_after_grace


async def test_several_taken_over_jobs_each_keep_their_own_exit_status(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    codes = [3, 7, 7, 7, 7]
    async with RunningAgent(settings) as running:
        batches = [argus.rerun(argus.record_batch(f"sleep 1.5; exit {code}")) for code in codes]
        for batch in batches:
            await eventually(lambda b=batch: argus.acked(b, "rerun"), what="ack")
        for batch in batches:
            os.kill(running.agent.jobs.get(batch).shim_pid, signal.SIGKILL)
        ended = [await running.agent.jobs.wait_ended(b, timeout=15) for b in batches]
    assert [r.exit_code for r in ended] == codes
    assert all(r.exit_note is None for r in ended)


async def test_a_daemon_that_cleared_its_environment_is_still_stopped(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 1.0})
    await register(settings, user_token)
    pid_file = tmp_path / "daemon"
    escape = (
        f"sleep 1; kill -9 $PPID; env -u ARGUS_BATCH_ID {PY} {FIXTURES / 'double_fork.py'} "
        f"{pid_file} & exec sleep 300"
    )
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(escape))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        await eventually(pid_file.exists, what="the daemon")
        daemon = int(pid_file.read_text())
        await eventually(lambda: not alive(record.shim_pid), what="shim killed by its job")
        argus.stop(batch)
        await eventually(
            lambda: not alive(daemon) and not alive(record.pid),
            timeout=8,
            what="the job and its environment-less daemon to be gone",
        )
        await eventually(lambda: _ended(running, batch), timeout=15, what="job end")


@needs_root
@pytest.mark.skipif(not (FREEZER / "cgroup.procs").exists(), reason="no v1 freezer hierarchy")
async def test_a_taken_over_job_that_cannot_be_killed_still_ends_its_stop(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 0.5, "unkillable_wait_s": 1.0})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        os.kill(record.shim_pid, signal.SIGKILL)
        await eventually(lambda: not alive(record.shim_pid), what="shim gone")
        with frozen(record.pid):
            argus.stop(batch)
            ended = await eventually(
                lambda: _ended(running, batch), timeout=15, what="the stop to give up"
            )
            assert f"process(es) {record.pid} would not die" in ended.describe_exit()
