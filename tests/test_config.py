"""Configuration: defaults, file, environment overrides, and one clear line per mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo

from argus_agent.config import SECTIONS, JobSettings, describe_sources, load_settings
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
            + ", ".join(sorted(JobSettings.model_fields)),
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


# -- the environment sets every key, tables and lists included --------------------------------


def _env_text(value: object) -> str:
    """How an operator writes ``value`` in an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _toml_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value if isinstance(value, list) else str(value))


def _sample(field: FieldInfo) -> object:
    """A valid value for the key that is not its default where we can tell one."""
    if field.examples:
        return field.examples[0]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return not default
    if isinstance(default, list):
        return default[:1] or ["x"]
    return default


#: Keys that are only valid with others set (given the same way, in the same section).
COMPANIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("jobs", "slurm_hosts"): {"launcher": "slurm"},
    ("jobs", "slurm_partitions"): {"launcher": "slurm", "slurm_hosts": ["*"]},
}


def test_every_key_can_be_set_from_the_environment_as_in_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for section, model in SECTIONS.items():
        for key, field in model.model_fields.items():
            values = {**COMPANIONS.get((section, key), {}), key: _sample(field)}
            names = {k: f"ARGUS_AGENT_{section.upper()}_{k.upper()}" for k in values}
            path = tmp_path / "one.toml"
            lines = "".join(f"{k} = {_toml_text(v)}\n" for k, v in values.items())
            path.write_text(f"[{section}]\n{lines}")
            path.chmod(0o600)  # server.token may be in it
            from_file = load_settings(path, environ={})
            environ = {names[k]: _env_text(v) for k, v in values.items()}
            from_env = load_settings(empty, environ=environ)
            assert from_env == from_file, environ


def test_environment_tables_and_lists_are_json(tmp_path: Path) -> None:
    empty = tmp_path / "config.toml"
    empty.write_text("[jobs]\nmax_jobs = 4\n")
    settings = load_settings(
        empty,
        environ={
            "ARGUS_AGENT_JOBS_USERS": '{"alice": "alice", "bob.smith": "bob", "admin": "*"}',
            "ARGUS_AGENT_AGENT_HOST_ALIASES": ' ["gpu-01", "gpu-01.lan"]',
            "ARGUS_AGENT_JOBS_ENV_DENY": "[]",
            "ARGUS_AGENT_JOBS_SHELL": "/bin/bash -lc",  # a command line, split like a shell
            "ARGUS_AGENT_JOBS_MAX_JOBS": "",  # empty: unset, over the file's 4
            "ARGUS_AGENT_TELEMETRY_ENABLED": "false",
        },
    )
    assert settings.jobs.users == {"alice": "alice", "bob.smith": "bob", "admin": "*"}
    assert settings.agent.host_aliases == ["gpu-01", "gpu-01.lan"]
    assert settings.jobs.env_deny == []
    assert settings.jobs.shell == ["/bin/bash", "-lc"]
    assert settings.jobs.max_jobs is None
    assert settings.telemetry.enabled is False


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "ARGUS_AGENT_JOBS_USERS",
            '{"alice": "alice"',
            "environment ARGUS_AGENT_JOBS_USERS: jobs.users: expected a table as JSON, e.g. "
            '{"alice": "alice"} (Expecting \',\' delimiter at character 17), got '
            '\'{"alice": "alice"\'',
        ),
        (
            "ARGUS_AGENT_JOBS_PRIVILEGED_GROUPS",
            '["docker", lxd]',
            "environment ARGUS_AGENT_JOBS_PRIVILEGED_GROUPS: jobs.privileged_groups: expected a "
            'list as JSON, e.g. ["a", "b"] (Expecting value at character 11), got '
            "'[\"docker\", lxd]'",
        ),
        (
            "ARGUS_AGENT_JOBS_USERS",
            '["alice"]',
            "environment ARGUS_AGENT_JOBS_USERS: jobs.users: expected a table, got ['alice']",
        ),
        (
            "ARGUS_AGENT_JOBS_USERS",
            "alice=alice",
            "environment ARGUS_AGENT_JOBS_USERS: jobs.users: expected a table, got 'alice=alice'",
        ),
        (
            "ARGUS_AGENT_AGENT_HOST_ALIASES",
            "gpu-01,gpu-02",
            "environment ARGUS_AGENT_AGENT_HOST_ALIASES: agent.host_aliases: expected a list of "
            "strings, got 'gpu-01,gpu-02'",
        ),
        (
            "ARGUS_AGENT_JOBS_USERS",
            '{"alice": "not a user"}',
            "environment ARGUS_AGENT_JOBS_USERS: jobs.users.alice: expected an OS user name or "
            "'*', got 'not a user'",
        ),
        (
            "ARGUS_AGENT_JOBS_STOP_GRACE_S",
            "",
            "environment ARGUS_AGENT_JOBS_STOP_GRACE_S: jobs.stop_grace_s: expected a number, "
            "got ''",
        ),
        (
            "ARGUS_AGENT_SERVER_TOKEN",
            "ag_live_secret",
            "environment ARGUS_AGENT_SERVER_TOKEN: server.token: expected an Argus reporter "
            "token starting with 'em_live_', got '<redacted>'",
        ),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_variable_key_and_shape(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    message = _error(tmp_path, "", {name: value})
    assert message == expected
    assert "\n" not in message and "secret" not in message


def test_config_sources_are_listed_with_secrets_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    environ = {
        "ARGUS_AGENT_JOBS_USERS": '{"alice": "alice"}',
        "ARGUS_AGENT_SERVER_TOKEN": "em_live_topsecret",
        "ARGUS_TOKEN": "em_live_topsecret",
        "ARGUS_URL": "",  # empty: not read
        "ARGUS_AGENT_SEVER_URL": "https://typo.example",
        "HOME": "/home/alice",
    }
    monkeypatch.setattr("argus_agent.config.default_config_path", lambda: path)
    assert describe_sources(None, environ=environ) == [
        f"file {path}: not found; built-in defaults apply",
        'environment ARGUS_AGENT_JOBS_USERS=\'{"alice": "alice"}\' (jobs.users)',
        "environment ARGUS_AGENT_SERVER_TOKEN=<redacted> (server.token)",
        "environment ARGUS_AGENT_SEVER_URL=https://typo.example (unknown setting)",
        "environment ARGUS_TOKEN=<redacted> (server.token)",
    ]
    path.write_text("")
    assert describe_sources(path, environ={}) == [
        f"file {path}",
        "environment: no ARGUS_AGENT_*, ARGUS_URL or ARGUS_TOKEN variable set",
    ]


def test_cli_config_check_says_which_file_and_variables_it_read(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[jobs]\nusers = { alice = "alice" }\n')
    env = {"ARGUS_AGENT_JOBS_MAX_JOBS": "2", "ARGUS_TOKEN": "em_live_topsecret"}
    result = _cli("config", "check", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    head = result.stdout.split("effective configuration (secrets redacted):\n")[0]
    assert head.splitlines() == [
        "sources (lowest precedence first):",
        f"  file {path}",
        "  environment ARGUS_AGENT_JOBS_MAX_JOBS=2 (jobs.max_jobs)",
        "  environment ARGUS_TOKEN=<redacted> (server.token)",
    ]
    effective = json.loads(result.stdout.split("(secrets redacted):\n")[1])
    assert effective["jobs"]["max_jobs"] == 2
    assert effective["jobs"]["users"] == {"alice": "alice"}
    assert "topsecret" not in result.stdout + result.stderr
    bad = _cli("config", "check", "--config", str(path), env={"ARGUS_AGENT_JOBS_MAX_JOBS": "x"})
    assert bad.returncode == 1
    assert "  environment ARGUS_AGENT_JOBS_MAX_JOBS=x (jobs.max_jobs)" in bad.stdout
    assert bad.stderr == (
        "argus-agent: environment ARGUS_AGENT_JOBS_MAX_JOBS: jobs.max_jobs: expected an "
        "integer, got 'x'\n"
    )
