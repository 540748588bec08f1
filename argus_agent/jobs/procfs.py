"""Processes as /proc shows them, and signals that only reach the process meant.

Stdlib only: the per-job supervisor (``shim.py``, run as a script with ``-I -S``) imports
it from its own directory, the agent as ``argus_agent.jobs.procfs``. A process is
identified by its pid **and** its start time (``/proc/<pid>/stat`` field 22, clock ticks
since boot), so a recycled pid is never taken for another process.
"""

from __future__ import annotations

import os
import signal

#: Indexes into ``split_stat``'s list (stat field number minus 3: the list starts after
#: ``pid (comm)``); see proc(5).
STATE, PPID, PGRP, SESSION, UTIME, STIME, NUM_THREADS, START_TICKS, RSS_PAGES = (
    0, 1, 2, 3, 11, 12, 17, 19, 21
)  # fmt: skip


def split_stat(data: bytes) -> list[bytes]:
    """The fields of a ``/proc/<pid>/stat`` line after ``(comm)``, state first: the one
    parser of that file (the command name may hold spaces and parentheses, so the split
    starts after its last ``)``). Only the fields up to the RSS are split off (the rest
    stays in the last item). Raises ValueError on a line without ``)``."""
    return data[data.rindex(b")") + 2 :].split(b" ", RSS_PAGES + 2)


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after ``(comm)`` (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return split_stat(handle.read())
    except (OSError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or None."""
    fields = stat_fields(pid)
    return int(fields[START_TICKS]) if fields else None


def boot_id() -> str | None:
    """This boot's id (start ticks only identify a process within one boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


def proc_table() -> dict[int, tuple[int, str, int]]:
    """pid → (ppid, state, start ticks) for every process (one pass over /proc)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = split_stat(handle.read())
        except (OSError, ValueError):
            continue
        table[int(name)] = (int(fields[PPID]), fields[STATE].decode(), int(fields[START_TICKS]))
    return table


def descendants_with_ticks(root: int) -> dict[int, int]:
    """Live (non-zombie) descendants of ``root`` (excluding it) → their start ticks."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _ticks) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid: table[pid][2] for pid in found if table[pid][1] not in ("Z", "X")}


def descendants(root: int) -> set[int]:
    """Live (non-zombie) descendants of ``root``, excluding ``root``."""
    return set(descendants_with_ticks(root))


def signal_process(pid: int, ticks: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process that started at ``ticks``.

    A pidfd pins the process first and its start time is checked after, so a pid that was
    recycled between finding it and signalling it is never hit. Returns whether the signal
    was sent (False: gone, recycled, or not permitted)."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return False
    try:
        if ticks is not None and start_ticks(pid) != ticks:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
