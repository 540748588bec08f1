"""The agent's configuration: the schema, every key's description, and loading.

Owns the pydantic models (unknown keys refused; each field's ``description`` is the one text
that ``configdoc`` renders into docs/configuration.md and config.example.toml, so the
reference cannot drift) and :func:`load_settings`. Sources, lowest precedence first: built-in
defaults, the TOML file, ``ARGUS_AGENT_<SECTION>_<KEY>`` variables, then ``ARGUS_URL`` /
``ARGUS_TOKEN`` (the names Argus' SDK uses). ``configsources`` reads them (from the
environment a list or a table is JSON, ``ARGUS_AGENT_JOBS_USERS='{"alice": "alice"}'``) and
``configerrors`` turns every mistake into one line naming the source, the key, the value and
what was expected::

    config.toml: server.url: expected an http:// or https:// URL, got 'ftp://x'

The environment is read by our own few dozen lines rather than pydantic-settings, which
would ignore an unknown ``ARGUS_AGENT_*`` variable (a typo would silently do nothing; here it
is an error listing the keys), forget which source gave each value (every message here
names the file or the variable), and report bad JSON as a ``SettingsError`` naming neither
the variable nor the shape expected; it would also be one more dependency on every host.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from argus_agent import configerrors, configsources, slurmconfig
from argus_agent.configsources import SECRET_KEYS
from argus_agent.errors import ConfigError

USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
SYSTEM_CONFIG_PATH = Path("/etc/argus-agent/config.toml")
SYSTEM_STATE_DIR = Path("/var/lib/argus-agent")
#: ``json_schema_extra`` key: how the reference shows a default computed on the host.
DEFAULT_TEXT = "default_text"


def running_as_root() -> bool:
    """True when the process runs with uid 0 (the system-agent deployment)."""
    return os.geteuid() == 0


def default_config_path() -> Path:
    """The config path used when ``--config`` is not given; nothing is read."""
    if running_as_root():
        return SYSTEM_CONFIG_PATH
    return Path.home() / ".config" / "argus-agent" / "config.toml"


def default_state_dir() -> Path:
    """``/var/lib/argus-agent`` for root, else ``~/.argus-agent`` (the path Argus' docs name)."""
    if running_as_root():
        return SYSTEM_STATE_DIR
    return Path.home() / ".argus-agent"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """How to reach the Argus server."""

    url: str = Field(
        default="http://127.0.0.1:8000",
        description="The Argus server. Plain http:// is only allowed to a loopback address, "
        "unless allow_insecure_http = true (tokens would travel in clear text).",
    )
    token: str | None = Field(
        default=None,
        repr=False,
        examples=["em_live_..."],
        description="Your Argus reporter token (em_live_...): `argus-agent register` uses it, "
        "and the agent sends the telemetry of the runs it starts with it. Prefer the "
        "ARGUS_TOKEN environment variable, `register --token-file` or token_file over writing "
        "it here; a config file that holds it must be private to its owner (chmod 600).",
    )
    token_file: Path | None = Field(
        default=None,
        examples=["/etc/argus-agent/reporter-token"],
        description="A file holding the reporter token, read instead of token (mode 0600).",
    )
    allow_insecure_http: bool = Field(
        default=False,
        description="Allow a plain http:// url to a host that is not a loopback address.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Timeout of one HTTP request to the server, seconds.",
    )
    transport: Literal["auto", "websocket", "poll"] = Field(
        default="auto",
        description='How commands reach the agent. "auto" uses the server\'s websocket '
        "(argus-agent.v1) when it offers one, for commands in milliseconds and events on the "
        "same connection, and else polls over REST (an unmodified Argus v0.3.0), probing the "
        'websocket again every 10 minutes. "websocket": only the websocket, never polling. '
        '"poll": only REST polling.',
    )
    websocket_compression: bool = Field(
        default=False,
        description="Offer permessage-deflate on the websocket (used when the server accepts "
        "it): about 10x smaller frames for about 2 ms of CPU per 500 events; worth it over "
        "links slower than a few hundred Mb/s, a loss on a LAN (bench/README.md has the "
        "measurement).",
    )

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith("em_live_"):
            raise ValueError("expected an Argus reporter token starting with 'em_live_'")
        return value

    @model_validator(mode="after")
    def _refuse_plain_http(self) -> ServerSettings:
        parts = urlsplit(self.url)
        if (
            parts.scheme == "http"
            and not self.allow_insecure_http
            and not is_loopback(parts.hostname or "")
        ):
            raise ValueError(
                "url: plain http:// to a non-loopback host sends tokens in clear text;"
                " use https:// or set server.allow_insecure_http = true"
            )
        return self


class AgentSettings(_Section):
    """The daemon itself: identity, state, timing and logging."""

    state_dir: Path = Field(
        default_factory=default_state_dir,
        examples=["/var/lib/argus-agent"],
        json_schema_extra={DEFAULT_TEXT: "/var/lib/argus-agent as root, else ~/.argus-agent"},
        description="Where the agent keeps its token (token.json, mode 0600), command ledger "
        "and job records.",
    )
    hostname: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=255,
        examples=["gpu-node-01"],
        json_schema_extra={DEFAULT_TEXT: "this host's name (socket.gethostname())"},
        description="The host name sent to Argus; must equal what the SDK records "
        "(socket.gethostname()).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="How much the agent logs (to stderr: the journal under systemd).",
    )
    poll_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        examples=[10.0],
        description="Seconds between polls for commands. Unset: what the server said at "
        "register time (10 s).",
    )
    heartbeat_interval_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds between the heartbeats that tell the server this host's agent is "
        "alive, while no websocket is open (an open websocket is itself the liveness).",
    )
    backoff_initial_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="After a connection error, timeout or 5xx, the first retry comes within "
        "this many seconds; later ones back off exponentially, with full jitter.",
    )
    backoff_max_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="The longest wait between two retries, seconds (at least backoff_initial_s).",
    )
    auth_retry_s: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="After the server rejected the agent token (re-registered elsewhere or "
        "revoked), retry this often; run `argus-agent register --force` to fix it (a new "
        "token.json is noticed within a second, without waiting for the retry).",
    )
    stall_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="A loop of the agent (polling, sending, sampling, ...) stuck in one call "
        "longer than this (seconds, more than server.timeout_s) makes the agent unhealthy: "
        "systemd's watchdog is no longer fed, STATUS= and `argus-agent status` name the loop, "
        "and systemd restarts the agent.",
    )
    host_aliases: list[str] = Field(
        default_factory=list,
        description="Other names of this host. A rerun is refused unless the batch's recorded "
        "host is this host's name or one of these (compared case-insensitively).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backoff_order(self) -> AgentSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s: expected a value >= agent.backoff_initial_s"
                f" ({self.backoff_initial_s})"
            )
        return self


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


class JobSettings(_Section):
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
        if value is not None and not USER_NAME_RE.match(value):
            raise ValueError("expected an OS user name")
        return value

    @field_validator("users")
    @classmethod
    def _user_map(cls, value: dict[str, str]) -> dict[str, str]:
        for argus_user, os_user in value.items():
            if os_user != "*" and not USER_NAME_RE.match(os_user):
                raise ValueError(f"{argus_user}: expected an OS user name or '*'")
        return value


class TelemetrySettings(_Section):
    """Resource snapshots, log lines and lifecycle events of the jobs this agent supervises,
    sent to Argus with the reporter token (ARGUS_TOKEN, server.token or server.token_file).
    Without a token they are kept in the outbox (up to outbox_max_mb) and not sent."""

    enabled: bool = Field(default=True, description="Collect and send telemetry at all.")
    interval_s: float = Field(
        default=10.0,
        ge=0.5,
        le=3600,
        description="Seconds between resource snapshots of each running job.",
    )
    gpu: Literal["auto", "nvml", "none"] = Field(
        default="auto",
        description='GPU readings: "auto" (NVML when a driver and GPU are there), "nvml", or '
        '"none".',
    )
    gpu_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="A GPU reading slower than this (seconds) is skipped; NVML is slow on "
        "some drivers.",
    )
    logs: bool = Field(default=True, description="Send each job's log lines as log_line events.")
    log_poll_s: float = Field(
        default=0.5,
        ge=0.05,
        le=60,
        description="How often job logs are checked for new lines, seconds.",
    )
    log_max_lines_per_s: float = Field(
        default=1000.0,
        ge=0,
        description="At most this many log lines per second per job are sent (0: no limit); a "
        "marker says how many were skipped. The job's log file keeps them all.",
    )
    lifecycle_events: bool = Field(
        default=True,
        description="Send batch_done / batch_failed for a rerun batch when its job ends (so a "
        "stopped batch leaves `stopping`).",
    )
    project: str = Field(
        default="argus-agent",
        min_length=1,
        max_length=200,
        description="The project named in the events' source (Argus keeps the batch's own "
        "project).",
    )
    outbox_max_mb: float = Field(
        default=512.0,
        gt=0,
        description="Megabytes of events kept while the server is away; when full, the "
        "oldest snapshots and log lines are dropped first (and counted); lifecycle events are "
        "never dropped.",
    )
    send_batch_size: int = Field(
        default=500,
        ge=1,
        le=500,
        description="Events per POST /api/events/batch (Argus takes at most 500).",
    )


class Settings(_Section):
    """The whole, validated, frozen configuration."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)

    @model_validator(mode="after")
    def _stall_after_deadline(self) -> Settings:
        # A loop may spend a whole server call (server.timeout_s) in one step: only a loop
        # stuck for longer than that is unhealthy.
        if self.agent.stall_timeout_s <= self.server.timeout_s:
            raise ValueError(
                "agent.stall_timeout_s: expected a number > server.timeout_s "
                f"({self.server.timeout_s:g})"
            )
        return self

    @property
    def token_path(self) -> Path:
        """Where the agent token (``token.json``) lives."""
        return self.agent.state_dir / "token.json"


SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSettings,
    "agent": AgentSettings,
    "jobs": JobSettings,
    "telemetry": TelemetrySettings,
}


def is_loopback(host: str) -> bool:
    """Whether *host* names only this machine: ``localhost`` or a loopback address. Any other
    name, and the wildcard addresses (``0.0.0.0``, ``::``), are not."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Read, merge and validate the configuration.

    ``path`` None means the default path, which may be absent (defaults apply); a path given
    explicitly must exist. ``overrides`` (section → key → value) win over everything and
    are used by the CLI and tests. Blocks on reading one small file.

    Raises ConfigError whose message has one line per mistake.
    """
    raw, origin, label = configsources.gather(
        path or default_config_path(),
        path is not None,
        os.environ if environ is None else environ,
        overrides or {},
        SECTIONS,
    )
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(configerrors.describe(exc, origin, label, SECTIONS, Settings)) from None


def describe_sources(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> list[str]:
    """What :func:`load_settings` reads, one line per source, lowest precedence first: the
    file (or that the default one is absent) and each variable with its value and key. A
    token's value is never shown. Reads nothing but whether the file exists."""
    env = os.environ if environ is None else environ
    return configsources.describe(path or default_config_path(), path is not None, env, SECTIONS)


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data with secrets replaced by ``'<redacted>'``."""
    data = settings.model_dump(mode="json")
    for section, key in SECRET_KEYS:
        if data[section].get(key):
            data[section][key] = "<redacted>"
    return data
