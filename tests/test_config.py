"""Configuration: defaults, file, environment overrides, and one clear line per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from argus_agent.config import load_settings
from argus_agent.errors import ConfigError


def _error(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> str:
    path = tmp_path / "config.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ or {})
    return str(caught.value)


@pytest.mark.parametrize(
    ("body", "environ", "expected"),
    [
        (
            '[server]\nurl = "ftp://x"\n',
            {},
            "config.toml: server.url: expected an http:// or https:// URL, got 'ftp://x'",
        ),
        (
            '[server]\nurl = "http://argus.example.com"\n',
            {},
            "config.toml: server.url: plain http:// to a non-loopback host sends tokens in clear "
            "text; use https:// or set server.allow_insecure_http = true, got "
            "'http://argus.example.com'",
        ),
        (
            '[agent]\npoll_interval_s = "soon"\n',
            {},
            "config.toml: agent.poll_interval_s: expected a number, got 'soon'",
        ),
        (
            "[agent]\npoll_intervall_s = 5\n",
            {},
            "config.toml: agent.poll_intervall_s: unknown key; expected one of auth_retry_s, "
            "backoff_initial_s, backoff_max_s, heartbeat_interval_s, host_aliases, hostname, "
            "log_level, poll_interval_s, stall_timeout_s, state_dir",
        ),
        (
            '[sever]\nurl = "http://127.0.0.1"\n',
            {},
            "config.toml: sever: unknown key; expected one of agent, jobs, server, telemetry",
        ),
        (
            '[agent]\nlog_level = "loud"\n',
            {},
            "config.toml: agent.log_level: expected one of 'debug', 'info', 'warning' or 'error', "
            "got 'loud'",
        ),
        (
            "[jobs]\nstop_grace_s = -1\n",
            {},
            "config.toml: jobs.stop_grace_s: expected a number >= 0.0, got -1",
        ),
        (
            '[jobs]\nshell = "sh -c"\n',
            {},
            "config.toml: jobs.shell: expected an absolute path to the shell first, e.g. "
            "['/bin/sh', '-c'], got 'sh -c'",
        ),
        (
            '[jobs]\ndefault_cwd = "relative"\n',
            {},
            "config.toml: jobs.default_cwd: expected an absolute directory path, got 'relative'",
        ),
        (
            '[server]\nallow_insecure_http = "maybe"\n',
            {},
            "config.toml: server.allow_insecure_http: expected true or false, got 'maybe'",
        ),
        (
            "[agent]\nbackoff_initial_s = 10\nbackoff_max_s = 2\n",
            {},
            "config.toml: agent.backoff_max_s: expected a value >= agent.backoff_initial_s (10.0),"
            " got 2",
        ),
        ("server = 3\n", {}, "config.toml: server: expected a table, got 3"),
        (
            "[agent\n",
            {},
            "config.toml: invalid TOML: Expected ']' at the end of a table "
            "declaration (at line 1, column 7)",
        ),
        (
            "",
            {"ARGUS_AGENT_JOBS_STOP_GRACE_S": "long"},
            "environment ARGUS_AGENT_JOBS_STOP_GRACE_S: jobs.stop_grace_s: expected a number, "
            "got 'long'",
        ),
        (
            "",
            {"ARGUS_AGENT_JOBS_GRACE": "3"},
            "environment ARGUS_AGENT_JOBS_GRACE: jobs.grace: unknown key; expected one of "
            "allow_privileged_groups, allow_root, allowed_requesters, default_cwd, env_deny, "
            "inherit_argus_token, kill_leftovers, log_max_bytes, max_clock_skew_s, "
            "max_command_age_s, max_jobs, privileged_groups, retention_days, run_as, shell, "
            "stop_grace_s, unkillable_wait_s, users",
        ),
        (
            '[jobs]\nusers = { alice = "not a user" }\n',
            {},
            "config.toml: jobs.users.alice: expected an OS user name or '*', got 'not a user'",
        ),
        ("[jobs]\nmax_jobs = 0\n", {}, "config.toml: jobs.max_jobs: expected a number >= 1, got 0"),
        (
            "",
            {"ARGUS_URL": "argus.example.com"},
            "environment ARGUS_URL: server.url: expected an http:// or https:// URL, "
            "got 'argus.example.com'",
        ),
        (
            "",
            {"ARGUS_TOKEN": "ag_live_secret"},
            "environment ARGUS_TOKEN: server.token: expected an Argus reporter token starting with "
            "'em_live_', got '<redacted>'",
        ),
    ],
)
def test_each_mistake_is_one_line_naming_key_value_and_expectation(
    tmp_path: Path, body: str, environ: dict[str, str], expected: str
) -> None:
    message = _error(tmp_path, body, environ)
    assert message == expected
    assert "\n" not in message
    assert "secret" not in message


def test_several_mistakes_give_one_line_each(tmp_path: Path) -> None:
    message = _error(tmp_path, "[agent]\nlog_level = 3\nheartbeat_interval_s = 0\n")
    assert message.splitlines() == [
        "config.toml: agent.log_level: expected one of 'debug', 'info', 'warning' or 'error', "
        "got 3",
        "config.toml: agent.heartbeat_interval_s: expected a number > 0.0, got 0",
    ]


def test_missing_explicit_file_is_an_error_but_missing_default_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(None, environ={})
    assert settings.server.url == "http://127.0.0.1:8000"
    assert (
        settings.agent.state_dir == Path.home() / ".argus-agent"
        or settings.agent.state_dir == Path("/var/lib/argus-agent")
    )


def test_precedence_file_then_section_env_then_argus_names(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[server]\nurl = "https://file.example"\n[jobs]\nstop_grace_s = 5\n'
        '[agent]\nlog_level = "INFO"\n'
    )
    settings = load_settings(
        path,
        environ={
            "ARGUS_AGENT_JOBS_STOP_GRACE_S": "7.5",
            "ARGUS_AGENT_SERVER_URL": "https://section.example",
            "ARGUS_URL": "https://sdk.example/",
            "ARGUS_TOKEN": "em_live_abc",
            "ARGUS_AGENT_JOBS_SHELL": '["/bin/bash", "-lc"]',
        },
    )
    assert settings.server.url == "https://sdk.example"
    assert settings.server.token == "em_live_abc"
    assert settings.jobs.stop_grace_s == 7.5
    assert settings.jobs.shell == ["/bin/bash", "-lc"]
    assert settings.agent.log_level == "info"
    assert "em_live_abc" not in repr(settings)


def test_example_config_documents_every_key_and_loads(tmp_path: Path) -> None:
    example = Path(__file__).parents[1] / "config.example.toml"
    text = example.read_text()
    settings = load_settings(example, environ={})
    for section, model in type(settings).model_fields.items():
        assert f"[{section}]" in text
        for key in model.annotation.model_fields:
            assert f"{key} =" in text, f"{section}.{key} is not documented"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("ARGUS_")}
    return subprocess.run(
        [sys.executable, "-m", "argus_agent.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
    )


def test_cli_config_check_prints_redacted_config_or_one_line_error(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nurl = "https://argus.example"\ntoken = "em_live_topsecret"\n')
    good.chmod(0o600)  # it holds a token
    result = _cli("config", "check", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert '"url": "https://argus.example"' in result.stdout
    assert "topsecret" not in result.stdout + result.stderr
    assert "<redacted>" in result.stdout
    bad = tmp_path / "config.toml"
    bad.write_text('[server]\nurl = "ftp://x"\n')
    result = _cli("config", "check", "--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "argus-agent: config.toml: server.url: expected an http:// or https:// URL, got 'ftp://x'"
    )
    assert "Traceback" not in result.stderr


def test_cli_init_writes_a_starter_config_that_checks(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "config.toml"
    result = _cli("init", str(target))
    assert result.returncode == 0, result.stderr
    assert target.read_text().startswith("# argus-agent configuration")
    assert _cli("config", "check", "--config", str(target)).returncode == 0
    again = _cli("init", str(target))
    assert again.returncode == 3 and "already exists; use --force" in again.stderr
