"""Storing one websocket ``events`` frame for the reference server's session (:mod:`.ws`) and
the ``confirm`` that answers it: the frame's events with :func:`ingest.store_prepared`, the
agent's confirmed seq and last_seen in the same transaction. A frame arrives here prepared
(:class:`wsframes.PreparedFrame`: by the frame worker, or by the session itself) or, when it
was not a well-formed events frame, decoded (:class:`wsproto.Events`: its envelopes that are
not ones are rejected one by one, the others prepared here).
"""

from __future__ import annotations

import logging
import sqlite3

from pydantic import ValidationError

from argus_agent import wsproto

from . import ingest, wsframes
from .schemas import EventIn
from .store import ApiError, Store

_log = logging.getLogger(__name__)


def store_frame(
    store: Store, agent_id: str, owner_id: int, frame: wsframes.PreparedFrame | wsproto.Events
) -> wsproto.Confirm | None:
    """Store the frame's events and its seq in one transaction; the confirm (listing only
    the rejected events), or None when the database failed (nothing is then stored)."""
    rejections: dict[int, wsproto.Rejection] = {}  # by the event's index in the frame
    if isinstance(frame, wsframes.PreparedFrame):
        seq, count, items = frame
        indices = list(range(count))
    else:
        seq, count = frame.seq, len(frame.events)
        valid, indices = _valid_events(frame, rejections)
        items = ingest.prepare(valid)
    try:
        with store.tx() as db:
            outcomes = ingest.store_prepared(db, items, owner_id)
            Store.raise_confirmed_seq(db, agent_id, seq)
            Store.touch_agent(db, agent_id)
    except sqlite3.Error:
        _log.exception("could not store events frame %d of %s", seq, agent_id)
        return None
    for index, item, outcome in zip(indices, items, outcomes, strict=True):
        if isinstance(outcome, ApiError):
            error = wsframes.trim(str(outcome.detail), wsproto.MAX_ACK_ERROR_CHARS) or "rejected"
            rejections[index] = wsproto.Rejection(event_id=item[0], error=error)
    return wsproto.Confirm(
        seq=seq,
        accepted=count - len(rejections),
        rejected=len(rejections),
        deduplicated=sum(1 for o in outcomes if not isinstance(o, ApiError) and o[1]),
        rejections=[rejections[i] for i in sorted(rejections)],
    )


def _valid_events(
    frame: wsproto.Events, rejections: dict[int, wsproto.Rejection]
) -> tuple[list[EventIn], list[int]]:
    """The frame's envelopes that are envelopes, with their indices; the others go to
    ``rejections``."""
    try:  # the whole frame in one validation call; one by one only when something is off
        valid = wsframes.EVENT_LIST.validate_python(frame.events)
        return valid, list(range(len(valid)))
    except ValidationError:
        pass
    valid, indices = [], []
    for index, raw in enumerate(frame.events):
        try:
            valid.append(EventIn.model_validate(raw))
            indices.append(index)
        except ValidationError as exc:
            rejections[index] = wsframes.rejection(raw, exc)
    return valid, indices
