"""What both job tables' stores share (``store.JobStore``: local jobs under ``jobs/``,
``slurm_store.SlurmStore``: Slurm jobs under ``slurm/``): one private directory per job
named by its batch id, the check of a record field's type, and setting a damaged record
aside in ``.quarantine/`` (with a ``quarantine.json`` saying why), listed in
``quarantined`` until an operator removes it. Blocking, small I/O.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Any, Generic, TypeVar

from argus_agent.errors import StateError
from argus_agent.fsutil import atomic_write_json, ensure_private_dir, read_json
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: The record type a store reads (``JobRecord``, ``SlurmJobRecord``).
R = TypeVar("R")

#: Where damaged job records are moved, under a store's dir (not a batch id: never loaded).
QUARANTINE_DIR = ".quarantine"


class JobRecordError(ValueError):
    """A job record file that is not what the agent wrote: not JSON, not an object, a field
    missing or of the wrong type. ``path`` is the file, ``reason`` what is wrong with it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a job record field's annotation (both job tables)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    """An annotation as an error message shows it (``int | null``)."""
    return str(hint).replace("typing.", "").replace("NoneType", "null")


class RecordDirs(abc.ABC, Generic[R]):
    """One directory per job under ``root``; subclasses read and write what is in them
    (``load`` a record or raise :class:`JobRecordError`).

    ``quarantined`` lists the damaged records found: ``{"batch_id", "path", "reason", "at"}``
    (``"earlier": True`` for those an earlier run set aside), where ``path`` is the job dir
    in ``.quarantine/`` (or where it stayed, when it could not be moved).
    """

    #: What the store holds, for errors and logs.
    what = "job"
    #: The directory's name in errors ("the jobs directory").
    dir_name = "jobs directory"

    def __init__(self, root: Path) -> None:
        """Raises StateError (path and fix) when the directory cannot be created or used."""
        self.root = root
        try:
            ensure_private_dir(root)
        except OSError as exc:
            raise StateError(
                f"{root}: cannot use the {self.dir_name}: {exc.strerror or exc}; fix: make "
                "it (and the state dir above it) a directory the agent's user can write, then "
                "start the agent again"
            ) from None
        self.quarantined: list[dict[str, Any]] = []

    def job_dir(self, batch_id: str) -> Path:
        """The directory of one job (batch ids are validated to a safe shape upstream)."""
        return self.root / batch_id

    def discard(self, batch_id: str) -> None:
        """Remove a job directory (a launch or submission that failed, or pruning)."""
        shutil.rmtree(self.job_dir(batch_id), ignore_errors=True)

    @abc.abstractmethod
    def load(self, batch_id: str) -> R:
        """One job's record; raises OSError, or JobRecordError naming file and field."""

    def load_all(self, *, quarantine: bool = False) -> list[R]:
        """Every readable job record (``load``). A damaged one (:class:`JobRecordError`) is
        skipped and listed in ``quarantined``; with ``quarantine`` (the agent at start-up) its
        directory is also moved to ``.quarantine/``. Unreadable ones (OSError) are logged and
        skipped, to be read again next time."""
        records = []
        for path in sorted(self.root.glob("*/job.json")):
            batch_id = path.parent.name
            try:
                records.append(self.load(batch_id))
            except JobRecordError as exc:
                self.set_aside(batch_id, exc, move=quarantine)
            except OSError as exc:
                log.warning(
                    f"{self.what} record unreadable, skipped", path=str(path), error=str(exc)
                )
        if quarantine:
            self.quarantined.extend(self._earlier_quarantined())
        return records

    def set_aside(self, batch_id: str, exc: JobRecordError, *, move: bool = True) -> None:
        """Report a damaged job record, and (``move``) move its directory to
        ``.quarantine/`` with a ``quarantine.json`` saying why. Never raises."""
        directory = self.job_dir(batch_id)
        where = directory
        note = ""
        if move:
            target = self.root / QUARANTINE_DIR / batch_id
            try:
                (self.root / QUARANTINE_DIR).mkdir(mode=0o700, exist_ok=True)
                if target.exists():
                    target = target.with_name(f"{batch_id}-{time.time_ns()}")
                os.rename(directory, target)
                where = target
            except OSError as move_error:
                note = f" (could not be moved: {move_error.strerror or move_error})"
            else:
                with contextlib.suppress(OSError):
                    atomic_write_json(
                        target / "quarantine.json",
                        {"reason": str(exc), "at": time.time(), "batch_id": batch_id},
                    )
        entry = {"batch_id": batch_id, "path": str(where), "reason": str(exc), "at": time.time()}
        self.quarantined.append(entry)
        if move:
            message = (
                f"{self.what} record damaged: the job is no longer followed or reported, its "
                f"directory is kept in {QUARANTINE_DIR}{note}; fix the file and move the "
                "directory back before a restart to resume it, or delete it"
            )
        else:
            message = f"{self.what} record damaged"
        log.error(message, batch_id=batch_id, path=str(where), reason=str(exc))

    def _earlier_quarantined(self) -> list[dict[str, Any]]:
        """Job dirs earlier runs moved to quarantine and nobody removed yet."""
        found = []
        listed = {entry["path"] for entry in self.quarantined}
        with contextlib.suppress(OSError):
            for directory in sorted((self.root / QUARANTINE_DIR).iterdir()):
                if str(directory) in listed or not directory.is_dir():
                    continue
                try:
                    info = read_json(directory / "quarantine.json")
                    reason, at = str(info["reason"]), float(info["at"])
                except (OSError, ValueError, TypeError, KeyError):
                    reason, at = "quarantined by an earlier run", directory.stat().st_mtime
                found.append(
                    {
                        "batch_id": directory.name,
                        "path": str(directory),
                        "reason": reason,
                        "at": at,
                        "earlier": True,
                    }
                )
        return found
