"""The jobs part of the state dir: one directory per job, ``jobs/<batch_id>/``.

Each file has one writer, so the agent and the per-job supervisor (shim) never race:

| file           | writer | content                                                        |
|----------------|--------|----------------------------------------------------------------|
| ``job.json``   | agent  | what to run, for whom, as whom (written before the launch)     |
| ``started.json``| shim  | job pid, process group, start ticks of job and shim            |
| ``stop.json``  | agent  | who asked to stop, when, with which grace period               |
| ``exit.json``  | shim   | exit code or signal, end time (the agent writes it only for a  |
|                |        | job whose shim vanished without writing it)                    |
| ``output.log`` | shim   | the job's stdout and stderr                                    |

A :class:`JobRecord` is the view assembled from these files.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from argus_agent.fsutil import atomic_write_json, ensure_private_dir, read_json
from argus_agent.jobs.shim import STOP_GRACE_KEY
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

INTENT_FIELDS = (
    "batch_id",
    "cmd_id",
    "source_batch_id",
    "requested_by",
    "command_line",
    "argv",
    "cwd",
    "log_path",
    "run_as",
    "uid",
    "gid",
    "launched_at",
)
STARTED_FIELDS = (
    "pid",
    "pgid",
    "start_ticks",
    "shim_pid",
    "shim_start_ticks",
    "boot_id",
    "started_at",
    "output_pipes",
)
#: The shim reads the grace period from ``stop.json`` under ``STOP_GRACE_KEY``: one name.
STOP_FIELDS = ("stop_requested_by", "stop_requested_at", STOP_GRACE_KEY)
EXIT_FIELDS = (
    "exit_code",
    "exit_signal",
    "ended_at",
    "exit_note",
    "killed_after_grace",
    "log_truncated",
    "log_error",
)


@dataclass(frozen=True)
class JobRecord:
    """What the agent knows of one job (see the module doc for where each part comes from)."""

    batch_id: str
    cmd_id: str
    command_line: str
    argv: list[str]
    cwd: str
    log_path: str
    launched_at: float
    source_batch_id: str | None = None
    requested_by: str | None = None
    run_as: str | None = None
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    pgid: int | None = None
    start_ticks: int | None = None
    shim_pid: int | None = None
    shim_start_ticks: int | None = None
    boot_id: str | None = None
    started_at: float | None = None
    #: The shim's fds and inodes of the job's stdout/stderr pipes (``{"o": {fd, inode}}``).
    output_pipes: dict[str, Any] | None = None
    stop_requested_by: str | None = None
    stop_requested_at: float | None = None
    stop_grace_s: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    ended_at: float | None = None
    exit_note: str | None = None
    killed_after_grace: bool | None = None
    log_truncated: bool | None = None
    log_error: str | None = None

    @property
    def started(self) -> bool:
        """Whether the job's exec succeeded (its shim wrote ``started.json``)."""
        return self.pid is not None

    @property
    def running(self) -> bool:
        """Whether the job started and has not been seen to end."""
        return self.started and self.ended_at is None

    @property
    def state(self) -> str:
        """``launching``, ``running``, ``stopping`` or ``ended``."""
        if self.ended_at is not None:
            return "ended"
        if not self.started:
            return "launching"
        return "stopping" if self.stop_requested_at else "running"

    def with_changes(self, **changes: Any) -> JobRecord:
        """A copy with the given fields changed."""
        return replace(self, **changes)

    def describe_exit(self) -> str:
        """A short human description of how the job ended ('running' while it runs)."""
        if self.ended_at is None:
            return self.state
        if self.exit_signal is not None:
            try:
                name = signal.Signals(self.exit_signal).name
            except ValueError:
                name = str(self.exit_signal)
            text = f"killed by signal {self.exit_signal} ({name})"
        elif self.exit_code is not None:
            text = f"exit code {self.exit_code}"
        else:
            return self.exit_note or "ended, exit status unknown"
        if self.stop_requested_at:
            who = self.stop_requested_by or "unknown"
            text += f", stopped on request of {who}"
            if self.killed_after_grace:
                text += " (SIGKILL after the grace period)"
        if self.exit_note:  # e.g. a stop that gave up on processes that would not die
            text += f"; {self.exit_note}"
        return text


class JobStore:
    """Reads and writes job directories under ``<state_dir>/jobs``. Blocking, small I/O."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ensure_private_dir(root)

    def job_dir(self, batch_id: str) -> Path:
        """The directory of one job (batch ids are validated to a safe shape upstream)."""
        return self.root / batch_id

    def create(self, record: JobRecord) -> Path:
        """Create the job's directory and write its intent (``job.json``); returns the dir.
        Raises FileExistsError when the batch already has a job dir, OSError otherwise."""
        directory = self.job_dir(record.batch_id)
        directory.mkdir(mode=0o700)
        atomic_write_json(directory / "job.json", _pick(record, INTENT_FIELDS))
        return directory

    def discard(self, batch_id: str) -> None:
        """Remove a job directory (a launch that failed, or pruning)."""
        shutil.rmtree(self.job_dir(batch_id), ignore_errors=True)

    def write_stop(self, record: JobRecord) -> None:
        """Record the stop request of ``record`` (``stop.json``)."""
        atomic_write_json(self.job_dir(record.batch_id) / "stop.json", _pick(record, STOP_FIELDS))

    def write_exit(self, batch_id: str, info: dict[str, Any]) -> None:
        """Write ``exit.json`` for a job whose shim is gone (the agent took it over)."""
        atomic_write_json(self.job_dir(batch_id) / "exit.json", info)

    def write_lost_exit(self, batch_id: str, note: str) -> None:
        """Write ``exit.json`` for a job whose shim vanished without writing one."""
        atomic_write_json(
            self.job_dir(batch_id) / "exit.json", {"ended_at": time.time(), "exit_note": note}
        )

    def load(self, batch_id: str) -> JobRecord:
        """Assemble the record of one job. Raises OSError/ValueError/TypeError."""
        directory = self.job_dir(batch_id)
        data: dict[str, Any] = read_json(directory / "job.json")
        for name, keys in (
            ("started.json", STARTED_FIELDS),
            ("stop.json", STOP_FIELDS),
            ("exit.json", EXIT_FIELDS),
        ):
            path = directory / name
            if path.exists():
                part = read_json(path)
                data.update({k: part.get(k) for k in keys if k in part})
        known = {f.name for f in fields(JobRecord)}
        return JobRecord(**{k: v for k, v in data.items() if k in known})

    def load_all(self) -> list[JobRecord]:
        """Every readable job record; unreadable ones are logged and skipped."""
        records = []
        for path in sorted(self.root.glob("*/job.json")):
            try:
                records.append(self.load(path.parent.name))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("job record unreadable, skipped", path=str(path), error=str(exc))
        return records


def _pick(record: JobRecord, keys: tuple[str, ...]) -> dict[str, Any]:
    data = asdict(record)
    return {k: data[k] for k in keys}
