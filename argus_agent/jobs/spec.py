"""Turn a ``rerun`` command's payload into a validated launch spec. Pure policy, no processes.

The command line is what the Argus UI previews: the recorded command followed by one
``key=value`` word per override, in the form's order, each word shell-quoted. It runs through
the configured shell (default ``/bin/sh -c``). Every refusal raises PayloadError whose message
is the reason acked to the server.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argus_agent.config import JobSettings
from argus_agent.errors import PayloadError
from argus_agent.protocol import Command

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
OVERRIDE_KEY_RE = re.compile(r"^[A-Za-z_+~][A-Za-z0-9_.\-/@+]*$")
#: Variables of the agent's own environment that never reach a job.
AGENT_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one job; derived from a rerun command and the config."""

    batch_id: str
    cmd_id: str
    source_batch_id: str | None
    requested_by: str | None
    command_line: str
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]


def render_override(key: str, value: Any) -> str:
    """One ``key=value`` word (unquoted), Hydra style: ``true``/``false``, ``null``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return f"{key}={text}"


def build_command_line(command: str, overrides: Mapping[str, Any] | None) -> str:
    """``command`` plus each override as a shell-quoted ``key=value`` word, in the given order."""
    words = [shlex.quote(render_override(k, v)) for k, v in (overrides or {}).items()]
    return " ".join([command, *words])


def job_base_env(environ: Mapping[str, str], *, keep_argus_token: bool) -> dict[str, str]:
    """The agent's environment minus what belongs to the agent alone (systemd sockets, its
    own ``ARGUS_AGENT_*`` settings, and the reporter token unless ``keep_argus_token``)."""
    env = {}
    for name, value in environ.items():
        if name in AGENT_ONLY_ENV or name.startswith("ARGUS_AGENT_"):
            continue
        if name == "ARGUS_TOKEN" and not keep_argus_token:
            continue
        env[name] = value
    return env


def build_launch_spec(
    command: Command,
    *,
    settings: JobSettings,
    base_env: Mapping[str, str],
    server_url: str,
    home: Path,
) -> LaunchSpec:
    """Validate a rerun command and build its LaunchSpec. Reads only whether ``cwd`` exists.

    Raises PayloadError with the reason to ack.
    """
    payload = command.payload
    raw_command = payload.get("command")
    if raw_command is None:
        raise PayloadError("the source batch recorded no command (payload.command is null)")
    if not isinstance(raw_command, str):
        raise PayloadError(f"payload.command: expected a string, got {type(raw_command).__name__}")
    if not raw_command.strip():
        raise PayloadError("payload.command is empty")
    if "\x00" in raw_command:
        raise PayloadError("payload.command contains a NUL byte")

    overrides = payload.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise PayloadError(f"payload.overrides: expected an object, got {type(overrides).__name__}")
    for key, value in (overrides or {}).items():
        if not OVERRIDE_KEY_RE.match(key):
            raise PayloadError(f"payload.overrides: key {key[:80]!r} has an unsafe shape")
        if not isinstance(value, str | int | float | bool) and value is not None:
            raise PayloadError(
                f"payload.overrides.{key}: expected a scalar, got {type(value).__name__}"
            )
        if isinstance(value, str) and "\x00" in value:
            raise PayloadError(f"payload.overrides.{key}: value contains a NUL byte")

    env_payload = payload.get("env")
    if env_payload is not None and not isinstance(env_payload, dict):
        raise PayloadError(f"payload.env: expected an object, got {type(env_payload).__name__}")
    for name, value in (env_payload or {}).items():
        if not ENV_NAME_RE.match(name):
            raise PayloadError(f"payload.env: {name[:80]!r} is not a valid variable name")
        if not isinstance(value, str):
            raise PayloadError(f"payload.env.{name}: expected a string, got {type(value).__name__}")
        if "\x00" in value:
            raise PayloadError(f"payload.env.{name}: value contains a NUL byte")

    cwd = _resolve_cwd(payload.get("cwd"), settings, home)
    source = payload.get("source_batch_id")
    requested_by = payload.get("requested_by")
    env = dict(base_env)
    env.update(env_payload or {})
    env["ARGUS_BATCH_ID"] = command.batch_id
    env["ARGUS_SOURCE_BATCH_ID"] = source if isinstance(source, str) else ""
    env["ARGUS_URL"] = server_url
    command_line = build_command_line(raw_command, overrides)
    return LaunchSpec(
        batch_id=command.batch_id,
        cmd_id=command.id,
        source_batch_id=source if isinstance(source, str) else None,
        requested_by=requested_by if isinstance(requested_by, str) else None,
        command_line=command_line,
        argv=(*settings.shell, command_line),
        cwd=cwd,
        env=env,
    )


def _resolve_cwd(raw: Any, settings: JobSettings, home: Path) -> Path:
    if raw is None:
        cwd = settings.default_cwd or home
    elif not isinstance(raw, str) or not raw:
        raise PayloadError(f"payload.cwd: expected an absolute path, got {raw!r}")
    else:
        cwd = Path(raw)
    if "\x00" in str(cwd) or not cwd.is_absolute():
        raise PayloadError(f"payload.cwd: expected an absolute path, got {str(cwd)[:200]!r}")
    if not cwd.exists():
        raise PayloadError(f"working directory {cwd} does not exist on this host")
    if not cwd.is_dir():
        raise PayloadError(f"working directory {cwd} is not a directory")
    if not os.access(cwd, os.X_OK):
        raise PayloadError(f"working directory {cwd} is not accessible to the agent's user")
    return cwd
