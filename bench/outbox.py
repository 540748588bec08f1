"""Benchmark: the durable outbox and delivery to the reference server.

1. Enqueue: events put durably (committed with fsync, synchronous=FULL) by concurrent
   producers, as batches of 20 (a tick of snapshots, a chunk of log lines) and one by one.
2. Delivery: the same events sent by the EventSender to the reference server
   (``argus_agent.devserver`` in its own process, ingest rate limit off) over loopback, 500
   per request. Argus v0.3.0 itself allows 10 requests/s per token after a burst of 60,
   i.e. at most 5,000 events/s.

Usage: python bench/outbox.py [--events 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Backoff
from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.logsetup import configure
from argus_agent.outbox import Outbox
from argus_agent.sender import EventSender

SOURCE = EventSource(project="bench", host="bench-host", user="alice", command="python t.py")


def _snapshot(batch: str) -> object:
    data = {
        k: round(random.random() * 100, 1)
        for k in (
            "cpu_util_pct",
            "ram_mb",
            "ram_total_mb",
            "disk_free_mb",
            "disk_total_mb",
            "proc_cpu_pct",
            "proc_ram_mb",
            "proc_gpu_mem_mb",
            "gpu_util_pct",
            "gpu_mem_mb",
            "gpu_mem_total_mb",
            "gpu_temp_c",
        )
    }
    data["num_procs"] = 12
    return make_event("resource_snapshot", EventKind.SNAPSHOT, batch, SOURCE, data)


def _start_server(root: Path) -> tuple[subprocess.Popen, str, str]:
    """The reference server in its own process (as a real server would be), rate limit off."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(root / "argus.sqlite"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    token = proc.stdout.readline().strip()
    if not token:
        raise RuntimeError("the reference server did not start")
    return proc, f"http://127.0.0.1:{port}", token


SERVER_CODE = """
import sys, time
from argus_agent.devserver import DevServer
srv = DevServer(db_path=sys.argv[1], port=int(sys.argv[2]), ingest_rate_limit=False)
srv.start()
print(srv.create_user("alice"), flush=True)
while True:
    time.sleep(3600)
"""


async def _enqueue(box: Outbox, events: list, batch: int, producers: int) -> float:
    chunks = [events[i : i + batch] for i in range(0, len(events), batch)]
    queue: asyncio.Queue = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def producer() -> None:
        while not queue.empty():
            await box.put(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(producers)))
    return time.perf_counter() - started


async def main(count: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="argus-bench-outbox-"))
    try:
        box = Outbox(root / "outbox.db", max_bytes=2 << 30)
        await box.start()
        batched = [_snapshot("bench-1") for _ in range(count)]
        t_batched = await _enqueue(box, batched, 20, 8)
        singles = [_snapshot("bench-2") for _ in range(count // 5)]
        t_single = await _enqueue(box, singles, 1, 64)
        server, url, token = _start_server(root)
        client = ArgusClient(url)
        sender = EventSender(box, client, token, Backoff(0.05, 1.0))
        total = box.stats().queued
        started = time.perf_counter()
        while box.stats().queued:
            delay = await sender.send_once()
            if delay:
                await asyncio.sleep(delay)
        t_send = time.perf_counter() - started
        await client.aclose()
        server.terminate()
        server.wait()
        await box.close()
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
            f"{platform.python_version()}; resource_snapshot events of "
            f"{len(batched[0].body)} bytes"
        )
        print()
        print(f"{'what':<48} {'events':>8} {'seconds':>8} {'events/s':>10}")
        for label, n, t in (
            ("enqueue durably, batches of 20, 8 producers", len(batched), t_batched),
            ("enqueue durably, one by one, 64 producers", len(singles), t_single),
            ("deliver to the reference server (500/request)", total, t_send),
        ):
            print(f"{label:<48} {n:8d} {t:8.2f} {n / t:10.0f}")
        print(f"(sent {sender.state.sent}, rejected {sender.state.rejected})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    configure("warning")
    asyncio.run(main(parser.parse_args().events))
