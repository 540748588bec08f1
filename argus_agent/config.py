"""The agent's configuration: a TOML file, overridden by environment variables.

Owns the schema (pydantic, unknown keys refused) and turns every mistake into one readable
line naming where the value came from, the key, the bad value and what was expected::

    config.toml: server.url: expected an http:// or https:// URL, got 'ftp://x'

Sources, lowest precedence first: built-in defaults, the TOML file, ``ARGUS_AGENT_<SECTION>_<KEY>``
environment variables, then ``ARGUS_URL`` / ``ARGUS_TOKEN`` (the names Argus' own SDK uses).
Reading the file (and checking that a file holding ``server.token`` is private) is the only
I/O done here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from argus_agent.credentials import shared_mode_fix
from argus_agent.errors import ConfigError

ENV_PREFIX = "ARGUS_AGENT_"
USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """How to reach the Argus server."""

    url: str = "http://127.0.0.1:8000"
    token: str | None = Field(default=None, repr=False)
    token_file: Path | None = None
    allow_insecure_http: bool = False
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: How commands reach the agent: ``auto`` (the websocket when the server offers it, else
    #: REST polling, probing the websocket again every 10 minutes), ``websocket`` (only the
    #: websocket, never polling) or ``poll`` (only REST polling, as Argus v0.3.0).
    transport: Literal["auto", "websocket", "poll"] = "auto"
    #: Offer ``permessage-deflate`` on the websocket (used when the server accepts it). Off:
    #: on loopback and LANs it costs CPU for nothing; over links slower than a few hundred
    #: Mb/s it drains a large backlog faster (bench/README.md has the measurement).
    websocket_compression: bool = False

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
            and not _is_loopback(parts.hostname or "")
        ):
            raise ValueError(
                "url: plain http:// to a non-loopback host sends tokens in clear text;"
                " use https:// or set server.allow_insecure_http = true"
            )
        return self


class AgentSettings(_Section):
    """The daemon itself: identity, state, timing and logging."""

    state_dir: Path = Field(default_factory=default_state_dir)
    hostname: str = Field(default_factory=socket.gethostname, min_length=1, max_length=255)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    poll_interval_s: float | None = Field(default=None, gt=0, le=3600)
    heartbeat_interval_s: float = Field(default=30.0, gt=0, le=3600)
    backoff_initial_s: float = Field(default=1.0, gt=0, le=60)
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    auth_retry_s: float = Field(default=300.0, gt=0, le=86400)
    stall_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    host_aliases: list[str] = Field(default_factory=list)

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
    """How relaunched runs are started, run, logged and stopped."""

    shell: list[str] = Field(default_factory=lambda: ["/bin/sh", "-c"], min_length=1)
    default_cwd: Path | None = None
    stop_grace_s: float = Field(default=20.0, ge=0, le=3600)
    unkillable_wait_s: float = Field(default=10.0, gt=0, le=3600)
    inherit_argus_token: bool = False
    run_as: str | None = None
    users: dict[str, str] = Field(default_factory=dict)
    allow_root: bool = False
    privileged_groups: list[str] = Field(default_factory=lambda: list(DEFAULT_PRIVILEGED_GROUPS))
    allow_privileged_groups: bool = False
    allowed_requesters: list[str] = Field(default_factory=list)
    env_deny: list[str] = Field(default_factory=lambda: list(DEFAULT_ENV_DENY))
    max_command_age_s: float = Field(default=3600.0, gt=0)
    max_clock_skew_s: float = Field(default=300.0, ge=0, le=86400)
    max_jobs: int | None = Field(default=None, ge=1)
    log_max_bytes: int = Field(default=1 << 30, ge=4096)
    kill_leftovers: bool = True
    retention_days: float = Field(default=14.0, gt=0)

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
    """Resource snapshots, log lines and lifecycle events of supervised jobs."""

    enabled: bool = True
    interval_s: float = Field(default=10.0, ge=0.5, le=3600)
    gpu: Literal["auto", "nvml", "none"] = "auto"
    gpu_timeout_s: float = Field(default=2.0, gt=0, le=60)
    logs: bool = True
    log_poll_s: float = Field(default=0.5, ge=0.05, le=60)
    log_max_lines_per_s: float = Field(default=1000.0, ge=0)
    lifecycle_events: bool = True
    project: str = Field(default="argus-agent", min_length=1, max_length=200)
    outbox_max_mb: float = Field(default=512.0, gt=0)
    send_batch_size: int = Field(default=500, ge=1, le=500)


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
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
    env = os.environ if environ is None else environ
    explicit = path is not None
    path = path or default_config_path()
    raw: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    label = path.name
    if path.exists() or explicit:
        raw = _read_toml(path, label)
        for section, values in raw.items():
            if isinstance(values, dict):
                for key in values:
                    origin[(section, key)] = label
    for key, value, source in _env_values(env):
        raw.setdefault(key[0], {})
        if not isinstance(raw[key[0]], dict):
            raise ConfigError(f"{label}: {key[0]}: expected a table (a [{key[0]}] section)")
        raw[key[0]][key[1]] = value
        origin[key] = source
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
        for key in values:
            origin[(section, key)] = "command line"
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin, label)) from None


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    """The parsed file. A file that holds ``server.token`` must be private to its owner
    (as the token files are): ConfigError names the file, its mode and the ``chmod``."""
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
            server = raw.get("server")
            if isinstance(server, dict) and server.get("token"):
                problem = shared_mode_fix(path, os.fstat(handle.fileno()).st_mode)
                if problem is not None:
                    raise ConfigError(f"{path}: holds server.token but is {problem}")
            return raw
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: expected a TOML file, got a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from None


def _env_values(env: Mapping[str, str]) -> list[tuple[tuple[str, str], Any, str]]:
    """The environment's overrides as ((section, key), value, origin label)."""
    found: list[tuple[tuple[str, str], Any, str]] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == "ARGUS_AGENT_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or not key:
            known = ", ".join(f"{ENV_PREFIX}{s.upper()}_<KEY>" for s in SECTIONS)
            raise ConfigError(f"environment {name}: unknown setting; expected one of {known}")
        if key not in SECTIONS[section].model_fields:
            raise ConfigError(
                f"environment {name}: {section}.{key}: unknown key; expected one of "
                + ", ".join(sorted(SECTIONS[section].model_fields))
            )
        found.append(((section, key), _env_value(env[name]), f"environment {name}"))
    if env.get("ARGUS_URL"):
        found.append((("server", "url"), env["ARGUS_URL"], "environment ARGUS_URL"))
    if env.get("ARGUS_TOKEN"):
        found.append((("server", "token"), env["ARGUS_TOKEN"], "environment ARGUS_TOKEN"))
    return found


def _env_value(text: str) -> Any:
    """Environment values are strings; a JSON list (``["/bin/bash","-c"]``) becomes a list
    and a JSON object (``{"alice": "alice"}``) a table."""
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list of strings",
    "path_type": "expected a path",
    "model_type": "expected a table",
    "dict_type": "expected a table",
    "model_attributes_type": "expected a table",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _describe(exc: ValidationError, origin: dict[tuple[str, ...], str], label: str) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = _expected(error)
        value = error.get("input")
        head, sep, tail = message.partition(": ")
        if sep and isinstance(value, dict) and head in value:
            # A validator of a table names the key it is about: "url: expected ...".
            loc, message, value = [*loc, head], tail, value.get(head)
        elif sep and not loc and "." in head:
            # A whole-settings validator names "section.key: expected ...".
            loc, message = head.split("."), tail
            value = (value or {}).get(loc[0], {}) if isinstance(value, dict) else None
            value = value.get(loc[1]) if isinstance(value, dict) else None
        key = ".".join(loc)
        source = origin.get(tuple(loc[:2]), label)
        if error["type"] == "extra_forbidden":
            model = SECTIONS.get(loc[0]) if len(loc) == 2 else Settings
            allowed = ", ".join(sorted(model.model_fields)) if model else ""
            lines.append(f"{source}: {key}: unknown key; expected one of {allowed}")
            continue
        shown = _shown_value(loc, value)
        got = "" if error["type"] == "missing" else f", got {shown}"
        lines.append(f"{source}: {key}: {message}{got}")
    return "\n".join(lines)


def _shown_value(loc: list[str], value: Any) -> str:
    if loc and loc[-1] == "token":
        return "'<redacted>'"
    if isinstance(value, dict):
        return repr({k: ("<redacted>" if k == "token" else v) for k, v in value.items()})
    return repr(value)


def _expected(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }[kind]
        bound = next(iter(ctx.values()), "")
        return f"expected a number {sign} {bound}"
    if kind in ("too_short", "string_too_short"):
        return "expected a non-empty value"
    if kind == "string_too_long":
        return f"expected at most {ctx.get('max_length')} characters"
    return _EXPECTED.get(kind, error["msg"].lower())


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data with secrets replaced by ``'<redacted>'``."""
    data = settings.model_dump(mode="json")
    if data["server"].get("token"):
        data["server"]["token"] = "<redacted>"
    return data
