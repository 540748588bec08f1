"""The websocket channel (``server.transport``): commands pushed over ``argus-agent.v1``, events
on the same socket, polling as the fallback.

End to end against the reference server on 127.0.0.1:0: in-process (``DevServer``), or as a
real ``argus-agent dev-server`` process where the test SIGKILLs or SIGSTOPs it. A tiny
websockets server of the test's own plays a hostile or forgetful server. No timed assertions:
the figures (rerun latency, detection time) are measured in ``bench/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from argus_agent import wsproto
from argus_agent.argus_api import ArgusClient
from argus_agent.audit import AuditLog
from argus_agent.channels import auto
from argus_agent.channels.auto import AutoChannel
from argus_agent.config import Settings, load_settings
from argus_agent.credentials import AgentCredentials
from argus_agent.devserver import DevServer
from argus_agent.dispatcher import Dispatcher
from argus_agent.errors import ConfigError
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.jobs.store import JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.ledger import CommandLedger
from argus_agent.status import ChannelState
from argus_agent.views import format_status
from tests.conftest import ROOT_JOBS
from tests.support import HOST, ArgusUser, RunningAgent, eventually, register

PY = shlex.quote(sys.executable)
DEV_SERVER = ["dev-server", "--user", "alice", "--poll-interval", "0.2"]


def _settings(url: str, tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for an agent of ``url`` (as the ``make_settings`` fixture, any server)."""
    values: dict[str, dict[str, Any]] = {
        "server": {"url": url},
        "agent": {
            "state_dir": str(tmp_path / "st"),
            "hostname": HOST,
            "heartbeat_interval_s": 0.5,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "auth_retry_s": 0.5,
        },
        "jobs": {"stop_grace_s": 2.0, **ROOT_JOBS},
    }
    for section, extra in sections.items():
        values.setdefault(section, {}).update(extra)
    return Settings.model_validate(values)


def _on_websocket(running: RunningAgent) -> bool:
    channel = running.agent.state.channel
    return channel.kind == "websocket" and channel.connected_since is not None


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
        await eventually(lambda: _on_websocket(running), what="the websocket")
        assert server.ws_connected(agent_id)
        batch = argus.rerun(source)
        started = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun ack")
        assert started["status"] == "started" and started["deliveries"] == 1
        job = running.agent.jobs.get(batch)
        assert job is not None and started["pid"] == job.pid
        # The job's telemetry goes over the same socket.
        await eventually(
            lambda: [e for e in _events(server, batch) if e["event_type"] == "log_line"],
            what="log lines over the websocket",
        )
        assert running.agent.sender.state.via == "websocket"
        argus.stop(batch)
        stopped = await eventually(lambda: argus.acked(batch, "stop"), what="the stop ack")
        assert stopped["status"] == "started" and stopped["deliveries"] == 1
        await running.agent.jobs.wait_ended(batch, timeout=10)
        await eventually(
            lambda: any(e["event_type"] == "batch_failed" for e in _events(server, batch)),
            what="batch_failed",
        )
        doc = running.agent.snapshot()
        assert doc["channel"]["kind"] == "websocket" and doc["channel"]["transport"] == "auto"
        shown = format_status(doc)
        assert "channel  connected (websocket), connected for" in shown
        assert "(transport auto)" in shown
        counts = running.agent.ledger.counts()
        assert counts.get("acked") == 2 and not counts.get("to_ack")


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
        settings = _settings(old.url, tmp_path)
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
                await eventually(lambda: _on_websocket(running), what="the probe to connect")
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
        settings = _settings(server.url, tmp_path, server={"transport": "websocket"})
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
        assert not _commands(server, agent_id)


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
        await eventually(lambda: _on_websocket(running), what="the retry to get through")


# -- against the reference server as a real process -------------------------------------------


class ServerProcess:
    """``argus-agent dev-server`` as a real process on one port and one database file, so
    that it can be SIGKILLed, SIGSTOPped and started again with all its data.

    A restart takes a process started beforehand (``standby``): it has imported everything
    and waits on its stdin for the word to run the CLI's ``dev-server`` command, so that a
    restart is a bind, not a Python start-up (about a second on a small machine)."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "argus.sqlite"
        self.port = 0
        self.url = ""
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._standby: tuple[subprocess.Popen[bytes], Path] | None = None
        self._started = 0

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Path]:
        self._started += 1
        log = self.dir / f"dev-server-{self._started}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", STANDBY],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return proc, log

    async def start(self) -> None:
        """Start it (on the port of the first start) and wait until it serves."""
        proc, log = self._standby or self._spawn()
        self._standby = None
        assert proc.stdin is not None
        argv = [*DEV_SERVER, "--port", str(self.port), "--db", str(self.db)]
        proc.stdin.write((json.dumps(argv) + "\n").encode())
        proc.stdin.close()
        self.proc = proc

        def ready() -> bool:
            text = log.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.startswith(("argus", "user"))]
            if len(lines) < 2:
                assert proc.poll() is None, text
                return False
            self.url = lines[0].split()[-1]
            self.port = int(self.url.rsplit(":", 1)[1])
            self.token = self.token or lines[1].split()[-1]
            return True

        await eventually(ready, timeout=30, interval=0.02, what="the dev-server to listen")
        self._standby = self._spawn()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def close(self) -> None:
        """Kill the server and the standby."""
        self.kill()
        if self._standby is not None:
            self._standby[0].kill()
            self._standby[0].wait(10)
            self._standby = None


#: A dev-server process in waiting: imports done, it runs ``argus-agent ARGV`` (the CLI's
#: ``main``) once ARGV arrives on stdin as JSON.
STANDBY = """
import json, sys
import argus_agent.cli, argus_agent.devserver
argv = json.loads(sys.stdin.readline() or "null")
if argv:
    sys.exit(argus_agent.cli.main(argv))
"""


@pytest.fixture
async def server_process(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    process = ServerProcess(tmp_path)
    await process.start()
    try:
        yield process
    finally:
        process.close()


async def test_a_sigstopped_server_is_detected_and_reconnected_after_sigcont(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    # server.timeout_s bounds a connect to the stopped server (the upgrade is never answered).
    settings = _settings(server_process.url, tmp_path, server={"timeout_s": 2.0})
    await register(settings, server_process.token)
    argus = ArgusUser(server_process.url, server_process.token)
    try:
        async with RunningAgent(settings) as running:
            channel = running.agent.state.channel
            await eventually(lambda: _on_websocket(running), what="the websocket")
            first = running.agent.channel.sessions
            server_process.signal(signal.SIGSTOP)
            # Detected by the missing pongs (within 5 s: bench/ measures it), not by TCP.
            await eventually(
                lambda: channel.connected_since is None, timeout=20, what="the hang detected"
            )
            assert channel.state != "connected"
            assert "keepalive ping timeout" in channel.last_error
            server_process.signal(signal.SIGCONT)
            await eventually(
                lambda: _on_websocket(running) and running.agent.channel.sessions > first,
                timeout=30,
                what="the reconnect",
            )
            source = argus.record_batch("exit 0")
            batch = argus.rerun(source)
            cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="a rerun after it")
            assert cmd["status"] == "started"
    finally:
        argus.close()


async def test_killing_the_server_mid_stream_loses_nothing_and_counts_nothing_twice(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    kills = 20
    token = server_process.token
    settings = _settings(server_process.url, tmp_path, server={"token": token, "timeout_s": 2.0})
    agent_id = await register(settings, token)
    argus = ArgusUser(server_process.url, token)
    runs = tmp_path / "runs"
    source = argus.record_batch(f"echo $ARGUS_BATCH_ID >> {shlex.quote(str(runs))}")
    stream = f"stream-{uuid.uuid4().hex[:8]}"
    produced: list[str] = []
    reruns: list[str] = []
    rng = random.Random(9)
    try:
        async with RunningAgent(settings) as running:
            agent = running.agent
            done = asyncio.Event()
            producer = asyncio.create_task(_produce(agent.outbox, stream, produced, done))
            try:
                for _ in range(kills):
                    await eventually(lambda: _on_websocket(running), timeout=30, what="connect")
                    sent = agent.sender.state.sent
                    await eventually(
                        lambda s=sent: agent.sender.state.sent > s + 50, what="events flowing"
                    )
                    reruns.append(await asyncio.to_thread(_rerun, server_process, source))
                    await asyncio.sleep(rng.uniform(0, 0.05))  # kill around the push and ack
                    server_process.kill()
                    await server_process.start()
            finally:
                done.set()
                await producer
            await eventually(
                lambda: agent.outbox.stats().queued == 0, timeout=30, what="the outbox to drain"
            )

            def all_acked() -> list[dict[str, Any]] | None:
                # The server holds every ack, and the agent knows (an ack whose answer was
                # lost with a kill is sent again on the next connection: answered conflict).
                found = _commands(server_process, agent_id)
                settled = not agent.ledger.counts().get("to_ack")
                return found if settled and all(c["status"] != "pending" for c in found) else None

            commands = await eventually(all_acked, timeout=30, what="every command acked")
            counts = agent.ledger.counts()
            await eventually(lambda: _on_websocket(running), what="the last reconnect")
            assert agent.channel.sessions >= kills + 1
    finally:
        argus.close()
    stored = [e["event_id"] for e in _events(server_process, stream)]
    assert len(produced) > kills * 50
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(stored) == set(produced), f"{len(set(produced) - set(stored))} events lost"
    assert sorted(c["batch_id"] for c in commands) == sorted(reruns)
    assert all(c["status"] == "started" and c["agent_id"] == agent_id for c in commands)
    # Each rerun ran exactly once, and the ledger holds each ack as sent once.
    assert sorted(runs.read_text().split()) == sorted(reruns)
    assert counts.get("acked") == kills and not counts.get("to_ack")


async def _produce(outbox: Any, batch_id: str, produced: list[str], done: asyncio.Event) -> None:
    """Put numbered events into the agent's outbox, up to 1,000 a second, until ``done``."""
    source = EventSource(project="ws-test", host=HOST)
    n = 0
    while not done.is_set():
        events = [
            make_event("log_line", EventKind.NOTICE, batch_id, source, {"line": f"{n + i}"})
            for i in range(10)
        ]
        n += len(events)
        await outbox.put(events)
        produced.extend(e.event_id for e in events)
        await asyncio.sleep(0.01)


def _events(server: DevServer | ServerProcess, batch_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server.url}/api/_dev/events", params={"batch_id": batch_id}).json()


def _commands(server: DevServer | ServerProcess, agent_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server.url}/api/_dev/commands", params={"agent_id": agent_id}).json()


def _rerun(server: ServerProcess, batch_id: str) -> str:
    """Press Rerun on a fresh connection (the server process comes and goes)."""
    with contextlib.closing(ArgusUser(server.url, server.token)) as person:
        return person.rerun(batch_id)


# -- against a tiny server of the test's own --------------------------------------------------


class TinyServer:
    """A websockets server speaking argus-agent.v1 as the test's ``session`` coroutine says:
    ``session(ws, n)`` runs for the n-th connection (from 0), after the hello was read."""

    def __init__(self, session: Callable[[ServerConnection, int], Any]) -> None:
        self.session = session
        self.connections = 0
        self.hellos: list[dict[str, Any]] = []
        self.close_codes: dict[int, int | None] = {}
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        n = self.connections
        self.connections += 1
        self.hellos.append(json.loads(await ws.recv()))
        welcome = wsproto.Welcome(server_version="tiny", confirmed_seq=None)
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
async def _channel(url: str, tmp_path: Path) -> AsyncIterator[tuple[AutoChannel, Dispatcher]]:
    """An AutoChannel (``websocket`` mode) with a real dispatcher, running until the end."""
    settings = _settings(url, tmp_path, server={"transport": "websocket", "timeout_s": 1.0})
    state_dir = settings.agent.state_dir
    state_dir.mkdir(parents=True)
    ledger = CommandLedger(state_dir / "state.db")
    jobs = JobManager(JobStore(state_dir / "jobs"), settings.jobs)
    dispatcher = Dispatcher(ledger, jobs, settings, AuditLog(state_dir / "audit.log"))
    client = ArgusClient(url, timeout_s=1.0)
    creds = AgentCredentials(server_url=url, agent_id="agent-tiny", agent_token="ag_live_tiny")
    state, agent = ChannelState(), settings.agent
    channel = AutoChannel(
        "websocket", client, creds, dispatcher, state, agent, server_poll_interval_s=1.0
    )
    shutdown = asyncio.Event()
    task = asyncio.create_task(channel.run(shutdown))
    try:
        yield channel, dispatcher
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        ledger.close()


def _hostile_frames(rng: random.Random, count: int) -> list[str | bytes]:
    """Frames a broken or hostile server might send: garbage, wrong types and fields,
    malformed commands (one with an id, acked failed), truncations, errors, deep nesting."""
    valid = [
        '{"type":"command","id":"c-%d","kind":"rerun","batch_id":"../x","payload":{}}',
        '{"type":"ack_result","cmd_id":"c-%d","result":"ok","detail":null}',
        '{"type":"confirm","seq":%d,"accepted":0,"rejected":0,"results":[]}',
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


def _command(cmd_id: str, kind: str, batch_id: str) -> str:
    message = wsproto.CommandMsg(id=cmd_id, kind=kind, batch_id=batch_id, payload={})
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
