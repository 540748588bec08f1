"""The event sender acts on ``backoff.classify`` as the poll channel does: a refused reporter
token waits ``agent.auth_retry_s``, a 404 keeps the events, a batch refused for its size is
settled event by event. Real reference server on loopback; faults armed through its dev API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Backoff
from argus_agent.devserver import DevServer
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.outbox import Outbox
from argus_agent.sender import EventSender
from tests.support import ArgusUser, server_events

SOURCE = EventSource(project="p", host="h")


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", max_bytes=1 << 20)
    await box.start()
    await box.put(
        [make_event("log_line", EventKind.LOG, "b-1", SOURCE, {"line": f"l{i}"}) for i in range(3)]
    )
    yield box
    await box.close()


@pytest.fixture
async def client(server: DevServer) -> AsyncIterator[ArgusClient]:
    client = ArgusClient(server.url, timeout_s=10)
    yield client
    await client.aclose()


async def test_a_refused_reporter_token_waits_auth_retry_s_and_is_logged_once(
    outbox: Outbox, client: ArgusClient, caplog: pytest.LogCaptureFixture
) -> None:
    sender = EventSender(outbox, client, "em_live_unknown", Backoff(0.05, 0.5), auth_retry_s=42.0)
    caplog.set_level(logging.ERROR)
    assert await sender.send_once() == 42.0
    assert await sender.send_once() == 42.0
    assert sender.state.state == "auth_rejected"
    assert "HTTP 401" in (sender.state.last_error or "")
    assert outbox.stats().queued == 3, "nothing is dropped for a refused token"
    logged = [r for r in caplog.records if "refused the reporter token" in r.getMessage()]
    assert len(logged) == 1, "logged once, not on every retry"
    assert "em_live_unknown" not in caplog.text


async def test_a_404_backs_off_and_keeps_the_events(
    outbox: Outbox, client: ArgusClient, argus: ArgusUser, user_token: str, server: DevServer
) -> None:
    sender = EventSender(outbox, client, user_token, Backoff(0.05, 0.5))
    argus.fault("/api/events/batch", 404, count=1, detail="no such route")
    delay = await sender.send_once()
    assert delay is not None and 0 <= delay <= 0.05
    assert sender.state.state == "backing_off" and sender.state.rejected == 0
    assert outbox.stats().queued == 3
    assert await sender.send_once() is None
    assert outbox.stats().queued == 0 and sender.state.sent == 3
    assert len(server_events(server.url, "b-1", "log_line")) == 3


async def test_a_batch_refused_for_its_size_is_settled_event_by_event(
    outbox: Outbox, client: ArgusClient, argus: ArgusUser, user_token: str, server: DevServer
) -> None:
    sender = EventSender(outbox, client, user_token, Backoff(0.05, 0.5))
    argus.fault("/api/events/batch", 413, count=1, detail="request entity too large")
    assert await sender.send_once() is None
    assert outbox.stats().queued == 0
    assert sender.state.sent == 3 and sender.state.rejected == 0
    assert len(server_events(server.url, "b-1", "log_line")) == 3
