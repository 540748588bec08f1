"""`argus-agent demo`: the whole loop on loopback in under 30 seconds.

Starts the reference server and an agent, records a sample batch the way Argus' SDK does,
presses Rerun, shows the job running, its log and its telemetry in Argus, presses Stop, shows
it stopped (and the batch leaving ``stopping``), and prints a summary. It says which channel
carried the commands (the websocket, or polling and why) and how long the rerun took to reach
the job (from pressing Rerun to the job's process running). Nothing leaves 127.0.0.1;
everything lives in a temp directory.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from argus_agent.config import Settings
from argus_agent.daemon import Agent
from argus_agent.errors import AgentError
from argus_agent.registration import register_host

SAMPLE_SCRIPT = """\
import os, sys, time
print("training", os.environ.get("ARGUS_BATCH_ID"), "args:", " ".join(sys.argv[1:]), flush=True)
for epoch in range(1, 200):
    print(f"epoch {epoch}: loss={1.0 / epoch:.4f}", flush=True)
    time.sleep(0.4)
"""


class _Step:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.timeline: list[tuple[float, str]] = []

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.timeline.append((elapsed, text))
        print(f"[{elapsed:5.1f}s] {text}", flush=True)


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; blocks up to about 30 s. Returns 0 when every step worked."""
    try:
        from argus_agent.devserver import DevServer
    except ImportError as exc:
        raise AgentError(
            "the demo needs the 'server' extra: "
            f"pip install '/path/to/argus-agent-checkout[server]' ({exc})"
        ) from None
    workdir = Path(tempfile.mkdtemp(prefix="argus-demo-"))
    server = DevServer(db_path=workdir / "argus.sqlite", poll_interval_s=0.5)
    server.start()
    try:
        return asyncio.run(asyncio.wait_for(_demo(server, workdir), timeout=60))
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


async def _wait(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AgentError(f"demo: timed out waiting for {what}")


async def _demo(server: Any, workdir: Path) -> int:
    step = _Step()
    hostname = socket.gethostname()
    token = server.create_user("alice")
    step.say(f"reference Argus server listening on {server.url} (user alice)")
    jobs: dict[str, Any] = {"stop_grace_s": 3.0}
    if os.geteuid() == 0:
        # A system agent runs a batch as its recorded OS user only for Argus accounts mapped
        # to that user, and refuses root unless allowed; run as root, the demo maps alice to
        # root and allows root for its own sample job.
        jobs.update(users={"alice": "root"}, allow_root=True)
        step.say("running as root: the demo sets jobs.users = {alice = 'root'} and jobs.allow_root")
    settings = Settings.model_validate(
        {
            # The reporter token also lets the agent send the job's telemetry.
            "server": {"url": server.url, "token": token},
            "telemetry": {"interval_s": 1.0, "log_poll_s": 0.2},
            "agent": {
                "state_dir": str(workdir / "state"),
                "hostname": hostname,
                "heartbeat_interval_s": 2.0,
            },
            "jobs": jobs,
        }
    )
    creds = await register_host(settings, token, force=False)
    step.say(f"registered host {hostname!r} as {creds.agent_id}; token in {settings.token_path}")
    agent = Agent(settings)
    shutdown = asyncio.Event()
    agent_task = asyncio.create_task(agent.run(shutdown))
    await asyncio.wait_for(agent.ready.wait(), 10)
    assert agent.state is not None
    channel = agent.state.channel
    await _wait(lambda: channel.state == "connected", "the agent to reach the server", 10)
    step.say(f"agent running, {_channel_words(channel)}")

    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
    try:
        project_dir = workdir / "project"
        project_dir.mkdir()
        (project_dir / "train.py").write_text(SAMPLE_SCRIPT)
        command = f"{shlex.quote(sys.executable)} train.py --model tiny"
        source = _record_batch(http, hostname, command, str(project_dir))
        step.say(f"recorded batch {source}: `{command}` in {project_dir}")

        pressed_at = time.time()
        answer = http.post(
            f"/api/batches/{source}/rerun", json={"overrides": {"lr": 0.001, "optim.name": "adam"}}
        )
        answer.raise_for_status()
        rerun = answer.json()["batch_id"]
        step.say(f"pressed Rerun with overrides lr=0.001 optim.name=adam -> new batch {rerun}")

        cmd = await _wait(lambda: _acked(http, rerun, "rerun"), "the rerun ack")
        if cmd["status"] != "started":
            raise AgentError(f"demo: the agent refused the rerun: {cmd['error']}")
        batch = http.get(f"/api/batches/{rerun}").json()
        step.say(
            f"agent acked {cmd['status']} with pid {cmd['pid']}; "
            f"Argus shows the batch {batch['status']!r}"
        )
        record = agent.jobs.get(rerun) if agent.jobs else None
        if record is None:
            raise AgentError("demo: the agent has no job for the rerun")
        reached_s = (record.started_at or record.launched_at) - pressed_at
        used = "the websocket" if channel.kind == "websocket" else "polling"
        step.say(
            f"the rerun reached the job {reached_s * 1000:.0f} ms after pressing Rerun ({used})"
        )
        log_path = Path(record.log_path)
        await _wait(lambda: log_path.read_text().count("epoch") >= 4, "a few epochs", 10)
        step.say(f"job log {log_path}:")
        for line in log_path.read_text().splitlines()[:5]:
            print(f"          | {line}")
        snap = await _wait(
            lambda: [
                e
                for e in _events(http, rerun, "resource_snapshot")
                if e["data"]["proc_cpu_pct"] is not None
            ],
            "a snapshot with CPU figures",
            10,
        )
        data = snap[-1]["data"]
        step.say(
            f"agent sends the job's telemetry: resource_snapshot with {data['num_procs']} "
            f"process(es), {data['proc_ram_mb']} MB RSS, CPU {data['proc_cpu_pct']}%; "
            f"{len(_events(http, rerun, 'log_line'))} log_line events so far"
        )

        http.post(f"/api/batches/{rerun}/stop").raise_for_status()
        step.say("pressed Stop")
        stop = await _wait(lambda: _acked(http, rerun, "stop"), "the stop ack")
        ended = await agent.jobs.wait_ended(rerun, timeout=10)
        step.say(
            f"agent acked the stop ({stop['status']}, pid {stop['pid']}); "
            f"job ended: {ended.describe_exit()}"
        )
        failed = await _wait(lambda: _events(http, rerun, "batch_failed"), "batch_failed", 10)
        batch = http.get(f"/api/batches/{rerun}").json()
        step.say(
            f"agent sent batch_failed ({failed[0]['data']['error']!r}); Argus shows the batch "
            f"{batch['status']!r}"
        )
        counts = agent.ledger.counts() if agent.ledger else {}
        await _wait(
            lambda: agent.outbox is not None and agent.outbox.stats().queued == 0,
            "the outbox to drain",
            10,
        )
        sent = {
            kind: len(_events(http, rerun, kind))
            for kind in ("resource_snapshot", "log_line", "batch_failed")
        }
    finally:
        http.close()
        shutdown.set()
        await asyncio.wait_for(agent_task, 15)
    print()
    print("summary:")
    print(f"  rerun of {source} ran as {rerun}: pid {ended.pid}")
    print(
        f"  channel: {_channel_words(channel)}; the rerun reached the job "
        f"{reached_s * 1000:.0f} ms after pressing Rerun"
    )
    print(f"  command line: {ended.command_line}")
    print(f"  job: {ended.describe_exit()}")
    print(
        f"  commands handled: {counts.get('acked', 0)} acked, "
        f"{counts.get('to_ack', 0)} waiting to be acked"
    )
    print(
        "  events in Argus for the rerun batch: "
        + ", ".join(f"{n} {kind}" for kind, n in sent.items())
        + f"; total {step.timeline[-1][0]:.1f}s"
    )
    return 0


def _channel_words(channel: Any) -> str:
    """E.g. ``commands pushed over the websocket (argus-agent.v1)``."""
    if channel.kind == "websocket":
        return "commands pushed over the websocket (argus-agent.v1)"
    why = f" ({channel.why})" if channel.why else ""
    return f"polling the server for commands every {channel.poll_interval_s:g} s{why}"


def _record_batch(http: httpx.Client, host: str, command: str, cwd: str) -> str:
    batch_id = f"demo-{uuid.uuid4().hex[:8]}"
    os_user = pwd.getpwuid(os.geteuid()).pw_name
    for event_type, data in (
        ("batch_start", {"command": command, "experiment_type": "demo"}),
        ("env_snapshot", {"cwd": cwd, "env": {"DEMO_GREETING": "hello from argus-agent"}}),
        ("batch_done", {"n_done": 1, "n_failed": 0}),
    ):
        http.post(
            "/api/events",
            json={
                "event_id": uuid.uuid4().hex,
                "schema_version": "1.1",
                "event_type": event_type,
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "batch_id": batch_id,
                # As the SDK does: the OS user the run was started as ($USER).
                "source": {"project": "demo", "host": host, "user": os_user, "command": command},
                "data": data,
            },
        ).raise_for_status()
    return batch_id


def _events(http: httpx.Client, batch_id: str, event_type: str) -> list[dict]:
    events = http.get("/api/_dev/events", params={"batch_id": batch_id}).json()
    return [e for e in events if e["event_type"] == event_type]


def _acked(http: httpx.Client, batch_id: str, kind: str) -> dict | None:
    commands = http.get("/api/_dev/commands", params={"batch_id": batch_id}).json()
    done = [c for c in commands if c["kind"] == kind and c["status"] in ("started", "failed")]
    return done[-1] if done else None
