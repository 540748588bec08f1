"""`argus-agent status` as a monitoring check: exit 0 for a healthy agent with a job (human
and JSON, per-job readings from the sampler and a fake NVML), 1 while its server is down
(answered at once), 2 with no agent and with a hung one; the verdict's rules; 80 columns
with long values; every field of the JSON document documented in docs/status.md; the age
of the outbox's oldest event. Real agent, real server, real CLI processes."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from argus_agent.control import SOCKET_NAME, AgentNotAnswering
from argus_agent.daemon import Agent
from argus_agent.devserver import DevServer
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.outbox import Outbox
from argus_agent.snapshot import SCHEMA
from argus_agent.statuscheck import (
    DEGRADED,
    HEALTHY,
    ask_status,
    health_verdict,
    json_document,
)
from argus_agent.telemetry.gpu import FakeGpuBackend, GpuDevice
from argus_agent.views import format_status
from tests.support import ArgusUser, RunningAgent, agent_env, cli, eventually, register

STATUS_DOC = Path(__file__).parents[1] / "docs" / "status.md"
#: Objects of the document whose keys are data (phases, kinds, loop names), not fields.
MAPS = {
    "commands",
    "health.overdue",
    "telemetry.dropped",
    "telemetry.lost",
    "served_hosts.states",
}
FAST = {"interval_s": 0.5, "log_poll_s": 0.1}


def _too_wide(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > 80]


async def _stop_job(argus: ArgusUser, running: RunningAgent, batch: str) -> None:
    """Press Stop and wait until the job ended: no process may outlive the test."""
    argus.stop(batch)
    await eventually(lambda: argus.acked(batch, "stop"), what="the stop acked")
    assert running.agent.jobs is not None
    await eventually(lambda: not running.agent.jobs.running(), what="the job ended")


# -- against a real agent ------------------------------------------------------------------


async def test_a_healthy_agent_with_a_job_exits_0_and_shows_the_job_and_its_readings(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings(server={"token": user_token}, telemetry=FAST)
    await register(settings, user_token)
    fake = FakeGpuBackend([GpuDevice(0, "GPU-aaaa", "Fake A100", 50.0, 4096.0, 40960.0, 60.0)])
    running = RunningAgent(settings)
    running.agent = Agent(settings, gpu_backend=fake)
    async with running:
        agent = running.agent
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun running")
        assert agent.jobs is not None and agent.telemetry is not None
        pid = agent.jobs.get(batch).pid
        fake.set_processes(0, {pid: 3072.0})
        await eventually(
            lambda: (
                (r := agent.telemetry.latest.get(batch))
                and r["gpu_mem_mb"] == 3072.0
                and r["cpu_pct"] is not None
            ),
            what="a reading of the job with CPU and GPU memory",
        )
        await eventually(lambda: agent.state.channel.state == "connected", what="connected")
        env = agent_env(settings)

        human = await asyncio.to_thread(cli, "status", env=env)

        assert human.returncode == 0, human.stdout + human.stderr
        assert not _too_wide(human.stdout)
        out = human.stdout
        assert "status   healthy (exit 0)" in out
        assert "channel  connected (websocket), connected for" in out
        assert "outbox   " in out and "sender   " in out and "dropped  none" in out
        assert "GPU      fake" in out and "drain    not draining" in out
        header = next(line for line in out.splitlines() if line.lstrip().startswith("BATCH"))
        columns = "BATCH PID USER STATE UPTIME CPU% RSS GPU MEM"
        assert header.split() == columns.split()
        row = next(line for line in out.splitlines() if batch in line).split()
        assert row[0] == batch and row[1] == str(pid) and row[3] == "running"
        assert row[-1] == "3.0G"  # 3072 MiB of GPU memory
        assert re.fullmatch(r"\d+(\.\d)?[KMG]", row[-2]), row  # RSS
        assert re.fullmatch(r"\d+", row[-3]), row  # CPU %

        shown = await asyncio.to_thread(cli, "status", "--json", env=env)

        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["schema"] == SCHEMA == "argus-agent.status.v1"
        assert doc["verdict"] == {"code": 0, "state": "healthy", "reasons": []}
        job = next(j for j in doc["jobs"] if j["batch_id"] == batch)
        assert job["pid"] == pid and job["state"] == "running"
        assert job["gpu_mem_mb"] == 3072.0 and job["rss_bytes"] > 0
        assert job["cpu_pct"] is not None and job["sampled_at"] is not None
        assert doc["gpu"] == {"backend": "fake", "why": None}
        assert doc["drain"]["draining"] is False
        assert doc["telemetry"]["outbox_max_bytes"] == 512 * 1024 * 1024
        await _stop_job(argus, running, batch)


async def test_while_the_server_is_down_status_answers_at_once_and_exits_1(
    make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        channel = running.agent.state.channel
        await eventually(lambda: channel.state == "connected", what="connected")
        server.stop()
        await eventually(lambda: channel.state == "backing_off", what="the server missed")
        path = settings.agent.state_dir / SOCKET_NAME

        started = time.monotonic()
        doc = await asyncio.to_thread(ask_status, path)
        took = time.monotonic() - started

        assert took < 1.0, f"status took {took:.2f} s while the server is down"
        verdict = health_verdict(doc)
        assert verdict.code == DEGRADED
        assert "the server is unreachable or refusing (backing_off)" in verdict.reasons[0]
        env = agent_env(settings)
        human = await asyncio.to_thread(cli, "status", env=env)
        assert human.returncode == 1, human.stdout + human.stderr
        assert "status   degraded (exit 1)" in human.stdout
        assert "- the server is unreachable or refusing" in human.stdout
        assert "channel  backing_off" in human.stdout
        assert not _too_wide(human.stdout)
        shown = await asyncio.to_thread(cli, "status", "--json", env=env)
        assert shown.returncode == 1, shown.stderr
        assert json.loads(shown.stdout)["verdict"]["state"] == "degraded"


def test_with_no_agent_status_exits_2_saying_so_and_where_it_looked(make_settings) -> None:
    settings = make_settings()
    env = agent_env(settings)
    path = settings.agent.state_dir / SOCKET_NAME

    human = cli("status", env=env)

    assert human.returncode == 2, human.stdout + human.stderr
    assert "no agent is running" in human.stderr and str(path) in human.stderr
    assert human.stdout == ""
    shown = cli("status", "--json", env=env)
    assert shown.returncode == 2
    doc = json.loads(shown.stdout)
    assert doc["schema"] == SCHEMA
    assert doc["verdict"]["code"] == 2 and doc["verdict"]["state"] == "unreachable"
    assert str(path) in doc["verdict"]["reasons"][0]


def test_a_hung_agent_is_reported_as_not_answering_with_exit_2(make_settings) -> None:
    settings = make_settings()
    settings.agent.state_dir.mkdir(mode=0o700)
    path = settings.agent.state_dir / SOCKET_NAME
    accepted: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(30)

        def accept_and_say_nothing() -> None:
            for _ in range(2):  # the in-process ask, then the CLI's
                conn, _ = listener.accept()
                accepted.append(conn)

        thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
        thread.start()
        try:
            with pytest.raises(AgentNotAnswering, match=r"did not answer within 0\.3 s"):
                ask_status(path, timeout=0.3)
            started = time.monotonic()
            result = cli("status", env=agent_env(settings))
            took = time.monotonic() - started
        finally:
            thread.join(35)
            for conn in accepted:
                conn.close()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "did not answer within 2 s" in result.stderr
    assert took < 30, "a hung agent must not hang the check"


# -- the verdict, the rendering --------------------------------------------------------------


def _document(**changes: Any) -> dict[str, Any]:
    """A status document of a healthy agent, changed by ``changes`` (dotted paths)."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 11100.0,
        "hostname": "gpu-07",
        "server_url": "https://argus.example.com",
        "agent_id": "agent-e523f525a50d",
        "state_dir": "/var/lib/argus-agent",
        "channel": {"state": "connected", "kind": "websocket", "transport": "auto"},
        "commands": {"acked": 3},
        "health": {"loops": ["channel", "sender"], "overdue": {}},
        "drain": {"draining": False, "since": None, "by": None, "reason": None},
        "gpu": {"backend": "nvml", "why": None},
        "warnings": [],
        "telemetry": {
            "outbox_queued": 0,
            "outbox_bytes": 0,
            "outbox_max_bytes": 100 * 1024 * 1024,
            "outbox_oldest_age_s": None,
            "dropped": {},
            "lost": {},
            "write_errors": 0,
            "sender": {"state": "idle", "sent": 5, "rejected": 0, "via": "websocket"},
        },
        "damaged_state": {"recovered": [], "quarantined_jobs": []},
        "jobs": [],
    }
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = doc
        for part in parents:
            target = target[part]
        target[last] = value
    return doc


MIB100 = 100 * 1024 * 1024


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"channel__state": "backing_off", "channel__last_error": "cannot connect"}, "unreachable"),
        ({"channel__state": "auth_rejected"}, "rejects the agent token"),
        ({"channel__state": "starting"}, "not yet in contact"),
        ({"telemetry__sender": {"state": "auth_rejected", "last_error": "401"}}, "reporter"),
        ({"telemetry__sender": {"state": "backing_off", "last_error": "503"}}, "not delivered"),
        ({"telemetry__outbox_bytes": int(MIB100 * 0.9)}, "outbox is near its cap: 90%"),
        (
            {"drain": {"draining": True, "since": 1.0, "by": "root", "reason": "new GPUs"}},
            "new GPUs",
        ),
        ({"health__overdue": {"sampler": 75.2}}, "sampler (stuck 75 s)"),
        ({"damaged_state__recovered": [{"file": "outbox.db", "path": "/x"}]}, "outbox.db"),
        ({"damaged_state__quarantined_jobs": [{"batch_id": "b", "path": "/y"}]}, "quarantined"),
    ],
)
def test_each_degraded_condition_exits_1_with_its_reason(
    changes: dict[str, Any], reason: str
) -> None:
    verdict = health_verdict(_document(**changes))
    assert verdict.code == DEGRADED and verdict.state == "degraded"
    assert len(verdict.reasons) == 1 and reason in verdict.reasons[0], verdict.reasons
    assert reason in format_status(_document(**changes), verdict)


def test_healthy_is_none_of_them() -> None:
    healthy = health_verdict(_document(telemetry__outbox_bytes=int(MIB100 * 0.89)))
    assert healthy.code == HEALTHY and healthy.reasons == ()
    # Neither polling, a missing reporter token nor a rate-limited sender is degraded.
    doc = _document(channel__kind="poll", telemetry__sender={"state": "no_token"})
    assert health_verdict(doc).code == HEALTHY
    doc = _document(telemetry__sender={"state": "rate_limited", "last_error": "429"})
    assert health_verdict(doc).code == HEALTHY
    assert json_document(doc, health_verdict(doc))["verdict"] == {
        "code": 0,
        "state": "healthy",
        "reasons": [],
    }


def test_the_output_fits_80_columns_with_long_ids_names_errors_and_paths() -> None:
    now = time.time()
    long_batch = "rerun-" + "9" * 90
    long_user = "a-user-with-a-name-far-longer-than-any-column-should-have"
    jobs = [
        {
            "batch_id": long_batch,
            "pid": 4_194_303,
            "run_as": long_user,
            "state": "running",
            "uptime_s": 400_000.0,
            "cpu_pct": 1598.6,
            "rss_bytes": 812 * 1024**3,
            "gpu_mem_mb": 81_920.0,
            "log_error": "writing the log failed: No space left on device " * 3,
        },
        {
            "batch_id": "rerun-5b1e0c9a3d21",
            "pid": 981,
            "run_as": "bob",
            "state": "ended",
            "exit_code": None,
            "exit_signal": 9,
            "uptime_s": 12.0,
            "ended_at": now,
        },
    ]
    doc = _document(
        state_dir="/srv/" + "very-long-directory-name/" * 6 + "argus-agent",
        hostname="h" * 120,
        channel__state="backing_off",
        channel__why="the server has no websocket endpoint (HTTP 403) " * 2,
        channel__last_error="GET /api/agents/agent-1/jobs: cannot connect " * 4,
        channel__state_since=now - 300,
        warnings=["the server handed this per-user agent 3 command(s) for other users " * 3],
        damaged_state__recovered=[
            {"file": "outbox.db", "path": "/elsewhere/" + "d" * 150, "at": now, "reason": "x"}
        ],
        jobs=jobs,
    )

    text = format_status(doc)

    assert not _too_wide(text), _too_wide(text)
    row = next(line for line in text.splitlines() if line.startswith("  rerun-9"))
    assert "…" in row.split()[0], "a batch id too long for its column ends in an ellipsis"
    assert "1599" in row and "812.0G" in row and "80.0G" in row
    assert any(line.split()[3] == "SIGKILL" for line in text.splitlines() if "rerun-5b1e" in line)
    assert "status   degraded (exit 1)" in text


# -- the schema and its documentation ---------------------------------------------------------


def _fields(value: Any, prefix: str = "") -> set[str]:
    """Every field path of a JSON value: ``a.b`` for objects, ``a[].b`` for lists of them."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found.add(path)
            if path not in MAPS:
                found |= _fields(item, path)
    elif isinstance(value, list):
        for item in value:
            found |= _fields(item, f"{prefix}[]")
    return found


def _documented() -> set[str]:
    rows = re.findall(r"^\| `([^`]+)` \|", STATUS_DOC.read_text(), flags=re.MULTILINE)
    return set(rows)


async def test_every_field_the_agent_emits_is_documented_in_docs_status_md(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings(server={"token": user_token}, telemetry=FAST)
    await register(settings, user_token)
    # Damage of every kind, so that the lists of damaged things have entries to check.
    state = settings.agent.state_dir
    (state / "outbox.db").write_bytes(b"not a database, " * 512)
    (state / "state.db").write_bytes(b"not a database either, " * 512)
    bad = state / "jobs" / "rerun-0000000000cc"
    bad.mkdir(parents=True, mode=0o700)
    (bad / "job.json").write_text(json.dumps({"batch_id": "rerun-0000000000cc"}))
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun running")
        assert running.agent.telemetry is not None
        await eventually(lambda: running.agent.telemetry.latest, what="a reading of the job")
        doc = await asyncio.to_thread(ask_status, state / SOCKET_NAME)
        await _stop_job(argus, running, batch)

    emitted = _fields(json_document(doc, health_verdict(doc)))

    for sample in ("damaged_state.recovered[].path", "damaged_state.quarantined_jobs[].reason"):
        assert sample in emitted, "the document checked must have damaged entries"
    assert "jobs[].cpu_pct" in emitted and "verdict.reasons" in emitted
    undocumented = sorted(emitted - _documented())
    assert not undocumented, f"fields missing in {STATUS_DOC}: {undocumented}"


# -- the figures behind it -------------------------------------------------------------------


async def test_the_outbox_knows_the_time_of_its_oldest_event_across_sends_drops_and_restarts(
    tmp_path: Path,
) -> None:
    source = EventSource(project="p", host="h")

    def event(at: float) -> Any:
        return make_event("resource_snapshot", EventKind.SNAPSHOT, "b-1", source, {}, timestamp=at)

    size = len(event(1.0).body)
    box = Outbox(tmp_path / "outbox.db", max_bytes=2 * size)  # two events fit
    await box.start()
    try:
        assert box.stats().oldest_at is None
        await box.put([event(100.0)])
        await box.put([event(200.0)])
        assert box.stats().oldest_at == 100.0
        first = await box.peek(1)
        await box.remove([first[0].seq])  # sent
        assert box.stats().oldest_at == 200.0
        await box.put([event(300.0)])
        await box.put([event(400.0)])  # past the cap: the oldest (200) is dropped
        assert box.stats().dropped == {"snapshot": 1}
        assert box.stats().oldest_at == 300.0
    finally:
        await box.close()
    again = Outbox(tmp_path / "outbox.db", max_bytes=2 * size)
    await again.start()
    try:
        assert again.stats().oldest_at == 300.0
        await again.remove([chunk.seq for chunk in await again.peek(10)])
        assert again.stats().oldest_at is None
    finally:
        await again.close()
