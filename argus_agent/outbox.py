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
:class:`StateUnavailableError` (``errors.py``), which the service manager retries.

The outbox is split by concern: this module is the public async API, called from the event
loop (the functions it hands to ``call`` run on the writer thread); ``outbox_writer.py``
owns the writer thread, the connection and the counters; ``outbox_rows.py`` the schema and
how events are encoded as rows; ``dbrecovery.py`` the damaged-file helpers shared with the
command ledger (``ledger.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from argus_agent.events import EventChunk, OutEvent
from argus_agent.logsetup import get_logger
from argus_agent.outbox_rows import DEFAULT_CHUNK_SIZE, Chunk, LogOffset
from argus_agent.outbox_writer import Call, Delta, OutboxError, OutboxWriter, Put
from argus_agent.sqlitetx import transaction

__all__ = ["DEFAULT_CHUNK_SIZE", "Chunk", "LogOffset", "Outbox", "OutboxError", "OutboxStats"]

log = get_logger(__name__)
T = TypeVar("T")


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
    #: The timestamp (epoch seconds) of the oldest queued event; None when none is queued.
    oldest_at: float | None = None


class Outbox(OutboxWriter):
    """A durable, bounded FIFO of encoded events. Start with ``await start()`` in a loop.

    ``Outbox(path, *, max_bytes, chunk_size=100)``: the state (and ``__init__``) lives in
    :class:`OutboxWriter`, which this class puts the async API on.

    For status: ``stats()``, ``write_errors``, ``last_write_error`` (``{"error", "at"}`` or
    None) and ``recovered_from`` (one ``{"path", "at", "reason", ...}`` per damaged database
    set aside, including those earlier runs left).
    """

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
        self._queue.put(Put(events, offsets, future, chunks))
        await future

    # -- consumers -----------------------------------------------------------------------

    async def peek(self, limit: int, *, after: int = 0) -> list[Chunk]:
        """The oldest chunks, as many as hold at most ``limit`` events (at least one); with
        ``after``, the oldest after that chunk seq (those before it are being sent: a sender
        keeping several batches unanswered asks for the next one). The chunks returned count
        as being sent (never dropped to make room) until removed or until the next peek
        without ``after``. An empty answer without ``after`` means the outbox is empty: the
        counters are set to zero."""

        def read(db: sqlite3.Connection) -> list[Chunk]:
            chunks: list[Chunk] = []
            total = 0
            rows = db.execute(
                "SELECT seq, count, event_ids, bodies FROM events WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, limit),
            )
            for seq, count, ids, bodies in rows:
                if chunks and total + count > limit:
                    break
                chunks.append(Chunk(seq, ids.split("\n"), bodies.split(b"\n")))
                total += count
            seqs = {chunk.seq for chunk in chunks}
            self._inflight = self._inflight | seqs if after else seqs
            if after:
                return chunks
            if not chunks and limit > 0 and (self._queued or self._bytes):
                log.warning(
                    "outbox counters disagreed with an empty outbox; set to zero",
                    queued=self._queued,
                    bytes=self._bytes,
                )
                self._queued = self._bytes = 0
                self.oldest_at = None
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
            with transaction(db):
                db.execute(
                    "UPDATE events SET count = ?, size = ?, event_ids = ?, bodies = ? "
                    "WHERE seq = ?",
                    (len(ids), size, "\n".join(ids), joined, chunk.seq),
                )
            self._queued -= row[0] - len(ids)
            self._bytes -= row[1] - size
            self._refresh_oldest()

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
            delta = Delta()
            with transaction(db):
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
            self._queued,
            self._bytes,
            dict(self._dropped),
            dict(self._lost),
            self.write_errors,
            oldest_at=self.oldest_at,
        )

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(db)`` in the writer thread (in order with puts) and return its result.
        A ``fn`` that writes changes counters only after its transaction committed."""
        future = self._loop_future()
        self._queue.put(Call(fn, future))
        return await future
