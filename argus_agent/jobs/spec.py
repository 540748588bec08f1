"""Turn a ``rerun`` command into a validated launch spec, applying the launch policy.

The command line is what the Argus UI previews: the recorded command followed by one
``key=value`` word per override, in the form's order, each word shell-quoted. It runs through
the configured shell (default ``/bin/sh -c``). Every refusal raises PayloadError whose message
is the reason acked to the server. Starts no process.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argus_agent.config import Settings
from argus_agent.jobs import policy
from argus_agent.jobs.policy import Identity, UserDb
from argus_agent.protocol import Command

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
    identity: Identity
    dropped_env: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class HostFacts:
    """What the policy needs to know about this host at the moment of the launch."""

    agent_uid: int
    now: float
    running_jobs: int
    home: Path
    owner: str | None = None  # the Argus user who registered this agent


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
    settings: Settings,
    base_env: Mapping[str, str],
    facts: HostFacts,
    userdb: UserDb | None = None,
) -> LaunchSpec:
    """Apply every policy rule to a rerun command and build its LaunchSpec.

    Reads only the user database and whether ``cwd`` exists. Raises PayloadError.
    """
    jobs = settings.jobs
    payload = command.payload
    policy.check_age(command.created_at, facts.now, jobs.max_command_age_s)
    raw_command = policy.check_command(payload.get("command"))
    overrides = policy.check_overrides(payload.get("overrides"))
    env_payload, dropped = policy.check_env(payload.get("env"), jobs.env_deny)
    policy.check_host(payload.get("host"), settings.agent.hostname, settings.agent.host_aliases)
    requested_by = payload.get("requested_by")
    identity = policy.resolve_identity(
        requested_by,
        agent_uid=facts.agent_uid,
        users=jobs.users,
        run_as=jobs.run_as,
        allow_root=jobs.allow_root,
        userdb=userdb or UserDb(),
        owner=facts.owner,
        allowed_requesters=jobs.allowed_requesters,
    )
    default_cwd = jobs.default_cwd or (Path(identity.home) if facts.agent_uid == 0 else facts.home)
    cwd = policy.check_cwd(payload.get("cwd"), default_cwd, identity)
    policy.check_capacity(facts.running_jobs, jobs.max_jobs)
    source = payload.get("source_batch_id")
    env = dict(base_env)
    env.update(identity.login_env())
    env.update(env_payload)
    env["ARGUS_BATCH_ID"] = command.batch_id
    env["ARGUS_SOURCE_BATCH_ID"] = source if isinstance(source, str) else ""
    env["ARGUS_URL"] = settings.server.url
    command_line = build_command_line(raw_command, overrides)
    return LaunchSpec(
        batch_id=command.batch_id,
        cmd_id=command.id,
        source_batch_id=source if isinstance(source, str) else None,
        requested_by=requested_by if isinstance(requested_by, str) else None,
        command_line=command_line,
        argv=(*jobs.shell, command_line),
        cwd=cwd,
        env=env,
        identity=identity,
        dropped_env=tuple(dropped),
    )


def current_home() -> Path:
    """The agent user's home directory."""
    return Path(os.path.expanduser("~"))
