"""Opening a websocket session (protocol ``argus-agent.v1``, ``docs/protocol.md``).

:func:`open_session` connects (``GET {server}/api/agents/{agent_id}/ws`` with the agent token
and the subprotocol), sends ``hello`` and waits for ``welcome``; what keeps it from getting a
session is raised as a :class:`~argus_agent.errors.ServerError`:

- :class:`WebSocketUnavailable` (``kind`` ``no_endpoint`` or ``version``): the server answered
  the upgrade 403/404/405 or any other non-upgrade answer (an unmodified Argus v0.3.0 says
  403), selected no subprotocol or one we did not offer, closed with 4406, or welcomed with a
  protocol other than 1. ``transport = "auto"`` polls instead; the refusal's reason is shown.
- ``AgentTokenRejectedError``/``AuthError`` (401), ``RateLimitedError`` (429),
  ``TransientServerError`` (cannot connect, timeouts, 5xx, a dropped handshake) and
  ``ProtocolError`` (a welcome we cannot read: closed 4400), decided by ``backoff.classify``.

The connection it returns carries the library's keepalive (``PING_INTERVAL_S``,
``PING_TIMEOUT_S``, close timeout ``CLOSE_TIMEOUT_S``) and remembers when the server last
sent anything (the channel's "last contact"). This module runs no tasks of its own; the open
connection is served by ``channels.websocket.WebSocketSession``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidUpgrade,
    NegotiationError,
    WebSocketException,
)
from websockets.typing import Subprotocol

from argus_agent import __version__, wsproto
from argus_agent.argus_api import retry_after_seconds
from argus_agent.errors import (
    AgentTokenRejectedError,
    AuthError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TransientServerError,
)
from argus_agent.logsetup import redact_text

#: How long the server may take to answer ``hello`` with ``welcome``.
WELCOME_TIMEOUT_S = wsproto.HELLO_TIMEOUT_S
#: How long to wait for the server's own close reason after it selected no subprotocol.
REFUSAL_READ_S = 1.0

Unavailable = Literal["no_endpoint", "version"]
#: How a version refusal's reason starts (the rest says who said what).
NO_COMMON_VERSION = "no common protocol version"


class WebSocketUnavailable(ServerError):
    """The server offers no websocket this agent can use: no endpoint (``kind``
    ``no_endpoint``) or no common protocol version (``version``). The message says why."""

    def __init__(self, message: str, *, kind: Unavailable, status: int | None = None) -> None:
        super().__init__(message, status=status, detail=message)
        self.kind = kind


class _Connection(ClientConnection):
    """The library's connection, remembering when the server last sent anything (frames and
    pongs alike): the channel's "last contact"."""

    last_contact: float = 0.0

    def process_event(self, event: Any) -> None:
        self.last_contact = time.time()
        super().process_event(event)


def ws_url(base_url: str, agent_id: str) -> str:
    """``ws(s)://host[:port][/prefix]/api/agents/{agent_id}/ws`` for an ``http(s)`` base URL."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    path = parts.path + wsproto.ENDPOINT.format(agent_id=quote(agent_id, safe=""))
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _status_error(status: int, body: bytes, headers: Any) -> ServerError:
    """What an HTTP answer to the upgrade (instead of 101) means."""
    try:
        parsed = json.loads(body)
        detail = str(parsed.get("detail")) if isinstance(parsed, dict) else body.decode()
    except (ValueError, UnicodeDecodeError):
        detail = body[:200].decode("utf-8", "replace")
    detail = redact_text(detail[:500])
    where = f"websocket upgrade: HTTP {status}" + (f": {detail}" if detail else "")
    if status == 401:
        if detail == "agent token unknown":
            return AgentTokenRejectedError(where, status=status, detail=detail)
        return AuthError(where, status=status, detail=detail)
    if status == 429:
        wait = retry_after_seconds(headers.get("Retry-After"))
        return RateLimitedError(where, retry_after=wait, detail=detail)
    if status >= 500 or status == 408:
        return TransientServerError(where, status=status, detail=detail)
    # 403/404/405 (Starlette answers 403 to a websocket request for an unknown path) and any
    # other non-upgrade answer, 200 included: this server has no websocket for us.
    return WebSocketUnavailable(
        f"the server has no websocket endpoint ({where})", kind="no_endpoint", status=status
    )


def _closed_error(exc: ConnectionClosed, during: str) -> ServerError:
    """What a close before the welcome means."""
    frame = exc.rcvd
    code, reason = (frame.code, frame.reason) if frame is not None else (None, "")
    shown = f"{code}: {reason}" if reason else str(code)
    if code == wsproto.CloseCode.UNSUPPORTED_VERSION:
        return WebSocketUnavailable(
            f"{NO_COMMON_VERSION}: the server closed {shown}", kind="version"
        )
    if code == wsproto.CloseCode.UNAUTHORIZED:
        return AgentTokenRejectedError(
            f"websocket closed {during} (4401: {reason})", status=401, detail=reason
        )
    if code == wsproto.CloseCode.PROTOCOL:
        return ProtocolError(f"the server closed the websocket {during} ({shown})")
    if code is None:
        return TransientServerError(f"the websocket was lost {during}")
    return TransientServerError(f"the server closed the websocket {during} ({shown})")


async def open_session(
    base_url: str,
    agent_id: str,
    agent_token: str,
    hello: wsproto.Hello,
    *,
    open_timeout_s: float,
    compression: bool = False,
) -> tuple[ClientConnection, wsproto.Welcome]:
    """Connect, send ``hello`` and read ``welcome``; returns the open connection and the
    welcome; ``compression`` offers permessage-deflate. Raises a ServerError (see the module
    docstring); on failure nothing stays open.
    Blocks at most ``open_timeout_s`` for the handshake plus ``WELCOME_TIMEOUT_S``."""
    try:
        ws = await connect(
            ws_url(base_url, agent_id),
            subprotocols=[Subprotocol(wsproto.SUBPROTOCOL)],
            additional_headers={"Authorization": f"Bearer {agent_token}"},
            user_agent_header=f"argus-agent/{__version__}",
            compression="deflate" if compression else None,
            open_timeout=open_timeout_s,
            ping_interval=wsproto.PING_INTERVAL_S,
            ping_timeout=wsproto.PING_TIMEOUT_S,
            close_timeout=wsproto.CLOSE_TIMEOUT_S,
            max_size=wsproto.MAX_FRAME_BYTES,
            max_queue=64,
            create_connection=_Connection,
        )
    except InvalidStatus as exc:
        response = exc.response
        raise _status_error(response.status_code, response.body or b"", response.headers) from None
    except NegotiationError as exc:
        raise WebSocketUnavailable(
            f"{NO_COMMON_VERSION}: {exc}; this agent speaks {wsproto.SUBPROTOCOL}", kind="version"
        ) from None
    except InvalidUpgrade as exc:
        raise WebSocketUnavailable(
            f"the server did not upgrade to a websocket ({exc})", kind="no_endpoint"
        ) from None
    except (InvalidHandshake, WebSocketException) as exc:  # e.g. closed in the handshake, a proxy
        raise TransientServerError(f"websocket handshake failed: {exc}") from None
    except (OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise TransientServerError(f"cannot connect the websocket ({reason})") from None
    try:
        welcome = await _handshake(ws, hello)
    except BaseException:
        await abort(ws)
        raise
    return ws, welcome


async def _handshake(ws: ClientConnection, hello: wsproto.Hello) -> wsproto.Welcome:
    """Check the subprotocol, send hello, read welcome (closing 4406/4400 as the protocol
    says when it is not usable)."""
    if ws.subprotocol != wsproto.SUBPROTOCOL:
        ours = f"the server selected no subprotocol; this agent speaks {wsproto.SUBPROTOCOL}"
        theirs = ""
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await asyncio.wait_for(ws.recv(), REFUSAL_READ_S)  # its close reason, if it sends one
        if ws.close_reason:
            theirs = f"the server closed {ws.close_code}: {ws.close_reason}"
        await ws.close(wsproto.CloseCode.UNSUPPORTED_VERSION, ours)
        raise WebSocketUnavailable(f"{NO_COMMON_VERSION}: {theirs or ours}", kind="version")
    try:
        await ws.send(wsproto.encode_frame(hello))
        raw = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT_S)
    except ConnectionClosed as exc:
        raise _closed_error(exc, "before its welcome") from None
    except TimeoutError:
        await ws.close(wsproto.CloseCode.PROTOCOL, f"no welcome within {WELCOME_TIMEOUT_S:g} s")
        raise TransientServerError(f"no welcome within {WELCOME_TIMEOUT_S:g} s") from None
    message = wsproto.decode_frame(raw, wsproto.Direction.TO_AGENT)
    if isinstance(message, wsproto.Welcome):
        return message
    if isinstance(message, wsproto.FrameError):
        if message.code is wsproto.ErrorCode.UNSUPPORTED_VERSION:
            await ws.close(wsproto.CloseCode.UNSUPPORTED_VERSION, _trim_reason(message.reason))
            raise WebSocketUnavailable(f"{NO_COMMON_VERSION}: {message.reason}", kind="version")
        reason = f"bad welcome: {message.reason}"
    elif isinstance(message, wsproto.ErrorMsg):
        reason = f"the server answered hello with an error ({message.code}: {message.reason})"
    else:
        reason = f"expected welcome, got {message.type}"
    await ws.close(wsproto.CloseCode.PROTOCOL, _trim_reason(reason))
    raise ProtocolError(reason)


def _trim_reason(reason: str) -> str:
    """A close reason fits 123 bytes of UTF-8."""
    data = reason.encode("utf-8")
    return reason if len(data) <= 123 else data[:120].decode("utf-8", "ignore") + "..."


async def abort(ws: ClientConnection) -> None:
    """Close the connection, giving up after twice the close timeout; never raises."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), wsproto.CLOSE_TIMEOUT_S * 2)
