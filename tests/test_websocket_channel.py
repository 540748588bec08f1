"""The websocket channel (``server.transport``): commands pushed over ``argus-agent.v1``, events
on the same socket, polling as the fallback.

End to end against the reference server on 127.0.0.1:0, in-process (``DevServer``). The
server as a real process that is SIGKILLed or SIGSTOPped is in ``test_websocket_outages.py``;
a hostile or forgetful server of the test's own in ``test_websocket_hostile.py``. No timed
assertions: the figures (rerun latency, detection time) are measured in ``bench/``.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from argus_agent.channels import auto
from argus_agent.config import Settings, load_settings
from argus_agent.devserver import DevServer
from argus_agent.errors import ConfigError
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.health import Health
from argus_agent.views import format_status
from tests.support import (
    ArgusUser,
    RunningAgent,
    eventually,
    on_websocket,
    register,
    server_commands,
    server_events,
    settings_for,
)

PY = shlex.quote(sys.executable)


# -- configuration ----------------------------------------------------------------------------


def test_transport_is_auto_by_default_and_checked(tmp_path: Path) -> None:
    assert Settings().server.transport == "auto"
    bad = tmp_path / "c.toml"
    bad.write_text('[server]\ntransport = "grpc"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(bad, environ={})
    assert str(refused.value) == (
        "c.toml: server.transport: expected one of 'auto', 'websocket' or 'poll', got 'grpc'"
    )
    env = {"ARGUS_AGENT_SERVER_TRANSPORT": "poll"}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert load_settings(empty, environ=env).server.transport == "poll"


# -- against the in-process reference server --------------------------------------------------


async def test_rerun_and_stop_and_events_go_over_the_websocket_by_default(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings(
        server={"token": user_token}, telemetry={"interval_s": 0.5, "log_poll_s": 0.1}
    )
    agent_id = await register(settings, user_token)
    source = argus.record_batch(f"{PY} -c 'import time; print(\"up\", flush=True); time.sleep(60)'")
    async with RunningAgent(settings) as running:
        await eventually(lambda: on_websocket(running), what="the websocket")
        assert server.ws_connected(agent_id)
        batch = argus.rerun(source)
        started = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun ack")
        assert started["status"] == "started" and started["deliveries"] == 1
        job = running.agent.jobs.get(batch)
        assert job is not None and started["pid"] == job.pid
        # The job's telemetry goes over the same socket.
        await eventually(
            lambda: server_events(server.url, batch, "log_line"),
            what="log lines over the websocket",
        )
        assert running.agent.sender.state.via == "websocket"
        argus.stop(batch)
        stopped = await eventually(lambda: argus.acked(batch, "stop"), what="the stop ack")
        assert stopped["status"] == "started" and stopped["deliveries"] == 1
        await running.agent.jobs.wait_ended(batch, timeout=10)
        await eventually(
            lambda: server_events(server.url, batch, "batch_failed"),
            what="batch_failed",
        )
        doc = running.agent.snapshot()
        assert doc["channel"]["kind"] == "websocket" and doc["channel"]["transport"] == "auto"
        shown = format_status(doc)
        assert "channel  connected (websocket), connected for" in shown
        assert "(transport auto)" in shown
        counts = running.agent.ledger.counts()
        assert counts.get("acked") == 2 and not counts.get("to_ack")


async def test_compression_is_offered_only_when_configured_and_events_still_flow(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    assert Settings().server.websocket_compression is False
    settings = make_settings(
        server={"token": user_token, "websocket_compression": True},
        telemetry={"interval_s": 0.5, "log_poll_s": 0.1},
    )
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        await eventually(lambda: on_websocket(running), what="the websocket")
        channel = running.agent.channel
        assert isinstance(channel, auto.AutoChannel) and channel.session is not None
        extensions = channel.session.ws.protocol.extensions
        assert [e.name for e in extensions] == ["permessage-deflate"]
        batch = argus.rerun(argus.record_batch("echo squeezed; exit 0"))
        lines = await eventually(
            lambda: server_events(server.url, batch, "log_line"), what="compressed log lines"
        )
        assert lines[0]["data"]["line"] == "squeezed"


async def test_without_the_endpoint_auto_polls_says_why_once_and_probes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auto, "PROBE_INTERVAL_S", 0.3)  # 10 minutes in production
    db = tmp_path / "argus.sqlite"
    old = DevServer(db_path=db, poll_interval_s=0.2, ingest_rate_limit=False, websocket=False)
    old.start()
    try:
        token = old.create_user("alice")
        argus = ArgusUser(old.url, token)
        settings = settings_for(old.url, tmp_path)
        await register(settings, token)
        source = argus.record_batch("exit 0")
        async with RunningAgent(settings) as running:
            channel = running.agent.state.channel
            await eventually(lambda: channel.kind == "poll", what="the fallback")
            batch = argus.rerun(source)
            cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="a polled rerun")
            assert cmd["status"] == "started"
            await eventually(lambda: channel.state == "connected", what="the poll's state")
            assert channel.transport == "auto"
            assert "no websocket endpoint" in channel.why and "HTTP 403" in channel.why
            shown = format_status(running.agent.snapshot())
            assert "channel  connected (polling: the server has no websocket endpoint" in shown
            assert "websocket probe in" in shown
            # Probed again and again, said once.
            await eventually(lambda: _debug_probes(caplog) >= 3, what="a few probes", timeout=10)
            said = [r for r in caplog.records if "offers no usable websocket" in r.getMessage()]
            assert len(said) == 1
            # The server learns the websocket (Argus upgraded): the next probe finds it.
            old.stop()
            new = DevServer(db_path=db, port=old.port, poll_interval_s=0.2, ingest_rate_limit=False)
            new.start()
            try:
                await eventually(lambda: on_websocket(running), what="the probe to connect")
                assert channel.why is None and channel.next_probe_at is None
                batch = argus.rerun(source)
                cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="a pushed rerun")
                assert cmd["status"] == "started"
            finally:
                await running.stop()
                new.stop()
        argus.close()
    finally:
        old.stop()


def _debug_probes(caplog: pytest.LogCaptureFixture) -> int:
    return sum("still unavailable" in r.getMessage() for r in caplog.records)


async def test_version_mismatch_is_refused_with_the_reason_on_both_sides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with DevServer(ws_subprotocol="argus-agent.v2", ingest_rate_limit=False) as server:
        token = server.create_user("alice")
        settings = settings_for(server.url, tmp_path, server={"transport": "websocket"})
        agent_id = await register(settings, token)
        async with RunningAgent(settings) as running:
            channel = running.agent.state.channel
            await eventually(lambda: channel.state == "unavailable", what="the refusal")
            # The server's reason reaches the agent (close 4406), and the server logged it.
            assert "this server speaks argus-agent.v2" in channel.why
            assert channel.kind == "websocket"  # websocket mode never falls back to polling
            assert running.agent.channel.poll.state.last_ok_at is None
            shown = format_status(running.agent.snapshot())
        assert "channel  unavailable (websocket: no common protocol version: the server" in shown
        server_said = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("argus_agent.devserver") and "4406" in r.getMessage()
        ]
        assert server_said and "'argus-agent.v1'" in server_said[0]
        assert not server_commands(server.url, agent_id)


async def test_a_welcome_of_another_protocol_is_refused_and_auto_polls(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    server.ws_faults.welcome_extra = {"protocol": 2}
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        channel = running.agent.state.channel
        await eventually(lambda: channel.kind == "poll", what="the fallback")
        assert channel.why.startswith("no common protocol version: welcome.protocol is 2")
        batch = argus.rerun(argus.record_batch("exit 0"))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="a polled rerun")
        assert cmd["status"] == "started"


async def test_a_rejected_agent_token_on_the_upgrade_is_an_auth_failure(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    server.ws_faults.reject_upgrades(401, count=3, detail="agent token unknown")
    async with RunningAgent(settings) as running:
        channel = running.agent.state.channel
        await eventually(lambda: channel.state == "auth_rejected", what="the rejection")
        assert "register --force" in channel.last_error
        await eventually(lambda: on_websocket(running), what="the retry to get through")


async def test_events_go_in_a_sliding_window_of_unconfirmed_frames(
    make_settings, user_token: str, server: DevServer
) -> None:
    """The sender keeps ``max_in_flight`` frames unconfirmed and sends the next one as soon
    as it has settled the oldest (not once the whole window is answered); every event
    arrives once."""
    settings = make_settings(server={"token": user_token})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        await eventually(lambda: on_websocket(running), what="the websocket")
        agent = running.agent
        transport = agent.sender.transport
        assert transport is not None
        order: list[str] = []
        submit = transport.submit_events

        async def observed(bodies: list[bytes]) -> Any:  # what the sender does, in order
            answer = await submit(bodies)
            order.append("sent")

            async def settled() -> Any:
                try:
                    return await answer
                finally:
                    order.append("confirmed")

            return settled()

        transport.submit_events = observed  # type: ignore[method-assign]
        source = EventSource(project="window", host="window-host")
        events = [
            make_event("log_line", EventKind.LOG, "b-window", source, {"line": f"{i}"})
            for i in range(20 * agent.sender.batch_size)
        ]
        await agent.outbox.put(events)
        await eventually(lambda: agent.outbox.stats().queued == 0, what="the outbox to drain")
    window = transport.max_in_flight
    in_flight = most = 0
    for step in order:
        in_flight += 1 if step == "sent" else -1
        most = max(most, in_flight)
    assert most == window, order
    # The first confirm settled, the next frame goes before the second confirm is taken.
    assert order[: window + 2] == ["sent"] * window + ["confirmed", "sent"], order
    stored = [e["event_id"] for e in server_events(server.url, "b-window")]
    assert sorted(stored) == sorted(e.event_id for e in events)


async def test_events_put_while_a_window_drains_the_outbox_keep_their_order(
    make_settings, user_token: str, server: DevServer
) -> None:
    """Outbox seqs are rowids, reused once the table is empty: a job's last lines and its
    batch_done, committed right after the window's last confirm emptied the outbox, get seqs
    at or below the newest one the window sent. They must still reach the server oldest
    first (the lifecycle event after the job's last line). Found by a hostile review."""
    settings = make_settings(server={"token": user_token}, telemetry={"enabled": False})
    await register(settings, user_token)
    source = EventSource(project="order", host="order-host")
    async with RunningAgent(settings) as running:
        await eventually(lambda: on_websocket(running), what="the websocket")
        box = running.agent.outbox
        await eventually(lambda: box.stats().queued == 0, what="an empty outbox")
        real_remove = box.remove
        injected: dict[str, list[str]] = {}

        async def remove(seqs: list[int]) -> None:  # puts land right after the last remove
            await real_remove(seqs)
            if injected or box.stats().queued:
                return
            newest = max(seqs)  # gone: the table is empty and rowids start at 1 again
            lines = [
                make_event("log_line", EventKind.LOG, f"job-{i}", source, {"line": "last"})
                for i in range(newest + 1)
            ]
            done = make_event("batch_done", EventKind.LIFECYCLE, "job-0", source, {"n_done": 1})
            injected["lines"], injected["done"] = [e.event_id for e in lines], [done.event_id]
            await box.put(lines)
            await box.put([done])

        box.remove = remove  # type: ignore[method-assign]
        await box.put([make_event("log_line", EventKind.LOG, "warm", source, {"line": "x"})])
        await eventually(lambda: injected and box.stats().queued == 0, what="the drain")
    stored = httpx.get(f"{server.url}/api/_dev/events").json()  # in arrival order
    arrival = [e["event_id"] for e in stored if e["batch_id"].startswith("job-")]
    assert arrival == injected["lines"] + injected["done"]


async def test_the_sender_reports_progress_while_a_backlog_drains(
    make_settings, user_token: str, server: DevServer
) -> None:
    """An outbox that never empties (a backlog, steady production) is progress, not a stall:
    the sender reports health after every pass. Found by a hostile review."""
    settings = make_settings(server={"token": user_token}, telemetry={"enabled": False})
    await register(settings, user_token)
    source = EventSource(project="backlog", host="backlog-host")
    async with RunningAgent(settings) as running:
        await eventually(lambda: on_websocket(running), what="the websocket")
        backlog = [
            make_event("log_line", EventKind.LOG, f"b-{i % 50}", source, {"line": f"{i}"})
            for i in range(60_000)
        ]
        await running.agent.outbox.put(backlog)
        sender = running.agent.sender
        sender.health = Health(1.0)  # a stall after 1 s without a report
        sender.health.report("sender")
        overdue: list[dict[str, float]] = []
        for _ in range(30):  # 3 s of draining
            overdue.append(sender.health.overdue())
            await asyncio.sleep(0.1)
        assert running.agent.outbox.stats().queued > 0  # still draining
    assert not any(overdue), overdue
