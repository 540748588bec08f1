"""Find a job's whole process tree and signal it; identify processes safely.

A process is identified by its pid **and** its start time in clock ticks since boot
(``/proc/<pid>/stat`` field 22), so a recycled pid is never taken for a job.

Normally a job's shim stops the job (it is a child subreaper, so even double-forked
descendants stay below it). The functions here are the agent's own fallback for a job whose
shim vanished: the tree is then every live process that descends from the job's root, or
shares its process group or session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from argus_agent.jobs.shim import boot_id, descendants, start_ticks, stat_fields

__all__ = [
    "boot_id",
    "descendants",
    "is_same_process",
    "job_tree",
    "start_ticks",
    "terminate_tree",
]


def _state(pid: int) -> str | None:
    fields = stat_fields(pid)
    return fields[0].decode() if fields else None


def is_same_process(pid: int | None, ticks: int | None) -> bool:
    """True when ``pid`` is alive, not a zombie, and started at ``ticks``."""
    if pid is None or ticks is None:
        return False
    return start_ticks(pid) == ticks and _state(pid) not in (None, "Z", "X")


def job_tree(root_pid: int | None, group: int) -> set[int]:
    """Pids of the live processes of a job: descendants of ``root_pid`` (None when the root
    is gone) and members of process group or session ``group``. Excludes this process."""
    me = os.getpid()
    members: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.getpgid(pid) == group or os.getsid(pid) == group:
                members.add(pid)
        except OSError:
            continue
    if root_pid is not None:
        members.add(root_pid)
    for pid in list(members):
        members |= descendants(pid)
    return {p for p in members if p != me and _state(p) not in (None, "Z", "X")}


def signal_tree(pids: set[int], group: int, sig: int) -> None:
    """Send ``sig`` to the process group and to each pid; vanished processes are ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def terminate_tree(
    root_pid: int, root_ticks: int | None, group: int, grace_s: float, *, poll_s: float = 0.1
) -> tuple[int, int]:
    """SIGTERM the tree, wait up to ``grace_s`` for it to empty, then SIGKILL what is left,
    again until nothing is left. Blocks its coroutine up to ``grace_s`` plus a few seconds.
    Returns (processes signalled, processes SIGKILLed)."""

    def collect() -> set[int]:
        root = root_pid if is_same_process(root_pid, root_ticks) else None
        return job_tree(root, group)

    pids = await asyncio.to_thread(collect)
    signalled = len(pids)
    if not pids:
        return 0, 0
    signal_tree(pids, group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pids = await asyncio.to_thread(collect)
        if not pids:
            return signalled, 0
        await asyncio.sleep(poll_s)
    killed = 0
    for _ in range(50):
        pids = await asyncio.to_thread(collect)
        if not pids:
            break
        killed += len(pids)
        signal_tree(pids, group, signal.SIGKILL)
        await asyncio.sleep(poll_s)
    return signalled, killed
