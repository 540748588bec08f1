"""The websocket endpoint ``GET /api/agents/{agent_id}/ws`` (protocol ``argus-agent.v1``).

Owns the reference server's side of the protocol in ``docs/protocol.md`` ("The websocket
protocol"); the messages, limits and codes are :mod:`argus_agent.wsproto`'s:

- the upgrade: the agent token checked as on the REST agent routes, every refusal an HTTP 401
  denial (never 403/404, which mean "no endpoint"); a request not offering the subprotocol
  this server speaks is accepted without one and closed 4406 with a readable reason;
- the handshake: ``hello`` within ``hello_timeout_s`` (else 4400), answered by ``welcome``
  with the agent's persisted ``confirmed_seq``;
- the session: every pending command pushed after welcome, then each new one the moment its
  transaction commits (:class:`WsHub` listens to :attr:`Store.command_listeners`, from any
  thread); ``ack`` frames through :func:`executor.ack_command` (one queue for both
  channels); ``events`` frames parsed and checked (by the frame worker when the server runs
  one, :mod:`.frameworker`, up to 4 frames ahead of the one being stored, :mod:`.readahead`)
  and stored with the confirmed seq in one transaction (:mod:`.wsevents`); frames answered in
  the order they came; bad frames answered per :meth:`FrameError.reply`, more than
  ``bad_frame_burst`` of them within ``bad_frame_window_s`` closed 1008;
- liveness: the agent's last_seen is bumped on connect, on each frame and on every push
  check (at least every ``recheck_s``, 2 s; uvicorn drops a connection whose pong is late);
- :class:`~.wsoptions.WsOptions` (switches: no endpoint at all, another subprotocol) and
  :class:`~.wsoptions.WsFaults` (test faults: refuse upgrades, drop a connection after N
  frames), in ``wsoptions.py``.

Sequence numbers: an ``events`` frame is always stored (event_id de-duplication makes a
resent frame safe: its events come back ``deduplicated``) and confirmed with its own seq; the
stored ``confirmed_seq`` only grows, so a frame whose seq is not above it (a resend, or an
agent that lost its state) is stored and confirmed without lowering it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
import logging
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from argus_agent import __version__, wsproto
from argus_agent.wsproto import CloseCode, ErrorCode, FrameError

from . import executor, wsevents, wsframes
from .frameworker import FrameWorker, WorkerGone
from .readahead import read_ahead
from .store import ApiError, Store
from .wsoptions import WsFaults, WsOptions

_log = logging.getLogger(__name__)

#: The longest close reason a websocket close frame carries, in bytes of UTF-8.
_MAX_CLOSE_REASON_BYTES = 123
#: At most one last_seen bump per this many seconds for frames that write nothing else.
_TOUCH_EVERY_S = 0.5
_GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)
#: Frames read ahead of the one being handled: enough to keep a frame worker busy while a
#: frame is stored, few enough that a flood waits in TCP, not in this process.
_FRAMES_AHEAD = 4

#: Set in the ASGI task of an upgrade this endpoint refused with an HTTP denial.
_denied: contextvars.ContextVar[bool] = contextvars.ContextVar("ws_denied", default=False)


class _DenialNoiseFilter(logging.Filter):
    """uvicorn's websockets-sansio protocol logs "ASGI callable returned without completing
    handshake" at ERROR after every denial response (it never marks a denied handshake
    complete); drop that one record, in the task of a denial only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_denied.get() and "without completing handshake" in str(record.msg))


_DENIAL_FILTER = _DenialNoiseFilter()


def close_reason(text: str) -> str:
    """*text* cut to what a close frame carries (123 bytes of UTF-8)."""
    raw = text.encode("utf-8")
    if len(raw) <= _MAX_CLOSE_REASON_BYTES:
        return text
    return raw[: _MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


class WsHub:
    """The connected agents of one app, and the wake-up when a command is queued for one.

    Lives on the uvicorn loop; :meth:`notify` (a :attr:`Store.command_listeners` entry) and
    :meth:`connected` may be called from any thread.
    """

    def __init__(self, store: Store, options: WsOptions, faults: WsFaults) -> None:
        self.store = store
        self.options = options
        self.faults = faults
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Parses events frames for every session when set (the server's runner starts it).
        self.frame_worker: FrameWorker | None = None
        self._sessions: dict[str, _Session] = {}  # agent_id -> the session that said hello
        self._served: dict[str, _Session] = {}  # a served name's agent_id -> its session
        self._live: set[_Session] = set()  # every accepted connection, hello or not
        store.command_listeners.append(self.notify)

    # -- any thread ----------------------------------------------------------------------------

    def notify(self, agent_id: str) -> None:
        """A command for *agent_id* was committed: wake its session's push (thread-safe)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
            loop.call_soon_threadsafe(self._wake, agent_id)

    def connected(self, agent_id: str) -> bool:
        """Whether *agent_id* has a websocket session past hello (its own, or one that
        serves it)."""
        return agent_id in self._sessions or agent_id in self._served

    def status(self, agent_id: str) -> dict[str, Any]:
        """The dev listing's websocket fields of *agent_id*."""
        session = self._sessions.get(agent_id)
        hello = session.hello if session is not None else None
        return {
            "ws_connected": session is not None or agent_id in self._served,
            "ws_running_jobs": (
                [job.model_dump() for job in hello.running_jobs] if hello is not None else None
            ),
        }

    def close_all_threadsafe(self, code: int, reason: str, timeout: float = 2.0) -> None:
        """Close every connection with *code* from another thread (server shutdown: 1001)."""
        loop = self.loop
        if loop is None or loop.is_closed() or not self._live:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.close_all(code, reason), loop).result(timeout)

    # -- the loop ------------------------------------------------------------------------------

    def _wake(self, agent_id: str) -> None:
        session = self._sessions.get(agent_id) or self._served.get(agent_id)
        if session is not None:
            session.wake.set()

    async def close_all(self, code: int, reason: str) -> None:
        """Close every connection with *code*."""
        await asyncio.gather(*(s.close(code, reason) for s in list(self._live)))

    def _register(self, session: _Session) -> _Session | None:
        old = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        return old if old is not session else None

    def _unregister(self, session: _Session) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
        for agent_id in session.serving:
            if self._served.get(agent_id) is session:
                del self._served[agent_id]

    def _serve(self, session: _Session) -> None:
        """Route the commands of the session's served names to it. The newest wins: an
        older session that served one of them stops pushing its commands."""
        for agent_id in session.serving:
            old = self._served.get(agent_id)
            if old is not None and old is not session:
                old.serving.pop(agent_id, None)
            self._served[agent_id] = session

    def _unserve(self, session: _Session, agent_id: str) -> None:
        """The session no longer serves *agent_id* (its token was rotated or revoked)."""
        session.serving.pop(agent_id, None)
        if self._served.get(agent_id) is session:
            del self._served[agent_id]

    async def endpoint(self, websocket: WebSocket) -> None:
        """The ASGI websocket route: refuse, or accept and run a session to its end."""
        self.loop = asyncio.get_running_loop()
        uvicorn_log = logging.getLogger("uvicorn.error")
        if _DENIAL_FILTER not in uvicorn_log.filters:
            uvicorn_log.addFilter(_DENIAL_FILTER)
        agent_id = str(websocket.path_params.get("agent_id", ""))
        rejected = self.faults.take_reject()
        if rejected is not None:
            status, detail = rejected
            _denied.set(True)
            await websocket.send_denial_response(
                JSONResponse({"detail": detail or "injected fault"}, status_code=status)
            )
            return
        authorization = websocket.headers.get("authorization")
        try:
            # Local import: app imports this module.
            from .app import authenticate_agent

            agent = authenticate_agent(self.store, authorization, agent_id)
        except ApiError as exc:
            _log.info("websocket of %s refused: %s", agent_id[:64], exc.detail)
            _denied.set(True)
            await websocket.send_denial_response(
                JSONResponse(
                    {"detail": exc.detail},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
            return
        offered = list(websocket.scope.get("subprotocols") or [])
        if self.options.subprotocol not in offered:
            shown = ", ".join(repr(p[:40]) for p in offered[:4]) or "none"
            reason = f"unsupported protocol {shown}; this server speaks {self.options.subprotocol}"
            _log.warning("websocket of %s closed 4406: %s", agent_id, reason)
            await websocket.accept()
            with contextlib.suppress(*_GONE):
                await websocket.close(CloseCode.UNSUPPORTED_VERSION, close_reason(reason))
            return
        await websocket.accept(subprotocol=self.options.subprotocol)
        token = (authorization or "")[7:].strip()
        session = _Session(self, websocket, agent, token)
        self._live.add(session)
        try:
            await session.run()
        finally:
            self._live.discard(session)
            self._unregister(session)


class _Session:
    """One accepted connection of one agent."""

    def __init__(self, hub: WsHub, ws: WebSocket, agent: dict[str, Any], token: str) -> None:
        self.hub = hub
        self.store = hub.store
        self.options = hub.options
        self.ws = ws
        self.agent_id: str = agent["id"]
        self.owner_id: int = int(agent["owner_id"])
        self.token = token
        self.hello: wsproto.Hello | None = None
        self.wake = asyncio.Event()
        self.closed = False
        self.pushed: set[str] = set()  # command ids pushed on this connection
        #: hello's served names this connection may serve: agent id -> host name.
        self.serving: dict[str, str] = {}
        #: Their tokens, checked again with the connection's own (rotated: not served).
        self.served_tokens: dict[str, str] = {}
        self._send_lock = asyncio.Lock()
        self._bad: collections.deque[float] = collections.deque()
        self._touched = 0.0
        self._frames = 0
        self._drop_after: int | None = None

    # -- sending -------------------------------------------------------------------------------

    async def send(self, message: wsproto.Message | dict[str, Any] | str) -> None:
        """Send one frame; a connection already gone or closing swallows it."""
        if isinstance(message, str):
            text = message
        elif isinstance(message, dict):
            text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        else:
            text = wsproto.encode_frame(message)
        async with self._send_lock:
            if self.closed:
                return
            try:
                await self.ws.send_text(text)
            except _GONE:
                self.closed = True

    async def close(self, code: int, reason: str) -> None:
        """Close with *code* and a readable *reason* (once; later calls do nothing)."""
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(*_GONE, RuntimeError):
                await self.ws.close(code, close_reason(reason))

    async def _error(self, code: ErrorCode, reason: str, ref: str | None = None) -> None:
        await self.send(wsproto.ErrorMsg(code=code, reason=wsframes.trim(reason, 1000), ref=ref))

    # -- the session ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Handshake, then serve frames and push commands until either side ends it."""
        pusher: asyncio.Task[None] | None = None
        try:
            if not await self._handshake():
                return
            pusher = asyncio.create_task(self._push_loop(), name=f"ws-push-{self.agent_id}")
            await self._receive_loop()
        except _GONE:
            pass
        except Exception:  # a bug here must end this connection only, never the server
            _log.exception("websocket session of %s failed", self.agent_id)
            await self.close(CloseCode.INTERNAL, "the server failed; reconnect")
        finally:
            self.closed = True
            if pusher is not None:
                pusher.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_GONE):
                    await pusher

    async def _receive(self) -> dict[str, Any] | None:
        """The next frame's ASGI message, or None when the connection ended."""
        message = await self.ws.receive()
        return None if message["type"] == "websocket.disconnect" else message

    async def _handshake(self) -> bool:
        try:
            message = await asyncio.wait_for(self._receive(), self.options.hello_timeout_s)
        except TimeoutError:
            await self.close(
                CloseCode.PROTOCOL, f"no hello within {self.options.hello_timeout_s:g} s"
            )
            return False
        if message is None:
            return False
        decoded = wsframes.decode(message)
        if isinstance(decoded, FrameError):
            reply = decoded.reply()
            if reply is not None:
                await self.send(reply)
            await self.close(
                CloseCode.PROTOCOL, f"the first frame must be a valid hello ({decoded.code})"
            )
            return False
        if not isinstance(decoded, wsproto.Hello):
            if not isinstance(decoded, wsproto.ErrorMsg):
                await self._error(
                    ErrorCode.OUT_OF_ORDER,
                    f"'{decoded.type}' before hello; the first frame is hello",
                )
            await self.close(CloseCode.PROTOCOL, f"'{decoded.type}' before hello")
            return False
        if decoded.agent_id != self.agent_id:
            await self._error(
                ErrorCode.BAD_FIELD, "hello.agent_id is not the agent of the path and the token"
            )
            await self.close(CloseCode.PROTOCOL, "hello for another agent")
            return False
        self.hello = decoded
        with self.store.tx() as db:
            self.store.touch_agent(db, self.agent_id)
            confirmed = Store.confirmed_seq(db, self.agent_id)
        self._touched = time.monotonic()
        if decoded.last_confirmed_seq is not None and decoded.last_confirmed_seq > (confirmed or 0):
            _log.info(
                "agent %s saw seq %d confirmed; this server holds %s (its data was reset?)",
                self.agent_id,
                decoded.last_confirmed_seq,
                confirmed,
            )
        if decoded.serves:
            self.served_tokens = {n.agent_id: n.token for n in decoded.serves}
            self.serving, refused = executor.served_agents(
                self.store,
                self.owner_id,
                self.agent_id,
                [(n.agent_id, n.hostname, n.token) for n in decoded.serves],
            )
            executor.touch_agents(self.store, list(self.serving))
            if refused:
                _log.info(
                    "agent %s may not serve %d announced name(s), e.g. %s",
                    self.agent_id,
                    len(refused),
                    next(iter(refused.items())),
                )
        old = self.hub._register(self)
        if old is not None:
            await old.close(
                CloseCode.REPLACED, "a newer connection of this agent replaced this one"
            )
        self.hub._serve(self)
        welcome = wsproto.Welcome(
            server_version=f"argus-agent-devserver {__version__}"[:64],
            ping_interval_s=float(self.options.ping_interval_s),
            ping_timeout_s=float(self.options.ping_timeout_s),
            confirmed_seq=confirmed,
            serving=sorted(self.serving),
        )
        extra = self.hub.faults.welcome_extra
        await self.send({**welcome.model_dump(), **extra} if extra else welcome)
        self._drop_after = self.hub.faults.take_drop()
        _log.info("agent %s connected over websocket (confirmed_seq %s)", self.agent_id, confirmed)
        return not self.closed

    async def _receive_loop(self) -> None:
        """Frames answered in order; with a frame worker, an events frame goes to the worker
        as it is read, so the worker parses the next frames while this process stores the
        current one (:func:`read_ahead`)."""
        await read_ahead(
            self._receive,
            self._ahead,
            self._handle,
            lambda: not self.closed,
            depth=_FRAMES_AHEAD,
            name=f"ws-in-{self.agent_id}",
        )

    def _ahead(self, message: dict[str, Any]) -> asyncio.Future[Any] | None:
        """An events frame's preparation, started in the frame worker; None without one."""
        worker = self.hub.frame_worker
        text = message.get("text")
        if worker is None or not worker.alive or not wsframes.looks_like_events(text):
            return None
        return asyncio.ensure_future(worker.prepare(str(text)))

    async def _decode(
        self, message: dict[str, Any], ahead: asyncio.Future[Any] | None
    ) -> wsframes.PreparedFrame | wsproto.Message | FrameError:
        """The frame prepared (a well-formed events frame: by the worker, or here when there
        is none or it is gone), else decoded by the protocol's decoder for its exact answer."""
        text = message.get("text")
        if ahead is not None:
            try:
                prepared = await ahead
            except WorkerGone:
                prepared = wsframes.prepare_frame(str(text))
        else:
            prepared = wsframes.prepare_frame(text) if text is not None else None
        return prepared if prepared is not None else wsframes.decode(message)

    async def _handle(self, message: dict[str, Any], ahead: asyncio.Future[Any] | None) -> bool:
        """Answer one frame; False when the session is over."""
        self._frames += 1
        drop = self._drop_after is not None and self._frames >= self._drop_after
        decoded = await self._decode(message, ahead)
        answer: wsproto.Message | None = None
        if isinstance(decoded, FrameError):
            if await self._bad_frame(decoded, answer=not drop):
                return False
        elif isinstance(decoded, wsproto.Hello):
            await self._error(ErrorCode.OUT_OF_ORDER, "a second hello on one connection")
            await self.close(CloseCode.PROTOCOL, "a second hello")
            return False
        elif isinstance(decoded, wsproto.Ack):
            answer = self._ack(decoded)
        elif isinstance(decoded, wsproto.Events | wsframes.PreparedFrame):
            answer = wsevents.store_frame(self.store, self.agent_id, self.owner_id, decoded)
            if answer is None:
                await self._error(
                    ErrorCode.INTERNAL, "the server could not store this frame", str(decoded.seq)
                )
                await self.close(CloseCode.INTERNAL, "could not store events; reconnect")
                return False
            self._touched = time.monotonic()
        elif isinstance(decoded, wsproto.ErrorMsg):
            _log.debug("agent %s reported %s: %s", self.agent_id, decoded.code, decoded.reason)
        if not isinstance(decoded, wsproto.Ack | wsproto.Events | wsframes.PreparedFrame):
            self._touch()
        if drop:
            _log.info("fault: dropping %s after %d frames", self.agent_id, self._frames)
            await self.close(
                CloseCode.INTERNAL, f"fault injected: dropped after {self._frames} frames"
            )
            return False
        if answer is not None:
            await self.send(answer)
        return not self.closed

    async def _bad_frame(self, error: FrameError, *, answer: bool) -> bool:
        """Answer a frame that did not decode; True when the burst limit closed the
        connection."""
        now = time.monotonic()
        self._bad.append(now)
        while self._bad and now - self._bad[0] > self.options.bad_frame_window_s:
            self._bad.popleft()
        reply = error.reply()
        if reply is not None and answer:
            await self.send(reply)
        if len(self._bad) > self.options.bad_frame_burst:
            _log.warning("agent %s sent too many bad frames; closing 1008", self.agent_id)
            await self.close(
                CloseCode.POLICY,
                f"more than {self.options.bad_frame_burst} bad frames within "
                f"{self.options.bad_frame_window_s:g} s",
            )
            return True
        return False

    def _touch(self) -> None:
        now = time.monotonic()
        if now - self._touched >= _TOUCH_EVERY_S:
            self._touched = now
            with self.store.tx() as db:
                self.store.touch_agent(db, self.agent_id)
            executor.touch_agents(self.store, list(self.serving))

    def _ack(self, ack: wsproto.Ack) -> wsproto.AckResult:
        """The REST ack's rules and answers (200/409/404/400 as ok/conflict/not_found/invalid);
        a served name's command is acked as that name's agent."""
        try:
            executor.ack_command(
                self.store,
                self.agent_id,
                ack.cmd_id,
                ack.status,
                ack.pid,
                ack.error,
                serving=self.serving,
            )
        except ApiError as exc:
            self._touch()
            return wsproto.AckResult.from_http_status(ack.cmd_id, exc.status_code, str(exc.detail))
        self._touched = time.monotonic()
        return wsproto.AckResult(cmd_id=ack.cmd_id, result="ok")

    async def _push_loop(self) -> None:
        """Push every pending command not yet pushed on this connection, then wait for the
        next one; every ``recheck_s`` without one, re-check (and check the token)."""
        try:
            await self._push_until_closed()
        except asyncio.CancelledError:
            raise
        except _GONE:
            self.closed = True
        except Exception:  # e.g. the database failed: end this connection, not the server
            _log.exception("websocket push to %s failed", self.agent_id)
            await self.close(CloseCode.INTERNAL, "the server failed; reconnect")

    async def _push_until_closed(self) -> None:
        while not self.closed:
            self.wake.clear()
            for agent_id in (self.agent_id, *self.serving):
                for item in executor.push_commands(self.store, agent_id, self.pushed):
                    self.pushed.add(item["id"])
                    served = {"agent_id": agent_id} if agent_id != self.agent_id else {}
                    await self.send({"type": "command", **item, **served})
            self._touched = time.monotonic()
            try:
                await asyncio.wait_for(self.wake.wait(), self.options.recheck_s)
            except TimeoutError:
                for served_id in list(self.serving):
                    holder = self.store.agent_for_token(self.served_tokens.get(served_id, ""))
                    if holder is None or holder["id"] != served_id:
                        _log.info("agent %s no longer serves %s (token)", self.agent_id, served_id)
                        self.hub._unserve(self, served_id)
                agent = self.store.agent_for_token(self.token)
                if agent is None or agent["id"] != self.agent_id:
                    await self._error(
                        ErrorCode.UNAUTHORIZED, "the agent token was rotated or revoked"
                    )
                    await self.close(
                        CloseCode.UNAUTHORIZED, "the agent token was rotated or revoked"
                    )
                    return
