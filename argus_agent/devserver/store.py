"""SQLite storage for the reference Argus server.

Owns the one :class:`sqlite3.Connection` of a dev server: the schema, the transaction helper
and the user / token / agent rows. Batch, event and command rules live in
:mod:`.ingest` and :mod:`.executor`; they run their SQL through :meth:`Store.tx`.

One connection is shared by the server thread and the caller's thread (``create_user``), so
every statement runs under :attr:`Store.lock`. Files use WAL; ``":memory:"`` lives as long as
the :class:`Store`.

It also owns the "a command was queued" signal: :meth:`Store.command_queued` inside a
transaction calls every :attr:`Store.command_listeners` entry once that transaction has
committed (the websocket endpoint pushes the command then), and the per-agent websocket
``confirmed_seq``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

REPORTER_PREFIX = "em_live_"
VIEWER_PREFIX = "em_view_"
AGENT_PREFIX = "ag_live_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    kind TEXT NOT NULL,            -- 'reporter' (em_live_) or 'jwt' (dev stand-in)
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    owner_id INTEGER NOT NULL REFERENCES users(id),
    token_hash TEXT NOT NULL UNIQUE,
    version TEXT,
    capabilities TEXT NOT NULL DEFAULT '[]',
    registered_at TEXT NOT NULL,
    last_seen_at TEXT,
    last_seen_ts REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_agents_hostname ON agents(hostname);
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    batch_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    created_at TEXT NOT NULL,
    acked_at TEXT,
    pid INTEGER,
    error TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_commands_agent_status ON commands(agent_id, status);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    project TEXT,
    user TEXT,
    host TEXT,
    command TEXT,
    experiment_type TEXT,
    n_total INTEGER,
    status TEXT,
    start_time TEXT,
    end_time TEXT,
    owner_id INTEGER,
    name TEXT,
    source_batch_id TEXT,
    env_snapshot TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    batch_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    status TEXT,
    PRIMARY KEY (batch_id, job_id)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE,
    batch_id TEXT NOT NULL,
    job_id TEXT,
    event_type TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    schema_version TEXT NOT NULL,
    source TEXT,
    data TEXT,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_events_batch ON events(batch_id);
CREATE TABLE IF NOT EXISTS ws_sequences (
    agent_id TEXT PRIMARY KEY REFERENCES agents(id),
    confirmed_seq INTEGER NOT NULL  -- the highest events seq confirmed on the websocket
);
"""


class ApiError(Exception):
    """An HTTP error with the real server's status code and ``detail``.

    Raised by the storage and rule modules; the app turns it into ``{"detail": ...}``.
    """

    def __init__(
        self, status_code: int, detail: Any, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


@dataclass(frozen=True)
class Principal:
    """The user behind a user token (em_live or dev JWT)."""

    user_id: int
    username: str
    is_admin: bool
    kind: str  # 'reporter' | 'jwt'
    token_hash: str


def utcnow_iso() -> str:
    """Return the current UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (the real server's format)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sha256_hex(token: str) -> str:
    """Return the SHA-256 hex digest of *token* (how every token is stored)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_uuid() -> str:
    """Return a random UUID4 string (command ids, server-written event ids)."""
    return str(uuid.uuid4())


def row_dict(row: sqlite3.Row | None) -> dict[str, Any] | None:
    """Convert a row to a plain dict (None stays None)."""
    return None if row is None else {k: row[k] for k in row.keys()}  # noqa: SIM118


def loads_or(raw: str | None, default: Any) -> Any:
    """Decode JSON text from a column, or return *default* for NULL / bad text."""
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return default


class Store:
    """The dev server's database: schema, locking, users, tokens and agents.

    Thread-safe: every public method takes :attr:`lock`. Not async; calls are short.
    """

    def __init__(self, path: str | Path = ":memory:") -> None:
        """Open (creating if needed) the database at *path* and apply the schema.

        Raises :class:`sqlite3.Error` when the file cannot be opened.
        """
        self.path = str(path)
        self.lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        #: Called with an agent id after a transaction that queued a command for it commits.
        #: Called on the committing thread with :attr:`lock` held: must not block.
        self.command_listeners: list[Callable[[str], None]] = []
        self._queued: set[str] = set()
        with self.lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            # 64 MiB of page cache: the event_id index takes random inserts, and SQLite's
            # default 2 MiB made ingest slow down as the table grew (bench/websocket.py).
            self._db.execute("PRAGMA cache_size=-65536")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection. Idempotent; later calls on this Store fail."""
        with self.lock, suppress(sqlite3.Error):
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run one write transaction; commit on success, roll back on error."""
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._queued.clear()
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._queued.clear()
                raise
            if self._queued:
                queued, self._queued = self._queued, set()
                for agent_id in sorted(queued):
                    self._announce(agent_id)

    def command_queued(self, agent_id: str) -> None:
        """Inside :meth:`tx`: tell the listeners about *agent_id* once the transaction commits
        (nothing is said when it rolls back)."""
        self._queued.add(agent_id)

    def _announce(self, agent_id: str) -> None:
        for listener in list(self.command_listeners):
            try:
                listener(agent_id)
            except Exception:  # a listener's failure must not fail the committed request
                _log.exception("command listener failed")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock for a group of reads (autocommit, no transaction)."""
        with self.lock:
            yield self._db

    # ------------------------------------------------------------------ users / tokens

    def _ensure_user(self, db: sqlite3.Connection, username: str) -> int:
        row = db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
        if row is not None:
            return int(row["id"])
        cur = db.execute(
            "INSERT INTO users (username, created_at) VALUES (?, ?)", (username, utcnow_iso())
        )
        return int(cur.lastrowid or 0)

    def create_user(self, username: str) -> str:
        """Create *username* if missing and mint a new ``em_live_`` token for it.

        Earlier tokens of the user stay valid. Returns the plaintext token (only its hash is
        stored). Raises ValueError on an empty username.
        """
        if not username or not username.strip():
            raise ValueError("username must not be empty")
        token = REPORTER_PREFIX + secrets.token_urlsafe(20)
        with self.tx() as db:
            user_id = self._ensure_user(db, username)
            db.execute(
                "INSERT INTO tokens (token_hash, user_id, kind, created_at) VALUES (?, ?, ?, ?)",
                (sha256_hex(token), user_id, "reporter", utcnow_iso()),
            )
        return token

    def create_jwt(self, username: str) -> str:
        """Mint an opaque dev stand-in for a web-login JWT of *username* (user created if missing).

        It looks like a JWT (three dot-separated parts) and is accepted where the real server
        takes a JWT (register, rerun, stop), refused with 403 on event ingest.
        """

        def part() -> str:
            return secrets.token_urlsafe(16).replace(".", "_")

        token = "eyJ" + part() + "." + part() + "." + part()
        with self.tx() as db:
            user_id = self._ensure_user(db, username)
            db.execute(
                "INSERT INTO tokens (token_hash, user_id, kind, created_at) VALUES (?, ?, ?, ?)",
                (sha256_hex(token), user_id, "jwt", utcnow_iso()),
            )
        return token

    def resolve_user_token(self, token: str) -> Principal | None:
        """Return who holds user token *token*, or None when it is unknown. Changes nothing."""
        with self.read() as db:
            row = db.execute(
                "SELECT t.token_hash, t.kind, u.id, u.username, u.is_admin FROM tokens t "
                "JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?",
                (sha256_hex(token),),
            ).fetchone()
        if row is None:
            return None
        return Principal(
            user_id=int(row["id"]),
            username=row["username"],
            is_admin=bool(row["is_admin"]),
            kind=row["kind"],
            token_hash=row["token_hash"],
        )

    # ------------------------------------------------------------------ agents

    def register_agent(
        self, user_id: int, hostname: str, version: str | None, capabilities: list[str]
    ) -> tuple[str, str, str]:
        """Create or re-register the agent of (*hostname*, *user_id*).

        A re-register keeps the agent id and replaces the token hash, so the old token stops
        working. Sets version, capabilities and last_seen. Returns ``(agent_id, token, now)``.
        """
        token = AGENT_PREFIX + secrets.token_urlsafe(32)
        now = utcnow_iso()
        caps = json.dumps(capabilities, ensure_ascii=False)
        with self.tx() as db:
            row = db.execute(
                "SELECT id FROM agents WHERE hostname = ? AND owner_id = ?", (hostname, user_id)
            ).fetchone()
            if row is not None:
                agent_id = str(row["id"])
                db.execute(
                    "UPDATE agents SET token_hash = ?, version = ?, capabilities = ?, "
                    "last_seen_at = ?, last_seen_ts = ? WHERE id = ?",
                    (sha256_hex(token), version, caps, now, time.time(), agent_id),
                )
            else:
                agent_id = f"agent-{uuid.uuid4().hex[:12]}"
                db.execute(
                    "INSERT INTO agents (id, hostname, owner_id, token_hash, version, "
                    "capabilities, registered_at, last_seen_at, last_seen_ts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        agent_id,
                        hostname,
                        user_id,
                        sha256_hex(token),
                        version,
                        caps,
                        now,
                        now,
                        time.time(),
                    ),
                )
        return agent_id, token, now

    def agent_for_token(self, token: str) -> dict[str, Any] | None:
        """Return the agent row whose token hash matches *token*, or None. Changes nothing."""
        with self.read() as db:
            row = db.execute(
                "SELECT * FROM agents WHERE token_hash = ?", (sha256_hex(token),)
            ).fetchone()
        return row_dict(row)

    @staticmethod
    def touch_agent(db: sqlite3.Connection, agent_id: str) -> None:
        """Set the agent's last_seen to now (inside the caller's transaction)."""
        db.execute(
            "UPDATE agents SET last_seen_at = ?, last_seen_ts = ? WHERE id = ?",
            (utcnow_iso(), time.time(), agent_id),
        )

    @staticmethod
    def agent_for_host(db: sqlite3.Connection, hostname: str | None) -> dict[str, Any] | None:
        """Return the most recently seen agent whose hostname is exactly *hostname*, or None."""
        if not hostname:
            return None
        row = db.execute(
            "SELECT * FROM agents WHERE hostname = ? ORDER BY last_seen_ts DESC, rowid DESC "
            "LIMIT 1",
            (hostname,),
        ).fetchone()
        return row_dict(row)

    @staticmethod
    def confirmed_seq(db: sqlite3.Connection, agent_id: str) -> int | None:
        """The highest websocket events seq confirmed to *agent_id*, or None when none was."""
        row = db.execute(
            "SELECT confirmed_seq FROM ws_sequences WHERE agent_id = ?", (agent_id,)
        ).fetchone()
        return None if row is None else int(row["confirmed_seq"])

    @staticmethod
    def raise_confirmed_seq(db: sqlite3.Connection, agent_id: str, seq: int) -> None:
        """Record *seq* as confirmed to *agent_id* (inside the transaction that stored its
        events); the stored value only ever grows."""
        db.execute(
            "INSERT INTO ws_sequences (agent_id, confirmed_seq) VALUES (?, ?) "
            "ON CONFLICT (agent_id) DO UPDATE SET "
            "confirmed_seq = MAX(confirmed_seq, excluded.confirmed_seq)",
            (agent_id, seq),
        )

    def list_agents(self) -> list[dict[str, Any]]:
        """Return every agent (dev listing), owner username included, no token material but
        the stored SHA-256."""
        with self.read() as db:
            rows = db.execute(
                "SELECT a.*, u.username AS owner FROM agents a "
                "JOIN users u ON u.id = a.owner_id ORDER BY a.registered_at, a.rowid"
            ).fetchall()
        out = []
        for r in rows:
            d = row_dict(r) or {}
            out.append(
                {
                    "agent_id": d["id"],
                    "hostname": d["hostname"],
                    "owner": d["owner"],
                    "version": d["version"],
                    "capabilities": loads_or(d["capabilities"], []),
                    "registered_at": d["registered_at"],
                    "last_seen_at": d["last_seen_at"],
                    "token_sha256": d["token_hash"],
                }
            )
        return out
