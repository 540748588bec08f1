"""Delivery under trouble: a bad envelope among good ones under the real rate limit, a broken
outbox file, a job that ends while the agent is down, a job whose exec fails, the sampler
across job changes."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Backoff
from argus_agent.devserver import DevServer
from argus_agent.events import EventKind, EventSource, OutEvent, make_event
from argus_agent.outbox import Outbox
from argus_agent.sender import EventSender
from argus_agent.telemetry.sampler import JobRef, Sampler
from tests.support import (
    AgentProcess,
    ArgusUser,
    RunningAgent,
    agent_env,
    eventually,
    register,
    server_events,
)

PY = shlex.quote(sys.executable)
SOURCE = EventSource(project="p", host="h")


async def test_one_bad_envelope_under_the_rate_limit_blocks_nothing(tmp_path: Path) -> None:
    server = DevServer(db_path=tmp_path / "argus.sqlite", ingest_rate_limit=(20, 20.0))
    server.start()
    try:
        token = server.create_user("alice")
        box = Outbox(tmp_path / "outbox.db", max_bytes=1 << 30)
        await box.start()
        good = [
            make_event("log_line", EventKind.LOG, "b-1", SOURCE, {"line": f"l{i}"})
            for i in range(99)
        ]
        bad_body = json.loads(good[0].body)
        bad_body["event_id"] = "bad-event-0001"
        bad_body["unexpected"] = True  # unknown keys are refused: the whole request is 422
        bad = OutEvent("bad-event-0001", EventKind.LOG, "b-1", json.dumps(bad_body).encode())
        await box.put([*good[:50], bad, *good[50:]])
        client = ArgusClient(server.url)
        sender = EventSender(box, client, token, Backoff(0.05, 0.5))
        deadline = time.monotonic() + 30
        while box.stats().queued and time.monotonic() < deadline:
            delay = await sender.send_once()
            if delay:
                await asyncio.sleep(min(delay, 1.0))
        assert box.stats().queued == 0, "the bad event must not block the others"
        assert sender.state.sent == 99 and sender.state.rejected == 1
        stored = {e["event_id"] for e in server_events(server.url, "b-1")}
        assert stored == {e.event_id for e in good}
        await client.aclose()
        await box.close()
    finally:
        server.stop()


async def test_a_corrupt_outbox_is_set_aside_and_a_fresh_one_works(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path, max_bytes=1 << 20)
    await asyncio.wait_for(box.start(), 5)
    try:
        await box.put([make_event("log_line", EventKind.LOG, "b", SOURCE, {"line": "x"})])
        assert box.stats().queued == 1
        (kept,) = box.recovered_from
        assert Path(kept["path"]).read_bytes().startswith(b"this is not a database")
    finally:
        await box.close()


async def test_a_job_that_ends_while_the_agent_is_down_gets_its_lifecycle_event_once(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = agent_env(settings, ARGUS_TOKEN=user_token, ARGUS_AGENT_TELEMETRY_LOG_POLL_S="0.05")
    first = AgentProcess(env, tmp_path / "agent1.log")
    try:
        await first.status()
        batch = argus.rerun(argus.record_batch("echo before; sleep 1.5; echo after; exit 4"))
        await eventually(lambda: server_events(server.url, batch, "log_line"), what="a line")
    finally:
        first.kill()
    await asyncio.sleep(2.5)  # the job ends while no agent runs
    for attempt in range(2):  # and a second restart must not send it again
        again = AgentProcess(env, tmp_path / f"agent{attempt + 2}.log")
        try:
            failed = await eventually(
                lambda: server_events(server.url, batch, "batch_failed"),
                timeout=20,
                what="batch_failed after the restart",
            )
            await asyncio.sleep(1.0)
        finally:
            again.stop()
    assert len(failed) == 1 and failed[0]["data"]["error"] == "exit code 4"
    lines = [e["data"]["line"] for e in server_events(server.url, batch, "log_line")]
    assert lines == ["before", "after"], "no line lost, none sent twice"
    assert argus.batch(batch)["status"] == "failed"


async def test_an_exec_failure_ends_the_batch(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings(
        server={"token": user_token}, jobs={"shell": ["/nonexistent/shell", "-c"]}
    )
    await register(settings, user_token)
    async with RunningAgent(settings):
        batch = argus.rerun(argus.record_batch("echo hi"))
        failed = await eventually(
            lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
        )
        assert failed[0]["data"]["error"].startswith("exec failure: cannot start /nonexistent")
        assert argus.acked(batch, "rerun")["status"] == "failed"


def test_sampler_keeps_cpu_figures_when_another_job_starts() -> None:
    busy = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"

    def job() -> int:
        pid = os.fork()
        if pid == 0:  # a stand-in shim, with one busy child
            os.setsid()
            os.execv(
                sys.executable,
                [
                    sys.executable,
                    "-c",
                    f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])",
                ],
            )
        return pid

    one = job()
    two = None
    try:
        time.sleep(0.5)
        sampler = Sampler()
        refs = [JobRef("one", one, "/")]
        sampler.read(refs)
        time.sleep(0.5)
        _, first = sampler.read(refs)
        assert first["one"].cpu_pct and first["one"].cpu_pct > 20
        two = job()
        time.sleep(0.5)
        refs.append(JobRef("two", two, "/"))
        _, after = sampler.read(refs)
        assert after["one"].cpu_pct and after["one"].cpu_pct > 20, "figures kept across changes"
        assert after["two"].num_procs == 1
    finally:
        for pid in (one, two):
            if pid:
                os.killpg(pid, 9)
                os.waitpid(pid, 0)
