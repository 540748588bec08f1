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
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from argus_agent.errors import StateError
from argus_agent.events import EventChunk, EventKind, OutEvent
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
#: At most this many events go into one transaction.
MAX_GROUP_EVENTS = 50_000
#: At most this many events share one row.
DEFAULT_CHUNK_SIZE = 100
DROPPABLE = tuple(k.value for k in EventKind if k.droppable)


class OutboxError(StateError):
    """The outbox cannot store events (its database could not be opened or broke)."""


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
class OutboxStats:
    """Counters for status."""

    queued: int = 0
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


class Outbox:
    """A durable, bounded FIFO of encoded events. Start with ``await start()`` in a loop."""

    def __init__(self, path: Path, *, max_bytes: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self._queue: queue.SimpleQueue[_Put | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bytes = 0
        self._queued = 0
        self._dropped: dict[str, int] = {}
        self._inflight: set[int] = set()  # chunks of the last peek: being sent, not dropped
        self._dead: BaseException | None = None
        self.changed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database in the writer thread. Raises sqlite3.Error / OSError."""
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

        Raises sqlite3.Error when the disk refuses (the events are then not stored).
        """
        if not events and not offsets and not chunks:
            return
        future = self._loop_future()
        self._queue.put(_Put(events, offsets, future, chunks))
        await future

    # -- consumers -----------------------------------------------------------------------

    async def peek(self, limit: int) -> list[Chunk]:
        """The oldest chunks, as many as hold at most ``limit`` events (at least one)."""

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
            with _transaction(db):
                self._insert(db, [notice])
                for kind, count in counts.items():
                    db.execute(
                        "UPDATE drops SET reported = reported + ? WHERE batch_id = ? AND kind = ?",
                        (count, batch_id, kind),
                    )

        await self.call(tx)

    def stats(self) -> OutboxStats:
        """Counters as of the last commit (cheap, no I/O)."""
        return OutboxStats(self._queued, self._bytes, dict(self._dropped))

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(db)`` in the writer thread (in order with puts) and return its result."""
        future = self._loop_future()
        self._queue.put(_Call(fn, future))
        return await future

    # -- the writer thread ---------------------------------------------------------------

    def _loop_future(self) -> asyncio.Future[Any]:
        if self._dead is not None:
            raise OutboxError(f"the outbox is unusable: {self._dead}") from self._dead
        if self._thread is None or self._loop is None:
            raise RuntimeError("outbox not started")
        return self._loop.create_future()

    def _run(self) -> None:
        """The writer thread. If it fails for good (an unopenable or corrupt database), every
        waiting and later call fails with the reason instead of waiting forever."""
        try:
            self._open_and_serve()
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
                    self._fail(item.future, OutboxError(f"the outbox is unusable: {exc}"))

    def _open_and_serve(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            self._bytes, self._queued = db.execute(
                "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(count), 0) FROM events"
            ).fetchone()
            for kind, count in db.execute("SELECT kind, SUM(count) FROM drops GROUP BY kind"):
                self._dropped[kind] = count
            self._serve(db)
        finally:
            db.close()

    def _serve(self, db: sqlite3.Connection) -> None:
        pending: _Put | _Call | None = None
        while True:
            item = pending or self._queue.get()
            pending = None
            if item is None:
                return
            if isinstance(item, _Call):
                self._resolve(item.future, item.fn, db)
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
                with _transaction(db):
                    for put in group:
                        self._insert(db, put.events, put.chunks)
                        for off in put.offsets:
                            db.execute(
                                "INSERT INTO log_offsets (batch_id, offset, line_no, skipped) "
                                "VALUES (?, ?, ?, ?) ON CONFLICT(batch_id) DO UPDATE SET "
                                "offset = excluded.offset, line_no = excluded.line_no, "
                                "skipped = excluded.skipped",
                                (off.batch_id, off.offset, off.line_no, off.skipped),
                            )
            except Exception as exc:  # the writer must outlive any one bad put
                if not isinstance(exc, sqlite3.Error):
                    log.exception("outbox write failed")
                self._recount(db)
                for put in group:
                    self._fail(put.future, exc)
                continue
            for put in group:
                self._succeed(put.future, None)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.changed.set)

    def _insert(
        self,
        db: sqlite3.Connection,
        events: Sequence[OutEvent],
        chunks: Sequence[EventChunk] = (),
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
        if self._bytes + size > self.max_bytes:
            self._make_room(db, self._bytes + size - self.max_bytes)
        db.executemany(
            "INSERT INTO events (kind, batch_id, count, size, event_ids, bodies) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        self._bytes += size
        self._queued += sum(row[2] for row in rows)

    def _make_room(self, db: sqlite3.Connection, needed: int) -> None:
        """Delete the oldest droppable chunks until ``needed`` bytes are free (or none is
        left to drop), counting their events per batch and kind."""
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
                return
            chosen = []
            counts: dict[tuple[str, str], int] = {}
            for seq, kind, batch_id, count, size in rows:
                chosen.append((seq,))
                counts[(batch_id, kind)] = counts.get((batch_id, kind), 0) + count
                freed += size
                self._bytes -= size
                self._queued -= count
                if freed >= needed:
                    break
            db.executemany("DELETE FROM events WHERE seq = ?", chosen)
            for (batch_id, kind), count in counts.items():
                db.execute(
                    "INSERT INTO drops (batch_id, kind, count) VALUES (?, ?, ?) ON CONFLICT"
                    "(batch_id, kind) DO UPDATE SET count = count + excluded.count",
                    (batch_id, kind, count),
                )
                self._dropped[kind] = self._dropped.get(kind, 0) + count
        log.warning(
            "outbox full: dropped the oldest snapshots and log lines",
            freed_bytes=freed,
            max_bytes=self.max_bytes,
        )

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

    def _recount(self, db: sqlite3.Connection) -> None:
        self._bytes, self._queued = db.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(count), 0) FROM events"
        ).fetchone()

    def _resolve(
        self,
        future: asyncio.Future[Any],
        fn: Callable[[sqlite3.Connection], Any],
        db: sqlite3.Connection,
    ) -> None:
        try:
            result = fn(db)
        except Exception as exc:
            self._fail(future, exc)
        else:
            self._succeed(future, result)

    def _succeed(self, future: asyncio.Future[Any], result: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_result, future, result)

    def _fail(self, future: asyncio.Future[Any], exc: BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_exception, future, exc)


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
    alone would commit, and fsync, every statement on its own)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
