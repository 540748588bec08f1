"""A job's control groups as files: place a process, kill everything in them, read the
counters the kernel keeps for them.

Stdlib only: the per-job supervisor (``shim.py``, run as a script with ``-I -S``) imports it
from its own directory, the agent as ``argus_agent.jobs.cgroupfs``. Nothing here decides
*whether* a job gets cgroups or where they live (that is ``cgroups.py``, the agent's side);
this module only acts on the paths it is given.

A job's cgroups are a plain dict (it travels as JSON in the launch spec and the job record):
``{"v2": <path in the cgroup v2 hierarchy>, "memory": <path in the v1 memory hierarchy>,
...}``: the v2 cgroup always (placement, ``cgroup.kill``, ``cgroup.events``, ``cpu.stat``),
and on a hybrid host one directory per v1 hierarchy used (``memory`` for usage, peak, OOM
kills and the memory limit; ``pids``, ``cpu`` for limits; ``blkio`` for IO bytes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

#: The key of a job's cgroup v2 directory in its cgroup dict (v1 ones are keyed by
#: controller name).
V2 = "v2"
#: How long a freeze (the kill fallback before ``cgroup.kill``, kernel < 5.14) may take.
FREEZE_WAIT_S = 1.0
#: v1 memory limits at or above this mean "no limit" (the kernel reports PAGE_COUNTER_MAX
#: pages, rounded: 9223372036854771712 on 4 KiB pages).
V1_UNLIMITED = 1 << 62
GIB = 1 << 30
MIB = 1 << 20
#: How a job's end reason starts when the kernel's OOM killer ended it.
OOM_KILLED = "killed by the kernel OOM killer"


def read_text(path: str) -> str | None:
    """A cgroup file's content, or None (gone, or not readable)."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return None


def read_int(path: str) -> int | None:
    """A one-number cgroup file (``memory.peak``, ``pids.current``...); None when absent,
    unreadable or ``max``."""
    text = read_text(path)
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``cpu.stat``, ``memory.stat``, ``memory.events``...) → dict."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            found[key] = int(value)
    return found


def read_keyed(path: str) -> dict[str, int]:
    """A ``key value`` cgroup file as a dict (empty when absent)."""
    text = read_text(path)
    return parse_keyed(text) if text else {}


def write(path: str, text: str) -> None:
    """Write one value to a cgroup file (one ``write``, as the kernel wants). Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def parse_pids(data: bytes) -> list[int]:
    """The pids of a ``cgroup.procs`` read."""
    return [int(word) for word in data.split()]


def procs(path: str) -> list[int]:
    """The processes in the cgroup ``path`` itself (not its children); [] when gone."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "rb") as handle:
            return parse_pids(handle.read())
    except OSError:
        return []


def procs_recursive(path: str) -> list[int]:
    """The processes in ``path`` and every cgroup below it (a root job may make its own)."""
    found = procs(path)
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                found.extend(procs_recursive(entry.path))
    return found


def place(paths: dict[str, str], pid: int = 0) -> None:
    """Move ``pid`` (0: the calling process) into each of the job's cgroups, the v2 one
    first. Children forked after this start there. Raises OSError naming the file."""
    for key in sorted(paths, key=lambda k: k != V2):
        target = os.path.join(paths[key], "cgroup.procs")
        try:
            write(target, str(pid))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot join {target}: {exc.strerror or exc}") from None


def signal_members(v2_path: str, sig: int) -> int:
    """Send ``sig`` to every process in the cgroup and below. Each is pinned by a pidfd
    first and signalled only if the cgroup still lists it after that, so a member that
    exited and whose pid was reused outside the job is never hit. Returns how many were
    signalled."""
    pidfds: dict[int, int] = {}
    try:
        for pid in procs_recursive(v2_path):
            with contextlib.suppress(OSError):
                pidfds[pid] = os.pidfd_open(pid)
        still = set(procs_recursive(v2_path)) if pidfds else set()
        sent = 0
        for pid, fd in pidfds.items():
            if pid in still:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, sig)
                    sent += 1
        return sent
    finally:
        for fd in pidfds.values():
            os.close(fd)


def kill(v2_path: str, *, use_kill_file: bool = True) -> str:
    """SIGKILL every process in the cgroup and below, including ones forked meanwhile.
    ``cgroup.kill`` (kernel ≥ 5.14) does it in the kernel; without it the cgroup is frozen
    (nothing can fork), every member SIGKILLed, then thawed. Returns the method used
    (``cgroup.kill`` / ``freeze``); raises OSError when the cgroup cannot be written."""
    if use_kill_file:
        try:
            write(os.path.join(v2_path, "cgroup.kill"), "1")
            return "cgroup.kill"
        except FileNotFoundError:
            if not os.path.isdir(v2_path):
                raise
    freeze_and_kill(v2_path)
    return "freeze"


def freeze_and_kill(v2_path: str) -> None:
    """The kill of kernels before 5.14: freeze the cgroup (members can no longer fork or
    run), SIGKILL each member, thaw (a frozen process dies once thawed). Bounded by
    ``FREEZE_WAIT_S``; raises OSError when the cgroup cannot be written."""
    freeze = os.path.join(v2_path, "cgroup.freeze")
    write(freeze, "1")
    try:
        deadline = time.monotonic() + FREEZE_WAIT_S
        while time.monotonic() < deadline:
            if read_keyed(os.path.join(v2_path, "cgroup.events")).get("frozen") == 1:
                break
            time.sleep(0.01)
        for pid in procs_recursive(v2_path):
            with contextlib.suppress(OSError):
                # Frozen, a member cannot exit on its own before this: its pid is its own.
                os.kill(pid, signal.SIGKILL)
    finally:
        write(freeze, "0")


def remove(paths: dict[str, str]) -> list[str]:
    """Remove the job's cgroup directories (children first). Returns those that could not
    be removed (a process still in them: ``EBUSY``); a missing one counts as removed."""
    left = []
    for path in paths.values():
        if not _rmdir_tree(path):
            left.append(path)
    return left


def _rmdir_tree(path: str) -> bool:
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                _rmdir_tree(entry.path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# -- memory and the OOM killer ---------------------------------------------------------------


def memory_facts(paths: dict[str, str], host_total: int | None = None) -> dict[str, int | None]:
    """``{"oom_kills", "memory_peak_bytes", "memory_limit_bytes"}`` of a job's cgroups:
    from the v2 memory controller when the job's v2 cgroup has it (``memory.events``,
    ``memory.peak``, ``memory.max`` of it and its ancestors), else from the v1 memory
    hierarchy (``memory.oom_control``, ``memory.max_usage_in_bytes``, the hierarchical
    limit of ``memory.stat``). The limit is the host's memory when no cgroup sets one;
    values the kernel does not give are None."""
    oom = peak = limit = None
    v2 = paths.get(V2)
    if v2 and os.path.exists(os.path.join(v2, "memory.events")):
        oom = read_keyed(os.path.join(v2, "memory.events")).get("oom_kill")
        peak = read_int(os.path.join(v2, "memory.peak"))
        limit = _v2_limit(v2)
    elif paths.get("memory"):
        mem = paths["memory"]
        oom = read_keyed(os.path.join(mem, "memory.oom_control")).get("oom_kill")
        peak = read_int(os.path.join(mem, "memory.max_usage_in_bytes"))
        stat = read_keyed(os.path.join(mem, "memory.stat"))
        limit = stat.get("hierarchical_memory_limit")
        if limit is None:
            limit = read_int(os.path.join(mem, "memory.limit_in_bytes"))
        if limit is not None and limit >= V1_UNLIMITED:
            limit = None
    if limit is None and (oom is not None or peak is not None):
        limit = host_total if host_total is not None else host_memory()
    return {"oom_kills": oom, "memory_peak_bytes": peak, "memory_limit_bytes": limit}


def _v2_limit(path: str) -> int | None:
    """The smallest ``memory.max`` of ``path`` and its ancestors (None: no limit)."""
    found = None
    current = path
    while os.path.exists(os.path.join(current, "memory.max")):
        value = read_int(os.path.join(current, "memory.max"))
        if value is not None:
            found = value if found is None else min(found, value)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return found


def host_memory() -> int | None:
    """The host's total memory in bytes (``MemTotal``), or None."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def human_bytes(value: int) -> str:
    """``61.2 GiB`` / ``48.0 MiB``: how the OOM reason shows memory."""
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.1f} MiB"


def oom_reason(facts: dict[str, int | None]) -> str | None:
    """ "killed by the kernel OOM killer (memory peak 61.2 GiB of 62.8 GiB)" when the OOM
    killer killed a process of the job, else None."""
    if not facts.get("oom_kills"):
        return None
    peak, limit = facts.get("memory_peak_bytes"), facts.get("memory_limit_bytes")
    if peak is not None and limit is not None:
        detail = f" (memory peak {human_bytes(peak)} of {human_bytes(limit)})"
    elif peak is not None:
        detail = f" (memory peak {human_bytes(peak)})"
    else:
        detail = ""
    return f"{OOM_KILLED}{detail}"
