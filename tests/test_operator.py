"""Operator actions over the control socket: drain/undrain, local stop, the protocol's
limits and who may use it.

The agent runs in the test's loop against the reference server; the operator's commands run
as real `argus-agent` processes (in a thread, so the loop keeps serving), and the peer of the
credential test is a real process of a freshly created OS user.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from argus_agent import control
from argus_agent.audit import AuditLog
from argus_agent.devserver import DevServer
from argus_agent.drain import DRAIN_FILE, DrainState
from tests.support import (
    OS_USER,
    ArgusUser,
    RunningAgent,
    agent_env,
    alive,
    cli,
    eventually,
    register,
    server_events,
    settings_for,
    shared_tmp_dir,
    temp_os_user,
)
from tests.test_commands import HangingUserDb, release

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another OS user)")


def _audit(settings) -> list[dict]:
    return AuditLog(settings.agent.state_dir / "audit.log").read()


def _sock(settings) -> Path:
    return settings.agent.state_dir / control.SOCKET_NAME


def _exchange(path: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """One raw exchange on the control socket (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def _ask(path: Path, data: bytes) -> dict:
    return json.loads(await asyncio.to_thread(_exchange, path, data))


async def _cli(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=agent_env(settings))


# -- drain ----------------------------------------------------------------------------------


async def test_drain_refuses_reruns_keeps_jobs_and_stops_and_survives_a_restart(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings(server={"token": user_token})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        busy = argus.rerun(argus.record_batch("sleep 60"))
        job = await eventually(lambda: argus.acked(busy, "rerun"), what="the running job")
        assert job["status"] == "started"

        drained = await _cli(settings, "drain", "--reason", "swapping GPUs")
        assert drained.returncode == 0, drained.stderr
        assert f"by {OS_USER}" in drained.stdout and "1 running job(s) go on" in drained.stdout
        assert running.agent.drain.as_dict() == {
            "draining": True,
            "since": running.agent.drain.since,
            "by": OS_USER,
            "reason": "swapping GPUs",
        }
        refused = argus.rerun(argus.record_batch("echo never"))
        cmd = await eventually(lambda: argus.acked(refused, "rerun"), what="the refusal")
        assert cmd["status"] == "failed"
        assert cmd["error"] == "host draining: swapping GPUs"
        # The batch ends failed as for any refused rerun, and nothing was started.
        ended = await eventually(
            lambda: argus.batch(refused)["status"] == "failed" and argus.batch(refused),
            what="the refused batch to end failed",
        )
        assert ended["error"] == "host draining: swapping GPUs"
        assert running.agent.jobs.get(refused) is None
        assert alive(job["pid"]), "draining must leave running jobs alone"
        doc = await asyncio.to_thread(control.query_status, _sock(settings))
        assert doc["drain"]["draining"] is True and doc["drain"]["by"] == OS_USER

    # A restarted agent is still draining; a server's stop still works.
    async with RunningAgent(settings) as running:
        assert running.agent.drain.draining and running.agent.drain.reason == "swapping GPUs"
        again = argus.rerun(argus.record_batch("echo never"))
        cmd = await eventually(lambda: argus.acked(again, "rerun"), what="the refusal")
        assert (cmd["status"], cmd["error"]) == ("failed", "host draining: swapping GPUs")
        argus.stop(busy)
        stop = await eventually(lambda: argus.acked(busy, "stop"), what="the stop ack")
        assert stop["status"] == "started"
        await eventually(lambda: not alive(job["pid"]), what="the job to stop")

        undrained = await _cli(settings, "undrain")
        assert undrained.returncode == 0, undrained.stderr
        assert "no longer draining" in undrained.stdout
        assert not (settings.agent.state_dir / DRAIN_FILE).exists()
        works = argus.rerun(argus.record_batch("echo back"))
        cmd = await eventually(lambda: argus.acked(works, "rerun"), what="the rerun")
        assert cmd["status"] == "started"
        await running.agent.jobs.wait_ended(works, timeout=10)
        # Undrain again: nothing to do, and it says so.
        twice = await _cli(settings, "undrain")
        assert twice.returncode == 0 and "not draining" in twice.stdout

    records = _audit(settings)
    drain = next(r for r in records if r["action"] == "drain")
    assert drain["by"] == OS_USER and drain["reason"] == "swapping GPUs"
    assert drain["uid"] == os.geteuid()
    assert any(r["action"] == "undrain" and r["was_draining"] for r in records)
    refusals = [r for r in records if r["action"] == "refuse" and r["batch_id"] in (refused, again)]
    assert [r["reason"] for r in refusals] == ["host draining: swapping GPUs"] * 2


async def test_a_drain_without_a_reason_says_host_draining(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings):
        answer = await asyncio.to_thread(control.request_drain, _sock(settings))
        assert answer["ok"] and answer["was_draining"] is False
        batch = argus.rerun(argus.record_batch("echo never"))
        cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="the refusal")
        assert (cmd["status"], cmd["error"]) == ("failed", "host draining")
        # Draining again keeps "since" and says it was draining.
        since = answer["drain"]["since"]
        again = await asyncio.to_thread(control.request_drain, _sock(settings), "later")
        assert again["was_draining"] is True and again["drain"]["since"] == since


async def test_a_drain_that_comes_while_a_reruns_checks_run_wins(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    fifo = tmp_path / "nss"
    os.mkfifo(fifo)
    try:
        async with RunningAgent(settings) as running:
            assert running.agent.dispatcher is not None and running.agent.ledger is not None
            running.agent.dispatcher.userdb = HangingUserDb(fifo)
            batch = argus.rerun(argus.record_batch("echo never"))
            cmd_id = (await eventually(lambda: argus.command_for(batch, "rerun"), what="it"))["id"]
            # Claimed means the drain check before the checks has passed; they now hang.
            await eventually(
                lambda: (e := running.agent.ledger.get(cmd_id)) is not None and e.phase == "acting",
                what="the launch checks",
            )
            await asyncio.to_thread(control.request_drain, _sock(settings), "now")
            assert await eventually(lambda: release(fifo), what="the hung lookup to be let go")
            cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="the refusal")
            assert (cmd["status"], cmd["error"]) == ("failed", "host draining: now")
            assert running.agent.jobs.get(batch) is None
    finally:
        release(fifo)


async def test_a_drain_state_that_cannot_be_written_is_refused_and_the_host_stays_draining(
    make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    (settings.agent.state_dir / DRAIN_FILE / "in-the-way").mkdir(parents=True)
    path = _sock(settings)
    async with RunningAgent(settings) as running:
        assert running.agent.drain.draining  # unreadable: it fails closed
        assert "is unreadable or damaged" in (running.agent.drain.reason or "")
        with pytest.raises(control.ControlRefused, match=r"cannot record the drain in .* nothing"):
            await asyncio.to_thread(control.request_drain, path, "maintenance")
        stays = r"cannot remove .* the host stays draining"
        with pytest.raises(control.ControlRefused, match=stays):
            await asyncio.to_thread(control.request_undrain, path)
        assert running.agent.drain.draining and running.agent.drain.by is None


def test_a_damaged_drain_file_keeps_the_host_draining(tmp_path: Path) -> None:
    path = tmp_path / DRAIN_FILE
    state = DrainState(path)
    state.load()
    assert state.as_dict() == {"draining": False, "since": None, "by": None, "reason": None}
    assert state.refusal() is None
    hand_edited = [
        {"draining": True, "since": 1e308, "by": "ops"},  # not a time
        {"draining": True, "since": time.time() + 86400, "by": "ops"},  # a day ahead
        {"draining": True, "since": 1.0, "by": "x\u001b[31mred"},  # a terminal escape
        {"draining": True, "since": 1.0, "by": "ops", "reason": "line1\nline2"},
        {"draining": True, "since": 1.0, "by": "o" * 257},
        {"draining": True, "since": 1.0, "by": "ops", "reason": "r" * 501},
    ]
    for bad in (
        "{not json",
        '{"draining": true, "by": 3}',
        "[]",
        '{"draining": "yes"}',
        *(json.dumps(d) for d in hand_edited),
    ):
        path.write_text(bad)
        state = DrainState(path)
        state.load()
        assert state.draining, bad  # fails closed: a damaged file never undrains a host
        assert "damaged" in (state.reason or "") and state.refusal().startswith("host draining")
    assert state.undrain() is True and not path.exists()
    path.mkdir()  # not even a file: damaged too, and undrain still ends it
    state = DrainState(path)
    state.load()
    assert state.draining and "damaged" in (state.reason or "")
    assert state.undrain() is True and not path.exists()
    state.drain("ops", None)
    reread = DrainState(path)
    reread.load()
    assert reread.as_dict() == state.as_dict() and reread.refusal() == "host draining"
    assert path.stat().st_mode & 0o777 == 0o600


# -- local stop -----------------------------------------------------------------------------


async def test_a_local_stop_stops_the_job_as_a_server_stop_does(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings(server={"token": user_token}, jobs={"stop_grace_s": 30.0})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("trap '' TERM; sleep 60 & wait; sleep 60"))
        job = await eventually(lambda: argus.acked(batch, "rerun"), what="the job")
        assert job["status"] == "started"

        stopped = await _cli(settings, "stop", batch, "--grace", "0.5")
        assert stopped.returncode == 0, stopped.stderr
        assert (
            f"stopping batch {batch}" in stopped.stdout and "SIGKILL after 0.5 s" in stopped.stdout
        )
        # The shell ignores SIGTERM: only the escalation, after --grace (not 30 s), ends it.
        record = await running.agent.jobs.wait_ended(batch, timeout=10)
        assert record.exit_signal == 9 and record.killed_after_grace
        assert record.stop_requested_by == f"{OS_USER} (local)" and record.stop_grace_s == 0.5
        assert not alive(job["pid"])
        failed = await eventually(
            lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
        )
        assert failed[0]["data"]["error"].endswith(
            f"stopped on request of {OS_USER} (local) (SIGKILL after the grace period)"
        )
        assert argus.batch(batch)["status"] == "failed"

        # Stopping it again, or a batch this host does not know: refused, exit 1, a clear reason.
        again = await _cli(settings, "stop", batch)
        assert again.returncode == 1 and "already ended" in again.stderr
        unknown = await _cli(settings, "stop", "b-nope")
        assert unknown.returncode == 1
        assert unknown.stderr.strip() == "argus-agent: no job for batch b-nope on this host"
        bad = await _cli(settings, "stop", batch, "--grace", "-1")
        assert bad.returncode == 1 and "grace_s: Input should be greater than or equal to 0" in (
            bad.stderr
        )
    records = _audit(settings)
    stop = next(r for r in records if r["action"] == "stop")
    assert stop["batch_id"] == batch and stop["local_user"] == OS_USER
    assert stop["grace_s"] == 0.5 and stop["pid"] == job["pid"]
    refused = [r for r in records if r["action"] == "refuse" and r.get("kind") == "stop"]
    assert {r["batch_id"] for r in refused} == {batch, "b-nope"}
    assert all(r["local_user"] == OS_USER for r in refused)


def test_operator_commands_without_an_agent_exit_2(make_settings) -> None:
    settings = make_settings()
    for args in (("drain",), ("undrain",), ("stop", "b-1")):
        result = cli(*args, env=agent_env(settings))
        assert result.returncode == 2, (args, result.stderr)
        assert "no agent is running" in result.stderr


# -- the protocol ---------------------------------------------------------------------------


async def test_the_control_protocol_refuses_what_it_does_not_know(
    make_settings, user_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    path = _sock(settings)
    async with RunningAgent(settings) as running:
        # The plain status line keeps answering the bare document; the JSON form wraps it.
        bare = await _ask(path, b"status\n")
        assert bare["pid"] == os.getpid() and "ok" not in bare
        wrapped = await _ask(path, b'{"op": "status"}\n')
        assert wrapped["ok"] is True and wrapped["status"]["pid"] == os.getpid()
        cases = {
            b'{"op": "reboot"}\n': "unknown op 'reboot'; known ops: drain, status, stop, undrain",
            b'{"reason": "x"}\n': "unknown op missing; known ops: drain, status, stop, undrain",
            b"hello\n": "unknown request 'hello'; expected 'status' or one JSON object",
            b"{nope\n": "request is not valid JSON",
            b'["drain"]\n': "unknown request '[\"drain\"]'; expected 'status' or one JSON",
            b'{"op": "drain", "reason": "a\\nb"}\n': "drain: reason: must not contain control",
            b'{"op": "drain", "reason": "' + b"x" * 501 + b'"}\n': "drain: reason: String should",
            b'{"op": "drain", "by": "root"}\n': "drain: by: Extra inputs are not permitted",
            b'{"op": "stop"}\n': "stop: batch_id: Field required",
            b'{"op": "stop", "batch_id": ""}\n': "stop: batch_id: String should have at least",
            b'{"op": "stop", "batch_id": 7}\n': "stop: batch_id: Input should be a valid string",
            b'{"op": "stop", "batch_id": "b", "grace_s": "30"}\n': "stop: grace_s: Input should",
            b'{"op": "stop", "batch_id": "b", "grace_s": true}\n': "stop: grace_s: Input should",
            b'{"op": "stop", "batch_id": "b", "grace_s": NaN}\n': "stop: grace_s: Input should be",
            b'{"op": "stop", "batch_id": "b", "grace_s": 3601}\n': "stop: grace_s: Input should",
            b"x" * (control.MAX_REQUEST + 10) + b"\n": "request too long",
            b'{"op": ' + b"[" * 3000 + b"\n": "request is not valid JSON: nested too deeply",
        }
        for request, error in cases.items():
            answer = await _ask(path, request)
            assert answer["ok"] is False and answer["error"].startswith(error), (request, answer)
        assert not running.agent.drain.draining
        # A reason of MAX_REASON characters fits in a request, whatever its characters.
        emoji = "\N{SLIGHTLY SMILING FACE}" * 500
        drained = await asyncio.to_thread(control.request_drain, path, emoji)
        assert drained["ok"] and running.agent.drain.reason == emoji
        await asyncio.to_thread(control.request_undrain, path)
        # A client that never sends its line is dropped after the read timeout, unanswered.
        monkeypatch.setattr(control, "READ_TIMEOUT_S", 0.2)
        assert await asyncio.to_thread(_exchange, path, b"", 5.0) == b""
        # ...and the server still answers the next one.
        assert (await _ask(path, b"status\n"))["pid"] == os.getpid()


def test_a_client_refuses_an_agent_that_predates_ops(tmp_path: Path) -> None:
    """An agent of an older version answers a JSON request with {"error": ...} only."""
    path = tmp_path / "old.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def answer_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b'{"error": "unknown request"}\n')

        import threading

        thread = threading.Thread(target=answer_once)
        thread.start()
        with pytest.raises(control.ControlRefused, match="it is an older version: restart it"):
            control.request_undrain(path)
        thread.join(5)


# -- who may use it -------------------------------------------------------------------------


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory under /tmp that other users may traverse, removed at the end."""
    with shared_tmp_dir("argus-op-", 0o711) as path:
        yield path


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A fresh OS user, removed with its home at the end."""
    with temp_os_user("argop") as user:
        yield user


def _as_user(user: pwd.struct_passwd, path: Path, line: bytes) -> bytes:
    """Send ``line`` to the control socket from a process of ``user``: a forked child that
    drops to the user's uid and gid before it connects (so SO_PEERCRED names the user).
    Returns the answer, or ``child error: ...`` when the child could not connect."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.write(write_end, _exchange(path, line, 5.0))
        except BaseException as exc:
            os.write(write_end, f"child error: {type(exc).__name__}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


@needs_root
async def test_another_user_is_refused_and_audited(
    server: DevServer,
    user_token: str,
    reachable_dir: Path,
    other_user: pwd.struct_passwd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(server.url, reachable_dir)
    await register(settings, user_token)
    path = _sock(settings)
    ask_as: Callable[[bytes], bytes] = lambda line: _as_user(other_user, path, line)  # noqa: E731
    async with RunningAgent(settings) as running:
        # First line of defence: the socket (0600) in the state dir (0700).
        assert await asyncio.to_thread(ask_as, b'{"op": "drain"}\n') == (
            b"child error: PermissionError"
        )
        # An operator who opened them up: the peer's credentials still decide.
        settings.agent.state_dir.chmod(0o711)
        path.chmod(0o666)
        monkeypatch.setattr(control, "READ_TIMEOUT_S", 0.3)
        nested = b'{"op": ' + b"[" * 3000 + b"\n"
        for line in (b'{"op": "drain", "reason": "mine now"}\n', b"status\n", b"", nested):
            answer = json.loads(await asyncio.to_thread(ask_as, line))
            assert answer == {
                "ok": False,
                "error": f"permission denied: {other_user.pw_name} (uid {other_user.pw_uid}) "
                "may not control this agent; only root and root (the agent's user) may",
            }
        assert not running.agent.drain.draining
        assert not (settings.agent.state_dir / DRAIN_FILE).exists()
        # Root still may.
        assert (await asyncio.to_thread(control.request_drain, path, "ok"))["ok"]
    refused = [r for r in _audit(settings) if r["action"] == "control_refused"]
    assert [(r["peer_user"], r["peer_uid"], r["op"]) for r in refused] == [
        (other_user.pw_name, other_user.pw_uid, "drain"),
        (other_user.pw_name, other_user.pw_uid, "status"),
        (other_user.pw_name, other_user.pw_uid, None),  # it asked nothing: refused all the same
        (other_user.pw_name, other_user.pw_uid, '{"op":'),  # unreadable: its first word
    ]
