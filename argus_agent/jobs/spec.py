"""Turn a ``rerun`` command into a validated launch spec, applying the launch policy.

The job runs the recorded command through the configured shell (default ``/bin/sh -c``);
overrides reach it as positional parameters (``CMD "$@"``, see ``cmdline``), so no override
value ever meets a shell parser. It runs as the batch's recorded owner (see
``policy.resolve_identity``), in the resolved working directory, with the recorded
environment under the run-as user's own login identity. Every refusal raises PayloadError
whose message is the reason acked to the server. Starts no process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from argus_agent.config import Settings
from argus_agent.jobs import cmdline, policy
from argus_agent.jobs.policy import BatchOwner, Identity, UserDb
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
    #: The working directory as recorded (``cwd`` is its resolved real path).
    recorded_cwd: str | None = None
    #: The batch's recorded owner (None when ``jobs.run_as`` decided the user).
    owner: BatchOwner | None = None
    #: The environment the batch recorded, less ``jobs.env_deny`` (a Slurm launch recovers
    #: the original run's resources from its ``SLURM_*`` variables).
    recorded_env: Mapping[str, str] = field(default_factory=dict)
    #: The host the batch recorded (checked to be this host or one of its aliases).
    host: str | None = None


@dataclass(frozen=True)
class HostFacts:
    """What the policy needs to know about this host at the moment of the launch."""

    agent_uid: int
    now: float
    running_jobs: int
    home: Path
    #: The Argus account that registered this agent (per-user agents serve only it).
    agent_account: str | None = None
    #: The compute-node names a Slurm login-node agent serves besides its own.
    served_hosts: frozenset[str] = frozenset()
    #: The OS user Argus recorded for the batch, as read from the server (None: none).
    batch_owner: BatchOwner | None = None
    #: Whether the batch could be read from the server at all; only when it could not is
    #: the env snapshot's ``USER`` taken as the owner.
    batch_read: bool = False


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
    policy.check_age(command.created_at, facts.now, jobs.max_command_age_s, jobs.max_clock_skew_s)
    raw_command = policy.check_command(payload.get("command"))
    overrides = policy.check_overrides(payload.get("overrides"))
    env_payload, dropped = policy.check_env(payload.get("env"), jobs.env_deny)
    policy.check_host(
        payload.get("host"),
        settings.agent.hostname,
        [*settings.agent.host_aliases, *facts.served_hosts],
    )
    argv, command_line = cmdline.build_argv(jobs.shell, raw_command, overrides)
    requested_by = payload.get("requested_by")
    owner = facts.batch_owner if facts.batch_read else policy.owner_from_env(payload.get("env"))
    identity = policy.resolve_identity(
        requested_by,
        owner,
        agent_uid=facts.agent_uid,
        users=jobs.users,
        run_as=jobs.run_as,
        allow_root=jobs.allow_root,
        userdb=userdb or UserDb(),
        agent_account=facts.agent_account,
        allowed_requesters=jobs.allowed_requesters,
        privileged_groups=jobs.privileged_groups,
        allow_privileged_groups=jobs.allow_privileged_groups,
    )
    default_cwd = jobs.default_cwd or (Path(identity.home) if facts.agent_uid == 0 else facts.home)
    recorded_cwd = payload.get("cwd")
    cwd = policy.check_cwd(recorded_cwd, default_cwd, identity)
    policy.check_capacity(facts.running_jobs, jobs.max_jobs)
    source = payload.get("source_batch_id")
    env = dict(base_env)
    env.update(env_payload)
    # The login identity is the run-as user's own, whatever the recording says (PATH, CUDA
    # and conda variables do come from the recording: they make the rerun reproducible).
    env.update(identity.login_env())
    env["ARGUS_BATCH_ID"] = command.batch_id
    env["ARGUS_SOURCE_BATCH_ID"] = source if isinstance(source, str) else ""
    env["ARGUS_URL"] = settings.server.url
    return LaunchSpec(
        batch_id=command.batch_id,
        cmd_id=command.id,
        source_batch_id=source if isinstance(source, str) else None,
        requested_by=requested_by if isinstance(requested_by, str) else None,
        command_line=command_line,
        argv=argv,
        cwd=cwd,
        env=env,
        identity=identity,
        dropped_env=tuple(dropped),
        recorded_cwd=recorded_cwd if isinstance(recorded_cwd, str) else None,
        owner=owner if jobs.run_as is None or facts.agent_uid != 0 else None,
        recorded_env=env_payload,
        host=payload.get("host"),
    )


def current_home() -> Path:
    """The agent user's home directory."""
    return Path(os.path.expanduser("~"))
