"""The command channel chosen by ``server.transport``: the websocket first, polling as needed.

:func:`make_channel` builds the channel: ``poll`` is the plain :class:`PollChannel`
(Argus v0.3.0); ``auto`` and ``websocket`` are an :class:`AutoChannel`, whose ``run`` task
loops over these steps:

- **connect** (``channels.wsconnect.open_session``), then serve the session until it closes
  (``channels.websocket.WebSocketSession``, with its own tasks: receive loop, command worker,
  ticker). A session that lasted ``HEALTHY_SESSION_S`` resets the reconnect backoff; a drop
  is reconnected after the next full-jitter delay (``backoff.Backoff``, the polling channel's
  kind, its own instance).
- **no usable websocket** (upgrade answered 403/404/405 or another non-upgrade answer, no
  common subprotocol, close 4406): ``auto`` says so once (log and ``status``), polls with
  its :class:`PollChannel` and probes the websocket again every ``PROBE_INTERVAL_S``;
  ``websocket`` never polls: it retries with backoff and ``status`` says why it is down.
- **a failed connect** is decided by ``backoff.classify``: 401 is a rejected agent token
  (logged once, retried every ``agent.auth_retry_s``, a new ``token.json`` picked up within a
  second), 429 waits for Retry-After, the rest backs off. In ``auto`` each such backoff step
  also runs one poll exchange, so commands still arrive while the websocket is down.

The ``heartbeat`` task sends REST heartbeats only while ``auto`` has no websocket open (an
open websocket is the agent's liveness). Progress goes to ``health`` (``channel``,
``heartbeat``) as the polling channel's does, what it sees to the shared ``ChannelState``.

The channel is also the event sender's transport (``sender.EventsTransport``): while a
session is open, batches go over it as ``events`` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from argus_agent import __version__, wsproto
from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Action, Backoff, classify
from argus_agent.channels.base import sleep_unless
from argus_agent.channels.poll import FIX_TOKEN, PollChannel
from argus_agent.channels.websocket import EVENTS_FRAME_OVERHEAD, SeqCounter, WebSocketSession
from argus_agent.channels.wsconnect import NO_COMMON_VERSION, WebSocketUnavailable, open_session
from argus_agent.config import AgentSettings
from argus_agent.credentials import AgentCredentials
from argus_agent.dispatcher import Dispatcher
from argus_agent.errors import ProtocolError, ServerError, TransientServerError
from argus_agent.health import Health
from argus_agent.logsetup import get_logger
from argus_agent.protocol import KNOWN_KINDS
from argus_agent.status import ChannelState

log = get_logger(__name__)

#: While ``auto`` polls because the server has no usable websocket, how often it tries again.
PROBE_INTERVAL_S = 600.0
#: A session that lasted this long was healthy: the reconnect backoff starts over.
HEALTHY_SESSION_S = 2 * (wsproto.PING_INTERVAL_S + wsproto.PING_TIMEOUT_S)


def make_channel(
    transport: str,
    client: ArgusClient,
    credentials: AgentCredentials,
    dispatcher: Dispatcher,
    state: ChannelState,
    settings: AgentSettings,
    *,
    server_poll_interval_s: float,
    reload_credentials: Callable[[], AgentCredentials | None] | None = None,
    compression: bool = False,
) -> PollChannel | AutoChannel:
    """The channel for ``server.transport`` (``auto``, ``websocket`` or ``poll``)."""
    if transport == "poll":
        channel = PollChannel(
            client,
            credentials,
            dispatcher,
            state,
            settings,
            server_poll_interval_s=server_poll_interval_s,
            reload_credentials=reload_credentials,
        )
        state.transport = "poll"
        return channel
    return AutoChannel(
        transport,
        client,
        credentials,
        dispatcher,
        state,
        settings,
        server_poll_interval_s=server_poll_interval_s,
        reload_credentials=reload_credentials,
        compression=compression,
    )


def make_hello(
    agent_id: str,
    hostname: str,
    dispatcher: Dispatcher,
    seqs: SeqCounter,
    serves: Mapping[str, tuple[str, str]] | None = None,
) -> wsproto.Hello:
    """The hello of this agent: its jobs that have not ended, the last confirmed seq, and
    the served names' registrations (``serves``: agent id → (host name, agent token)), as
    many as fit ``HELLO_BUDGET_BYTES`` (the others are polled)."""
    running = [
        wsproto.RunningJob(batch_id=r.batch_id, pid=r.pid, state=r.state)  # type: ignore[arg-type]
        for r in dispatcher.jobs.records()
        if r.state in ("launching", "running", "stopping")
    ]
    return wsproto.Hello(
        agent_id=agent_id,
        version=__version__,
        hostname=hostname,
        capabilities=[*sorted(KNOWN_KINDS), "events"],
        running_jobs=running[:10_000],
        last_confirmed_seq=seqs.confirmed or None,
        serves=_within_budget(serves or {}),
    )


#: The most bytes of served names in one hello: the server takes a hello of at most
#: ``wsproto.MAX_MESSAGE_BYTES``, which its running jobs share.
HELLO_BUDGET_BYTES = wsproto.MAX_MESSAGE_BYTES // 2


def _within_budget(serves: Mapping[str, tuple[str, str]]) -> list[wsproto.ServedName]:
    """The served names to announce, by agent id, as many as fit the hello's budget (their
    ids have the protocol's shape: checked when registered and when read from the file)."""
    out: list[wsproto.ServedName] = []
    used = 0
    for agent_id, (hostname, token) in sorted(serves.items()):
        if len(out) >= 10_000:
            break
        cost = len(agent_id) + len(hostname.encode()) + len(token.encode()) + 48
        if used + cost > HELLO_BUDGET_BYTES:
            break
        used += cost
        out.append(wsproto.ServedName(agent_id=agent_id, hostname=hostname, token=token))
    return out


class AutoChannel:
    """``transport = "auto"`` or ``"websocket"`` (see the module docstring). Use from one
    event loop; ``run`` is its only long-running entry point."""

    #: The sender's transport: frames in flight at once, and the most bytes of one batch.
    max_in_flight = wsproto.MAX_UNCONFIRMED_EVENTS_FRAMES

    def __init__(
        self,
        transport: str,
        client: ArgusClient,
        credentials: AgentCredentials,
        dispatcher: Dispatcher,
        state: ChannelState,
        settings: AgentSettings,
        *,
        server_poll_interval_s: float,
        reload_credentials: Callable[[], AgentCredentials | None] | None = None,
        rng: random.Random | None = None,
        compression: bool = False,
    ) -> None:
        if transport not in ("auto", "websocket"):
            raise ValueError(f"transport: expected 'auto' or 'websocket', not {transport!r}")
        self.mode = transport
        #: Whether to offer permessage-deflate (``server.websocket_compression``).
        self.compression = compression
        self.client = client
        self.dispatcher = dispatcher
        self.state = state
        self.settings = settings
        self.rng = rng or random.Random()
        #: Polls (auto's fallback and its polls between reconnects); owns the credentials.
        self.poll = PollChannel(
            client,
            credentials,
            dispatcher,
            ChannelState(),
            settings,
            server_poll_interval_s=server_poll_interval_s,
            reload_credentials=reload_credentials,
            rng=self.rng,
        )
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng=self.rng)
        self.seqs = SeqCounter()
        self.session: WebSocketSession | None = None
        #: Why auto polls (None: it does not), and when it probes the websocket next.
        self.fallback: str | None = None
        self._probe_at = 0.0
        self._reported: str | None = None
        self._health = Health(settings.stall_timeout_s)
        self.poll.health = self._health
        state.kind, state.transport = "websocket", transport
        state.poll_interval_s = self.poll.interval
        #: Sessions opened (for tests and the log).
        self.sessions = 0
        #: The served names' registrations to announce in hello (agent id → host name;
        #: set by the daemon when it serves names, see channels/served.py).
        self.served: Callable[[], dict[str, tuple[str, str]]] = dict
        self._reannounce = False
        #: The server refused a hello that announced served names (it predates them): they
        #: are polled, and hellos announce none, for the life of this process.
        self._no_serves = False

    @property
    def health(self) -> Health:
        """Where the loops report progress (the daemon shares its own)."""
        return self._health

    @health.setter
    def health(self, value: Health) -> None:
        self._health = value
        self.poll.health = value

    def apply_settings(self, settings: AgentSettings) -> None:
        """Use ``settings`` (a reload): heartbeat, polls and backoff, from their next step."""
        self.settings = settings
        self.poll.apply_settings(settings)
        self.state.poll_interval_s = self.poll.interval
        self.backoff.initial, self.backoff.cap = settings.backoff_initial_s, settings.backoff_max_s

    @property
    def creds(self) -> AgentCredentials:
        """The agent's credentials (re-read from the token file after a rejection)."""
        return self.poll.creds

    # -- the sender's transport --------------------------------------------------------------

    @property
    def max_batch_bytes(self) -> int:
        """The most envelope bytes of one events frame the server takes."""
        limit = self.session.max_frame_bytes if self.session else wsproto.MAX_EVENTS_FRAME_BYTES
        return limit - EVENTS_FRAME_OVERHEAD

    def events_ready(self) -> bool:
        """Whether a session is open to carry events."""
        return self.session is not None and self.session.open

    async def submit_events(self, bodies: list[bytes]) -> Awaitable[dict[str, Any]]:
        """Send one events frame; the awaitable gives its confirm as a REST batch answer, or
        raises TransientServerError (no confirm within ``server.timeout_s``, or the
        connection dropped)."""
        session = self.session
        if session is None or not session.open:
            raise TransientServerError("the websocket is not connected")
        future = await session.submit_events(bodies)
        return self._confirmed(future, self.client.deadline_s)

    @staticmethod
    async def _confirmed(
        future: asyncio.Future[wsproto.Confirm], timeout_s: float
    ) -> dict[str, Any]:
        try:
            confirm = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise TransientServerError(f"no confirm within {timeout_s:g} s") from None
        return confirm.rest_answer()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, shutdown: asyncio.Event) -> None:
        """Serve until ``shutdown`` is set. Never raises for server trouble."""
        heartbeat = asyncio.create_task(self._heartbeat_loop(shutdown), name="heartbeat")
        self.health.report("channel")
        try:
            while not shutdown.is_set():
                try:
                    delay, watch_token = await self._step(shutdown)
                except Exception as exc:  # a bug must not end the channel: log, back off
                    log.exception("unexpected error in the channel; retrying")
                    delay, watch_token = self.backoff.next_delay(), False
                    self.state.failed("backing_off", f"agent error: {exc!r}", delay)
                self.health.report("channel", delay)
                if watch_token:
                    if await self.poll.sleep_watching_token(shutdown, delay):
                        break
                elif delay > 0 and await sleep_unless(shutdown, delay):
                    break
                if heartbeat.done():
                    heartbeat.result()  # the heartbeat loop raised: the channel goes down too
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _step(self, shutdown: asyncio.Event) -> tuple[float, bool]:
        """One step: a poll while auto falls back, else a connect and its session. Returns
        the delay before the next step and whether to watch the token file meanwhile."""
        if self.fallback is not None and time.monotonic() < self._probe_at:
            delay = await self.poll.poll_once()
            self._mirror_poll()
            return min(delay, max(0.0, self._probe_at - time.monotonic())), (
                self.poll.state.state == "auth_rejected"
            )
        announced = {} if self._no_serves else self.served()
        hello = make_hello(
            self.creds.agent_id, self.settings.hostname, self.dispatcher, self.seqs, announced
        )
        try:
            ws, welcome = await open_session(
                self.client.base_url,
                self.creds.agent_id,
                self.creds.agent_token,
                hello,
                open_timeout_s=self.client.deadline_s,
                compression=self.compression,
            )
        except WebSocketUnavailable as exc:
            return self._unavailable(str(exc))
        except ProtocolError as exc:
            if announced:  # a server that predates served names refuses a hello with them
                self._no_serves = True
                log.warning(
                    "the server refused a hello announcing served names; they are polled",
                    error=str(exc),
                )
                return 0.0, False
            return await self._connect_failed(exc)
        except ServerError as exc:
            return await self._connect_failed(exc)
        self.seqs.welcomed(welcome.confirmed_seq)
        session = WebSocketSession(
            ws,
            welcome,
            self.dispatcher,
            self.seqs,
            self.health,
            answer_timeout_s=self.client.deadline_s,
            on_contact=self._contact,
            on_down=self._down,
            serving={i: announced[i][0] for i in welcome.serving if i in announced},
        )
        session.announced = frozenset(announced.items())
        if len(session.serving) < len(announced):
            log.info(
                "the server did not accept every served name on the websocket; the others "
                "are polled",
                announced=len(announced),
                accepted=len(session.serving),
            )
        return await self._serve(session, shutdown)

    def reannounce(self) -> None:
        """The served names changed (new ones registered, new tokens): reconnect now, so
        that the next hello announces them (pending commands are pushed again on the new
        connection; the ledger acts on each once)."""
        session = self.session
        if session is None or not session.open or self._no_serves:
            return
        if frozenset(self.served().items()) == session.announced:
            return
        self._reannounce = True
        session.close_soon("reconnecting to announce a new set of served names")

    def covered(self) -> frozenset[str]:
        """The served names whose commands the open websocket carries now."""
        session = self.session
        if session is None or not session.open or self._no_serves:
            return frozenset()
        return frozenset(session.serving.values())

    async def _serve(
        self, session: WebSocketSession, shutdown: asyncio.Event
    ) -> tuple[float, bool]:
        """Serve one session; the delay before reconnecting."""
        if self.fallback is not None:
            log.info("the server offers the websocket again; polling stops")
        self.fallback, self._reported = None, None
        self.sessions += 1
        self.session = session
        self.reannounce()  # names registered while this connection was being opened
        now = time.time()
        state = self.state
        state.ok()
        state.kind, state.why, state.next_probe_at = "websocket", None, None
        state.connected_since = now
        log.info(
            "websocket connected",
            server=self.client.base_url,
            protocol=wsproto.SUBPROTOCOL,
            server_version=session.welcome.server_version,
            confirmed_seq=session.welcome.confirmed_seq,
        )
        try:
            end = await session.run(shutdown)
        finally:
            self.session = None
            state.connected_since = None
        if shutdown.is_set():
            return 0.0, False
        reannounced, self._reannounce = self._reannounce, False  # never left over
        if reannounced and end.by_agent:
            log.info("websocket reconnects to announce the served names")
            return 0.0, False
        if end.lasted_s >= HEALTHY_SESSION_S:
            self.backoff.reset()
        if end.code == wsproto.CloseCode.UNSUPPORTED_VERSION:
            return self._unavailable(f"{NO_COMMON_VERSION}: the server closed 4406: {end.reason}")
        delay = self.backoff.next_delay()
        what = f"websocket {end.describe()}"
        if end.code == wsproto.CloseCode.REPLACED:
            what += "; another connection of this agent took over (two agents on one token?)"
        state.failed("backing_off", what, delay)
        log.warning("websocket closed; reconnecting", how=what, retry_in_s=round(delay, 3))
        return delay, False

    def _down(self, how: str) -> None:
        """The session's connection stopped being usable; its end is handled when it closed."""
        self.state.connected_since = None
        self.state.failed("backing_off", f"websocket {how}", 0.0)

    def _contact(self, at: float) -> None:
        self.state.last_contact_at = at
        self.state.last_ok_at = at

    def _unavailable(self, reason: str) -> tuple[float, bool]:
        """No usable websocket: auto polls (and probes again later), websocket retries."""
        state = self.state
        if self.mode == "auto":
            if reason != self.fallback and reason != self._reported:
                log.warning(
                    "the server offers no usable websocket; polling instead, probing again "
                    f"every {PROBE_INTERVAL_S / 60:g} min",
                    reason=reason,
                )
            else:
                log.debug("websocket probe: still unavailable", reason=reason)
            self.fallback = self._reported = reason
            self._probe_at = time.monotonic() + PROBE_INTERVAL_S
            state.kind, state.why = "poll", reason
            state.next_probe_at = time.time() + PROBE_INTERVAL_S
            return 0.0, False
        delay = self.backoff.next_delay()
        state.kind, state.why = "websocket", reason
        state.failed("unavailable", reason, delay)
        if reason != self._reported:
            self._reported = reason
            log.error(
                "server.transport is 'websocket' but the server offers no usable websocket; "
                "retrying (server.transport = 'auto' would poll instead)",
                reason=reason,
                retry_in_s=round(delay, 3),
            )
        return delay, False

    async def _connect_failed(self, exc: ServerError) -> tuple[float, bool]:
        """A connect that failed for another reason than a missing websocket."""
        if self.fallback is not None:  # a probe while polling: poll on, probe again later
            log.info("websocket probe failed; polling on", error=str(exc))
            self._probe_at = time.monotonic() + PROBE_INTERVAL_S
            self.state.next_probe_at = time.time() + PROBE_INTERVAL_S
            return 0.0, False
        decision = classify(exc, auth_retry_s=self.settings.auth_retry_s)
        state = self.state
        if decision.action is Action.AUTH_REJECTED:
            delay = decision.delay(self.backoff)
            state.failed("auth_rejected", f"{exc}; {FIX_TOKEN}", delay)
            if self._reported != "auth":
                self._reported = "auth"
                log.error(
                    "the server rejected this agent's token (rotated by a re-register, or "
                    f"revoked); {FIX_TOKEN}",
                    detail=exc.detail,
                    retry_in_s=delay,
                )
            return delay, True
        if decision.action is Action.RETRY_AFTER:
            delay = decision.delay(self.backoff)
            state.failed("rate_limited", str(exc), delay)
            log.warning("server asks us to slow down", retry_after_s=round(delay, 3))
            return delay, False
        delay = self.backoff.next_delay()
        state.failed("backing_off", str(exc), delay)
        log.warning(
            "websocket connect failed; retrying", error=str(exc), retry_in_s=round(delay, 3)
        )
        if self.mode == "auto":  # commands must still arrive while the websocket is down
            await self.poll.poll_once()
            if self.poll.state.state == "connected":
                state.last_ok_at = state.last_contact_at = self.poll.state.last_ok_at
                state.why = "websocket down; polling between reconnects"
        return delay, False

    def _mirror_poll(self) -> None:
        """While auto falls back, the poll channel's view is the channel's."""
        polled, state = self.poll.state, self.state
        state.state = polled.state
        state.last_ok_at = polled.last_ok_at
        state.last_contact_at = polled.last_contact_at
        state.last_error, state.last_error_at = polled.last_error, polled.last_error_at
        state.next_retry_at = polled.next_retry_at

    async def _heartbeat_loop(self, shutdown: asyncio.Event) -> None:
        """REST heartbeats while auto has no websocket open (a connection is liveness)."""
        interval = self.settings.heartbeat_interval_s
        while True:
            self.health.report("heartbeat", interval)
            if await sleep_unless(shutdown, interval):
                break
            if self.mode != "auto" or self.session is not None:
                continue
            if self.state.state == "auth_rejected":
                continue
            try:
                await self.client.heartbeat(self.creds.agent_id, self.creds.agent_token)
                self.state.last_heartbeat_at = time.time()
            except ServerError as exc:
                log.debug("heartbeat failed", error=str(exc))
