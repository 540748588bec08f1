"""The outbox's writer thread: the only connection to ``outbox.db``, and every counter.

:class:`OutboxWriter` holds the outbox's state and runs the thread ``argus-outbox``, which
opens the database (setting a damaged one aside, see ``dbrecovery.py``), then serves a
queue of :class:`Put` (events to commit, grouped into one transaction while they keep
arriving) and :class:`Call` (a function to run on the connection, in order with the puts).
It makes room when the cap is reached (dropping the oldest snapshots and log lines, counted
per batch), counts what a refused disk lost and tells each batch once a commit succeeds.
The public async API on top of it is :class:`argus_agent.outbox.Outbox`.

Threads: the methods here run on the writer thread, except ``__init__`` and
``_loop_future`` (on the event loop, when a request is queued; ``_dead_error`` runs on
either). Results reach the event
loop only through ``call_soon_threadsafe``. The counters are changed only on the writer
thread; ``Outbox.stats()`` reads them from the event loop without a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from argus_agent.dbrecovery import (
    earlier_set_aside,
    is_corrupt,
    is_unwritable,
    swap_in_salvage,
    unavailable_error,
    unwritable_error,
)
from argus_agent.errors import AgentError, StateError, StateUnavailableError
from argus_agent.events import EventChunk, EventKind, EventSource, OutEvent, make_event
from argus_agent.logsetup import get_logger
from argus_agent.outbox_rows import (
    DEFAULT_CHUNK_SIZE,
    SALVAGE,
    SCHEMA,
    LogOffset,
    encode_rows,
    event_time,
    source_of,
)
from argus_agent.sqlitetx import transaction

log = get_logger("argus_agent.outbox")  # one logger name for all of the outbox
T = TypeVar("T")

#: At most this many events go into one transaction.
MAX_GROUP_EVENTS = 50_000
DROPPABLE = tuple(k.value for k in EventKind if k.droppable)
#: While notices of lost events wait for a disk that refused them, they are tried this often.
NOTICE_RETRY_S = 2.0
KIND_NAMES = {"snapshot": "resource snapshot(s)", "log": "log line(s)"}


class OutboxError(StateError):
    """The outbox cannot store events: its database cannot be opened or written, or a
    damaged one cannot be moved aside. The message names the path and the fix."""


@dataclass
class Put:
    """Events (and log offsets) to commit; ``future`` is resolved once they are."""

    events: Sequence[OutEvent]
    offsets: Sequence[LogOffset]
    future: asyncio.Future[None]
    chunks: Sequence[EventChunk] = ()


@dataclass
class Call:
    """A function to run on the connection, in order with the puts."""

    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


@dataclass
class Delta:
    """Counter changes of one transaction, applied only once it committed."""

    bytes: int = 0
    queued: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    freed: int = 0  # bytes the dropping made free


@dataclass
class Lost:
    """Events of one batch that a refused put lost, not yet told to the batch."""

    source: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    reason: str = ""


class OutboxWriter:
    """The state of the outbox and its writer thread (see the module doc)."""

    def __init__(self, path: Path, *, max_bytes: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self._queue: queue.SimpleQueue[Put | Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None  # the writer thread's
        self._bytes = 0
        self._queued = 0
        self._dropped: dict[str, int] = {}
        self._lost: dict[str, int] = {}
        self._untold: dict[str, Lost] = {}  # batch id → lost events not yet told (writer)
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
        #: The ``timestamp`` (epoch seconds) of the oldest queued event; None when the
        #: outbox is empty (or that event cannot be read). Re-read after each commit that
        #: may have changed which event is oldest.
        self.oldest_at: float | None = None

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
        self._refresh_oldest()

    def _recover(self, exc: BaseException, *, lost: int | None) -> None:
        """Replace the damaged database: copy out what can be read, move it aside, open the
        copy. ``lost`` is how many events were queued before (None when unknown). Raises
        OutboxError when it cannot be moved aside or the state dir is not writable,
        StateUnavailableError when no fresh one can be written now (a full disk)."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        _copied, kept = swap_in_salvage(
            self.path,
            SCHEMA,
            SALVAGE,
            what="telemetry outbox",
            damage=exc,
            open_error=self._open_error,
            move_error=OutboxError,
        )
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
        pending: Put | Call | None = None
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
            if isinstance(item, Call):
                self._resolve(item.future, item.fn)
                continue
            group = [item]
            rows = len(item.events) + len(item.chunks) * self.chunk_size
            while rows < MAX_GROUP_EVENTS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, Put):
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
            if delta.freed or self.oldest_at is None:  # the oldest was dropped, or none
                self._refresh_oldest()
            for put in group:
                self._succeed(put.future, None)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.changed.set)
            if self._untold:
                self._tell_lost()

    def _write_group(self, db: sqlite3.Connection, group: Sequence[Put]) -> Delta:
        delta = Delta()
        with transaction(db):
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

    def _apply(self, delta: Delta) -> None:
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

    def _refused(self, group: Sequence[Put], exc: BaseException) -> None:
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
                    untold = self._untold[batch_id] = Lost(source_of(body))
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

        def tx(db: sqlite3.Connection) -> Delta:
            delta = Delta()
            with transaction(db):
                self._insert(db, notices, (), delta)
            return delta

        try:
            delta = self._attempt(tx)
        except Exception as exc:
            self._write_failed(exc)
            return
        self._apply(delta)
        if delta.freed or self.oldest_at is None:
            self._refresh_oldest()
        self._untold.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.changed.set)

    def _insert(
        self,
        db: sqlite3.Connection,
        events: Sequence[OutEvent],
        chunks: Sequence[EventChunk],
        delta: Delta,
    ) -> None:
        rows = encode_rows(events, chunks, self.chunk_size)
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

    def _make_room(self, db: sqlite3.Connection, needed: int, delta: Delta) -> None:
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
        with transaction(db):
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
        self._refresh_oldest()

    def _refresh_oldest(self) -> None:
        """Read the time of the oldest queued event (writer thread, after a commit): one
        read of the first row by its primary key. A failed read leaves it unknown (None);
        a damaged file is the next real operation's business."""
        if self._queued <= 0 or self._db is None:
            self.oldest_at = None
            return
        try:
            row = self._db.execute("SELECT bodies FROM events ORDER BY seq LIMIT 1").fetchone()
        except sqlite3.Error:
            row = None
        self.oldest_at = event_time(row[0].split(b"\n", 1)[0]) if row else None

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


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
