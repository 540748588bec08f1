"""The daemon is never silently stuck, never doubled, and talks only to its own server.

A fake ``NOTIFY_SOCKET`` (a real datagram socket) records what systemd would be told.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from argus_agent import views
from argus_agent.channels.poll import PollChannel
from argus_agent.control import SOCKET_NAME
from argus_agent.daemon import Agent
from argus_agent.errors import LoopCrashedError, StateError
from argus_agent.instance import InstanceLock
from argus_agent.sender import EventSender
from tests.support import AgentProcess, RunningAgent, agent_env, cli, eventually, register


class FakeSystemd:
    """Receives sd_notify datagrams on a real unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def watchdog_pings(self) -> int:
        return sum("WATCHDOG=1" in m for m in self.drain())

    def last_status(self) -> str:
        statuses = [line for m in self.drain() for line in m.split("\n") if "STATUS=" in line]
        return statuses[-1] if statuses else ""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # ping every 0.5 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield fake
    fake.close()


async def test_the_watchdog_is_fed_only_while_every_loop_makes_progress(
    make_settings, user_token: str, systemd: FakeSystemd
) -> None:
    settings = make_settings(
        server={"timeout_s": 0.5},
        agent={"stall_timeout_s": 1.0},
        telemetry={"interval_s": 0.5},
    )
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        agent = running.agent
        await eventually(lambda: systemd.watchdog_pings() >= 2, what="watchdog pings")
        # The sampler gets stuck in a call (as on a hung driver or filesystem).
        unblock = asyncio.Event()

        async def stuck() -> int:
            await unblock.wait()
            return 0

        assert agent.telemetry is not None
        agent.telemetry.sample_once = stuck  # type: ignore[method-assign]
        await eventually(
            lambda: "sampler" in (agent.health.describe() or ""), timeout=10, what="unhealthy"
        )
        systemd.drain()
        systemd.messages.clear()
        await asyncio.sleep(1.5)  # three watchdog intervals
        assert systemd.watchdog_pings() == 0, "an unhealthy agent must not feed the watchdog"
        assert "unhealthy: sampler" in systemd.last_status()
        shown = views.format_status(agent.snapshot())
        assert "warning  unhealthy: sampler (stuck" in shown
        # A loop waiting in backoff is healthy; the stuck one recovering heals the agent.
        unblock.set()
        await eventually(lambda: systemd.watchdog_pings() >= 1, timeout=10, what="pings again")
        assert agent.health.healthy()


async def test_a_loop_that_raises_takes_the_daemon_down_with_its_own_exit_code(
    make_settings, user_token: str, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    settings = make_settings(server={"token": user_token})
    await register(settings, user_token)

    async def broken(self: EventSender, shutdown: asyncio.Event) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(EventSender, "run", broken)
    agent = Agent(settings)
    with pytest.raises(LoopCrashedError) as caught:
        await asyncio.wait_for(agent.run(asyncio.Event()), 30)
    assert str(caught.value) == "the sender loop crashed: RuntimeError: boom"
    assert caught.value.exit_code == 6
    assert "RuntimeError: boom" in caplog.text  # logged with its traceback
    # Everything was closed: a new agent can take the state dir.
    lock = InstanceLock(settings.agent.state_dir / "agent.lock")
    lock.acquire()
    lock.release()


async def test_a_second_agent_on_the_same_state_dir_exits_at_once_touching_nothing(
    make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    env = agent_env(settings)
    first = AgentProcess(env, tmp_path / "agent1.log")
    try:
        await first.status()
        socket_before = (settings.agent.state_dir / SOCKET_NAME).stat().st_ino
        second = await asyncio.to_thread(cli, "run", env=env, timeout=30)
        assert second.returncode == 4, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"argus-agent: another argus-agent (pid {first.proc.pid}) is running with state "
            f"dir {settings.agent.state_dir}; stop it first (systemctl stop argus-agent), or "
            "give this one another agent.state_dir"
        )
        assert (settings.agent.state_dir / SOCKET_NAME).stat().st_ino == socket_before
        assert (await first.status())["pid"] == first.proc.pid
    finally:
        assert first.stop() == 0


async def test_the_agent_talks_to_the_server_it_registered_with(
    make_settings, user_token: str, server, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)  # as with ARGUS_URL in one shell...
    env = {k: v for k, v in agent_env(settings).items() if k != "ARGUS_URL"}
    agent = AgentProcess(env, tmp_path / "agent.log")  # ...and no URL in another
    try:
        status = await agent.status()
        assert status["server_url"] == server.url
        await eventually(
            lambda: cli("status", "--json", env=env).stdout.count('"connected"') > 0,
            what="connected to the registered server",
        )
    finally:
        assert agent.stop() == 0
    other = {**env, "ARGUS_URL": "http://127.0.0.1:9"}
    refused = await asyncio.to_thread(cli, "run", env=other, timeout=30)
    assert refused.returncode == 3
    assert refused.stderr.strip() == (
        f"argus-agent: server.url is http://127.0.0.1:9, but this host is registered with "
        f"{server.url} ({settings.token_path}); the agent token is only sent to the server "
        "that issued it: remove server.url (and ARGUS_URL) to use the registered server, or "
        "run `argus-agent register --force` to move to the new one"
    )


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_start_up_failing_halfway_leaves_no_thread_or_file_behind(
    make_settings, user_token: str
) -> None:
    settings = make_settings(server={"token": user_token})
    await register(settings, user_token)
    state = settings.agent.state_dir
    (state / "jobs").write_text("not a directory")  # the job table cannot open
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = _open_fds()
    with pytest.raises(Exception) as caught:
        await Agent(settings).run(asyncio.Event())
    assert "jobs" in str(caught.value)
    await asyncio.sleep(0.2)  # let closed threads finish exiting
    # The event loop's own executor ("asyncio_N") belongs to the loop and closes with it.
    leftover_threads = [
        t.name
        for t in threading.enumerate()
        if t.ident not in threads_before and t.is_alive() and not t.name.startswith("asyncio_")
    ]
    assert leftover_threads == []
    opened = {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in _open_fds() - fds_before
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not {path for path in opened if str(state) in path}, opened


# -- review: crashes of inner loops, the lock on a full disk or through a symlink ----------


async def test_a_crash_of_the_heartbeat_task_takes_the_daemon_down_too(
    make_settings, user_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The REST heartbeat runs only when polling.
    settings = make_settings(server={"transport": "poll"}, agent={"poll_interval_s": 0.1})
    await register(settings, user_token)

    async def broken(self: PollChannel, shutdown: asyncio.Event) -> None:
        raise RuntimeError("heartbeat boom")

    monkeypatch.setattr(PollChannel, "_heartbeat_loop", broken)
    with pytest.raises(LoopCrashedError, match="the channel loop crashed: RuntimeError"):
        await asyncio.wait_for(Agent(settings).run(asyncio.Event()), 30)


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    (tmp_path / "agent.lock").symlink_to(precious)
    with pytest.raises(StateError, match="cannot open the agent's lock file"):
        InstanceLock(tmp_path / "agent.lock").acquire()
    assert precious.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_at_the_lock_is_a_state_error_naming_the_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        with contextlib.suppress(OSError), (disk / "filler").open("wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        lock = InstanceLock(disk / "agent.lock")
        with pytest.raises(StateError) as caught:
            lock.acquire()
        assert str(caught.value).startswith(f"{disk / 'agent.lock'}: cannot write")
        assert "free space" in str(caught.value)
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_the_registered_server_is_recognised_however_its_url_is_spelled() -> None:
    from argus_agent.registration import same_server as _same_url

    assert _same_url("http://127.0.0.1:8000", "HTTP://127.0.0.1:8000/")
    assert _same_url("https://Argus.Example", "https://argus.example:443")
    assert not _same_url("http://127.0.0.1:8000", "http://127.0.0.1:8001")
    assert not _same_url("https://argus.example/a", "https://argus.example/b")
