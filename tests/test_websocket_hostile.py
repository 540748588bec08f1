"""The websocket channel against a tiny websockets server of the test's own that plays a
hostile or forgetful server: bad frames answered as the protocol says (and closed 1008 past the
burst), an ack without its ``ack_result`` sent again on the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from argus_agent import wsproto
from argus_agent.argus_api import ArgusClient
from argus_agent.channels.auto import AutoChannel
from argus_agent.credentials import AgentCredentials
from argus_agent.dispatcher import Dispatcher
from argus_agent.status import ChannelState
from tests.support import eventually, local_dispatcher, settings_for


class TinyServer:
    """A websockets server speaking argus-agent.v1 as the test's ``session`` coroutine says:
    ``session(ws, n)`` runs for the n-th connection (from 0), after the hello was read."""

    def __init__(
        self, session: Callable[[ServerConnection, int], Any], serving: list[str] | None = None
    ) -> None:
        self.session = session
        #: The served names' agent ids the welcome accepts.
        self.serving = serving or []
        self.connections = 0
        self.hellos: list[dict[str, Any]] = []
        self.close_codes: dict[int, int | None] = {}
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        n = self.connections
        self.connections += 1
        self.hellos.append(json.loads(await ws.recv()))
        welcome = wsproto.Welcome(server_version="tiny", confirmed_seq=None, serving=self.serving)
        await ws.send(wsproto.encode_frame(welcome))
        with contextlib.suppress(Exception):
            await self.session(ws, n)
            async for _ in ws:  # read on to the end (a full buffer would stall the close)
                pass
        self.close_codes[n] = ws.close_code

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TinyServer]:
        async with serve(
            self.handler,
            "127.0.0.1",
            0,
            subprotocols=[wsproto.SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            max_size=wsproto.MAX_FRAME_BYTES,
            close_timeout=1,
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            yield self


@contextlib.asynccontextmanager
async def _channel(
    url: str, tmp_path: Path, served: dict[str, tuple[str, str]] | None = None
) -> AsyncIterator[tuple[AutoChannel, Dispatcher]]:
    """An AutoChannel (``websocket`` mode) with a real dispatcher, running until the end;
    ``served``: the served names' registrations it announces (agent id → (host, token))."""
    settings = settings_for(url, tmp_path, server={"transport": "websocket", "timeout_s": 1.0})
    client = ArgusClient(url, timeout_s=1.0)
    creds = AgentCredentials(server_url=url, agent_id="agent-tiny", agent_token="ag_live_tiny")
    async with local_dispatcher(settings) as dispatcher:
        channel = AutoChannel(
            "websocket",
            client,
            creds,
            dispatcher,
            ChannelState(),
            settings.agent,
            server_poll_interval_s=1.0,
        )
        channel.served = lambda: dict(served or {})
        shutdown = asyncio.Event()
        task = asyncio.create_task(channel.run(shutdown))
        try:
            yield channel, dispatcher
        finally:
            shutdown.set()
            await asyncio.wait_for(task, 10)
            await client.aclose()


def _hostile_frames(rng: random.Random, count: int) -> list[str | bytes]:
    """Frames a broken or hostile server might send: garbage, wrong types and fields,
    malformed commands (one with an id, acked failed), truncations, errors, deep nesting."""
    valid = [
        '{"type":"command","id":"c-%d","kind":"rerun","batch_id":"../x","payload":{}}',
        '{"type":"ack_result","cmd_id":"c-%d","result":"ok","detail":null}',
        '{"type":"confirm","seq":%d,"accepted":0,"rejected":0,"rejections":[]}',
        '{"type":"error","code":"internal","reason":"x%d","ref":null}',
    ]
    fixed: list[str | bytes] = [
        *("not json", "NaN", "[]", '{"type":1}', '{"type":"hello"}', '{"type":"nope"}'),
        *('{"type":"confirm","seq":"1"}', '{"type":"ack_result","cmd_id":"c","result":"?"}'),
        '{"type":"welcome","protocol":1,"server_version":"x","confirmed_seq":null}',
        '{"type":"command","id":"c-z","kind":"rerun","batch_id":"b","payload":{},"x":1}',
        '{"type":"command","kind":"rerun"}',
        '{"a":' * 60 + "1" + "}" * 60,
        '{"type":"confirm","seq":' + "9" * 200 + "}",
        *('{"type":"error","code":"bad_json","reason":"\\ud800"}', b"\xff\xfe\x00"),
    ]
    frames = list(fixed)
    while len(frames) < count:
        base = rng.choice(valid) % rng.randrange(1, 10**6)
        cut = rng.randrange(len(base))
        choice = rng.randrange(4)
        if choice == 0:
            frames.append(base[:cut])
        elif choice == 1:
            frames.append(base[:cut] + chr(rng.randrange(32, 0x2FF)) + base[cut + 1 :])
        elif choice == 2:
            frames.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
        else:
            frames.append(base)
    return frames[:count]


async def test_hostile_frames_are_answered_and_the_connection_survives_up_to_the_burst(
    tmp_path: Path,
) -> None:
    rng = random.Random(1)
    first = _hostile_frames(rng, 90)
    burst = _hostile_frames(rng, 60)
    seen: list[dict[str, Any]] = []
    bad = [f for f in first + burst if isinstance(_decoded(f), wsproto.FrameError)]
    assert len(bad) - len(burst) <= wsproto.BAD_FRAME_BURST < len(bad)  # the test's premise

    async def session(ws: ServerConnection, n: int) -> None:
        if n == 0:
            for frame in first:
                await ws.send(frame)
            await ws.send(_command("c-good", "stop", "b-none"))
            async for raw in ws:  # collect answers until the good command's ack
                seen.append(json.loads(raw))
                if seen[-1]["type"] == "ack":
                    await ws.send(_ack_result(seen[-1]["cmd_id"], "ok"))
                    if seen[-1]["cmd_id"] == "c-good":
                        break
            for frame in burst:
                await ws.send(frame)
        else:
            await ws.send(_command("c-after", "stop", "b-none"))
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "ack":
                    await ws.send(_ack_result(message["cmd_id"], "ok"))

    tiny = TinyServer(session)
    async with tiny.running(), _channel(tiny.url, tmp_path) as (channel, dispatcher):
        await eventually(
            lambda: (
                dispatcher.ledger.get("c-after") is not None
                and dispatcher.ledger.get("c-after").phase == "acked"
            ),
            what="a command on the next connection",
        )
        assert tiny.connections == 2
    # Each bad frame got the answer FrameError.reply() calls for, on the same connection.
    expected = [_reply(f) for f in first]
    errors = [m for m in seen if m["type"] == "error"]
    assert sorted(e["code"] for e in errors) == sorted(r["code"] for r in expected if r)
    assert all(e["reason"] for e in errors)
    acks = {m["cmd_id"]: m for m in seen if m["type"] == "ack"}
    assert acks["c-good"]["status"] == "failed"  # stop of an unknown batch, acked once
    assert all(a["status"] == "failed" for a in acks.values())
    assert any("unsafe shape" in (a.get("error") or "") for a in acks.values())
    # More than BAD_FRAME_BURST bad frames within the window: closed 1008, reconnected.
    assert tiny.close_codes[0] == wsproto.CloseCode.POLICY
    assert tiny.hellos[1]["agent_id"] == "agent-tiny"
    assert channel.state.state == "connected"


async def test_an_ack_without_its_ack_result_is_sent_again_on_the_next_connection(
    tmp_path: Path,
) -> None:
    acks: list[tuple[int, dict[str, Any]]] = []

    async def session(ws: ServerConnection, n: int) -> None:
        if n == 0:
            await ws.send(_command("c-1", "stop", "b-none"))
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] != "ack":
                continue
            acks.append((n, message))
            if n == 0:
                await ws.close(wsproto.CloseCode.INTERNAL, "lost before answering")
                return
            await ws.send(_ack_result(message["cmd_id"], "conflict"))

    tiny = TinyServer(session)
    async with tiny.running(), _channel(tiny.url, tmp_path) as (channel, dispatcher):
        await eventually(
            lambda: (
                dispatcher.ledger.get("c-1") is not None
                and dispatcher.ledger.get("c-1").phase == "acked"
            ),
            what="the ack sent again and answered",
        )
        assert "1011" in (channel.state.last_error or "")
    assert [(n, m["cmd_id"]) for n, m in acks] == [(0, "c-1"), (1, "c-1")]
    assert acks[0][1] == acks[1][1]


async def test_a_command_for_a_registration_not_served_here_is_refused_unacted(
    tmp_path: Path,
) -> None:
    """Served names (jobs.slurm_hosts) announced in hello: a command for one the server
    accepted is acted on as that name's (its pending ack goes through that registration); a
    command for an agent id the agent never announced, or one the server did not accept,
    gets an error frame and is never acted on."""
    errors: list[dict[str, Any]] = []

    async def session(ws: ServerConnection, n: int) -> None:
        await ws.send(_command("c-foreign", "stop", "b-1", agent_id="agent-stranger1"))
        await ws.send(_command("c-refused", "stop", "b-2", agent_id="agent-refused01"))
        await ws.send(_command("c-served", "stop", "b-3", agent_id="agent-served001"))
        bad = {"type": "command", "kind": "stop", "batch_id": "../x", "payload": {}}
        await ws.send(json.dumps({**bad, "id": "c-bad-served", "agent_id": "agent-served001"}))
        await ws.send(json.dumps({**bad, "id": "c-bad-foreign", "agent_id": "agent-stranger1"}))
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "error":
                errors.append(message)
            elif message["type"] == "ack":
                await ws.send(_ack_result(message["cmd_id"], "ok"))

    served = {"agent-served001": ("gpu-a", "ag_live_a"), "agent-refused01": ("gpu-b", "ag_live_b")}
    tiny = TinyServer(session, serving=["agent-served001"])
    async with tiny.running(), _channel(tiny.url, tmp_path, served) as (_, dispatcher):
        await eventually(lambda: len(errors) == 3, what="three error frames")
        await eventually(
            lambda: (e := dispatcher.ledger.get("c-served")) is not None and e.phase == "acked",
            what="the served name's command acked",
        )
        assert dispatcher.ledger.get("c-served").via == "gpu-a"
        # A malformed command is acked failed through the registration it came for.
        bad_served = await eventually(
            lambda: (e := dispatcher.ledger.get("c-bad-served")) and e.phase == "acked" and e,
            what="the malformed served command acked",
        )
        assert (bad_served.via, bad_served.ack_status) == ("gpu-a", "failed")
        assert dispatcher.ledger.get("c-bad-foreign") is None
        assert dispatcher.ledger.get("c-foreign") is None
        assert dispatcher.ledger.get("c-refused") is None
    assert tiny.hellos[0]["serves"] == [
        {"agent_id": "agent-refused01", "hostname": "gpu-b", "token": "ag_live_b"},
        {"agent_id": "agent-served001", "hostname": "gpu-a", "token": "ag_live_a"},
    ]
    assert sorted(e["ref"] for e in errors) == ["c-bad-foreign", "c-foreign", "c-refused"]
    assert all(e["code"] == "bad_field" and "not served here" in e["reason"] for e in errors)


def _command(cmd_id: str, kind: str, batch_id: str, agent_id: str | None = None) -> str:
    message = wsproto.CommandMsg(
        id=cmd_id, kind=kind, batch_id=batch_id, payload={}, agent_id=agent_id
    )
    return wsproto.encode_frame(message)


def _ack_result(cmd_id: str, result: str) -> str:
    return wsproto.encode_frame(wsproto.AckResult(cmd_id=cmd_id, result=result))  # type: ignore[arg-type]


def _decoded(frame: str | bytes) -> Any:
    return wsproto.decode_frame(frame, wsproto.Direction.TO_AGENT)


def _reply(frame: str | bytes) -> dict[str, Any] | None:
    """The answer the protocol calls for to a frame the agent receives (None: none)."""
    decoded = _decoded(frame)
    if isinstance(decoded, wsproto.FrameError):
        reply = decoded.reply()
        return json.loads(wsproto.encode_frame(reply)) if reply is not None else None
    if isinstance(decoded, wsproto.Welcome):  # a second welcome: a valid frame out of order
        return {"type": "error", "code": "out_of_order"}
    return None
