"""The command ledger: which server commands this host has acted on and acked, durably.

The server redelivers a command on every poll until it is acked, including after our own
restart, so the ledger is what makes "acted on at most once, acked exactly once" hold.
Each command goes through three phases, each committed before the next step starts::

    acting  ── the action (launch / stop) began; never started again
    to_ack  ── the result (started + pid, or failed + reason) is known; ack it
    acked   ── the server accepted the ack (or said 409: acked already)

SQLite in the state dir (WAL). Calls block briefly on local disk; the agent makes them
from its event loop because they are small single-row statements.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from argus_agent.protocol import AckStatus

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    cmd_id      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    batch_id    TEXT,
    phase       TEXT NOT NULL CHECK (phase IN ('acting', 'to_ack', 'acked')),
    ack_status  TEXT,
    pid         INTEGER,
    error       TEXT,
    received_at REAL NOT NULL,
    acked_at    REAL,
    ack_note    TEXT
);
"""


@dataclass(frozen=True)
class LedgerEntry:
    """One remembered command."""

    cmd_id: str
    kind: str
    batch_id: str | None
    phase: str
    ack_status: AckStatus | None
    pid: int | None
    error: str | None
    received_at: float
    acked_at: float | None
    ack_note: str | None


class CommandLedger:
    """Durable per-command state; one instance per state dir. Not thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database; idempotent."""
        self._db.close()

    def get(self, cmd_id: str) -> LedgerEntry | None:
        """The entry for ``cmd_id``, or None when this host never saw it."""
        row = self._db.execute(
            "SELECT cmd_id, kind, batch_id, phase, ack_status, pid, error, received_at,"
            " acked_at, ack_note FROM commands WHERE cmd_id = ?",
            (cmd_id,),
        ).fetchone()
        return LedgerEntry(*row) if row else None

    def begin(self, cmd_id: str, kind: str, batch_id: str | None) -> bool:
        """Claim ``cmd_id`` for acting (phase ``acting``); False if it was claimed before."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO commands (cmd_id, kind, batch_id, phase, received_at)"
            " VALUES (?, ?, ?, 'acting', ?)",
            (cmd_id, kind, batch_id, time.time()),
        )
        return cursor.rowcount == 1

    def record_result(
        self, cmd_id: str, status: AckStatus, *, pid: int | None = None, error: str | None = None
    ) -> None:
        """Store the outcome to ack (phase ``to_ack``)."""
        self._db.execute(
            "UPDATE commands SET phase = 'to_ack', ack_status = ?, pid = ?, error = ?"
            " WHERE cmd_id = ? AND phase != 'acked'",
            (status, pid, error, cmd_id),
        )

    def mark_acked(self, cmd_id: str, note: str | None = None) -> None:
        """The server has the ack (phase ``acked``); ``note`` says e.g. 'already acked (409)'."""
        self._db.execute(
            "UPDATE commands SET phase = 'acked', acked_at = ?, ack_note = ? WHERE cmd_id = ?",
            (time.time(), note, cmd_id),
        )

    def pending_acks(self) -> list[LedgerEntry]:
        """Entries whose result is known but whose ack has not reached the server, oldest first."""
        rows = self._db.execute(
            "SELECT cmd_id, kind, batch_id, phase, ack_status, pid, error, received_at,"
            " acked_at, ack_note FROM commands WHERE phase = 'to_ack' ORDER BY received_at"
        ).fetchall()
        return [LedgerEntry(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        """How many commands are in each phase (for status)."""
        rows = self._db.execute("SELECT phase, COUNT(*) FROM commands GROUP BY phase").fetchall()
        return {phase: count for phase, count in rows}

    def prune(self, older_than_s: float) -> int:
        """Forget acked commands received more than ``older_than_s`` ago; returns how many.

        Safe because the server stops redelivering a command once it is acked.
        """
        cursor = self._db.execute(
            "DELETE FROM commands WHERE phase = 'acked' AND received_at < ?",
            (time.time() - older_than_s,),
        )
        return cursor.rowcount
