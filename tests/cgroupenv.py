"""Real cgroups for tests: a fresh cgroup v2 subtree per test where an agent may put its
jobs, the way a systemd unit with ``Delegate=yes`` gets one.

The ``cgroup_root`` fixture makes ``<v2 mount>/argus-tests-<session>-<id>`` and yields a
:class:`TestCgroup`. An agent is either pointed at it (``jobs.cgroup_root``) or started
inside it (:meth:`TestCgroup.enter` as a ``preexec_fn``: the child joins the subtree in the
v2 hierarchy and, as systemd keeps the hierarchies of a hybrid host in step, a directory of
the same name below its own cgroup in each v1 hierarchy). At the end the fixture fails the
test if a job's cgroup was left in the subtree (the agent removes them once a job's end was
reported), then kills what runs there and removes every directory of it.

Where the machine cannot give such a subtree (not root, no writable cgroup v2 hierarchy),
the tests that need one are skipped with the reason; in CI (``CI=true``) that fails them
instead: the CI machine must run them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from argus_agent.jobs.cgroups import mounts, own_cgroups
from tests.leftovers import LeftoverGuard, cgroups_named, job_cgroups_left, remove_cgroup_tree

#: The v1 hierarchies an agent on a hybrid host mirrors its subtree into.
V1_CONTROLLERS = ("memory", "blkio", "pids", "cpu")


def v2_mount() -> str | None:
    """The cgroup v2 mount point (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``)."""
    found = sorted(
        (m for m in mounts() if m[0] == "cgroup2"),
        key=lambda m: (m[1] != "/sys/fs/cgroup", m[1] != "/sys/fs/cgroup/unified"),
    )
    return found[0][1] if found else None


def unavailable() -> str | None:
    """Why this machine cannot give a test a cgroup subtree, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (to make cgroups and move processes between them)"
    mount = v2_mount()
    if mount is None:
        return "no cgroup v2 hierarchy is mounted"
    if not os.access(mount, os.W_OK):
        return f"{mount} is not writable"
    if not os.path.exists(os.path.join(mount, "cgroup.procs")):
        return f"{mount} is not a cgroup v2 hierarchy"
    return None


def require_cgroups() -> None:
    """Skip the test (fail it in CI) when the machine cannot give it cgroups."""
    why = unavailable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"cgroup tests must run in CI, but {why}", pytrace=False)
    pytest.skip(f"no real cgroups here: {why}")


def _v1_mounts() -> dict[str, str]:
    found: dict[str, str] = {}
    for fstype, point, _root, options in mounts():
        if fstype == "cgroup":
            for name in options.split(","):
                found.setdefault(name, point)
    return found


@dataclass
class TestCgroup:
    """A test's cgroup subtree: ``name`` in each hierarchy, ``path`` the v2 directory."""

    __test__ = False  # not a test class

    name: str
    path: Path

    @property
    def jobs(self) -> Path:
        """Where the agent makes its jobs' v2 cgroups."""
        return self.path / "jobs"

    def v1_dirs(self) -> dict[str, Path]:
        """This subtree's directory in each v1 hierarchy, below this process's own cgroup
        there (made by :meth:`enter`)."""
        own = own_cgroups()
        return {
            name: Path(point) / own.get(name, "/").lstrip("/") / self.name
            for name, point in _v1_mounts().items()
            if name in V1_CONTROLLERS
        }

    def enter(self) -> Callable[[], None]:
        """A ``preexec_fn`` that puts the child into this subtree in every hierarchy."""
        targets = [self.path, *self.v1_dirs().values()]
        for target in targets:
            target.mkdir(exist_ok=True)

        def join() -> None:
            for target in targets:
                with open(target / "cgroup.procs", "w") as handle:
                    handle.write("0")

        return join

    def members(self, relative: str) -> list[int]:
        """The processes of ``<subtree>/<relative>`` in the v2 hierarchy."""
        try:
            return [int(p) for p in (self.path / relative / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []


def cgroup_of(pid: int) -> str:
    """The v2 cgroup of ``pid``, absolute (mount point + the ``0::`` path)."""
    mount = v2_mount()
    assert mount is not None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return os.path.normpath(os.path.join(mount, line[3:].lstrip("/")))
    raise AssertionError(f"pid {pid} has no cgroup v2 line")


def v1_cgroup_of(pid: int, controller: str) -> str:
    """The v1 cgroup of ``pid`` in ``controller``'s hierarchy (as /proc shows it)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, where = line.split(":", 2)
        if controller in names.split(","):
            return where
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


@pytest.fixture
def cgroup_root(_leftover_guard: LeftoverGuard) -> Iterator[TestCgroup]:
    """A fresh cgroup v2 subtree for the test (see the module doc)."""
    require_cgroups()
    mount = v2_mount()
    assert mount is not None
    name = f"{_leftover_guard.cgroup_prefix}{uuid.uuid4().hex[:6]}"
    path = Path(mount) / name
    path.mkdir()
    try:
        yield TestCgroup(name, path)
    finally:
        left = job_cgroups_left(name)
        for directory in sorted(cgroups_named(name), key=len, reverse=True):
            remove_cgroup_tree(directory)
    if left:
        pytest.fail(
            "the test left job cgroup(s) in the agent's subtree (removed now): " + ", ".join(left),
            pytrace=False,
        )
