"""Several compute-node host names served by one login-node agent (``jobs.slurm_hosts``):
a real single-node Slurm (``tests/slurmenv.py``), the reference server on a real socket.

Each served name gets a registration of its own (made by the daemon with the reporter
token, or by `argus-agent register`), is polled by the one daemon, and its reruns and stops
go through Slurm; acks go through the registration that delivered the command, also when
they were pending across a failure; a name whose token the server rejects does not hold up
the others; ``["*"]`` serves every node sinfo reports.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import pytest

from argus_agent.config import Settings
from argus_agent.servedhosts import SERVED_FILE, ServedRegistrations
from argus_agent.statuscheck import DEGRADED, health_verdict
from argus_agent.views import format_status
from tests.slurmenv import SlurmCluster
from tests.support import (
    ArgusUser,
    RunningAgent,
    agent_env,
    cli,
    eventually,
    local_dispatcher,
    register,
)
from tests.test_status import _documented, _fields

SERVED = ["gpu-a", "gpu-b"]
#: What Argus v0.3.0 offers (the websocket is tested on its own, below).
POLL = {"transport": "poll"}


def _register(settings: Settings, token: str) -> tuple[int, str, str]:
    """`argus-agent register` as a process, with ``settings``' Slurm keys."""
    jobs = settings.jobs
    env = agent_env(
        settings,
        ARGUS_TOKEN=token,
        ARGUS_AGENT_JOBS_LAUNCHER="slurm",
        ARGUS_AGENT_JOBS_SLURM_HOSTS=json.dumps(jobs.slurm_hosts),
        ARGUS_AGENT_JOBS_SLURM_PARTITIONS=json.dumps(jobs.slurm_partitions),
    )
    done = cli("register", env=env)
    return done.returncode, done.stdout, done.stderr


def _agents(argus: ArgusUser) -> dict[str, dict]:
    """The server's agents by host name (the dev listing)."""
    rows = httpx.get(f"{argus.url}/api/_dev/agents", timeout=10).json()
    return {row["hostname"]: row for row in rows}


async def test_one_agent_serves_two_host_names_through_their_own_registrations(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(server=POLL | {"token": user_token}, jobs={"slurm_hosts": SERVED})
    own_id = await register(settings, user_token)
    sources = {
        host: argus.record_batch("sleep 60", cwd=str(tmp_path), host=host) for host in SERVED
    }
    async with RunningAgent(settings) as running:
        # The daemon registered both names itself (reporter token) and polls them.
        await eventually(lambda: set(SERVED) <= set(_agents(argus)), what="registrations")
        served_file = settings.agent.state_dir / SERVED_FILE
        assert stat.S_IMODE(served_file.stat().st_mode) == 0o600
        registrations = ServedRegistrations(served_file).load(settings.server.url)
        assert sorted(registrations) == SERVED
        ids = {host: registrations[host].agent_id for host in SERVED}
        assert own_id not in ids.values() and len(set(ids.values())) == 2
        batches = {host: argus.rerun(source) for host, source in sources.items()}
        for host, batch in batches.items():
            ack = await eventually(lambda b=batch: argus.acked(b, "rerun"), what=f"{host} ack")
            assert ack["status"] == "started", ack
            # Delivered to, and acked through, the served name's own registration.
            assert ack["agent_id"] == ids[host]
            record = running.agent.jobs.get(batch)
            assert record is not None and ack["pid"] == record.pid
        status = running.agent.snapshot()["served_hosts"]
        assert status["count"] == 2 and status["states"] == {"connected": 2}
        assert status["problems"] == [] and status["names_from"] == "config"
        # Stop through one name: that job ends, the other keeps running.
        argus.stop(batches["gpu-a"])
        stop = await eventually(lambda: argus.acked(batches["gpu-a"], "stop"), what="stop")
        assert stop["status"] == "started" and stop["agent_id"] == ids["gpu-a"]
        ended = await running.agent.jobs.wait_ended(batches["gpu-a"], timeout=30)
        assert ended.state != "running"
        assert running.agent.jobs.get(batches["gpu-b"]).running
        argus.stop(batches["gpu-b"])
        await running.agent.jobs.wait_ended(batches["gpu-b"], timeout=30)
    # Both names were seen alive by the server (a poll counts as a heartbeat).
    agents = _agents(argus)
    assert all(agents[host]["last_seen_at"] for host in SERVED)


async def test_a_pending_ack_goes_through_the_registration_that_delivered_it(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(server=POLL | {"token": user_token}, jobs={"slurm_hosts": ["gpu-a"]})
    await register(settings, user_token)
    source = argus.record_batch("true", cwd=str(tmp_path), host="gpu-a")
    async with RunningAgent(settings) as running:
        await eventually(lambda: "gpu-a" in _agents(argus), what="the registration")
        agent_id = _agents(argus)["gpu-a"]["agent_id"]
        # The first two acks fail: the ack stays pending and is flushed on a later poll.
        argus.fault(f"/api/agents/{agent_id}/jobs/", 500, count=2)
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the ack", timeout=30)
        assert ack["status"] == "started" and ack["agent_id"] == agent_id
        assert httpx.get(f"{argus.url}/api/_dev/faults", timeout=10).json()["injected"] == 2
        await running.agent.jobs.wait_ended(batch, timeout=30)


async def test_a_rejected_token_of_one_name_does_not_hold_up_the_others(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(server=POLL | {"token": user_token}, jobs={"slurm_hosts": SERVED})
    await register(settings, user_token)
    rc, out, err = _register(settings, user_token)  # registers the served names too
    assert rc == 0 and "served host names: 2; registered now: 2" in out, (out, err)
    path = settings.agent.state_dir / SERVED_FILE
    data = json.loads(path.read_text())
    data["hosts"]["gpu-a"]["agent_token"] = "ag_live_" + "0" * 40  # a token the server never gave
    path.write_text(json.dumps(data))
    os.chmod(path, 0o600)
    source = argus.record_batch("true", cwd=str(tmp_path), host="gpu-b")
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="gpu-b's ack")
        assert ack["status"] == "started"
        status = await eventually(
            lambda: (s := running.agent.snapshot())["served_hosts"]["problem_count"] and s,
            what="the rejected name in status",
        )
        problem = status["served_hosts"]["problems"][0]
        assert problem["hostname"] == "gpu-a" and problem["state"] == "auth_rejected"
        assert any("served host name" in w for w in status["warnings"])
        assert "ag_live_" not in json.dumps(status)  # never a token in status
        verdict = health_verdict(status)
        assert verdict.code == DEGRADED and any("gpu-a" in r for r in verdict.reasons)
        emitted = {f for f in _fields(status) if f.startswith("served_hosts")}
        assert "served_hosts.problems[].error" in emitted
        assert not emitted - _documented(), "every served_hosts field is in docs/status.md"
        text = format_status(status, verdict)
        assert "served   2 host name(s) from config: 1 auth_rejected, 1 connected" in text
        assert "gpu-a: auth_rejected" in text and "ag_live_" not in text
        assert all(len(line) <= 80 for line in text.splitlines())
        await running.agent.jobs.wait_ended(batch, timeout=30)


async def test_every_node_sinfo_reports_is_served_with_the_star(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(
        server={"token": user_token},
        agent={"hostname": "login-node"},
        jobs={"slurm_hosts": ["*"], "slurm_partitions": ["second"]},
    )
    await register(settings, user_token)
    rc, out, err = _register(settings, user_token)
    assert rc == 0 and "served host names: 1; registered now: 1" in out, (out, err)
    source = argus.record_batch("true", cwd=str(tmp_path), host=slurm.node)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the ack")
        assert ack["status"] == "started", ack
        served = running.agent.snapshot()["served_hosts"]
        assert served["names_from"] == "sinfo" and served["count"] == 1
        await running.agent.jobs.wait_ended(batch, timeout=30)


# -- the pieces, without a cluster -----------------------------------------------------------


def test_served_registrations_are_private_and_bound_to_their_server(tmp_path: Path) -> None:
    from argus_agent.errors import InsecureTokenFileError, StateError
    from argus_agent.servedhosts import ServedHost

    store = ServedRegistrations(tmp_path / "state" / SERVED_FILE)
    assert store.load("https://argus.example") == {}  # no file: nothing registered
    host = ServedHost("gpu-a", "agent-0123456789ab", "ag_live_secret")
    store.save("https://argus.example", {"gpu-a": host})
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.load("https://argus.example/") == {"gpu-a": host}
    assert "ag_live_secret" not in repr(host)
    # Tokens are only ever used with the server that issued them.
    assert store.load("https://other.example") == {}
    # A file others may read is refused with the chmod that fixes it.
    os.chmod(store.path, 0o644)
    with pytest.raises(InsecureTokenFileError, match="chmod 600"):
        store.load("https://argus.example")
    os.chmod(store.path, 0o600)
    # Damaged or hostile content: one line naming the file and the fix; bad names dropped.
    for body in ("{", "[]", '{"server_url": "https://argus.example", "hosts": 3}'):
        store.path.write_text(body)
        with pytest.raises(StateError, match="register --force") as caught:
            store.load("https://argus.example")
        assert "\n" not in str(caught.value)
    store.path.write_text(
        json.dumps(
            {
                "server_url": "https://argus.example",
                "hosts": {"gpu-a; rm -rf /": {"agent_id": "a", "agent_token": "t"}},
            }
        )
    )
    assert store.load("https://argus.example") == {}


def test_a_ledger_from_before_served_names_gains_the_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    import sqlite3

    from argus_agent.ledger import CommandLedger

    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE commands (cmd_id TEXT PRIMARY KEY, kind TEXT NOT NULL, batch_id TEXT,"
        " phase TEXT NOT NULL, ack_status TEXT, pid INTEGER, error TEXT,"
        " received_at REAL NOT NULL, acked_at REAL, ack_note TEXT)"
    )
    old.execute(
        "INSERT INTO commands VALUES ('c-old', 'rerun', 'b', 'to_ack', 'started', 7, NULL, 1.0,"
        " NULL, NULL)"
    )
    old.commit()
    old.close()
    ledger = CommandLedger(path)
    try:
        assert [(e.cmd_id, e.via) for e in ledger.pending_acks()] == [("c-old", None)]
        assert ledger.begin("c-new", "stop", "b2", "gpu-a")
        ledger.record_result("c-new", "started", pid=8)
        assert {e.cmd_id: e.via for e in ledger.pending_acks()} == {
            "c-old": None,
            "c-new": "gpu-a",
        }
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("hosts", "partitions", "nodes", "expected"),
    [
        (["gpu-a", "login"], [], [], ["gpu-a"]),  # the agent's own name is not served twice
        (["*"], ["gpu"], ["n1", "LOGIN", "bad name", "n2"], ["n1", "n2"]),
    ],
)
async def test_the_served_names(
    hosts: list[str], partitions: list[str], nodes: list[str], expected: list[str]
) -> None:
    from argus_agent.jobsettings import JobSettings
    from argus_agent.servedhosts import served_names

    asked: list[list[str]] = []

    async def list_nodes(parts: list[str]) -> list[str]:
        asked.append(list(parts))
        return nodes

    jobs = JobSettings(launcher="slurm", slurm_hosts=hosts, slurm_partitions=partitions)
    assert await served_names(jobs, ["login"], list_nodes) == expected
    assert asked == ([partitions] if hosts == ["*"] else [])


async def test_one_websocket_announces_every_served_name(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    """On the websocket protocol the one connection serves every name: none is polled,
    their commands are pushed on it and acked on it. A name registered by another Argus
    user is not accepted by the server and stays on REST polling."""
    bob = httpx.post(f"{argus.url}/api/_dev/users", json={"username": "bob"}, timeout=10).json()
    settings = slurm_settings(
        server={"token": user_token}, jobs={"slurm_hosts": [*SERVED, "gpu-z"]}
    )
    await register(settings, user_token)
    rc, out, err = _register(settings, user_token)
    assert rc == 0, (out, err)
    # gpu-z's registration belongs to bob (a file edited by hand, or a server mix-up).
    path = settings.agent.state_dir / SERVED_FILE
    data = json.loads(path.read_text())
    answer = httpx.post(
        f"{argus.url}/api/agents/register",
        json={"hostname": "gpu-z"},
        headers={"Authorization": f"Bearer {bob['token']}"},
        timeout=10,
    ).json()
    data["hosts"]["gpu-z"] = {"agent_id": answer["agent_id"], "agent_token": answer["agent_token"]}
    path.write_text(json.dumps(data))
    os.chmod(path, 0o600)
    source = argus.record_batch("sleep 60", cwd=str(tmp_path), host="gpu-b")
    async with RunningAgent(settings) as running:
        served = await eventually(
            lambda: (
                (s := running.agent.snapshot()["served_hosts"])["states"].get("websocket") == 2
                and s.get("states", {}).get("connected") == 1
                and s
            ),
            what="two names on the websocket, gpu-z polled",
        )
        assert served["problem_count"] == 0
        agents = _agents(argus)
        assert agents["gpu-a"]["ws_connected"] and agents["gpu-b"]["ws_connected"]
        assert not agents["gpu-z"]["ws_connected"]
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the ack")
        assert ack["status"] == "started" and ack["agent_id"] == agents["gpu-b"]["agent_id"]
        # Pushed on the websocket: delivered once, never polled (a poll would count again).
        assert argus.command_for(batch, "rerun")["deliveries"] == 1
        assert running.agent.channel.session.commands_received >= 1
        argus.stop(batch)
        await running.agent.jobs.wait_ended(batch, timeout=30)


async def test_names_registered_while_the_websocket_is_open_are_announced_at_once(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str
) -> None:
    """The daemon registers the served names itself after its websocket opened (a first
    start, or a node added to the cluster): it reconnects at once to announce them, instead
    of polling them until some later reconnect."""
    settings = slurm_settings(server={"token": user_token}, jobs={"slurm_hosts": SERVED})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        await eventually(
            lambda: running.agent.snapshot()["served_hosts"]["states"] == {"websocket": 2},
            what="both names on the websocket",
        )
        assert running.agent.channel.sessions == 2  # the first, and the one announcing them
        assert running.agent.state.channel.kind == "websocket"
        assert running.agent.snapshot()["served_hosts"]["problem_count"] == 0


async def test_an_unusable_register_answer_fails_that_name_only() -> None:
    """A server (or a proxy) answering 201 with something that is not a registration: that
    name is reported failed with why; the daemon does not go down, the others register."""
    import asyncio

    from argus_agent.argus_api import ArgusClient
    from argus_agent.servedhosts import register_served

    answers = {
        "gpu-a": b'{"agent_id": "agent-0123456789ab", "agent_token": "ag_live_0123456789"}',
        "gpu-b": b'{"agent_id": "agent 1/../x", "agent_token": "ag_live_0123456789"}',
        "gpu-c": b'{"agent_token": "ag_live_0123456789"}',
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        body = json.loads(await reader.readexactly(length))
        answer = answers[body["hostname"]]
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(answer)}\r\n\r\n".encode()
            + answer
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ArgusClient(f"http://127.0.0.1:{port}", timeout_s=5)
    try:
        made, failed = await register_served(client, "em_live_x", sorted(answers), {})
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert sorted(made) == ["gpu-a"]
    assert sorted(failed) == ["gpu-b", "gpu-c"]
    assert "unusable answer (agent_id" in failed["gpu-b"]
    assert "unusable answer (agent_id" in failed["gpu-c"]


async def test_sinfo_listing_no_node_keeps_what_was_served() -> None:
    from argus_agent.jobs.slurm_cli import SlurmUnavailable
    from argus_agent.jobsettings import JobSettings
    from argus_agent.servedhosts import served_names

    async def nothing(parts: list[str]) -> list[str]:
        return []

    jobs = JobSettings(launcher="slurm", slurm_hosts=["*"], slurm_partitions=["gpu-typo"])
    with pytest.raises(SlurmUnavailable, match="sinfo listed no nodes in gpu-typo"):
        await served_names(jobs, ["login"], nothing)


async def test_a_name_dropped_while_it_owes_an_ack_is_polled_until_it_sent_it(
    make_settings, tmp_path: Path
) -> None:
    """Its registration is the only way to send that ack: the name stays polled (but no
    longer served: its reruns fail the host check) until the ack is out."""
    from argus_agent.argus_api import ArgusClient
    from argus_agent.channels.served import ServedHostsPoller
    from argus_agent.servedhosts import ServedHost

    settings = make_settings()
    async with local_dispatcher(settings) as dispatcher:
        dispatcher.ledger.begin("c-owed", "stop", "b-1", "gpu-a")
        dispatcher.ledger.record_result("c-owed", "failed", error="no such job")
        poller = ServedHostsPoller(
            ArgusClient(settings.server.url),
            dispatcher,
            settings,
            ServedRegistrations(tmp_path / SERVED_FILE),
            own_names=["login"],
            user_token=None,
            list_nodes=None,
            server_poll_interval_s=10.0,
        )
        known = {n: ServedHost(n, f"agent-{n}000000", f"ag_live_{n}xxxxxx") for n in SERVED}
        poller._adopt(SERVED, known, {})
        poller._adopt(["gpu-b"], known, {})  # gpu-a left the list, its ack still owed
        assert sorted(poller.hosts) == SERVED
        assert dispatcher.served_hosts == frozenset({"gpu-b"})
        poller._pending.discard("gpu-a")  # the ack went out
        poller._adopt(["gpu-b"], known, {})
        assert sorted(poller.hosts) == ["gpu-b"]


def test_saving_new_registrations_never_undoes_what_another_writer_saved(tmp_path: Path) -> None:
    """The daemon registers a new name while `register --force` rotates the others: each
    adds its own to what the file holds then, under a lock, never a stale copy."""
    from argus_agent.servedhosts import ServedHost

    url = "https://argus.example"
    store = ServedRegistrations(tmp_path / SERVED_FILE)
    store.save(url, {"gpu-a": ServedHost("gpu-a", "agent-a", "ag_live_old_a")})
    stale = store.load(url)  # the daemon's copy, before the other writer
    store.save(url, {"gpu-a": ServedHost("gpu-a", "agent-a", "ag_live_new_a")})  # --force
    saved = store.merge(url, {"gpu-b": ServedHost("gpu-b", "agent-b", "ag_live_b")})
    assert stale["gpu-a"].agent_token == "ag_live_old_a"
    assert {n: h.agent_token for n, h in saved.items()} == {
        "gpu-a": "ag_live_new_a",
        "gpu-b": "ag_live_b",
    }
    assert store.load(url) == saved
    assert sorted(store.merge(url, {}, keep=["gpu-b"])) == ["gpu-b"]
