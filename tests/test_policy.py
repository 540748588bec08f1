"""The launch policy, rule by rule, without processes: every refusal asserts its reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from argus_agent.config import DEFAULT_ENV_DENY, Settings
from argus_agent.errors import PayloadError
from argus_agent.jobs import policy
from argus_agent.jobs.policy import Identity, UserDb
from argus_agent.jobs.spec import HostFacts, build_launch_spec
from argus_agent.protocol import Command

NOW = 1_800_000_000.0


class FakeUsers(UserDb):
    """A user database of a few made-up users."""

    users = {
        "root": (0, 0, "/root"),
        "alice": (1001, 1001, "/home/alice"),
        "trainer": (1500, 1500, "/srv/trainer"),
    }

    def by_name(self, name: str):
        uid, gid, home = self.users[name]
        return SimpleNamespace(
            pw_name=name, pw_uid=uid, pw_gid=gid, pw_dir=home, pw_shell="/bin/bash"
        )

    def by_uid(self, uid: int):
        name = next(n for n, v in self.users.items() if v[0] == uid)
        return self.by_name(name)

    def groups(self, name: str, gid: int) -> tuple[int, ...]:
        return (gid, 27) if name == "alice" else (gid,)


def _settings(**jobs: object) -> Settings:
    return Settings.model_validate(
        {
            "server": {"url": "https://argus.example"},
            "agent": {"hostname": "gpu-01", "host_aliases": ["gpu-01.lab"]},
            "jobs": jobs,
        }
    )


def _spec(
    payload: dict,
    *,
    uid: int = 1001,
    running: int = 0,
    created_at: str | None = None,
    owner: str | None = "alice",
    **jobs: object,
):
    base = {"command": "python t.py", "host": "gpu-01", "requested_by": "alice"}
    command = Command(
        id="c1",
        kind="rerun",
        batch_id="rerun-0123456789ab",
        payload={**base, **payload},
        created_at=created_at,
    )
    return build_launch_spec(
        command,
        settings=_settings(**jobs),
        base_env={"PATH": "/bin", "HOME": "/agent"},
        facts=HostFacts(agent_uid=uid, now=NOW, running_jobs=running, home=Path("/"), owner=owner),
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
    assert spec.argv == ("/bin/sh", "-c", "python t.py lr=0.1 flag=false opt=null")
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
        spec = _spec({"requested_by": "bob"}, uid=0, run_as="trainer")
    finally:
        FakeUsers.users["trainer"] = (1500, 1500, "/srv/trainer")
    assert spec.identity.user == "trainer" and spec.cwd == tmp_path


def test_host_alias_is_accepted_case_insensitively() -> None:
    assert _spec({"host": "GPU-01.LAB", "cwd": "/"}, uid=1500).cwd == Path("/")


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
            "Argus user 'bob' is not mapped to an OS user on this host (jobs.users) and "
            "jobs.run_as is not set",
        ),
        (
            None,
            {},
            "Argus user None is not mapped to an OS user on this host (jobs.users) and "
            "jobs.run_as is not set",
        ),
        (
            "alice",
            {"users": {"alice": "ghost"}},
            "OS user 'ghost' (for Argus user 'alice') does not exist on this host",
        ),
        (
            "alice",
            {"users": {"alice": "root"}},
            "refusing to run a job as root; set jobs.allow_root = true to allow it",
        ),
        (
            "bob",
            {"run_as": "root"},
            "refusing to run a job as root; set jobs.allow_root = true to allow it",
        ),
    ],
)
def test_system_agent_user_refusals(requested_by, jobs: dict, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        _spec({"cwd": "/", "requested_by": requested_by}, uid=0, **jobs)
    assert str(caught.value) == reason


def test_root_allowed_when_configured() -> None:
    spec = _spec({"cwd": "/"}, uid=0, run_as="root", allow_root=True)
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


def test_usable_by_follows_owner_group_other_bits() -> None:
    modes = {
        Path("/"): (0, 0, 0o755),
        Path("/data"): (0, 27, 0o750),
        Path("/data/run"): (1001, 1001, 0o700),
    }

    def fake_stat(path: Path):
        uid, gid, mode = modes[path]
        return SimpleNamespace(st_uid=uid, st_gid=gid, st_mode=0o040000 | mode)

    assert policy.usable_by(Path("/data/run"), 1001, (1001, 27), fake_stat)
    assert not policy.usable_by(Path("/data/run"), 1002, (1002, 27), fake_stat)
    assert not policy.usable_by(Path("/data"), 1002, (1002,), fake_stat)
    assert policy.usable_by(Path("/data"), 0, (0,), fake_stat)


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
        _spec({"cwd": "/"}, uid=1500, owner=None)
    assert str(caught.value) == (
        "this per-user agent does not know which Argus user it belongs to; re-register it "
        "(argus-agent register --force) or set jobs.allowed_requesters"
    )
