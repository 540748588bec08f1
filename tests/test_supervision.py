"""Jobs outlive the agent: per-job supervisors, re-adoption after SIGKILL, stop reaching the
whole tree, logs by the supervisor, retention. Real processes and signals."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from argus_agent.jobs import proctree
from argus_agent.jobs.store import JobRecord, JobStore
from tests.support import (
    FIXTURES,
    AgentProcess,
    ArgusUser,
    RunningAgent,
    agent_env,
    alive,
    cli,
    eventually,
    register,
)

PY = shlex.quote(sys.executable)


async def test_sigkilled_agent_readopts_running_jobs_and_reports_the_one_that_ended(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 2.0})
    await register(settings, user_token)
    env = agent_env(settings)
    launches = tmp_path / "launches"
    first = AgentProcess(env, tmp_path / "agent1.log")
    try:
        await first.status()
        long_runs = [
            argus.rerun(argus.record_batch(f"echo x >> {launches}; exec sleep 300"))
            for _ in range(3)
        ]
        quick = argus.rerun(argus.record_batch("sleep 1.5; exit 7"))
        for batch in [*long_runs, quick]:
            await eventually(lambda b=batch: argus.acked(b, "rerun"), what=f"ack of {batch}")
        pids = {b: argus.acked(b, "rerun")["pid"] for b in long_runs}
    finally:
        first.kill()
    await asyncio.sleep(2.5)  # the quick job exits while no agent runs
    assert all(alive(pid) for pid in pids.values()), "SIGKILL of the agent must spare its jobs"
    second = AgentProcess(env, tmp_path / "agent2.log")
    try:
        status = await second.status()
        jobs = {job["batch_id"]: job for job in status["jobs"]}
        for batch, pid in pids.items():
            assert jobs[batch]["state"] == "running" and jobs[batch]["pid"] == pid
        assert jobs[quick]["state"] == "ended"
        assert jobs[quick]["outcome"] == "exit code 7"
        for batch in long_runs:
            argus.stop(batch)
        for batch, pid in pids.items():
            cmd = await eventually(lambda b=batch: argus.acked(b, "stop"), what="stop ack")
            assert cmd["status"] == "started" and cmd["pid"] == pid
        await eventually(
            lambda: not any(alive(p) for p in pids.values()), timeout=5, what="all three stopped"
        )
        expected = "killed by signal 15 (SIGTERM), stopped on request of alice"

        async def all_stopped() -> bool:
            status = await second.status()
            return {j["outcome"] for j in status["jobs"] if j["batch_id"] in long_runs} == {
                expected
            }

        await eventually(all_stopped, what=f"every outcome to read {expected!r}")
    finally:
        assert second.stop() == 0
    assert launches.read_text().count("x") == 3, "nothing may be launched twice"


async def test_recycled_pid_is_not_adopted(
    argus: ArgusUser, make_settings, user_token: str, server
) -> None:
    settings = make_settings()
    agent_id = await register(settings, user_token)
    victim = subprocess.Popen(["sleep", "300"])
    try:
        real_ticks = proctree.start_ticks(victim.pid)
        assert real_ticks is not None
        store = JobStore(settings.agent.state_dir / "jobs")
        batch = "rerun-00000000dead"
        directory = store.create(
            JobRecord(
                batch_id=batch,
                cmd_id="c-old",
                command_line="train",
                argv=["/bin/sh", "-c", "train"],
                cwd="/",
                log_path=str(store.job_dir(batch) / "output.log"),
                launched_at=time.time(),
            )
        )
        # A state record naming a pid that now belongs to another process (other start time).
        (directory / "started.json").write_text(
            json.dumps(
                {
                    "pid": victim.pid,
                    "pgid": victim.pid,
                    "start_ticks": real_ticks - 1000,
                    "shim_pid": victim.pid,
                    "shim_start_ticks": real_ticks - 1000,
                    "started_at": time.time() - 100,
                }
            )
        )
        async with RunningAgent(settings) as running:
            record = running.agent.jobs.get(batch)
            assert record.state == "ended"
            assert "exit status unknown" in record.describe_exit()
            cmd_id = server.inject_command(agent_id, "stop", batch, {"requested_by": "alice"})
            cmd = await eventually(
                lambda: next(
                    (
                        c
                        for c in argus.commands(batch)
                        if c["id"] == cmd_id and c["status"] != "pending"
                    ),
                    None,
                ),
                what="stop ack",
            )
            assert cmd["status"] == "failed" and "already ended" in cmd["error"]
            await asyncio.sleep(0.3)
        assert victim.poll() is None, "the unrelated process must not be touched"
    finally:
        victim.kill()
        victim.wait()


async def test_stop_kills_a_double_forked_setsid_grandchild(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    grace = 1.5
    settings = make_settings(jobs={"stop_grace_s": grace})
    await register(settings, user_token)
    pid_file = tmp_path / "grandchild"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'double_fork.py'} {pid_file}"))
        await eventually(pid_file.exists, what="the daemonised grandchild")
        grandchild = int(pid_file.read_text())
        job = running.agent.jobs.get(batch)
        assert os.getsid(grandchild) != os.getsid(job.pid), "it left the job's session"
        assert psutil.Process(grandchild).ppid() == job.shim_pid, "re-parented to the shim"
        argus.stop(batch)
        started = time.monotonic()
        await eventually(
            lambda: not alive(grandchild),
            timeout=grace + 1,
            what="the grandchild to die within grace + 1 s",
        )
        assert time.monotonic() - started <= grace + 1
        ended = await running.agent.jobs.wait_ended(batch, timeout=5)
        assert ended.exit_signal == 15


async def test_log_keeps_every_line_across_an_agent_crash(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = agent_env(settings)
    lines = 500
    first = AgentProcess(env, tmp_path / "agent1.log")
    try:
        await first.status()
        batch = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'count_lines.py'} {lines} 0"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        log_path = settings.agent.state_dir / "jobs" / batch / "output.log"
        await eventually(
            lambda: log_path.exists() and log_path.read_text().count("\n") > 50, what="some output"
        )
    finally:
        first.kill()
    written_while_down = log_path.read_text().count("\n")
    assert written_while_down < lines, "the job was still running when the agent died"
    second = AgentProcess(env, tmp_path / "agent2.log")
    try:
        await eventually(
            lambda: (s := cli("jobs", env=env)).returncode == 0 and "exit code 0" in s.stdout,
            timeout=20,
            what="job end",
        )
    finally:
        second.stop()
    assert log_path.read_text().splitlines() == [f"line {i}" for i in range(lines)]


async def test_log_is_capped_with_a_marker_and_the_job_is_not_blocked(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings(jobs={"log_max_bytes": 4096})
    await register(settings, user_token)
    flood = f"{PY} -c 'import sys\nfor i in range(200000): print(\"flood\", i)'"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(flood))
        ended = await eventually(
            lambda: (r := running.agent.jobs.get(batch)) and r.ended_at is not None and r,
            timeout=30,
            what="job end",
        )
        assert ended.exit_code == 0 and ended.log_truncated
        text = Path(ended.log_path).read_text()
        assert text.startswith("flood 0\n")
        assert text.endswith("further output of this job is discarded\n")
        assert "log truncated: output reached log_max_bytes (4096 bytes)" in text
        assert len(text.encode()) < 4096 + 200


async def test_leftover_background_processes_are_stopped_when_the_job_ends(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    pid_file = tmp_path / "bg"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"sleep 300 & echo $! > {pid_file}; exit 3"))
        ended = await eventually(
            lambda: (r := running.agent.jobs.get(batch)) and r.ended_at is not None and r,
            timeout=15,
            what="job end",
        )
        assert ended.exit_code == 3
        assert not alive(int(pid_file.read_text()))


async def test_jobs_and_logs_commands_and_the_audit_log(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = agent_env(settings)
    async with RunningAgent(settings) as running:
        done = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'count_lines.py'} 20 0"))
        await eventually(
            lambda: (r := running.agent.jobs.get(done)) and r.ended_at, what="first job end"
        )
        refused = argus.rerun(argus.record_batch("echo hi", cwd="/nonexistent"))
        await eventually(lambda: argus.acked(refused, "rerun"), what="refusal")
        slow = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'count_lines.py'} 100 4"))
        await eventually(lambda: argus.acked(slow, "rerun"), what="second launch")
        follow = await asyncio.to_thread(cli, "logs", slow, "-f", env=env, timeout=30)
        assert follow.returncode == 0
        assert follow.stdout.splitlines() == [
            *(f"line {i}" for i in range(100)),
            "-- job ended: exit code 4 (failed)",  # how it ended, once its log is read
        ]
    listing = cli("jobs", env=env)
    assert listing.returncode == 0
    rows = listing.stdout.splitlines()
    assert rows[0].split()[:5] == ["BATCH", "PID", "USER", "STATE", "STARTED"]
    row = next(r for r in rows if r.startswith(done))
    user = "root" if os.geteuid() == 0 else getpass.getuser()
    assert f" {user} " in row and " ended " in row and row.endswith("exit code 0")
    assert next(r for r in rows if r.startswith(slow)).endswith("exit code 4")
    tail = cli("logs", done, "--tail", "3", env=env)
    assert tail.stdout.splitlines() == ["line 17", "line 18", "line 19"]
    missing = cli("logs", "rerun-nope", env=env)
    assert missing.returncode == 4 and "no job for batch rerun-nope" in missing.stderr
    audit = [
        json.loads(line)
        for line in (settings.agent.state_dir / "audit.log").read_text().splitlines()
    ]
    launch = next(a for a in audit if a["action"] == "launch" and a["batch_id"] == done)
    assert launch["requested_by"] == "alice" and launch["run_as"] == user
    assert launch["command"].endswith("count_lines.py 20 0") and launch["pid"] > 0
    refusal = next(a for a in audit if a["action"] == "refuse")
    assert refusal["batch_id"] == refused and "does not exist" in refusal["reason"]
    assert oct((settings.agent.state_dir / "audit.log").stat().st_mode & 0o777) == "0o600"


async def test_ended_jobs_are_pruned_after_the_retention_period(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings(jobs={"retention_days": 1})
    await register(settings, user_token)
    store = JobStore(settings.agent.state_dir / "jobs")
    cases = (
        ("rerun-0000000000aa", 2, True),
        ("rerun-0000000000bb", 0.5, True),
        ("rerun-0000000000cc", 2, False),
    )
    for batch, age_days, reported in cases:
        store.create(
            JobRecord(
                batch_id=batch,
                cmd_id=f"c-{batch}",
                command_line="x",
                argv=["x"],
                cwd="/",
                log_path="/dev/null",
                launched_at=time.time() - 3 * 86400,
            )
        )
        (store.job_dir(batch) / "exit.json").write_text(
            json.dumps({"exit_code": 0, "ended_at": time.time() - age_days * 86400})
        )
        if reported:
            (store.job_dir(batch) / "reported").touch()
    async with RunningAgent(settings) as running:
        assert running.agent.jobs.get("rerun-0000000000aa") is None
        assert not store.job_dir("rerun-0000000000aa").exists()
        assert running.agent.jobs.get("rerun-0000000000bb").exit_code == 0
        # Old but never reported (the agent was down): kept until its end is reported.
        assert running.agent.jobs.get("rerun-0000000000cc").exit_code == 0
        await running.agent.jobs.reports_done()
        assert (store.job_dir("rerun-0000000000cc") / "reported").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_system_agent_runs_the_job_as_the_mapped_user(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    name = f"argt{os.getpid() % 100000}"
    group = f"{name}g"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/bash", "--groups", group, name], check=True
    )
    try:
        import grp
        import pwd

        entry = pwd.getpwnam(name)
        extra_gid = grp.getgrnam(group).gr_gid
        # The reporter token lets the agent read the batch's recorded user (the owner).
        settings = make_settings(
            server={"token": user_token},
            jobs={"users": {"alice": name}, "run_as": None, "allow_root": False},
        )
        await register(settings, user_token)
        async with RunningAgent(settings) as running:
            # A shell command: the test's own Python lives where the new user may not look.
            whoami = (
                'printf \'{"uid": %s, "euid": %s, "gid": %s, "groups": "%s", '
                '"HOME": "%s", "USER": "%s", "LOGNAME": "%s", "SHELL": "%s", '
                '"cwd": "%s"}\\n\' "$(id -ru)" "$(id -u)" "$(id -g)" "$(id -G)" '
                '"$HOME" "$USER" "$LOGNAME" "$SHELL" "$PWD"'
            )
            batch = argus.rerun(argus.record_batch(whoami, user=name))
            ended = await eventually(
                lambda: (r := running.agent.jobs.get(batch)) and r.ended_at is not None and r,
                what="job end",
            )
            assert ended.exit_code == 0, Path(ended.log_path).read_text()
            seen = json.loads(Path(ended.log_path).read_text())
            assert seen["uid"] == seen["euid"] == entry.pw_uid
            assert seen["gid"] == entry.pw_gid
            groups = sorted(int(g) for g in seen["groups"].split())
            assert groups == sorted({entry.pw_gid, extra_gid})
            assert seen["HOME"] == entry.pw_dir and seen["USER"] == name
            assert seen["LOGNAME"] == name and seen["SHELL"] == "/bin/bash"
            assert seen["cwd"] == entry.pw_dir  # no recorded cwd: the user's home
            assert ended.run_as == name and ended.uid == entry.pw_uid
            log_stat = Path(ended.log_path).stat()
            assert (log_stat.st_uid, log_stat.st_gid) == (entry.pw_uid, entry.pw_gid)
            # the agent's own files stay out of the job user's reach
            assert settings.agent.state_dir.stat().st_mode & 0o077 == 0
            assert settings.token_path.stat().st_mode & 0o077 == 0
            # an unmapped Argus user is refused with the reason (the owner read from the
            # env snapshot: alice's token may not read bob's batch)
            other = ArgusUser(argus.url, running_user_token(argus, "bob"))
            refused = other.rerun(other.record_batch("id", user=name, env={"USER": name}))
            cmd = await eventually(lambda: argus.acked(refused, "rerun"), what="refusal")
            assert cmd["status"] == "failed"
            assert cmd["error"] == (
                "Argus user 'bob' is not mapped to an OS user on this host (jobs.users), so "
                f"it may not run batch owner {name!r}'s command"
            )
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def running_user_token(argus: ArgusUser, username: str) -> str:
    """A reporter token for another Argus user of the same server."""
    import httpx

    answer = httpx.post(f"{argus.url}/api/_dev/users", json={"username": username})
    answer.raise_for_status()
    return answer.json()["token"]
