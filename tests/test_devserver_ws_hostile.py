"""The reference server's websocket endpoint under hostile input (every bad frame answered,
a burst closed 1008, an oversized frame 1009), its liveness without heartbeats and its
shutdown (1001); the helpers are ``test_devserver_ws.py``'s."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from argus_agent import wsproto as w
from argus_agent.devserver import DevServer, WsOptions
from tests.support import eventually
from tests.test_devserver_ws import (
    HANG_GUARD_S,
    Agent,
    closed_with,
    dev_server,
    envelope,
    receive,
)

# The fixtures of test_devserver_ws.py, for this file too.
from tests.test_devserver_ws import agent as agent
from tests.test_devserver_ws import server as server

# -- hostile input, limits, liveness, shutdown -------------------------------------------------


def hostile_frames(count: int, rng: random.Random) -> list[str | bytes]:
    """Broken, mistyped, oversized and mutated frames (none a valid hello)."""
    valid = [
        w.encode_frame(w.Ack.make("c-1", "started", pid=3)),
        w.encode_events(9, [json.dumps(envelope(event_id="f" * 16))]),
        w.encode_frame(w.ErrorMsg(code=w.ErrorCode.INTERNAL, reason="x")),
        '{"type":"hello","agent_id":"a-1","version":"1","hostname":"h","capabilities":[],'
        '"running_jobs":[],"last_confirmed_seq":null}',
    ]
    short = ["", "null", "[]", '"hello"', "{}", '{"type": 5}', '{"type": "nope"}']
    fixed: list[str | bytes] = [
        *short,
        '{"type": "welcome"}',
        '{"type": "command", "id": "c-1"}',
        '{"type": "ack", "cmd_id": "c-2", "status": "started", "pid": 1.0}',
        '{"type": "ack", "cmd_id": "../x", "status": "started"}',
        '{"type": "events", "seq": 0, "events": []}',
        '{"type": "events", "seq": 1, "events": [{}], "extra": 1}',
        '{"type": "events", "seq": 99999999999999999999, "events": [{}]}',
        '{"type": "error", "code": "bogus", "reason": ""}',
        '{"type": "ack", "cmd_id": "c-3", "status": "started", "error": "\\ud800"}',
        '{"type": "ack", "cmd_id": "c-4", "status": NaN}',
        '{"type": "ack"} trailing',
        "[" * 200 + "]" * 200,
        '{"type": "ack", "cmd_id": "c-5", "status": "started", "pid": 1' + "0" * 150 + "}",
        '{"type": "ack", "cmd_id": "c-6", "status": "started", "error": "'
        + "x" * (w.MAX_MESSAGE_BYTES + 1)
        + '"}',
        b'{"type": "ack", "cmd_id": "c-7", "status": "started"}',
        b"\xff\xfe",
    ]
    frames = list(fixed)
    alphabet = '{}[]":,0123456789.-+eE tfnaulrsu\\ä✓'
    while len(frames) < count:
        base = rng.choice(valid)
        roll = rng.random()
        if roll < 0.3:
            frame = base[: rng.randrange(len(base))]
        elif roll < 0.7:
            chars = list(base)
            for _ in range(rng.randint(1, 4)):
                chars.insert(rng.randrange(len(chars) + 1), rng.choice(alphabet))
            frame = "".join(chars)
        elif roll < 0.9:
            obj = json.loads(base)
            key = rng.choice([*obj, "type", "seq", "cmd_id", "extra"])
            obj[key] = rng.choice([None, True, -1, 2**64, 1.5, "", "x" * 300, [], {}, [{}]])
            frame = json.dumps(obj)
        else:
            frame = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        decoded = w.decode_frame(frame, w.Direction.TO_SERVER)
        if not isinstance(decoded, w.Hello):  # a valid hello would end the session (4400)
            frames.append(frame)
    return frames


def expected_reply(frame: str | bytes) -> tuple[str, str | None, str | None] | None:
    """(type, code or result, ref) of the server's answer to one frame; None: no answer."""
    if isinstance(frame, bytes):
        return ("error", "bad_json", None)
    decoded = w.decode_frame(frame, w.Direction.TO_SERVER)
    if isinstance(decoded, w.FrameError):
        reply = decoded.reply()
        if reply is None:
            return None
        if isinstance(reply, w.AckResult):
            return ("ack_result", reply.result, reply.cmd_id)
        return ("error", reply.code, reply.ref)
    if isinstance(decoded, w.Ack):
        return ("ack_result", "not_found", decoded.cmd_id)
    if isinstance(decoded, w.Events):
        return ("confirm", None, str(decoded.seq))
    return None  # an error frame is never answered


def shape(message: Any) -> tuple[str, str | None, str | None]:
    if isinstance(message, w.AckResult):
        return ("ack_result", message.result, message.cmd_id)
    if isinstance(message, w.Confirm):
        return ("confirm", None, str(message.seq))
    assert isinstance(message, w.ErrorMsg), message
    return ("error", message.code, message.ref)


@pytest.mark.parametrize("frame_worker", [False, True], ids=["in-process", "frame-worker"])
async def test_hostile_frames_are_each_answered_and_the_connection_survives(
    tmp_path: Path, frame_worker: bool
) -> None:
    """Answered in order, each as the protocol's decoder says, with the frames parsed in the
    server's process or by its frame worker (events frames read ahead)."""
    frames = hostile_frames(400, random.Random(20260109))
    expected = [e for e in map(expected_reply, frames) if e is not None]
    assert len(expected) > 300
    options = WsOptions(bad_frame_burst=10_000, frame_worker=frame_worker)
    with dev_server(tmp_path, websocket=options) as srv:
        assert (srv.frame_worker_pid is not None) is frame_worker
        agent = Agent(srv, srv.create_user("alice"))
        async with agent.session() as (conn, _):
            for frame in frames:
                await conn.send(frame)
            await conn.send(w.encode_frame(w.Ack.make("probe", "started")))  # answered last
            replies = []
            while not replies or shape(replies[-1]) != ("ack_result", "not_found", "probe"):
                replies.append(await receive(conn))
            assert [shape(r) for r in replies[:-1]] == expected
            for reply in replies:
                if isinstance(reply, w.ErrorMsg):
                    assert reply.reason and "\\ud800" not in reply.reason
            # Still a working session.
            command = await asyncio.to_thread(srv.inject_command, agent.agent_id, "stop", "b-1", {})
            assert (await receive(conn)).id == command


async def test_a_burst_of_bad_frames_closes_1008(agent: Agent) -> None:
    async with agent.session() as (conn, _):
        for _ in range(w.BAD_FRAME_BURST + 1):
            await conn.send("not json")
        answers = 0
        with pytest.raises(ConnectionClosed) as info:
            while True:
                assert (await receive(conn)).code == "bad_json"
                answers += 1
        assert answers == w.BAD_FRAME_BURST + 1
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (
            1008,
            "more than 100 bad frames within 10 s",
        )


async def test_a_frame_over_the_transport_limit_closes_1009(agent: Agent) -> None:
    async with agent.session() as (conn, _):
        with pytest.raises(ConnectionClosed) as info:
            await conn.send("x" * (w.MAX_FRAME_BYTES + 1))  # may fail while still sending
            await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_a_connected_agent_is_alive_without_heartbeats(tmp_path: Path) -> None:
    with dev_server(tmp_path, websocket=WsOptions(recheck_s=0.05)) as srv:
        agent = Agent(srv, srv.create_user("alice"))
        assert srv.store is not None
        store = srv.store

        def last_seen() -> float:
            with store.read() as db:
                row = db.execute(
                    "SELECT last_seen_ts FROM agents WHERE id = ?", (agent.agent_id,)
                ).fetchone()
            return float(row["last_seen_ts"])

        def forget() -> None:
            with store.tx() as db:
                db.execute("UPDATE agents SET last_seen_ts = 0 WHERE id = ?", (agent.agent_id,))

        forget()
        async with agent.session():
            assert last_seen() > 0  # seen on connect
            forget()
            await eventually(lambda: last_seen() > 0, what="seen again while connected")
        forget()
        await eventually(lambda: not srv.ws_connected(agent.agent_id), what="disconnected")
        forget()
        assert last_seen() == 0  # no session marks it any more


async def test_a_server_shutting_down_closes_1001(tmp_path: Path) -> None:
    with dev_server(tmp_path) as srv:
        agent = Agent(srv, srv.create_user("alice"))
        async with agent.session() as (conn, _):
            await asyncio.to_thread(srv.stop)
            assert await closed_with(conn) == (1001, "the server shuts down")


def test_dev_server_help_documents_no_websocket() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "argus_agent.cli", "dev-server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "--no-websocket" in result.stdout and "403" in result.stdout


async def test_an_integer_sqlite_cannot_hold_is_refused_not_a_server_failure(
    server: DevServer, agent: Agent
) -> None:
    """The protocol takes integers of up to 100 digits; SQLite holds 64 bits. A batch_start
    whose n_total_jobs is larger is rejected (422), on either channel, and an ack's pid
    likewise, instead of the server failing on the frame or request: an agent would send it
    again and again. Found by a hostile review."""
    start = envelope(batch_id="b-int", event_type="batch_start", data={"n_total_jobs": 10**30})
    async with agent.session() as (conn, _):
        await conn.send(w.encode_events(1, [json.dumps(start)]))
        confirm = await receive(conn)
        assert (confirm.accepted, confirm.rejected) == (0, 1)
        assert "n_total_jobs" in confirm.rejections[0].error
        await conn.send(w.encode_events(2, [json.dumps(envelope(batch_id="b-int"))]))
        assert (await receive(conn)).accepted == 1  # the session goes on
    user = server.create_user("carol")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {user}"}) as http:
        again = {**start, "event_id": "int-rest-0001"}
        answer = http.post("/api/events/batch", json={"events": [again]})
        assert answer.status_code == 200
        assert answer.json()["results"][0]["status"] == "rejected"
        assert http.post("/api/events", json=again).status_code == 422
    cmd = await asyncio.to_thread(server.inject_command, agent.agent_id, "stop", "b-int", {})
    assert agent.rest_ack(cmd, {"status": "started", "pid": 2**70}) == 422
    assert agent.rest_ack(cmd, {"status": "started", "pid": 4242}) == 200


def test_a_lone_surrogate_is_refused_422_over_rest_not_500(server: DevServer) -> None:
    """JSON may carry ``"\\ud800"``, which UTF-8 cannot encode: a refusal that echoes it must
    still be answered (422), as a 500 would be retried forever. Found while reviewing."""
    user = server.create_user("dave")
    headers = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    bad_id = json.dumps({"events": [envelope(batch_id="b-SURROGATE")]}).replace(
        "b-SURROGATE", "b-\\ud800"
    )
    bad_data = json.dumps(envelope(event_type="job_epoch", job_id="j", data={"epoch": "E"}))
    bad_data = bad_data.replace('"E"', '"\\ud800"')
    with httpx.Client(base_url=server.url, headers=headers) as http:
        refused = http.post("/api/events/batch", content=bad_id)
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["loc"] == ["body", "events", 0, "batch_id"]
        refused = http.post("/api/events", content=bad_data)
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["loc"] == ["epoch"]
