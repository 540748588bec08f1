"""The reference server's frame worker (``devserver/frameworker.py``): a child process that
parses and checks websocket events frames while the server stores the frames before them.
Its answers must be the server process's own, for any frame; a server with it must answer
every frame (good, refused, hostile) as one without it; a worker that dies loses no frame;
and no worker outlives its server, however the server ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argus_agent import wsproto as w
from argus_agent.devserver import WsOptions
from argus_agent.devserver.frameworker import FrameWorker
from argus_agent.devserver.schemas import EVENT_TYPES
from argus_agent.devserver.wsframes import PreparedFrame, prepare_frame
from tests.support import alive, eventually, server_events
from tests.test_devserver_ws import Agent, dev_server, envelope, receive
from tests.test_devserver_wsframes import JSON_VALUES


def _without_received_at(prepared: PreparedFrame | None) -> Any:
    """A prepared frame without its rows' received_at (the second each side read it)."""
    if prepared is None:
        return None
    return [(e, env, ref, row[:8] if row else None) for e, env, ref, row in prepared.items]


ENVELOPES = st.fixed_dictionaries(
    {
        "event_type": st.sampled_from(EVENT_TYPES),
        "data": st.dictionaries(
            st.sampled_from(["message", "epoch", "status", "error", "gpu_util_pct", "x"]),
            JSON_VALUES,
            max_size=3,
        ),
        "schema_version": st.sampled_from(["1.1", "1.1", "1.0"]),
        "job_id": st.none() | st.just("j1"),
        "event_id": st.sampled_from(["e-00000001", "e-00000002", None]),
    }
)


class _WorkerThread:
    """One frame worker on an event loop of its own thread, for many hypothesis examples
    (starting a worker per example would take a Python start-up each)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="frame-worker-test")
        self.thread.start()
        self.worker = FrameWorker()
        self.run(self.worker.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def prepare_all(self, texts: list[str]) -> list[PreparedFrame | None]:
        async def gather() -> list[PreparedFrame | None]:
            return list(await asyncio.gather(*(self.worker.prepare(t) for t in texts)))

        return self.run(gather())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.run(self.worker.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def worker_thread() -> Iterator[_WorkerThread]:
    running = _WorkerThread()
    try:
        yield running
    finally:
        running.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.lists(ENVELOPES, min_size=1, max_size=4), min_size=1, max_size=3))
def test_the_worker_answers_every_frame_as_the_server_process_would(
    worker_thread: _WorkerThread, frames: list[list[dict[str, Any]]]
) -> None:
    texts = []
    for seq, events in enumerate(frames, start=1):
        bodies = []
        for fields in events:
            body = envelope(**{k: v for k, v in fields.items() if k != "event_id"})
            if fields["event_id"] is not None:
                body["event_id"] = fields["event_id"]
            bodies.append(json.dumps(body))
        texts.append(w.encode_events(seq, bodies))
    texts.append(texts[0][:-5])  # cut short: not an events frame at all
    answers = worker_thread.prepare_all(texts)
    for text, answer in zip(texts, answers, strict=True):
        assert _without_received_at(answer) == _without_received_at(prepare_frame(text))
    assert answers[-1] is None


#: Frames an agent (or an attacker) may send, in order; answered the same with and without
#: a worker.
def _frames() -> list[str | bytes]:
    good = [json.dumps(envelope(batch_id="b-fw")) for _ in range(5)]
    twice = json.dumps(envelope(batch_id="b-fw", event_id="again-0001"))
    return [
        w.encode_events(1, good),
        w.encode_events(2, [twice, twice, good[0]]),  # copies and a resend
        w.encode_events(3, [json.dumps(envelope(batch_id="b-fw", data={"message": None}))]),
        w.encode_events(4, [json.dumps(envelope(batch_id="b-fw", event_type="job_epoch"))]),
        w.encode_events(5, [json.dumps(envelope(batch_id="b-fw", schema_version="0.9"))]),
        w.encode_events(6, [json.dumps({**envelope(batch_id="b-fw"), "extra": 1}), good[1]]),
        w.encode_events(7, [json.dumps(envelope(batch_id="b-fw", data={"x": float("nan")}))]),
        '{"type":"events","seq":8,"events":[',  # cut short
        '{"type":"events","seq":"nine","events":[]}',
        w.encode_events(1, good),  # an old seq again
        b'{"type":"events"}',  # binary
    ]


async def _answers(agent: Agent, frames: list[str | bytes]) -> list[Any]:
    out = []
    async with agent.session() as (conn, _welcome):
        for frame in frames:
            await conn.send(frame)
            answer = await receive(conn)
            out.append(
                answer.model_dump(exclude={"ref"}) if hasattr(answer, "model_dump") else answer
            )
    return out


async def test_a_server_with_a_worker_answers_every_frame_as_one_without(tmp_path: Path) -> None:
    results, frames = [], _frames()
    for worker in (True, False):
        with dev_server(
            tmp_path, name=f"fw-{worker}", websocket=WsOptions(frame_worker=worker)
        ) as srv:
            assert (srv.frame_worker_pid is not None) is worker
            agent = Agent(srv, srv.create_user("alice"))
            answers = await _answers(agent, frames)
            stored = [
                (e["event_id"], e["event_type"], e["data"]) for e in server_events(srv.url, "b-fw")
            ]
            results.append((answers, stored))
    assert results[0] == results[1]
    answers, stored = results[0]
    kinds = [a.get("type") for a in answers]
    assert kinds == ["confirm"] * 6 + ["error"] * 3 + ["confirm", "error"]
    assert [a["rejected"] for a in answers[:6]] == [0, 0, 0, 1, 1, 1]
    assert len(stored) == 7  # frame 1's 5, one copy of "again", frame 3's line


async def test_a_killed_worker_loses_no_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "argus_agent.devserver.frameworker")
    with dev_server(tmp_path, websocket=WsOptions(frame_worker=True)) as srv:
        agent = Agent(srv, srv.create_user("alice"))
        pid = srv.frame_worker_pid
        assert pid is not None
        sent: list[str] = []
        async with agent.session() as (conn, _welcome):
            for seq in range(1, 41):
                events = [envelope(batch_id="b-kill") for _ in range(50)]
                sent += [e["event_id"] for e in events]
                await conn.send(w.encode_events(seq, [json.dumps(e) for e in events]))
                if seq == 10:
                    psutil.Process(pid).kill()
            confirms = [await receive(conn) for _ in range(40)]
        assert [c.seq for c in confirms] == list(range(1, 41))
        assert all(c.accepted == 50 and c.rejected == 0 for c in confirms)
        stored = [e["event_id"] for e in server_events(srv.url, "b-kill")]
        assert sorted(stored) == sorted(sent)
        assert srv.frame_worker_pid is None
        assert "frame worker exited" in caplog.text
    assert not alive(pid)


async def test_the_worker_ends_with_its_server(tmp_path: Path) -> None:
    with dev_server(tmp_path, websocket=WsOptions(frame_worker=True)) as srv:
        pid = srv.frame_worker_pid
        assert pid is not None and alive(pid)
    assert not alive(pid)  # stop() waited for it


async def test_the_worker_ends_when_its_server_process_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "dev-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "argus_agent.cli", "dev-server", "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await eventually(lambda: "listening on" in log.read_text(), timeout=30)
        workers = psutil.Process(server.pid).children()
        assert len(workers) == 1 and "argus_agent.devserver.frameworker" in " ".join(
            workers[0].cmdline()
        )
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        # The kernel closed the worker's stdin with the server's end of the pipe.
        await eventually(lambda: not alive(workers[0].pid), timeout=10, what="the worker to exit")
    finally:
        server.kill()
        server.wait(10)


async def _answered_once(agent: Agent) -> None:
    """One events frame sent and confirmed: past this, the worker is ready."""
    async with agent.session() as (conn, _welcome):
        await conn.send(w.encode_events(1, [json.dumps(envelope(batch_id="b-warm"))]))
        assert (await receive(conn)).seq == 1


async def test_a_stopped_worker_is_given_up_and_no_frame_waits_on_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that answers nothing (SIGSTOPped, stuck) is killed after the timeout; the
    server parses the frames itself, so every session goes on."""
    caplog.set_level(logging.WARNING, "argus_agent.devserver.frameworker")
    options = WsOptions(frame_worker=True, frame_worker_timeout_s=0.5)
    with dev_server(tmp_path, websocket=options) as srv:
        agent = Agent(srv, srv.create_user("alice"))
        pid = srv.frame_worker_pid
        assert pid is not None
        await _answered_once(agent)  # the worker is up and answering
        os.kill(pid, signal.SIGSTOP)
        sent: list[str] = []
        async with agent.session() as (conn, _welcome):
            for seq in range(1, 4):
                events = [envelope(batch_id="b-stop") for _ in range(5)]
                sent += [e["event_id"] for e in events]
                await conn.send(w.encode_events(seq, [json.dumps(e) for e in events]))
            confirms = [await receive(conn) for _ in range(3)]
        assert [(c.seq, c.accepted) for c in confirms] == [(1, 5), (2, 5), (3, 5)]
        stored = [e["event_id"] for e in server_events(srv.url, "b-stop")]
        assert sorted(stored) == sorted(sent)
        assert "gave no answer within 0.5 s; killing it" in caplog.text
        await eventually(lambda: not alive(pid), what="the stopped worker killed")
        assert srv.frame_worker_pid is None


async def test_a_stopped_worker_is_given_up_even_when_a_frame_cannot_be_written_to_it(
    tmp_path: Path,
) -> None:
    """A frame bigger than the pipe waits in ``drain`` for a stopped worker to read it: the
    worker is still given up after the timeout, and no session waits on it (a second agent's
    small frame behind the big one included). Found by a hostile review."""
    options = WsOptions(frame_worker=True, frame_worker_timeout_s=0.5)
    with dev_server(tmp_path, websocket=options) as srv:
        agent = Agent(srv, srv.create_user("alice"))
        other = Agent(srv, srv.create_user("bob"), hostname="other-host")
        pid = srv.frame_worker_pid
        assert pid is not None
        await _answered_once(agent)  # it runs, its pipes widened
        os.kill(pid, signal.SIGSTOP)
        big = [envelope(batch_id="b-big", data={"message": "x" * 4000}) for _ in range(500)]
        frame = w.encode_events(2, [json.dumps(e) for e in big])
        assert len(frame) > 2 * 2**20  # more than the worker's 1 MiB pipe takes
        async with agent.session() as (conn, _), other.session() as (conn2, _):
            await conn.send(frame)
            await asyncio.sleep(0.2)
            await conn2.send(w.encode_events(1, [json.dumps(envelope(batch_id="b-small"))]))
            assert (await receive(conn2)).accepted == 1
            assert (await receive(conn)).accepted == 500
        await eventually(lambda: not alive(pid), what="the stopped worker killed")
