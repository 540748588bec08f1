"""The launch policy, rule by rule, without processes: every refusal asserts its reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from argus_agent.config import Settings
from argus_agent.errors import PayloadError
from argus_agent.jobs import policy
from argus_agent.jobs.policy import BatchOwner, Identity, UserDb
from argus_agent.jobs.spec import HostFacts, build_launch_spec
from argus_agent.jobsettings import DEFAULT_ENV_DENY
from argus_agent.protocol import Command

NOW = 1_800_000_000.0


class FakeUsers(UserDb):
    """A user database of a few made-up users."""

    users = {
        "root": (0, 0, "/root"),
        "alice": (1001, 1001, "/home/alice"),
        "trainer": (1500, 1500, "/srv/trainer"),
        "bob": (1002, 1002, "/home/bob"),
        "dockerer": (1003, 1003, "/home/dockerer"),
        "wheelie": (1004, 0, "/home/wheelie"),
    }
    group_ids = {"docker": 999, "disk": 6, "shadow": 42}

    def by_name(self, name: str):
        uid, gid, home = self.users[name]
        return SimpleNamespace(
            pw_name=name, pw_uid=uid, pw_gid=gid, pw_dir=home, pw_shell="/bin/bash"
        )

    def by_uid(self, uid: int):
        name = next(n for n, v in self.users.items() if v[0] == uid)
        return self.by_name(name)

    def groups(self, name: str, gid: int) -> tuple[int, ...]:
        extra = {"alice": (27,), "dockerer": (999,)}
        return (gid, *extra.get(name, ()))

    def gid_of(self, group: str) -> int | None:
        return self.group_ids.get(group)


def _settings(**jobs: object) -> Settings:
    return Settings.model_validate(
        {
            "server": {"url": "https://argus.example"},
            "agent": {"hostname": "gpu-01", "host_aliases": ["gpu-01.lab"]},
            "jobs": jobs,
        }
    )


ISO_NOW = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))
AUTO = "auto"


def _spec(
    payload: dict,
    *,
    uid: int = 1001,
    running: int = 0,
    created_at: str | None = ISO_NOW,
    account: str | None = "alice",
    batch_owner: str | None = AUTO,
    batch_read: bool | None = None,
    served: frozenset[str] = frozenset(),
    **jobs: object,
):
    """Build a spec as the agent of ``uid`` would. ``batch_owner`` is the OS user the server
    recorded for the batch (by default the one that makes the request valid: alice for a
    system agent, the agent's own user for a per-user agent; None: the server has none)."""
    base = {"command": "python t.py", "host": "gpu-01", "requested_by": "alice"}
    command = Command(
        id="c1",
        kind="rerun",
        batch_id="rerun-0123456789ab",
        payload={**base, **payload},
        created_at=created_at,
    )
    if batch_owner == AUTO:
        batch_owner = "alice" if uid == 0 else FakeUsers().by_uid(uid).pw_name
    return build_launch_spec(
        command,
        settings=_settings(**jobs),
        base_env={"PATH": "/bin", "HOME": "/agent"},
        facts=HostFacts(
            agent_uid=uid,
            now=NOW,
            running_jobs=running,
            home=Path("/"),
            agent_account=account,
            served_hosts=served,
            batch_owner=BatchOwner(batch_owner, "batch") if batch_owner else None,
            batch_read=batch_owner is not None if batch_read is None else batch_read,
        ),
        userdb=FakeUsers(),
    )


@pytest.fixture
def open_dir():
    """A directory every user may enter (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="argus-policy-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_good_payload_becomes_a_launch_spec(open_dir: Path) -> None:
    tmp_path = open_dir
    spec = _spec(
        {
            "cwd": str(tmp_path),
            "env": {"A": "1", "LD_PRELOAD": "/evil.so"},
            "overrides": {"lr": 0.1, "flag": False, "opt": None},
            "source_batch_id": "b-1",
        },
        uid=0,
        users={"alice": "alice"},
    )
    assert spec.argv == (
        "/bin/sh",
        "-c",
        'python t.py "$@"',
        "sh",
        "lr=0.1",
        "flag=false",
        "opt=null",
    )
    assert spec.command_line == "python t.py lr=0.1 flag=false opt=null"
    assert spec.identity == Identity("alice", 1001, 1001, (1001, 27), "/home/alice", "/bin/bash")
    assert spec.env["HOME"] == "/home/alice" and spec.env["USER"] == "alice"
    assert spec.env["LOGNAME"] == "alice" and spec.env["SHELL"] == "/bin/bash"
    assert spec.env["A"] == "1" and "LD_PRELOAD" not in spec.env
    assert spec.dropped_env == ("LD_PRELOAD",)
    assert spec.env["ARGUS_BATCH_ID"] == "rerun-0123456789ab"
    assert spec.env["ARGUS_SOURCE_BATCH_ID"] == "b-1"
    assert spec.env["ARGUS_URL"] == "https://argus.example"
    assert spec.cwd == tmp_path and spec.requested_by == "alice"


def test_per_user_agent_runs_jobs_as_itself_and_ignores_the_map() -> None:
    spec = _spec({"cwd": "/"}, uid=1500, users={"alice": "alice"})
    assert spec.identity.user == "trainer"


def test_system_agent_default_run_as_and_default_cwd_is_the_users_home(open_dir) -> None:
    tmp_path = open_dir
    FakeUsers.users["trainer"] = (1500, 1500, str(tmp_path))
    try:
        spec = _spec({"requested_by": "bob"}, uid=0, run_as="trainer", users={"bob": "trainer"})
    finally:
        FakeUsers.users["trainer"] = (1500, 1500, "/srv/trainer")
    assert spec.identity.user == "trainer" and spec.cwd == tmp_path


def test_host_alias_is_accepted_case_insensitively() -> None:
    assert _spec({"host": "GPU-01.LAB", "cwd": "/"}, uid=1500).cwd == Path("/")


def test_a_served_host_name_passes_the_host_check_and_no_other_does() -> None:
    """A Slurm login-node agent serves compute-node names (jobs.slurm_hosts): their batches
    pass; a batch of a name it does not serve is refused, whoever delivered it."""
    served = frozenset({"node-a", "node-b"})
    assert _spec({"host": "Node-B", "cwd": "/"}, uid=1500, served=served).cwd == Path("/")
    with pytest.raises(PayloadError, match="batch ran on host 'node-c', not on this host"):
        _spec({"host": "node-c", "cwd": "/"}, uid=1500, served=served)


def test_command_just_within_limits_passes() -> None:
    command = "x" * policy.MAX_COMMAND_BYTES
    assert _spec({"command": command, "cwd": "/"}, uid=1500).command_line == command


REFUSALS = [
    ({"command": None}, {}, "the source batch recorded no command (payload.command is null)"),
    ({"command": ""}, {}, "payload.command is empty"),
    ({"command": 3}, {}, "payload.command: expected a string, got int"),
    ({"command": "a\x00b"}, {}, "payload.command contains a NUL byte"),
    (
        {"command": "x" * (64 * 1024 + 1)},
        {},
        "payload.command is 65537 bytes; at most 65536 allowed",
    ),
    ({"overrides": ["a"]}, {}, "payload.overrides: expected an object, got list"),
    (
        {"overrides": {"a;rm -rf /": 1}},
        {},
        "payload.overrides: key 'a;rm -rf /' has an unsafe shape",
    ),
    ({"overrides": {"a": [1]}}, {}, "payload.overrides.a: expected a scalar, got list"),
    ({"overrides": {"a": "x\x00"}}, {}, "payload.overrides.a: value contains a NUL byte"),
    ({"env": "A=1"}, {}, "payload.env: expected an object, got str"),
    ({"env": {"1A": "x"}}, {}, "payload.env: '1A' is not a valid variable name"),
    ({"env": {"A": 1}}, {}, "payload.env.A: expected a string, got int"),
    ({"env": {"A": "x" * (256 * 1024)}}, {}, "payload.env is 262147 bytes; at most 262144 allowed"),
    (
        {"host": "other-box"},
        {},
        "batch ran on host 'other-box', not on this host ('gpu-01'); add it to agent.host_aliases "
        "if it is the same machine",
    ),
    ({"host": None}, {}, "payload.host is missing; cannot tell which host the batch ran on"),
    ({"cwd": "rel"}, {}, "payload.cwd: expected an absolute path, got 'rel'"),
    (
        {"cwd": "/does/not/exist"},
        {},
        "working directory /does/not/exist does not exist on this host",
    ),
    ({"cwd": "/etc/hostname"}, {}, "working directory /etc/hostname is not a directory"),
]


@pytest.mark.parametrize(("payload", "jobs", "reason"), REFUSALS)
def test_payload_refusals(payload: dict, jobs: dict, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/", **payload}, uid=1500, **jobs)
    assert str(caught.value) == reason


def test_expired_command_is_refused_and_fresh_one_passes() -> None:
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 7200))
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, created_at=old)
    assert str(caught.value) == (
        "command expired: created 120 min ago, older than jobs.max_command_age_s (3600 s); "
        "request the rerun again"
    )
    fresh = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - 60))  # naive means UTC
    assert _spec({"cwd": "/"}, uid=1500, created_at=fresh).cwd == Path("/")


def test_full_host_is_refused() -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, running=2, max_jobs=2)
    assert str(caught.value) == "host is full: 2 job(s) running, jobs.max_jobs is 2"
    assert _spec({"cwd": "/"}, uid=1500, running=1, max_jobs=2)


@pytest.mark.parametrize(
    ("requested_by", "jobs", "reason"),
    [
        (
            "bob",
            {},
            "Argus user 'bob' is not mapped to an OS user on this host (jobs.users), so it may "
            "not run batch owner 'alice''s command",
        ),
        (
            None,
            {},
            "Argus user None is not mapped to an OS user on this host (jobs.users), so it may "
            "not run batch owner 'alice''s command",
        ),
        (
            "alice",
            {"users": {"alice": "ghost"}},
            "Argus user 'alice' may run only 'ghost''s batches on this host (jobs.users), and "
            "this batch belongs to OS user 'alice' (from the batch)",
        ),
        (
            "bob",
            {"run_as": "root", "users": {"bob": "*"}},
            "refusing to run a job as root; set jobs.allow_root = true to allow it",
        ),
        (
            "bob",
            {"run_as": "trainer", "users": {"bob": "bob"}},
            "Argus user 'bob' may not run jobs on this host: jobs.run_as runs every job as "
            "'trainer', and jobs.users does not map 'bob' to 'trainer' (or '*')",
        ),
    ],
)
def test_system_agent_user_refusals(requested_by, jobs: dict, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/", "requested_by": requested_by}, uid=0, **jobs)
    assert str(caught.value) == reason


def test_root_allowed_when_configured() -> None:
    spec = _spec({"cwd": "/"}, uid=0, run_as="root", allow_root=True, users={"alice": "*"})
    assert spec.identity.uid == 0


def test_cwd_must_be_usable_by_the_target_user(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    if os.stat(private).st_uid == 1001:
        pytest.skip("the test's files belong to uid 1001")
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": str(private)}, uid=0, users={"alice": "alice"})
    assert str(caught.value) == f"working directory {private} is not accessible to user alice"


def test_env_deny_list_drops_and_reports() -> None:
    kept, dropped = policy.check_env(
        {"LD_PRELOAD": "x", "BASH_FUNC_foo%%": "() { :; }", "OK": "1"}
        if False
        else {"LD_PRELOAD": "x", "BASH_FUNC_x": "y", "OK": "1"},
        DEFAULT_ENV_DENY,
    )
    assert kept == {"OK": "1"} and dropped == ["LD_PRELOAD", "BASH_FUNC_x"]
    assert policy.check_env({"LD_PRELOAD": "x"}, [])[0] == {"LD_PRELOAD": "x"}


def test_per_user_agent_runs_only_its_owners_reruns() -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/", "requested_by": "bob"}, uid=1500)
    assert str(caught.value) == (
        "Argus user 'bob' may not run jobs through this per-user agent of 'alice'; "
        "list them in jobs.allowed_requesters"
    )
    assert _spec({"cwd": "/", "requested_by": "bob"}, uid=1500, allowed_requesters=["bob"])
    assert _spec({"cwd": "/", "requested_by": "eve"}, uid=1500, allowed_requesters=["*"])
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, account=None)
    assert str(caught.value) == (
        "this per-user agent does not know which Argus user it belongs to; re-register it "
        "(argus-agent register --force) or set jobs.allowed_requesters"
    )


# -- who the job runs as: the batch's owner, never the account that pressed Rerun ------------


def test_admin_rerunning_another_users_batch_runs_it_as_its_owner() -> None:
    spec = _spec(
        {"cwd": "/", "requested_by": "admin"},
        uid=0,
        batch_owner="bob",
        users={"admin": "*", "bob": "bob"},
    )
    assert spec.identity.user == "bob" and spec.env["USER"] == "bob"
    assert spec.owner == BatchOwner("bob", "batch")


def test_the_requester_must_be_mapped_to_the_batchs_owner() -> None:
    with pytest.raises(PayloadError) as caught:
        _spec(
            {"cwd": "/", "requested_by": "alice"},
            uid=0,
            batch_owner="bob",
            users={"alice": "alice"},
        )
    assert str(caught.value) == (
        "Argus user 'alice' may run only 'alice''s batches on this host (jobs.users), and this "
        "batch belongs to OS user 'bob' (from the batch)"
    )


def test_owner_falls_back_on_the_env_snapshots_user_and_else_is_refused() -> None:
    spec = _spec(
        {"cwd": "/", "env": {"USER": "bob"}, "requested_by": "bob"},
        uid=0,
        batch_owner=None,
        users={"bob": "bob"},
    )
    assert spec.identity.user == "bob" and spec.owner == BatchOwner("bob", "env snapshot")
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=0, batch_owner=None, users={"alice": "alice"})
    assert str(caught.value).startswith("cannot tell which OS user this batch ran as")


def test_the_env_snapshot_is_not_asked_when_the_batch_was_read_and_names_no_user() -> None:
    """The recording's USER is what the run's environment said; only where the batch itself
    cannot be read does it stand in for the owner Argus recorded."""
    with pytest.raises(PayloadError) as caught:
        _spec(
            {"cwd": "/", "env": {"USER": "bob"}},
            uid=0,
            batch_owner=None,
            batch_read=True,
            users={"alice": "*"},
        )
    assert str(caught.value).startswith("cannot tell which OS user this batch ran as")


def test_a_recorded_owner_that_is_no_user_name_is_refused() -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=0, batch_owner="../../root", users={"alice": "*"})
    assert str(caught.value) == "the batch's recorded user '../../root' is not an OS user name"


def test_per_user_agent_runs_only_batches_of_its_own_os_user() -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, batch_owner="alice", allowed_requesters=["alice"])
    assert str(caught.value) == (
        "batch belongs to OS user 'alice' (from the batch), but this per-user agent runs as "
        "'trainer'; Argus user 'alice' must rerun it where that user's agent (or a system "
        "agent) runs"
    )
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, batch_owner=None)
    assert str(caught.value).startswith("cannot tell which OS user this batch ran as")


def test_the_login_identity_is_the_run_as_users_own_not_the_recordings() -> None:
    recorded = {
        "HOME": "/root",
        "USER": "alice",
        "LOGNAME": "root",
        "SHELL": "/tmp/evil",
        "PATH": "/opt/conda/bin:/usr/bin",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    spec = _spec({"cwd": "/", "env": recorded}, uid=0, users={"alice": "alice"})
    assert spec.env["HOME"] == "/home/alice" and spec.env["USER"] == "alice"
    assert spec.env["LOGNAME"] == "alice" and spec.env["SHELL"] == "/bin/bash"
    assert spec.env["PATH"] == "/opt/conda/bin:/usr/bin"  # reproducible: from the recording
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize(
    ("owner", "reason"),
    [
        (
            "dockerer",
            "refusing to run a job as 'dockerer': the user is in group 'docker', which is close "
            "to root (jobs.privileged_groups); set jobs.allow_privileged_groups = true to allow it",
        ),
        (
            "wheelie",
            "refusing to run a job as 'wheelie': the user is in group 0 (root's group); set "
            "jobs.allow_privileged_groups = true to allow it",
        ),
    ],
)
def test_root_equivalent_groups_are_refused_unless_allowed(owner: str, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=0, batch_owner=owner, users={"alice": "*"})
    assert str(caught.value) == reason
    allowed = _spec(
        {"cwd": "/"},
        uid=0,
        batch_owner=owner,
        users={"alice": "*"},
        allow_privileged_groups=True,
    )
    assert allowed.identity.user == owner
    # The list is the operator's: without docker on it, docker's members pass.
    assert _spec(
        {"cwd": "/"}, uid=0, batch_owner="dockerer", users={"alice": "*"}, privileged_groups=[]
    )


# -- expiry fails closed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "created_at",
    [
        None,
        "",
        "Thu, 26 Nov 2026 12:00:00 +0000",  # RFC 2822
        "1795700000",  # epoch seconds as a string
        "2020/01/01",
        "yesterday",
        "2026-13-45T99:00:00Z",
    ],
)
def test_a_command_whose_age_cannot_be_read_is_refused(created_at) -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, created_at=created_at)
    assert "is not an ISO 8601 time, so its age cannot be checked" in str(caught.value)


def test_a_future_dated_command_is_refused_beyond_the_allowed_clock_skew() -> None:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + 60))
    assert _spec({"cwd": "/"}, uid=1500, created_at=soon)
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + 86400 * 365))
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/"}, uid=1500, created_at=future)
    assert "in the future (more than jobs.max_clock_skew_s, 300 s)" in str(caught.value)


# -- the working directory is resolved before it is checked ----------------------------------


def test_a_symlinked_cwd_is_checked_where_it_leads(open_dir: Path) -> None:
    private_home = open_dir / "bob"  # 0700, like a home directory
    project = private_home / "project"
    project.mkdir(parents=True)
    private_home.chmod(0o700)
    project.chmod(0o755)
    link = open_dir / "link"
    link.symlink_to(project)
    if os.stat(private_home).st_uid == 1001:
        pytest.skip("the test's files belong to uid 1001")
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": str(link)}, uid=0, users={"alice": "alice"})
    # Where the link leads is for the audit log: alice may not learn it.
    assert str(caught.value) == f"working directory {link} is not accessible to user alice"
    assert caught.value.audit["resolved_cwd"] == str(private_home)


def test_a_cwd_in_proc_is_refused(open_dir: Path, monkeypatch) -> None:
    """/proc/self/cwd is whichever process resolves it: the agent, or its job dir."""
    monkeypatch.chdir(open_dir)
    for path in ("/proc/self/cwd", "/proc/1/root/tmp", "/sys/kernel"):
        with pytest.raises(PayloadError) as caught:
            _spec({"cwd": path}, uid=0, users={"alice": "alice"})
        assert "which is no place to run a job" in str(caught.value)


def test_refusals_tell_the_requester_only_what_the_user_could_learn(tmp_path: Path) -> None:
    """Whether a file exists in a directory the job's user cannot search, or where a
    symlink in it points, is not revealed; the audit gets the resolved path."""
    private = tmp_path / "private"
    (private / "project").mkdir(parents=True)
    (private / "secret.txt").write_text("x")
    private.chmod(0o700)
    if os.stat(private).st_uid == 1001:
        pytest.skip("the test's files belong to uid 1001")
    reasons = set()
    for name in ("project", "secret.txt", "nope"):
        with pytest.raises(PayloadError) as caught:
            _spec({"cwd": str(private / name)}, uid=0, users={"alice": "alice"})
        reasons.add(str(caught.value).replace(name, "NAME"))
        assert caught.value.audit["resolved_cwd"]
    assert (
        reasons == {f"working directory {private}/NAME is not accessible to user alice"}
        or len(reasons) == 1
    )


def test_relative_and_dotdot_symlinks_are_followed_like_the_kernel(open_dir: Path) -> None:
    (open_dir / "a" / "b").mkdir(parents=True)
    (open_dir / "link").symlink_to("a/b/../b")
    spec = _spec({"cwd": f"{open_dir}/link/./"}, uid=0, users={"alice": "alice"})
    assert spec.cwd == open_dir / "a" / "b"
    (open_dir / "loop").symlink_to("loop")
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": f"{open_dir}/loop"}, uid=0, users={"alice": "alice"})
    assert "too many levels of symbolic links" in str(caught.value)
