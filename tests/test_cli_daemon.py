"""The daemon as users run it: `argus-agent run` in a real process, `status`, signals; `jobs`
and `logs -f` as an operator uses them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.support import ArgusUser, RunningAgent, agent_env, cli, eventually, register


def _env(settings, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ARGUS_")}
    return {
        **base,
        "ARGUS_URL": settings.server.url,
        "ARGUS_AGENT_AGENT_STATE_DIR": str(settings.agent.state_dir),
        "ARGUS_AGENT_AGENT_HOSTNAME": settings.agent.hostname,
        "ARGUS_AGENT_AGENT_POLL_INTERVAL_S": "0.2",
        **(
            {
                "ARGUS_AGENT_JOBS_RUN_AS": "root",
                "ARGUS_AGENT_JOBS_ALLOW_ROOT": "true",
                "ARGUS_AGENT_JOBS_USERS": '{"alice": "*"}',
            }
            if os.geteuid() == 0
            else {}
        ),
        **extra,
    }


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "argus_agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_run_status_and_sigterm_leaves_jobs_running(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = _env(settings)
    log_file = (tmp_path / "agent.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "argus_agent.cli", "run"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        status = await eventually(
            lambda: (
                (r := _cli("status", "--json", env=env)).returncode == 0
                and (doc := json.loads(r.stdout))["channel"]["state"] == "connected"
                and doc
            ),
            what="status answer after a first good poll",
        )
        assert status["pid"] == daemon.pid
        assert status["channel"]["state"] == "connected"
        batch = argus.rerun(argus.record_batch("sleep 60"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        human = _cli("status", env=env)
        assert human.returncode == 0
        assert "channel  connected" in human.stdout
        assert f"{batch}" in human.stdout and "running" in human.stdout
        job_pid = argus.acked(batch, "rerun")["pid"]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
        assert psutil.pid_exists(job_pid), "stopping the agent must not stop its jobs"
        lines = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
        assert any(line["event"] == "agent started" for line in lines)  # JSON when not a tty
        assert user_token not in (tmp_path / "agent.log").read_text()
        not_running = _cli("status", env=env)
        assert not_running.returncode == 2 and "no agent is running" in not_running.stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log_file.close()
    # A restarted agent still knows the job and can stop it.
    daemon = subprocess.Popen(
        [sys.executable, "-m", "argus_agent.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        argus.stop(batch)
        cmd = await eventually(lambda: argus.acked(batch, "stop"), what="stop ack")
        assert cmd["status"] == "started"
        await eventually(
            lambda: (
                not psutil.pid_exists(job_pid)
                or psutil.Process(job_pid).status() == psutil.STATUS_ZOMBIE
            ),
            what="job stopped",
        )
        daemon.send_signal(signal.SIGINT)
        daemon.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert daemon.wait(timeout=10) in (0, 128 + signal.SIGINT)
        assert time.monotonic() - started < 10
    finally:
        if daemon.poll() is None:
            daemon.kill()


# -- jobs and logs -----------------------------------------------------------------------------


def test_jobs_with_no_jobs_prints_the_header_and_a_missing_state_dir_says_so(
    make_settings,
) -> None:
    settings = make_settings()
    env = agent_env(settings)
    state = settings.agent.state_dir

    missing = cli("jobs", env=env)

    assert missing.returncode == 4
    assert f"{state}: no such state dir" in missing.stderr
    assert "argus-agent register" in missing.stderr and "--config" in missing.stderr
    assert "not readable" not in missing.stderr
    state.mkdir(mode=0o700)  # a registered host whose agent never launched a job
    for _ in range(2):  # without a jobs dir, then with an empty one
        empty = cli("jobs", env=env)
        assert empty.returncode == 0, empty.stderr
        assert empty.stdout.split() == ["BATCH", "PID", "USER", "STATE", "STARTED", "EXIT"]
        (state / "jobs").mkdir(mode=0o700, exist_ok=True)


async def test_logs_follow_ends_with_how_the_job_ended(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = agent_env(settings)
    async with RunningAgent(settings) as running:
        failing = argus.rerun(argus.record_batch("sleep 0.5; printf 'no newline'; exit 3"))
        await eventually(lambda: argus.acked(failing, "rerun"), what="the first job running")
        followed = await asyncio.to_thread(cli, "logs", "-f", failing, env=env)
        assert followed.returncode == 0, followed.stderr
        assert followed.stdout.endswith("no newline\n-- job ended: exit code 3 (failed)\n")

        stopped = argus.rerun(argus.record_batch("echo started; exec sleep 300"))
        await eventually(lambda: argus.acked(stopped, "rerun"), what="the second job running")
        follower = asyncio.create_task(asyncio.to_thread(cli, "logs", "-f", stopped, env=env))
        argus.stop(stopped)
        followed = await asyncio.wait_for(follower, 60)
        assert followed.returncode == 0, followed.stderr
        assert followed.stdout.splitlines()[-1] == (
            "-- job ended: killed by signal 15 (SIGTERM), stopped on request of alice (stopped)"
        )
        assert running.agent.jobs is not None
        await eventually(lambda: not running.agent.jobs.running(), what="both jobs ended")
