"""Deliver the outbox to Argus: ``POST /api/events/batch``, oldest first, at least once.

An event leaves the outbox only when the server answered ``accepted`` or ``deduplicated``
for it, or ``rejected`` it (logged with the server's reason, and dropped: retrying a
rejected event can never succeed). What a failed request means is decided by
``backoff.classify``, the same as for the poll channel: 429 waits for ``Retry-After``;
connection errors, timeouts and 5xx back off with full jitter; a refused reporter token is
logged once and retried every ``agent.auth_retry_s``. A request refused for what it carries
(422 for the whole batch: one bad envelope fails a whole batch on Argus v0.3.0; 413 from a
proxy) is narrowed down by sending the events one at a time, so one bad event never blocks the
rest. Without a reporter token nothing is sent: events stay in the outbox (bounded) and the
agent says so once, in its log and its status.

Transport seam: while ``transport`` (an :class:`EventsTransport`, the websocket channel) is
ready, batches go over it instead (``events`` frames, ``transport.max_in_flight`` kept
unconfirmed: the next is sent as the oldest is confirmed) and its answers, in the REST batch
answer's shape, are settled exactly as REST answers; when it is not ready, REST as above. An
event leaves the outbox only when an answer settled it, whichever way it went; one sent twice
(a frame whose confirm was lost with the connection) is de-duplicated by the server by
``event_id``. The reporter token is still required: without one nothing is sent, not even over
the websocket (which would carry events without it), so that "no token, no telemetry leaves the
host" stays one simple rule.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from argus_agent.argus_api import ArgusClient
from argus_agent.backoff import Action, Backoff, classify
from argus_agent.channels.base import sleep_unless
from argus_agent.errors import ServerError
from argus_agent.health import DEFAULT_STALL_S, Health
from argus_agent.logsetup import get_logger
from argus_agent.outbox import Chunk, Outbox

log = get_logger(__name__)

IDLE_WAIT_S = 1.0
#: How long one pass of the websocket's sliding window goes on submitting batches before it
#: settles what it sent and hands back to the loop (progress reported, shutdown seen).
WINDOW_S = 1.0


class EventsTransport(Protocol):
    """Another way than ``POST /api/events/batch`` to deliver batches (the websocket)."""

    #: How many batches may be unanswered at once, and the most bytes one batch may hold.
    max_in_flight: int
    max_batch_bytes: int

    def events_ready(self) -> bool:
        """Whether batches can be submitted now."""
        ...

    async def submit_events(self, bodies: list[bytes]) -> Awaitable[dict[str, Any]]:
        """Send one batch of encoded envelopes; returns an awaitable of its answer in the
        REST batch answer's shape. Both raise ServerError (a refused batch as ProtocolError
        413/400, so that it is settled event by event, as a refused REST request)."""
        ...


@dataclass
class SenderState:
    """What the sender last saw, for status."""

    state: str = (
        "starting"  # sending | idle | backing_off | rate_limited | auth_rejected | no_token
    )
    sent: int = 0
    rejected: int = 0
    last_sent_at: float | None = None
    last_error: str | None = None
    #: How the last batch went: ``websocket`` or ``rest``.
    via: str | None = None


class EventSender:
    """Moves events from the outbox to the server. Use from one event loop.

    ``auth_retry_s`` is how long to wait after the server refused the reporter token
    (``agent.auth_retry_s``).
    """

    def __init__(
        self,
        outbox: Outbox,
        client: ArgusClient,
        token: str | None,
        backoff: Backoff,
        *,
        batch_size: int = 500,
        auth_retry_s: float = 300.0,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.token = token
        self.backoff = backoff
        self.batch_size = batch_size
        self.auth_retry_s = auth_retry_s
        self.state = SenderState()
        self._auth_reported = False
        #: Where the loop reports progress (the daemon shares its own).
        self.health = Health(DEFAULT_STALL_S)
        #: Used instead of REST while it is ready (set by the daemon: the websocket channel).
        self.transport: EventsTransport | None = None

    async def run(self, shutdown: asyncio.Event) -> None:
        """Send until ``shutdown`` is set. Never raises for server trouble."""
        if self.token is None:
            self.state.state = "no_token"
            log.warning(
                "no Argus reporter token (set ARGUS_TOKEN, server.token or server.token_file): "
                "telemetry events are kept locally in the outbox and not sent"
            )
            return
        self.health.report("sender")
        while not shutdown.is_set():
            try:
                delay = await self.send_once()
            except Exception as exc:  # a bug must not stop delivery for good
                log.exception("unexpected error while sending events; retrying")
                self.state.state, self.state.last_error = "backing_off", repr(exc)
                delay = self.backoff.next_delay()
            if delay is None:
                self.outbox.changed.clear()
                if self.outbox.stats().queued:
                    self.health.report("sender")  # a backlog draining is progress
                    continue
                self.state.state = "idle"
                self.health.report("sender", IDLE_WAIT_S)
                waiter = asyncio.ensure_future(self.outbox.changed.wait())
                stopper = asyncio.ensure_future(shutdown.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=IDLE_WAIT_S, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                stopper.cancel()
            else:
                self.health.report("sender", delay)
                if await sleep_unless(shutdown, delay):
                    break
            self.health.report("sender")

    async def send_once(self) -> float | None:
        """Send one batch over REST, or a window of them over the websocket. Returns None
        when the outbox is empty or what was sent went through, else how long to wait before
        trying again."""
        transport = self.transport
        if transport is not None and not transport.events_ready():
            transport = None
        chunks = await self.outbox.peek(self.batch_size)
        if not chunks:
            return None
        try:
            if transport is not None:
                self.state.via = "websocket"
                complete = await self._deliver_windowed(transport, chunks)
            else:
                self.state.via = "rest"
                complete = await self._deliver(chunks)
        except ServerError as exc:
            return self._failed(exc)
        self._auth_reported = False
        self.state.state = "sending"
        if not complete:
            # The server left some events unanswered: don't resend them in a tight loop.
            self.state.last_error = "some events were not answered; sending them again"
            return self.backoff.next_delay()
        self.backoff.reset()
        return None

    def _failed(self, exc: ServerError) -> float:
        """Record a failed request as ``backoff.classify`` decides; the delay before the next."""
        decision = classify(exc, auth_retry_s=self.auth_retry_s)
        delay = decision.delay(self.backoff)
        self.state.last_error = str(exc)
        if decision.action is Action.RETRY_AFTER:
            self.state.state = "rate_limited"
        elif decision.action is Action.AUTH_REJECTED:
            self.state.state = "auth_rejected"
            if not self._auth_reported:
                self._auth_reported = True
                log.error(
                    "the server refused the reporter token for events; check "
                    "ARGUS_TOKEN / server.token",
                    detail=exc.detail,
                    retry_in_s=delay,
                )
        else:  # BACKOFF (a REFUSED request was settled event by event before it got here)
            self.state.state = "backing_off"
            log.warning(
                "sending events failed; retrying", error=str(exc), retry_in_s=round(delay, 3)
            )
        return delay

    async def _deliver(self, chunks: list[Chunk]) -> bool:
        """Send the chunks' events in one request; returns False when some went unanswered."""
        bodies = [body for chunk in chunks for body in chunk.bodies]
        try:
            answer = await self.client.post_events(self.token or "", bodies)
        except ServerError as exc:
            if classify(exc, auth_retry_s=self.auth_retry_s).action is not Action.REFUSED:
                raise
            # The request as a whole was refused (one bad envelope fails a whole batch on
            # Argus v0.3.0; a proxy may refuse its size): settle the events one by one.
            for chunk in chunks:
                await self._one_by_one(chunk)
            return True
        return await self._settle(chunks, answer)

    async def _deliver_windowed(self, transport: EventsTransport, first: list[Chunk]) -> bool:
        """Keep ``transport.max_in_flight`` batches unanswered: submit *first* and the next
        oldest chunks (``peek(after=)``) in batches of at most ``batch_size`` events and
        ``max_batch_bytes``, and each time the oldest is answered, settle it (as a REST answer;
        one refused as a whole event by event) and submit the next. Sending more while earlier
        batches wait keeps the server busy: refilling only once a whole window was answered
        left it idle while the agent settled and read the next (17,430 events/s then, 20,284
        with the window, ``bench/README.md``). Stops submitting after ``WINDOW_S`` (so that
        the caller sees shutdown), when the outbox has nothing newer, when a batch went
        unanswered, or on an error; settles what was submitted, then raises the first
        error that was not a refusal (what it did not settle stays queued)."""
        window: collections.deque[tuple[list[Chunk], Awaitable[dict[str, Any]] | ServerError]]
        window = collections.deque()
        error: ServerError | None = None
        complete = True
        after = 0  # the newest chunk submitted
        stop_at = time.monotonic() + WINDOW_S
        while True:
            # Chunk seqs are rowids: once the window is empty, the newest chunk it sent is
            # gone, and an outbox left empty numbers new chunks from 1 again, below ``after``.
            # Reading past ``after`` is safe only while that chunk is still queued, i.e. while
            # the window holds it; else the pass ends and the next one starts from the oldest.
            while (
                error is None
                and complete
                and len(window) < transport.max_in_flight
                and transport.events_ready()
                and (not after or (window and time.monotonic() < stop_at))
            ):
                chunks = await self.outbox.peek(self.batch_size, after=after) if after else first
                if not chunks:
                    break
                after = chunks[-1].seq
                for group in self._batches(chunks, transport.max_batch_bytes):
                    try:
                        bodies = [body for chunk in group for body in chunk.bodies]
                        window.append((group, await transport.submit_events(bodies)))
                    except ServerError as exc:
                        window.append((group, exc))
                        if classify(exc, auth_retry_s=self.auth_retry_s).action is not (
                            Action.REFUSED
                        ):
                            error = exc
                            break
            if not window:
                break
            group, pending = window.popleft()
            try:
                if isinstance(pending, ServerError):
                    raise pending
                answer = await pending
            except ServerError as exc:
                if classify(exc, auth_retry_s=self.auth_retry_s).action is Action.REFUSED:
                    for chunk in group:
                        await self._one_by_one(chunk)
                else:
                    error = error or exc
                continue
            complete = await self._settle(group, answer) and complete
            self.health.report("sender")  # a pass may take seconds: each answer is progress
        if error is not None:
            raise error
        return complete

    def _batches(self, chunks: list[Chunk], max_bytes: int) -> list[list[Chunk]]:
        """The chunks in batches of at most ``batch_size`` events and *max_bytes*."""
        groups: list[list[Chunk]] = []
        count = size = 0
        for chunk in chunks:
            chunk_size = sum(len(b) + 1 for b in chunk.bodies)
            if groups and (
                count + len(chunk.bodies) <= self.batch_size and size + chunk_size <= max_bytes
            ):
                groups[-1].append(chunk)
                count, size = count + len(chunk.bodies), size + chunk_size
            else:
                groups.append([chunk])
                count, size = len(chunk.bodies), chunk_size
        return groups

    async def _post(self, bodies: list[bytes]) -> dict[str, Any]:
        """One batch over the transport while it is ready, else over REST."""
        transport = self.transport
        if transport is not None and transport.events_ready():
            return await (await transport.submit_events(bodies))
        return await self.client.post_events(self.token or "", bodies)

    async def _settle(self, chunks: list[Chunk], answer: dict[str, Any]) -> bool:
        """Settle the chunks by a batch answer; returns False when some went unanswered."""
        by_id = {str(r.get("event_id")): r for r in answer["results"] if isinstance(r, dict)}
        # A websocket confirm lists only the rejected events: every other one was taken.
        held = {"status": "accepted"} if answer.get("unlisted_held") else None
        done: list[int] = []
        complete = True
        for chunk in chunks:
            results = [by_id.get(event_id, held) for event_id in chunk.event_ids]
            if any(r is None for r in results):
                complete = False
                continue  # not all answered: the chunk stays queued and is sent again
            for result, body in zip(results, chunk.bodies, strict=True):
                assert result is not None
                if result.get("status") == "rejected":
                    self._rejected(body, str(result.get("error")))
                else:
                    self.state.sent += 1
            done.append(chunk.seq)
        await self.outbox.remove(done)
        self.state.last_sent_at = time.time()
        return complete

    async def _one_by_one(self, chunk: Chunk) -> None:
        """Send a chunk's events one per request. Events refused on their own (``REFUSED``)
        are dropped with the reason; an interruption (429, outage) keeps what is settled so
        far settled, so the next try resumes after it instead of starting over."""
        settled = 0
        try:
            for event_id, body in zip(chunk.event_ids, chunk.bodies, strict=True):
                try:
                    answer = await self._post([body])
                except ServerError as single:
                    decision = classify(single, auth_retry_s=self.auth_retry_s)
                    if decision.action is not Action.REFUSED:
                        raise
                    self._rejected(body, f"refused by the server: {single.detail}")
                else:
                    result = next(
                        (
                            r
                            for r in answer["results"]
                            if isinstance(r, dict) and r.get("event_id") == event_id
                        ),
                        None,
                    )
                    if result is not None and result.get("status") == "rejected":
                        self._rejected(body, str(result.get("error")))
                    else:
                        self.state.sent += 1
                settled += 1
        finally:
            await self.outbox.trim(chunk, settled)

    def _rejected(self, body: bytes, error: str) -> None:
        self.state.rejected += 1
        event = json.loads(body)
        log.error(
            "the server rejected an event; it is dropped",
            event_id=event.get("event_id"),
            event_type=event.get("event_type"),
            batch_id=event.get("batch_id"),
            error=error,
        )
