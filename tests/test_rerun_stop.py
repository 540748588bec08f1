"""Rerun and stop end to end: the reference server on a real socket, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

from argus_agent.protocol import Command
from tests.support import (
    FIXTURES,
    HOST,
    OS_USER,
    ArgusUser,
    RunningAgent,
    alive,
    eventually,
    local_dispatcher,
    register,
)

PY = shlex.quote(sys.executable)


async def test_rerun_runs_recorded_command_with_cwd_env_and_overrides(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    report = tmp_path / "report.json"
    command = f"{PY} {FIXTURES / 'report_env.py'} --epochs 3"
    source = argus.record_batch(
        command,
        cwd=str(workdir),
        env={"FROM_PAYLOAD": "yes", "REPORT_PATH": str(report), "SLEEP_S": "60"},
    )
    async with RunningAgent(settings) as running:
        new_batch = argus.rerun(source, {"lr": 0.01, "model.name": "it's big", "amp": True})
        await eventually(report.exists, what="the job's report")
        seen = json.loads(report.read_text())
        assert seen["argv"] == ["--epochs", "3", "lr=0.01", "model.name=it's big", "amp=true"]
        assert seen["cwd"] == str(workdir)
        assert seen["env"]["FROM_PAYLOAD"] == "yes"
        assert seen["env"]["ARGUS_BATCH_ID"] == new_batch
        assert seen["env"]["ARGUS_SOURCE_BATCH_ID"] == source
        assert seen["env"]["ARGUS_URL"] == settings.server.url
        assert seen["env"]["PATH"]  # the agent's base environment is kept
        assert seen["pgid"] == seen["sid"]  # new session and process group
        cmd = await eventually(lambda: argus.acked(new_batch, "rerun"), what="the ack")
        assert cmd["status"] == "started"
        job = running.agent.jobs.get(new_batch)
        assert job is not None
        assert cmd["pid"] == job.pid
        assert argus.batch(new_batch)["status"] == "running"
        log_path = Path(job.log_path)
        assert log_path.is_relative_to(settings.agent.state_dir)
        await eventually(lambda: "report written" in log_path.read_text(), what="job log")
        record = json.loads((log_path.parent / "job.json").read_text())
        assert record["batch_id"] == new_batch and record["cmd_id"] == cmd["id"]
        assert record["command_line"].startswith(command)
        started = json.loads((log_path.parent / "started.json").read_text())
        assert started["pid"] == job.pid
        # stop it, so nothing outlives the test
        argus.stop(new_batch)
        await eventually(lambda: not alive(job.pid), what="job to stop")


async def test_stop_kills_whole_tree_including_grandchild(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings(jobs={"stop_grace_s": 2.0})
    await register(settings, user_token)
    pids_file = tmp_path / "pids"
    source = argus.record_batch(f"{PY} {FIXTURES / 'fork_tree.py'} {pids_file}")
    async with RunningAgent(settings) as running:
        new_batch = argus.rerun(source)
        await eventually(pids_file.exists, what="the tree")
        pids = [int(p) for p in pids_file.read_text().split()]
        assert all(alive(p) for p in pids)
        root = running.agent.jobs.get(new_batch)
        argus.stop(new_batch)
        started = time.monotonic()
        await eventually(
            lambda: not any(alive(p) for p in pids),
            timeout=2.0 + 1.0,
            what="the whole tree to die within grace + 1 s",
        )
        assert time.monotonic() - started <= 3.0
        stop_cmd = await eventually(lambda: argus.acked(new_batch, "stop"), what="stop ack")
        assert stop_cmd["status"] == "started"
        assert stop_cmd["pid"] == root.pid
        ended = await running.agent.jobs.wait_ended(new_batch, timeout=5)
        assert ended.stop_requested_by == "alice"
        assert ended.exit_signal is not None or ended.exit_code is not None


async def test_sigterm_ignoring_job_is_killed_after_grace(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    grace = 1.0
    settings = make_settings(jobs={"stop_grace_s": grace})
    await register(settings, user_token)
    pid_file = tmp_path / "pid"
    source = argus.record_batch(f"exec {PY} {FIXTURES / 'ignore_term.py'} {pid_file}")
    async with RunningAgent(settings) as running:
        new_batch = argus.rerun(source)
        await eventually(pid_file.exists, what="the job")
        await eventually(
            lambda: (
                "ignoring SIGTERM" in Path(running.agent.jobs.get(new_batch).log_path).read_text()
            ),
            what="handler installed",
        )
        pid = int(pid_file.read_text())
        argus.stop(new_batch)
        stop_sent = time.monotonic()
        await eventually(lambda: argus.acked(new_batch, "stop"), what="ack")
        assert alive(pid), "a SIGTERM-ignoring job must survive until the grace period ends"
        ended = await running.agent.jobs.wait_ended(new_batch, timeout=grace + 5)
        assert time.monotonic() - stop_sent >= grace * 0.9
        assert ended.exit_signal == 9
        assert not alive(pid)


async def test_failed_launches_are_acked_failed_with_reasons(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    cases = {
        argus.record_batch(None): "recorded no command",
        argus.record_batch("   "): "payload.command is empty",
        argus.record_batch("echo hi", cwd=str(tmp_path / "gone")): "does not exist",
        argus.record_batch("echo hi", cwd="relative/dir"): "expected an absolute path",
    }
    bad_shell = make_settings(jobs={"shell": ["/nonexistent/shell", "-c"]})
    async with RunningAgent(settings) as running:
        reruns = {argus.rerun(source): reason for source, reason in cases.items()}
        for batch, reason in reruns.items():
            cmd = await eventually(lambda b=batch: argus.acked(b, "rerun"), what=f"ack of {batch}")
            assert cmd["status"] == "failed"
            assert reason in cmd["error"], cmd
            assert argus.batch(batch)["status"] == "requested"
            assert running.agent.jobs.get(batch) is None
    async with RunningAgent(bad_shell) as running:
        batch = argus.rerun(argus.record_batch("echo hi"))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        assert cmd["status"] == "failed"
        assert "cannot start /nonexistent/shell" in cmd["error"]
        assert running.agent.jobs.get(batch) is None
        assert not (settings.agent.state_dir / "jobs" / batch).exists()


async def test_stop_for_unknown_batch_is_acked_failed(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    running_elsewhere = argus.record_batch("python train.py", done=False)
    async with RunningAgent(settings):
        argus.stop(running_elsewhere)
        cmd = await eventually(lambda: argus.acked(running_elsewhere, "stop"), what="stop ack")
        assert cmd["status"] == "failed"
        assert cmd["error"] == f"no job for batch {running_elsewhere} on this host"


async def test_redelivered_command_runs_once_also_after_restart(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    # Acks are lost through REST faults: the agent must poll (and ack over REST).
    settings = make_settings(server={"transport": "poll"})
    agent_id = await register(settings, user_token)
    counter = tmp_path / "runs"
    source = argus.record_batch(f"echo run >> {shlex.quote(str(counter))}; sleep 30")
    # Every ack is lost (500), so the server keeps redelivering the command.
    argus.fault(f"/api/agents/{agent_id}/jobs/", 500, count=10_000)
    async with RunningAgent(settings) as running:
        new_batch = argus.rerun(source)
        await eventually(counter.exists, what="first launch")
        await eventually(
            lambda: argus.command_for(new_batch, "rerun")["deliveries"] >= 3, what="redeliveries"
        )
        pid = running.agent.jobs.get(new_batch).pid
        assert argus.acked(new_batch, "rerun") is None
    argus.clear_faults()
    # A new agent on the same state dir gets the command again: it acks, it does not relaunch.
    async with RunningAgent(settings) as second:
        cmd = await eventually(lambda: argus.acked(new_batch, "rerun"), what="the ack")
        assert cmd["status"] == "started" and cmd["pid"] == pid
        assert second.agent.jobs.get(new_batch).pid == pid
        # and later polls never relaunch it either
        polls = second.agent.state.channel.last_ok_at
        await eventually(lambda: second.agent.state.channel.last_ok_at != polls, what="poll")
    assert counter.read_text().count("run") == 1
    os.killpg(pid, 9)


def _local_rerun(cmd_id: str, batch_id: str, cwd: Path) -> Command:
    """A rerun of ``exec sleep 30`` on this host, as the server would send it now."""
    payload = {"command": "exec sleep 30", "cwd": str(cwd), "host": HOST}
    payload |= {"requested_by": "alice", "env": {"USER": OS_USER}}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Command(id=cmd_id, kind="rerun", batch_id=batch_id, payload=payload, created_at=now)


async def test_a_command_delivered_twice_at_once_is_acted_on_and_acked_once(
    make_settings, tmp_path: Path
) -> None:
    """A served name's command can come on the websocket and in a poll at the same moment:
    the second delivery, while the first is being handled, is neither acted on nor taken
    for one an agent restart interrupted (which would ack it failed)."""
    acks: list[tuple[str, str, int | None, str | None]] = []

    async def ack(cmd_id: str, status: str, pid: int | None, error: str | None) -> None:
        acks.append((cmd_id, status, pid, error))

    rerun = _local_rerun("c-twice", "rerun-0123456789ab", tmp_path)
    async with local_dispatcher(make_settings()) as dispatcher:
        await asyncio.gather(dispatcher.handle(rerun, ack), dispatcher.handle(rerun, ack))
        assert [(c, status) for c, status, _, _ in acks] == [("c-twice", "started")], acks
        record = dispatcher.jobs.get("rerun-0123456789ab")
        assert record is not None and acks[0][2] == record.pid


async def test_two_reruns_at_once_never_pass_the_capacity_check_together(
    make_settings, tmp_path: Path
) -> None:
    """Reruns from two channels at once (the websocket and a served name's poll): with room
    for one job, one starts and the other is refused "host is full"."""
    acks: dict[str, tuple[str, str | None]] = {}

    async def ack(cmd_id: str, status: str, pid: int | None, error: str | None) -> None:
        acks[cmd_id] = (status, error)

    reruns = [_local_rerun(f"c-{i}", f"rerun-00000000000{i}", tmp_path) for i in (1, 2)]
    async with local_dispatcher(make_settings(jobs={"max_jobs": 1})) as dispatcher:
        await asyncio.gather(*(dispatcher.handle(c, ack) for c in reruns))
        assert sorted(status for status, _ in acks.values()) == ["failed", "started"], acks
        assert any(error and "host is full" in error for _, error in acks.values())


async def test_unknown_and_malformed_commands_are_refused(
    argus: ArgusUser, make_settings, user_token: str, server
) -> None:
    settings = make_settings()
    agent_id = await register(settings, user_token)
    hostile = [
        ("reboot", "b-1", {}, "command kind 'reboot' is not supported by this agent version"),
        ("rerun", "../../etc", {"command": "id"}, "unsafe shape"),
        ("rerun", "rerun-aaaaaaaaaaaa", {"command": ["rm", "-rf"]}, "expected a string"),
        (
            "rerun",
            "rerun-bbbbbbbbbbbb",
            {"command": "id", "env": {"A=B": "x"}},
            "not a valid variable name",
        ),
        (
            "rerun",
            "rerun-cccccccccccc",
            {"command": "id", "overrides": {"x": {"y": 1}}},
            "expected a scalar",
        ),
    ]
    ids = [
        server.inject_command(agent_id, kind, batch, payload) for kind, batch, payload, _ in hostile
    ]
    async with RunningAgent(settings) as running:
        for cmd_id, (_, _, _, reason) in zip(ids, hostile, strict=True):
            cmd = await eventually(
                lambda c=cmd_id: next(
                    (x for x in argus.commands() if x["id"] == c and x["status"] != "pending"), None
                ),
                what=reason,
            )
            assert cmd["status"] == "failed"
            assert reason in cmd["error"]
        assert running.agent.jobs.records() == []
        assert running.agent.state.channel.state == "connected"
