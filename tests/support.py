"""Test helpers: an Argus user driving the reference server over HTTP, an agent running in
the test's event loop, and polling for conditions (no fixed sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from argus_agent.config import Settings
from argus_agent.credentials import load_credentials
from argus_agent.daemon import Agent
from argus_agent.dispatcher import Dispatcher
from argus_agent.registration import register_host

T = TypeVar("T")
HOST = socket.gethostname()
#: Running as root (CI), the jobs of these tests run as root: every job as ``run_as``, which
#: the Argus user of the tests (alice) is allowed to ask for.
ROOT_JOBS: dict[str, Any] = (
    {"run_as": "root", "allow_root": True, "users": {"alice": "*"}} if os.geteuid() == 0 else {}
)
OS_USER = pwd.getpwuid(os.geteuid()).pw_name
FIXTURES = Path(__file__).parent / "fixtures"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class ArgusUser:
    """A person using the Argus server: records batches (as the SDK does), presses Rerun and
    Stop, and reads the dev listings. Synchronous httpx on a real socket."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def event(self, event_type: str, batch_id: str, data: dict, **source: Any) -> dict:
        body = {
            "event_id": uuid.uuid4().hex,
            "schema_version": "1.1",
            "event_type": event_type,
            "timestamp": _now(),
            "batch_id": batch_id,
            "source": {"project": "demo", "host": HOST, **source},
            "data": data,
        }
        response = self.http.post("/api/events", json=body)
        response.raise_for_status()
        return response.json()

    def record_batch(
        self,
        command: str | None,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        host: str = HOST,
        done: bool = True,
        user: str | None = OS_USER,
    ) -> str:
        """Record a finished batch the way the SDK would (``source.user`` is the OS user the
        run was started as, by default this test's); returns its id."""
        batch_id = f"b-{uuid.uuid4().hex[:10]}"
        who = {"user": user} if user is not None else {}
        self.event("batch_start", batch_id, {"command": command}, host=host, command=command, **who)
        if cwd is not None or env is not None:
            self.event("env_snapshot", batch_id, {"cwd": cwd, "env": env}, host=host, **who)
        if done:
            self.event("batch_done", batch_id, {"n_done": 1}, host=host, **who)
        return batch_id

    def rerun(self, batch_id: str, overrides: dict | None = None) -> str:
        response = self.http.post(
            f"/api/batches/{batch_id}/rerun", json={"overrides": overrides or {}}
        )
        response.raise_for_status()
        return response.json()["batch_id"]

    def stop(self, batch_id: str) -> dict:
        response = self.http.post(f"/api/batches/{batch_id}/stop")
        response.raise_for_status()
        return response.json()

    def batch(self, batch_id: str) -> dict:
        response = self.http.get(f"/api/batches/{batch_id}")
        response.raise_for_status()
        return response.json()

    def commands(self, batch_id: str | None = None) -> list[dict]:
        params = {"batch_id": batch_id} if batch_id else {}
        response = self.http.get("/api/_dev/commands", params=params)
        response.raise_for_status()
        return response.json()

    def command_for(self, batch_id: str, kind: str) -> dict | None:
        found = [c for c in self.commands(batch_id) if c["kind"] == kind]
        return found[-1] if found else None

    def acked(self, batch_id: str, kind: str) -> dict | None:
        """The command of ``kind`` for the batch once the agent acked it, else None."""
        cmd = self.command_for(batch_id, kind)
        return cmd if cmd and cmd["status"] in ("started", "failed") else None

    def clear_faults(self) -> None:
        self.http.delete("/api/_dev/faults").raise_for_status()

    def fault(
        self,
        path_prefix: str,
        status: int,
        count: int = 1,
        retry_after: float | None = None,
        detail: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"path_prefix": path_prefix, "status": status, "count": count}
        if retry_after is not None:
            body["retry_after"] = retry_after
        if detail is not None:
            body["detail"] = detail
        self.http.post("/api/_dev/faults", json=body).raise_for_status()

    def close(self) -> None:
        self.http.close()


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


class RunningAgent:
    """An Agent running as a task in the test's loop; ``async with`` starts and stops it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.agent = Agent(settings)
        self.shutdown = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunningAgent:
        self.task = asyncio.create_task(self.agent.run(self.shutdown))
        ready = asyncio.create_task(self.agent.ready.wait())
        done, _ = await asyncio.wait({ready, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            ready.cancel()
            self.task.result()  # raises the start-up error
        return self

    async def stop(self) -> None:
        self.shutdown.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop()


async def register(settings: Settings, token: str, *, force: bool = False) -> str:
    """Register the agent of ``settings``; returns its agent id."""
    creds = await register_host(settings, token, force=force)
    assert load_credentials(settings.token_path).agent_id == creds.agent_id
    return creds.agent_id


def agent_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes `argus-agent` (a real process) use ``settings``."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("ARGUS_")}
    env = {
        **base,
        "ARGUS_URL": settings.server.url,
        "ARGUS_AGENT_AGENT_STATE_DIR": str(settings.agent.state_dir),
        "ARGUS_AGENT_AGENT_HOSTNAME": settings.agent.hostname,
        "ARGUS_AGENT_AGENT_POLL_INTERVAL_S": "0.2",
        "ARGUS_AGENT_JOBS_STOP_GRACE_S": str(settings.jobs.stop_grace_s),
    }
    if os.geteuid() == 0:
        env.update(
            ARGUS_AGENT_JOBS_RUN_AS="root",
            ARGUS_AGENT_JOBS_ALLOW_ROOT="true",
            ARGUS_AGENT_JOBS_USERS='{"alice": "*"}',
        )
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> Any:
    """Run `argus-agent ARGS` to completion; returns the CompletedProcess (text)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "argus_agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


class AgentProcess:
    """`argus-agent run` as a real process (so tests can SIGKILL it)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        import subprocess
        import sys

        self.env = env
        self.log = log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "argus_agent.cli", "run"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )

    async def status(self) -> dict:
        """Wait until the daemon answers on its control socket; its status document."""
        import json

        result = await eventually(  # 0 healthy, 1 degraded: either way it answers
            lambda: (r := cli("status", "--json", env=self.env)).returncode in (0, 1) and r,
            what="status answer",
        )
        return json.loads(result.stdout)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(15)
        self.log.close()
        return code


def server_events(url: str, batch_id: str, event_type: str | None = None) -> list[dict]:
    """The events the reference server stored for a batch (optionally of one type)."""
    import httpx

    events = httpx.get(f"{url}/api/_dev/events", params={"batch_id": batch_id}).json()
    return [e for e in events if event_type is None or e["event_type"] == event_type]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def server_commands(url: str, agent_id: str) -> list[dict]:
    """The commands the reference server holds for an agent (its dev listing)."""
    return httpx.get(f"{url}/api/_dev/commands", params={"agent_id": agent_id}).json()


def settings_for(url: str, tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for an agent of ``url`` with a short state-dir path (unix sockets have a
    length limit); the ``make_settings`` fixture's, for any server."""
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
        # Running as root (CI), the jobs of these tests run as root too.
        "jobs": {"stop_grace_s": 2.0, **ROOT_JOBS},
    }
    for section, extra in sections.items():
        values.setdefault(section, {}).update(extra)
    return Settings.model_validate(values)


@contextlib.asynccontextmanager
async def local_dispatcher(settings: Settings) -> AsyncIterator[Dispatcher]:
    """A Dispatcher over a real ledger and job manager in ``settings``' state dir, without a
    daemon around it (commands handed to it directly); jobs still running are stopped and
    everything closed at the end."""
    from argus_agent.audit import AuditLog
    from argus_agent.jobs.store import JobStore
    from argus_agent.jobs.supervisor import JobManager
    from argus_agent.ledger import CommandLedger

    state = settings.agent.state_dir
    state.mkdir(parents=True, exist_ok=True)
    ledger = CommandLedger(state / "state.db")
    jobs = JobManager(JobStore(state / "jobs"), settings.jobs)
    try:
        yield Dispatcher(ledger, jobs, settings, AuditLog(state / "audit.log"))
    finally:
        for record in jobs.running():
            await jobs.stop(record.batch_id, "test")
            await jobs.wait_ended(record.batch_id, timeout=15)
        await jobs.shutdown()
        ledger.close()


def on_websocket(running: RunningAgent) -> bool:
    """Whether the running agent's channel is connected over the websocket."""
    channel = running.agent.state.channel
    return channel.kind == "websocket" and channel.connected_since is not None


@contextlib.contextmanager
def temp_os_user(prefix: str) -> Iterator[pwd.struct_passwd]:
    """A fresh OS user (``useradd``, with a home), its processes killed and the user removed
    with its home at the end."""
    import subprocess

    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@contextlib.contextmanager
def shared_tmp_dir(prefix: str, mode: int) -> Iterator[Path]:
    """A directory under /tmp that other users may enter (pytest's tmp_path is private to
    root), with ``mode``, removed at the end."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
