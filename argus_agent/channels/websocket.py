"""One open, welcomed websocket connection to the server (protocol ``argus-agent.v1``,
``docs/protocol.md``); ``channels.wsconnect.open_session`` opens it.

:class:`WebSocketSession` serves the connection until it closes. Its tasks:

- the **receive loop** (:meth:`WebSocketSession.run`): decodes each frame
  (``wsproto.decode_frame``, which never raises), queues commands, resolves the futures of
  ``ack_result`` and ``confirm`` frames, answers bad frames as ``FrameError.reply()`` says
  (closing 1008 after ``BAD_FRAME_BURST`` undecodable frames within ``BAD_FRAME_WINDOW_S``);
  it never waits on the dispatcher;
- the **command worker**: first sends the acks still pending in the ledger, then hands each
  queued command (or malformed command) to ``Dispatcher.handle`` in arrival order, with
  :meth:`WebSocketSession.ack` as its ack; an ack without its ``ack_result`` in time (or on
  a closed socket) raises ``TransientServerError``, so the ledger keeps it pending and it is
  sent again (on the next connection, or by a poll);
- the **ticker** (every ``TICK_S``): the last contact (any frame or pong) to the channel
  state, progress to ``health`` while the worker is not inside a command, ``on_down`` the
  moment the connection stops being usable, and retries of acks that failed.

Liveness is the library's keepalive (``PING_INTERVAL_S``, ``PING_TIMEOUT_S``, close timeout
``CLOSE_TIMEOUT_S``): a hung (SIGSTOPped) server is detected within 4 s, closed within 5 s.

Events (:meth:`WebSocketSession.submit_events`) go out as ``events`` frames numbered by a
:class:`SeqCounter`; each frame's future resolves with its ``confirm``, or fails with a
``ServerError`` (dropped, refused, no confirm in time): the events are then still in the
outbox and sent again (the server de-duplicates by ``event_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from argus_agent import wsproto
from argus_agent.channels.wsconnect import abort
from argus_agent.dispatcher import Dispatcher
from argus_agent.errors import (
    ConflictError,
    NotFoundError,
    ProtocolError,
    ServerError,
    TransientServerError,
)
from argus_agent.health import Health
from argus_agent.logsetup import get_logger
from argus_agent.protocol import AckStatus, Command, MalformedCommand

log = get_logger(__name__)

#: The JSON of an events frame around its envelopes (``{"type":"events","seq":N,...}``).
EVENTS_FRAME_OVERHEAD = 64
#: How often the session notes the last contact, reports health and checks the connection.
TICK_S = 0.25
#: A command-queue entry that only makes the worker retry acks that failed.
_FLUSH = object()


@dataclass
class _Queued:
    """A command for the worker, and the served name whose registration it is for (None:
    this agent's own)."""

    command: Command | MalformedCommand
    via: str | None


@dataclass(frozen=True)
class SessionEnd:
    """How a session ended: the close code and reason, and who closed it."""

    code: int | None
    reason: str
    by_agent: bool
    lasted_s: float

    def describe(self) -> str:
        """E.g. ``closed by the server (1011: internal error)``."""
        who = "the agent" if self.by_agent else "the server"
        if self.code is None or self.code == 1006:
            return "the connection was lost (no close frame)"
        return f"closed by {who} ({self.code}{': ' + self.reason if self.reason else ''})"


class SeqCounter:
    """The events ``seq`` of one agent process: strictly increasing across connections,
    numbered above what each welcome says the server holds."""

    def __init__(self) -> None:
        self.last = 0
        #: The highest seq a confirm answered (``hello.last_confirmed_seq``).
        self.confirmed = 0

    def welcomed(self, confirmed_seq: int | None) -> None:
        """Number new frames above the server's ``confirmed_seq``."""
        self.last = max(self.last, confirmed_seq or 0)

    def next(self) -> int:
        """The seq of the next frame."""
        self.last += 1
        return self.last


class WebSocketSession:
    """An open, welcomed connection; :meth:`run` serves it until it closes."""

    def __init__(
        self,
        ws: ClientConnection,
        welcome: wsproto.Welcome,
        dispatcher: Dispatcher,
        seqs: SeqCounter,
        health: Health,
        *,
        answer_timeout_s: float,
        on_contact: Callable[[float], None] | None = None,
        on_down: Callable[[str], None] | None = None,
        serving: Mapping[str, str] | None = None,
    ) -> None:
        self.ws = ws
        #: The served names' registrations the server accepted (welcome's ``serving``):
        #: agent id → host name. Their commands come here too, tagged with the agent id.
        self.serving: Mapping[str, str] = serving or {}
        #: Told the last contact (every tick), and once, the moment the connection stops
        #: being usable (e.g. a pong timed out: before the close handshake has timed out too).
        self.on_down = on_down
        self.welcome = welcome
        self.dispatcher = dispatcher
        self.seqs = seqs
        self.health = health
        self.answer_timeout_s = answer_timeout_s
        self.on_contact = on_contact
        self.opened_at = time.monotonic()
        #: The largest events frame the server takes (bytes).
        self.max_frame_bytes = min(welcome.max_message_bytes, wsproto.MAX_EVENTS_FRAME_BYTES)
        self._queue: asyncio.Queue[_Queued | object | None] = asyncio.Queue()
        self._acks: dict[str, asyncio.Future[wsproto.AckResult]] = {}
        self._confirms: dict[int, asyncio.Future[wsproto.Confirm]] = {}
        self._bad_frames: deque[float] = deque()
        self._ack_failed = False
        self._busy = False
        self._closing = False
        #: Commands received on this connection (for tests and the log).
        self.commands_received = 0
        #: The served names' agent ids its hello announced (set by the channel).
        self.announced: frozenset[str] = frozenset()
        self._close_asked = asyncio.Event()
        self._close_reason = ""

    @property
    def open(self) -> bool:
        """Whether frames can be sent (the connection is open and not being closed)."""
        return not self._closing and self.ws.protocol.state is State.OPEN

    async def run(self, shutdown: asyncio.Event) -> SessionEnd:
        """Serve until the connection closes or ``shutdown`` is set (then close 1000). Lets
        the command in progress finish and the queued ones be handled (their acks then stay
        pending) before returning. Never raises for what the server does."""
        worker = asyncio.create_task(self._work(), name="ws-commands")
        ticker = asyncio.create_task(self._tick(), name="ws-ticker")
        stopper = asyncio.create_task(self._close_on(shutdown), name="ws-stopper")
        try:
            async for raw in self.ws:
                if self._closing:  # closed by us (1008, shutdown): what is left goes unread
                    break
                await self._on_frame(raw)
        except ConnectionClosed:
            pass
        except Exception:  # a bug here must not take the daemon down: drop the connection
            log.exception("unexpected error on the websocket; reconnecting")
            await abort(self.ws)
        finally:
            self._closing = True
            self._fail_pending("the websocket closed")
            stopper.cancel()
            ticker.cancel()
            self._queue.put_nowait(None)
            await asyncio.gather(stopper, ticker, return_exceptions=True)
            await asyncio.gather(worker, return_exceptions=True)
        proto = self.ws.protocol
        rcvd, sent = proto.close_rcvd, proto.close_sent
        by_agent = sent is not None and (rcvd is None or proto.close_rcvd_then_sent is False)
        chosen = sent if by_agent else rcvd
        return SessionEnd(
            code=chosen.code if chosen is not None else None,
            reason=chosen.reason if chosen is not None else "",
            by_agent=by_agent,
            lasted_s=time.monotonic() - self.opened_at,
        )

    def close_soon(self, reason: str) -> None:
        """Close this connection normally (1000, ``reason``), as at shutdown: the command in
        progress finishes, queued ones are handled."""
        self._close_reason = reason
        self._close_asked.set()

    async def _close_on(self, shutdown: asyncio.Event) -> None:
        waits = {
            asyncio.create_task(shutdown.wait()),
            asyncio.create_task(self._close_asked.wait()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._closing = True
        reason = "the agent stops" if shutdown.is_set() else self._close_reason
        await self.ws.close(wsproto.CloseCode.NORMAL, reason)

    # -- frames from the server -------------------------------------------------------------

    async def _on_frame(self, raw: str | bytes) -> None:
        message = wsproto.decode_frame(raw, wsproto.Direction.TO_AGENT)
        if isinstance(message, wsproto.CommandMsg):
            self.commands_received += 1
            via = self.serving.get(message.agent_id) if message.agent_id is not None else None
            if message.agent_id is not None and via is None:
                # Never acted on: not this agent's, nor a name it announced and had accepted.
                log.warning(
                    "command for a registration this connection does not serve",
                    cmd_id=message.id,
                    agent_id=message.agent_id,
                )
                await self._send_error(
                    wsproto.ErrorMsg(
                        code=wsproto.ErrorCode.BAD_FIELD,
                        reason=f"command.agent_id {message.agent_id} is not served here",
                        ref=message.id,
                    )
                )
                return
            self._queue.put_nowait(_Queued(message.to_command(), via))
        elif isinstance(message, wsproto.AckResult):
            future = self._acks.get(message.cmd_id)
            if future is not None and not future.done():
                future.set_result(message)
            else:
                log.debug("ack_result for no ack in flight", cmd_id=message.cmd_id)
        elif isinstance(message, wsproto.Confirm):
            self.seqs.confirmed = max(self.seqs.confirmed, message.seq)
            confirm = self._confirms.pop(message.seq, None)
            if confirm is not None and not confirm.done():
                confirm.set_result(message)
        elif isinstance(message, wsproto.ErrorMsg):
            self._on_error(message)
        elif isinstance(message, wsproto.FrameError):
            await self._on_bad_frame(message)
        else:  # a valid message at the wrong time (a second welcome)
            await self._send_error(
                wsproto.ErrorMsg(
                    code=wsproto.ErrorCode.OUT_OF_ORDER,
                    reason=f"{message.type} is only sent once, before anything else",
                )
            )

    def _on_error(self, message: wsproto.ErrorMsg) -> None:
        """The server's error frame: logged, and failing what it refers to (never answered)."""
        log.warning(
            "the server reported an error on the websocket",
            code=str(message.code),
            reason=message.reason,
            ref=message.ref,
        )
        if message.ref is None:
            return
        ack = self._acks.get(message.ref)
        if ack is not None and not ack.done():
            ack.set_exception(ProtocolError(f"ack refused: {message.code}: {message.reason}"))
        if message.ref.isdigit() and (confirm := self._confirms.pop(int(message.ref), None)):
            if message.code in (wsproto.ErrorCode.TOO_LARGE, wsproto.ErrorCode.BAD_FIELD):
                status = 413 if message.code is wsproto.ErrorCode.TOO_LARGE else 400
                error: ServerError = ProtocolError(
                    f"events frame refused: {message.reason}", status=status
                )
            else:
                error = TransientServerError(f"events frame not stored: {message.reason}")
            if not confirm.done():
                confirm.set_exception(error)

    async def _on_bad_frame(self, error: wsproto.FrameError) -> None:
        """Answer a frame we could not take as the protocol says; a malformed command goes to
        the dispatcher (acked ``failed`` when it has an id). Too many bad frames close 1008."""
        log.warning(
            "bad frame from the server",
            code=str(error.code),
            reason=error.reason,
            ref=error.ref,
            type=error.msg_type,
        )
        if error.command is not None:
            via = self.serving.get(error.agent_id) if error.agent_id is not None else None
            if error.agent_id is not None and via is None:
                await self._send_error(
                    wsproto.ErrorMsg(
                        code=wsproto.ErrorCode.BAD_FIELD,
                        reason=f"command.agent_id {error.agent_id} is not served here",
                        ref=error.ref,
                    )
                )
            else:  # acked failed through the registration it came for
                self._queue.put_nowait(_Queued(error.command, via))
        elif error.msg_type in ("ack_result", "confirm") and error.ref is not None:
            self._fail_ref(error.ref, f"unreadable {error.msg_type}: {error.reason}")
        reply = error.reply()
        if reply is not None:
            await self._send_error(reply)
        now = time.monotonic()
        self._bad_frames.append(now)
        while self._bad_frames and self._bad_frames[0] < now - wsproto.BAD_FRAME_WINDOW_S:
            self._bad_frames.popleft()
        if len(self._bad_frames) > wsproto.BAD_FRAME_BURST:
            log.error("too many bad frames from the server; closing the websocket")
            self._closing = True
            await self.ws.close(
                wsproto.CloseCode.POLICY,
                f"more than {wsproto.BAD_FRAME_BURST} bad frames within "
                f"{wsproto.BAD_FRAME_WINDOW_S:g} s",
            )

    def _fail_ref(self, ref: str, reason: str) -> None:
        future: asyncio.Future[Any] | None = self._acks.get(ref)
        if future is None and ref.isdigit():
            future = self._confirms.pop(int(ref), None)
        if future is not None and not future.done():
            future.set_exception(TransientServerError(reason))

    async def _send_error(self, reply: wsproto.ErrorMsg | wsproto.AckResult) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(wsproto.encode_frame(reply))

    def _fail_pending(self, reason: str) -> None:
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(TransientServerError(f"{reason} before the ack_result"))
        for confirm in self._confirms.values():
            if not confirm.done():
                confirm.set_exception(TransientServerError(f"{reason} before the confirm"))
        self._confirms.clear()

    # -- commands ---------------------------------------------------------------------------

    async def _work(self) -> None:
        """The command worker: pending acks first, then each queued command in order (a
        ``_FLUSH`` entry retries acks that failed)."""
        await self._flush_acks()
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if item is _FLUSH:
                if self._ack_failed:
                    await self._flush_acks()
                continue
            assert isinstance(item, _Queued)
            self.health.report("channel")
            self._busy = True
            try:
                await self.dispatcher.handle(item.command, self.ack, via=item.via)
            except ServerError as exc:
                self._ack_failed = True
                log.warning("ack failed; it stays pending and is sent again", error=str(exc))
            except Exception:  # a dispatcher bug must not end the worker
                log.exception("unexpected error handling a pushed command")
            finally:
                self._busy = False

    async def _flush_acks(self) -> None:
        if not self.open:
            return
        self._ack_failed = False
        try:  # an ack names its cmd_id: the server knows which registration's it is
            for via in (None, *self.serving.values()):
                await self.dispatcher.flush_acks(self.ack, via=via)
        except ServerError as exc:
            self._ack_failed = True
            log.warning("pending acks not sent; they are sent again", error=str(exc))
        except Exception:
            log.exception("unexpected error sending pending acks")

    async def ack(self, cmd_id: str, status: AckStatus, pid: int | None, error: str | None) -> None:
        """Send an ``ack`` and wait for its ``ack_result``, as the REST ack: returns on ``ok``,
        raises ConflictError (``conflict``), NotFoundError (``not_found``), ProtocolError 400
        (``invalid``), TransientServerError when the socket is closed or no answer came within
        ``answer_timeout_s``."""
        if not self.open:
            raise TransientServerError("the websocket is closed; the ack stays pending")
        future: asyncio.Future[wsproto.AckResult] = asyncio.get_running_loop().create_future()
        self._acks[cmd_id] = future
        try:
            await self.ws.send(wsproto.encode_frame(wsproto.Ack.make(cmd_id, status, pid, error)))
            result = await asyncio.wait_for(future, self.answer_timeout_s)
        except ConnectionClosed:
            raise TransientServerError("the websocket closed before the ack_result") from None
        except TimeoutError:
            raise TransientServerError(
                f"no ack_result within {self.answer_timeout_s:g} s"
            ) from None
        finally:
            if self._acks.get(cmd_id) is future:
                del self._acks[cmd_id]
        where = f"ack over the websocket: {result.result}"
        detail = result.detail or result.result
        if result.result == "conflict":
            raise ConflictError(where, status=409, detail=detail)
        if result.result == "not_found":
            raise NotFoundError(where, status=404, detail=detail)
        if result.result == "invalid":
            raise ProtocolError(f"{where}: {detail}", status=400, detail=detail)

    # -- events -----------------------------------------------------------------------------

    async def submit_events(self, bodies: list[bytes]) -> asyncio.Future[wsproto.Confirm]:
        """Send one ``events`` frame of ``bodies`` (encoded envelopes, 1 to 500); returns the
        future of its confirm. Raises ProtocolError 413 when the frame would exceed what the
        server takes (the caller then sends the events one by one), TransientServerError when
        the socket is closed."""
        size = sum(len(b) for b in bodies) + len(bodies) + EVENTS_FRAME_OVERHEAD
        if size > self.max_frame_bytes:
            raise ProtocolError(
                f"events frame of {size} bytes; the server takes at most {self.max_frame_bytes}",
                status=413,
            )
        if not self.open:
            raise TransientServerError("the websocket is closed")
        seq = self.seqs.next()
        future: asyncio.Future[wsproto.Confirm] = asyncio.get_running_loop().create_future()
        self._confirms[seq] = future
        try:
            await self.ws.send(wsproto.encode_events(seq, bodies))
        except ConnectionClosed:
            self._confirms.pop(seq, None)
            future.cancel()
            raise TransientServerError("the websocket closed while sending events") from None
        return future

    async def _tick(self) -> None:
        """Last contact, and health reports while the worker is not inside a command (one
        stuck there makes the channel overdue, as a stuck poll would)."""
        ticks = 0
        while True:
            if not self._busy:
                self.health.report("channel", TICK_S)
            contact = getattr(self.ws, "last_contact", 0.0)
            if self.on_contact is not None and contact:
                self.on_contact(contact)
            if self.ws.protocol.state is not State.OPEN and not self._closing:
                sent = self.ws.protocol.close_sent
                why = f"{sent.code}: {sent.reason}" if sent is not None else "closing"
                if self.on_down is not None:
                    self.on_down(f"closing ({why})")
                return
            await asyncio.sleep(TICK_S)
            ticks += 1
            if self._ack_failed and self._queue.empty() and ticks % 8 == 0:
                self._queue.put_nowait(_FLUSH)
