"""Rerun / stop requests and the agent command queue, following Argus v0.3.0's rules.

* Rerun is allowed from ``done``, ``failed``, ``cancelled``, ``stopped`` (else 409). It creates
  ``rerun-<12 hex>`` in status ``requested`` and queues a ``rerun`` command for the most
  recently seen agent with the source batch's exact hostname. With no such agent the batch
  is still created and nothing is queued. A second rerun of a source whose rerun command is
  still pending returns that same new batch (no second command).
* Stop: ``stopping`` / ``cancelled`` / ``stopped`` / ``done`` / ``failed`` are a no-op
  (200 with the current status, nothing queued); ``running`` / ``stalled`` / ``requested`` /
  ``pending`` become ``stopping``, pending rerun commands of the batch are cancelled and a
  ``stop`` command is queued for the host's agent; any other status is 409.
* Commands stay ``pending`` (and come back on every poll) until acked once. One queue serves
  both channels: a connected websocket gets each command pushed once per connection
  (:func:`push_commands`), and an ack over either channel ends it (a second one is a 409).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Collection
from typing import Any

from .ingest import record_server_event
from .store import (
    ApiError,
    Principal,
    Store,
    loads_or,
    new_uuid,
    row_dict,
    sha256_hex,
    utcnow_iso,
)

RERUN_ALLOWED = frozenset({"done", "failed", "cancelled", "stopped"})
STOP_LIVE = frozenset({"running", "stalled", "requested", "pending"})
STOP_NOOP = frozenset({"stopping", "cancelled", "stopped", "done", "failed"})
BATCH_NOT_FOUND = "batch not found"
OWNER_ONLY = "Only the batch owner may manage shares"  # the real server's text, sic


def _load_owned_batch(db: sqlite3.Connection, batch_id: str, user: Principal) -> dict[str, Any]:
    batch = row_dict(db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())
    if batch is None:
        raise ApiError(404, BATCH_NOT_FOUND)
    if not user.is_admin and batch["owner_id"] != user.user_id:
        raise ApiError(403, OWNER_ONLY)
    return batch


def _queue(
    store: Store,
    db: sqlite3.Connection,
    agent_id: str,
    batch_id: str,
    kind: str,
    payload: dict[str, Any],
) -> str:
    """Insert a pending command; the store tells its listeners (the websocket push) once the
    transaction commits."""
    cmd_id = new_uuid()
    db.execute(
        "INSERT INTO commands (id, agent_id, batch_id, kind, payload, status, created_at) "
        "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
        (cmd_id, agent_id, batch_id, kind, json.dumps(payload, ensure_ascii=False), utcnow_iso()),
    )
    store.command_queued(agent_id)
    return cmd_id


def inject_command(store: Store, agent_id: str, kind: str, batch_id: str, payload: Any) -> str:
    """Queue an arbitrary command for *agent_id*, bypassing every rule (dev only: tests use
    it to play a broken or hostile server). Returns the command id."""
    with store.tx() as db:
        return _queue(store, db, agent_id, batch_id, kind, payload)


def request_rerun(
    store: Store,
    source_id: str,
    user: Principal,
    overrides: dict[str, Any],
    name: str | None = None,
) -> dict[str, Any]:
    """Create a rerun batch of *source_id* and queue its command; return the 201 body.

    Raises ApiError 404 (unknown batch), 403 (not the owner), 409 (status forbids rerun).
    """
    with store.tx() as db:
        source = _load_owned_batch(db, source_id, user)
        status = source["status"]
        if status is not None and status not in RERUN_ALLOWED:
            raise ApiError(
                409,
                f"cannot rerun batch in status {status!r}; expected one of {sorted(RERUN_ALLOWED)}",
            )
        for cmd in db.execute(
            "SELECT batch_id, payload FROM commands WHERE kind = 'rerun' AND status = 'pending' "
            "ORDER BY seq DESC"
        ).fetchall():
            if loads_or(cmd["payload"], {}).get("source_batch_id") == source_id:
                child = db.execute(
                    "SELECT name FROM batches WHERE id = ?", (cmd["batch_id"],)
                ).fetchone()
                return {
                    "batch_id": cmd["batch_id"],
                    "source_batch_id": source_id,
                    "name": child["name"] if child is not None else None,
                    "status": "requested",
                }
        now = utcnow_iso()
        new_id = f"rerun-{uuid.uuid4().hex[:12]}"
        new_name = name or f"{source['name'] or source['id']} (rerun)"
        db.execute(
            "INSERT INTO batches (id, project, user, host, command, experiment_type, n_total, "
            "status, start_time, owner_id, name, source_batch_id, env_snapshot) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'requested', ?, ?, ?, ?, ?)",
            (
                new_id,
                source["project"],
                source["user"],
                source["host"],
                source["command"],
                source["experiment_type"],
                source["n_total"],
                now,
                user.user_id,
                new_name,
                source_id,
                source["env_snapshot"],
            ),
        )
        record_server_event(
            db,
            new_id,
            "rerun_requested",
            {
                "source_batch_id": source_id,
                "overrides": overrides,
                "requested_by": user.username,
                "requested_at": now,
            },
            new_uuid(),
        )
        agent = store.agent_for_host(db, source["host"])
        if agent is not None:
            snapshot = loads_or(source["env_snapshot"], {})
            if not isinstance(snapshot, dict):
                snapshot = {}
            payload = {
                "source_batch_id": source_id,
                "command": source["command"],
                "cwd": snapshot.get("cwd"),
                "env": snapshot.get("env"),
                "host": source["host"],
                "overrides": overrides,
                "requested_by": user.username,
            }
            _queue(store, db, agent["id"], new_id, "rerun", payload)
    return {
        "batch_id": new_id,
        "source_batch_id": source_id,
        "name": new_name,
        "status": "requested",
    }


def request_stop(store: Store, batch_id: str, user: Principal) -> dict[str, Any]:
    """Flip *batch_id* to ``stopping`` and queue a stop command; return the 200 body.

    Cancels the batch's pending rerun commands. Raises ApiError 404, 403, or 409 (status
    neither live nor already finished/stopping).
    """
    with store.tx() as db:
        batch = _load_owned_batch(db, batch_id, user)
        status = batch["status"]
        if status in STOP_NOOP:
            return {"status": status, "batch_id": batch_id}
        if status is not None and status not in STOP_LIVE:
            raise ApiError(409, f"cannot stop batch in status {status!r}")
        now = utcnow_iso()
        db.execute("UPDATE batches SET status = 'stopping' WHERE id = ?", (batch_id,))
        record_server_event(
            db,
            batch_id,
            "batch_stop_requested",
            {"requested_by": user.username, "requested_at": now},
            new_uuid(),
        )
        db.execute(
            "UPDATE commands SET status = 'cancelled', acked_at = ? "
            "WHERE batch_id = ? AND kind = 'rerun' AND status = 'pending'",
            (now, batch_id),
        )
        agent = store.agent_for_host(db, batch["host"])
        if agent is not None:
            _queue(store, db, agent["id"], batch_id, "stop", {"requested_by": user.username})
    return {"status": "stopping", "batch_id": batch_id}


def poll_commands(store: Store, agent_id: str) -> list[dict[str, Any]]:
    """Return the agent's pending commands, oldest first; bump its last_seen and each
    returned command's delivery count."""
    with store.tx() as db:
        store.touch_agent(db, agent_id)
        rows = db.execute(
            "SELECT * FROM commands WHERE agent_id = ? AND status = 'pending' ORDER BY seq",
            (agent_id,),
        ).fetchall()
        if rows:
            db.execute(
                "UPDATE commands SET deliveries = deliveries + 1 "
                "WHERE agent_id = ? AND status = 'pending'",
                (agent_id,),
            )
    return [_command_item(r) for r in rows]


def push_commands(store: Store, agent_id: str, pushed: set[str]) -> list[dict[str, Any]]:
    """The websocket's poll: the agent's pending commands not in *pushed* (those already
    pushed on this connection), oldest first, as :func:`poll_commands` gives them; bumps
    their delivery count and the agent's last_seen."""
    with store.tx() as db:
        store.touch_agent(db, agent_id)
        rows = [
            r
            for r in db.execute(
                "SELECT * FROM commands WHERE agent_id = ? AND status = 'pending' ORDER BY seq",
                (agent_id,),
            ).fetchall()
            if r["id"] not in pushed
        ]
        db.executemany(
            "UPDATE commands SET deliveries = deliveries + 1 WHERE id = ?",
            [(r["id"],) for r in rows],
        )
    return [_command_item(r) for r in rows]


def _command_item(row: sqlite3.Row) -> dict[str, Any]:
    """A command row as an item of ``GET /api/agents/{id}/jobs`` (and a pushed frame)."""
    return {
        "id": row["id"],
        "kind": row["kind"],
        "batch_id": row["batch_id"],
        "payload": loads_or(row["payload"], {}),
        "created_at": row["created_at"],
    }


def ack_command(
    store: Store,
    agent_id: str,
    cmd_id: str,
    status: str,
    pid: int | None,
    error: str | None,
    *,
    serving: Collection[str] = (),
) -> dict[str, Any]:
    """Record the agent's ack of *cmd_id*; return ``{cmd_id, status}``. *serving*: the served
    names' agent ids a websocket of *agent_id* may ack for too (acked as theirs).

    ``started`` on a rerun moves its batch ``requested`` → ``running``; ``failed`` leaves the
    batch ``requested`` and copies the error onto it (dev extra). Raises ApiError 404 (unknown
    command or another agent's), 409 (already acked or cancelled), 400 (bad status), checked
    in that order.
    """
    with store.tx() as db:
        cmd = row_dict(db.execute("SELECT * FROM commands WHERE id = ?", (cmd_id,)).fetchone())
        if cmd is None or (cmd["agent_id"] != agent_id and cmd["agent_id"] not in serving):
            raise ApiError(404, "command not found")
        agent_id = cmd["agent_id"]
        if cmd["status"] != "pending":
            raise ApiError(409, f"cmd already in status {cmd['status']!r}")
        if status not in ("started", "failed"):
            raise ApiError(400, f"invalid ack status {status!r}")
        db.execute(
            "UPDATE commands SET status = ?, acked_at = ?, pid = ?, error = ? WHERE id = ?",
            (status, utcnow_iso(), pid, error, cmd_id),
        )
        store.touch_agent(db, agent_id)
        if cmd["kind"] == "rerun":
            if status == "started":
                db.execute(
                    "UPDATE batches SET status = 'running' WHERE id = ? AND status = 'requested'",
                    (cmd["batch_id"],),
                )
            else:
                db.execute("UPDATE batches SET error = ? WHERE id = ?", (error, cmd["batch_id"]))
    return {"cmd_id": cmd_id, "status": status}


def list_commands(
    store: Store, agent_id: str | None = None, batch_id: str | None = None
) -> list[dict[str, Any]]:
    """Return commands (dev listing) with ack status, pid, error, acked_at and delivery count."""
    sql = "SELECT c.*, a.hostname FROM commands c JOIN agents a ON a.id = c.agent_id WHERE 1=1"
    args: list[Any] = []
    if agent_id is not None:
        sql += " AND c.agent_id = ?"
        args.append(agent_id)
    if batch_id is not None:
        sql += " AND c.batch_id = ?"
        args.append(batch_id)
    with store.read() as db:
        rows = db.execute(sql + " ORDER BY c.seq", args).fetchall()
    return [
        {
            "id": r["id"],
            "agent_id": r["agent_id"],
            "hostname": r["hostname"],
            "kind": r["kind"],
            "batch_id": r["batch_id"],
            "payload": loads_or(r["payload"], {}),
            "status": r["status"],
            "created_at": r["created_at"],
            "acked_at": r["acked_at"],
            "pid": r["pid"],
            "error": r["error"],
            "deliveries": r["deliveries"],
        }
        for r in rows
    ]


def served_agents(
    store: Store, owner_id: int, own_id: str, announced: list[tuple[str, str, str]]
) -> tuple[dict[str, str], dict[str, str]]:
    """Which of a websocket hello's ``serves`` (agent id, host name, agent token) the
    connection may serve: registrations under that host name whose token it holds (the
    check of a REST poll), made by the same Argus user as the connecting agent. Returns
    (accepted: agent id → host name, refused: agent id → why)."""
    accepted: dict[str, str] = {}
    refused: dict[str, str] = {}
    with store.read() as db:
        for agent_id, hostname, token in announced:
            row = db.execute(
                "SELECT owner_id, hostname, token_hash FROM agents WHERE id = ?", (agent_id,)
            ).fetchone()
            if agent_id == own_id:
                refused[agent_id] = "the connection's own agent"
            elif row is None or row["token_hash"] != sha256_hex(token):
                refused[agent_id] = "no such agent, or not its token"
            elif int(row["owner_id"]) != owner_id:
                refused[agent_id] = "registered by another user"
            elif row["hostname"] != hostname:
                refused[agent_id] = f"registered for host {row['hostname']!r}"
            else:
                accepted[agent_id] = hostname
    return accepted, refused


def touch_agents(store: Store, agent_ids: list[str]) -> None:
    """Set the agents' last_seen to now (served names seen alive on a websocket)."""
    if not agent_ids:
        return
    now_iso, now = utcnow_iso(), time.time()
    with store.tx() as db:
        db.executemany(
            "UPDATE agents SET last_seen_at = ?, last_seen_ts = ? WHERE id = ?",
            [(now_iso, now, agent_id) for agent_id in agent_ids],
        )
