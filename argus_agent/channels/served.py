"""Polling for the served host names (``jobs.slurm_hosts``): one task for all of them.

A Slurm login-node agent serves compute-node host names besides its own. Argus v0.3.0 binds
an agent registration to one host name, so each served name has its own registration
(``servedhosts.py``), and its commands come from ``GET /api/agents/{id}/jobs`` with its own
token. :class:`ServedHostsPoller` polls them all from **one task** over the daemon's one
HTTP client (its keep-alive connection pool), so serving a name costs one small request per
poll interval (a poll also bumps the registration's ``last_seen_at`` in Argus v0.3.0) and
no task, thread, connection or database of its own. Tasks: the poll loop (``run``), one
worker handing polled commands to the dispatcher (``_worker``), and a refresh while one runs.

- each name has its own due time (a heap), spread evenly over the interval when the names
  are learned, so 256 names make a steady trickle rather than a burst; names due together
  are polled at most ``POLL_CONCURRENCY`` at a time;
- each name has its own state and full-jitter backoff (a name whose token was rotated does
  not slow the others), shown in ``status`` under ``served_hosts``;
- commands go to the worker, which hands them to the daemon's one dispatcher in order,
  tagged with the name (``via``) so that a pending ack is flushed through that name's
  registration; a rerun in sbatch never holds up the polls (a name no longer served is
  polled on while it owes the server an ack);
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
import heapq
import math
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
        #: (due time, name): when each name is polled next; entries whose time is no longer
        #: the name's ``next_due`` are stale and skipped (a heap: a wake costs log N, not N).
        self._due: list[tuple[float, str]] = []
        #: Commands (and ack flushes) for the one worker that hands them to the dispatcher.
        self._work: asyncio.Queue[tuple[ServedState, list[Any]]] = asyncio.Queue()
        self._refreshing: asyncio.Task[None] | None = None
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
        """Poll until ``shutdown`` is set. Never raises for server or Slurm trouble. Deciding
        the names (sinfo, registrations) and acting on commands run in tasks of their own:
        neither holds up the polls of the other names."""
        worker = asyncio.create_task(self._worker(), name="served-commands")
        try:
            while not shutdown.is_set():
                now = time.monotonic()
                if now >= self._next_refresh and (
                    self._refreshing is None or self._refreshing.done()
                ):
                    self._refreshing = asyncio.create_task(self._refresh_quietly())
                covered = self.covered()
                if covered != self._covered:
                    self._uncovered(self._covered - covered, now)
                    self._covered = covered
                due = self._take_due(now, covered)
                if due:
                    await asyncio.gather(*(self._poll(state) for state in due))
                next_at = min(self._due[0][0] if self._due else math.inf, self._next_refresh)
                wait = min(max(next_at - time.monotonic(), 0.0), MAX_SLEEP_S)
                self.health.report("served_hosts", wait)
                if await sleep_unless(shutdown, wait):
                    break
                if worker.done():
                    worker.result()  # the worker raised: the loop goes down too
        finally:
            for task in (worker, self._refreshing):
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in (worker, self._refreshing) if t is not None), return_exceptions=True
            )
            self.health.forget("served_commands")

    def _schedule(self, state: ServedState, at: float) -> None:
        state.next_due = at
        heapq.heappush(self._due, (at, state.host.hostname))

    def _take_due(self, now: float, covered: frozenset[str]) -> list[ServedState]:
        """The names due by ``now`` and not carried by the websocket (popped: each gets a
        new due time when its poll ends); stale heap entries are dropped on the way."""
        due: list[ServedState] = []
        while self._due and self._due[0][0] <= now:
            at, name = heapq.heappop(self._due)
            state = self.hosts.get(name)
            if state is None or state.next_due != at or name in covered:
                continue  # gone, rescheduled, or on the websocket (``_uncovered`` brings it back)
            due.append(state)
        return due

    def _uncovered(self, names: frozenset[str], now: float) -> None:
        """Names the websocket no longer carries (it dropped): poll them from now on,
        spread over one interval rather than all at once."""
        back = sorted(name for name in names if name in self.hosts)
        for i, name in enumerate(back):
            self._schedule(self.hosts[name], now + self.interval * i / len(back))

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

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a bug costs this refresh, not the polling of every name
            log.exception("deciding the served host names failed; trying again later")
            self._next_refresh = time.monotonic() + RETRY_REGISTER_S

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
                try:  # merged with what `register` may have written meanwhile
                    known = self.registrations.merge(server, made)
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
        # A name no longer served keeps being polled while it owes the server an ack (its
        # registration is the only way to send it); the next refresh after it drops it.
        for name in sorted(self._pending - set(names)):
            if name in self.hosts:
                fresh[name] = self.hosts[name]
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
            heapq.heappush(self._due, (now + spread, name))
        gone = set(self.hosts) - set(fresh)
        changed = gone or any(self.hosts.get(name) is not state for name, state in fresh.items())
        if gone or new:
            log.info("served host names", serving=len(fresh), added=len(new), dropped=len(gone))
        self.hosts = fresh
        self.view.unregistered = unregistered
        self.dispatcher.served_hosts = frozenset(names)
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
            if state.state != "connected":
                state.backoff.reset()
                state.auth_reported = False
            state.state, state.last_ok_at, state.last_error = "connected", time.time(), None
            self._schedule(state, time.monotonic() + jittered(self.interval, 0.1, self.rng))
            if items or host.hostname in self._pending:
                self._work.put_nowait((state, items))

    async def _worker(self) -> None:
        """Hand the polled commands to the dispatcher, in the order they came, and flush
        each name's pending acks; reports its own progress with a budget a rerun through
        Slurm can need (checks, the owner lookup, sbatch and a lost submission's search)."""
        while True:
            if self._work.empty():
                self.health.forget("served_commands")
            state, items = await self._work.get()
            budget = (
                2 * self.settings.jobs.slurm_command_timeout_s
                + self.dispatcher.check_timeout_s
                + 30.0
            )
            self.health.report("served_commands", budget * max(1, len(items)))
            await self._handle(state, items)

    async def _handle(self, state: ServedState, items: list[Any]) -> None:
        """Act on one poll's commands through the name's registration, then flush its acks."""
        name = state.host.hostname

        async def ack(cmd_id: str, status: AckStatus, pid: int | None, error: str | None) -> None:
            await self.client.ack(
                state.host.agent_id, state.host.agent_token, cmd_id, status, pid=pid, error=error
            )

        try:
            for item in items:
                await self.dispatcher.handle(item, ack, via=name)
            await self.dispatcher.flush_acks(ack, via=name)
            self._pending.discard(name)
        except ServerError as exc:
            self._pending.add(name)
            log.warning("served host's ack failed; it stays pending", hostname=name, error=str(exc))
            state.last_error = str(exc)

    def _failed(self, state: ServedState, exc: ServerError) -> None:
        decision = classify(exc, auth_retry_s=self.settings.agent.auth_retry_s)
        delay = decision.delay(state.backoff)
        self._schedule(state, time.monotonic() + delay)
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
