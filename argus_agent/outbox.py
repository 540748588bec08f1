"""The durable outbox: every event goes here first, and leaves only once Argus has it.

SQLite in WAL mode (``<state_dir>/outbox.db``), owned by one writer thread so the event loop
never waits on disk. Events are stored in order as small chunks: one row holds a run of up to
``chunk_size`` (100) consecutive events of one kind and batch, so that 100,000 log lines a
second cost SQLite 1,000 rows, not 100,000. Producers ``await put(...)``, which returns once
the events are committed with ``synchronous=FULL`` (fsynced). Puts that arrive while a commit
runs are committed together (group commit), so throughput stays high without a timer.

Durability: an event whose ``put`` returned survives an agent crash and a power cut. The
worst-case loss on a power cut is what was handed to ``put`` but not yet committed: the puts
queued during one commit (a few milliseconds of events), whose producers were not yet told
they are durable. Log lines are committed together with their log file offset, so after any
crash the tailer resumes exactly after the last committed line: nothing lost, nothing twice.

Bounded: the events' bytes are capped (``max_bytes``). When a put would pass the cap, the
oldest resource snapshots and log lines are dropped first, and counted per batch (the count
is reported in status and to the batch as a notice); lifecycle events and notices are never
dropped, even if that means passing the cap.

Counters are true: ``stats()`` changes only once a transaction committed. A commit the disk
refuses (full, I/O error) changes no counter and drops nothing; it is counted
(``write_errors``, ``last_write_error``). Events of a refused put that no producer sends
again (resource snapshots; log lines are read again from the committed log offset,
lifecycle events and notices are retried by their owners) are counted as ``lost`` per kind,
and once a commit succeeds again each batch that lost some gets one notice saying so. An
empty read resets the counts to zero: an empty outbox always reads as idle.

Damaged file: a database SQLite reports as corrupt (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``),
at start-up or later, is moved aside as ``outbox.db.corrupt-<UTC time>`` (with its ``-wal``),
kept for inspection and named in the log; what can still be read of it (queued events, log
offsets, drop counts) is copied into a fresh ``outbox.db``, which replaces it. Each such
recovery is listed in ``recovered_from`` (and in status) until the kept file is deleted. A
state dir the agent cannot write raises :class:`OutboxError` (a StateError, not retried)
naming the path and the fix; other start-up failures (a full disk) raise
:class:`StateUnavailableError`, which the service manager retries.

The helpers for damaged SQLite files (``is_corrupt``, ``set_aside``, ``salvage_copy``...) are
shared with the command ledger (``ledger.py``).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import os
import pwd
import queue
import shutil
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from argus_agent.errors import AgentError, StateError
from argus_agent.events import EventChunk, EventKind, EventSource, OutEvent, make_event
from argus_agent.logsetup import get_logger

log = get_logger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq       INTEGER PRIMARY KEY,  -- insertion order (the rowid)
    kind      TEXT NOT NULL,
    batch_id  TEXT NOT NULL,
    count     INTEGER NOT NULL,     -- events in this chunk
    size      INTEGER NOT NULL,     -- bytes of their bodies
    event_ids TEXT NOT NULL,        -- newline-separated
    bodies    BLOB NOT NULL         -- newline-separated (encoded JSON holds no raw newline)
);
CREATE TABLE IF NOT EXISTS log_offsets (
    batch_id TEXT PRIMARY KEY,
    offset   INTEGER NOT NULL,
    line_no  INTEGER NOT NULL,
    skipped  INTEGER NOT NULL DEFAULT 0  -- lines over the rate cap not yet reported
);
CREATE TABLE IF NOT EXISTS drops (
    batch_id TEXT NOT NULL,
    kind     TEXT NOT NULL,
    count    INTEGER NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, kind)
);
"""
#: The tables (and their columns) copied out of a damaged outbox into a fresh one.
SALVAGE = (
    ("events", ("seq", "kind", "batch_id", "count", "size", "event_ids", "bodies")),
    ("log_offsets", ("batch_id", "offset", "line_no", "skipped")),
    ("drops", ("batch_id", "kind", "count", "reported")),
)
#: Rows copied out of a damaged database per transaction.
SALVAGE_BATCH = 1000
#: At most this many events go into one transaction.
MAX_GROUP_EVENTS = 50_000
#: At most this many events share one row.
DEFAULT_CHUNK_SIZE = 100
DROPPABLE = tuple(k.value for k in EventKind if k.droppable)
#: While notices of lost events wait for a disk that refused them, they are tried this often.
NOTICE_RETRY_S = 2.0
KIND_NAMES = {"snapshot": "resource snapshot(s)", "log": "log line(s)"}

# -- damaged and unwritable SQLite files (shared with the command ledger) ----------------------

#: SQLite primary result codes saying the database file itself is damaged.
CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
#: ... saying the file or its directory cannot be opened or written: a restart cannot help.
UNWRITABLE_CODES = frozenset({3, 8, 14, 23})  # PERM, READONLY, CANTOPEN, AUTH
#: The name of a set-aside copy: ``<name>.corrupt-<UTC time>``.
SET_ASIDE_TAG = ".corrupt-"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


class OutboxError(StateError):
    """The outbox cannot store events: its database cannot be opened or written, or a
    damaged one cannot be moved aside. The message names the path and the fix."""


class StateUnavailableError(AgentError):
    """A state database cannot be used right now (disk full, I/O error). Not a state-dir
    problem that needs a person: the service manager restarts the agent (exit 1), which
    tries again. The message names the path."""

    exit_code = 1
    transient = True


class DamagedDatabaseError(sqlite3.DatabaseError):
    """A database that opens but fails SQLite's integrity check."""


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an error (None when it carries none)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged (moving it aside is the cure)."""
    return isinstance(exc, DamagedDatabaseError) or sqlite_code(exc) in CORRUPT_CODES


def is_unwritable(exc: BaseException) -> bool:
    """Whether ``exc`` says the file or its directory may not be opened or written."""
    return sqlite_code(exc) in UNWRITABLE_CODES


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def unwritable_error(
    path: Path,
    what: str,
    exc: BaseException,
    cls: type[StateError] = StateError,
    *,
    damaged: BaseException | None = None,
) -> StateError:
    """The StateError for a state database the agent may not open or write (``damaged``:
    the reason a damaged one was to be replaced)."""
    problem = (
        f"the {what} is damaged ({damaged}) and no fresh one can be written: {exc}"
        if damaged is not None
        else f"cannot open the {what}: {exc}"
    )
    return cls(
        f"{path}: {problem}; fix: make {path.parent} and the files in it writable by "
        f"{_user()} (check their owner and mode, and that the filesystem is mounted "
        "read-write), or set agent.state_dir to a directory that is, then start the agent "
        "again"
    )


def unavailable_error(
    path: Path, what: str, exc: BaseException, *, damaged: BaseException | None = None
) -> StateUnavailableError:
    """The retryable error for a state database that failed for another reason."""
    problem = (
        f"the {what} is damaged ({damaged}) and cannot be replaced now"
        if damaged is not None
        else f"cannot use the {what} now"
    )
    return StateUnavailableError(
        f"{path}: {problem}: {exc}; the agent tries again when restarted (check the free "
        f"space and health of the disk holding {path.parent})"
    )


def set_aside(path: Path, *, now: float | None = None) -> Path:
    """Rename a damaged database (and its ``-wal`` / ``-shm``) to ``<name>.corrupt-<UTC
    time>`` next to it, so that a fresh one can take its place; returns the new path.
    Raises OSError when it cannot be moved."""
    stamp = time.strftime(STAMP_FORMAT, time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}{SET_ASIDE_TAG}{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_TAG}{stamp}-{number}")
    os.rename(path, target)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        try:
            os.rename(side, Path(f"{target}{suffix}"))
        except FileNotFoundError:
            continue
        except OSError:
            side.unlink()  # never leave an old log beside the fresh database
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target


def earlier_set_aside(path: Path) -> list[dict[str, Any]]:
    """The damaged copies of ``path`` that earlier runs set aside and nobody removed yet."""
    found = []
    with contextlib.suppress(OSError):
        for kept in sorted(path.parent.glob(f"{path.name}{SET_ASIDE_TAG}*")):
            if kept.name.endswith(("-wal", "-shm")):
                continue
            stamp = kept.name[len(path.name) + len(SET_ASIDE_TAG) :][:16]
            try:
                at = float(calendar.timegm(time.strptime(stamp, STAMP_FORMAT)))
            except ValueError:
                at = kept.stat().st_mtime
            found.append(
                {
                    "path": str(kept),
                    "at": at,
                    "reason": "set aside by an earlier run of the agent (its log says why); "
                    "delete it once inspected",
                    "earlier": True,
                }
            )
    return found


def salvage_copy(
    source: Path,
    target: Path,
    schema: str,
    tables: Sequence[tuple[str, Sequence[str] | None]],
) -> dict[str, int]:
    """Create a fresh database at ``target`` with ``schema`` and copy into it, table by
    table, the rows of the damaged ``source`` that can still be read (each table up to its
    first unreadable row; ``None`` columns: those of the fresh table). Returns the rows
    copied per table. Raises sqlite3.Error when ``target`` cannot be written."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):  # a leftover of an interrupted recovery
            os.unlink(f"{target}{suffix}")
    copied = {name: 0 for name, _ in tables}
    padded = _padded_copy(source, Path(f"{target}.salvage"))
    fresh = sqlite3.connect(target, isolation_level=None)
    try:
        fresh.execute("PRAGMA journal_mode=WAL")
        fresh.execute("PRAGMA synchronous=FULL")
        fresh.executescript(schema)
        try:
            old = sqlite3.connect(
                f"file:{urllib.parse.quote(str(padded or source))}?mode=ro",
                uri=True,
                isolation_level=None,
            )
        except sqlite3.Error:
            return copied
        try:
            for name, wanted in tables:
                columns = wanted or [r[1] for r in fresh.execute(f"PRAGMA table_info({name})")]
                cols = ", ".join(columns)
                marks = ", ".join("?" * len(columns))
                insert = f"INSERT OR IGNORE INTO {name} ({cols}) VALUES ({marks})"
                try:
                    rows = old.execute(f"SELECT {cols} FROM {name}")
                except sqlite3.Error:
                    continue  # nothing of this table can be read
                readable = True
                while readable:
                    batch = []
                    while len(batch) < SALVAGE_BATCH:
                        try:
                            row = next(rows, None)
                        except sqlite3.Error:
                            row = None  # the damaged source ends here: keep what was read
                        if row is None:
                            readable = False
                            break
                        batch.append(row)
                    with _transaction(fresh):  # a failing fresh copy raises
                        fresh.executemany(insert, batch)
                    copied[name] += len(batch)
        finally:
            old.close()
    finally:
        fresh.close()
        if padded is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{padded}{suffix}")
    return copied


def _padded_copy(source: Path, copy: Path) -> Path | None:
    """A copy of a truncated database grown back to the size its header names (zeros at
    the end), which SQLite will read up to the missing pages; it refuses the truncated file
    as a whole. None when ``source`` is not truncated or no copy can be made."""
    try:
        with open(source, "rb") as handle:
            header = handle.read(100)
            size = os.fstat(handle.fileno()).st_size
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return None
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        valid = header[24:28] == header[92:96]  # the in-header size is current
        if not valid or pages * page_size <= size:
            return None
        shutil.copyfile(source, copy)
        os.truncate(copy, pages * page_size)
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(f"{source}-wal", f"{copy}-wal")
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(copy)
        return None
    return copy


@dataclass(frozen=True)
class LogOffset:
    """How far a job's log has been turned into events (committed with those events)."""

    batch_id: str
    offset: int
    line_no: int
    skipped: int = 0


@dataclass(frozen=True)
class Chunk:
    """A run of queued events, sent and removed together."""

    seq: int
    event_ids: list[str]
    bodies: list[bytes]


@dataclass
class _Put:
    events: Sequence[OutEvent]
    offsets: Sequence[LogOffset]
    future: asyncio.Future[None]
    chunks: Sequence[EventChunk] = ()


@dataclass
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


@dataclass
class _Delta:
    """Counter changes of one transaction, applied only once it committed."""

    bytes: int = 0
    queued: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    freed: int = 0  # bytes the dropping made free


@dataclass
class _Lost:
    """Events of one batch that a refused put lost, not yet told to the batch."""

    source: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    reason: str = ""


@dataclass
class OutboxStats:
    """Counters for status."""

    queued: int = 0
    bytes: int = 0
    #: Events dropped because the outbox was full (``max_bytes``), per kind.
    dropped: dict[str, int] = field(default_factory=dict)
    #: Events lost because the disk refused to store them (full, I/O error), per kind.
    lost: dict[str, int] = field(default_factory=dict)
    #: Database operations the disk refused since start-up.
    write_errors: int = 0


class Outbox:
    """A durable, bounded FIFO of encoded events. Start with ``await start()`` in a loop.

    For status: ``stats()``, ``write_errors``, ``last_write_error`` (``{"error", "at"}`` or
    None) and ``recovered_from`` (one ``{"path", "at", "reason", ...}`` per damaged database
    set aside, including those earlier runs left).
    """

    def __init__(self, path: Path, *, max_bytes: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self._queue: queue.SimpleQueue[_Put | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None  # the writer thread's
        self._bytes = 0
        self._queued = 0
        self._dropped: dict[str, int] = {}
        self._lost: dict[str, int] = {}
        self._untold: dict[str, _Lost] = {}  # batch id → lost events not yet told (writer)
        self._inflight: set[int] = set()  # chunks of the last peek: being sent, not dropped
        self._dead: BaseException | None = None
        self.changed = asyncio.Event()
        #: Database operations the disk refused (full, I/O error) since start-up.
        self.write_errors = 0
        #: The last of them: ``{"error": str, "at": epoch seconds}``.
        self.last_write_error: dict[str, Any] | None = None
        #: Damaged databases moved aside: ``{"path", "at", "reason", "salvaged_events",
        #: "lost_events"}`` (``lost_events`` None when unknown); ``"earlier": True`` for those
        #: an earlier run set aside.
        self.recovered_from: list[dict[str, Any]] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database in the writer thread (setting a damaged one aside). Raises
        OutboxError (no restart helps: path and fix in the message) or
        StateUnavailableError (retry later)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="argus-outbox", daemon=True)
        self._thread.start()
        await self.call(lambda db: None)

    async def close(self) -> None:
        """Finish what is queued, then stop the writer thread; idempotent."""
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- producers -----------------------------------------------------------------------

    async def put(
        self,
        events: Sequence[OutEvent],
        offsets: Sequence[LogOffset] = (),
        *,
        chunks: Sequence[EventChunk] = (),
    ) -> None:
        """Append events (single, and already-joined ``chunks`` of at most ``chunk_size``
        events) and log offsets durably; returns once committed.

        Raises sqlite3.Error when the disk refuses (the events are then not stored, and
        counted as lost unless they carry log offsets, i.e. will be read again).
        """
        if not events and not offsets and not chunks:
            return
        future = self._loop_future()
        self._queue.put(_Put(events, offsets, future, chunks))
        await future

    # -- consumers -----------------------------------------------------------------------

    async def peek(self, limit: int) -> list[Chunk]:
        """The oldest chunks, as many as hold at most ``limit`` events (at least one). An
        empty answer means the outbox is empty: the counters are set to zero."""

        def read(db: sqlite3.Connection) -> list[Chunk]:
            chunks: list[Chunk] = []
            total = 0
            rows = db.execute(
                "SELECT seq, count, event_ids, bodies FROM events ORDER BY seq LIMIT ?", (limit,)
            )
            for seq, count, ids, bodies in rows:
                if chunks and total + count > limit:
                    break
                chunks.append(Chunk(seq, ids.split("\n"), bodies.split(b"\n")))
                total += count
            self._inflight = {chunk.seq for chunk in chunks}
            if not chunks and limit > 0 and (self._queued or self._bytes):
                log.warning(
                    "outbox counters disagreed with an empty outbox; set to zero",
                    queued=self._queued,
                    bytes=self._bytes,
                )
                self._queued = self._bytes = 0
            return chunks

        return await self.call(read)

    async def remove(self, seqs: Sequence[int]) -> None:
        """Forget chunks whose every event the server has (accepted, de-duplicated, or
        rejected for good)."""
        if seqs:
            await self.call(lambda db: self._remove(db, seqs))

    async def trim(self, chunk: Chunk, settled: int) -> None:
        """Forget the first ``settled`` events of a chunk (the server has them), keeping the
        rest queued, e.g. when sending it one event at a time was interrupted."""
        if settled <= 0:
            return
        if settled >= len(chunk.event_ids):
            await self.remove([chunk.seq])
            return
        ids, bodies = chunk.event_ids[settled:], chunk.bodies[settled:]
        joined = b"\n".join(bodies)
        size = len(joined) - len(bodies) + 1

        def tx(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT count, size FROM events WHERE seq = ?", (chunk.seq,)
            ).fetchone()
            if row is None:
                return
            with _transaction(db):
                db.execute(
                    "UPDATE events SET count = ?, size = ?, event_ids = ?, bodies = ? "
                    "WHERE seq = ?",
                    (len(ids), size, "\n".join(ids), joined, chunk.seq),
                )
            self._queued -= row[0] - len(ids)
            self._bytes -= row[1] - size

        await self.call(tx)

    async def log_offsets(self) -> dict[str, LogOffset]:
        """Every job's committed log offset."""
        rows = await self.call(
            lambda db: db.execute(
                "SELECT batch_id, offset, line_no, skipped FROM log_offsets"
            ).fetchall()
        )
        return {b: LogOffset(b, o, n, k) for b, o, n, k in rows}

    async def forget_log_offset(self, batch_id: str) -> None:
        """Drop a job's offset once its log is fully read and its job pruned."""
        await self.call(
            lambda db: db.execute("DELETE FROM log_offsets WHERE batch_id = ?", (batch_id,))
        )

    async def unreported_drops(self) -> dict[str, dict[str, int]]:
        """batch id → kind → events dropped and not yet told to the batch."""
        rows = await self.call(
            lambda db: db.execute(
                "SELECT batch_id, kind, count - reported FROM drops WHERE count > reported"
            ).fetchall()
        )
        found: dict[str, dict[str, int]] = {}
        for batch_id, kind, count in rows:
            found.setdefault(batch_id, {})[kind] = count
        return found

    async def mark_drops_reported(
        self, batch_id: str, counts: dict[str, int], notice: OutEvent
    ) -> None:
        """Queue the notice telling a batch of its drops, and remember it was told (one
        transaction, so the notice is sent exactly once)."""

        def tx(db: sqlite3.Connection) -> None:
            delta = _Delta()
            with _transaction(db):
                self._insert(db, [notice], (), delta)
                for kind, count in counts.items():
                    db.execute(
                        "UPDATE drops SET reported = reported + ? WHERE batch_id = ? AND kind = ?",
                        (count, batch_id, kind),
                    )
            self._apply(delta)

        await self.call(tx)

    def stats(self) -> OutboxStats:
        """Counters as of the last commit (cheap, no I/O)."""
        return OutboxStats(
            self._queued, self._bytes, dict(self._dropped), dict(self._lost), self.write_errors
        )

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(db)`` in the writer thread (in order with puts) and return its result.
        A ``fn`` that writes changes counters only after its transaction committed."""
        future = self._loop_future()
        self._queue.put(_Call(fn, future))
        return await future

    # -- the writer thread ---------------------------------------------------------------

    def _loop_future(self) -> asyncio.Future[Any]:
        if self._dead is not None:
            raise self._dead_error() from self._dead
        if self._thread is None or self._loop is None:
            raise RuntimeError("outbox not started")
        return self._loop.create_future()

    def _dead_error(self) -> AgentError:
        dead = self._dead
        if isinstance(dead, OutboxError | StateUnavailableError):
            return type(dead)(str(dead))
        return OutboxError(f"the outbox is unusable: {dead}")

    def _run(self) -> None:
        """The writer thread. If the database cannot be opened, every waiting and later
        call fails with the reason instead of waiting forever."""
        try:
            self.recovered_from.extend(earlier_set_aside(self.path))
            self._open()
            self._serve()
        except BaseException as exc:
            self._dead = exc
            log.error(
                "the outbox failed; telemetry events cannot be stored",
                path=str(self.path),
                error=str(exc),
            )
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._fail(item.future, self._dead_error())
        finally:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _open(self) -> None:
        """Open the database; a damaged one is set aside and replaced (see the module doc)."""
        try:
            self._connect()
        except sqlite3.Error as exc:
            if not is_corrupt(exc):
                raise self._open_error(exc) from None
            self._recover(exc, lost=None)

    def _open_error(self, exc: BaseException, damaged: BaseException | None = None) -> AgentError:
        if is_unwritable(exc):
            return unwritable_error(
                self.path, "telemetry outbox", exc, OutboxError, damaged=damaged
            )
        return unavailable_error(self.path, "telemetry outbox", exc, damaged=damaged)

    def _connect(self) -> None:
        """Open ``self.path`` and load the counters from it."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            size, queued = db.execute(
                "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(count), 0) FROM events"
            ).fetchone()
            dropped = dict(db.execute("SELECT kind, SUM(count) FROM drops GROUP BY kind"))
        except BaseException:
            db.close()
            raise
        self._db = db
        self._bytes, self._queued, self._dropped = size, queued, dropped
        self._inflight = set()

    def _recover(self, exc: BaseException, *, lost: int | None) -> None:
        """Replace the damaged database: copy out what can be read, move it aside, open the
        copy. ``lost`` is how many events were queued before (None when unknown). Raises
        OutboxError when it cannot be moved aside or the state dir is not writable,
        StateUnavailableError when no fresh one can be written now (a full disk)."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        fresh = self.path.with_name(f"{self.path.name}.new")
        try:
            salvage_copy(self.path, fresh, SCHEMA, SALVAGE)
        except sqlite3.Error as write_error:
            raise self._open_error(write_error, exc) from None
        try:
            kept = set_aside(self.path)
            os.replace(fresh, self.path)
        except OSError as move_error:
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise OutboxError(
                f"{self.path}: the telemetry outbox is damaged ({exc}) and cannot be moved "
                f"aside ({move_error.strerror or move_error}); fix: move or delete {self.path} "
                f"(and {self.path.name}-wal, {self.path.name}-shm beside it) by hand, then "
                "start the agent again"
            ) from None
        try:
            self._connect()
        except sqlite3.Error as again:
            raise self._open_error(again, exc) from None
        salvaged = self._queued  # what the fresh copy holds
        entry = {
            "path": str(kept),
            "at": time.time(),
            "reason": str(exc),
            "salvaged_events": salvaged,
            "lost_events": None if lost is None else max(lost - salvaged, 0),
        }
        self.recovered_from.append(entry)
        log.error(
            "the telemetry outbox was damaged; it was moved aside and a fresh one started "
            "with what could be read of it (delete the kept file once inspected)",
            kept=str(kept),
            path=str(self.path),
            reason=str(exc),
            salvaged_events=salvaged,
            lost_events=entry["lost_events"],
        )

    def _attempt(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(db)``; when the database turns out damaged, recover and try once more."""
        assert self._db is not None
        try:
            return fn(self._db)
        except sqlite3.Error as exc:
            if not is_corrupt(exc):
                raise
            try:
                self._recover(exc, lost=self._queued)
            except BaseException:
                if self._db is None:  # keep serving: the next call tries again
                    self._db = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False
                    )
                raise
        assert self._db is not None
        return fn(self._db)

    def _serve(self) -> None:
        pending: _Put | _Call | None = None
        while True:
            if pending is not None:
                item, pending = pending, None
            elif self._untold:
                try:
                    item = self._queue.get(timeout=NOTICE_RETRY_S)
                except queue.Empty:
                    self._tell_lost()
                    continue
            else:
                item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _Call):
                self._resolve(item.future, item.fn)
                continue
            group = [item]
            rows = len(item.events) + len(item.chunks) * self.chunk_size
            while rows < MAX_GROUP_EVENTS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, _Put):
                    pending = nxt
                    break
                group.append(nxt)
                rows += len(nxt.events) + len(nxt.chunks) * self.chunk_size
            try:
                delta = self._attempt(lambda db, group=group: self._write_group(db, group))
            except Exception as exc:  # the writer must outlive any one bad put
                if not isinstance(exc, sqlite3.Error | AgentError):
                    log.exception("outbox write failed")
                self._refused(group, exc)
                for put in group:
                    self._fail(put.future, exc)
                continue
            self._apply(delta)
            for put in group:
                self._succeed(put.future, None)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.changed.set)
            if self._untold:
                self._tell_lost()

    def _write_group(self, db: sqlite3.Connection, group: Sequence[_Put]) -> _Delta:
        delta = _Delta()
        with _transaction(db):
            for put in group:
                self._insert(db, put.events, put.chunks, delta)
                for off in put.offsets:
                    db.execute(
                        "INSERT INTO log_offsets (batch_id, offset, line_no, skipped) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT(batch_id) DO UPDATE SET "
                        "offset = excluded.offset, line_no = excluded.line_no, "
                        "skipped = excluded.skipped",
                        (off.batch_id, off.offset, off.line_no, off.skipped),
                    )
        return delta

    def _apply(self, delta: _Delta) -> None:
        """Count a committed transaction."""
        self._bytes += delta.bytes
        self._queued += delta.queued
        for kind, count in delta.dropped.items():
            self._dropped[kind] = self._dropped.get(kind, 0) + count
        if delta.freed:
            log.warning(
                "outbox full: dropped the oldest snapshots and log lines",
                freed_bytes=delta.freed,
                max_bytes=self.max_bytes,
            )

    def _write_failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        self.last_write_error = {"error": str(exc), "at": time.time()}

    def _refused(self, group: Sequence[_Put], exc: BaseException) -> None:
        """Count a group of puts the disk refused; remember the events no producer sends
        again (those without log offsets) to tell their batches once a commit succeeds."""
        self._write_failed(exc)
        lost = 0
        for put in group:
            if put.offsets:
                continue  # log lines: the tailer reads them again from the committed offset
            runs: list[tuple[str, str, int, bytes]] = [
                (e.kind.value, e.batch_id, 1, e.body) for e in put.events if e.kind.droppable
            ]
            runs += [
                (c.kind.value, c.batch_id, len(c.event_ids), c.bodies.split(b"\n", 1)[0])
                for c in put.chunks
                if c.kind.droppable
            ]
            for kind, batch_id, count, body in runs:
                self._lost[kind] = self._lost.get(kind, 0) + count
                lost += count
                untold = self._untold.get(batch_id)
                if untold is None:
                    untold = self._untold[batch_id] = _Lost(_source_of(body))
                untold.counts[kind] = untold.counts.get(kind, 0) + count
                untold.reason = str(exc)
        log.warning(
            "the disk refused to store events"
            + ("; those that are not sent again are counted as lost" if lost else ""),
            path=str(self.path),
            error=str(exc),
            lost=lost,
        )

    def _tell_lost(self) -> None:
        """Queue one notice per batch that lost events to a refused put (writer thread)."""
        notices = []
        for batch_id, untold in self._untold.items():
            what = ", ".join(
                f"{n} {KIND_NAMES.get(k, k)}" for k, n in sorted(untold.counts.items())
            )
            text = (
                f"[argus-agent] {what} of this batch were lost: the agent could not store them "
                f"({untold.reason}); lifecycle events and log lines are kept"
            )
            source = EventSource(
                project=str(untold.source.get("project") or ""),
                host=str(untold.source.get("host") or ""),
                user=untold.source.get("user"),
                command=untold.source.get("command"),
            )
            data = {"line": text, "message": text, "level": "warning", "stream": "agent"}
            notices.append(make_event("log_line", EventKind.NOTICE, batch_id, source, data))

        def tx(db: sqlite3.Connection) -> _Delta:
            delta = _Delta()
            with _transaction(db):
                self._insert(db, notices, (), delta)
            return delta

        try:
            delta = self._attempt(tx)
        except Exception as exc:
            self._write_failed(exc)
            return
        self._apply(delta)
        self._untold.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.changed.set)

    def _insert(
        self,
        db: sqlite3.Connection,
        events: Sequence[OutEvent],
        chunks: Sequence[EventChunk],
        delta: _Delta,
    ) -> None:
        step = self.chunk_size
        if events and len({(e.kind, e.batch_id) for e in events}) == 1:
            runs = [events[i : i + step] for i in range(0, len(events), step)]
        else:
            runs = _runs(events, step)
        rows = []
        for run in runs:
            bodies = b"\n".join([e.body for e in run])
            rows.append(
                (
                    run[0].kind.value,
                    run[0].batch_id,
                    len(run),
                    len(bodies) - len(run) + 1,
                    "\n".join([e.event_id for e in run]),
                    bodies,
                )
            )
        for chunk in chunks:
            count = len(chunk.event_ids)
            rows.append(
                (
                    chunk.kind.value,
                    chunk.batch_id,
                    count,
                    len(chunk.bodies) - count + 1,
                    "\n".join(chunk.event_ids),
                    chunk.bodies,
                )
            )
        size = sum(row[3] for row in rows)
        current = self._bytes + delta.bytes
        if current + size > self.max_bytes:
            self._make_room(db, current + size - self.max_bytes, delta)
        db.executemany(
            "INSERT INTO events (kind, batch_id, count, size, event_ids, bodies) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        delta.bytes += size
        delta.queued += sum(row[2] for row in rows)

    def _make_room(self, db: sqlite3.Connection, needed: int, delta: _Delta) -> None:
        """Delete the oldest droppable chunks until ``needed`` bytes are free (or none is
        left to drop), counting their events per batch and kind (in ``delta``)."""
        freed = 0
        marks = ",".join("?" * len(DROPPABLE))
        while freed < needed:
            rows = [
                row
                for row in db.execute(
                    f"SELECT seq, kind, batch_id, count, size FROM events WHERE kind IN ({marks}) "
                    "ORDER BY seq LIMIT ?",
                    (*DROPPABLE, 100 + len(self._inflight)),
                ).fetchall()
                if row[0] not in self._inflight  # being sent right now: not lost, not dropped
            ]
            if not rows:
                break
            chosen = []
            counts: dict[tuple[str, str], int] = {}
            for seq, kind, batch_id, count, size in rows:
                chosen.append((seq,))
                counts[(batch_id, kind)] = counts.get((batch_id, kind), 0) + count
                freed += size
                delta.bytes -= size
                delta.queued -= count
                if freed >= needed:
                    break
            db.executemany("DELETE FROM events WHERE seq = ?", chosen)
            for (batch_id, kind), count in counts.items():
                db.execute(
                    "INSERT INTO drops (batch_id, kind, count) VALUES (?, ?, ?) ON CONFLICT"
                    "(batch_id, kind) DO UPDATE SET count = count + excluded.count",
                    (batch_id, kind, count),
                )
                delta.dropped[kind] = delta.dropped.get(kind, 0) + count
        delta.freed += freed

    def _remove(self, db: sqlite3.Connection, seqs: Sequence[int]) -> None:
        total = count = 0
        with _transaction(db):
            for start in range(0, len(seqs), 500):
                chunk = list(seqs[start : start + 500])
                marks = ",".join("?" * len(chunk))
                size, found = db.execute(
                    f"SELECT COALESCE(SUM(size), 0), COALESCE(SUM(count), 0) FROM events "
                    f"WHERE seq IN ({marks})",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM events WHERE seq IN ({marks})", chunk)
                total += size
                count += found
        self._bytes -= total
        self._queued -= count
        self._inflight.difference_update(seqs)

    def _resolve(
        self, future: asyncio.Future[Any], fn: Callable[[sqlite3.Connection], Any]
    ) -> None:
        try:
            result = self._attempt(fn)
        except Exception as exc:
            if isinstance(exc, sqlite3.Error):
                self._write_failed(exc)
            self._fail(future, exc)
        else:
            self._succeed(future, result)

    def _succeed(self, future: asyncio.Future[Any], result: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_result, future, result)

    def _fail(self, future: asyncio.Future[Any], exc: BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_exception, future, exc)


def _source_of(body: bytes) -> dict[str, Any]:
    """The ``source`` block of an encoded event (empty when it cannot be read)."""
    try:
        source = json.loads(body).get("source")
    except (ValueError, AttributeError):
        return {}
    return source if isinstance(source, dict) else {}


def _runs(events: Sequence[OutEvent], step: int) -> list[Sequence[OutEvent]]:
    """Split ``events`` into runs of at most ``step`` events of one kind and batch."""
    runs: list[Sequence[OutEvent]] = []
    start = 0
    while start < len(events):
        first = events[start]
        end = start + 1
        while (
            end < len(events)
            and end - start < step
            and events[end].kind is first.kind
            and events[end].batch_id == first.batch_id
        ):
            end += 1
        runs.append(events[start:end])
        start = end
    return runs


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction (the connection is in autocommit mode, where ``with db``
    alone would commit, and fsync, every statement on its own). A failed COMMIT is rolled
    back when SQLite left the transaction open, so nothing of it stays visible."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
