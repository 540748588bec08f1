"""Benchmark: the websocket channel against polling, measured in the same run.

1. Command round trip: from the reference server creating a command (a Stop, in
   ``executor._queue``) to the server holding the agent's ack (``executor.ack_command``
   returned). The batch has no job on the agent, so the ack (failed) is immediate and no job
   start is counted. Timed inside the in-process server (perf_counter around those two calls).
2. Rerun to the job's first line: from just before the HTTP POST of Rerun to the timestamp the
   job's first command writes (``date +%s.%N``).
3. Events/s: N events put into the agent's outbox in one commit; time until all are confirmed
   (outbox empty), over the websocket and over REST batches (ingest rate limit off).
4. Hung server: ``argus-agent dev-server`` as a real process, SIGSTOPped while the agent is
   connected; time until the agent's channel state leaves "connected"; then SIGCONT and the
   next trial once it reconnected.

The websocket server is started with ``poll_interval_s=30`` (what the agent's poll fallback
would use). Polling at 30 s cannot give a median in a short run, so polling is measured against
a server with ``--poll-interval`` (POLL_S below) and says so in the table. Servers 1-3 run in
this process (sharing the GIL with the agent); 4 is a separate process.

Usage: python bench/websocket.py [--samples 100] [--reruns 10] [--events 20000] [--trials 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support

from argus_agent.config import Settings
from argus_agent.devserver import DevServer, executor
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.logsetup import configure
from argus_agent.registration import register_host
from tests.support import ArgusUser, RunningAgent, eventually

HOST = socket.gethostname()
POLL_S = 1.0  # the polling server's interval (30 s would take minutes per median)
ROOT_JOBS: dict[str, Any] = (
    {"run_as": "root", "allow_root": True, "users": {"alice": "*"}} if os.geteuid() == 0 else {}
)

# -- server-side timing of commands: created (queued) -> ack stored ---------------------------

CREATED: dict[str, float] = {}
ACKED: dict[str, float] = {}
_queue, _ack = executor._queue, executor.ack_command


def _timed_queue(*args: Any, **kw: Any) -> str:
    t = time.perf_counter()
    cmd_id = _queue(*args, **kw)
    CREATED[cmd_id] = t
    return cmd_id


def _timed_ack(store: Any, agent_id: str, cmd_id: str, *args: Any, **kw: Any) -> Any:
    result = _ack(store, agent_id, cmd_id, *args, **kw)
    ACKED.setdefault(cmd_id, time.perf_counter())
    return result


executor._queue = _timed_queue
executor.ack_command = _timed_ack


def _settings(url: str, token: str, root: Path, transport: str, **server: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"url": url, "token": token, "transport": transport, **server},
            "agent": {
                "state_dir": str(root / "st"),
                "hostname": HOST,
                "heartbeat_interval_s": 0.5,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.5,
            },
            "jobs": {"stop_grace_s": 2.0, **ROOT_JOBS},
        }
    )


def _connected(running: RunningAgent, kind: str) -> bool:
    channel = running.agent.state.channel
    if kind == "websocket":
        return channel.kind == "websocket" and channel.connected_since is not None
    return channel.kind == "poll" and channel.state == "connected"


async def _stops(argus: ArgusUser, samples: int, spread: float) -> list[float]:
    """Round trips of ``samples`` Stops of batches the agent has no job for (seconds)."""
    out = []
    for _ in range(samples):
        batch = await asyncio.to_thread(argus.record_batch, "exit 0", done=False)
        await asyncio.to_thread(argus.stop, batch)
        cmd = await eventually(lambda b=batch: argus.acked(b, "stop"), timeout=60, interval=0.01)
        out.append(ACKED[cmd["id"]] - CREATED[cmd["id"]])
        if spread:
            await asyncio.sleep(random.uniform(0, spread))  # a random phase against the poll
    return out


async def _reruns(argus: ArgusUser, root: Path, count: int) -> list[float]:
    """Rerun pressed -> the job's first line (its timestamp), seconds."""
    marks = root / "marks"
    marks.mkdir()
    source = argus.record_batch(f'date +%s.%N > "{marks}/$ARGUS_BATCH_ID"')
    out = []
    for _ in range(count):
        pressed = time.time()
        batch = await asyncio.to_thread(argus.rerun, source)
        mark = marks / batch
        await eventually(lambda m=mark: m.exists() and m.read_text().strip(), timeout=60)
        out.append(float(mark.read_text()) - pressed)
        await asyncio.sleep(random.uniform(0, POLL_S))
    return out


async def _throughput(running: RunningAgent, events: int) -> float:
    """Events/s: ``events`` put in one commit, until the outbox is empty."""
    box = running.agent.outbox
    source = EventSource(project="bench", host=HOST)
    batch = f"bench-{random.getrandbits(32):08x}"
    items = [
        make_event("log_line", EventKind.NOTICE, batch, source, {"line": f"line {i} " + "x" * 60})
        for i in range(events)
    ]
    await box.put(items)
    started = time.perf_counter()
    while box.stats().queued:
        await asyncio.sleep(0.002)
    return events / (time.perf_counter() - started)


async def _in_process(kind: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    root.mkdir()
    ws = kind == "websocket"
    server = DevServer(
        db_path=root / "argus.sqlite",
        poll_interval_s=30.0 if ws else POLL_S,
        ingest_rate_limit=False,
        websocket=ws,
    )
    server.start()
    try:
        token = server.create_user("alice")
        argus = ArgusUser(server.url, token)
        settings = _settings(server.url, token, root, "websocket" if ws else "poll")
        await register_host(settings, token, force=False)
        async with RunningAgent(settings) as running:
            await eventually(lambda: _connected(running, kind), timeout=30)
            n = args.samples if ws else max(5, args.samples // 10)
            rtt = await _stops(argus, n, 0 if ws else POLL_S)
            reruns = await _reruns(argus, root, args.reruns if ws else max(3, args.reruns // 2))
            rate = await _throughput(running, args.events)
            via = running.agent.sender.state.via
            await running.stop()
        argus.close()
    finally:
        server.stop()
    return {"rtt": rtt, "reruns": reruns, "rate": rate, "via": via}


# -- 4. a hung (SIGSTOPped) dev-server process -------------------------------------------------


async def _hung(trials: int, root: Path) -> list[float]:
    root.mkdir()
    log = root / "dev-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "argus_agent.cli",
                "dev-server",
                "--user",
                "alice",
                "--port",
                "0",
                "--db",
                str(root / "argus.sqlite"),
                "--poll-interval",
                "30",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> list[str] | None:
            lines = [x for x in log.read_text().splitlines() if x.startswith(("argus", "user"))]
            return lines if len(lines) >= 2 else None

        lines = await eventually(ready, timeout=30, interval=0.02)
        url, token = lines[0].split()[-1], lines[1].split()[-1]
        settings = _settings(url, token, root, "websocket", timeout_s=2.0)
        await register_host(settings, token, force=False)
        out = []
        async with RunningAgent(settings) as running:
            channel = running.agent.state.channel
            for _ in range(trials):
                await eventually(lambda: _connected(running, "websocket"), timeout=60)
                await asyncio.sleep(random.uniform(0.5, 2.5))  # a random phase against pings
                stopped = time.perf_counter()
                proc.send_signal(signal.SIGSTOP)
                try:
                    await eventually(
                        lambda: channel.state != "connected" or channel.connected_since is None,
                        timeout=30,
                        interval=0.01,
                    )
                    out.append(time.perf_counter() - stopped)
                except AssertionError:
                    out.append(float("inf"))
                finally:
                    proc.send_signal(signal.SIGCONT)
            await running.stop()
        return out
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="argus-bench-ws-"))
    began = time.perf_counter()
    try:
        ws = await _in_process("websocket", args, root / "ws")
        poll = await _in_process("poll", args, root / "poll")
        hung = await _hung(args.trials, root / "hung")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = 1000.0
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
        f"{platform.python_version()}; websocket server poll interval 30 s, polling server "
        f"{POLL_S:g} s; run took {time.perf_counter() - began:.0f} s"
    )
    print()
    rows = [
        ("stop created -> ack stored, websocket", ws["rtt"], "p50 <= 10 ms, p99 <= 30 ms"),
        (f"stop created -> ack stored, polling {POLL_S:g} s", poll["rtt"], ""),
        ("Rerun pressed -> job's first line, websocket", ws["reruns"], "median <= 1 s"),
        (f"Rerun pressed -> job's first line, polling {POLL_S:g} s", poll["reruns"], ""),
        ("SIGSTOPped server -> channel not connected", hung, "<= 5 s, all trials"),
    ]
    print(f"{'what':<50} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}  target")
    for label, values, target in rows:
        print(
            f"{label:<50} {len(values):4d} {_pct(values, 0.5) * ms:9.1f} "
            f"{_pct(values, 0.99) * ms:9.1f} {max(values) * ms:9.1f}  {target}"
        )
    within = sum(v <= 5.0 for v in hung)
    print(f"hung server detected within 5 s: {within} of {len(hung)}")
    print()
    print(f"{'events from one agent to the server':<50} {'events':>8} {'events/s':>10}")
    print(
        f"{'over the websocket (via ' + str(ws['via']) + ')':<50} {args.events:8d} "
        f"{ws['rate']:10.0f}"
    )
    print(
        f"{'REST batches (via ' + str(poll['via']) + ')':<50} {args.events:8d} {poll['rate']:10.0f}"
    )
    print(f"websocket / REST: {ws['rate'] / poll['rate']:.2f}x (targets >= 20,000/s and >= 2x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--reruns", type=int, default=10)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=10)
    configure("warning")
    asyncio.run(main(parser.parse_args()))
