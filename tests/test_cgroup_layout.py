"""Per-job cgroups: how the agent finds (or declines) a subtree to own, the names it gives
job cgroups, the OOM reason's wording and the config checks. Split from test_cgroups.py
(placement, stop, OOM and accounting of running jobs) by size."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from argus_agent.config import JobSettings, load_settings
from argus_agent.errors import ConfigError
from argus_agent.jobs import cgroupfs
from argus_agent.jobs.cgroups import Cgroups, cgroup_name, mounts
from tests.cgroupenv import TestCgroup, cgroup_of, require_cgroups, v2_mount
from tests.support import (
    ArgusUser,
    RunningAgent,
    alive,
    eventually,
    register,
)

PY = shlex.quote(sys.executable)
FAST = {"interval_s": 0.5, "log_poll_s": 0.1}


async def test_without_a_writable_subtree_jobs_run_through_proc_and_status_says_why(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    settings = make_settings(jobs={"cgroup_root": str(not_a_cgroup)})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        status = running.agent.snapshot()["cgroups"]
        assert status["mode"] == "none"
        assert f"{not_a_cgroup} is not a cgroup v2 directory" in status["why"]
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun's ack")
        job = running.agent.jobs.get(batch)
        assert job is not None and job.cgroup is None and job.pid == ack["pid"]
        argus.stop(batch)
        ended = await running.agent.jobs.wait_ended(batch, timeout=10)
        assert ended.exit_signal == signal.SIGTERM
        assert not alive(ack["pid"])


def _detect_in_child(settings: JobSettings, become: Callable[[], None]) -> dict:
    """``Cgroups.start()`` in a forked child after ``become()`` (changing its user or its
    cgroup, which the test process must keep); returns the child's status and its final
    cgroup as ``status["_in"]``."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            become()
            cgroups = Cgroups(settings)
            cgroups.start()
            answer = {**cgroups.status(), "_in": cgroup_of(os.getpid())}
            os.write(write_end, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read()
    os.waitpid(child, 0)
    return json.loads(answer)


def test_a_per_user_agent_without_delegation_says_why(cgroup_root: TestCgroup) -> None:
    """An agent whose user may not write the subtree (no ``Delegate=yes``) uses /proc."""

    def become_nobody() -> None:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)

    status = _detect_in_child(JobSettings(cgroup_root=cgroup_root.path), become_nobody)
    assert status["mode"] == "none"
    assert f"{cgroup_root.path} is not writable by uid 65534" in status["why"]
    assert not (cgroup_root.path / "jobs").exists()


def test_an_agent_started_in_its_units_agent_leaf_takes_the_unit_as_its_subtree(
    cgroup_root: TestCgroup,
) -> None:
    """``DelegateSubgroup=agent`` (systemd 254+) starts the agent in ``<unit>/agent``: the
    unit's cgroup is the subtree, and the agent stays where it is."""
    leaf = cgroup_root.path / "agent"
    leaf.mkdir()

    def enter_leaf() -> None:
        cgroupfs.place({"v2": str(leaf)})

    status = _detect_in_child(JobSettings(), enter_leaf)
    assert status["mode"] != "none", status
    assert status["root"] == str(cgroup_root.path)
    assert status["agent_cgroup"] == status["_in"] == str(leaf)


def test_an_agent_started_in_its_subtree_moves_into_a_leaf_of_its_own(
    cgroup_root: TestCgroup,
) -> None:
    """Plain ``Delegate=yes``: started in the subtree's root, the agent moves to ``agent``
    (and leaves the subtree's own controllers alone, see ``Cgroups._enable_controllers``)."""

    def enter_root() -> None:
        cgroupfs.place({"v2": str(cgroup_root.path)})

    status = _detect_in_child(JobSettings(), enter_root)
    assert status["root"] == str(cgroup_root.path)
    assert status["agent_cgroup"] == status["_in"] == str(cgroup_root.path / "agent")
    subtree_control = (cgroup_root.path / "cgroup.subtree_control").read_text().split()
    assert subtree_control == [], "the root a unit starts the agent in keeps no controllers"


def test_an_agent_in_the_hierarchys_root_cgroup_does_not_claim_it() -> None:
    """Not started by a unit with ``Delegate=yes`` (the root cgroup is nobody's subtree):
    /proc, and status says why. Detected in a child moved to the root cgroup."""
    require_cgroups()
    mount = v2_mount()
    assert mount is not None

    def enter_hierarchy_root() -> None:
        cgroupfs.place({"v2": mount})

    status = _detect_in_child(JobSettings(), enter_hierarchy_root)
    assert status["mode"] == "none" and status["_in"] == mount
    assert f"the agent runs in the root cgroup of {mount}" in status["why"]


def test_batch_ids_become_safe_cgroup_names() -> None:
    assert cgroup_name("b-0123abcd") == "b-0123abcd"
    assert cgroup_name("rerun_x-1") == "rerun_x-1"
    odd = cgroup_name("../cgroup.procs")
    assert "/" not in odd and "." not in odd
    assert cgroup_name("a.b") != cgroup_name("a_b")
    assert len(cgroup_name("x" * 500)) <= 100
    assert cgroup_name("rerun-32cb88b98944") == "rerun-32cb88b98944"
    # An id that looks like another id's escaped name is not that name.
    assert cgroup_name("x.y") == "x_y__b24ca9b75eb7"
    assert cgroup_name("x_y__b24ca9b75eb7") != "x_y__b24ca9b75eb7"


_SAFE_CHARS = "abcdef0123456789xyzABZ_-"
#: Batch ids of every kind, and ones shaped like escaped names (``<safe>__<12 hex>``).
_IDS = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=_SAFE_CHARS + "./ ", max_size=90),
    st.builds(
        lambda head, sep, tail: f"{head}{sep}{tail}",
        st.text(alphabet=_SAFE_CHARS, max_size=85),
        st.sampled_from(["-", "_", "__", "-_"]),
        st.text(alphabet="0123456789abcdef", min_size=12, max_size=12),
    ),
)


#: ... and other ids' cgroup names, used as batch ids.
_IDS_AND_NAMES = st.one_of(_IDS, _IDS.map(cgroup_name))


@given(_IDS_AND_NAMES, _IDS_AND_NAMES)
def test_two_batch_ids_never_share_a_cgroup_name(first: str, second: str) -> None:
    for name in (cgroup_name(first), cgroup_name(second)):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name), name
    if first != second:
        assert cgroup_name(first) != cgroup_name(second)


@given(_IDS)
def test_an_escaped_name_used_as_a_batch_id_gets_a_name_of_its_own(batch_id: str) -> None:
    name = cgroup_name(batch_id)
    if name != batch_id:
        assert cgroup_name(name) != name


def test_mountinfo_paths_are_unescaped(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "50 31 0:40 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
        "23 1 0:21 / /sys rw - sysfs sysfs rw\n"
    )
    assert mounts(str(info)) == [
        ("cgroup2", "/sys/fs/cgroup/unified", "/", "rw"),
        ("cgroup", "/sys/fs/cgroup/memory", "/", "rw,memory"),
        ("cgroup2", "/mnt/with space", "/sub", "rw"),
    ]


def test_oom_reason_names_peak_and_limit() -> None:
    facts = {"oom_kills": 2, "memory_peak_bytes": 65_712_000_000, "memory_limit_bytes": 67 << 30}
    assert cgroupfs.oom_reason(facts) == (
        "killed by the kernel OOM killer (memory peak 61.2 GiB of 67.0 GiB)"
    )
    assert cgroupfs.oom_reason({**facts, "oom_kills": 0}) is None


def test_cgroup_settings_errors_are_one_line_naming_key_value_and_expectation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    for body, expected in (
        ('memory_max = "lots"', "jobs.memory_max: expected a size in bytes, e.g. "),
        ('cgroups = "on"', "jobs.cgroups: expected one of 'auto' or 'off', got 'on'"),
        ('cgroup_root = "rel/x"', "jobs.cgroup_root: expected an absolute path"),
        ("cpu_max = 0", "jobs.cpu_max: expected a number >= 0.01, got 0"),
    ):
        path.write_text(f"[jobs]\n{body}\n")
        with pytest.raises(ConfigError) as caught:
            load_settings(path, environ={})
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    path.write_text('[jobs]\nmemory_max = "1.5G"\ncpu_max = 2.5\npids_max = 512\n')
    jobs = load_settings(path, environ={}).jobs
    assert (jobs.memory_max, jobs.cpu_max, jobs.pids_max) == (3 << 29, 2.5, 512)
