"""Find a job's processes and signal them, only ever the processes meant.

A process is identified by its pid **and** its start time in clock ticks since boot
(``/proc/<pid>/stat`` field 22), so a recycled pid is never taken for a job, and every
signal goes through a pidfd opened before the start time is checked (``shim.signal_process``),
so a pid recycled between finding and signalling is never hit either.

Normally a job's shim stops the job (it is a child subreaper, so even double-forked
descendants stay below it). The functions here are the agent's own fallback for a job whose
shim is gone (killed by the OOM killer or an operator, or by the job itself). The job's
processes are then:

- the job's root and its descendants (the root only while it is the recorded process);
- members of the job's process group or session, but only while that id can still be the
  job's: a group or session id stays allocated while any member lives, so members found
  under it belong to the job unless a *different* process now leads a group of that id
  (the id was freed and reused, and its members are strangers);
- processes carrying the job's ``ARGUS_BATCH_ID`` in their environment (inherited by
  everything the job starts, including daemons that left its session and tree);
- orphans re-parented to the agent (a child subreaper) that started after the job, are not
  the agent's own children (shims, its own session) and carry no other batch's id: what a
  job whose shim died left behind, even with its environment cleared;
- and the descendants of all of these.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Container
from dataclasses import dataclass, field

from argus_agent.jobs.procfs import (
    PGRP,
    SESSION,
    STATE,
    boot_id,
    descendants,
    proc_table,
    signal_process,
    start_ticks,
    stat_fields,
)

__all__ = [
    "StopResult",
    "boot_id",
    "descendants",
    "is_same_process",
    "job_processes",
    "start_ticks",
    "terminate_processes",
]

#: How long the fallback stop keeps sending SIGKILL to processes that will not die.
UNKILLABLE_WAIT_S = 10.0


def _state(pid: int) -> str | None:
    fields = stat_fields(pid)
    return fields[STATE].decode() if fields else None


def is_same_process(pid: int | None, ticks: int | None) -> bool:
    """True when ``pid`` is alive, not a zombie, and started at ``ticks``."""
    if pid is None or ticks is None:
        return False
    return start_ticks(pid) == ticks and _state(pid) not in (None, "Z", "X")


def _group_ids(pid: int) -> tuple[int, int] | None:
    """(process group, session) of ``pid`` from /proc/<pid>/stat, or None."""
    fields = stat_fields(pid)
    return (int(fields[PGRP]), int(fields[SESSION])) if fields else None


def _batch_of(pid: int) -> str | None:
    """The ``ARGUS_BATCH_ID`` in the environment of ``pid`` (None: none, or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"ARGUS_BATCH_ID="):
            return entry[len(b"ARGUS_BATCH_ID=") :].decode(errors="replace")
    return None


def job_processes(
    root_pid: int | None,
    root_ticks: int | None,
    group: int | None,
    batch_id: str | None,
    *,
    exclude: Container[int] = (),
) -> dict[int, int]:
    """The live processes of a job whose shim is gone → their start ticks (see the module
    doc for which). Blocking: one pass over /proc (plus one environ read per process when
    ``batch_id`` is given). Never includes this process or ``exclude`` (other jobs' roots,
    shims), nor a process carrying another batch's ``ARGUS_BATCH_ID``."""
    me = os.getpid()
    my_session = os.getsid(0)
    table = proc_table()
    root_alive = root_pid is not None and is_same_process(root_pid, root_ticks)
    # A group/session id is the job's unless another process now leads one of that id.
    group_is_ours = group is not None and (
        group not in table or (group == root_pid and table[group][2] == root_ticks)
    )
    seeds: set[int] = set()
    if root_alive and root_pid is not None:
        seeds.add(root_pid)
    for pid, (ppid, state, ticks) in table.items():
        if pid == me or pid in exclude or state in ("Z", "X"):
            continue
        if group_is_ours:
            ids = _group_ids(pid)
            if ids is not None and group in ids:
                seeds.add(pid)
                continue
        batch = _batch_of(pid) if batch_id is not None else None
        if batch is not None:
            if batch == batch_id:
                seeds.add(pid)
            continue
        # An orphan of a job re-parented to the agent (its subreaper), even with a cleared
        # environment: not the agent's own child (those share its session or are shims).
        if batch_id is not None and ppid == me:
            ids = _group_ids(pid)
            started_after = root_ticks is None or ticks >= root_ticks
            if ids is not None and ids[1] != my_session and started_after:
                seeds.add(pid)
    found: dict[int, int] = {}
    for pid in seeds:
        if pid in table:
            found[pid] = table[pid][2]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _ticks) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found and table[child][1] not in ("Z", "X"):
                found[child] = table[child][2]
                stack.append(child)
    found.pop(me, None)
    return found


def signal_all(processes: dict[int, int], sig: int) -> int:
    """Send ``sig`` to each (pid, start ticks), verified; returns how many were signalled."""
    return sum(signal_process(pid, ticks, sig) for pid, ticks in processes.items())


@dataclass
class StopResult:
    """What a fallback stop did."""

    signalled: int = 0
    killed: int = 0
    #: Processes still alive after SIGKILL for ``UNKILLABLE_WAIT_S`` (they would not die).
    survivors: list[int] = field(default_factory=list)


async def terminate_processes(
    root_pid: int | None,
    root_ticks: int | None,
    group: int | None,
    batch_id: str | None,
    grace_s: float,
    *,
    poll_s: float = 0.1,
    unkillable_wait_s: float = UNKILLABLE_WAIT_S,
    exclude: Container[int] = (),
) -> StopResult:
    """SIGTERM the job's processes, wait up to ``grace_s`` for them to go, then SIGKILL
    what is left until nothing is left or ``unkillable_wait_s`` passed. Blocks its coroutine
    up to ``grace_s + unkillable_wait_s``; the /proc passes run in a thread."""

    def collect() -> dict[int, int]:
        return job_processes(root_pid, root_ticks, group, batch_id, exclude=exclude)

    result = StopResult()
    found = await asyncio.to_thread(collect)
    if not found:
        return result
    result.signalled = signal_all(found, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(collect)
        if not found:
            return result
        signal_all(found, signal.SIGTERM)  # late arrivals get the same warning
        await asyncio.sleep(poll_s)
    give_up = time.monotonic() + unkillable_wait_s
    killed: set[int] = set()
    while time.monotonic() < give_up:
        found = await asyncio.to_thread(collect)
        if not found:
            break
        killed.update(
            pid for pid, ticks in found.items() if signal_process(pid, ticks, signal.SIGKILL)
        )
        await asyncio.sleep(poll_s)
    result.killed = len(killed)
    if not found:
        return result
    result.survivors = sorted(await asyncio.to_thread(collect))
    return result
