"""Argus event envelopes (schema 1.1), built when an event is created. Pure.

Each event gets its ``event_id`` here, once, so every later resend (after a lost answer, an
outage or an agent restart) carries the same id and Argus de-duplicates it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

SCHEMA_VERSION = "1.1"


class EventKind(StrEnum):
    """How the outbox treats an event when it is full."""

    LIFECYCLE = "lifecycle"  # batch_done / batch_failed: never dropped
    NOTICE = "notice"  # the agent telling a batch something (e.g. drops): never dropped
    SNAPSHOT = "snapshot"  # resource_snapshot: dropped first when full
    LOG = "log"  # log_line: dropped first when full

    @property
    def droppable(self) -> bool:
        """Whether a full outbox may drop events of this kind."""
        return self in (EventKind.SNAPSHOT, EventKind.LOG)


class OutEvent(NamedTuple):
    """One encoded event waiting in the outbox (a tuple: log tailing makes many)."""

    event_id: str
    kind: EventKind
    batch_id: str
    body: bytes


class EventChunk(NamedTuple):
    """A run of encoded events of one kind and batch, already joined as the outbox stores
    them (bodies separated by ``\\n``): how log tailing hands over many lines cheaply."""

    kind: EventKind
    batch_id: str
    event_ids: list[str]
    bodies: bytes


@dataclass(frozen=True)
class EventSource:
    """The ``source`` block shared by a job's events."""

    project: str
    host: str
    user: str | None = None
    command: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (absent fields left out)."""
        data: dict[str, Any] = {"project": self.project, "host": self.host}
        if self.user:
            data["user"] = self.user
        if self.command:
            data["command"] = self.command[:4096]
        return data


def utc_timestamp(epoch: float | None = None) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``."""
    moment = datetime.now(UTC) if epoch is None else datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def envelope_head(event_type: str, batch_id: str, source: EventSource) -> str:
    """The part of an envelope shared by every event of one type, batch and source:
    ``"schema_version":…,"event_type":…,"batch_id":…,"source":{…},`` (with the trailing
    comma). Built once per run of events by the log tailer, once per event here."""
    source_json = json.dumps(source.as_dict(), separators=(",", ":"), ensure_ascii=False)
    return (
        f'"schema_version":"{SCHEMA_VERSION}","event_type":{json.dumps(event_type)},'
        f'"batch_id":{json.dumps(batch_id, ensure_ascii=False)},"source":{source_json},'
    )


def encode_event(event_id: str, head: str, timestamp: str, data_json: str) -> str:
    """One envelope as JSON text: the one place an event's JSON is put together (``head``
    from :func:`envelope_head`, ``data_json`` the encoded ``data`` object). Pure."""
    return f'{{"event_id":"{event_id}",{head}"timestamp":"{timestamp}","data":{data_json}}}'


def new_event_id() -> str:
    """A fresh event id: 32 hex digits, the time in milliseconds first, then 80 random bits.
    Unique like a uuid4, but ids made one after another sort together, so the server's
    unique index on event_id takes them near its end instead of on a random page each
    (with uuid4 ids the reference server's ingest slowed down as its table grew:
    bench/README.md)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def make_event(
    event_type: str,
    kind: EventKind,
    batch_id: str,
    source: EventSource,
    data: dict[str, Any],
    *,
    timestamp: float | None = None,
    event_id: str | None = None,
) -> OutEvent:
    """Build and encode one event, with a fresh ``event_id`` unless one is given."""
    event_id = event_id or new_event_id()
    body = encode_event(
        event_id,
        envelope_head(event_type, batch_id, source),
        utc_timestamp(timestamp),
        json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str),
    )
    return OutEvent(event_id, kind, batch_id, body.encode())
