"""The reference server's batch ingest (``devserver/ingest.py``) against its one-event path:
checking a batch's ``data`` objects in one validation call per event type, and the reused
JSON encoder, must answer and store exactly what checking and storing each event alone
does. Pure (a Store, no server)."""

from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from argus_agent.devserver import ingest
from argus_agent.devserver.schemas import EventIn
from argus_agent.devserver.store import ApiError, Store
from tests.test_devserver_wsframes import JSON_VALUES


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES.filter(lambda v: v is not None))  # None is stored as NULL
def test_stored_json_is_the_text_json_dumps_makes(value: Any) -> None:
    assert ingest._dumps(value) == json.dumps(value, default=str, sort_keys=True)


def test_stored_json_of_what_json_cannot_encode_is_its_str() -> None:
    value = {"when": datetime.date(2026, 1, 2), "é": ["\u2028", 1.5]}
    assert ingest._dumps(value) == json.dumps(value, default=str, sort_keys=True)
    assert ingest._dumps(None) is None
    assert ingest._dumps("text") == '"text"'


def _event(event_type: str, data: dict[str, Any], **extra: Any) -> EventIn:
    return EventIn.model_validate(
        {
            "event_id": uuid.uuid4().hex,
            "schema_version": "1.1",
            "event_type": event_type,
            "timestamp": "2026-01-01T00:00:00Z",
            "batch_id": "b-batch",
            "source": {"project": "demo", "host": "h"},
            "data": data,
            **extra,
        }
    )


def _answers(outcomes: list[tuple[int, bool] | ApiError]) -> list[Any]:
    """Outcomes without db ids (they differ between two stores): refusals as (status,
    detail), stored events as their de-duplication flag."""
    return [
        (o.status_code, o.detail) if isinstance(o, ApiError) else ("stored", o[1]) for o in outcomes
    ]


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    return Store(tmp_path / "batch.sqlite"), Store(tmp_path / "one.sqlite")


def test_a_batch_refuses_and_stores_each_event_as_it_would_alone(
    stores: tuple[Store, Store],
) -> None:
    batch_store, one_store = stores
    old = _event("job_epoch", {"epoch": 1}, job_id="j1")
    events = [
        _event("log_line", {"message": "fine"}),
        _event("job_epoch", {"epoch": "not a number"}, job_id="j1"),  # 422
        _event("job_epoch", {"epoch": 2, "lr": 0.1}, job_id="j1"),
        _event("resource_snapshot", {"gpu_util_pct": "hot", "ram_mb": [1]}),  # 422
        _event("resource_snapshot", {"gpu_util_pct": 50.0, "extra": {"kept": True}}),
        _event("job_epoch", {"epoch": 3}),  # 400: no job_id
        _event("log_line", {"message": None, "level": 5}),  # 422
        _event("env_snapshot", {"pip_freeze": ["a==1"], "git_dirty": False}),
    ]
    # A resend of a stored event is de-duplicated whatever its data now says.
    resent = old.model_copy(update={"data": {"epoch": "bad now"}})
    # A copy within the batch of a refused event is refused again, a good one is settled once.
    batch = [*events, resent, events[1], events[2]]
    for store in stores:
        with store.tx() as db:
            ingest.ingest_many_in(db, [old], 1)

    with batch_store.tx() as db:
        got = ingest.ingest_many_in(db, batch, 1)
    alone: list[tuple[int, bool] | ApiError] = []
    for event in batch:
        try:
            alone.append(ingest.ingest_one(one_store, event, 1))
        except ApiError as exc:
            alone.append(exc)

    assert _answers(got) == _answers(alone)
    assert [a[0] for a in _answers(got)] == [
        "stored",
        422,
        "stored",
        422,
        "stored",
        400,
        422,
        "stored",
        "stored",
        422,
        "stored",
    ]
    assert got[8] == (1, True)  # the resend: the stored event's id
    assert got[10] == (got[2][0], True)  # the copy: its first one's id

    def stored(store: Store) -> list[tuple[Any, ...]]:
        return [
            (e["event_id"], e["event_type"], e["data"], e["source"])
            for e in ingest.list_events(store)
        ]

    assert stored(batch_store) == stored(one_store)
    with batch_store.read() as db:
        texts = [r["data"] for r in db.execute("SELECT data FROM events ORDER BY id")]
    assert texts[-1] == json.dumps(events[7].data, default=str, sort_keys=True)
