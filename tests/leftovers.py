"""Processes that outlive the test that started them: find them, kill them, fail the test.

The tests of this project start real agents, shims and jobs, and those escape the pytest
process tree: agents are SIGKILLed (their shims go to init), shims start new sessions, jobs
double-fork and ``setsid``. So "descendants of pytest" is not enough. A process counts as
*started by the test* when it did not exist when the test began (its pid and start time,
field 22 of ``/proc/<pid>/stat``, were not in the snapshot taken then), it is not pytest
itself, and at least one of these holds:

- it descends from the pytest process;
- its environment carries ``PYTEST_ARGUS_AGENT_RUN=<this session's uuid>`` (set in pytest's
  own ``os.environ`` for the session; agents started by tests inherit it, and jobs inherit
  the agent's environment). The name does not start with ``ARGUS_``, which the ``_clean_env``
  fixture deletes and the agent treats as its own;
- its working directory or command line lies under pytest's basetemp (shims run with the
  job dir as cwd and a minimal environment without the marker);
- its parent is a new process started by the test (a job forked by a shim found by its cwd).

Zombies are dead and do not count; zombies that are children of pytest are reaped. A process
still alive at the test's end gets a grace period (a stopped job takes a moment to go); what
is left after it is killed with SIGKILL (its identity checked by start time through a pidfd
first, so a recycled pid is never signalled), and the test fails naming pid, command line and
test. The check is a no-op where there is no ``/proc`` (not Linux).

Wiring (``tests/conftest.py``): the session fixture ``_leftover_guard`` sets the marker and,
at the session's end, runs the same check against a snapshot taken when the session began
(catching what a module or session fixture left); the autouse fixture
``_no_leftover_processes`` runs it around every test.

Cost when nothing leaks: one pass over ``/proc/*/stat`` before the test and one after (about
1-3 ms each for ~100 processes); the environment, cwd and command line are read only for
processes that are new and alive.

Cgroups count too. Tests that give agents a cgroup subtree make it under a name starting
with ``argus-tests-<marker prefix>-`` (``tests/cgroupenv.py``), in the v2 hierarchy and as
mirrors in the v1 ones. ``check_cgroups`` (run around every test, and for the session)
finds such directories a test left behind, kills what runs in them, removes them and
fails the test; ``job_cgroups_left`` is what the ``cgroup_root`` fixture uses to fail a
test that left a job's cgroup in the agent's subtree (the agent removes a job's cgroups once
its end was reported).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

#: The environment variable that marks processes of this pytest session.
MARKER_ENV = "PYTEST_ARGUS_AGENT_RUN"
#: How long processes found alive at a test's end may take to exit before they are killed.
GRACE_S = 3.0
POLL_S = 0.05
#: How long killed processes may take to disappear before the check moves on.
KILL_WAIT_S = 2.0
_PROC = "/proc"

Key = tuple[int, int]  # (pid, start time): a process, whatever later reuses its pid
Snapshot = frozenset[Key]


class Proc(NamedTuple):
    """One line of the process table: what ``/proc/<pid>/stat`` says."""

    pid: int
    ppid: int
    state: str
    start: int  # clock ticks since boot (field 22)
    comm: str

    @property
    def key(self) -> Key:
        return (self.pid, self.start)

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X", "x")


def _read(path: str, limit: int = 1 << 20) -> bytes | None:
    """The content of a /proc file, or None (gone, or not ours to read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        size = 0
        while size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:  # ESRCH: it exited between open and read
        return None
    finally:
        os.close(fd)


def read_proc(pid: int) -> Proc | None:
    """The stat line of ``pid``, or None if it is gone (or unreadable)."""
    # One read: the line is well under 4 KiB (comm is at most 64 bytes). This runs for
    # every process twice per test, so it avoids everything that costs.
    try:
        fd = os.open(f"{_PROC}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        close = data.rindex(b")")
        fields = data[close + 2 :].split(None, 20)
        comm = data[data.index(b"(") + 1 : close].decode(errors="replace")
        return Proc(pid, int(fields[1]), fields[0].decode(), int(fields[19]), comm)
    except (ValueError, IndexError):
        return None


def process_table() -> dict[int, Proc]:
    """Every process now (threads are not listed in /proc itself)."""
    table = {}
    try:
        names = os.listdir(_PROC)
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                table[proc.pid] = proc
    return table


def cmdline(pid: int) -> str:
    data = _read(f"{_PROC}/{pid}/cmdline")
    return data.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") if data else ""


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"{_PROC}/{pid}/cwd")
    except OSError:
        return None


@dataclass
class Leftover:
    proc: Proc
    why: str
    cmdline: str = ""

    def describe(self) -> str:
        command = self.cmdline or f"[{self.proc.comm}]"
        return f"pid {self.proc.pid} ({self.why}): {command}"


@dataclass
class LeftoverGuard:
    """The session's view: its marker, basetemp and the pytest process; finds, kills and
    describes the processes a test (or the whole session) left behind."""

    basetemp: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    pytest_pid: int = field(default_factory=os.getpid)
    enabled: bool = field(default_factory=lambda: os.path.isdir(f"{_PROC}/self"))
    #: Seconds spent in ``snapshot`` and in ``check`` short of any grace wait, and how many
    #: checks ran: the cost of the guard itself.
    spent_s: float = 0.0
    checks: int = 0
    _saved_env: str | None = None
    _session: Snapshot = frozenset()
    _cgroups_before: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        base = str(self.basetemp)
        self._roots = tuple({base.rstrip("/"), os.path.realpath(base).rstrip("/")})
        self._needle = f"{MARKER_ENV}={self.marker}".encode()
        # (pid, start) -> why it is ours. Only "ours" is cached: a process that is not ours
        # yet may still exec or chdir into basetemp.
        self._verdicts: dict[Key, str] = {}
        # Zombie children of pytest seen by the previous scan (see ``_reap``).
        self._zombies: set[Key] = set()

    # -- session -----------------------------------------------------------------------

    def start_session(self) -> None:
        """Set the marker in pytest's own environment and remember what runs already."""
        self._saved_env = os.environ.get(MARKER_ENV)
        os.environ[MARKER_ENV] = self.marker
        self._session = self.snapshot()

    def end_session(self) -> list[Leftover]:
        """Kill what any part of the session left running; restore the environment."""
        try:
            return self.check(self._session)
        finally:
            if self._saved_env is None:
                os.environ.pop(MARKER_ENV, None)
            else:
                os.environ[MARKER_ENV] = self._saved_env

    # -- per test ----------------------------------------------------------------------

    @property
    def cgroup_prefix(self) -> str:
        """The name prefix of this session's test cgroups."""
        return f"{CGROUP_PREFIX}{self.marker[:8]}-"

    def check_cgroups(self, *, session: bool = False) -> list[str]:
        """This session's test cgroups made since the last ``snapshot`` (``session``: at
        all; the names carry the session's marker, so none predates it) and still there:
        what runs in them is killed and they are removed before this returns. Empty when
        nothing was left (the usual case: one listing of a few cgroup directories)."""
        before = frozenset() if session else self._cgroups_before
        left = sorted(set(cgroups_named(self.cgroup_prefix)) - before)
        for path in left:
            remove_cgroup_tree(path)
        return left

    def snapshot(self) -> Snapshot:
        """(pid, start time) of every process now (and this session's test cgroups)."""
        if not self.enabled:
            return frozenset()
        began = time.perf_counter()
        self._cgroups_before = frozenset(cgroups_named(self.cgroup_prefix))
        keys = frozenset(p.key for p in process_table().values())
        self.spent_s += time.perf_counter() - began
        return keys

    def check(self, before: Snapshot, grace_s: float = GRACE_S) -> list[Leftover]:
        """Processes started since ``before`` by this session and still alive after
        ``grace_s``; they are SIGKILLed before this returns. Empty when nothing leaked."""
        if not self.enabled:
            return []
        began = time.perf_counter()
        self.checks += 1
        table = process_table()
        found = self._ours(table, before)
        self._reap(table)
        self.spent_s += time.perf_counter() - began
        if not found:
            return []
        deadline = time.monotonic() + grace_s
        while found and time.monotonic() < deadline:
            time.sleep(POLL_S)
            table = process_table()
            self._reap(table)
            found = self._ours(table, before)
        if not found:
            return []
        # Kill until nothing of ours is alive (a parent may fork while we kill its child).
        leftovers: dict[Key, Leftover] = {}
        for _ in range(10):
            for leftover in found:
                leftover.cmdline = leftover.cmdline or cmdline(leftover.proc.pid)
                leftovers.setdefault(leftover.proc.key, leftover)
                kill(leftover.proc)
            table = process_table()
            self._reap(table)
            found = self._ours(table, before)
            if not found:
                break
            time.sleep(0.02)
        self._wait_gone(leftovers.keys())
        return sorted(leftovers.values(), key=lambda item: item.proc.start)

    def describe(self, leftovers: Iterable[Leftover], where: str) -> str:
        items = list(leftovers)
        lines = [
            f"{where} left {len(items)} process(es) running; killed with SIGKILL after "
            f"{GRACE_S:g} s of grace:"
        ]
        lines += [f"  {item.describe()}" for item in items]
        return "\n".join(lines)

    # -- internals ---------------------------------------------------------------------

    def _ours(self, table: dict[int, Proc], before: Snapshot) -> list[Leftover]:
        memo: dict[int, str | None] = {}

        def why(pid: int, depth: int = 0) -> str | None:
            if pid in memo:
                return memo[pid]
            proc = table.get(pid)
            memo[pid] = None  # against cycles of a table read while pids were reused
            if proc is None or proc.key in before or pid == self.pytest_pid or depth > 64:
                return None
            if proc.ppid == self.pytest_pid:
                reason: str | None = "child of pytest"
            else:
                reason = self._verdict(proc)
                if reason is None and why(proc.ppid, depth + 1) is not None:
                    reason = f"child of {proc.ppid}"
            memo[pid] = reason
            return reason

        found = []
        for proc in table.values():
            if proc.dead or proc.key in before or proc.pid == self.pytest_pid:
                continue
            reason = why(proc.pid)
            if reason is not None:
                found.append(Leftover(proc, reason))
        return found

    def _verdict(self, proc: Proc) -> str | None:
        """Whether a process is ours by its environment, cwd or command line (cached)."""
        if proc.key in self._verdicts:
            return self._verdicts[proc.key]
        reason = None
        environ = _read(f"{_PROC}/{proc.pid}/environ")
        if environ and self._needle in environ.split(b"\0"):
            reason = f"has {MARKER_ENV}"
        else:
            cwd = _cwd(proc.pid)
            if cwd and self._under_basetemp(cwd, inside=False):
                reason = "cwd under basetemp"
            else:
                words = cmdline(proc.pid).split()
                if any(self._under_basetemp(word, inside=True) for word in words):
                    reason = "command line under basetemp"
        if reason is not None:
            if len(self._verdicts) > 10_000:
                self._verdicts.clear()
            self._verdicts[proc.key] = reason
        return reason

    def _under_basetemp(self, text: str, *, inside: bool) -> bool:
        """Whether ``text`` is basetemp or a path under it (``inside``: or contains one, as
        a shell word like ``>>/tmp/pytest-of-root/pytest-3/t0/log;`` does)."""
        for root in self._roots:
            if text == root or text.startswith(root + "/") or (inside and root + "/" in text):
                return True
        return False

    def _reap(self, table: dict[int, Proc]) -> None:
        """Collect zombie children of pytest that nobody waits for. A zombie is only reaped
        when two scans saw it, so a waiter that is about to collect it (asyncio's child
        watcher thread) is not robbed of the exit status."""
        zombies = {p.key for p in table.values() if p.dead and p.ppid == self.pytest_pid}
        seen = self._zombies
        for pid, start in zombies & seen:
            proc = read_proc(pid)
            if proc is not None and proc.start == start and proc.dead:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        self._zombies = zombies - seen

    def _wait_gone(self, killed: Iterable[Key]) -> None:
        keys = list(killed)
        pending = set(keys)
        deadline = time.monotonic() + KILL_WAIT_S
        while pending and time.monotonic() < deadline:
            table = process_table()
            self._reap(table)
            pending = {k for k in pending if _alive(table, k)}
            if pending:
                time.sleep(0.02)
        # A zombie child of pytest seen once so far: collect it now, its killer is us.
        table = process_table()
        for key in keys:
            proc = table.get(key[0])
            if proc and proc.start == key[1] and proc.dead and proc.ppid == self.pytest_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, os.WNOHANG)


def _alive(table: dict[int, Proc], key: Key) -> bool:
    proc = table.get(key[0])
    return proc is not None and proc.start == key[1] and not proc.dead


def kill(proc: Proc) -> bool:
    """SIGKILL ``proc`` if it is still the same process (start time checked after the pidfd
    is opened, so the pid cannot be recycled in between). Whether a signal was sent."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return False
        except OSError:
            pidfd = None  # kernel without pidfds: fall back to kill(2)
    try:
        now = read_proc(proc.pid)
        if now is None or now.start != proc.start:
            return False
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


# -- cgroups -------------------------------------------------------------------------------

#: The name prefix of every cgroup directory the tests make.
CGROUP_PREFIX = "argus-tests-"
_CGROUP_FS = "/sys/fs/cgroup"


def cgroup_bases() -> list[str]:
    """Where test cgroups can be: each cgroup mount, and this process's own cgroup in each
    v1 hierarchy (the agent mirrors a subtree below its own v1 cgroups)."""
    bases: list[str] = []
    mounts: dict[str, str] = {}  # controller (or "" for v2) -> mount point
    with contextlib.suppress(OSError), open(f"{_PROC}/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                bases.append(fields[4])
                for name in tail[2].split(",") if tail[0] == "cgroup" else [""]:
                    mounts.setdefault(name, fields[4])
    with contextlib.suppress(OSError), open(f"{_PROC}/self/cgroup") as handle:
        for line in handle:
            _, names, where = line.rstrip("\n").split(":", 2)
            for name in names.split(","):
                if name and name in mounts and where != "/":
                    bases.append(os.path.join(mounts[name], where.lstrip("/")))
    return sorted(set(bases))


def cgroups_named(prefix: str = CGROUP_PREFIX) -> list[str]:
    """Test cgroup directories (named ``prefix…``) directly under any base."""
    found = []
    for base in cgroup_bases():
        with contextlib.suppress(OSError):
            found += [e.path for e in os.scandir(base) if e.name.startswith(prefix)]
    return found


def job_cgroups_left(name: str) -> list[str]:
    """Jobs' cgroups still in a test subtree called ``name``: ``<base>/<name>/jobs/<batch>``
    in the v2 hierarchy and in every v1 mirror."""
    left = []
    for base in cgroup_bases():
        with contextlib.suppress(OSError):
            jobs = os.scandir(os.path.join(base, name, "jobs"))
            left += [e.path for e in jobs if e.is_dir(follow_symlinks=False)]
    return sorted(left)


def remove_cgroup_tree(path: str) -> bool:
    """Kill everything in a cgroup and below (``cgroup.kill``, else SIGKILL to each member)
    and remove its directories, children first. Whether it is gone."""
    kill_file = os.path.join(path, "cgroup.kill")
    for _ in range(100):
        if os.path.exists(kill_file):
            with contextlib.suppress(OSError), open(kill_file, "w") as handle:
                handle.write("1")
        for dirpath, _dirs, _files in os.walk(path, topdown=False):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as handle:
                    pids = [int(p) for p in handle.read().split()]
            except OSError:
                pids = []
            for pid in pids:
                proc = read_proc(pid)
                if proc is not None:
                    kill(proc)
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        if not os.path.exists(path):
            return True
        time.sleep(0.02)
    return False
