"""Commands a hostile or broken server sends, end to end against the reference server.

- One bad command never blocks the others: each command of a poll is decoded on its own, so
  a 5000-digit integer, a payload nested 5,000 deep or a lone surrogate costs that command
  only (acked ``failed`` with the reason, or logged and audited when it has no usable id).
- A refused rerun ends its batch ``failed`` with the reason (``batch_failed``) instead of
  leaving it ``requested`` for ever.
- A launch check that blocks in the kernel never freezes the event loop.
- A per-user agent counts the reruns it refused because they were meant for another user.

The reference server cannot serve what no Python JSON encoder produces (an integer past
4300 digits, nesting past the recursion limit, a lone surrogate that SQLite cannot store), so
:class:`HostileServer`, a loopback HTTP proxy in front of it, swaps the payload of chosen
commands for raw JSON text in the jobs poll's answer and forwards everything else (register,
acks, events) byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import pwd
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from argus_agent.argus_api import ArgusClient
from argus_agent.audit import AuditLog
from argus_agent.credentials import load_credentials
from argus_agent.devserver import DevServer
from argus_agent.dispatcher import Dispatcher, call_in_thread
from argus_agent.errors import ProtocolError
from argus_agent.jobs.policy import UserDb
from argus_agent.jobs.store import JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.ledger import CommandLedger
from argus_agent.protocol import (
    MAX_COMMANDS_PER_POLL,
    Command,
    MalformedCommand,
    decode_commands,
    split_jobs,
)
from argus_agent.telemetry.manager import lifecycle_event_id
from tests.support import (
    ArgusUser,
    RunningAgent,
    eventually,
    register,
    server_events,
)

HUGE_INT = "7" * 5000
DEEP = "[" * 5000 + "]" * 5000


class HostileServer:
    """An HTTP/1.1 proxy on 127.0.0.1:0 in front of the reference server (``upstream``).

    Forwards every request and answer unchanged, except the answer of the jobs poll: there
    the payload of each command named in ``payloads`` is replaced by the raw JSON text given,
    and the raw items of ``extra_items`` are appended. One request per connection.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.payloads: dict[str, str] = {}
        self.extra_items: list[str] = []
        self.polls = 0
        self._server: asyncio.Server | None = None
        self._forward: httpx.AsyncClient | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> HostileServer:
        self._forward = httpx.AsyncClient(base_url=self.upstream, timeout=10)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._forward is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        await self._forward.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            assert self._forward is not None
            forwarded = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
            response = await self._forward.request(method, target, headers=forwarded, content=body)
            content = response.content
            if method == "GET" and target.endswith("/jobs") and response.status_code == 200:
                self.polls += 1
                content = self._rewrite(content)
            lines = [
                f"HTTP/1.1 {response.status_code} {HTTPStatus(response.status_code).phrase}",
                "Content-Type: application/json",
                f"Content-Length: {len(content)}",
                "Connection: close",
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stopped by __aexit__
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    def _rewrite(self, content: bytes) -> bytes:
        items = []
        for job in json.loads(content)["jobs"]:
            raw = self.payloads.get(job["id"])
            if raw is None:
                items.append(json.dumps(job))
            else:
                head = json.dumps({k: v for k, v in job.items() if k != "payload"})
                items.append(head[:-1] + ', "payload": ' + raw + "}")
        items.extend(self.extra_items)
        return ('{"jobs": [' + ", ".join(items) + "]}").encode()


def raw_payload(payload: dict[str, Any], **raw_members: str) -> str:
    """``payload`` as JSON text with the members in ``raw_members`` given as raw JSON."""
    kept = {k: v for k, v in payload.items() if k not in raw_members}
    text = json.dumps(kept)[:-1]
    extra = ", ".join(f"{json.dumps(k)}: {v}" for k, v in raw_members.items())
    return text + (", " if kept else "") + extra + "}"


def audit(settings: Any) -> list[dict]:
    return AuditLog(settings.agent.state_dir / "audit.log").read()


def settled(argus: ArgusUser, batch: str, kind: str = "rerun") -> dict | None:
    return argus.acked(batch, kind)


# -- decoding: pure ----------------------------------------------------------------------------


def test_each_command_is_decoded_on_its_own() -> None:
    def item(cmd_id: str, batch: str, payload: str) -> str:
        return f'{{"id": "{cmd_id}", "kind": "rerun", "batch_id": "{batch}", "payload": {payload}}}'

    body = (
        '{"other": {"x": "]}\\"[{", "y": [1, {"z": null}]}, "jobs": ['
        + item("c1", "rerun-000000000001", '{"command": "echo ]}[{\\"", "overrides": {"a": 1}}')
        + ", "
        + item("c2", "rerun-000000000002", '{"overrides": {"lr": ' + HUGE_INT + "}}")
        + ", "
        + item("c3", "rerun-000000000003", '{"overrides": {"a": ' + DEEP + "}}")
        + ", "
        + item("c4", "rerun-000000000004", '{"cwd": "/data/\\ud800"}')
        + ", "
        + item("c5", "rerun-000000000005", '{"cwd": "/data/\xff"}').replace("\xff", "\udcff")
        + ', {"kind": "rerun", "batch_id": "rerun-000000000006", "payload": '
        + DEEP
        + "}"
        + ', {"id": "c7", "kind": "stop", "batch_id": "b-7", "payload": {"x": NaN}}'
        + "]}"
    ).encode("utf-8", "surrogateescape")
    good, huge, deep, surrogate, not_utf8, anonymous, nan = decode_commands(body)
    assert isinstance(good, Command) and good.payload["command"] == 'echo ]}[{"'
    assert huge == MalformedCommand(
        "c2",
        "malformed command: an integer of 5000 digits; at most 100 accepted",
        "rerun",
        "rerun-000000000002",
    )
    assert isinstance(deep, MalformedCommand) and deep.cmd_id == "c3"
    assert "5003 levels deep; at most 32 accepted" in deep.reason
    assert isinstance(surrogate, MalformedCommand) and surrogate.cmd_id == "c4"
    assert surrogate.reason == (
        "malformed command: payload.cwd: not valid Unicode (a lone surrogate, or bytes that "
        "are not UTF-8)"
    )
    assert isinstance(not_utf8, MalformedCommand) and not_utf8.cmd_id == "c5"
    assert "not valid Unicode" in not_utf8.reason
    assert anonymous.cmd_id is None and anonymous.batch_id == "rerun-000000000006"
    assert isinstance(nan, MalformedCommand) and nan.cmd_id == "c7"
    assert "NaN is not a JSON value" in nan.reason


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>", b"[]", b'{"jobs": 1}', b'{"job": []}', b'{"jobs": [}', b'{"jobs": []} x'],
)
def test_only_an_answer_that_is_not_a_jobs_list_fails_the_poll(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="jobs poll answer is not"):
        decode_commands(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=5), st.dictionaries(st.text(), json_values, max_size=3))
def test_the_scanner_cuts_exactly_the_items_json_would_decode(
    items: list[Any], others: dict[str, Any]
) -> None:
    body = {**{k: v for k, v in others.items() if k != "jobs"}, "jobs": items}
    for ensure_ascii in (True, False):
        text = json.dumps(body, ensure_ascii=ensure_ascii, indent=1 if ensure_ascii else None)
        cut = split_jobs(text)
        assert [json.loads(piece) for piece, _ in cut] == json.loads(text)["jobs"]


# -- end to end ------------------------------------------------------------------------------


async def test_one_bad_command_never_blocks_the_others(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    async with HostileServer(server.url) as hostile:
        settings = make_settings(server={"url": hostile.url, "token": user_token})
        await register(settings, user_token)
        good = argus.rerun(argus.record_batch("echo fine"))
        bad = {
            "an integer of 5000 digits": argus.rerun(argus.record_batch("echo huge")),
            "levels deep; at most 32 accepted": argus.rerun(argus.record_batch("echo deep")),
            "payload.cwd: not valid Unicode": argus.rerun(argus.record_batch("echo surrogate")),
        }
        raw_members = [
            {"overrides": '{"lr": ' + HUGE_INT + "}"},
            {"overrides": '{"model": ' + DEEP + "}"},
            {"cwd": '"/data/\\ud800"'},
        ]
        for batch, members in zip(bad.values(), raw_members, strict=True):
            cmd = argus.command_for(batch, "rerun")
            assert cmd is not None
            hostile.payloads[cmd["id"]] = raw_payload(cmd["payload"], **members)
        anonymous = "rerun-0000000a0000"
        hostile.extra_items.append(
            f'{{"kind": "rerun", "batch_id": "{anonymous}", "payload": {DEEP}}}'
        )
        async with RunningAgent(settings) as running:
            cmd = await eventually(lambda: settled(argus, good), what="the good rerun's ack")
            assert cmd["status"] == "started"
            for reason, batch in bad.items():
                cmd = await eventually(lambda b=batch: settled(argus, b), what=reason)
                assert cmd["status"] == "failed" and reason in cmd["error"]
                # Its batch does not wait in `requested`: it ends failed, saying why.
                ended = await eventually(
                    lambda b=batch: argus.batch(b)["status"] == "failed" and argus.batch(b),
                    what=f"batch_failed for {batch}",
                )
                assert reason in ended["error"]
            # The command without an id cannot be acked: refused and audited once, however
            # often the server sends it again; its batch is ended too.
            polls = hostile.polls
            await eventually(lambda: hostile.polls >= polls + 3, what="three more polls")
            refusals = [r for r in audit(settings) if r.get("batch_id") == anonymous]
            assert len(refusals) == 1 and refusals[0]["action"] == "refuse"
            assert "levels deep" in refusals[0]["reason"] and refusals[0]["cmd_id"] is None
            await eventually(
                lambda: server_events(server.url, anonymous, "batch_failed"),
                what="batch_failed for the command without an id",
            )
            assert running.agent.state.channel.state == "connected"
            refused = {r["batch_id"] for r in audit(settings) if r["action"] == "refuse"}
            assert set(bad.values()) <= refused


async def test_a_refused_rerun_ends_its_batch_failed_with_the_reason(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    settings = make_settings(server={"token": user_token})
    await register(settings, user_token)
    gone = tmp_path / "gone"
    batch = argus.rerun(argus.record_batch("echo hi", cwd=str(gone)))
    reason = f"working directory {gone} does not exist on this host"
    async with RunningAgent(settings):
        cmd = await eventually(lambda: settled(argus, batch), what="the ack")
        assert cmd["status"] == "failed" and cmd["error"] == reason
        ended = await eventually(
            lambda: argus.batch(batch)["status"] == "failed" and argus.batch(batch),
            what="the batch to end failed",
        )
        assert ended["error"] == reason
        (event,) = server_events(server.url, batch, "batch_failed")
        assert event["data"]["error"] == reason
        # One event id per batch and command: a report repeated after a restart is one event.
        assert event["event_id"] == lifecycle_event_id(batch, cmd["id"])


class HangingUserDb(UserDb):
    """The system's user database behind a lookup that blocks in the kernel once armed, as
    NSS does on a directory service (or a home on NFS) that stopped answering: it opens a
    FIFO for reading, and open(2) of a FIFO blocks until a writer appears."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.armed = True

    def _maybe_hang(self) -> None:
        if self.armed:
            self.armed = False
            with open(self.fifo, "rb"):
                pass

    def by_name(self, name: str) -> Any:
        self._maybe_hang()
        return super().by_name(name)

    def by_uid(self, uid: int) -> Any:
        self._maybe_hang()
        return super().by_uid(uid)


def release(fifo: Path) -> bool:
    """Let a reader blocked in open() of ``fifo`` go; True if one was blocked there."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody has it open for reading
        return False
    os.close(fd)
    return True


async def test_a_check_blocked_in_the_kernel_never_freezes_the_loop(tmp_path: Path) -> None:
    """The blocking call is real: open(2) of a FIFO with no writer, which blocks in the
    kernel like a stat on a dead NFS mount (a hung mount cannot be made here without root and
    an NFS server, and FUSE is not available). ``call_in_thread`` is what the dispatcher runs
    the launch checks with."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    threads: set[threading.Thread] = set()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(TimeoutError):
            await call_in_thread(lambda: open(fifo, "rb").close(), 0.5, threads)
        assert ticks > 5, "the loop ran while the call was blocked"
        (thread,) = threads
        assert thread.is_alive() and thread.daemon
        assert release(fifo), "the call was still blocked in open()"
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
    finally:
        ticker.cancel()
        release(fifo)


async def test_a_hung_launch_check_refuses_the_rerun_and_the_agent_goes_on(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    """The rerun's user lookup blocks for real (see HangingUserDb); it is refused once the
    check times out, while the lookup is still blocked, and the agent keeps polling."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Before the fix the loop itself blocks, and so would this test: let it go after a while.
    unblock = threading.Timer(30, release, args=(fifo,))
    unblock.start()
    settings = make_settings(server={"token": user_token})
    await register(settings, user_token)
    try:
        async with RunningAgent(settings) as running:
            dispatcher = running.agent.dispatcher
            assert dispatcher is not None
            dispatcher.userdb = HangingUserDb(fifo)
            dispatcher.check_timeout_s = 0.5
            batch = argus.rerun(argus.record_batch("echo never"))
            cmd = await eventually(lambda: settled(argus, batch), what="the refusal")
            assert cmd["status"] == "failed"
            assert "check timed out after 0.5 s (hung filesystem" in cmd["error"]
            assert release(fifo), "the lookup was still blocked when the refusal was acked"
            await eventually(
                lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
            )
            # The agent goes on: the next rerun runs.
            nxt = argus.rerun(argus.record_batch("echo next"))
            cmd = await eventually(lambda: settled(argus, nxt), what="the next rerun")
            assert cmd["status"] == "started"
            assert running.agent.state.channel.state == "connected"
    finally:
        unblock.cancel()
        release(fifo)


def other_os_user() -> pwd.struct_passwd | None:
    """An existing OS user that is not root and not the one running the tests."""
    return next((p for p in pwd.getpwall() if p.pw_uid not in (0, os.geteuid())), None)


async def test_a_per_user_agent_counts_reruns_meant_for_another_user(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    """A per-user agent of OS user ``agent_user`` (``agent_uid``: the policy's view of who
    runs the agent, so that this works whoever runs the tests) gets bob's rerun through the
    reference server, refuses it, and remembers it as a foreign refusal."""
    me = other_os_user()
    if me is None:
        pytest.skip("needs an OS user other than root and the test's")
    settings = make_settings(jobs={"run_as": None, "users": {}, "allow_root": False})
    await register(settings, user_token)
    creds = load_credentials(settings.token_path)
    client = ArgusClient(server.url)
    ledger = CommandLedger(tmp_path / "state.db")
    jobs = JobManager(JobStore(tmp_path / "jobs"), settings.jobs)
    dispatcher = Dispatcher(
        ledger,
        jobs,
        settings,
        AuditLog(tmp_path / "audit.log"),
        agent_account="alice",
        owner_lookup=functools.partial(client.batch_user, user_token),
        agent_uid=me.pw_uid,
    )

    async def ack(cmd_id: str, status: Any, pid: int | None, error: str | None) -> None:
        await client.ack(creds.agent_id, creds.agent_token, cmd_id, status, pid=pid, error=error)

    try:
        batch = argus.rerun(argus.record_batch("echo bob", user="bob"))
        before = time.time()
        body = await client.poll(creds.agent_id, creds.agent_token)
        for item in decode_commands(body):
            await dispatcher.handle(item, ack)
        cmd = argus.acked(batch, "rerun")
        assert cmd is not None and cmd["status"] == "failed"
        assert f"but this per-user agent runs as {me.pw_name!r}" in cmd["error"]
        seen = dispatcher.foreign_refusals.as_dict()
        assert seen["count"] == 1 and seen["last_batch_id"] == batch
        assert (seen["last_user"], seen["last_user_kind"]) == ("bob", "OS user")
        assert seen["last_at"] >= before and "one system agent" in seen["warning"]
        # A rerun of the agent's own user asked for by its own Argus account is no such case.
        own = argus.rerun(argus.record_batch("echo mine", user=me.pw_name, cwd="/nonexistent"))
        for item in decode_commands(await client.poll(creds.agent_id, creds.agent_token)):
            await dispatcher.handle(item, ack)
        assert argus.acked(own, "rerun") is not None
        assert dispatcher.foreign_refusals.count == 1
    finally:
        await jobs.shutdown()
        ledger.close()
        await client.aclose()


# -- review: bounded answers, and only requested batches are ended --------------------------


def test_one_poll_takes_at_most_a_bounded_number_of_commands() -> None:
    body = b"\xef\xbb\xbf" + b'{"jobs":[' + b",".join([b"{}"] * 5000) + b"]}"  # with a BOM
    items = decode_commands(body)
    assert len(items) == MAX_COMMANDS_PER_POLL
    assert all(isinstance(item, MalformedCommand) for item in items)


async def test_an_answer_without_end_is_cut_off_at_the_size_limit() -> None:
    """A server (or proxy) that streams an endless 200 answer cannot fill the memory."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()

    listener = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = ArgusClient(f"http://127.0.0.1:{port}", timeout_s=30)
    try:
        with pytest.raises(ProtocolError, match="the answer is larger than 16 MiB"):
            await client.poll("agent-1", "ag_live_x")
    finally:
        await client.aclose()
        listener.close()
        await listener.wait_closed()


async def test_a_refused_rerun_never_ends_a_batch_that_is_no_longer_requested(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    """A stale or forged rerun naming a finished batch is refused, and the batch stays done."""
    settings = make_settings(server={"token": user_token})
    agent_id = await register(settings, user_token)
    finished = argus.record_batch("echo done")
    assert argus.batch(finished)["status"] == "done"
    async with RunningAgent(settings):
        cmd_id = server.inject_command(agent_id, "rerun", finished, {"command": None})
        cmd = await eventually(
            lambda: (
                next((c for c in argus.commands(finished) if c["id"] == cmd_id), None)
                if any(c["status"] == "failed" for c in argus.commands(finished))
                else None
            ),
            what="the refusal",
        )
        assert cmd["status"] == "failed"
        await asyncio.sleep(0.5)  # time for a report to go out, were one to be sent
    assert argus.batch(finished)["status"] == "done"
    assert server_events(server.url, finished, "batch_failed") == []
