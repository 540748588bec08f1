"""Benchmark: the websocket channel against polling, measured in the same run.

1. Command round trip: from the reference server creating a command (a Stop, in
   ``executor._queue``) to the server holding the agent's ack (``executor.ack_command``
   returned). The batch has no job on the agent, so the ack (failed) is immediate and no job
   start is counted. Timed inside the in-process server (perf_counter around those two calls).
2. Rerun to the job's first line: from just before the HTTP POST of Rerun to the timestamp the
   job's first command writes (``date +%s.%N``).
3. Events/s: N events put into the agent's outbox in one commit; time until all are confirmed
   (outbox empty), over the websocket and over REST batches, each against its own
   ``argus-agent dev-server`` process (``--no-rate-limit``), as a real server is never in the
   agent's process. A warm-up round, then ROUNDS rounds; the median round is reported, with
   the CPU time each side spent per event (this process: agent and benchmark; the server
   process and its frame worker). The websocket is measured twice: with the dev-server's
   default frame worker (events frames parsed in a child process while the server stores
   the frames before them) and with ``--no-frame-worker`` (all in the server's process).
4. Hung server: ``argus-agent dev-server`` as a real process, SIGSTOPped while the agent is
   connected; time until the agent's channel state leaves "connected"; then SIGCONT and the
   next trial once it reconnected.
5. Compression: one events frame of 500 log lines and one of 500 resource snapshots, as the
   agent sends them, deflated as ``permessage-deflate`` would (zlib, raw deflate, level 6):
   size, and the CPU time to compress and decompress it; from which the link speed below
   which compression would save more time than it costs.

The websocket server is started with ``poll_interval_s=30`` (what the agent's poll fallback
would use). Polling at 30 s cannot give a median in a short run, so polling is measured against
a server with ``--poll-interval`` (POLL_S below) and says so in the table. Servers 1-2 run in
this process (sharing the GIL with the agent); 3 and 4 are separate processes.

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
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support

from argus_agent.config import Settings
from argus_agent.devserver import DevServer, executor
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.logsetup import configure
from argus_agent.registration import register_host
from argus_agent.wsproto import encode_events
from tests.support import ArgusUser, RunningAgent, eventually, settings_for

HOST = socket.gethostname()
POLL_S = 1.0  # the polling server's interval (30 s would take minutes per median)
ROUNDS = 5  # events/s rounds after the warm-up
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
    return settings_for(url, root, server={"token": token, "transport": transport, **server})


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


def _log_events(count: int) -> list[dict[str, Any]]:
    source = EventSource(project="bench", host=HOST)
    batch = f"bench-{random.getrandbits(32):08x}"
    return [
        make_event("log_line", EventKind.NOTICE, batch, source, {"line": f"line {i} " + "x" * 60})
        for i in range(count)
    ]


async def _throughput(running: RunningAgent, events: int) -> float:
    """Events/s: ``events`` put in one commit, until the outbox is empty."""
    return await _deliver(running, _log_events(events))


async def _deliver(running: RunningAgent, items: list[Any]) -> float:
    """Events/s: ``items`` (made beforehand) put in one commit, until the outbox is empty."""
    box = running.agent.outbox
    events = len(items)
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
            await running.stop()
        argus.close()
    finally:
        server.stop()
    return {"rtt": rtt, "reruns": reruns}


# -- 4. a hung (SIGSTOPped) dev-server process -------------------------------------------------


@asynccontextmanager
async def _server_process(
    root: Path, *flags: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], str, str]]:
    """``argus-agent dev-server`` as a process of its own: (process, url, alice's token)."""
    log = root / "dev-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "argus_agent.cli", "dev-server", "--user", "alice"),
                *("--port", "0", "--db", str(root / "argus.sqlite"), "--poll-interval", "30"),
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> list[str] | None:
            lines = [x for x in log.read_text().splitlines() if x.startswith(("argus", "user"))]
            return lines if len(lines) >= 2 else None

        lines = await eventually(ready, timeout=30, interval=0.02)
        yield proc, lines[0].split()[-1], lines[1].split()[-1]
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def _tree_cpu_s(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of *processes* (the server and its frame worker)."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


async def _events_per_s(
    kind: str,
    args: argparse.Namespace,
    root: Path,
    *,
    deflate: bool = False,
    frame_worker: bool = True,
) -> dict[str, Any]:
    """Median events/s over ROUNDS rounds, and CPU microseconds per event on each side (the
    server's counts its frame worker's)."""
    root.mkdir()
    flags = ["--no-rate-limit"] + ([] if kind == "websocket" else ["--no-websocket"])
    flags += [] if frame_worker else ["--no-frame-worker"]
    async with _server_process(root, *flags) as (proc, url, token):
        server = psutil.Process(proc.pid)
        server_side = [server, *server.children(recursive=True)]
        settings = _settings(
            url,
            token,
            root,
            "websocket" if kind == "websocket" else "poll",
            websocket_compression=deflate,
        )
        await register_host(settings, token, force=False)
        rounds: list[tuple[float, float, float]] = []
        async with RunningAgent(settings) as running:
            await eventually(lambda: _connected(running, kind), timeout=30)
            await _throughput(running, min(2000, args.events))  # warm-up
            for _ in range(ROUNDS):
                items = _log_events(args.events)  # not counted: the agent's sources make them
                before = _tree_cpu_s(server_side), time.process_time()
                rate = await _deliver(running, items)
                after = _tree_cpu_s(server_side), time.process_time()
                spent = after[0] - before[0]
                rounds.append((rate, (after[1] - before[1]) / args.events, spent / args.events))
            via = running.agent.sender.state.via
            await running.stop()
    rate, agent_s, server_s = sorted(rounds)[len(rounds) // 2]
    return {"rate": rate, "agent_us": agent_s * 1e6, "server_us": server_s * 1e6, "via": via}


async def _hung(trials: int, root: Path) -> list[float]:
    root.mkdir()
    async with _server_process(root) as (proc, url, token):
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


# -- 5. compression ---------------------------------------------------------------------------


def _snapshot_events(count: int) -> list[dict[str, Any]]:
    source = EventSource(project="bench", host=HOST)
    data = {
        "cpu_util_pct": 37.5,
        "ram_mb": 12345.6,
        "ram_total_mb": 64000.0,
        "disk_free_mb": 812345.0,
        "gpu_util_pct": 98.0,
        "gpu_mem_mb": 30123.0,
        "gpu_temp_c": 71.0,
        "proc_cpu_pct": 101.2,
        "proc_ram_mb": 8123.4,
    }
    return [
        make_event("resource_snapshot", EventKind.NOTICE, "bench", source, dict(data))
        for _ in range(count)
    ]


def _compression() -> list[tuple[str, int, int, float]]:
    """(frame, raw bytes, deflated bytes, compress + decompress seconds) per frame kind."""
    out = []
    for label, events in (
        ("500 log lines", _log_events(500)),
        ("500 resource snapshots", _snapshot_events(500)),
    ):
        frame = encode_events(1, [e.body for e in events]).encode()
        runs = 20
        started = time.process_time()
        for _ in range(runs):
            deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            packed = deflate.compress(frame) + deflate.flush(zlib.Z_SYNC_FLUSH)
            inflate = zlib.decompressobj(-15)
            assert inflate.decompress(packed) == frame
        out.append((label, len(frame), len(packed), (time.process_time() - started) / runs))
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="argus-bench-ws-"))
    began = time.perf_counter()
    try:
        ws = await _in_process("websocket", args, root / "ws")
        poll = await _in_process("poll", args, root / "poll")
        ws_rate = await _events_per_s("websocket", args, root / "ws-events")
        rest_rate = await _events_per_s("poll", args, root / "rest-events")
        inline = await _events_per_s("websocket", args, root / "ws-inline", frame_worker=False)
        deflated = await _events_per_s("websocket", args, root / "deflate", deflate=True)
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
    print(
        f"events from one agent to a dev-server process, median of {ROUNDS} rounds of {args.events}"
    )
    print(f"{'':<44} {'events/s':>10} {'agent us/event':>15} {'server us/event':>16}")
    for label, r in (
        ("over the websocket", ws_rate),
        ("REST batches", rest_rate),
        ("websocket, no frame worker", inline),
        ("websocket + deflate", deflated),
    ):
        print(
            f"{label + ' (via ' + str(r['via']) + ')':<44} {r['rate']:10.0f} "
            f"{r['agent_us']:15.1f} {r['server_us']:16.1f}"
        )
    ratio = ws_rate["rate"] / rest_rate["rate"]
    print(f"websocket / REST: {ratio:.2f}x (targets >= 20,000/s and >= 2x)")
    print()
    print(
        f"{'compression (deflate, level 6)':<28} {'raw B':>8} {'deflated B':>11} {'ratio':>6} "
        f"{'CPU ms':>7} {'pays below':>12}"
    )
    for label, raw, packed, cpu_s in _compression():
        # Compression saves (raw - packed) bytes of link time and costs cpu_s of CPU time.
        pays_below_mbit = (raw - packed) * 8 / cpu_s / 1e6
        print(
            f"{label:<28} {raw:8d} {packed:11d} {raw / packed:6.1f} {cpu_s * ms:7.2f} "
            f"{pays_below_mbit:8.0f} Mb/s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--reruns", type=int, default=10)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--trials", type=int, default=10)
    configure("warning")
    asyncio.run(main(parser.parse_args()))
