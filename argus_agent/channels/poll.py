"""The REST polling channel of an unmodified Argus v0.3.0 server.

Polls ``GET /api/agents/{id}/jobs`` at the poll interval with ±10 % jitter and sends
heartbeats on their own interval. Connection errors, timeouts and 5xx back off exponentially
with full jitter (reset after a success); 429 waits for ``Retry-After``. A rejected agent
token (rotated by a re-register, or revoked) is logged once as an error naming the fix; the
channel keeps running, re-reads the token file and retries slowly, so systemd never sees a
crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Action, Backoff, classify, jittered
from argus_agent.channels.base import sleep_unless
from argus_agent.config import AgentSettings
from argus_agent.credentials import AgentCredentials
from argus_agent.dispatcher import Dispatcher
from argus_agent.errors import (
    AgentError,
    AgentTokenRejectedError,
    AuthError,
    RateLimitedError,
    ServerError,
)
from argus_agent.health import Health
from argus_agent.logsetup import get_logger
from argus_agent.protocol import AckStatus, decode_commands
from argus_agent.status import ChannelState

log = get_logger(__name__)

#: While the token is rejected, how often the token file is checked for a new token.
TOKEN_WATCH_S = 1.0
FIX_TOKEN = "run `argus-agent register --force` on this host to get a new agent token"


class PollChannel:
    """Argus v0.3.0 polling. ``reload_credentials`` re-reads the token file (after a 401)."""

    def __init__(
        self,
        client: ArgusClient,
        credentials: AgentCredentials,
        dispatcher: Dispatcher,
        state: ChannelState,
        settings: AgentSettings,
        *,
        server_poll_interval_s: float,
        reload_credentials: Callable[[], AgentCredentials | None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.creds = credentials
        self.dispatcher = dispatcher
        self.state = state
        self.settings = settings
        #: The poll interval the server handed out at registration (used unless
        #: ``agent.poll_interval_s`` is set).
        self.server_poll_interval_s = server_poll_interval_s
        self.interval = settings.poll_interval_s or server_poll_interval_s
        self.reload_credentials = reload_credentials
        self.rng = rng or random.Random()
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng=self.rng)
        self._auth_reported = False
        self._reload_error: str | None = None
        #: Where the loops report progress (the daemon shares its own).
        self.health = Health(settings.stall_timeout_s)
        self.state.kind = "poll"
        self.state.poll_interval_s = self.interval

    async def run(self, shutdown: asyncio.Event) -> None:
        """Poll and heartbeat until ``shutdown`` is set. Never raises for server trouble."""
        heartbeat = asyncio.create_task(self._heartbeat_loop(shutdown))
        self.health.report("channel")
        try:
            while not shutdown.is_set():
                try:
                    delay = await self.poll_once()
                except Exception as exc:  # a bug must not end the channel: log, back off
                    log.exception("unexpected error in the poll loop; retrying")
                    delay = self.backoff.next_delay()
                    self.state.failed("backing_off", f"agent error: {exc!r}", delay)
                self.health.report("channel", delay)
                if self.state.state == "auth_rejected":
                    if await self.sleep_watching_token(shutdown, delay):
                        break
                elif await sleep_unless(shutdown, delay):
                    break
                if heartbeat.done():
                    heartbeat.result()  # the heartbeat loop raised: the channel goes down too
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    def apply_settings(self, settings: AgentSettings) -> None:
        """Use ``settings`` (a reload) from the next poll, heartbeat and backoff step on."""
        self.settings = settings
        self.interval = settings.poll_interval_s or self.server_poll_interval_s
        self.state.poll_interval_s = self.interval
        self.backoff.initial, self.backoff.cap = settings.backoff_initial_s, settings.backoff_max_s

    async def poll_once(self) -> float:
        """One exchange: a poll, acting on what came, then acks still pending. Returns the
        delay until the next poll, chosen by what happened.

        An ack that fails does not hold up polling (a stop must still get through); it stays
        pending in the ledger and is sent again on the next exchange.
        """
        try:
            body = await self.client.poll(self.creds.agent_id, self.creds.agent_token)
            # Decoding is bounded (size, count) but CPU work: off the event loop.
            items = await asyncio.to_thread(decode_commands, body)
        except ServerError as exc:
            return self._failed(exc)
        self._succeeded()
        ack_error: ServerError | None = None
        for item in items:
            self.health.report("channel")  # each command (and its ack) is one bounded step
            try:
                await self.dispatcher.handle(item, self._ack)
            except ServerError as exc:
                ack_error = ack_error or exc
        if ack_error is None:
            try:
                await self.dispatcher.flush_acks(self._ack)
            except ServerError as exc:
                ack_error = exc
        if ack_error is not None:
            if isinstance(ack_error, RateLimitedError | AgentTokenRejectedError | AuthError):
                return self._failed(ack_error)
            log.warning("ack failed; it stays pending and is sent again", error=str(ack_error))
            self.state.last_error = str(ack_error)
        return jittered(self.interval, 0.1, self.rng)

    def _succeeded(self) -> None:
        if self.state.state not in ("connected", "starting"):
            log.info("connection to the server restored", server=self.client.base_url)
        self.state.ok()
        self.backoff.reset()
        self._auth_reported = False

    def _failed(self, exc: ServerError) -> float:
        """Record a failed exchange as ``backoff.classify`` decides; the delay until the next."""
        decision = classify(exc, auth_retry_s=self.settings.auth_retry_s)
        delay = decision.delay(self.backoff)
        if decision.action is Action.RETRY_AFTER:
            self.state.failed("rate_limited", str(exc), delay)
            log.warning("server asks us to slow down", retry_after_s=round(delay, 3))
            return delay
        if decision.action is Action.AUTH_REJECTED:
            self.state.failed("auth_rejected", f"{exc}; {FIX_TOKEN}", delay)
            if not self._auth_reported:
                self._auth_reported = True
                log.error(
                    "the server rejected this agent's token (rotated by a re-register, or "
                    f"revoked); {FIX_TOKEN}",
                    detail=exc.detail,
                    retry_in_s=delay,
                )
            return delay
        # BACKOFF; or REFUSED, which a poll has nothing to settle for: it backs off too.
        self.state.failed("backing_off", str(exc), delay)
        log.warning("server exchange failed; retrying", error=str(exc), retry_in_s=round(delay, 3))
        return delay

    async def sleep_watching_token(self, shutdown: asyncio.Event, delay: float) -> bool:
        """Sleep ``delay`` seconds, ending early when `register --force` wrote a new token.
        Returns True when shutdown was requested."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if await sleep_unless(shutdown, min(TOKEN_WATCH_S, left)):
                return True
            if self.reload_token():
                return False
        return shutdown.is_set()

    def reload_token(self) -> bool:
        """Pick up a token written by `register --force` since we started; True if new."""
        if self.reload_credentials is None:
            return False
        try:
            fresh = self.reload_credentials()
        except AgentError as exc:
            if str(exc) != self._reload_error:
                self._reload_error = str(exc)
                log.warning("cannot re-read the token file", error=str(exc))
            return False
        self._reload_error = None
        if fresh is None or fresh.agent_token == self.creds.agent_token:
            return False
        log.info("new agent token found in the token file; retrying now")
        self.creds = fresh
        return True

    async def _ack(
        self, cmd_id: str, status: AckStatus, pid: int | None, error: str | None
    ) -> None:
        await self.client.ack(
            self.creds.agent_id, self.creds.agent_token, cmd_id, status, pid=pid, error=error
        )

    async def _heartbeat_loop(self, shutdown: asyncio.Event) -> None:
        while True:
            self.health.report("heartbeat", self.settings.heartbeat_interval_s)
            if await sleep_unless(shutdown, self.settings.heartbeat_interval_s):
                break
            if self.state.state == "auth_rejected":
                continue
            try:
                await self.client.heartbeat(self.creds.agent_id, self.creds.agent_token)
                self.state.last_heartbeat_at = time.time()
            except ServerError as exc:
                log.debug("heartbeat failed", error=str(exc))
