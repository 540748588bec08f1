"""State files are written whole or not at all, and what is private stays private.

A real, small tmpfs (mounted as root) stands in for a nearly full disk; real files with real
modes stand in for token files and config files an operator left open to group or others.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from argus_agent.config import load_settings
from argus_agent.credentials import (
    AgentCredentials,
    load_credentials,
    read_user_token,
    save_credentials,
)
from argus_agent.daemon import events_token
from argus_agent.errors import ConfigError, InsecureTokenFileError, StateError
from argus_agent.fsutil import atomic_write, ensure_private_dir
from tests.support import RunningAgent, agent_env, cli, register

REPO = Path(__file__).parents[1]
PAGE = 4096
REPORTER_TOKEN = "em_live_s3cr3tvalue0123456789"


# --- a nearly full disk --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted under ``tmp_path``; unmounted again whatever the test did."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    mount_point = tmp_path / "disk"
    mount_point.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill_disk(mount_point: Path, *, leave_free: int) -> Path:
    """Fill the file system with one file, then give back ``leave_free`` bytes (whole pages)."""
    filler = mount_point / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = b"\0" * (64 * 1024)
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, size - size % PAGE - leave_free)
    finally:
        os.close(fd)
    return filler


def test_atomic_write_on_a_full_disk_raises_and_keeps_the_old_file(small_disk: Path) -> None:
    state = small_disk / "state"
    state.mkdir(mode=0o700)
    target = state / "token.json"
    old = b'{"agent_token": "the good one"}\n'
    atomic_write(target, old)
    filler = fill_disk(small_disk, leave_free=2 * PAGE)
    new = b"n" * (16 * PAGE)  # only the first two pages of it fit

    with pytest.raises(OSError) as caught:
        atomic_write(target, new)

    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == old
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(state)) == ["token.json"], "a temp file was left behind"
    # With room again the same write goes through whole.
    filler.unlink()
    atomic_write(target, new)
    assert target.read_bytes() == new
    assert sorted(os.listdir(state)) == ["token.json"]


def test_save_credentials_on_a_full_disk_raises_state_error_and_keeps_the_token(
    small_disk: Path,
) -> None:
    path = small_disk / "state" / "token.json"
    good = AgentCredentials(
        server_url="https://argus.example", agent_id="ag-1", agent_token="ag_live_good"
    )
    save_credentials(path, good)
    fill_disk(small_disk, leave_free=PAGE)
    rotated = AgentCredentials(
        server_url="https://argus.example",
        agent_id="ag-1",
        agent_token="ag_live_" + "r" * (8 * PAGE),  # larger than what is left
    )

    with pytest.raises(StateError) as caught:
        save_credentials(path, rotated)

    message = str(caught.value)
    assert message == f"{path}: cannot write the token file: No space left on device"
    assert "ag_live_" not in message
    assert load_credentials(path) == good
    assert sorted(os.listdir(path.parent)) == ["token.json"], "a temp file was left behind"


# --- the state dir -------------------------------------------------------------------------


def test_ensure_private_dir_creates_0700_and_tightens_an_open_dir_of_ours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = tmp_path / "a" / "state"
    ensure_private_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700

    opened = tmp_path / "open-state"
    opened.mkdir()
    opened.chmod(0o755)
    (opened / "outbox.db").write_bytes(b"log lines of a job")
    caplog.set_level(logging.WARNING)
    ensure_private_dir(opened)
    assert stat.S_IMODE(opened.stat().st_mode) == 0o700
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(opened) in warnings[0].getMessage()
    assert "0755" in warnings[0].getMessage()

    caplog.clear()
    ensure_private_dir(opened)  # already private: nothing to say
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _chown_to_nobody(path: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this host")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return f"nobody (uid {nobody.pw_uid})"


def test_ensure_private_dir_refuses_an_open_dir_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o755)
    owner = _chown_to_nobody(theirs)

    with pytest.raises(StateError) as caught:
        ensure_private_dir(theirs)

    me = pwd.getpwuid(os.geteuid()).pw_name
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{theirs}: ")
    assert f"owned by {owner}" in message and "mode 0755" in message
    assert f"chown -R {me} {theirs} && chmod 700 {theirs}" in message
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755, "another user's dir was changed"


async def test_agent_start_tightens_its_open_state_dir(make_settings, user_token: str) -> None:
    settings = make_settings()
    await register(settings, user_token)
    state_dir = settings.agent.state_dir
    state_dir.chmod(0o755)  # as an older agent or a careless mkdir under umask 022 left it

    async with RunningAgent(settings) as running:
        await running.stop()

    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_run_refuses_an_open_state_dir_of_another_user(make_settings) -> None:
    settings = make_settings()
    state_dir = settings.agent.state_dir
    state_dir.mkdir()
    state_dir.chmod(0o755)
    owner = _chown_to_nobody(state_dir)

    result = cli("run", env=agent_env(settings))

    assert result.returncode == 4, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"argus-agent: {state_dir}: ") and f"owned by {owner}" in line
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o755


# --- reporter token files ------------------------------------------------------------------


def _token_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "reporter-token"
    path.write_text(REPORTER_TOKEN + "\n")
    path.chmod(mode)
    return path


def _insecure(path: Path, mode: int) -> str:
    return (
        f"{path}: token file is readable by group or others (mode {mode:04o}); "
        f"fix it with `chmod 600 {path}`"
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=lambda m: f"{m:04o}")
def test_read_user_token_refuses_a_file_group_or_others_can_read(tmp_path: Path, mode: int) -> None:
    path = _token_file(tmp_path, mode)
    with pytest.raises(InsecureTokenFileError) as caught:
        read_user_token(path)
    assert str(caught.value) == _insecure(path, mode)
    assert REPORTER_TOKEN not in str(caught.value)
    path.chmod(0o600)
    assert read_user_token(path) == REPORTER_TOKEN


def test_register_refuses_an_open_token_file(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    path = _token_file(tmp_path, 0o644)
    result = cli("register", "--token-file", str(path), env=agent_env(settings))
    assert result.returncode == 4
    assert result.stderr.strip() == f"argus-agent: {_insecure(path, 0o644)}"
    assert not settings.token_path.exists()


def test_events_token_reads_server_token_file_with_the_same_check(
    make_settings, tmp_path: Path
) -> None:
    path = _token_file(tmp_path, 0o600)
    settings = make_settings(server={"token_file": str(path)})
    assert events_token(settings) == REPORTER_TOKEN
    path.chmod(0o640)
    with pytest.raises(InsecureTokenFileError) as caught:
        events_token(settings)
    assert str(caught.value) == _insecure(path, 0o640)
    # A missing file still only costs the telemetry (logged), as before.
    assert events_token(make_settings(server={"token_file": str(tmp_path / "nope")})) is None


async def test_run_refuses_an_open_server_token_file(
    make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    path = _token_file(tmp_path, 0o644)
    env = agent_env(settings, ARGUS_AGENT_SERVER_TOKEN_FILE=str(path))

    result = cli("run", env=env)

    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"argus-agent: {_insecure(path, 0o644)}"
    assert REPORTER_TOKEN not in result.stderr + result.stdout


# --- a config file holding server.token ----------------------------------------------------


def _config(tmp_path: Path, mode: int, *, with_token: bool = True) -> Path:
    path = tmp_path / "config.toml"
    token = f'token = "{REPORTER_TOKEN}"\n' if with_token else ""
    path.write_text(f'[server]\nurl = "https://argus.example"\n{token}')
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=lambda m: f"{m:04o}")
def test_config_file_with_server_token_must_be_private(tmp_path: Path, mode: int) -> None:
    path = _config(tmp_path, mode)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert message == (
        f"{path}: holds server.token but is readable by group or others (mode {mode:04o}); "
        f"fix it with `chmod 600 {path}`"
    )
    assert REPORTER_TOKEN not in message and "s3cr3t" not in message
    path.chmod(0o600)
    assert load_settings(path, environ={}).server.token == REPORTER_TOKEN


def test_config_file_without_a_token_may_stay_readable(tmp_path: Path) -> None:
    path = _config(tmp_path, 0o644, with_token=False)
    settings = load_settings(path, environ={"ARGUS_TOKEN": REPORTER_TOKEN})
    assert settings.server.token == REPORTER_TOKEN  # from the environment, not the file


def test_cli_refuses_an_open_config_holding_the_token(make_settings, tmp_path: Path) -> None:
    path = _config(tmp_path, 0o644)
    env = agent_env(make_settings())
    expected = (
        f"argus-agent: {path}: holds server.token but is readable by group or others "
        f"(mode 0644); fix it with `chmod 600 {path}`"
    )
    run = cli("run", "--config", str(path), env=env)
    assert run.returncode == 3
    assert run.stderr.strip() == expected
    check = cli("config", "check", "--config", str(path), env=env)
    assert check.returncode == 1
    assert check.stderr.strip() == expected
    assert REPORTER_TOKEN not in run.stderr + check.stderr + check.stdout


# --- the systemd units ---------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["argus-agent.service", "argus-agent-user.service"])
def test_units_create_files_private(unit: str) -> None:
    lines = (REPO / "systemd" / unit).read_text().splitlines()
    assert "UMask=0077" in lines
