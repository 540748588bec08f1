"""Registering a host, the token file's mode, and refusing an unsafe token file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from argus_agent.credentials import load_credentials
from argus_agent.errors import AuthError, InsecureTokenFileError, StateError
from argus_agent.registration import register_host
from tests.support import RunningAgent


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ARGUS_")}
    return subprocess.run(
        [sys.executable, "-m", "argus_agent.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=60,
    )


def _env(settings) -> dict[str, str]:
    return {
        "ARGUS_URL": settings.server.url,
        "ARGUS_AGENT_AGENT_STATE_DIR": str(settings.agent.state_dir),
        "ARGUS_AGENT_AGENT_HOSTNAME": settings.agent.hostname,
    }


def test_cli_register_stores_token_0600_and_force_rotates(
    make_settings, user_token: str, server, tmp_path: Path
) -> None:
    settings = make_settings()
    env = {**_env(settings), "ARGUS_TOKEN": user_token}
    result = _cli("register", env=env)
    assert result.returncode == 0, result.stderr
    assert user_token not in result.stdout + result.stderr
    path = settings.token_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    assert set(data) >= {"server_url", "agent_id", "agent_token", "registered_at"}
    assert data["agent_token"].startswith("ag_live_")
    assert data["server_url"] == settings.server.url
    agents = server_agents(server)
    assert [a["hostname"] for a in agents] == [settings.agent.hostname]
    # registering again without --force keeps the registration, says so and exits 0 (a
    # provisioning script runs it again), and warns what --force would cost
    again = _cli("--register", env=env)
    assert again.returncode == 0, again.stderr
    assert f"already registered as {data['agent_id']} with {settings.server.url}" in again.stdout
    assert "nothing to do" in again.stdout
    assert "--force" in again.stdout and "new agent token" in again.stdout
    assert f"host name {settings.agent.hostname!r}" in again.stdout and "locked out" in again.stdout
    assert json.loads(path.read_text()) == data, "the registration is kept as it was"
    # --force rotates the token, same agent id
    token_file = tmp_path / "reporter-token"
    token_file.write_text(user_token + "\n")
    token_file.chmod(0o600)  # a token others can read is refused
    env.pop("ARGUS_TOKEN")
    forced = _cli("register", "--force", "--token-file", str(token_file), env=env)
    assert forced.returncode == 0, forced.stderr
    assert "the old one no longer works" in forced.stdout and "locked out" in forced.stdout
    assert user_token not in forced.stdout + forced.stderr
    rotated = json.loads(path.read_text())
    assert rotated["agent_id"] == data["agent_id"]
    assert rotated["agent_token"] != data["agent_token"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def server_agents(server) -> list[dict]:
    import httpx

    return httpx.get(f"{server.url}/api/_dev/agents").json()


def test_register_without_token_or_with_bad_token_explains(make_settings) -> None:
    settings = make_settings()
    missing = _cli("register", env=_env(settings))
    assert missing.returncode == 3
    assert "set ARGUS_TOKEN=em_live_... or pass --token-file" in missing.stderr
    refused = _cli("register", env={**_env(settings), "ARGUS_TOKEN": "em_live_notauser"})
    assert refused.returncode == 4
    assert "HTTP 401" in refused.stderr
    assert "em_live_notauser" not in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_register_with_unknown_user_token_raises_auth_error(make_settings) -> None:
    with pytest.raises(AuthError):
        await register_host(make_settings(), "em_live_nobody", force=False)


async def test_daemon_refuses_token_file_readable_by_others(make_settings, user_token: str) -> None:
    settings = make_settings()
    await register_host(settings, user_token, force=False)
    os.chmod(settings.token_path, 0o644)
    with pytest.raises(InsecureTokenFileError) as caught:
        async with RunningAgent(settings):
            pass
    assert str(caught.value) == (
        f"{settings.token_path}: token file is readable by group or others (mode 0644); "
        f"fix it with `chmod 600 {settings.token_path}`"
    )
    env = _env(settings)
    result = _cli("run", env=env)
    assert result.returncode == 4
    assert f"chmod 600 {settings.token_path}" in result.stderr
    os.chmod(settings.token_path, 0o600)
    assert load_credentials(settings.token_path).agent_token.startswith("ag_live_")


async def test_daemon_without_registration_says_how_to_register(make_settings) -> None:
    settings = make_settings()
    with pytest.raises(StateError, match="register this host first with `argus-agent register`"):
        async with RunningAgent(settings):
            pass


def test_registered_with_another_server_is_not_already_registered(
    make_settings, user_token: str
) -> None:
    settings = make_settings()
    env = {**_env(settings), "ARGUS_TOKEN": user_token}
    assert _cli("register", env=env).returncode == 0
    other = _cli("register", env={**env, "ARGUS_URL": "http://127.0.0.1:9"})
    assert other.returncode == 4
    assert f"with {settings.server.url} ({settings.token_path}), not with http://127.0.0.1:9" in (
        other.stderr
    )
    assert "--force" in other.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the hint is for a system agent (root)")
def test_a_system_agent_without_a_reporter_token_is_told_how_to_give_it_one(
    make_settings, user_token: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "reporter-token"
    token_file.write_text(user_token + "\n")
    token_file.chmod(0o600)
    settings = make_settings()
    env = _env(settings)

    # The token of this command line (or of this shell) is not the service's.
    told = _cli("register", "--token-file", str(token_file), env=env)

    assert told.returncode == 0, told.stderr
    assert "no reporter token of its own" in told.stdout and "telemetry" in told.stdout
    assert f'server.token_file = "{token_file}"' in told.stdout
    assert user_token not in told.stdout + told.stderr
    from_shell = _cli("register", env={**env, "ARGUS_TOKEN": user_token})
    assert from_shell.returncode == 0
    assert "server.token_file = " in from_shell.stdout and "mode 0600" in from_shell.stdout
    # An agent whose config names its token file has one: nothing to say.
    configured = _cli("register", env={**env, "ARGUS_AGENT_SERVER_TOKEN_FILE": str(token_file)})
    assert configured.returncode == 0, configured.stderr
    assert "reporter token" not in configured.stdout
