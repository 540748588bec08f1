"""Request bodies of the reference server, with the real server's validation rules.

Envelopes refuse unknown keys (422); per-event ``data`` objects accept extra keys but type
their known ones, as Argus v0.3.0 does. Pure pydantic models; no I/O.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EVENT_TYPES = (
    "batch_start",
    "batch_done",
    "batch_failed",
    "job_start",
    "job_epoch",
    "job_done",
    "job_failed",
    "resource_snapshot",
    "log_line",
    "env_snapshot",
)
EventType = Literal[
    "batch_start",
    "batch_done",
    "batch_failed",
    "job_start",
    "job_epoch",
    "job_done",
    "job_failed",
    "resource_snapshot",
    "log_line",
    "env_snapshot",
]
OVERRIDES_MAX_BYTES = 64 * 1024
#: An integer the server stores in an SQLite column: SQLite holds 64-bit signed integers, and
#: binding a larger one raises OverflowError (a 500, or a websocket session closed for a
#: frame the agent would send again and again) instead of a refusal.
SqlInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- agent endpoints


class RegisterIn(_Strict):
    """``POST /api/agents/register``."""

    hostname: str
    version: str | None = None
    capabilities: list[str] = Field(default_factory=list)


class AckIn(_Strict):
    """``POST /api/agents/{id}/jobs/{cmd_id}/ack``; any status string passes here (400 later)."""

    status: str
    pid: SqlInt | None = None
    error: str | None = None


class HeartbeatIn(_Strict):
    """``POST /api/agents/{id}/heartbeat`` (the body itself is optional)."""

    note: str | None = None


# ---------------------------------------------------------------- batches


class RerunIn(_Strict):
    """``POST /api/batches/{id}/rerun``: overrides (≤ 64 KB of JSON) and an optional name."""

    overrides: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None

    @field_validator("overrides")
    @classmethod
    def _cap_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"overrides must be JSON-serialisable: {exc}") from exc
        if len(encoded.encode("utf-8")) > OVERRIDES_MAX_BYTES:
            raise ValueError("overrides payload exceeds 64 KB cap")
        return value


# ---------------------------------------------------------------- events


class Source(_Strict):
    """The ``source`` block of an event envelope."""

    project: str
    host: str | None = None
    user: str | None = None
    commit: str | None = None
    command: str | None = None


class EventIn(_Strict):
    """One event envelope (schema 1.1). ``schema_version`` is checked by the handler (415)."""

    schema_version: str
    event_type: EventType
    timestamp: str
    batch_id: str = Field(min_length=1, max_length=128)
    job_id: str | None = Field(default=None, max_length=256)
    source: Source
    data: dict[str, Any] = Field(default_factory=dict)
    event_id: str | None = Field(default=None, min_length=8, max_length=64)

    @field_validator("event_id")
    @classmethod
    def _blank_is_absent(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None


class BatchEventsIn(_Strict):
    """``POST /api/events/batch``: 1..500 envelopes (one bad envelope fails the request)."""

    events: list[EventIn] = Field(min_length=1, max_length=500)


class BatchStartData(_Open):
    experiment_type: str | None = None
    n_total_jobs: SqlInt | None = None
    command: str | None = None


class BatchDoneData(_Open):
    n_done: int | None = None
    n_failed: int | None = None
    total_elapsed_s: float | None = None


class BatchFailedData(_Open):
    error: str | None = None
    n_done: int | None = None
    n_failed: int | None = None


class JobStartData(_Open):
    model: str | None = None
    dataset: str | None = None
    config_digest: str | None = None
    run_dir: str | None = None


class JobEpochData(_Open):
    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None


class JobDoneData(_Open):
    status: str | None = None
    elapsed_s: float | None = None
    train_epochs: int | None = None
    metrics: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None


class JobFailedData(_Open):
    error: str | None = None
    elapsed_s: float | None = None


class ResourceSnapshotData(_Open):
    gpu_util_pct: float | None = None
    gpu_mem_mb: float | None = None
    gpu_mem_total_mb: float | None = None
    gpu_temp_c: float | None = None
    cpu_util_pct: float | None = None
    ram_mb: float | None = None
    ram_total_mb: float | None = None
    disk_free_mb: float | None = None
    disk_total_mb: float | None = None


class LogLineData(_Open):
    level: str | None = None
    message: str | None = None


class EnvSnapshotData(_Open):
    git_sha: str | None = None
    git_branch: str | None = None
    git_dirty: bool | None = None
    python_version: str | None = None
    pip_freeze: list[str] | None = None
    hydra_config_digest: str | None = None
    hydra_config_content: str | None = None
    hostname: str | None = None


DATA_MODELS: dict[str, type[BaseModel]] = {
    "batch_start": BatchStartData,
    "batch_done": BatchDoneData,
    "batch_failed": BatchFailedData,
    "job_start": JobStartData,
    "job_epoch": JobEpochData,
    "job_done": JobDoneData,
    "job_failed": JobFailedData,
    "resource_snapshot": ResourceSnapshotData,
    "log_line": LogLineData,
    "env_snapshot": EnvSnapshotData,
}


# ---------------------------------------------------------------- dev-only


class DevUserIn(_Strict):
    """``POST /api/_dev/users``."""

    username: str = Field(min_length=1)


class FaultIn(_Strict):
    """``POST /api/_dev/faults``: answer the next *count* matching requests with *status*."""

    path_prefix: str = Field(min_length=1)
    status: int = Field(ge=100, le=599)
    count: int = Field(default=1, ge=1)
    retry_after: float | None = Field(default=None, ge=0)
    detail: str | None = None
    method: str | None = None


class DevStatusIn(_Strict):
    """``POST /api/_dev/batches/{id}/status``: force a batch status (stands in for the watchdog)."""

    status: str = Field(min_length=1)
