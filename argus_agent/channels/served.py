"""Polling for the served host names (``jobs.slurm_hosts``): one task for all of them.

A Slurm login-node agent serves compute-node host names besides its own. Argus v0.3.0 binds
an agent registration to one host name, so each served name has its own registration
(``servedhosts.py``), and its commands come from ``GET /api/agents/{id}/jobs`` with its own
token. :class:`ServedHostsPoller` polls them all from **one task** over the daemon's one
HTTP client (its keep-alive connection pool), so serving a name costs one small request per
poll interval (a poll also counts as the name's heartbeat in Argus v0.3.0: it bumps
``last_seen_at``) and no task, thread, connection or database of its own:

- each name has its own due time, spread evenly over the interval when the names are
  learned, so 256 names make a steady trickle rather than a burst; names due together are
  polled at most ``POLL_CONCURRENCY`` at a time;
- each name has its own state and full-jitter backoff (a name whose token was rotated does
  not slow the others), shown in ``status`` under ``served_hosts``;
- commands go to the daemon's one dispatcher, one at a time (``_handling``), tagged with the
  name (``via``) so that a pending ack is flushed through that name's registration;
- names the websocket session announced and the server accepted (``covered``) are not
  polled while it is open: their commands arrive on the websocket; when the registrations
  change (``on_change``), the websocket reconnects at once to announce them.

``refresh`` (at start, every ``REFRESH_S``, and every ``RETRY_REGISTER_S`` while a name has
no working registration) decides the names again (``sinfo`` for ``["*"]``), registers the
new ones with the reporter token, re-reads ``served_hosts.json`` (a `register --force` may
have rotated tokens), and tells the dispatcher which names it serves.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Action, Backoff, classify, jittered
from argus_agent.channels.base import sleep_unless
from argus_agent.config import Settings
from argus_agent.dispatcher import Dispatcher
from argus_agent.errors import AgentError, ServerError
from argus_agent.health import Health
from argus_agent.jobs.slurm_cli import SlurmUnavailable
from argus_agent.logsetup import get_logger
from argus_agent.protocol import AckStatus, decode_commands
from argus_agent.servedhosts import (
    NodeLister,
    ServedHost,
    ServedRegistrations,
    register_served,
    served_names,
)

log = get_logger(__name__)

#: How often the served names are decided again (sinfo) and new ones registered.
REFRESH_S = 600.0
#: How soon a refresh comes again while a name has no working registration.
RETRY_REGISTER_S = 60.0
#: Polls in flight at once (names due at the same moment).
POLL_CONCURRENCY = 16
#: Longest sleep of the loop (it re-checks what is due and reports progress).
MAX_SLEEP_S = 5.0
FIX_SERVED = "run `argus-agent register --force` to register the served host names anew"


@dataclass
class ServedState:
    """What polling one served name last saw."""

    host: ServedHost
    next_due: float
    backoff: Backoff
    # connected | starting | backing_off | rate_limited | auth_rejected
    state: str = "starting"
    last_ok_at: float | None = None
    last_error: str | None = None
    polls: int = 0
    commands: int = 0
    auth_reported: bool = False


@dataclass
class ServedView:
    """The served names' part of ``status`` (``snapshot()``)."""

    names_from: str = "config"
    refreshed_at: float | None = None
    refresh_error: str | None = None
    #: Names with no registration: no reporter token to register them, or the server refused.
    unregistered: dict[str, str] = field(default_factory=dict)


class ServedHostsPoller:
    """Polls every served name's registration; see the module docstring."""

    def __init__(
        self,
        client: ArgusClient,
        dispatcher: Dispatcher,
        settings: Settings,
        registrations: ServedRegistrations,
        *,
        own_names: Sequence[str],
        user_token: str | None,
        list_nodes: NodeLister | None,
        server_poll_interval_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.dispatcher = dispatcher
        self.settings = settings
        self.registrations = registrations
        self.own_names = list(own_names)
        self.user_token = user_token
        self.list_nodes = list_nodes
        self.server_poll_interval_s = server_poll_interval_s
        self.rng = rng or random.Random()
        self.hosts: dict[str, ServedState] = {}
        self.view = ServedView(
            names_from="sinfo" if settings.jobs.slurm_hosts == ["*"] else "config"
        )
        #: Names whose commands the websocket carries now (set by the websocket channel).
        self.covered: Callable[[], frozenset[str]] = frozenset
        #: Told when the served registrations changed (the websocket announces them anew).
        self.on_change: Callable[[], None] = lambda: None
        self.health = Health(settings.agent.stall_timeout_s)
        self._gate = asyncio.Semaphore(POLL_CONCURRENCY)
        self._handling = asyncio.Lock()
        self._next_refresh = 0.0
        self._covered: frozenset[str] = frozenset()
        #: Names with acks still pending in the ledger (an ack failed, or an earlier run's).
        self._pending = {e.via for e in dispatcher.ledger.pending_acks() if e.via is not None}

    @property
    def interval(self) -> float:
        return self.settings.agent.poll_interval_s or self.server_poll_interval_s

    def apply_settings(self, settings: Settings) -> None:
        """A reload: the poll interval and backoff from the next poll on."""
        self.settings = settings
        for state in self.hosts.values():
            state.backoff.initial = settings.agent.backoff_initial_s
            state.backoff.cap = settings.agent.backoff_max_s

    async def run(self, shutdown: asyncio.Event) -> None:
        """Poll until ``shutdown`` is set. Never raises for server or Slurm trouble."""
        while not shutdown.is_set():
            now = time.monotonic()
            if now >= self._next_refresh:
                await self.refresh()
            covered = self.covered()
            if covered != self._covered:
                self._uncovered(self._covered - covered, now)
                self._covered = covered
            due, next_at = [], self._next_refresh
            for name, state in self.hosts.items():
                if name in covered:  # its commands come on the websocket: not polled
                    continue
                if state.next_due <= now:
                    due.append(state)
                else:
                    next_at = min(next_at, state.next_due)
            if due:
                await asyncio.gather(*(self._poll(state) for state in due))
                next_at = min([next_at, *(s.next_due for s in due)])
            wait = min(max(next_at - time.monotonic(), 0.0), MAX_SLEEP_S)
            self.health.report("served_hosts", wait)
            if await sleep_unless(shutdown, wait):
                break

    def _uncovered(self, names: frozenset[str], now: float) -> None:
        """Names the websocket no longer carries (it dropped): poll them from now on,
        spread over one interval rather than all at once."""
        back = sorted(name for name in names if name in self.hosts)
        for i, name in enumerate(back):
            self.hosts[name].next_due = now + self.interval * i / len(back)

    # -- names and registrations --------------------------------------------------------

    def adopt_saved(self) -> None:
        """Serve the names registered earlier (``served_hosts.json``) right away, before the
        first ``refresh`` (so that the websocket's first hello announces them); no network,
        no sinfo. A file that cannot be read is left to ``refresh`` to report."""
        try:
            known = self.registrations.load(self.client.base_url)
        except AgentError as exc:
            log.warning("cannot read the served-host registrations", error=str(exc))
            return
        names = sorted(known)
        if self.settings.jobs.slurm_hosts != ["*"]:
            names = [name for name in names if name in self.settings.jobs.slurm_hosts]
        self._adopt(names, known, {})

    def announced(self) -> dict[str, tuple[str, str]]:
        """The registrations to announce on the websocket: agent id → (host name, token)."""
        return {s.host.agent_id: (name, s.host.agent_token) for name, s in self.hosts.items()}

    async def refresh(self) -> None:
        """Decide the served names again, register new ones, pick up rotated tokens."""
        server = self.client.base_url
        self._next_refresh = time.monotonic() + REFRESH_S
        try:
            names = await served_names(self.settings.jobs, self.own_names, self.list_nodes)
            known = self.registrations.load(server)
        except (SlurmUnavailable, AgentError) as exc:
            self.view.refresh_error = str(exc)
            self._next_refresh = time.monotonic() + RETRY_REGISTER_S
            log.warning(
                "cannot decide the served host names; keeping the last ones", error=str(exc)
            )
            return
        missing = [name for name in names if name not in known]
        unregistered: dict[str, str] = {}
        if missing and self.user_token is None:
            unregistered = dict.fromkeys(
                missing, "not registered, and no reporter token to register it: " + FIX_SERVED
            )
        elif missing:
            made, failed = await register_served(self.client, self.user_token, missing, known)
            if made:
                known.update(made)
                try:
                    self.registrations.save(server, known)
                except AgentError as exc:
                    log.error("cannot save served-host registrations", error=str(exc))
                log.info("served host names registered", count=len(made))
            unregistered = {name: f"registering failed: {why}" for name, why in failed.items()}
        self._adopt(names, known, unregistered)
        self.view.refreshed_at = time.time()
        self.view.refresh_error = None
        if unregistered or any(s.state == "auth_rejected" for s in self.hosts.values()):
            self._next_refresh = time.monotonic() + RETRY_REGISTER_S

    def _adopt(
        self, names: list[str], known: dict[str, ServedHost], unregistered: dict[str, str]
    ) -> None:
        """Poll exactly the registered ``names`` from now on; new ones spread over the
        interval, known ones keep their state (a new token restarts it)."""
        now = time.monotonic()
        fresh: dict[str, ServedState] = {}
        new = [name for name in names if name in known and name not in self.hosts]
        place = {name: i for i, name in enumerate(new)}
        for name in names:
            host = known.get(name)
            if host is None:
                continue
            old = self.hosts.get(name)
            if old is not None and old.host.agent_token == host.agent_token:
                fresh[name] = old
                continue
            if old is not None:  # a new token (register --force): poll it now
                log.info("served host name has a new token", hostname=name)
            spread = place[name] / len(new) * self.interval if name in place else 0.0
            fresh[name] = ServedState(
                host,
                next_due=now + spread,
                backoff=Backoff(
                    self.settings.agent.backoff_initial_s,
                    self.settings.agent.backoff_max_s,
                    rng=self.rng,
                ),
            )
        gone = set(self.hosts) - set(fresh)
        changed = gone or any(self.hosts.get(name) is not state for name, state in fresh.items())
        if gone or new:
            log.info("served host names", serving=len(fresh), added=len(new), dropped=len(gone))
        self.hosts = fresh
        self.view.unregistered = unregistered
        self.dispatcher.served_hosts = frozenset(fresh) | frozenset(unregistered)
        if changed:
            self.on_change()

    # -- polling ------------------------------------------------------------------------

    async def _poll(self, state: ServedState) -> None:
        async with self._gate:
            host = state.host
            try:
                body = await self.client.poll(host.agent_id, host.agent_token)
                jobs = body.get("jobs") if isinstance(body, dict) else None
                # Most polls bring nothing; decoding commands is CPU work: off the loop.
                items = await asyncio.to_thread(decode_commands, body) if jobs != [] else []
            except ServerError as exc:
                self._failed(state, exc)
                return
            state.polls += 1
            if state.state != "connected":
                state.backoff.reset()
                state.auth_reported = False
            state.state, state.last_ok_at, state.last_error = "connected", time.time(), None
            state.next_due = time.monotonic() + jittered(self.interval, 0.1, self.rng)
            if items or host.hostname in self._pending:
                await self._handle(state, items)

    async def _handle(self, state: ServedState, items: list[Any]) -> None:
        """Act on the commands one at a time across all served names, then flush acks."""
        name = state.host.hostname

        async def ack(cmd_id: str, status: AckStatus, pid: int | None, error: str | None) -> None:
            await self.client.ack(
                state.host.agent_id, state.host.agent_token, cmd_id, status, pid=pid, error=error
            )

        async with self._handling:
            try:
                for item in items:
                    state.commands += 1
                    self.health.report("served_hosts")
                    await self.dispatcher.handle(item, ack, via=name)
                await self.dispatcher.flush_acks(ack, via=name)
                self._pending.discard(name)
            except ServerError as exc:
                self._pending.add(name)
                log.warning(
                    "served host's ack failed; it stays pending", hostname=name, error=str(exc)
                )
                state.last_error = str(exc)

    def _failed(self, state: ServedState, exc: ServerError) -> None:
        decision = classify(exc, auth_retry_s=self.settings.agent.auth_retry_s)
        delay = decision.delay(state.backoff)
        state.next_due = time.monotonic() + delay
        state.last_error = str(exc)
        name = state.host.hostname
        if decision.action is Action.RETRY_AFTER:
            state.state = "rate_limited"
        elif decision.action is Action.AUTH_REJECTED:
            state.state = "auth_rejected"
            self._next_refresh = min(self._next_refresh, time.monotonic() + RETRY_REGISTER_S)
            if not state.auth_reported:
                state.auth_reported = True
                log.error(
                    f"the server rejected a served host name's token; {FIX_SERVED}",
                    hostname=name,
                    detail=exc.detail,
                )
        else:
            state.state = "backing_off"
            log.debug("served host poll failed", hostname=name, error=str(exc))

    # -- status -------------------------------------------------------------------------

    def snapshot(self, *, limit: int = 20) -> dict[str, Any]:
        """The ``served_hosts`` part of status: counts, and the first ``limit`` names that
        are not connected, with why."""
        covered = self.covered()
        by_state: dict[str, int] = {}
        for name, s in self.hosts.items():
            key = "websocket" if name in covered else s.state
            by_state[key] = by_state.get(key, 0) + 1
        trouble = [
            {"hostname": name, "state": s.state, "error": s.last_error}
            for name, s in sorted(self.hosts.items())
            if s.state not in ("connected", "starting") and name not in covered
        ]
        trouble += [
            {"hostname": name, "state": "unregistered", "error": why}
            for name, why in sorted(self.view.unregistered.items())
        ]
        return {
            "names_from": self.view.names_from,
            "count": len(self.hosts) + len(self.view.unregistered),
            "states": by_state,
            "unregistered": len(self.view.unregistered),
            "problem_count": len(trouble),
            "problems": trouble[:limit],
            "refreshed_at": self.view.refreshed_at,
            "refresh_error": self.view.refresh_error,
            "poll_interval_s": self.interval,
        }
