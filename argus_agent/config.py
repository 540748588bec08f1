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
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator

from argus_agent import configerrors, configsources
from argus_agent.configbase import DEFAULT_TEXT, Section
from argus_agent.configsources import SECRET_KEYS
from argus_agent.errors import ConfigError
from argus_agent.jobsettings import JobSettings

SYSTEM_CONFIG_PATH = Path("/etc/argus-agent/config.toml")
SYSTEM_STATE_DIR = Path("/var/lib/argus-agent")


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


class ServerSettings(Section):
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


class AgentSettings(Section):
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


class TelemetrySettings(Section):
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


class Settings(Section):
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


SECTIONS: dict[str, type[Section]] = {
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
