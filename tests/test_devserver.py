"""Tests of the reference Argus server (argus_agent.devserver) over real sockets."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from argus_agent.devserver import DevServer
from argus_agent.devserver.ratelimit import TokenBucket, retry_after_header

# One TLS context for every client: httpx builds a fresh one (~50 ms) per client otherwise.
TLS = ssl.create_default_context()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def event(
    event_type: str,
    batch_id: str,
    *,
    data: dict[str, Any] | None = None,
    host: str = "gpu-1",
    job_id: str | None = None,
    event_id: str | None = None,
    **envelope: Any,
) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event_id": event_id or uuid.uuid4().hex,
        "schema_version": "1.1",
        "event_type": event_type,
        "timestamp": "2026-01-01T00:00:00Z",
        "batch_id": batch_id,
        "source": {"project": "demo", "host": host, "user": "alice"},
        "data": data or {},
    }
    if job_id is not None:
        ev["job_id"] = job_id
    ev.update(envelope)
    return ev


class Env:
    """A running dev server, a client, and a user token."""

    def __init__(self, srv: DevServer) -> None:
        self.srv = srv
        self.http = httpx.Client(base_url=srv.url, timeout=5.0, verify=TLS)
        self.token = srv.create_user("alice")

    def send(self, *events: dict[str, Any], token: str | None = None) -> httpx.Response:
        r = self.http.post(
            "/api/events/batch", json={"events": list(events)}, headers=bearer(token or self.token)
        )
        assert r.status_code == 200, r.text
        return r

    def register(self, hostname: str = "gpu-1", token: str | None = None) -> tuple[str, str]:
        r = self.http.post(
            "/api/agents/register", json={"hostname": hostname}, headers=bearer(token or self.token)
        )
        assert r.status_code == 201, r.text
        return r.json()["agent_id"], r.json()["agent_token"]

    def finished_batch(self, batch_id: str = "b-1", host: str = "gpu-1") -> str:
        self.send(
            event("batch_start", batch_id, host=host, data={"command": "python train.py"}),
            event("env_snapshot", batch_id, host=host, data={"cwd": "/w", "env": {"A": "1"}}),
            event("batch_done", batch_id, host=host),
        )
        return batch_id

    def poll(self, agent_id: str, token: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/api/agents/{agent_id}/jobs", headers=bearer(token))
        assert r.status_code == 200, r.text
        return r.json()["jobs"]

    def ack(self, agent_id: str, token: str, cmd_id: str, **body: Any) -> httpx.Response:
        return self.http.post(
            f"/api/agents/{agent_id}/jobs/{cmd_id}/ack", json=body, headers=bearer(token)
        )

    def batch(self, batch_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/batches/{batch_id}", headers=bearer(self.token))
        assert r.status_code == 200, r.text
        return r.json()

    def commands(self) -> list[dict[str, Any]]:
        return self.http.get("/api/_dev/commands").json()


@pytest.fixture
def env() -> Iterator[Env]:
    with DevServer(ingest_rate_limit=False) as srv:
        e = Env(srv)
        yield e
        e.http.close()


# ---------------------------------------------------------------- register / auth


def test_register_shape_auth_and_validation(env: Env) -> None:
    r = env.http.post(
        "/api/agents/register",
        json={"hostname": "gpu-1", "version": "0.1.0", "capabilities": ["rerun", "stop"]},
        headers=bearer(env.token),
    )
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"agent_id", "agent_token", "poll_interval_s", "server_time_utc"}
    assert re.fullmatch(r"agent-[0-9a-f]{12}", body["agent_id"])
    assert body["agent_token"].startswith("ag_live_")
    assert body["poll_interval_s"] == 10
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["server_time_utc"])

    r = env.http.post("/api/agents/register", json={"hostname": "x"})
    assert (r.status_code, r.json()["detail"]) == (401, "Authentication required")
    r = env.http.post("/api/agents/register", json={"hostname": "x"}, headers=bearer("em_live_no"))
    assert (r.status_code, r.json()["detail"]) == (401, "Invalid or expired API token")
    r = env.http.post(
        "/api/agents/register", json={"hostname": "x", "bogus": 1}, headers=bearer(env.token)
    )
    assert r.status_code == 422

    # A dev JWT stand-in registers too (the real server takes a JWT here).
    jwt = env.http.post("/api/_dev/users", json={"username": "bob"}).json()["jwt"]
    r = env.http.post("/api/agents/register", json={"hostname": "x"}, headers=bearer(jwt))
    assert r.status_code == 201

    (agent,) = [a for a in env.http.get("/api/_dev/agents").json() if a["hostname"] == "gpu-1"]
    assert agent["capabilities"] == ["rerun", "stop"] and agent["owner"] == "alice"
    assert agent["token_sha256"] == hashlib.sha256(body["agent_token"].encode()).hexdigest()


def test_reregister_keeps_id_and_rotates_token(env: Env) -> None:
    agent_id, old = env.register("gpu-1")
    same_id, new = env.register("gpu-1")
    assert same_id == agent_id and new != old
    r = env.http.get(f"/api/agents/{agent_id}/jobs", headers=bearer(old))
    assert (r.status_code, r.json()["detail"]) == (401, "agent token unknown")
    assert env.poll(agent_id, new) == []
    # Another user on the same hostname gets its own agent.
    other_id, _ = env.register("gpu-1", token=env.srv.create_user("bob"))
    assert other_id != agent_id


def test_agent_auth_errors(env: Env) -> None:
    agent_id, token = env.register("gpu-1")
    other_id, other_token = env.register("gpu-2")
    calls = [
        ("GET", f"/api/agents/{agent_id}/jobs", None),
        ("POST", f"/api/agents/{agent_id}/heartbeat", None),
        ("POST", f"/api/agents/{agent_id}/jobs/{uuid.uuid4()}/ack", {"status": "started"}),
    ]
    for method, path, body in calls:
        cases = [
            ({}, 401, "agent token required"),
            (bearer(env.token), 401, "invalid agent token prefix"),
            (bearer("ag_live_nope"), 401, "agent token unknown"),
            (bearer(other_token), 403, None),
        ]
        for headers, status, detail in cases:
            r = env.http.request(method, path, json=body, headers=headers)
            assert r.status_code == status, (path, headers, r.text)
            if detail:
                assert r.json()["detail"] == detail
    # Body validation runs before the agent token check, as in the real server.
    r = env.http.post(f"/api/agents/{agent_id}/jobs/x/ack", json={"status": "started", "z": 1})
    assert r.status_code == 422
    assert env.poll(agent_id, token) == [] and env.poll(other_id, other_token) == []


def test_heartbeat(env: Env) -> None:
    agent_id, token = env.register("gpu-1")
    url = f"/api/agents/{agent_id}/heartbeat"
    r = env.http.post(url, headers=bearer(token))
    assert r.status_code == 204 and r.content == b""
    assert env.http.post(url, json={"note": "ok"}, headers=bearer(token)).status_code == 204
    assert env.http.post(url, json={"nope": 1}, headers=bearer(token)).status_code == 422


# ---------------------------------------------------------------- batches, rerun, stop


def test_batch_from_events_and_rerun_payload(env: Env) -> None:
    env.send(
        event("batch_start", "b-1", data={"command": "python train.py lr=0.1", "n_total_jobs": 2}),
        event("env_snapshot", "b-1", data={"cwd": "/work/exp", "env": {"SEED": "1"}}),
    )
    b = env.batch("b-1")
    assert (b["status"], b["host"], b["command"]) == ("running", "gpu-1", "python train.py lr=0.1")
    assert b["env_snapshot"]["cwd"] == "/work/exp" and b["owner"] == "alice"
    assert b["user"] == "alice"  # the OS user the SDK recorded (source.user), as Argus keeps it
    agent_id, token = env.register("gpu-1")

    r = env.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(env.token))
    assert r.status_code == 409
    assert r.json()["detail"].startswith("cannot rerun batch in status 'running'")
    env.send(event("job_done", "b-1", job_id="j1"), event("batch_done", "b-1"))
    assert env.batch("b-1")["status"] == "done" and env.batch("b-1")["n_done"] == 1

    r = env.http.post(
        "/api/batches/b-1/rerun", json={"overrides": {"lr": 0.01}}, headers=bearer(env.token)
    )
    assert r.status_code == 201
    new = r.json()
    assert re.fullmatch(r"rerun-[0-9a-f]{12}", new["batch_id"])
    assert new["status"] == "requested" and new["source_batch_id"] == "b-1"
    (job,) = env.poll(agent_id, token)
    assert job["kind"] == "rerun" and job["batch_id"] == new["batch_id"]
    assert job["payload"] == {
        "source_batch_id": "b-1",
        "command": "python train.py lr=0.1",
        "cwd": "/work/exp",
        "env": {"SEED": "1"},
        "host": "gpu-1",
        "overrides": {"lr": 0.01},
        "requested_by": "alice",
    }
    nb = env.batch(new["batch_id"])
    assert (nb["status"], nb["source_batch_id"], nb["host"]) == ("requested", "b-1", "gpu-1")
    assert nb["user"] == "alice", "a rerun batch copies its source's recorded user"
    # A second click while the command is pending returns the same rerun batch.
    again = env.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(env.token)).json()
    assert again["batch_id"] == new["batch_id"] and len(env.commands()) == 1

    # Others may not rerun it; unknown batches are 404.
    bob = env.srv.create_user("bob")
    r = env.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(bob))
    assert r.status_code == 403
    r = env.http.post("/api/batches/nope/rerun", json={}, headers=bearer(env.token))
    assert (r.status_code, r.json()["detail"]) == (404, "batch not found")


def test_poll_redelivers_until_ack_and_ack_rules(env: Env) -> None:
    agent_id, token = env.register("gpu-1")
    env.finished_batch("b-1")
    env.finished_batch("b-2")
    r1 = env.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(env.token)).json()
    r2 = env.http.post("/api/batches/b-2/rerun", json={}, headers=bearer(env.token)).json()
    first = env.poll(agent_id, token)
    assert [j["batch_id"] for j in first] == [r1["batch_id"], r2["batch_id"]]
    assert env.poll(agent_id, token) == first
    assert [c["deliveries"] for c in env.commands()] == [2, 2]

    c1, c2 = first[0]["id"], first[1]["id"]
    r = env.ack(agent_id, token, c1, status="done")
    assert (r.status_code, r.json()["detail"]) == (400, "invalid ack status 'done'")
    assert env.ack(agent_id, token, c1, status="started", bogus=1).status_code == 422
    r = env.ack(agent_id, token, c1, status="started", pid=4242)
    assert (r.status_code, r.json()) == (200, {"cmd_id": c1, "status": "started"})
    r = env.ack(agent_id, token, c1, status="started")
    assert (r.status_code, r.json()["detail"]) == (409, "cmd already in status 'started'")
    assert env.ack(agent_id, token, str(uuid.uuid4()), status="started").status_code == 404
    other_id, other_token = env.register("gpu-9")
    assert env.ack(other_id, other_token, c2, status="started").status_code == 404

    assert env.ack(agent_id, token, c2, status="failed", error="no such dir").status_code == 200
    assert [j["id"] for j in env.poll(agent_id, token)] == []
    assert env.batch(r1["batch_id"])["status"] == "running"
    failed = env.batch(r2["batch_id"])
    assert (failed["status"], failed["error"]) == ("requested", "no such dir")
    cmds = {c["id"]: c for c in env.commands()}
    assert (cmds[c1]["status"], cmds[c1]["pid"]) == ("started", 4242)
    assert cmds[c1]["acked_at"] and cmds[c2]["error"] == "no such dir"


def test_rerun_goes_to_most_recently_seen_agent_or_nobody(env: Env) -> None:
    env.finished_batch("b-1", host="gpu-1")
    env.finished_batch("b-2", host="gpu-7")
    a_id, a_tok = env.register("gpu-1")
    b_id, b_tok = env.register("gpu-1", token=env.srv.create_user("bob"))
    env.http.post(f"/api/agents/{a_id}/heartbeat", headers=bearer(a_tok))
    env.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(env.token))
    assert len(env.poll(a_id, a_tok)) == 1 and env.poll(b_id, b_tok) == []
    # No agent on gpu-7: the batch is still created, nothing is queued.
    r = env.http.post("/api/batches/b-2/rerun", json={}, headers=bearer(env.token))
    assert r.status_code == 201 and env.batch(r.json()["batch_id"])["status"] == "requested"
    assert len(env.commands()) == 1


def test_stop_before_ack_cancels_rerun(env: Env) -> None:
    agent_id, token = env.register("gpu-1")
    env.finished_batch("b-1")
    new = env.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(env.token)).json()
    (rerun_cmd,) = env.poll(agent_id, token)
    r = env.http.post(f"/api/batches/{new['batch_id']}/stop", headers=bearer(env.token))
    assert r.json() == {"status": "stopping", "batch_id": new["batch_id"]}
    (stop_cmd,) = env.poll(agent_id, token)
    assert stop_cmd["kind"] == "stop" and stop_cmd["batch_id"] == new["batch_id"]
    assert stop_cmd["payload"] == {"requested_by": "alice"}
    r = env.ack(agent_id, token, rerun_cmd["id"], status="started")
    assert (r.status_code, r.json()["detail"]) == (409, "cmd already in status 'cancelled'")
    assert env.batch(new["batch_id"])["status"] == "stopping"


def test_stop_running_batch_rules(env: Env) -> None:
    agent_id, token = env.register("gpu-1")
    env.send(event("batch_start", "b-1"))
    r = env.http.post("/api/batches/b-1/stop", headers=bearer(env.token))
    assert (r.status_code, r.json()) == (200, {"status": "stopping", "batch_id": "b-1"})
    (cmd,) = env.poll(agent_id, token)
    assert cmd["kind"] == "stop" and cmd["batch_id"] == "b-1"
    # Stopping again is a no-op; the batch stays stopping until a terminal event arrives.
    assert env.http.post("/api/batches/b-1/stop", headers=bearer(env.token)).status_code == 200
    assert len(env.commands()) == 1
    assert env.ack(agent_id, token, cmd["id"], status="started").status_code == 200
    assert env.batch("b-1")["status"] == "stopping"
    env.send(event("batch_failed", "b-1", data={"error": "SIGTERM"}))
    b = env.batch("b-1")
    assert (b["status"], b["error"]) == ("failed", "SIGTERM")
    r = env.http.post("/api/batches/b-1/stop", headers=bearer(env.token))
    assert r.json() == {"status": "failed", "batch_id": "b-1"} and len(env.commands()) == 1
    # A stalled batch (the watchdog's doing, forced here) can be stopped but not rerun.
    env.send(event("batch_start", "b-2"))
    env.http.post("/api/_dev/batches/b-2/status", json={"status": "stalled"})
    assert (
        env.http.post("/api/batches/b-2/rerun", json={}, headers=bearer(env.token)).status_code
        == 409
    )
    assert (
        env.http.post("/api/batches/b-2/stop", headers=bearer(env.token)).json()["status"]
        == "stopping"
    )


# ---------------------------------------------------------------- events


def test_events_dedup_rejected_and_listing(env: Env) -> None:
    eid = uuid.uuid4().hex
    r = env.send(
        event("batch_start", "b-1", event_id=eid),
        event("batch_start", "b-1", event_id=eid),
        event("log_line", "b-1", data={"line": "hello", "level": "info"}),
        event("job_start", "b-1"),  # no job_id
        event("job_epoch", "b-1", job_id="j", data={"epoch": "x"}),
        event("log_line", "b-1", schema_version="1.0"),
    )
    body = r.json()
    statuses = [x["status"] for x in body["results"]]
    assert statuses == ["accepted", "deduplicated", "accepted", "rejected", "rejected", "rejected"]
    assert (body["accepted"], body["rejected"]) == (3, 3)  # de-duplicated counts as accepted
    assert body["results"][0]["db_id"] == body["results"][1]["db_id"]
    assert body["results"][3]["error"] == "job_start requires job_id"
    assert "Unsupported schema_version" in body["results"][5]["error"]

    single = event("log_line", "b-1", data={"line": "x"})
    r = env.http.post("/api/events", json=single, headers=bearer(env.token))
    assert r.status_code == 200 and r.json()["deduplicated"] is False
    r = env.http.post("/api/events", json=single, headers=bearer(env.token))
    assert r.json()["deduplicated"] is True

    listed = env.http.get("/api/_dev/events", params={"batch_id": "b-1"}).json()
    assert [e["event_type"] for e in listed] == ["batch_start", "log_line", "log_line"]
    assert listed[1]["data"] == {"line": "hello", "level": "info"}

    # Envelope errors refuse the whole request; JWTs and missing tokens are refused.
    bad = event("log_line", "b-1", extra_key=1)
    r = env.http.post("/api/events/batch", json={"events": [bad]}, headers=bearer(env.token))
    assert r.status_code == 422
    r = env.http.post("/api/events/batch", json={"events": []}, headers=bearer(env.token))
    assert r.status_code == 422
    r = env.http.post("/api/events", json=event("nope", "b-1"), headers=bearer(env.token))
    assert r.status_code == 422
    jwt = env.http.post("/api/_dev/users", json={"username": "alice"}).json()["jwt"]
    assert env.http.post("/api/events", json=single, headers=bearer(jwt)).status_code == 403
    assert env.http.post("/api/events", json=single).status_code == 401


def test_token_bucket_numbers() -> None:
    now = [0.0]
    bucket = TokenBucket(60, 10.0, clock=lambda: now[0])
    assert all(bucket.try_consume("k")[0] for _ in range(60))
    allowed, wait = bucket.try_consume("k")
    assert not allowed and wait == pytest.approx(0.1)
    assert retry_after_header(wait) == "1"
    now[0] += 0.1
    assert bucket.try_consume("k")[0] and not bucket.try_consume("k")[0]
    assert bucket.try_consume("other")[0]  # per key


def test_ingest_rate_limit() -> None:
    # The real limit: a burst of 60 requests per token passes.
    with DevServer() as srv, httpx.Client(base_url=srv.url, verify=TLS) as http:
        headers = bearer(srv.create_user("alice"))
        body = {"events": [event("log_line", "b-1")]}
        codes = [http.post("/api/events/batch", json=body, headers=headers) for _ in range(60)]
        assert [r.status_code for r in codes] == [200] * 60
    # Past the burst (a refill too slow to matter, so load on the test machine can't flake it).
    with (
        DevServer(ingest_rate_limit=(60, 0.001)) as srv,
        httpx.Client(base_url=srv.url, verify=TLS) as http,
    ):
        headers = bearer(srv.create_user("alice"))
        body = {"events": [event("log_line", "b-1")]}
        codes = [http.post("/api/events/batch", json=body, headers=headers) for _ in range(61)]
        assert [r.status_code for r in codes[:60]] == [200] * 60
        assert codes[-1].status_code == 429
        assert codes[-1].json()["detail"] == "Rate limit exceeded"
        single = http.post("/api/events", json=event("log_line", "b-1"), headers=headers)
        assert single.status_code == 429
        # Per token: another token still has its burst; agent endpoints are never limited.
        other = bearer(srv.create_user("bob"))
        assert http.post("/api/events/batch", json=body, headers=other).status_code == 200
        r = http.post("/api/agents/register", json={"hostname": "h"}, headers=headers)
        assert r.status_code == 201
    with (
        DevServer(ingest_rate_limit=(2, 0.5)) as srv,
        httpx.Client(base_url=srv.url, verify=TLS) as http,
    ):
        headers = bearer(srv.create_user("alice"))
        codes = [
            http.post("/api/events", json=event("log_line", "b"), headers=headers) for _ in range(3)
        ]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert codes[2].headers["Retry-After"] == "2"


# ---------------------------------------------------------------- faults, restart, serve


async def test_fault_injection(env: Env) -> None:
    agent_id, token = env.register("gpu-1")
    url = f"/api/agents/{agent_id}/jobs"
    async with httpx.AsyncClient(base_url=env.srv.url, verify=TLS) as http:
        r = await http.post(
            "/api/_dev/faults",
            json={"path_prefix": "/api/agents/", "status": 503, "count": 2, "retry_after": 3},
        )
        assert r.status_code == 201
        for _ in range(2):
            r = await http.get(url, headers=bearer(token))
            assert r.status_code == 503 and r.headers["Retry-After"] == "3"
            assert r.headers["Connection"] == "close"
        assert (await http.get("/api/_dev/agents")).status_code == 200  # never faulted
        assert (await http.get(url, headers=bearer(token))).status_code == 200

        await http.post(
            "/api/_dev/faults",
            json={"path_prefix": "/api/events", "status": 429, "count": 5, "retry_after": 0.5},
        )
        r = await http.post("/api/events", json=event("log_line", "b"), headers=bearer(env.token))
        assert (r.status_code, r.headers["Retry-After"]) == (429, "0.5")
        assert "Connection" not in r.headers or r.headers["Connection"] != "close"
        assert (await http.delete("/api/_dev/faults")).json() == {"cleared": 1}
        r = await http.post("/api/events", json=event("log_line", "b"), headers=bearer(env.token))
        assert r.status_code == 200


def test_restart_on_same_db_and_port_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "argus.db"
    srv = DevServer(db_path=db, ingest_rate_limit=False)
    srv.start()
    srv.start()  # idempotent
    port = srv.port
    e = Env(srv)
    agent_id, agent_token = e.register("gpu-1")
    e.finished_batch("b-1")
    e.http.post("/api/batches/b-1/rerun", json={}, headers=bearer(e.token))
    e.http.close()
    srv.stop()
    srv.stop()  # idempotent
    assert agent_token.encode() not in db.read_bytes()  # only its SHA-256 is stored

    srv.start()  # the same object comes back on the same port
    assert srv.port == port
    srv.stop()
    with DevServer(db_path=db, port=port, ingest_rate_limit=False) as again:
        assert again.port == port
        with httpx.Client(base_url=again.url, verify=TLS) as http:
            r = http.get(f"/api/agents/{agent_id}/jobs", headers=bearer(agent_token))
            assert r.status_code == 200 and len(r.json()["jobs"]) == 1
            r = http.get("/api/batches/b-1", headers=bearer(e.token))
            assert r.json()["status"] == "done"


def test_serve_prints_url_and_tokens_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from argus_agent.devserver import serve; "
        f"serve('127.0.0.1', {port}, {str(tmp_path / 'd.db')!r}, ['alice', 'bob'], 2.0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines[0] == f"argus dev-server listening on http://127.0.0.1:{port}"
        assert lines[1].startswith("user alice token em_live_")
        token = lines[2].split()[-1]
        r = httpx.post(
            f"http://127.0.0.1:{port}/api/agents/register",
            json={"hostname": "h"},
            headers=bearer(token),
            verify=TLS,
        )
        assert r.status_code == 201 and r.json()["poll_interval_s"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
