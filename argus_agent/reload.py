"""Configuration reload on SIGHUP (``systemctl reload argus-agent``).

The config file and the environment are read again (``config.load_settings``, the same
sources as at start-up; the environment is the one the process started with). An invalid
new configuration is refused: its one-line error is logged and audited, and the running
configuration stays. A valid one is compared with the running one by :func:`plan_reload`, a
pure function:

- what can change at run time (``RUNTIME``: the log level, the intervals, backoff and stall
  timeout, the whole jobs policy, the telemetry switches and rates) is applied at once, to
  what comes next: the next poll, heartbeat, launch, stop, sample and log read. Running jobs
  keep what they were launched with (their log cap, for instance);
- everything else (``server.*``, ``agent.state_dir``, ``agent.hostname``, the GPU backend,
  the outbox's size and batch size, and any key not in ``RUNTIME``) keeps its running value
  and is named as needing a restart (``systemctl restart argus-agent``: running jobs keep
  running).

One log line names what changed and was applied, one what changed but needs a restart; both
lists go to the audit log (``config_reload``). Keys only, never values: no token is logged.

systemd hears ``RELOADING=1`` (with ``MONOTONIC_USEC``, for ``Type=notify-reload``) when a
reload begins and ``READY=1`` when it ended, applied or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from argus_agent.blocking import call_in_thread
from argus_agent.config import Settings
from argus_agent.errors import ConfigError
from argus_agent.logsetup import get_logger, set_level
from argus_agent.registration import same_server

if TYPE_CHECKING:
    from argus_agent.daemon import Agent

log = get_logger(__name__)

#: The keys a reload applies while the agent runs, per section; every other key needs a
#: restart (so a key added to the config later is never half-applied by accident).
RUNTIME: dict[str, frozenset[str]] = {
    "agent": frozenset(
        {
            "log_level",
            "poll_interval_s",
            "heartbeat_interval_s",
            "backoff_initial_s",
            "backoff_max_s",
            "auth_retry_s",
            "stall_timeout_s",
            "host_aliases",
        }
    ),
    # The launch policy and how jobs are run and stopped: read at each launch and stop.
    "jobs": frozenset(
        {
            "shell",
            "default_cwd",
            "stop_grace_s",
            "unkillable_wait_s",
            "inherit_argus_token",
            "run_as",
            "users",
            "allow_root",
            "privileged_groups",
            "allow_privileged_groups",
            "allowed_requesters",
            "env_deny",
            "max_command_age_s",
            "max_clock_skew_s",
            "max_jobs",
            "log_max_bytes",
            "kill_leftovers",
            "retention_days",
        }
    ),
    "telemetry": frozenset(
        {
            "enabled",
            "interval_s",
            "logs",
            "log_poll_s",
            "log_max_lines_per_s",
            "lifecycle_events",
            "project",
        }
    ),
}
#: How long reading the config may take (a config on a hung filesystem) before the reload
#: is refused.
LOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: ``applied`` and ``needs_restart`` are dotted keys
    (``jobs.users``), ``settings`` what runs afterwards: the new values of the applied keys,
    the running values of all others."""

    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]
    settings: Settings


def plan_reload(running: Settings, new: Settings, *, gpu_opened: bool = True) -> ReloadPlan:
    """Compare the ``running`` settings with ``new`` ones. Pure.

    ``server.url`` left unset in the new configuration means the registered server, which
    is what runs; URLs are compared as ``daemon`` does (case, default port, trailing slash).
    ``gpu_opened`` False: the GPU backend was not opened at start-up (telemetry was off), so
    switching telemetry on brings GPU readings only with a restart.

    Raises ConfigError when the new values that apply now do not validate together with the
    running values of those that need a restart.
    """

    applied: list[str] = []
    restart: list[str] = []
    effective: dict[str, dict[str, Any]] = {}
    for section in Settings.model_fields:
        old_part: BaseModel = getattr(running, section)
        new_part: BaseModel = getattr(new, section)
        values: dict[str, Any] = {}
        for key in type(old_part).model_fields:
            old, value = getattr(old_part, key), getattr(new_part, key)
            if (section, key) == ("server", "url"):
                same = "url" not in new_part.model_fields_set or same_server(old, value)
            else:
                same = old == value
            if same:
                values[key] = old
            elif key in RUNTIME.get(section, frozenset()):
                applied.append(f"{section}.{key}")
                values[key] = value
            else:
                restart.append(f"{section}.{key}")
                values[key] = old
        effective[section] = values
    telemetry = effective["telemetry"]
    if not gpu_opened and telemetry["enabled"] and new.telemetry.gpu != "none":
        restart.append("telemetry.enabled (GPU readings: telemetry was off at start-up)")
    try:
        settings = Settings.model_validate(effective)
    except ValidationError as exc:
        problem = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"the new configuration does not fit the running values of the settings that "
            f"change only with a restart: {problem}; restart the agent instead"
        ) from None
    return ReloadPlan(tuple(applied), tuple(restart), settings)


def apply_plan(agent: Agent, plan: ReloadPlan) -> None:
    """Hand the plan's settings to every part of the running ``agent``."""
    settings = plan.settings
    agent.settings = settings
    if "agent.log_level" in plan.applied:
        set_level(settings.agent.log_level)
    agent.health.stall_timeout_s = settings.agent.stall_timeout_s
    if agent.channel is not None:
        agent.channel.apply_settings(settings.agent)
    if agent.sender is not None:
        agent.sender.backoff.initial = settings.agent.backoff_initial_s
        agent.sender.backoff.cap = settings.agent.backoff_max_s
    if agent.dispatcher is not None:
        agent.dispatcher.apply_settings(settings)
    if agent.served is not None:
        agent.served.apply_settings(settings)
    if agent.jobs is not None:
        agent.jobs.settings = settings.jobs
    if agent.telemetry is not None and any(k.startswith("telemetry.") for k in plan.applied):
        agent.telemetry.apply_settings(settings.telemetry)


class Reloader:
    """Reloads the configuration of ``agent`` from ``load`` when asked (the CLI calls
    ``request`` on SIGHUP). Use from the agent's event loop."""

    def __init__(
        self, agent: Agent, load: Callable[[], Settings], *, timeout_s: float = LOAD_TIMEOUT_S
    ) -> None:
        self.agent = agent
        self.load = load
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self._again = False
        #: Whether the GPU backend was opened (telemetry on when the agent started).
        self._gpu_opened: bool | None = None

    def request(self) -> None:
        """Reload soon: after start-up finished, and once more after a reload under way
        (a SIGHUP that arrives while one runs may come with a newer file)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reload")

    async def close(self) -> None:
        """Cancel a reload that waits or runs (the agent is going away)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        await self.agent.ready.wait()
        while True:
            self._again = False
            try:
                await self.reload()
            except Exception:  # a bug costs this reload; the next SIGHUP tries again
                log.exception("configuration reload failed")
            if not self._again:
                return

    async def reload(self) -> ReloadPlan | None:
        """Read, check and apply the configuration; the plan, or None when refused."""
        agent = self.agent
        if self._gpu_opened is None:
            self._gpu_opened = agent.settings.telemetry.enabled
        agent.notifier.reloading()
        try:
            return await self._reload(agent, self._gpu_opened)
        finally:
            agent.notifier.ready(
                f"serving {agent.settings.server.url} ({agent.settings.server.transport})"
            )

    async def _reload(self, agent: Agent, gpu_opened: bool) -> ReloadPlan | None:
        audit = agent.dispatcher.audit if agent.dispatcher is not None else None
        try:
            new = await call_in_thread(self.load, self.timeout_s)
            plan = plan_reload(agent.settings, new, gpu_opened=gpu_opened)
        except Exception as exc:
            error = _one_line(exc, self.timeout_s)
            log.error(
                "configuration reload refused; the running configuration is kept", error=error
            )
            if audit is not None:
                audit.record("config_reload_refused", error=error)
            return None
        apply_plan(agent, plan)
        if plan.applied:
            log.info("configuration reloaded; applied", changed=list(plan.applied))
        else:
            log.info("configuration reloaded; nothing that applies at run time changed")
        if plan.needs_restart:
            log.warning(
                "configuration changed but needs a restart to take effect (running jobs keep "
                "running); the running values stay until then",
                needs_restart=list(plan.needs_restart),
            )
        if audit is not None:
            audit.record(
                "config_reload", applied=list(plan.applied), needs_restart=list(plan.needs_restart)
            )
        return plan


def _one_line(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"reading the configuration took longer than {timeout_s:g} s (hung filesystem?)"
    if isinstance(exc, ConfigError):
        return "; ".join(line for line in str(exc).splitlines() if line)
    return f"{type(exc).__name__}: {exc}"
