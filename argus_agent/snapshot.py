"""The status document the daemon serves on its control socket (`argus-agent status`).

Built from the running agent's parts on each request, from memory only: nothing here waits
on the server, and the outbox's figures are counters its writer thread keeps (the age of
the oldest queued event included), so status answers at once while the server is away or
the disk is slow. The command ledger's phase counts are the one query; it is the agent's own
small SQLite file, read on the event loop as everywhere else.

The document's shape is the versioned schema :data:`SCHEMA`, documented field by field in
``docs/status.md`` (``tests/test_status.py`` fails when a field is missing there). A change
that removes or retypes a field needs a new schema name; adding one does not.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from argus_agent.jobs.slurm import SlurmJobs
from argus_agent.jobs.slurm_store import SlurmJobRecord

if TYPE_CHECKING:
    from argus_agent.daemon import Agent
    from argus_agent.jobs.store import JobRecord

#: The ``schema`` field of every status document.
SCHEMA = "argus-agent.status.v1"
#: The drain state of an agent that has none (no drain support, or never drained).
NOT_DRAINING: dict[str, Any] = {"draining": False, "since": None, "by": None, "reason": None}


def build_snapshot(agent: Agent) -> dict[str, Any]:
    """The status document of a started agent (see ``docs/status.md``)."""
    assert agent.state is not None and agent.jobs is not None and agent.ledger is not None
    now = time.time()
    data: dict[str, Any] = {"schema": SCHEMA, **agent.state.to_dict()}
    data["uptime_s"] = round(now - agent.state.started_at, 1)
    data["commands"] = agent.ledger.counts()
    data["health"] = {"loops": agent.health.watched(), "overdue": agent.health.overdue()}
    # The drain state (drain.py) is the daemon's from start-up; a part-built agent has none.
    drain = getattr(agent, "drain", None)
    data["drain"] = dict(drain.as_dict()) if drain is not None else dict(NOT_DRAINING)
    data["gpu"] = _gpu(agent)
    warnings = [problem] if (problem := agent.health.describe()) else []
    if agent.dispatcher is not None and (foreign := agent.dispatcher.foreign_refusals.warning()):
        warnings.append(foreign)
    data["warnings"] = warnings
    if agent.outbox is not None and agent.sender is not None and agent.telemetry is not None:
        stats = agent.outbox.stats()
        tick = agent.telemetry.last_tick_s
        data["telemetry"] = {
            "outbox_queued": stats.queued,
            "outbox_bytes": stats.bytes,
            "outbox_max_bytes": agent.outbox.max_bytes,
            "outbox_oldest_at": stats.oldest_at,
            "outbox_oldest_age_s": (
                round(max(0.0, now - stats.oldest_at), 1) if stats.oldest_at else None
            ),
            "dropped": stats.dropped,
            "sender": asdict(agent.sender.state),
            "snapshots": agent.telemetry.snapshots_sent,
            "last_tick_ms": round(tick * 1000, 2) if tick is not None else None,
            # A disk that refused writes: events lost (per kind), failed operations.
            "lost": stats.lost,
            "write_errors": stats.write_errors,
            "last_write_error": agent.outbox.last_write_error,
        }
    # Damaged state: databases set aside (kept files) and job records quarantined.
    recovered = [{**e, "file": "state.db"} for e in agent.ledger.recovered_from]
    if agent.outbox is not None:
        recovered += [{**e, "file": "outbox.db"} for e in agent.outbox.recovered_from]
    data["damaged_state"] = {
        "recovered": recovered,
        "quarantined_jobs": list(agent.jobs.store.quarantined),
    }
    latest = agent.telemetry.latest if agent.telemetry is not None else {}
    if isinstance(agent.jobs, SlurmJobs):  # read with sstat by their launcher
        latest = {**latest, **agent.jobs.latest}
    data["jobs"] = [_job(r, latest.get(r.batch_id), now) for r in agent.jobs.records()]
    # Whether jobs get cgroups of their own, and why not (jobs/cgroups.py).
    data["cgroups"] = agent.jobs.cgroups.status()
    # The Slurm launcher's view of the queue (jobs.launcher = "slurm"), else null.
    data["slurm"] = agent.jobs.status() if isinstance(agent.jobs, SlurmJobs) else None
    if data["slurm"] and data["slurm"]["queue_error"]:
        data["warnings"].append(f"cannot read the Slurm queue: {data['slurm']['queue_error']}")
    # The served host names' registrations (jobs.slurm_hosts), else null.
    served = getattr(agent, "served", None)
    data["served_hosts"] = served.snapshot() if served is not None else None
    if data["served_hosts"] and (bad := data["served_hosts"]["problem_count"]):
        data["warnings"].append(
            f"{bad} served host name(s) not polled successfully (served_hosts.problems)"
        )
    return data


def _gpu(agent: Agent) -> dict[str, Any]:
    """The GPU backend and, when there is no GPU reading, why."""
    backend = agent.telemetry.gpu.backend if agent.telemetry is not None else None
    name = backend.name if backend is not None else "none"
    why = getattr(backend, "reason", None)
    if name == "none" and why is None:
        tele = agent.settings.telemetry
        why = (
            "telemetry is off (telemetry.enabled = false)"
            if not tele.enabled
            else 'GPU readings are off (telemetry.gpu = "none")'
        )
    return {"backend": name, "why": why}


def _job(record: JobRecord, reading: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """One job: its record, and the sampler's latest reading while it runs."""
    started = record.started_at or record.launched_at
    until = record.ended_at if record.ended_at is not None else now
    reading = reading if record.running else None
    return {
        "batch_id": record.batch_id,
        "pid": record.pid,
        "run_as": record.run_as,
        "state": record.state,
        "outcome": record.describe_exit(),
        "exit_code": record.exit_code,
        "exit_signal": record.exit_signal,
        "launched_at": record.launched_at,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "uptime_s": round(max(0.0, until - started), 1),
        "requested_by": record.requested_by,
        "command": record.command_line,
        "log_path": record.log_path,
        # The shim could not write the log (e.g. disk full): output after it is lost.
        "log_error": record.log_error,
        "cpu_pct": reading.get("cpu_pct") if reading else None,
        "rss_bytes": reading.get("rss_bytes") if reading else None,
        "gpu_mem_mb": reading.get("gpu_mem_mb") if reading else None,
        "sampled_at": reading.get("sampled_at") if reading else None,
        "slurm": _slurm(record),
    }


def _slurm(record: JobRecord) -> dict[str, Any] | None:
    """A job under Slurm: its job id (also its ``pid``), state, nodes, how its end was
    learned; None for a local job."""
    if not isinstance(record, SlurmJobRecord):
        return None
    return {
        "job_id": record.slurm_job_id,
        "state": record.slurm_state,
        "reason": record.slurm_reason,
        "nodes": record.slurm_nodes,
        "partition": record.slurm_partition,
        "exit": record.slurm_exit,
        "end_source": record.slurm_end_source,
        "options": record.slurm_options,
        "output_dir": record.slurm_output_dir,
        "log_unreadable": record.log_unreadable,
    }
