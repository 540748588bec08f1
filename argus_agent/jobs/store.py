"""The jobs part of the state dir: one directory per job, ``jobs/<batch_id>/``.

Each holds ``job.json`` (what was launched, by whom, pid and process start time, exit status
once known; replaced atomically) and ``output.log`` (the job's stdout and stderr). The
layout is meant to be shared with a per-job supervisor process later, which will write the
exit status even while the agent is down.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from argus_agent.fsutil import atomic_write_json, ensure_private_dir, read_json
from argus_agent.logsetup import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class JobRecord:
    """What the agent knows of one job. ``exit_code``/``exit_signal`` are set once it ended."""

    batch_id: str
    cmd_id: str
    source_batch_id: str | None
    requested_by: str | None
    command_line: str
    argv: list[str]
    cwd: str
    log_path: str
    pid: int
    pgid: int
    process_start_time: float
    launched_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    exit_note: str | None = None
    stop_requested_by: str | None = None
    stop_requested_at: float | None = None

    @property
    def running(self) -> bool:
        """Whether the job has not been seen to end."""
        return self.ended_at is None

    def ended(self, **changes: Any) -> JobRecord:
        """A copy with the given fields changed."""
        return replace(self, **changes)

    def describe_exit(self) -> str:
        """A short human description of how the job ended ('running' while it runs)."""
        if self.running:
            return "running"
        if self.exit_signal is not None:
            return f"killed by signal {self.exit_signal}"
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        return self.exit_note or "ended, exit status unknown"


class JobStore:
    """Reads and writes job directories under ``<state_dir>/jobs``. Blocking, small I/O."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ensure_private_dir(root)

    def job_dir(self, batch_id: str) -> Path:
        """The directory of one job (batch ids are validated to a safe shape upstream)."""
        return self.root / batch_id

    def prepare(self, batch_id: str) -> Path:
        """Create the job's directory and return the path its log file should have."""
        directory = self.job_dir(batch_id)
        ensure_private_dir(directory)
        return directory / "output.log"

    def discard(self, batch_id: str) -> None:
        """Remove a job directory (used when a launch failed before anything ran)."""
        shutil.rmtree(self.job_dir(batch_id), ignore_errors=True)

    def save(self, record: JobRecord) -> None:
        """Write ``job.json`` atomically. Raises OSError."""
        atomic_write_json(self.job_dir(record.batch_id) / "job.json", asdict(record))

    def load_all(self) -> list[JobRecord]:
        """Every readable job record; unreadable ones are logged and skipped."""
        known = {f.name for f in fields(JobRecord)}
        records = []
        for path in sorted(self.root.glob("*/job.json")):
            try:
                data = read_json(path)
                records.append(JobRecord(**{k: v for k, v in data.items() if k in known}))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("job record unreadable, skipped", path=str(path), error=str(exc))
        return records
