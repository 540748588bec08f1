"""Event ingest and the batch rows it creates, following Argus v0.3.0's rules.

* Events are de-duplicated by ``event_id``; a duplicate changes nothing.
* ``batch_start`` creates the batch (status ``running``) or re-opens one that is not ``done``;
  ``batch_done`` / ``batch_failed`` set ``done`` / ``failed`` whatever the status was
  (``stopping`` included). Other batch/job events create a stub batch on first sight,
  except ``resource_snapshot``, which never touches batches.
* ``env_snapshot`` is kept on the batch, first write wins (the rerun payload copies its
  ``cwd`` and ``env``).
* A batch's owner is the user of the token that sent its first event.

Every event kept is stored whole (for ``/api/_dev/events``).
"""

from __future__ import annotations

import json
import sqlite3
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from .schemas import DATA_MODELS, EventIn
from .store import ApiError, Store, loads_or, row_dict, utcnow_iso

SUPPORTED_SCHEMA_VERSIONS = ("1.1",)
EVENT_ID_REQUIRED = (
    "event_id is required on schema_version '1.1'. Generate a UUID client-side for each event."
)
_JOB_EVENTS_NEED_ID = {
    "job_start": "job_start requires job_id",
    "job_epoch": "job_epoch requires job_id",
    "job_done": "job_done requires job_id",
    "job_failed": "job_failed requires job_id",
}


#: ``json.dumps(value, default=str, sort_keys=True)`` without building an encoder per call
#: (that cost more than encoding a small ``data`` object: 4 of the websocket's 55 µs an
#: event). Same text; only the cycle check is left out, as stored values come from parsed JSON
#: (a cycle would raise RecursionError instead of ValueError).
_ENCODE = (
    c_make_encoder(None, str, encode_basestring_ascii, None, ": ", ", ", True, False, True)
    if c_make_encoder is not None
    else None
)


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    if _ENCODE is None:  # a Python without the C accelerator
        return json.dumps(value, default=str, sort_keys=True)
    return "".join(_ENCODE(value, 0))


#: Each event type's ``data`` model over a list: one validation call for a batch's events of
#: that type instead of one per event (a third of the cost on a frame of log lines).
_DATA_LISTS: dict[str, TypeAdapter[list[Any]]] = {
    kind: TypeAdapter(list[model])  # type: ignore[valid-type]
    for kind, model in DATA_MODELS.items()
}


def ingest_one(store: Store, event: EventIn, owner_id: int) -> tuple[int, bool]:
    """Store one event and apply its side effects in one transaction.

    Returns ``(db_id, deduplicated)``. Raises :class:`ApiError` 415 (schema_version), 422
    (missing event_id, bad ``data``) or 400 (job event without job_id); nothing is written then.
    """
    _check_envelope(event)
    with store.tx() as db:
        known = db.execute("SELECT id FROM events WHERE event_id = ?", (event.event_id,)).fetchone()
        if known is not None:  # a duplicate: nothing checked or written
            return int(known["id"]), True
        row = _row(event, utcnow_iso(), _data_error(DATA_MODELS.get(event.event_type), event.data))
        cur = db.execute(_INSERT_EVENT, row)
        _apply(db, row, owner_id, _Seen())
        return int(cur.lastrowid or 0), False


def ingest_many(
    store: Store, events: list[EventIn], owner_id: int
) -> list[tuple[int, bool] | ApiError]:
    """Store a batch of events in one transaction; one refused event changes nothing while
    the others are kept. Returns, per event, its ``(db_id, deduplicated)`` or the ApiError
    that refused it."""
    with store.tx() as db:
        return ingest_many_in(db, events, owner_id)


def ingest_many_in(
    db: sqlite3.Connection, events: list[EventIn], owner_id: int
) -> list[tuple[int, bool] | ApiError]:
    """:func:`ingest_many` inside the caller's transaction (the websocket stores an events
    frame and its confirmed seq together): :func:`prepare`, then :func:`store_prepared`."""
    return store_prepared(db, prepare(events), owner_id)


#: One event after every check that needs no database (:func:`prepare`): its event_id; the
#: refusal that comes before de-duplication (an envelope the server does not take: 415 or
#: 422), as ``(status, detail)``; the refusal that comes after it (bad ``data`` 422, a job
#: event without job_id 400); and its ``events`` row when neither refused it. Plain tuples of
#: JSON values, so that a worker process can hand them over (:mod:`.frameworker`).
Prepared = tuple[str | None, tuple[int, Any] | None, tuple[int, Any] | None, tuple[Any, ...] | None]


def prepare(events: list[EventIn], now: str | None = None) -> list[Prepared]:
    """Every check of a batch's events that needs no database, and their rows; pure (it runs
    in the reference server's frame worker for websocket frames, :mod:`.frameworker`)."""
    now = now or utcnow_iso()
    bad_data = _data_errors(events)  # every event's data in one call per event type
    sources: dict[tuple[Any, ...], str | None] = {}  # a frame's events mostly share one source
    out: list[Prepared] = []
    for index, event in enumerate(events):
        try:
            _check_envelope(event)
        except ApiError as exc:
            out.append((event.event_id, (exc.status_code, exc.detail), None, None))
            continue
        try:
            out.append((event.event_id, None, None, _row(event, now, bad_data.get(index), sources)))
        except ApiError as exc:
            out.append((event.event_id, None, (exc.status_code, exc.detail), None))
    return out


def store_prepared(
    db: sqlite3.Connection, items: list[Prepared], owner_id: int
) -> list[tuple[int, bool] | ApiError]:
    """Store prepared events inside the caller's transaction, by the rules of
    :func:`ingest_one` applied in order: a bad envelope is refused; a known event_id (stored
    before, or earlier in this batch) is a duplicate whatever its data says; then a refusal
    from :func:`prepare` stands; the rest are inserted with one ``executemany`` (a fifth of
    the websocket's ingest time went to one execute per event) and applied in order."""
    seen = _Seen()
    ids = list({item[0] for item in items if item[0] and item[1] is None})
    for start in range(0, len(ids), 500):  # one query for the batch's duplicates
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in db.execute(
            f"SELECT event_id, id FROM events WHERE event_id IN ({marks})", chunk
        ):
            seen.known[row["event_id"]] = int(row["id"])
    outcomes: list[tuple[int, bool] | ApiError | None] = [None] * len(items)
    fresh: list[tuple[int, tuple[Any, ...]]] = []
    first_of: set[str] = set()  # event_ids of this batch's first, not yet inserted, copies
    for index, (event_id, envelope, refusal, row) in enumerate(items):
        if envelope is not None:
            outcomes[index] = ApiError(*envelope)
        elif event_id in seen.known:
            outcomes[index] = (seen.known[event_id], True)
        elif event_id in first_of:
            continue  # a copy of an earlier event of this batch: settled below
        elif refusal is not None or row is None:
            outcomes[index] = ApiError(*(refusal or (500, "not prepared")))
        else:
            fresh.append((index, row))
            first_of.add(row[0])
    if fresh:
        db.executemany(_INSERT_EVENT, [row for _, row in fresh])
        # AUTOINCREMENT ids are consecutive within one statement of one writer.
        last = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
        for offset, (index, row) in enumerate(fresh, start=last - len(fresh) + 1):
            outcomes[index] = (offset, False)
            _apply(db, row, owner_id, seen)
            seen.known[row[0]] = offset
    for index, item in enumerate(items):
        if outcomes[index] is None:  # a copy: the first one's id
            outcomes[index] = (seen.known[str(item[0])], True)
    return [o for o in outcomes if o is not None]


def event_result(event_id: str | None, outcome: tuple[int, bool] | ApiError) -> dict[str, Any]:
    """One item of the batch answer's ``results`` (REST batch and websocket confirm)."""
    if isinstance(outcome, ApiError):
        return {
            "event_id": event_id,
            "status": "rejected",
            "db_id": None,
            "error": str(outcome.detail),
        }
    db_id, deduplicated = outcome
    return {
        "event_id": event_id,
        "status": "deduplicated" if deduplicated else "accepted",
        "db_id": db_id,
        "error": None,
    }


def batch_answer(results: list[dict[str, Any]]) -> dict[str, Any]:
    """``{accepted, rejected, results}`` of ``POST /api/events/batch``: de-duplicated events
    count as accepted, as the real server counts them."""
    rejected = sum(1 for r in results if r["status"] == "rejected")
    return {"accepted": len(results) - rejected, "rejected": rejected, "results": results}


def _check_envelope(event: EventIn) -> None:
    if event.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ApiError(
            415,
            {
                "message": "Unsupported schema_version",
                "received": event.schema_version,
                "supported": list(SUPPORTED_SCHEMA_VERSIONS),
            },
        )
    if not event.event_id:
        raise ApiError(422, EVENT_ID_REQUIRED)


class _Seen:
    """What one transaction already did: the batches it stubbed, the stored event_ids of its
    events (with their row ids) and the sources it read back from their JSON."""

    def __init__(self) -> None:
        self.stubbed: set[str] = set()
        self.known: dict[str, int] = {}
        self._sources: dict[str, dict[str, Any]] = {}

    def source(self, stored: str | None) -> dict[str, Any]:
        if stored is None:
            return {}
        if stored not in self._sources:
            self._sources[stored] = json.loads(stored)
        return self._sources[stored]


_INSERT_EVENT = (
    "INSERT INTO events (event_id, batch_id, job_id, event_type, timestamp, "
    "schema_version, source, data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: The positions in an ``events`` row (:data:`_INSERT_EVENT`'s columns) that apply reads.
_BATCH_ID, _JOB_ID, _TYPE, _TIMESTAMP, _SOURCE, _DATA = 1, 2, 3, 4, 6, 7


def _row(
    event: EventIn,
    now: str,
    data_error: ApiError | None,
    sources: dict[tuple[Any, ...], str | None] | None = None,
) -> tuple[Any, ...]:
    """The event's ``events`` row; raises *data_error* (its data's 422, checked by the
    caller) or the 400 of a job event without job_id. *sources* keeps ``source`` JSON by
    its fields across calls."""
    if data_error is not None:
        raise data_error
    if event.event_type in _JOB_EVENTS_NEED_ID and event.job_id is None:
        raise ApiError(400, _JOB_EVENTS_NEED_ID[event.event_type])
    sources = {} if sources is None else sources
    key = tuple(event.source.__dict__.values())
    if key not in sources:
        sources[key] = _dumps(event.source.model_dump())
    return (
        event.event_id,
        event.batch_id,
        event.job_id,
        event.event_type,
        event.timestamp,
        event.schema_version,
        sources[key],
        _dumps(event.data),
        now,
    )


def _data_error(model: type[BaseModel] | None, data: dict[str, Any]) -> ApiError | None:
    """The 422 for ``data`` that its event type's model refuses, or None."""
    if model is None:
        return None
    try:
        model.model_validate(data)
    except ValidationError as exc:
        try:
            return ApiError(422, json.loads(exc.json()))
        except ValueError:  # it echoes an input UTF-8 cannot encode (a lone surrogate)
            return ApiError(422, json.loads(exc.json(include_input=False)))
    return None


def _data_errors(events: list[EventIn]) -> dict[int, ApiError]:
    """The 422 of every event (by index) whose ``data`` its type's model refuses: one
    validation call per event type present; one per event of a type only when that call
    failed, for each event's own error."""
    by_kind: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        by_kind.setdefault(event.event_type, []).append(index)
    errors: dict[int, ApiError] = {}
    for kind, indices in by_kind.items():
        model = DATA_MODELS.get(kind)
        if model is None:
            continue
        try:
            _DATA_LISTS[kind].validate_python([events[i].data for i in indices])
        except ValidationError:
            for index in indices:
                error = _data_error(model, events[index].data)
                if error is not None:
                    errors[index] = error
    return errors


def record_server_event(
    db: sqlite3.Connection, batch_id: str, event_type: str, data: dict[str, Any], event_id: str
) -> None:
    """Write an event the server itself emits (``rerun_requested``, ``batch_stop_requested``)."""
    now = utcnow_iso()
    db.execute(
        "INSERT INTO events (event_id, batch_id, job_id, event_type, timestamp, schema_version, "
        "source, data, received_at) VALUES (?, ?, NULL, ?, ?, '1.1', NULL, ?, ?)",
        (event_id, batch_id, event_type, now, _dumps(data), now),
    )


# ---------------------------------------------------------------- side effects


def _apply(db: sqlite3.Connection, row: tuple[Any, ...], owner_id: int, seen: _Seen) -> None:
    """The side effects of one stored event, from its ``events`` row (the only form a
    prepared event has); ``data`` is read back from its JSON for the few types that use it."""
    kind, batch_id, job_id = row[_TYPE], row[_BATCH_ID], row[_JOB_ID]
    if kind == "log_line":  # the usual event first
        _stub_batch(db, row, owner_id, seen)
    elif kind == "batch_start":
        _batch_start(db, row, owner_id, seen)
    elif kind in ("batch_done", "batch_failed"):
        _stub_batch(db, row, owner_id, seen)
        status = "done" if kind == "batch_done" else "failed"
        error = json.loads(row[_DATA]).get("error") if kind == "batch_failed" else None
        db.execute(
            "UPDATE batches SET status = ?, end_time = ?, error = COALESCE(?, error) WHERE id = ?",
            (status, row[_TIMESTAMP], error, batch_id),
        )
    elif kind in ("job_start", "job_epoch", "job_done", "job_failed"):
        _stub_batch(db, row, owner_id, seen)
        status = {
            "job_start": "running",
            "job_epoch": None,
            "job_done": None,
            "job_failed": "failed",
        }[kind]
        if kind == "job_done":
            status = str(json.loads(row[_DATA]).get("status") or "done").lower()
        db.execute(
            "INSERT INTO jobs (batch_id, job_id, status) VALUES (?, ?, 'running') "
            "ON CONFLICT (batch_id, job_id) DO NOTHING",
            (batch_id, job_id),
        )
        if status is not None:
            db.execute(
                "UPDATE jobs SET status = ? WHERE batch_id = ? AND job_id = ?",
                (status, batch_id, job_id),
            )
    elif kind == "env_snapshot":
        _stub_batch(db, row, owner_id, seen)
        db.execute(  # the stored data is the data's JSON already
            "UPDATE batches SET env_snapshot = ? WHERE id = ? AND env_snapshot IS NULL",
            (row[_DATA], batch_id),
        )
    # resource_snapshot: stored per host in the real server; here only as the raw event.


def _stub_batch(db: sqlite3.Connection, row: tuple[Any, ...], owner_id: int, seen: _Seen) -> None:
    """Create the event's batch (status running) when it does not exist yet (once per
    transaction: nothing deletes a batch)."""
    batch_id = row[_BATCH_ID]
    if batch_id in seen.stubbed:
        return
    seen.stubbed.add(batch_id)
    src = seen.source(row[_SOURCE])
    db.execute(
        "INSERT INTO batches (id, project, user, host, command, status, start_time, owner_id) "
        "VALUES (?, ?, ?, ?, ?, 'running', ?, ?) ON CONFLICT (id) DO NOTHING",
        (
            batch_id,
            src.get("project"),
            src.get("user"),
            src.get("host"),
            src.get("command"),
            row[_TIMESTAMP],
            owner_id,
        ),
    )


def _batch_start(db: sqlite3.Connection, row: tuple[Any, ...], owner_id: int, seen: _Seen) -> None:
    src, data, batch_id = seen.source(row[_SOURCE]), json.loads(row[_DATA]), row[_BATCH_ID]
    old = row_dict(db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())
    command = data.get("command") or src.get("command")
    if old is None:
        db.execute(
            "INSERT INTO batches (id, project, user, host, command, experiment_type, n_total, "
            "status, start_time, end_time, owner_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, NULL, ?)",
            (
                batch_id,
                src.get("project"),
                src.get("user"),
                src.get("host"),
                command,
                data.get("experiment_type"),
                data.get("n_total_jobs"),
                row[_TIMESTAMP],
                owner_id,
            ),
        )
        return
    # Re-sent batch_start (resume): refresh metadata; re-open unless the batch is done.
    reopen = (old["status"] or "").lower() != "done"
    db.execute(
        "UPDATE batches SET project = ?, user = ?, host = ?, command = ?, experiment_type = ?, "
        "n_total = ?, status = ?, end_time = ?, owner_id = COALESCE(owner_id, ?) WHERE id = ?",
        (
            src.get("project"),
            src.get("user") or old["user"],
            src.get("host") or old["host"],
            command or old["command"],
            data.get("experiment_type") or old["experiment_type"],
            data.get("n_total_jobs", old["n_total"]),
            "running" if reopen else old["status"],
            None if reopen else old["end_time"],
            owner_id,
            batch_id,
        ),
    )


# ---------------------------------------------------------------- reads


def get_batch(store: Store, batch_id: str) -> dict[str, Any] | None:
    """Return the batch as ``GET /api/batches/{id}`` shows it, or None. Changes nothing.

    ``n_done`` / ``n_failed`` are counted from the batch's job rows, as the real server does.
    """
    with store.read() as db:
        row = row_dict(
            db.execute(
                "SELECT b.*, u.username AS owner FROM batches b "
                "LEFT JOIN users u ON u.id = b.owner_id WHERE b.id = ?",
                (batch_id,),
            ).fetchone()
        )
        if row is None:
            return None
        statuses = [
            (r["status"] or "").lower()
            for r in db.execute("SELECT status FROM jobs WHERE batch_id = ?", (batch_id,))
        ]
    return _batch_out(row, statuses)


def _batch_out(row: dict[str, Any], statuses: list[str]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "experiment_type": row["experiment_type"],
        "project": row["project"],
        "user": row["user"],
        "host": row["host"],
        "command": row["command"],
        "n_total": row["n_total"],
        "n_done": sum(1 for s in statuses if s == "done"),
        "n_failed": sum(1 for s in statuses if s == "failed"),
        "status": row["status"],
        "start_time": row["start_time"],
        "end_time": row["end_time"],
        "env_snapshot": loads_or(row["env_snapshot"], None),
        "source_batch_id": row["source_batch_id"],
        # Not in the real BatchOut; kept for tests and the demo.
        "name": row["name"],
        "owner": row["owner"],
        "error": row["error"],
    }


def list_batches(store: Store) -> list[dict[str, Any]]:
    """Return every batch (dev listing), oldest first. Changes nothing."""
    with store.read() as db:
        rows = db.execute(
            "SELECT b.*, u.username AS owner FROM batches b "
            "LEFT JOIN users u ON u.id = b.owner_id ORDER BY b.rowid"
        ).fetchall()
        jobs: dict[str, list[str]] = {}
        for r in db.execute("SELECT batch_id, status FROM jobs"):
            jobs.setdefault(r["batch_id"], []).append((r["status"] or "").lower())
    return [_batch_out(row_dict(r) or {}, jobs.get(r["id"], [])) for r in rows]


def list_events(store: Store, batch_id: str | None = None) -> list[dict[str, Any]]:
    """Return stored events (all, or those of *batch_id*) in arrival order. Changes nothing."""
    sql = "SELECT * FROM events"
    args: tuple[Any, ...] = ()
    if batch_id is not None:
        sql += " WHERE batch_id = ?"
        args = (batch_id,)
    with store.read() as db:
        rows = db.execute(sql + " ORDER BY id", args).fetchall()
    return [
        {
            "db_id": r["id"],
            "event_id": r["event_id"],
            "event_type": r["event_type"],
            "batch_id": r["batch_id"],
            "job_id": r["job_id"],
            "timestamp": r["timestamp"],
            "schema_version": r["schema_version"],
            "source": loads_or(r["source"], None),
            "data": loads_or(r["data"], {}),
            "received_at": r["received_at"],
        }
        for r in rows
    ]


def set_batch_status(store: Store, batch_id: str, status: str) -> None:
    """Force *batch_id*'s status (dev only). Raises ApiError 404 when the batch is unknown."""
    with store.tx() as db:
        cur = db.execute("UPDATE batches SET status = ? WHERE id = ?", (status, batch_id))
        if cur.rowcount == 0:
            raise ApiError(404, "batch not found")
