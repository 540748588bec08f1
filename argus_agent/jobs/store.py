"""The jobs part of the state dir: one directory per job, ``jobs/<batch_id>/``.

Each file has one writer, so the agent and the per-job supervisor (shim) never race:

| file           | writer | content                                                        |
|----------------|--------|----------------------------------------------------------------|
| ``job.json``   | agent  | what to run, for whom, as whom, in which cgroups (written      |
|                |        | before the launch, so a restarted agent knows them too)        |
| ``started.json``| shim  | job pid, process group, start ticks of job and shim            |
| ``stop.json``  | agent  | who asked to stop, when, with which grace period               |
| ``exit.json``  | shim   | exit code or signal, end time, OOM kills and memory peak and   |
|                |        | limit of the job's cgroup (the agent writes it only for a job  |
|                |        | whose shim vanished without writing it)                        |
| ``output.log`` | shim   | the job's stdout and stderr                                    |

A :class:`JobRecord` is the view assembled from these files. ``load`` checks every field's
type (and that pids are positive) and raises :class:`JobRecordError` naming the file and the
field; no record with a wrong-typed field ever reaches the job table, the status socket or a
stop. At start-up the supervisor loads with ``quarantine=True``: a job dir whose record is
damaged is moved to ``jobs/.quarantine/<batch_id>`` (a ``quarantine.json`` in it says why),
logged with its path and reason, and listed in ``JobStore.quarantined`` (and in status) until
an operator removes it; the other jobs are not affected. Read-only callers (``argus-agent
jobs``) only skip such records.
"""

from __future__ import annotations

import signal
import time
import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from argus_agent.fsutil import atomic_write_json, read_json
from argus_agent.jobs import cgroupfs
from argus_agent.jobs.recorddirs import (
    JobRecordError,
    RecordDirs,
    type_name,
    type_ok,
)
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
    "cgroup",
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
#: A POSIX shell whose child was killed by signal N exits 128 + N.
SHELL_EXIT_SIGNAL = 128
EXIT_FIELDS = (
    "exit_code",
    "exit_signal",
    "ended_at",
    "exit_note",
    "killed_after_grace",
    "log_truncated",
    "log_error",
    "oom_kills",
    "memory_peak_bytes",
    "memory_limit_bytes",
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
    #: The job's cgroups (``cgroupfs``: ``{"v2": path, "memory": path, ...}``), None when
    #: it has none (tracked through /proc).
    cgroup: dict[str, str] | None = None
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
    #: From the job's cgroup at its end: processes the kernel's OOM killer killed, the
    #: memory peak and the limit it ran under (the host's memory when none was set).
    oom_kills: int | None = None
    memory_peak_bytes: int | None = None
    memory_limit_bytes: int | None = None

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

    @property
    def oom_reason(self) -> str | None:
        """ "killed by the kernel OOM killer (memory peak … of …)" when the OOM killer
        killed a process of the job, else None."""
        return cgroupfs.oom_reason(
            {
                "oom_kills": self.oom_kills,
                "memory_peak_bytes": self.memory_peak_bytes,
                "memory_limit_bytes": self.memory_limit_bytes,
            }
        )

    @property
    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer ended the job: its cgroup saw OOM kills, no stop
        was asked for, and the main process died of SIGKILL, or exited 128 + 9 (a shell
        that ran the killed command as its child, without exec, exits so)."""
        return (
            bool(self.oom_kills)
            and not self.stop_requested_at
            and (
                self.exit_signal == signal.SIGKILL
                or (
                    self.exit_signal is None
                    and self.exit_code == SHELL_EXIT_SIGNAL + signal.SIGKILL
                )
            )
        )

    def describe_exit(self) -> str:
        """A short human description of how the job ended ('running' while it runs)."""
        if self.ended_at is None:
            return self.state
        oom = self.oom_reason
        if oom is not None and self.oom_killed:
            text = oom  # the OOM killer ended the job (its main process, or the shell's child)
            if self.exit_signal is None:
                text += f"; exit code {self.exit_code}"
            if self.exit_note:
                text += f"; {self.exit_note}"
            return text
        if self.exit_signal is not None:
            try:
                name = signal.Signals(self.exit_signal).name
            except ValueError:
                name = str(self.exit_signal)
            text = f"killed by signal {self.exit_signal} ({name})"
        elif self.exit_code is not None:
            text = f"exit code {self.exit_code}"
        else:
            text = self.exit_note or "ended, exit status unknown"
            return f"{oom}; {text}" if oom is not None else text
        if self.stop_requested_at:
            who = self.stop_requested_by or "unknown"
            text += f", stopped on request of {who}"
            if self.killed_after_grace:
                text += " (SIGKILL after the grace period)"
        if oom is not None:  # a worker was killed, the main process ended otherwise
            text += f"; a process of the job was {oom}"
        if self.exit_note:  # e.g. a stop that gave up on processes that would not die
            text += f"; {self.exit_note}"
        return text


#: Fields naming processes: a pid of 0 or below would signal a whole group, or everything.
POSITIVE_FIELDS = frozenset({"pid", "pgid", "shim_pid"})
NON_NEGATIVE_FIELDS = frozenset({"uid", "gid", "start_ticks", "shim_start_ticks"})
_HINTS: dict[str, Any] = typing.get_type_hints(JobRecord)
_REQUIRED = tuple(
    f.name for f in fields(JobRecord) if f.default is MISSING and f.default_factory is MISSING
)


def _checked(path: Path, part: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The fields ``keys`` of one record file, each checked against JobRecord's types."""
    if not isinstance(part, dict):
        raise JobRecordError(path, f"not a JSON object but {type(part).__name__}")
    picked = {k: part[k] for k in keys if k in part}
    for key, value in picked.items():
        hint = _HINTS[key]
        if not type_ok(value, hint):
            raise JobRecordError(
                path, f"field {key!r} is {value!r:.80}, expected {type_name(hint)}"
            )
        if value is not None and (
            (key in POSITIVE_FIELDS and value <= 0) or (key in NON_NEGATIVE_FIELDS and value < 0)
        ):
            raise JobRecordError(path, f"field {key!r} is {value!r}, out of range")
    return picked


def _read_part(path: Path) -> Any:
    """Parse one record file. Raises OSError, or JobRecordError when it is not JSON."""
    try:
        return read_json(path)
    except UnicodeDecodeError as exc:
        raise JobRecordError(path, f"not UTF-8 text: {exc}") from None
    except ValueError as exc:
        raise JobRecordError(path, f"not valid JSON: {exc}") from None


class JobStore(RecordDirs[JobRecord]):
    """Reads and writes job directories under ``<state_dir>/jobs`` (the directories, and
    setting damaged ones aside, are ``RecordDirs``'). Blocking, small I/O."""

    def create(self, record: JobRecord) -> Path:
        """Create the job's directory and write its intent (``job.json``); returns the dir.
        Raises FileExistsError when the batch already has a job dir, OSError otherwise."""
        directory = self.job_dir(record.batch_id)
        directory.mkdir(mode=0o700)
        atomic_write_json(directory / "job.json", _pick(record, INTENT_FIELDS))
        return directory

    def write_stop(self, record: JobRecord) -> None:
        """Record the stop request of ``record`` (``stop.json``)."""
        atomic_write_json(self.job_dir(record.batch_id) / "stop.json", _pick(record, STOP_FIELDS))

    def write_exit(self, batch_id: str, info: dict[str, Any]) -> None:
        """Write ``exit.json`` for a job whose shim is gone (the agent took it over)."""
        atomic_write_json(self.job_dir(batch_id) / "exit.json", info)

    def write_lost_exit(
        self, batch_id: str, note: str, facts: dict[str, int | None] | None = None
    ) -> None:
        """Write ``exit.json`` for a job whose shim vanished without writing one (with the
        memory ``facts`` of its cgroup, when it has one)."""
        atomic_write_json(
            self.job_dir(batch_id) / "exit.json",
            {"ended_at": time.time(), "exit_note": note, **(facts or {})},
        )

    def load(self, batch_id: str) -> JobRecord:
        """Assemble the record of one job. Raises OSError (unreadable: may pass) or
        JobRecordError (a ValueError: a file is damaged, naming it and the field)."""
        directory = self.job_dir(batch_id)
        intent_path = directory / "job.json"
        data = _checked(intent_path, _read_part(intent_path), INTENT_FIELDS)
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise JobRecordError(intent_path, f"field(s) {', '.join(missing)} missing")
        if data["batch_id"] != batch_id:
            raise JobRecordError(
                intent_path, f"batch_id {data['batch_id']!r} differs from its directory"
            )
        for name, keys in (
            ("started.json", STARTED_FIELDS),
            ("stop.json", STOP_FIELDS),
            ("exit.json", EXIT_FIELDS),
        ):
            path = directory / name
            if path.exists():
                data.update(_checked(path, _read_part(path), keys))
        return JobRecord(**data)


def _pick(record: JobRecord, keys: tuple[str, ...]) -> dict[str, Any]:
    data = asdict(record)
    return {k: data[k] for k in keys}
