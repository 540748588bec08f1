"""Configuration reload (SIGHUP, `systemctl reload`): the pure plan, applying it to a running
agent, and a real `argus-agent run` process reloaded with a valid and an invalid config."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argus_agent import control
from argus_agent.audit import AuditLog
from argus_agent.config import Settings
from argus_agent.errors import ConfigError
from argus_agent.reload import RUNTIME, Reloader, plan_reload
from argus_agent.systemd import Notifier
from tests.support import ArgusUser, RunningAgent, agent_env, cli, eventually, register
from tests.test_daemon_health import FakeSystemd


def _settings(**sections: dict) -> Settings:
    return Settings.model_validate(
        {"server": {"url": "http://127.0.0.1:8000"}, "agent": {"state_dir": "/tmp/x"}, **sections}
    )


# -- the plan: pure -------------------------------------------------------------------------


def test_runtime_keys_are_applied_and_the_others_named_for_a_restart() -> None:
    running = _settings(jobs={"stop_grace_s": 20, "users": {"alice": "alice"}})
    new = _settings(
        agent={"state_dir": "/tmp/y", "log_level": "DEBUG", "heartbeat_interval_s": 5},
        jobs={"stop_grace_s": 3, "users": {}, "allow_root": True, "env_deny": ["X"]},
        telemetry={"interval_s": 1, "logs": False, "gpu": "none"},
        server={"url": "http://127.0.0.1:8000", "timeout_s": 20, "transport": "poll"},
    )
    plan = plan_reload(running, new)
    assert plan.applied == (
        "agent.log_level",
        "agent.heartbeat_interval_s",
        "jobs.stop_grace_s",
        "jobs.users",
        "jobs.allow_root",
        "jobs.env_deny",
        "telemetry.interval_s",
        "telemetry.logs",
    )
    assert plan.needs_restart == (
        "server.timeout_s",
        "server.transport",
        "agent.state_dir",
        "telemetry.gpu",
    )
    after = plan.settings
    assert (after.jobs.stop_grace_s, after.jobs.users, after.agent.log_level) == (3, {}, "debug")
    # What needs a restart keeps running as it was.
    assert after.agent.state_dir == Path("/tmp/x") and after.server.timeout_s == 10
    assert after.server.transport == "auto" and after.telemetry.gpu == "auto"
    # Nothing changed: nothing to do.
    same = plan_reload(running, running)
    assert (same.applied, same.needs_restart, same.settings) == ((), (), running)


def test_every_runtime_key_is_a_config_key() -> None:
    for section, keys in RUNTIME.items():
        assert keys <= set(type(getattr(Settings(), section)).model_fields), section
    assert "server" not in RUNTIME  # a new server, token or transport needs a restart


def test_operations_doc_names_every_key_a_reload_does_not_apply() -> None:
    """docs/operations.md's reload section must name each key that needs a restart (a key
    added to the config later fails here until the doc says so)."""
    text = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    start = text.index("keeps the running value of everything else")
    section = text[start : text.index("`systemctl restart argus-agent` then", start)]
    missing = [
        f"{name}.{key}"
        for name, part in Settings.model_fields.items()
        if name != "server"  # "every `server.*` key"
        for key in part.annotation.model_fields  # type: ignore[union-attr]
        if key not in RUNTIME.get(name, frozenset())
        and f"`{name}.{key}`" not in section
        and f"`.{key}`" not in section
    ]
    assert missing == [], f"docs/operations.md does not say these need a restart: {missing}"


def test_server_url_unset_means_the_registered_one() -> None:
    running = _settings(server={"url": "https://argus.example.com"})
    unset = Settings.model_validate({"agent": {"state_dir": "/tmp/x"}})
    assert plan_reload(running, unset).needs_restart == ()
    respelled = _settings(server={"url": "HTTPS://Argus.example.com:443/"})
    assert plan_reload(running, respelled).needs_restart == ()
    moved = _settings(server={"url": "https://other.example.com"})
    plan = plan_reload(running, moved)
    assert plan.needs_restart == ("server.url",)
    assert plan.settings.server.url == "https://argus.example.com"


def test_switching_telemetry_on_needs_a_restart_for_gpu_readings_only_if_it_started_off() -> None:
    off = _settings(telemetry={"enabled": False})
    on = _settings()
    assert plan_reload(off, on, gpu_opened=True).needs_restart == ()
    plan = plan_reload(off, on, gpu_opened=False)
    assert plan.applied == ("telemetry.enabled",)
    assert plan.needs_restart == (
        "telemetry.enabled (GPU readings: telemetry was off at start-up)",
    )
    assert plan_reload(
        off, _settings(telemetry={"gpu": "none"}), gpu_opened=False
    ).needs_restart == ("telemetry.gpu",)


def test_new_values_that_clash_with_the_running_ones_are_refused() -> None:
    # stall_timeout_s must exceed server.timeout_s; the new file lowers both, but the
    # timeout only changes with a restart.
    running = _settings(agent={"state_dir": "/tmp/x", "stall_timeout_s": 60})
    new = _settings(server={"timeout_s": 5}, agent={"state_dir": "/tmp/x", "stall_timeout_s": 8})
    with pytest.raises(ConfigError, match=r"expected a number > server.timeout_s \(10\)"):
        plan_reload(running, new)


# -- applying it to a running agent -----------------------------------------------------------


def _reload_messages(systemd: FakeSystemd) -> list[str]:
    """The RELOADING/READY messages systemd got since the last call."""
    systemd.messages.clear()
    return [m for m in systemd.drain() if m.startswith(("RELOADING=1", "READY=1"))]


async def test_a_reload_applies_policy_and_intervals_at_once_and_refuses_a_bad_config(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(telemetry={"interval_s": 3600, "gpu": "none"})
    await register(settings, user_token)
    systemd = FakeSystemd(tmp_path / "notify.sock")
    async with RunningAgent(settings) as running:
        agent = running.agent
        agent.notifier = Notifier(str(tmp_path / "notify.sock"))
        first = argus.rerun(argus.record_batch("sleep 60"))
        await eventually(lambda: argus.acked(first, "rerun"), what="the first job")
        sent = agent.telemetry.snapshots_sent

        wanted = settings.model_copy(
            update={
                "jobs": settings.jobs.model_copy(update={"max_jobs": 1, "stop_grace_s": 0.5}),
                "telemetry": settings.telemetry.model_copy(update={"interval_s": 0.5}),
            }
        )
        reloader = Reloader(agent, lambda: wanted)
        before_us = time.monotonic_ns() // 1000
        plan = await reloader.reload()
        assert plan is not None
        assert plan.applied == ("jobs.stop_grace_s", "jobs.max_jobs", "telemetry.interval_s")
        told = _reload_messages(systemd)
        assert told[1] == f"READY=1\nSTATUS=serving {agent.settings.server.url} (auto)"
        reloading, usec = told[0].split("\n")
        assert reloading == "RELOADING=1"
        assert before_us <= int(usec.removeprefix("MONOTONIC_USEC=")) <= time.monotonic_ns() // 1000
        # The new policy refuses a second job; the new interval samples at once, not in an hour.
        second = argus.rerun(argus.record_batch("echo two"))
        cmd = await eventually(lambda: argus.acked(second, "rerun"), what="the refusal")
        assert cmd["status"] == "failed" and cmd["error"].startswith("host is full: 1 job(s)")
        await eventually(
            lambda: agent.telemetry.snapshots_sent >= sent + 2, what="snapshots on the new interval"
        )

        def broken() -> Settings:
            raise ConfigError("config.toml: jobs.stop_grace_s: expected a number >= 0, got -1")

        reloader.load = broken
        assert await reloader.reload() is None
        told = _reload_messages(systemd)
        assert told[0].startswith("RELOADING=1") and told[1].startswith("READY=1")
        assert agent.settings.jobs.max_jobs == 1 and agent.jobs.settings.stop_grace_s == 0.5
        record = await agent.jobs.stop(first, "test")  # the reloaded grace period is used
        assert record.stop_grace_s == 0.5
        await agent.jobs.wait_ended(first, timeout=10)
    systemd.close()
    records = AuditLog(settings.agent.state_dir / "audit.log").read()
    reloads = [r for r in records if r["action"].startswith("config_reload")]
    assert reloads[0]["action"] == "config_reload" and reloads[0]["needs_restart"] == []
    assert reloads[1] == {
        "ts": reloads[1]["ts"],
        "action": "config_reload_refused",
        "error": "config.toml: jobs.stop_grace_s: expected a number >= 0, got -1",
    }


# -- a real daemon and SIGHUP ---------------------------------------------------------------


def _log_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def _event(path: Path, event: str) -> list[dict]:
    return [line for line in _log_lines(path) if line.get("event") == event]


async def test_sighup_reloads_a_valid_config_and_keeps_the_old_one_for_an_invalid_one(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    config = tmp_path / "config.toml"
    config.write_text("[jobs]\nstop_grace_s = 7\n")
    env = agent_env(settings, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    del env["ARGUS_AGENT_JOBS_STOP_GRACE_S"]  # the file decides it
    systemd = FakeSystemd(tmp_path / "notify.sock")
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "argus_agent.cli", "--config", str(config), "run"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    sock = settings.agent.state_dir / control.SOCKET_NAME

    def reloads() -> list[str]:
        return [m for m in systemd.drain() if m.startswith(("RELOADING=1", "READY=1"))]

    operator_config = tmp_path / "operator.toml"  # the CLI's own, valid while config is not
    operator_config.write_text("")

    def stop_line(batch: str) -> str:
        result = cli("--config", str(operator_config), "stop", batch, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        await eventually(lambda: sock.exists() and control.query_status(sock), what="the agent")
        await eventually(lambda: any(m.startswith("READY=1") for m in reloads()), what="READY")
        jobs = [argus.rerun(argus.record_batch("sleep 60")) for _ in range(2)]
        for batch in jobs:
            await eventually(lambda b=batch: argus.acked(b, "rerun"), what="a job")
        systemd.messages.clear()

        config.write_text(
            "[jobs]\nstop_grace_s = 3\n[agent]\nlog_level = 'debug'\n"
            "[server]\ntimeout_s = 20\n[telemetry]\ninterval_s = 2\n"
        )
        daemon.send_signal(signal.SIGHUP)
        applied = await eventually(
            lambda: _event(log_path, "configuration reloaded; applied"), what="the reload"
        )
        assert applied[0]["changed"] == [
            "agent.log_level",
            "jobs.stop_grace_s",
            "telemetry.interval_s",
        ]
        restart = _event(
            log_path,
            "configuration changed but needs a restart to take effect (running jobs keep "
            "running); the running values stay until then",
        )
        assert restart[0]["needs_restart"] == ["server.timeout_s"]
        told = await eventually(lambda: len(m := reloads()) >= 2 and m, what="notify messages")
        assert told[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and told[1].startswith("READY=1")
        assert "SIGKILL after 3 s" in await asyncio.to_thread(stop_line, jobs[0])

        config.write_text("[jobs]\nstop_grace_s = -1\n")
        daemon.send_signal(signal.SIGHUP)
        refused = await eventually(
            lambda: _event(
                log_path, "configuration reload refused; the running configuration is kept"
            ),
            what="the refusal",
        )
        assert refused[0]["error"].startswith(
            "config.toml: jobs.stop_grace_s: expected a number >= 0"
        )
        told = await eventually(lambda: len(m := reloads()) >= 4 and m, what="notify messages")
        assert told[2].startswith("RELOADING=1") and told[3].startswith("READY=1")
        assert daemon.poll() is None
        assert "SIGKILL after 3 s" in await asyncio.to_thread(stop_line, jobs[1])
        # The broken file does not lock the operator out of the agent running on the old one.
        asked = await asyncio.to_thread(cli, "--config", str(config), "status", env=env)
        assert asked.returncode in (0, 1), asked.stderr
        assert "warning: " in asked.stderr and "jobs.stop_grace_s" in asked.stderr
        assert "jobs" in asked.stdout
        listed = await asyncio.to_thread(
            cli,
            "--config",
            str(config),
            "jobs",
            "--state-dir",
            str(settings.agent.state_dir),
            env={k: v for k, v in env.items() if k != "ARGUS_AGENT_AGENT_STATE_DIR"},
        )
        assert listed.returncode == 0 and jobs[1] in listed.stdout, listed.stderr
        for batch in jobs:
            await eventually(lambda b=batch: _ended_in_status(sock, b), what="the jobs to end")
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        systemd.close()
    assert user_token not in log_path.read_text()


def _ended_in_status(sock: Path, batch: str) -> bool:
    jobs = control.query_status(sock)["jobs"]
    return any(j["batch_id"] == batch and j["ended_at"] for j in jobs)
