"""The reference server's websocket endpoint (argus_agent/devserver/ws.py), driven by the
``websockets`` asyncio client directly (not the agent), over real sockets on 127.0.0.1.

The upgrade (401 for every token problem, 403 without the endpoint, 4406 for a version
mismatch), hello/welcome, commands pushed the moment they are created and acked once over
either channel, events stored and confirmed with their seq (persisted across connections,
never counted twice), hostile frames answered without losing the connection, liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from argus_agent import wsproto as w
from argus_agent.devserver import DevServer, WsOptions
from tests.support import ArgusUser, eventually

HOSTNAME = "ws-host"
#: Bounds a wait that must not hang the suite; never a timing assertion.
HANG_GUARD_S = 15.0


def envelope(batch_id: str = "b-ws", event_id: str | None = None, **extra: Any) -> dict:
    return {
        "event_id": event_id or uuid.uuid4().hex,
        "schema_version": "1.1",
        "event_type": "log_line",
        "timestamp": "2026-01-01T00:00:00Z",
        "batch_id": batch_id,
        "source": {"project": "demo", "host": HOSTNAME},
        "data": {"message": "hello"},
        **extra,
    }


class Agent:
    """An agent registered with a server, and its websocket connections."""

    def __init__(self, srv: DevServer, user_token: str, hostname: str = HOSTNAME) -> None:
        self.srv = srv
        r = httpx.post(
            f"{srv.url}/api/agents/register",
            json={"hostname": hostname},
            headers={"Authorization": f"Bearer {user_token}"},
        )
        assert r.status_code == 201, r.text
        self.agent_id: str = r.json()["agent_id"]
        self.token: str = r.json()["agent_token"]
        self.hostname = hostname

    def url(self, agent_id: str | None = None) -> str:
        return self.srv.url.replace("http://", "ws://") + w.ENDPOINT.format(
            agent_id=agent_id or self.agent_id
        )

    def rest_ack(self, cmd_id: str, body: dict) -> int:
        """The status of an ack over REST (``POST …/jobs/{cmd_id}/ack``)."""
        return httpx.post(
            f"{self.srv.url}/api/agents/{self.agent_id}/jobs/{cmd_id}/ack",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ).status_code

    def hello(self, **changes: Any) -> w.Hello:
        fields: dict[str, Any] = {
            "agent_id": self.agent_id,
            "version": "0.0-test",
            "hostname": self.hostname,
            "capabilities": ["rerun", "stop"],
            "running_jobs": [{"batch_id": "b-running", "pid": 42, "state": "running"}],
            "last_confirmed_seq": None,
        }
        return w.Hello(**{**fields, **changes})

    @contextlib.asynccontextmanager
    async def open(
        self,
        *,
        token: str | None = None,
        subprotocols: list[str] | None = None,
        agent_id: str | None = None,
    ) -> AsyncIterator[ClientConnection]:
        """A connection without hello (the upgrade only)."""
        headers = {"Authorization": f"Bearer {token or self.token}"} if token != "" else {}
        async with connect(
            self.url(agent_id),
            additional_headers=headers,
            # [] offers none (no header at all, as a client that knows no subprotocol).
            subprotocols=[w.SUBPROTOCOL] if subprotocols is None else subprotocols or None,  # type: ignore[arg-type]
            compression=None,
            max_size=w.MAX_FRAME_BYTES,
            open_timeout=HANG_GUARD_S,
            close_timeout=1,
        ) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def session(self, **hello: Any) -> AsyncIterator[tuple[ClientConnection, w.Welcome]]:
        """A connection past hello/welcome."""
        async with self.open() as conn:
            await conn.send(w.encode_frame(self.hello(**hello)))
            welcome = await receive(conn)
            assert isinstance(welcome, w.Welcome), welcome
            yield conn, welcome


async def receive(conn: ClientConnection) -> Any:
    """The next server message, decoded as the agent decodes it."""
    frame = await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
    decoded = w.decode_frame(frame, w.Direction.TO_AGENT)
    assert not isinstance(decoded, w.FrameError), (decoded, frame)
    return decoded


async def closed_with(conn: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; its close code and reason (frames before are dropped)."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def agent_row(srv: DevServer, agent_id: str) -> dict:
    rows = httpx.get(f"{srv.url}/api/_dev/agents").json()
    return next(r for r in rows if r["agent_id"] == agent_id)


def events_of(srv: DevServer, batch_id: str) -> list[dict]:
    return httpx.get(f"{srv.url}/api/_dev/events", params={"batch_id": batch_id}).json()


@contextlib.contextmanager
def dev_server(tmp_path: Path, name: str = "ws", **kwargs: Any) -> Iterator[DevServer]:
    srv = DevServer(db_path=tmp_path / f"{name}.sqlite", ingest_rate_limit=False, **kwargs)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DevServer]:
    """No periodic re-check within a test: a command arriving was pushed on commit."""
    with dev_server(tmp_path, websocket=WsOptions(recheck_s=3600)) as srv:
        yield srv


@pytest.fixture
def agent(server: DevServer, user_token: str) -> Agent:
    return Agent(server, user_token)


# -- the upgrade ------------------------------------------------------------------------------


async def test_every_token_problem_is_401_and_no_endpoint_is_403(
    server: DevServer, user_token: str, agent: Agent, tmp_path: Path
) -> None:
    other = Agent(server, user_token, hostname="other-host")
    refusals = {
        "": "agent token required",
        "ag_live_unknown": "agent token unknown",
        user_token: "invalid agent token prefix",  # an em_live token
        other.token: "agent token does not match path agent_id",
    }
    for token, detail in refusals.items():
        with pytest.raises(InvalidStatus) as info:
            async with agent.open(token=token):
                pass
        response = info.value.response
        assert response.status_code == 401, (token, response.status_code)
        assert json.loads(bytes(response.body or b"")) == {"detail": detail}
    with pytest.raises(InvalidStatus) as info:  # the path names an unknown agent
        async with agent.open(agent_id="agent-000000000000"):
            pass
    assert info.value.response.status_code == 401

    server.ws_faults.reject_upgrades(503, detail="maintenance")
    with pytest.raises(InvalidStatus) as info:
        async with agent.open():
            pass
    assert info.value.response.status_code == 503
    async with agent.session():  # the fault was used up
        pass

    with dev_server(tmp_path, "old", websocket=False) as old:
        old_agent = Agent(old, old.create_user("bob"))
        with pytest.raises(InvalidStatus) as info:
            async with old_agent.open():
                pass
        assert info.value.response.status_code == 403  # what Argus v0.3.0 answers
        listed = agent_row(old, old_agent.agent_id)
        assert listed["ws_connected"] is False


async def test_a_version_mismatch_closes_4406_with_a_readable_reason(
    agent: Agent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="argus_agent.devserver.ws")
    async with agent.open(subprotocols=["argus-agent.v2"]) as conn:
        assert conn.subprotocol is None  # accepted without one, then closed
        code, reason = await closed_with(conn)
    assert code == 4406
    assert reason == "unsupported protocol 'argus-agent.v2'; this server speaks argus-agent.v1"
    assert reason in caplog.text
    async with agent.open(subprotocols=[]) as conn:
        assert await closed_with(conn) == (
            4406,
            "unsupported protocol none; this server speaks argus-agent.v1",
        )

    with dev_server(tmp_path, "v2", ws_subprotocol="argus-agent.v2") as v2:
        v2_agent = Agent(v2, v2.create_user("bob"))
        async with v2_agent.open() as conn:
            assert await closed_with(conn) == (
                4406,
                "unsupported protocol 'argus-agent.v1'; this server speaks argus-agent.v2",
            )
        async with v2_agent.open(subprotocols=["argus-agent.v2"]) as conn:
            assert conn.subprotocol == "argus-agent.v2"

    agent.srv.ws_faults.welcome_extra = {"protocol": 2}  # a server speaking a newer version
    async with agent.open() as conn:
        await conn.send(w.encode_frame(agent.hello()))
        frame = await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
        refused = w.decode_frame(frame, w.Direction.TO_AGENT)
        assert isinstance(refused, w.FrameError) and refused.code == "unsupported_version"


# -- hello / welcome --------------------------------------------------------------------------


async def test_hello_is_answered_by_welcome(server: DevServer, agent: Agent) -> None:
    async with agent.session() as (conn, welcome):
        assert conn.subprotocol == w.SUBPROTOCOL
        assert welcome.protocol == 1
        assert welcome.confirmed_seq is None
        assert (welcome.ping_interval_s, welcome.ping_timeout_s) == (2.0, 2.0)
        assert welcome.max_message_bytes == w.MAX_EVENTS_FRAME_BYTES
        row = agent_row(server, agent.agent_id)
        assert row["ws_connected"] is True and server.ws_connected(agent.agent_id)
        assert row["ws_running_jobs"] == [{"batch_id": "b-running", "pid": 42, "state": "running"}]
    await eventually(lambda: not server.ws_connected(agent.agent_id), what="session gone")


async def test_a_bad_start_closes_4400(tmp_path: Path) -> None:
    with dev_server(tmp_path, websocket=WsOptions(hello_timeout_s=0.2)) as srv:
        agent = Agent(srv, srv.create_user("alice"))
        async with agent.open() as conn:  # says nothing
            assert await closed_with(conn) == (4400, "no hello within 0.2 s")

        async with agent.open() as conn:
            await conn.send(w.encode_frame(agent.hello(agent_id="agent-0123456789ab")))
            error = await receive(conn)
            assert (error.type, error.code) == ("error", "bad_field")
            assert await closed_with(conn) == (4400, "hello for another agent")

        async with agent.open() as conn:
            await conn.send(w.encode_frame(w.Ack(cmd_id="c-1", status="started")))
            error = await receive(conn)
            assert (error.code, error.reason) == (
                "out_of_order",
                "'ack' before hello; the first frame is hello",
            )
            assert (await closed_with(conn))[0] == 4400

        async with agent.open() as conn:
            await conn.send('{"type": "hello", "agent_id": ')
            assert (await receive(conn)).code == "bad_json"
            assert await closed_with(conn) == (
                4400,
                "the first frame must be a valid hello (bad_json)",
            )

        async with agent.session() as (conn, _):
            await conn.send(w.encode_frame(agent.hello()))
            assert (await receive(conn)).code == "out_of_order"
            assert await closed_with(conn) == (4400, "a second hello")


# -- commands ---------------------------------------------------------------------------------


async def test_a_rerun_is_pushed_when_pressed_and_acked_once(
    server: DevServer, agent: Agent, argus: ArgusUser
) -> None:
    source = await asyncio.to_thread(argus.record_batch, "python train.py", host=HOSTNAME)
    pending = await asyncio.to_thread(argus.rerun, source)  # queued before the agent connects
    async with agent.session() as (conn, _):
        first = await receive(conn)
        assert isinstance(first, w.CommandMsg) and first.batch_id == pending
        assert first.kind == "rerun" and first.payload["source_batch_id"] == source

        # Pressed while connected: pushed on commit (this server never re-checks on its own).
        again = await asyncio.to_thread(argus.record_batch, "python eval.py", host=HOSTNAME)
        pressed = await asyncio.to_thread(argus.rerun, again)
        pushed = await receive(conn)
        assert isinstance(pushed, w.CommandMsg) and pushed.batch_id == pressed
        # A command queued from another thread (the test's) is pushed too.
        injected = await asyncio.to_thread(server.inject_command, agent.agent_id, "stop", "b-x", {})
        assert (await receive(conn)).id == injected

        await conn.send(w.encode_frame(w.Ack.make(pushed.id, "started", pid=4242)))
        assert await receive(conn) == w.AckResult(cmd_id=pushed.id, result="ok")
        await eventually(lambda: argus.batch(pressed)["status"] == "running", what="running")
        await conn.send(w.encode_frame(w.Ack.make(pushed.id, "started", pid=4242)))
        result = await receive(conn)
        assert (result.result, result.detail) == ("conflict", "cmd already in status 'started'")

        # One queue for both channels: acked by REST, then over the socket (and back).
        assert agent.rest_ack(first.id, {"status": "started", "pid": 7}) == 200
        await conn.send(w.encode_frame(w.Ack.make(first.id, "started", pid=7)))
        assert (await receive(conn)).result == "conflict"
        await conn.send(w.encode_frame(w.Ack.make(injected, "failed", error="no such job")))
        assert (await receive(conn)).result == "ok"
        assert agent.rest_ack(injected, {"status": "failed"}) == 409

        await conn.send(w.encode_frame(w.Ack.make("no-such-command", "started")))
        assert (await receive(conn)).result == "not_found"
        await conn.send(json.dumps({"type": "ack", "cmd_id": "c-9", "status": "done"}))
        invalid = await receive(conn)
        assert (invalid.cmd_id, invalid.result) == ("c-9", "invalid")
        assert "ack.status" in invalid.detail

    # Each command was pushed once per connection; acked ones are not pushed again.
    listed = {c["id"]: c for c in argus.commands()}
    assert listed[first.id]["deliveries"] == 1 and listed[pushed.id]["deliveries"] == 1
    async with agent.session() as (conn, _):
        stop = await asyncio.to_thread(server.inject_command, agent.agent_id, "stop", "b-y", {})
        assert (await receive(conn)).id == stop  # the first push of this connection


async def test_a_newer_connection_replaces_the_older_one(agent: Agent) -> None:
    async with agent.session() as (old, _), agent.session() as (new, _):
        assert await closed_with(old) == (
            4409,
            "a newer connection of this agent replaced this one",
        )
        await new.send(w.encode_frame(w.Ack.make("c-1", "started")))
        assert (await receive(new)).result == "not_found"


async def test_a_rotated_token_closes_4401(tmp_path: Path) -> None:
    with dev_server(tmp_path, websocket=WsOptions(recheck_s=0.05)) as srv:
        user_token = srv.create_user("alice")
        agent = Agent(srv, user_token)
        async with agent.session() as (conn, _):
            Agent(srv, user_token)  # re-registers the host: the old token stops working
            error = await receive(conn)
            assert (error.type, error.code) == ("error", "unauthorized")
            assert await closed_with(conn) == (4401, "the agent token was rotated or revoked")


# -- events -----------------------------------------------------------------------------------


async def test_events_are_stored_confirmed_and_never_counted_twice(
    server: DevServer, agent: Agent, user_token: str
) -> None:
    good = [envelope(), envelope(event_type="batch_start", data={"command": "x"})]
    bad = envelope(schema_version="9.9")
    shapeless = {"event_id": "e" * 16, "surprise": 1}
    async with agent.session() as (conn, _):
        await conn.send(w.encode_events(1, [json.dumps(e) for e in [*good, bad, shapeless]]))
        confirm = await receive(conn)
        assert isinstance(confirm, w.Confirm)
        assert (confirm.seq, confirm.accepted, confirm.rejected) == (1, 2, 2)
        # Only the rejected events are listed, in frame order, with the reason.
        assert [r.event_id for r in confirm.rejections] == [bad["event_id"], "e" * 16]
        assert "Unsupported schema_version" in confirm.rejections[0].error
        assert "Field required" in confirm.rejections[1].error
        stored = events_of(agent.srv, "b-ws")
        assert sorted(e["event_id"] for e in stored) == sorted(e["event_id"] for e in good)
        # The events belong to the user who registered the agent.
        batch = httpx.get(
            f"{agent.srv.url}/api/batches/b-ws", headers={"Authorization": f"Bearer {user_token}"}
        ).json()
        assert batch["owner"] == "alice"

        await conn.send(w.encode_events(1, [json.dumps(e) for e in good]))  # resent
        again = await receive(conn)
        assert (again.accepted, again.deduplicated, again.rejections) == (2, 2, [])

        frames = [(5, envelope()), (6, envelope())]
        for seq, event in frames:  # pipelined: each confirmed, in order
            await conn.send(w.encode_events(seq, [json.dumps(event)]))
        assert [(await receive(conn)).seq for _ in frames] == [5, 6]

    async with agent.session(last_confirmed_seq=6) as (conn, welcome):
        assert welcome.confirmed_seq == 6
        late = envelope()
        await conn.send(w.encode_events(3, [json.dumps(late), json.dumps(good[0])]))
        confirm = await receive(conn)  # stored and confirmed, the stored seq not lowered
        assert (confirm.seq, confirm.accepted, confirm.deduplicated) == (3, 2, 1)
    async with agent.session() as (conn, welcome):
        assert welcome.confirmed_seq == 6
    assert len(events_of(agent.srv, "b-ws")) == 5  # nothing counted twice


async def test_a_frame_stored_but_not_confirmed_is_in_the_next_welcome(
    server: DevServer, agent: Agent
) -> None:
    server.ws_faults.drop_after(1)
    event = envelope(batch_id="b-drop")
    async with agent.session() as (conn, _):
        await conn.send(w.encode_events(7, [json.dumps(event)]))
        assert await closed_with(conn) == (1011, "fault injected: dropped after 1 frames")
    async with agent.session() as (conn, welcome):
        assert welcome.confirmed_seq == 7
        await conn.send(w.encode_events(7, [json.dumps(event)]))  # a cautious agent resends
        assert (await receive(conn)).deduplicated == 1
    assert len(events_of(server, "b-drop")) == 1
