"""The daemon as users run it: `argus-agent run` in a real process, `status`, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.support import ArgusUser, eventually, register


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
        assert not_running.returncode == 4 and "no agent is running" in not_running.stderr
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
