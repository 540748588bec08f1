"""Find a job's whole process tree and signal it; escalate from SIGTERM to SIGKILL.

A job's tree is every live process that is a descendant of its root pid, or shares its process
group, or its session (jobs start in a new session, so the session catches children that
changed group; issue-3 supervision will also catch those that left the session).
One pass over all processes per call. Zombies count as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import psutil


def process_start_time(pid: int) -> float | None:
    """The kernel's start time of ``pid`` (epoch seconds), or None when it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def is_same_process(pid: int, start_time: float) -> bool:
    """True when ``pid`` is alive, not a zombie, and is the process that started at
    ``start_time`` (so a recycled pid is never taken for the job)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - start_time) < 0.05
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def job_tree(root_pid: int | None, group: int) -> set[int]:
    """Pids of the live processes in the job's tree (see module doc); excludes this process.

    ``root_pid`` None means the root has ended (its pid may already belong to someone else):
    only the group/session members and their descendants are collected.
    """
    me = os.getpid()
    children: dict[int, list[int]] = {}
    members: set[int] = set()
    for proc in psutil.process_iter(["pid", "ppid", "status"]):
        info = proc.info
        pid = info["pid"]
        if pid == me or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        children.setdefault(info["ppid"] or 0, []).append(pid)
        try:
            if os.getpgid(pid) == group or os.getsid(pid) == group:
                members.add(pid)
        except OSError:
            continue
    if root_pid is not None:
        members.add(root_pid)
    stack = list(members)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in members:
                members.add(child)
                stack.append(child)
    return {pid for pid in members if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def signal_tree(pids: set[int], group: int, sig: int) -> None:
    """Send ``sig`` to the process group and to each pid; vanished processes are ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def terminate_tree(
    root_pid: int, root_start_time: float, group: int, grace_s: float, *, poll_s: float = 0.1
) -> tuple[int, int]:
    """SIGTERM the tree, wait up to ``grace_s`` for it to empty, then SIGKILL what is left,
    again until nothing is left (new children included). Blocks its coroutine up to
    ``grace_s`` plus a few seconds. Returns (processes signalled, processes SIGKILLed).
    """

    def collect() -> set[int]:
        root = root_pid if is_same_process(root_pid, root_start_time) else None
        return job_tree(root, group)

    pids = await asyncio.to_thread(collect)
    signalled = len(pids)
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
