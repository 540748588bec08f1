"""The Slurm launcher's part of the state dir: ``slurm/<batch_id>/``, and its job record.

One directory per rerun submitted through Slurm, in a tree of its own (``<state>/slurm``,
not ``<state>/jobs``): a Slurm job id is not a process id, and the local job table, which
signals the pids its records name, must never see one. The agent is the only writer:

| file          | content                                                                    |
|---------------|----------------------------------------------------------------------------|
| ``job.json``  | the whole :class:`SlurmJobRecord`: what was submitted, as whom, the Slurm   |
|               | job id (written before sbatch runs, then again with the id), the state the  |
|               | queue last showed, the stop request, how it ended                           |
| ``exit.json`` | written once the end is known (``argus-agent logs -f`` stops at it)         |
| ``output.log``| the agent's copy of the job's output file (``--output``, on the cluster's   |
|               | shared filesystem): what ``log_line`` events and ``argus-agent logs`` read  |
| ``reported``  | the end was handed to telemetry (not reported again after a restart)        |

A :class:`SlurmJobRecord` is a :class:`~argus_agent.jobs.store.JobRecord` (so the
dispatcher, telemetry, status and views take it as any job) whose ``pid`` is the **Slurm job
id** (what the rerun is acked with) and which has no shim, no process group and no cgroup:
nothing of the agent ever signals it as a process. Its Slurm fields say where it runs and
how it ended. ``load`` checks each field's type and names the file and field when one is
wrong; ``load_all(quarantine=True)`` moves a damaged directory to ``slurm/.quarantine``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import asdict, dataclass
from typing import Any

from argus_agent.fsutil import atomic_write_json, read_json
from argus_agent.jobs.recorddirs import JobRecordError, RecordDirs, type_ok
from argus_agent.jobs.store import JobRecord
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: States after which Slurm runs nothing more of the job.
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
    }
)
#: What each end state means, for the batch's error text.
STATE_MEANING = {
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CANCELLED": "was cancelled",
    "TIMEOUT": "reached its time limit",
    "NODE_FAIL": "lost its node",
    "OUT_OF_MEMORY": "was killed for using more memory than it asked for",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "could not boot its node",
    "DEADLINE": "missed its deadline",
    "REVOKED": "was revoked",
}


@dataclass(frozen=True)
class SlurmJobRecord(JobRecord):
    """A rerun submitted to Slurm (``pid`` is its Slurm job id; see the module doc)."""

    slurm_job_id: int | None = None
    #: The state the queue (or the end look-up) last showed: PENDING, RUNNING, COMPLETED…
    slurm_state: str | None = None
    #: Why it is pending (squeue's reason), while it is.
    slurm_reason: str | None = None
    slurm_nodes: str | None = None
    slurm_partition: str | None = None
    #: Slurm's ``ExitCode`` (``exit:signal``) of the ended job.
    slurm_exit: str | None = None
    #: Where the end was learned: squeue+scontrol, sacct, the job's exit file, or unknown.
    slurm_end_source: str | None = None
    #: The sbatch options the job was submitted with (recovered resources, config).
    slurm_options: list[str] | None = None
    #: The job's output directory on the shared filesystem (``output.log``, ``exit_code``).
    slurm_output_dir: str | None = None
    #: The batch's recorded host (where resource snapshots of a multi-node job are filed).
    source_host: str | None = None
    #: Why the login node cannot read the job's output, while it cannot.
    log_unreadable: str | None = None

    @property
    def pending(self) -> bool:
        """Whether the job waits in the queue (submitted, not yet running)."""
        return self.running and self.slurm_state in (None, "PENDING", "REQUEUED")

    def describe_exit(self) -> str:
        """How the job ended, in Slurm's words: ``Slurm job 123 OUT_OF_MEMORY (was killed
        for using more memory than it asked for), ExitCode 0:125``; its state while it runs."""
        if self.ended_at is None:
            if self.slurm_state is None:
                return self.state
            reason = f": {self.slurm_reason}" if self.pending and self.slurm_reason else ""
            return f"{self.slurm_state.lower()}{reason}"
        if self.slurm_job_id is None:
            return self.exit_note or "never submitted"
        state = self.slurm_state or "ended"
        text = f"Slurm job {self.slurm_job_id} {state}"
        if state in STATE_MEANING and state != "COMPLETED":
            text += f" ({STATE_MEANING[state]})"
        if self.exit_code is not None and (self.exit_code != 0 or state == "COMPLETED"):
            text += f", exit code {self.exit_code}"
        if self.slurm_exit is not None:
            text += f", ExitCode {self.slurm_exit}"
        if self.stop_requested_at:
            text += f", stopped on request of {self.stop_requested_by or 'unknown'}"
            if self.killed_after_grace:
                text += " (cancelled after the grace period)"
        if self.exit_note:
            text += f"; {self.exit_note}"
        return text


_HINTS: dict[str, Any] = typing.get_type_hints(SlurmJobRecord)
_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(SlurmJobRecord)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
SLURM_DIR = "slurm"


class SlurmStore(RecordDirs[SlurmJobRecord]):
    """Reads and writes ``<state>/slurm/<batch_id>/``. Blocking, small I/O; one writer (the
    agent). ``quarantined`` lists damaged records as :class:`JobStore` does."""

    what = "Slurm job"
    dir_name = "Slurm jobs directory"

    def create(self, record: SlurmJobRecord) -> None:
        """Make the job's directory and write its record before anything is submitted.
        Raises FileExistsError when the batch has one already, OSError otherwise."""
        self.job_dir(record.batch_id).mkdir(mode=0o700)
        self.save(record)

    def save(self, record: SlurmJobRecord) -> None:
        """Write the record (atomically); with its end known, ``exit.json`` too."""
        directory = self.job_dir(record.batch_id)
        atomic_write_json(directory / "job.json", asdict(record))
        if record.ended_at is not None and not (directory / "exit.json").exists():
            atomic_write_json(
                directory / "exit.json",
                {"ended_at": record.ended_at, "outcome": record.describe_exit()},
            )

    def reported(self, batch_id: str) -> bool:
        """Whether the job's end was reported."""
        return (self.job_dir(batch_id) / "reported").exists()

    def mark_reported(self, batch_id: str) -> None:
        """Remember that the job's end was reported."""
        with contextlib.suppress(OSError):
            (self.job_dir(batch_id) / "reported").touch(mode=0o600)

    def load(self, batch_id: str) -> SlurmJobRecord:
        """The record of one job. Raises OSError, or JobRecordError naming file and field."""
        path = self.job_dir(batch_id) / "job.json"
        try:
            data = read_json(path)
        except (UnicodeDecodeError, ValueError) as exc:
            raise JobRecordError(path, f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise JobRecordError(path, f"not a JSON object but {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in _HINTS}
        for key, value in known.items():
            if not type_ok(value, _HINTS[key]):
                raise JobRecordError(
                    path, f"field {key!r} is {value!r:.80}, expected {_HINTS[key]}"
                )
        missing = [k for k in _REQUIRED if k not in known]
        if missing:
            raise JobRecordError(path, f"field(s) {', '.join(missing)} missing")
        if known["batch_id"] != batch_id:
            raise JobRecordError(path, f"batch_id {known['batch_id']!r} differs from its directory")
        for key in ("pid", "slurm_job_id"):
            if known.get(key) is not None and known[key] <= 0:
                raise JobRecordError(path, f"field {key!r} is {known[key]!r}, out of range")
        # Nothing that names a process may come back: a Slurm job is never signalled as one.
        known.update(shim_pid=None, pgid=None, cgroup=None)
        return SlurmJobRecord(**known)
