"""The agent as a child subreaper, so that a job whose shim was killed is still the agent's.

With ``PR_SET_CHILD_SUBREAPER`` set on the agent, a job whose shim dies is re-parented to the
agent (its nearest subreaper ancestor) instead of to init: the agent can then wait for it and
learn its real exit status, and its orphaned daemons are found below the agent. Orphans that
die must be reaped, or they stay zombies: ``reap_orphans`` collects them, leaving alone the
agent's own children that asyncio waits for (the shims it started) and processes of the
agent's own session (a caller's subprocesses, e.g. in tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Collection

from argus_agent.jobs.procfs import PPID, SESSION, STATE, stat_fields
from argus_agent.jobs.shim import PR_SET_CHILD_SUBREAPER

PR_GET_CHILD_SUBREAPER = 37


def set_subreaper(enabled: bool) -> bool:
    """Make this process a child subreaper (or stop being one). Returns whether it worked
    (False off Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap(pid: int) -> int | None:
    """Collect ``pid`` if it is an exited child of this process; its wait status, else None
    (still running, or not our child)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done == pid else None


def reap_orphans(keep: Collection[int]) -> dict[int, int]:
    """Reap exited orphans re-parented to this process; returns pid → wait status.

    Skips ``keep`` (children someone else waits for) and children of this process's own
    session (orphans of jobs never share it: shims and jobs start sessions of their own).
    Blocking: one pass over /proc.
    """
    me = os.getpid()
    my_session = os.getsid(0)
    reaped: dict[int, int] = {}
    names: list[str] = []
    with contextlib.suppress(OSError):
        names = os.listdir("/proc")
    for name in names:
        if not name.isdigit() or int(name) in keep:
            continue
        fields = stat_fields(int(name))
        if (
            not fields
            or fields[STATE] != b"Z"
            or int(fields[PPID]) != me
            or int(fields[SESSION]) == my_session
        ):
            continue
        status = reap(int(name))
        if status is not None:
            reaped[int(name)] = status
    return reaped
