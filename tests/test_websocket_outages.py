"""The websocket channel through server outages: the reference server as a real
``argus-agent dev-server`` process on one port and one database, SIGSTOPped (a hung server,
found by the keepalive) or SIGKILLed mid-stream (nothing lost, nothing counted twice). No timed
assertions: the figures (detection time) are measured in ``bench/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from argus_agent.events import EventKind, EventSource, make_event
from tests.support import (
    HOST,
    ArgusUser,
    RunningAgent,
    eventually,
    on_websocket,
    register,
    server_commands,
    server_events,
    settings_for,
)

DEV_SERVER = ["dev-server", "--user", "alice", "--poll-interval", "0.2"]


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
    settings = settings_for(server_process.url, tmp_path, server={"timeout_s": 2.0})
    await register(settings, server_process.token)
    argus = ArgusUser(server_process.url, server_process.token)
    try:
        async with RunningAgent(settings) as running:
            channel = running.agent.state.channel
            await eventually(lambda: on_websocket(running), what="the websocket")
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
                lambda: on_websocket(running) and running.agent.channel.sessions > first,
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
    settings = settings_for(server_process.url, tmp_path, server={"token": token, "timeout_s": 2.0})
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
                for kill in range(kills):
                    # A new session each time: right after a restart the channel may still
                    # show the killed server's connection (and events flow over REST meanwhile).
                    await eventually(
                        lambda k=kill: on_websocket(running) and agent.channel.sessions > k,
                        timeout=30,
                        what="connect",
                    )
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
                found = server_commands(server_process.url, agent_id)
                settled = not agent.ledger.counts().get("to_ack")
                return found if settled and all(c["status"] != "pending" for c in found) else None

            commands = await eventually(all_acked, timeout=30, what="every command acked")
            counts = agent.ledger.counts()
            await eventually(
                lambda: on_websocket(running) and agent.channel.sessions > kills,
                what="the last reconnect",
            )
            assert agent.channel.sessions >= kills + 1
    finally:
        argus.close()
    stored = [e["event_id"] for e in server_events(server_process.url, stream)]
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


def _rerun(server: ServerProcess, batch_id: str) -> str:
    """Press Rerun on a fresh connection (the server process comes and goes)."""
    with contextlib.closing(ArgusUser(server.url, server.token)) as person:
        return person.rerun(batch_id)
