"""Damaged and unwritable SQLite state files, shared by the telemetry outbox (``outbox.py``,
``outbox_writer.py``) and the command ledger (``ledger.py``).

Owns telling a damaged database from an unwritable one from a passing failure
(``is_corrupt``, ``is_unwritable``), the error each becomes (``unwritable_error``: a
StateError naming the path and the fix; ``unavailable_error``: a StateUnavailableError the
service manager retries), moving a damaged file aside as ``<name>.corrupt-<UTC time>``
(``set_aside``, ``earlier_set_aside``) and copying what can still be read of it into a fresh
one (``salvage_copy``).

Threads: none of its own. Each function runs on the thread that owns the database it is
given: the outbox's writer thread (``argus-outbox``) for ``outbox.db``, the event loop for
the ledger's ``state.db``. It keeps no state between calls.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import pwd
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from argus_agent.errors import StateError, StateUnavailableError
from argus_agent.sqlitetx import transaction

#: SQLite primary result codes saying the database file itself is damaged.
CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
#: ... saying the file or its directory cannot be opened or written: a restart cannot help.
UNWRITABLE_CODES = frozenset({3, 8, 14, 23})  # PERM, READONLY, CANTOPEN, AUTH
#: The name of a set-aside copy: ``<name>.corrupt-<UTC time>``.
SET_ASIDE_TAG = ".corrupt-"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"

#: Rows copied out of a damaged database per transaction.
SALVAGE_BATCH = 1000


class DamagedDatabaseError(sqlite3.DatabaseError):
    """A database that opens but fails SQLite's integrity check."""


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an error (None when it carries none)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged (moving it aside is the cure)."""
    return isinstance(exc, DamagedDatabaseError) or sqlite_code(exc) in CORRUPT_CODES


def is_unwritable(exc: BaseException) -> bool:
    """Whether ``exc`` says the file or its directory may not be opened or written."""
    return sqlite_code(exc) in UNWRITABLE_CODES


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def unwritable_error(
    path: Path,
    what: str,
    exc: BaseException,
    cls: type[StateError] = StateError,
    *,
    damaged: BaseException | None = None,
) -> StateError:
    """The StateError for a state database the agent may not open or write (``damaged``:
    the reason a damaged one was to be replaced)."""
    problem = (
        f"the {what} is damaged ({damaged}) and no fresh one can be written: {exc}"
        if damaged is not None
        else f"cannot open the {what}: {exc}"
    )
    return cls(
        f"{path}: {problem}; fix: make {path.parent} and the files in it writable by "
        f"{_user()} (check their owner and mode, and that the filesystem is mounted "
        "read-write), or set agent.state_dir to a directory that is, then start the agent "
        "again"
    )


def unavailable_error(
    path: Path, what: str, exc: BaseException, *, damaged: BaseException | None = None
) -> StateUnavailableError:
    """The retryable error for a state database that failed for another reason."""
    problem = (
        f"the {what} is damaged ({damaged}) and cannot be replaced now"
        if damaged is not None
        else f"cannot use the {what} now"
    )
    return StateUnavailableError(
        f"{path}: {problem}: {exc}; the agent tries again when restarted (check the free "
        f"space and health of the disk holding {path.parent})"
    )


def set_aside(path: Path, *, now: float | None = None) -> Path:
    """Rename a damaged database (and its ``-wal`` / ``-shm``) to ``<name>.corrupt-<UTC
    time>`` next to it, so that a fresh one can take its place; returns the new path.
    Raises OSError when it cannot be moved."""
    stamp = time.strftime(STAMP_FORMAT, time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}{SET_ASIDE_TAG}{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_TAG}{stamp}-{number}")
    os.rename(path, target)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        try:
            os.rename(side, Path(f"{target}{suffix}"))
        except FileNotFoundError:
            continue
        except OSError:
            side.unlink()  # never leave an old log beside the fresh database
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target


def earlier_set_aside(path: Path) -> list[dict[str, Any]]:
    """The damaged copies of ``path`` that earlier runs set aside and nobody removed yet."""
    found = []
    with contextlib.suppress(OSError):
        for kept in sorted(path.parent.glob(f"{path.name}{SET_ASIDE_TAG}*")):
            if kept.name.endswith(("-wal", "-shm")):
                continue
            stamp = kept.name[len(path.name) + len(SET_ASIDE_TAG) :][:16]
            try:
                at = float(calendar.timegm(time.strptime(stamp, STAMP_FORMAT)))
            except ValueError:
                at = kept.stat().st_mtime
            found.append(
                {
                    "path": str(kept),
                    "at": at,
                    "reason": "set aside by an earlier run of the agent (its log says why); "
                    "delete it once inspected",
                    "earlier": True,
                }
            )
    return found


def swap_in_salvage(
    path: Path,
    schema: str,
    tables: Sequence[tuple[str, Sequence[str] | None]],
    *,
    what: str,
    damage: BaseException,
    open_error: Callable[[BaseException, BaseException], Exception],
    move_error: Callable[[str], Exception],
) -> tuple[dict[str, int], Path]:
    """Replace the damaged database ``path`` (the ``what``, e.g. "command ledger") with a
    fresh one holding what can still be read of it: salvage into ``<name>.new``, set the
    damaged file aside, move the fresh one in. Returns (rows copied per table, where the
    damaged file was kept). A salvage that cannot be written raises ``open_error(error,
    damage)``; a damaged file that cannot be moved raises ``move_error(message)`` with the
    path and the fix; the half-made copy is removed then."""
    fresh = path.with_name(f"{path.name}.new")
    try:
        copied = salvage_copy(path, fresh, schema, tables)
    except sqlite3.Error as write_error:
        raise open_error(write_error, damage) from None
    try:
        kept = set_aside(path)
        os.replace(fresh, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            fresh.unlink()
        raise move_error(
            f"{path}: the {what} is damaged ({damage}) and cannot be moved aside "
            f"({exc.strerror or exc}); fix: move or delete {path} (and {path.name}-wal, "
            f"{path.name}-shm beside it) by hand, then start the agent again"
        ) from None
    return copied, kept


def salvage_copy(
    source: Path,
    target: Path,
    schema: str,
    tables: Sequence[tuple[str, Sequence[str] | None]],
) -> dict[str, int]:
    """Create a fresh database at ``target`` with ``schema`` and copy into it, table by
    table, the rows of the damaged ``source`` that can still be read (each table up to its
    first unreadable row; ``None`` columns: those of the fresh table). Returns the rows
    copied per table. Raises sqlite3.Error when ``target`` cannot be written."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):  # a leftover of an interrupted recovery
            os.unlink(f"{target}{suffix}")
    copied = {name: 0 for name, _ in tables}
    padded = _padded_copy(source, Path(f"{target}.salvage"))
    fresh = sqlite3.connect(target, isolation_level=None)
    try:
        fresh.execute("PRAGMA journal_mode=WAL")
        fresh.execute("PRAGMA synchronous=FULL")
        fresh.executescript(schema)
        try:
            old = sqlite3.connect(
                f"file:{urllib.parse.quote(str(padded or source))}?mode=ro",
                uri=True,
                isolation_level=None,
            )
        except sqlite3.Error:
            return copied
        try:
            for name, wanted in tables:
                columns = wanted or [r[1] for r in fresh.execute(f"PRAGMA table_info({name})")]
                cols = ", ".join(columns)
                marks = ", ".join("?" * len(columns))
                insert = f"INSERT OR IGNORE INTO {name} ({cols}) VALUES ({marks})"
                try:
                    rows = old.execute(f"SELECT {cols} FROM {name}")
                except sqlite3.Error:
                    continue  # nothing of this table can be read
                readable = True
                while readable:
                    batch = []
                    while len(batch) < SALVAGE_BATCH:
                        try:
                            row = next(rows, None)
                        except sqlite3.Error:
                            row = None  # the damaged source ends here: keep what was read
                        if row is None:
                            readable = False
                            break
                        batch.append(row)
                    with transaction(fresh):  # a failing fresh copy raises
                        fresh.executemany(insert, batch)
                    copied[name] += len(batch)
        finally:
            old.close()
    finally:
        fresh.close()
        if padded is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{padded}{suffix}")
    return copied


def _padded_copy(source: Path, copy: Path) -> Path | None:
    """A copy of a truncated database grown back to the size its header names (zeros at
    the end), which SQLite will read up to the missing pages; it refuses the truncated file
    as a whole. None when ``source`` is not truncated or no copy can be made."""
    try:
        with open(source, "rb") as handle:
            header = handle.read(100)
            size = os.fstat(handle.fileno()).st_size
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return None
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        valid = header[24:28] == header[92:96]  # the in-header size is current
        if not valid or pages * page_size <= size:
            return None
        shutil.copyfile(source, copy)
        os.truncate(copy, pages * page_size)
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(f"{source}-wal", f"{copy}-wal")
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(copy)
        return None
    return copy
