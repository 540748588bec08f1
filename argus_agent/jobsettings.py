"""The ``[jobs]`` section of the configuration: how reruns are launched, as whom, and
stopped (the launch policy), the per-job cgroup settings and the launcher (local or Slurm).
Split from ``config`` by size; ``config.Settings`` holds it as ``jobs``. Each field's
``description`` is the reference text (``configdoc``)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from argus_agent import slurmconfig
from argus_agent.configbase import USER_NAME_RE, Section

#: Variables that change what gets executed or how a shell starts; dropped from a rerun's
#: recorded environment by default. A trailing ``*`` matches a prefix.
DEFAULT_ENV_DENY = (
    "LD_PRELOAD",
    "LD_AUDIT",
    "LD_PROFILE",
    "LD_DEBUG_OUTPUT",
    "LD_ORIGIN_PATH",
    "LD_DYNAMIC_WEAK",
    "GCONV_PATH",
    "GETCONF_DIR",
    "MALLOC_TRACE",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "IFS",
    "PROMPT_COMMAND",
    "BASH_FUNC_*",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PERL5OPT",
    "PERL5DB",
    "RUBYOPT",
    "NODE_OPTIONS",
    "JAVA_TOOL_OPTIONS",
)


#: Groups whose members are root or close to it (the docker socket, lxd, raw disks, the
#: shadow file): a system agent refuses to run jobs as their members unless allowed.
DEFAULT_PRIVILEGED_GROUPS = ("docker", "lxd", "disk", "shadow")


class JobSettings(Section):
    """How relaunched runs are started, run, logged and stopped, and who they run as."""

    shell: list[str] = Field(
        default_factory=lambda: ["/bin/sh", "-c"],
        min_length=1,
        description="The shell that runs a relaunched command line: the line is passed as "
        'the last argument. Overrides reach the command as positional parameters ("$@"), '
        "never quoted into the line, so reruns with overrides need a POSIX shell here (sh, "
        "bash, dash, ksh, zsh) ending in -c. A string is split like a shell command line.",
    )
    default_cwd: Path | None = Field(
        default=None,
        examples=["/srv/training"],
        description="Working directory when the source batch recorded none. Unset: the home "
        "directory of the user the job runs as.",
    )
    stop_grace_s: float = Field(
        default=20.0,
        ge=0,
        le=3600,
        description="Seconds between SIGTERM and SIGKILL when a job is stopped.",
    )
    unkillable_wait_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="After SIGKILL, how long (seconds) processes that will not die "
        "(uninterruptible sleep on NFS or a GPU driver, a setuid program) may hold up a stop; "
        "then the job is recorded as ended with their pids in the reason, and reported.",
    )
    inherit_argus_token: bool = Field(
        default=False,
        description="Pass the agent's ARGUS_TOKEN on to the jobs it starts (off: jobs get "
        "ARGUS_URL and the batch ids, and whatever environment the source batch recorded).",
    )
    run_as: str | None = Field(
        default=None,
        examples=["trainer"],
        description="Run every job as this one OS user instead of the batch's owner (the "
        'Argus account that pressed Rerun must be mapped to it, or to "*", in users).',
    )
    users: dict[str, str] = Field(
        default_factory=dict,
        examples=[{"alice": "alice", "bob.smith": "bob", "admin": "*"}],
        description="Who a job runs as. A job runs as the OS user Argus recorded for the "
        "batch (its `user`, read with the reporter token; else the environment snapshot's "
        "USER), never as the Argus account that pressed Rerun: that account only decides "
        "whether the rerun is allowed. A per-user agent (not root) runs only batches recorded "
        "as its own OS user. A system agent (root) runs a batch as its owner only when this "
        'table maps the Argus account that pressed Rerun to that OS user, or to "*" (any '
        "owner: for admins).",
    )
    allow_root: bool = Field(
        default=False,
        description="Jobs never run as root unless this is true.",
    )
    privileged_groups: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PRIVILEGED_GROUPS),
        description="Nor as a member of group 0 or of these groups, which are root or close "
        "to it (docker's socket, lxd, raw disks, /etc/shadow), unless allow_privileged_groups "
        "is true.",
    )
    allow_privileged_groups: bool = Field(
        default=False,
        description="Let jobs run as members of group 0 and of privileged_groups.",
    )
    allowed_requesters: list[str] = Field(
        default_factory=list,
        description="A per-user agent runs reruns only for the Argus user whose token "
        'registered it, plus the Argus users listed here ("*": anyone). Argus hands a host\'s '
        "commands to whichever agent of that host polled last, so on a shared host this "
        "keeps user A's rerun from running as B.",
    )
    env_deny: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENV_DENY),
        description="Variables dropped from a batch's recorded environment because they "
        "change what gets executed or how a shell starts (a trailing * matches a prefix).",
    )
    max_command_age_s: float = Field(
        default=3600.0,
        gt=0,
        description="A rerun command older than this (seconds) is refused as expired: after "
        "an agent outage the server delivers old pending commands, and a run nobody waits for "
        "any more should not start.",
    )
    max_clock_skew_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="A command whose created_at lies further in the future than this "
        "(seconds) is refused, as is one whose created_at is missing or not an ISO 8601 time: "
        "expiry fails closed. Keep clocks in sync (NTP).",
    )
    max_jobs: int | None = Field(
        default=None,
        ge=1,
        examples=[4],
        description="At most this many jobs at once on this host. Unset: no limit.",
    )
    log_max_bytes: int = Field(
        default=1 << 30,
        ge=4096,
        description="Each job's log (stdout + stderr) is capped at this size; the rest is "
        "discarded after a truncation marker.",
    )
    kill_leftovers: bool = Field(
        default=True,
        description="When a job's main process ends, stop what it left running (SIGTERM, "
        "SIGKILL 5 s later).",
    )
    retention_days: float = Field(
        default=14.0,
        gt=0,
        description="Records and logs of ended jobs are removed after this many days.",
    )
    cgroups: Literal["auto", "off"] = Field(
        default="auto",
        description='Per-job control groups: "auto" gives each job its own cgroup where the '
        "agent may write a cgroup v2 subtree (by default its own cgroup, which the shipped "
        'systemd units delegate with Delegate=yes); "off" never.',
    )
    cgroup_root: Path | None = Field(
        default=None,
        examples=["/sys/fs/cgroup/argus-jobs"],
        description="The cgroup v2 directory that holds the jobs' cgroups, instead of the "
        "agent's own cgroup; the agent must be allowed to write it.",
    )
    memory_max: int | None = Field(
        default=None,
        ge=1 << 20,
        examples=["64G"],
        description='Memory limit of each job\'s cgroup: bytes, or a size such as "512M" or '
        '"8G" (K, M, G, T: powers of 1024). Unset: no limit.',
    )
    cpu_max: float | None = Field(
        default=None,
        ge=0.01,
        le=4096,
        examples=[8.0],
        description="CPU limit of each job's cgroup, in CPUs. Unset: no limit.",
    )
    pids_max: int | None = Field(
        default=None,
        ge=1,
        examples=[4096],
        description="Most tasks (processes and threads) in each job's cgroup. Unset: no limit.",
    )
    # The launcher and the Slurm keys: descriptions and checks in slurmconfig.py.
    launcher: slurmconfig.Launcher = slurmconfig.LAUNCHER
    slurm_pin_node: bool = slurmconfig.SLURM_PIN_NODE
    slurm_partition: str | None = slurmconfig.SLURM_PARTITION
    slurm_time_limit: str | None = slurmconfig.SLURM_TIME_LIMIT
    slurm_extra_args: list[str] = slurmconfig.SLURM_EXTRA_ARGS
    slurm_output_dir: Path | None = slurmconfig.SLURM_OUTPUT_DIR
    slurm_poll_s: float = slurmconfig.SLURM_POLL_S
    slurm_usage_interval_s: float = slurmconfig.SLURM_USAGE_INTERVAL_S
    slurm_command_timeout_s: float = slurmconfig.SLURM_COMMAND_TIMEOUT_S
    slurm_hosts: list[str] = slurmconfig.SLURM_HOSTS
    slurm_partitions: list[str] = slurmconfig.SLURM_PARTITIONS

    @model_validator(mode="after")
    def _slurm(self) -> JobSettings:
        slurmconfig.check(self)
        return self

    @field_validator("memory_max", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise ValueError("expected a size in bytes, e.g. 8589934592 or '8G' (K, M, G, T)")
        scale = 1 << (10 * " KMGT".index(match.group(2).upper() or " "))
        return int(float(match.group(1)) * scale)

    @field_validator("cgroup_root")
    @classmethod
    def _absolute_cgroup_root(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("expected an absolute path to a cgroup v2 directory")
        return value

    @field_validator("shell", mode="before")
    @classmethod
    def _split_shell(cls, value: Any) -> Any:
        if isinstance(value, str):
            return shlex.split(value)
        return value

    @field_validator("shell")
    @classmethod
    def _absolute_shell(cls, value: list[str]) -> list[str]:
        if not value[0].startswith("/"):
            raise ValueError("expected an absolute path to the shell first, e.g. ['/bin/sh', '-c']")
        return value

    @field_validator("default_cwd")
    @classmethod
    def _absolute_cwd(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("expected an absolute directory path")
        return value

    @field_validator("run_as")
    @classmethod
    def _user_name(cls, value: str | None) -> str | None:
        if value is not None and not USER_NAME_RE.fullmatch(value):
            raise ValueError("expected an OS user name")
        return value

    @field_validator("users")
    @classmethod
    def _user_map(cls, value: dict[str, str]) -> dict[str, str]:
        for argus_user, os_user in value.items():
            if os_user != "*" and not USER_NAME_RE.fullmatch(os_user):
                raise ValueError(f"{argus_user}: expected an OS user name or '*'")
        return value
