"""How events lie in ``outbox.db``: its schema, and the encoding of events as rows.

One row of ``events`` holds a run of up to ``chunk_size`` consecutive events of one kind and
batch: their ids and their encoded bodies, each joined by newlines (encoded JSON holds no
raw newline), with the count and the bytes of the bodies beside them. Also owns the two
records that cross the outbox's API in both directions: :class:`LogOffset` (how far a job's
log was read, committed with its lines) and :class:`Chunk` (a row as the sender gets it).

Threads: none of its own, and no state. ``encode_rows`` and ``source_of`` run on the outbox's
writer thread; the frozen dataclasses are built on either side and passed between the event
loop and the writer thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argus_agent.events import EventChunk, OutEvent

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
#: At most this many events share one row.
DEFAULT_CHUNK_SIZE = 100
#: One row of ``events`` as inserted: kind, batch id, count, size, event ids, bodies.
Row = tuple[str, str, int, int, str, bytes]


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


def encode_rows(events: Sequence[OutEvent], chunks: Sequence[EventChunk], step: int) -> list[Row]:
    """The rows holding ``events`` (in runs of at most ``step`` events of one kind and
    batch) and then the already-joined ``chunks``, in order."""
    if events and len({(e.kind, e.batch_id) for e in events}) == 1:
        runs = [events[i : i + step] for i in range(0, len(events), step)]
    else:
        runs = _runs(events, step)
    rows: list[Row] = []
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
    return rows


def source_of(body: bytes) -> dict[str, Any]:
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


def event_time(body: bytes) -> float | None:
    """The ``timestamp`` of one encoded event as epoch seconds (how old the oldest queued
    event is, for status); None when the body cannot be read."""
    try:
        stamp = json.loads(body)["timestamp"]
        return datetime.fromisoformat(stamp).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
