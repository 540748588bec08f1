"""The command ledger: which server commands this host has acted on and acked, durably.

The server redelivers a command on every poll until it is acked, including after our own
restart, so the ledger is what makes "acted on at most once, acked exactly once" hold.
Each command goes through three phases, each committed before the next step starts::

    acting  ── the action (launch / stop) began; never started again
    to_ack  ── the result (started + pid, or failed + reason) is known; ack it
    acked   ── the server accepted the ack (or said 409: acked already)

Which step comes next is decided by ``dispatch_rules.on_delivery`` / ``on_outcome`` /
``on_ack_answer`` (pure functions of the entry, the command and the outcome); this module
only stores the phases. Text is stored as valid UTF-8 whatever it holds: a lone surrogate
(which SQLite cannot encode) is written as its escape, never failing the write.

SQLite in the state dir (WAL). Calls block briefly on local disk; the agent makes them
from its event loop because they are small single-row statements.

Damaged file: a ``state.db`` that fails SQLite's quick check at start-up, or that SQLite
reports corrupt later, is moved aside as ``state.db.corrupt-<UTC time>`` (kept for
inspection, named in the log), the rows that can still be read are copied into a fresh one
that takes its place, and the recovery is listed in ``recovered_from`` (and in status) until
the kept file is deleted. Commands whose rows were lost are redelivered by the server if not
yet acked; the job records keep a rerun from starting twice (its batch already has a job
dir, so it is acked failed). A state dir the agent may not write raises StateError naming
the path and the fix; other failures to open (a full disk) raise StateUnavailableError,
which the service manager retries. The helpers are shared with the outbox (``outbox.py``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argus_agent.dbrecovery import (
    DamagedDatabaseError,
    earlier_set_aside,
    is_corrupt,
    is_unwritable,
    swap_in_salvage,
    unavailable_error,
    unwritable_error,
)
from argus_agent.errors import StateError
from argus_agent.logsetup import get_logger
from argus_agent.protocol import AckStatus

log = get_logger(__name__)

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
    ack_note    TEXT,
    via         TEXT
);
"""
#: The columns every ledger has had; ``via`` came with served host names (added to older
#: files on open). A damaged ledger is salvaged by these (its rows' ``via`` is lost: their
#: acks then go through this agent's own registration).
BASE_COLUMNS = (
    "cmd_id",
    "kind",
    "batch_id",
    "phase",
    "ack_status",
    "pid",
    "error",
    "received_at",
    "acked_at",
    "ack_note",
)
_SELECT = f"SELECT {', '.join(BASE_COLUMNS)}, via FROM commands"


def _storable(text: str | None) -> str | None:
    """``text`` as valid UTF-8: lone surrogates become ``\\udXXX`` escapes."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
    #: The served host name whose registration delivered it (None: this agent's own).
    via: str | None = None


class CommandLedger:
    """Durable per-command state; one instance per state dir. Not thread-safe."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the ledger, setting a damaged one aside. Raises StateError (no
        restart helps: path and fix in the message) or StateUnavailableError (retry)."""
        self.path = path
        #: Damaged ledgers moved aside: ``{"path", "at", "reason", "salvaged_commands"}``;
        #: ``"earlier": True`` for those an earlier run set aside and nobody removed yet.
        self.recovered_from: list[dict[str, Any]] = earlier_set_aside(path)
        self._conn = self._open()
        self._db = _Statements(self)

    def close(self) -> None:
        """Close the database; idempotent."""
        self._conn.close()

    def _open(self) -> sqlite3.Connection:
        try:
            return _connect(self.path)
        except sqlite3.Error as exc:
            if is_corrupt(exc):
                return self._recover(exc)
            raise self._open_error(exc) from None

    def _open_error(self, exc: BaseException, damaged: BaseException | None = None) -> Exception:
        if is_unwritable(exc):
            return unwritable_error(self.path, "command ledger", exc, damaged=damaged)
        return unavailable_error(self.path, "command ledger", exc, damaged=damaged)

    def _recover(self, exc: BaseException) -> sqlite3.Connection:
        """Replace the damaged ledger with a fresh one holding what could be read of it."""
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self._conn.close()
        copied, kept = swap_in_salvage(
            self.path,
            SCHEMA,
            (("commands", BASE_COLUMNS),),
            what="command ledger",
            damage=exc,
            open_error=self._open_error,
            move_error=StateError,
        )
        try:
            conn = _connect(self.path)
        except sqlite3.Error as again:
            raise self._open_error(again) from None
        entry = {
            "path": str(kept),
            "at": time.time(),
            "reason": str(exc),
            "salvaged_commands": copied["commands"],
        }
        self.recovered_from.append(entry)
        log.error(
            "the command ledger was damaged; it was moved aside and a fresh one started with "
            "what could be read of it (delete the kept file once inspected)",
            kept=str(kept),
            path=str(self.path),
            reason=str(exc),
            salvaged_commands=copied["commands"],
        )
        return conn

    def get(self, cmd_id: str) -> LedgerEntry | None:
        """The entry for ``cmd_id``, or None when this host never saw it."""
        row = self._db.execute(f"{_SELECT} WHERE cmd_id = ?", (cmd_id,)).fetchone()
        return LedgerEntry(*row) if row else None

    def begin(self, cmd_id: str, kind: str, batch_id: str | None, via: str | None = None) -> bool:
        """Claim ``cmd_id`` for acting (phase ``acting``); False if it was claimed before.
        ``via``: the served host name whose registration delivered it (None: our own)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO commands (cmd_id, kind, batch_id, phase, received_at, via)"
            " VALUES (?, ?, ?, 'acting', ?, ?)",
            (cmd_id, _storable(kind), _storable(batch_id), time.time(), via),
        )
        return cursor.rowcount == 1

    def record_result(
        self, cmd_id: str, status: AckStatus, *, pid: int | None = None, error: str | None = None
    ) -> None:
        """Store the outcome to ack (phase ``to_ack``)."""
        self._db.execute(
            "UPDATE commands SET phase = 'to_ack', ack_status = ?, pid = ?, error = ?"
            " WHERE cmd_id = ? AND phase != 'acked'",
            (status, pid, _storable(error), cmd_id),
        )

    def mark_acked(self, cmd_id: str, note: str | None = None) -> None:
        """The server has the ack (phase ``acked``); ``note`` says e.g. 'already acked (409)'."""
        self._db.execute(
            "UPDATE commands SET phase = 'acked', acked_at = ?, ack_note = ? WHERE cmd_id = ?",
            (time.time(), _storable(note), cmd_id),
        )

    def pending_acks(self) -> list[LedgerEntry]:
        """Entries whose result is known but whose ack has not reached the server, oldest first."""
        rows = self._db.execute(f"{_SELECT} WHERE phase = 'to_ack' ORDER BY received_at").fetchall()
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


def _connect(path: Path) -> sqlite3.Connection:
    """Open the ledger and check it (quick check: it is small). Raises sqlite3.Error,
    DamagedDatabaseError when the check finds damage."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        if "via" not in {row[1] for row in db.execute("PRAGMA table_info(commands)")}:
            db.execute("ALTER TABLE commands ADD COLUMN via TEXT")  # a ledger from before it
        problems = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise DamagedDatabaseError("; ".join(problems[:3]))
    except BaseException:
        db.close()
        raise
    return db


class _Result:
    """A statement's rows, all read (so damage shows while the statement runs)."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class _Statements:
    """The ledger's statements: each runs to its end; when SQLite finds the database
    damaged, it is replaced (``CommandLedger._recover``) and the statement runs again."""

    def __init__(self, ledger: CommandLedger) -> None:
        self._ledger = ledger

    def _run(self, sql: str, params: Sequence[Any]) -> _Result:
        cursor = self._ledger._conn.execute(sql, params)
        return _Result(cursor.fetchall(), cursor.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        try:
            return self._run(sql, params)
        except sqlite3.Error as exc:
            if not is_corrupt(exc):
                raise
            self._ledger._conn = self._ledger._recover(exc)
        return self._run(sql, params)
