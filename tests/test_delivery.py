"""Nothing lost, nothing twice: telemetry through ten server outages, and through a SIGKILL of
the agent mid-stream. Counted by event_id and line number on the reference server."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

import pytest

from argus_agent.devserver import DevServer
from argus_agent.outbox import Outbox
from tests.support import (
    FIXTURES,
    AgentProcess,
    ArgusUser,
    RunningAgent,
    agent_env,
    eventually,
    register,
    server_events,
)

PY = shlex.quote(sys.executable)


async def test_ten_server_outages_lose_nothing_and_duplicate_nothing(
    argus: ArgusUser,
    make_settings,
    user_token: str,
    server: DevServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    produced: list[tuple[str, str]] = []
    original_put = Outbox.put

    async def recording_put(self, events, offsets=(), *, chunks=()):
        await original_put(self, events, offsets, chunks=chunks)
        produced.extend((e.batch_id, e.event_id) for e in events)
        produced.extend((c.batch_id, i) for c in chunks for i in c.event_ids)

    monkeypatch.setattr(Outbox, "put", recording_put)
    settings = make_settings(
        server={"token": user_token}, telemetry={"interval_s": 0.5, "log_poll_s": 0.1}
    )
    await register(settings, user_token)
    lines = 200
    current = server
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'chatty.py'} {lines} 0.03 0"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="launch")
        for _ in range(10):
            await asyncio.sleep(0.4)
            current.stop()
            await asyncio.sleep(0.3)
            current = DevServer(
                db_path=server.db_path,
                port=server.port,
                poll_interval_s=0.2,
                ingest_rate_limit=False,
            )
            current.start()
        try:
            await eventually(
                lambda: server_events(current.url, batch, "batch_done"),
                timeout=30,
                what="the job's end to arrive",
            )
            await eventually(
                lambda: running.agent.outbox.stats().queued == 0,
                timeout=30,
                what="the outbox to drain",
            )
            stored = server_events(current.url, batch)
        finally:
            await running.stop()
            current.stop()
    mine = {event_id for b, event_id in produced if b == batch}
    assert len(stored) == len({e["event_id"] for e in stored}), "an event arrived twice"
    assert {e["event_id"] for e in stored if e["event_id"] in mine} == mine, "an event was lost"
    numbers = Counter(e["data"]["line_no"] for e in stored if e["event_type"] == "log_line")
    assert sorted(numbers) == list(range(1, lines + 1)) and set(numbers.values()) == {1}
    snapshots = [e for e in stored if e["event_type"] == "resource_snapshot"]
    assert len(snapshots) >= 5
    assert [e["event_type"] for e in stored].count("batch_done") == 1


async def test_sigkill_of_the_agent_mid_stream_loses_no_line_and_repeats_none(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = agent_env(
        settings,
        ARGUS_TOKEN=user_token,
        ARGUS_AGENT_TELEMETRY_INTERVAL_S="0.5",
        ARGUS_AGENT_TELEMETRY_LOG_POLL_S="0.05",
    )
    lines = 300
    first = AgentProcess(env, tmp_path / "agent1.log")
    try:
        await first.status()
        batch = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'chatty.py'} {lines} 0.02 0"))
        await eventually(
            lambda: len(server_events(server.url, batch, "log_line")) > 50, what="lines flowing"
        )
    finally:
        first.kill()
    assert len(server_events(server.url, batch, "log_line")) < lines, "killed mid-stream"
    await asyncio.sleep(1.0)
    second = AgentProcess(env, tmp_path / "agent2.log")
    try:
        await eventually(
            lambda: server_events(server.url, batch, "batch_done"),
            timeout=30,
            what="batch_done after the restart",
        )
        await asyncio.sleep(0.5)
        stored = server_events(server.url, batch)
    finally:
        second.stop()
    numbers = Counter(e["data"]["line_no"] for e in stored if e["event_type"] == "log_line")
    assert sorted(numbers) == list(range(1, lines + 1)), "a line was lost"
    assert set(numbers.values()) == {1}, "a line was sent twice"
    assert [e["event_type"] for e in stored].count("batch_done") == 1
    assert os.path.exists(settings.agent.state_dir / "outbox.db")
