"""Resource snapshots of jobs that run under Slurm, from what ``sstat`` reports.

The Slurm launcher (``jobs/slurm.py``) reads the running jobs' usage at a low rate (one
``sstat`` call for all of them) and hands the readings to :func:`report_usage`, which turns
each into a ``resource_snapshot`` event in the outbox, as the sampler does for local jobs.
The job's own processes run on a compute node the agent cannot see, so only Slurm's figures
are sent: the job's CPU share since the previous reading, its memory and its largest task's
peak. Host and GPU fields stay empty (Slurm 22.05's sstat reports no GPU use). The event's
host is the node the job runs on (Argus files resource snapshots per host), or the batch's
recorded host for a job on several nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.jobs.slurm_resources import NODELIST_RE

if TYPE_CHECKING:
    from argus_agent.jobs.slurm_store import SlurmJobRecord
    from argus_agent.telemetry.manager import Telemetry

MB = 1024 * 1024


def snapshot_data(record: SlurmJobRecord, reading: dict[str, Any]) -> dict[str, Any]:
    """The ``resource_snapshot`` data of one Slurm job: Argus' field names plus extras."""
    return {
        "cpu_util_pct": None,
        "ram_mb": None,
        "ram_total_mb": None,
        "disk_free_mb": None,
        "disk_total_mb": None,
        "proc_cpu_pct": reading.get("cpu_pct"),
        "proc_ram_mb": round(reading.get("rss_bytes", 0) / MB, 1),
        "proc_ram_peak_mb": round(reading.get("max_rss_bytes", 0) / MB, 1),
        "num_tasks": reading.get("tasks"),
        "proc_gpu_mem_mb": None,
        "gpu_util_pct": None,
        "gpu_mem_mb": None,
        "gpu_mem_total_mb": None,
        "gpu_temp_c": None,
        "gpus": [],
        "slurm_job_id": record.slurm_job_id,
        "slurm_nodes": record.slurm_nodes,
        "source": "sstat",
    }


def snapshot_host(record: SlurmJobRecord, fallback: str) -> str:
    """Where the job runs: its one node, else the batch's recorded host, else ``fallback``."""
    nodes = record.slurm_nodes or ""
    if nodes and NODELIST_RE.fullmatch(nodes) and not any(c in nodes for c in "[],"):
        return nodes
    return record.source_host or fallback


async def report_usage(
    telemetry: Telemetry, readings: list[tuple[SlurmJobRecord, dict[str, Any]]]
) -> int:
    """Queue one resource snapshot per reading (if telemetry is on); returns how many."""
    settings = telemetry.settings
    if not settings.enabled or not readings:
        return 0
    events = [
        make_event(
            "resource_snapshot",
            EventKind.SNAPSHOT,
            record.batch_id,
            EventSource(
                project=settings.project,
                host=snapshot_host(record, telemetry.hostname),
                user=record.run_as,
                command=record.command_line,
            ),
            snapshot_data(record, reading),
        )
        for record, reading in readings
    ]
    await telemetry.outbox.put(events)
    telemetry.snapshots_sent += len(events)
    return len(events)
