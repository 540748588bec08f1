"""Whether jobs get control groups, where, and with which limits: the agent's side.

Owns the decision and the layout; ``cgroupfs`` does the file operations (and is what the
shim uses). At start-up, :meth:`Cgroups.start` looks for a cgroup v2 subtree the agent may
write (``jobs.cgroup_root``, by default the agent's own cgroup from ``/proc/self/cgroup``
under the v2 mount found in ``/proc/self/mountinfo``: ``/sys/fs/cgroup``, or
``/sys/fs/cgroup/unified`` on a hybrid host). With one, every job gets
``<root>/jobs/<batch id>``; the agent, when it sits in ``<root>`` itself, moves into
``<root>/agent`` (with whatever else sits there: cgroup v2 lets only leaves hold processes
once controllers are enabled below). On a pure v2 host the ``memory``, ``pids``, ``cpu`` and
``io`` controllers are enabled for the jobs where the subtree has them. On a hybrid host
(v1 controllers plus a v2 hierarchy without controllers), each job also gets a directory in
the v1 ``memory`` hierarchy (usage, peak, OOM kills, ``jobs.memory_max``), in ``blkio`` (IO
bytes), in ``pids`` (the thread count, ``jobs.pids_max``) and, when ``jobs.cpu_max`` is set,
in ``cpu``. A v1 directory mirrors the
v2 one: under the agent's own v1 cgroup when the subtree is the agent's own (under systemd
the two hierarchies have the same paths, so it is the same relative path), else at the
same path relative to the hierarchy's root.

Without a writable subtree nothing changes: jobs are tracked through /proc as before, and
:meth:`Cgroups.status` says why. Nothing here raises at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

from argus_agent.config import JobSettings
from argus_agent.jobs import cgroupfs
from argus_agent.jobs.cgroupfs import V2
from argus_agent.jobs.proctree import StopResult, signal_all
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: v2 controllers the jobs get where the subtree offers them.
V2_CONTROLLERS = ("memory", "pids", "cpu", "io")
#: Name of the agent's own leaf, and of the directory holding the jobs' cgroups.
AGENT_LEAF = "agent"
JOBS_DIR = "jobs"
CPU_PERIOD_US = 100_000
_SAFE = re.compile(r"[^A-Za-z0-9_-]")
#: How the name of an id that could not be used as it is ends: ``__`` and 12 hex digits.
_HASHED = re.compile(r"__[0-9a-f]{12}")


def cgroup_name(batch_id: str) -> str:
    """A batch id as a cgroup directory name: letters, digits, ``_`` and ``-`` only (no
    ``.``, so it never collides with a cgroup's interface files), at most 100 characters.

    An id that is such a name already is used as it is, unless it ends the way the other
    names end: every other id (empty, too long, with other characters, or ending in ``__``
    and 12 hex digits) gets ``<its safe part>__<12 hex digits of its SHA-256>``. An id used
    as it is therefore never equals another id's name, and two hashed names differ unless
    SHA-256 collides: two ids never share a name."""
    safe = _SAFE.sub("_", batch_id)[:80]
    if safe == batch_id and safe and not _HASHED.fullmatch(safe[-14:]):
        return safe
    digest = hashlib.sha256(batch_id.encode()).hexdigest()[:12]
    return f"{safe or 'batch'}__{digest}"


def _unescape(field: str) -> str:
    """A mountinfo path field (spaces and such are octal escapes like ``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """Cgroup mounts as (fstype, mount point, mount root, super options)."""
    found = []
    with contextlib.suppress(OSError), open(mountinfo) as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                found.append((tail[0], _unescape(fields[4]), _unescape(fields[3]), tail[2]))
    return found


def own_cgroups(path: str = "/proc/self/cgroup") -> dict[str, str]:
    """This process's cgroup per hierarchy: ``""`` → the v2 path (the ``0::`` line), each
    v1 controller name → its path."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError), open(path) as handle:
        for line in handle:
            number, _, rest = line.rstrip("\n").partition(":")
            names, _, where = rest.partition(":")
            if number == "0" and names == "":
                found[""] = where
            else:
                for name in names.split(","):
                    found[name] = where
    return found


def _v2_mount(found: list[tuple[str, str, str, str]]) -> tuple[str, str] | None:
    """(mount point, mount root) of the cgroup v2 hierarchy among ``found`` mounts: on a
    pure v2 host at /sys/fs/cgroup, on a hybrid one at .../unified."""
    v2 = [m for m in found if m[0] == "cgroup2"]
    v2.sort(key=lambda m: (m[1] != "/sys/fs/cgroup", m[1] != "/sys/fs/cgroup/unified"))
    return (v2[0][1], v2[0][2]) if v2 else None


def v2_mount() -> tuple[str, str] | None:
    """(mount point, mount root) of this host's cgroup v2 hierarchy, or None."""
    return _v2_mount(mounts())


def cgroup_of(pid: int, mount: tuple[str, str]) -> str | None:
    """The absolute v2 cgroup directory of ``pid`` (``mount`` from :func:`v2_mount`), or
    None (gone, or no v2 membership)."""
    relative = own_cgroups(f"/proc/{pid}/cgroup").get("")
    return None if relative is None else _join(mount[0], mount[1], relative)


def in_another_jobs_cgroup(pid: int, job_cgroup: str, mount: tuple[str, str] | None) -> bool:
    """Whether ``pid`` is in the cgroup of a job other than the one of ``job_cgroup`` (a
    sibling of it in the jobs directory, or below one): that job's process, whatever
    else it looks like."""
    where = cgroup_of(pid, mount) if mount is not None else None
    if where is None or where == job_cgroup or where.startswith(job_cgroup + "/"):
        return False
    return where.startswith(os.path.dirname(job_cgroup) + "/")


def _join(mount: str, mount_root: str, relative: str) -> str:
    """The absolute directory of a cgroup path as /proc shows it, on a mount whose root is
    ``mount_root`` (``/`` unless the mount is of a sub-tree, as in some containers)."""
    if mount_root != "/" and (relative == mount_root or relative.startswith(mount_root + "/")):
        relative = relative[len(mount_root) :]
    return os.path.normpath(os.path.join(mount, relative.lstrip("/")))


class Cgroups:
    """The agent's use of cgroups: off until :meth:`start` found a writable subtree."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.mode = "none"
        self.why: str | None = "not set up yet (the agent has not started)"
        self.root: str | None = None
        self.v2_mount: str | None = None
        self.agent_cgroup: str | None = None
        #: v1 controller → the directory under which jobs' mirrors are made (``…/jobs``).
        self.v1: dict[str, str] = {}
        #: v2 controllers enabled for the jobs.
        self.controllers: list[str] = []
        self.kill_method: str | None = None
        #: Each configured limit → how it is applied, or why it is not.
        self.limits: dict[str, str] = {}
        #: Why v2 controllers the subtree has were not enabled for the jobs (None: they were).
        self.controllers_note: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether new jobs get cgroups."""
        return self.root is not None

    def status(self) -> dict[str, Any]:
        """What `status` shows: ``mode`` (``cgroup-v2``, ``cgroup-v2+v1-memory`` or
        ``none``), ``why`` (why not, or what is missing), and the layout."""
        return {
            "mode": self.mode,
            "why": self.why,
            "root": self.root,
            "agent_cgroup": self.agent_cgroup,
            "controllers": list(self.controllers),
            "v1": dict(self.v1),
            "kill": self.kill_method,
            "limits": dict(self.limits),
        }

    # -- start-up ------------------------------------------------------------------------

    def start(self) -> None:
        """Find and prepare the subtree (see the module doc). Never raises: when cgroups
        cannot be used, ``mode`` stays ``none`` and ``why`` says why (logged once)."""
        try:
            why = self._setup()
        except OSError as exc:  # anything unforeseen in /sys: honest, not fatal
            why = f"cgroup set-up failed: {exc.strerror or exc}"
        if why is not None:
            self.root = None
            self.mode, self.why = "none", why
            log.info("jobs run without cgroups; tracked through /proc", why=why)
            return
        self.mode = "cgroup-v2+v1-memory" if "memory" in self.v1 else "cgroup-v2"
        if "memory" not in self.controllers and "memory" not in self.v1:
            self.why = "no memory controller: job memory is read from /proc, no OOM reasons" + (
                f" ({self.controllers_note})" if self.controllers_note else ""
            )
        else:
            self.why = None
        log.info(
            "jobs run in cgroups",
            mode=self.mode,
            root=self.root,
            controllers=",".join(self.controllers) or "-",
            v1=",".join(self.v1) or "-",
            kill=self.kill_method,
        )

    def _setup(self) -> str | None:
        """Returns why cgroups cannot be used, or None when they are set up."""
        settings = self.settings
        if settings.cgroups == "off":
            return "turned off (jobs.cgroups = off)"
        found = mounts()
        v2 = _v2_mount(found)
        if v2 is None:
            return "no cgroup v2 hierarchy is mounted (a cgroup v1-only host)"
        mount, mount_root = v2
        own = own_cgroups()
        if "" not in own:
            return "this process has no cgroup v2 membership (/proc/self/cgroup has no 0:: line)"
        own_dir = _join(mount, mount_root, own[""])
        if settings.cgroup_root is not None:
            root = os.path.normpath(str(settings.cgroup_root))
        elif os.path.basename(own_dir) == AGENT_LEAF and os.access(
            os.path.join(os.path.dirname(own_dir), "cgroup.procs"), os.W_OK
        ):
            # Started in the unit's "agent" leaf already (DelegateSubgroup=agent, systemd
            # 254 and later): the unit's cgroup is the subtree.
            root = os.path.dirname(own_dir)
        elif own_dir == mount:
            return (
                f"the agent runs in the root cgroup of {mount}, which is not its own: run it "
                "as a systemd unit with Delegate=yes (the shipped units have it), or set "
                "jobs.cgroup_root to a cgroup v2 directory it may write"
            )
        else:
            root = own_dir
        if not (root == mount or root.startswith(mount.rstrip("/") + "/")) or not os.path.isfile(
            os.path.join(root, "cgroup.procs")
        ):
            return f"{root} is not a cgroup v2 directory (the v2 hierarchy is at {mount})"
        uid = os.geteuid()
        if not os.access(root, os.W_OK) or not os.access(
            os.path.join(root, "cgroup.procs"), os.W_OK
        ):
            return (
                f"{root} is not writable by uid {uid} (no delegated cgroup subtree: run the "
                "agent as a systemd unit with Delegate=yes, or set jobs.cgroup_root)"
            )
        # Moving a process between cgroups needs write access to their common ancestor.
        ancestor = os.path.commonpath([root, own_dir])
        if not os.access(os.path.join(ancestor, "cgroup.procs"), os.W_OK):
            return (
                f"uid {uid} may not move processes from {own_dir} to {root} (needs write "
                f"access to {ancestor}/cgroup.procs)"
            )
        try:
            os.makedirs(os.path.join(root, JOBS_DIR), exist_ok=True)
        except OSError as exc:
            return f"cannot create {root}/{JOBS_DIR}: {exc.strerror or exc}"
        self.v2_mount, self.root = mount, root
        self.agent_cgroup = own_dir
        if own_dir == root:
            problem = self._move_into_leaf(root)
            if problem:
                return problem
        self._enable_controllers(root, started_in_root=own_dir == root)
        self._setup_v1(found, own, own_dir, mount, root)
        kill_file = os.path.join(root, JOBS_DIR, "cgroup.kill")
        self.kill_method = "cgroup.kill" if os.path.exists(kill_file) else "freeze"
        self._plan_limits()
        return None

    def _move_into_leaf(self, root: str) -> str | None:
        """Move every process of ``root`` (the agent first) into ``root/agent``: only
        leaves may hold processes once controllers are enabled (no-internal-process rule)."""
        leaf = os.path.join(root, AGENT_LEAF)
        try:
            os.makedirs(leaf, exist_ok=True)
            cgroupfs.place({V2: leaf})
        except OSError as exc:
            return f"cannot move the agent into {leaf}: {exc.strerror or exc}"
        for pid in cgroupfs.procs(root):
            # Shims and jobs of an agent without cgroups, a wrapper script...: they go too.
            with contextlib.suppress(OSError):
                cgroupfs.place({V2: leaf}, pid)
        self.agent_cgroup = leaf
        return None

    def _enable_controllers(self, root: str, *, started_in_root: bool) -> None:
        """Turn on, for ``root/jobs`` and its children, the controllers ``root`` has.

        Not when the agent was started in ``root`` itself (a unit with ``Delegate=yes`` but
        no ``DelegateSubgroup=``): with controllers in ``root``'s ``subtree_control``,
        nothing may be placed in ``root`` any more, so systemd could not start the agent
        again there while jobs run (status 219/CGROUP). The jobs then go without those
        controllers, and ``controllers_note`` says so."""
        available = (cgroupfs.read_text(os.path.join(root, "cgroup.controllers")) or "").split()
        wanted = [name for name in V2_CONTROLLERS if name in available]
        enabled = (cgroupfs.read_text(os.path.join(root, "cgroup.subtree_control")) or "").split()
        if started_in_root and wanted and not set(wanted) <= set(enabled):
            self.controllers_note = (
                f"the {', '.join(wanted)} controller(s) are not enabled for jobs: the agent was "
                f"started in {root} itself, which must then stay free of controllers to let "
                "it be started there again (add DelegateSubgroup=agent to the unit, systemd "
                "254 or later)"
            )
            wanted = [name for name in wanted if name in enabled]
        for directory in (root, os.path.join(root, JOBS_DIR)):
            control = os.path.join(directory, "cgroup.subtree_control")
            for name in wanted:
                if name in available:
                    with contextlib.suppress(OSError):  # e.g. processes left in root
                        cgroupfs.write(control, f"+{name}")
        enabled = cgroupfs.read_text(os.path.join(root, JOBS_DIR, "cgroup.subtree_control"))
        self.controllers = [c for c in V2_CONTROLLERS if c in (enabled or "").split()]

    def _setup_v1(
        self,
        found: list[tuple[str, str, str, str]],
        own: dict[str, str],
        own_dir: str,
        mount: str,
        root: str,
    ) -> None:
        """On a hybrid host: the v1 hierarchies the jobs need, where the v2 subtree lacks
        the controller (memory, blkio for IO, pids for the thread count in one read, cpu
        only for its limit: CPU time comes from the v2 ``cpu.stat``)."""
        wanted = {
            "memory": "memory" not in self.controllers,
            "blkio": "io" not in self.controllers,
            "pids": "pids" not in self.controllers,
            "cpu": "cpu" not in self.controllers and self.settings.cpu_max is not None,
        }
        below_own = root == own_dir or root.startswith(own_dir.rstrip("/") + "/")
        for name, want in wanted.items():
            if not want:
                continue
            v1 = [m for m in found if m[0] == "cgroup" and name in m[3].split(",")]
            if not v1:
                continue
            _, v1_mount, v1_root, _ = v1[0]
            if below_own and name in own:
                base = _join(v1_mount, v1_root, own[name])
                tail = os.path.relpath(root, own_dir)
            else:
                base, tail = v1_mount, os.path.relpath(root, mount)
            directory = os.path.normpath(os.path.join(base, tail, JOBS_DIR))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                log.info(
                    "v1 cgroup hierarchy not usable", controller=name, error=exc.strerror or exc
                )
                continue
            self.v1[name] = directory

    def _plan_limits(self) -> None:
        """Say for each configured limit how it is applied, or why it cannot be."""
        settings = self.settings
        plans = {
            "memory_max": (settings.memory_max, "memory", "memory", "memory.max"),
            "cpu_max": (settings.cpu_max, "cpu", "cpu", "cpu.max"),
            "pids_max": (settings.pids_max, "pids", "pids", "pids.max"),
        }
        v1_files = {
            "memory": "memory.limit_in_bytes",
            "cpu": "cpu.cfs_quota_us",
            "pids": "pids.max",
        }
        for key, (value, v2_name, v1_name, v2_file) in plans.items():
            if value is None:
                continue
            if v2_name in self.controllers:
                self.limits[key] = f"{value} via cgroup v2 {v2_file}"
            elif v1_name in self.v1:
                self.limits[key] = f"{value} via cgroup v1 {v1_files[v1_name]}"
            else:
                self.limits[key] = (
                    f"not applied: no {v2_name} controller in {self.root} nor a writable v1 "
                    f"{v1_name} hierarchy"
                    + (f" ({self.controllers_note})" if self.controllers_note else "")
                )
                log.warning("job limit cannot be applied", key=f"jobs.{key}", value=value)

    # -- per job -------------------------------------------------------------------------

    def create_job(self, batch_id: str) -> dict[str, str] | None:
        """Make the job's cgroups and apply the limits; returns their paths (None when jobs
        get no cgroups). A directory that exists already (left by an earlier job whose
        cgroup could not be removed, or by an interrupted launch) is made again when nothing
        runs in it, so the job's counters start at zero. Raises :class:`CgroupInUse` when
        processes run in one (the job must not share it, nor run without it), OSError
        otherwise (what was made is removed again)."""
        if self.root is None:
            return None
        name = cgroup_name(batch_id)
        paths = {V2: os.path.join(self.root, JOBS_DIR, name)}
        paths.update({c: os.path.join(base, name) for c, base in self.v1.items()})
        made: dict[str, str] = {}
        try:
            for key, path in paths.items():
                _make_afresh(path)
                made[key] = path
            self._apply_limits(paths)
        except (OSError, CgroupInUse):
            cgroupfs.remove(made)
            raise
        return paths

    def _apply_limits(self, paths: dict[str, str]) -> None:
        settings = self.settings
        v2 = paths[V2]
        if settings.memory_max is not None:
            if "memory" in self.controllers:
                cgroupfs.write(os.path.join(v2, "memory.max"), str(settings.memory_max))
            elif "memory" in paths:
                cgroupfs.write(
                    os.path.join(paths["memory"], "memory.limit_in_bytes"),
                    str(settings.memory_max),
                )
        if settings.pids_max is not None:
            target = v2 if "pids" in self.controllers else paths.get("pids")
            if target:
                cgroupfs.write(os.path.join(target, "pids.max"), str(settings.pids_max))
        if settings.cpu_max is not None:
            quota = max(1000, round(settings.cpu_max * CPU_PERIOD_US))
            if "cpu" in self.controllers:
                cgroupfs.write(os.path.join(v2, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
            elif "cpu" in paths:
                cgroupfs.write(os.path.join(paths["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                cgroupfs.write(os.path.join(paths["cpu"], "cpu.cfs_quota_us"), str(quota))


class CgroupInUse(Exception):
    """A job's cgroup directory exists already and cannot be made afresh: processes run in
    it. Not an OSError: the launch fails (a job never runs without the cgroup it was
    meant to have, nor in another's)."""

    def __init__(self, path: str, pids: list[int]) -> None:
        held = "it cannot be removed"
        if pids:
            held = f"process(es) {', '.join(map(str, sorted(pids)))} run in it"
        super().__init__(
            f"the job's cgroup {path} exists already and {held} (left by an earlier job of "
            "the same batch?); the job was not started"
        )
        self.path = path
        self.pids = pids


def _make_afresh(path: str) -> None:
    """``mkdir`` a job's cgroup; an existing one is removed first when nothing runs in it
    (its counters would be an earlier job's). Raises CgroupInUse or OSError."""
    try:
        os.mkdir(path)
        return
    except FileExistsError:
        pass
    pids = cgroupfs.procs_recursive(path)
    if pids or cgroupfs.remove({"leftover": path}):
        raise CgroupInUse(path, pids)
    log.warning("an empty cgroup was left where a job's goes; made afresh", path=path)
    os.mkdir(path)


def remove_job(batch_id: str, paths: dict[str, str] | None) -> bool:
    """Remove an ended job's cgroups; whether they are gone (a process that would not die
    keeps them: they are tried again at the next prune or start). Logged when not."""
    if not paths:
        return True
    left = cgroupfs.remove(paths)
    if left:
        log.warning("job cgroup not removed yet (processes left in it)", batch_id=batch_id)
    return not left


async def terminate(
    paths: dict[str, str],
    grace_s: float,
    *,
    unkillable_wait_s: float,
    poll_s: float = 0.05,
    others: Callable[[], dict[int, int]] | None = None,
) -> StopResult:
    """The agent's own stop of a job with cgroups whose shim is gone: SIGTERM to every
    member, up to ``grace_s`` for them to go, then kill the cgroup, and up to
    ``unkillable_wait_s`` for it to empty. Nothing that ran in the cgroup survives, however
    it left the job's process tree.

    A process of the job may also have left the cgroup itself (root may write any
    ``cgroup.procs``): ``others`` finds the job's processes through /proc (pid → start
    ticks: ``proctree.job_processes``, its main process, group, tree and environment, called
    in a thread), and those outside the cgroup get the same signals, each through a pidfd
    checked against its start time. The stop ends when neither way finds anything; what is
    left then is in ``survivors``. Blocks its coroutine; the file operations are small."""
    v2 = paths[V2]
    result = StopResult()

    async def left() -> tuple[list[int], dict[int, int]]:
        """The cgroup's members, and the job's processes /proc finds outside it."""
        found = await asyncio.to_thread(others) if others is not None else {}
        members = cgroupfs.procs_recursive(v2)
        inside = set(members)
        return members, {pid: ticks for pid, ticks in found.items() if pid not in inside}

    members, strays = await left()
    if not members and not strays:
        return result
    termed = set(strays.items())
    result.signalled = cgroupfs.signal_members(v2, signal.SIGTERM) + signal_all(
        strays, signal.SIGTERM
    )
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        members, strays = await left()
        if not members and not strays:
            return result
        # Late arrivals outside the cgroup get the same warning (the cgroup's own were
        # signalled as its members; the kill reaches every one of them).
        late = {pid: ticks for pid, ticks in strays.items() if (pid, ticks) not in termed}
        termed.update(late.items())
        signal_all(late, signal.SIGTERM)
    killed = set(members) | set(strays)
    give_up = time.monotonic() + unkillable_wait_s
    while (members or strays) and time.monotonic() < give_up:
        if members:
            with contextlib.suppress(OSError):
                cgroupfs.kill(v2)
        signal_all(strays, signal.SIGKILL)
        await asyncio.sleep(poll_s)
        members, strays = await left()
        killed.update(members, strays)
    result.killed = len(killed)
    result.survivors = sorted(set(members) | set(strays))
    return result
