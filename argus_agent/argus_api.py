"""The REST client for the Argus server's agent and event endpoints (httpx, async).

Owns HTTP and turns every answer into a value or one of the ``errors.ServerError`` classes;
whether and when to retry is the caller's decision (``backoff.classify``). After a connection
error, a timeout or a 5xx the underlying connection pool is dropped, because Argus v0.3.0 may
close a keep-alive connection after a 500: the next request starts on a fresh connection.
Tokens travel only in the Authorization header and never appear in an exception message.

Every request has an overall deadline, ``timeout_s`` (``server.timeout_s``): connecting,
sending, waiting and reading the whole answer must fit in it. httpx's own timeouts bound each
socket operation only, so a server or proxy that answers one byte a second would otherwise
keep a poll pending for ever. A request past its deadline is a ``TransientServerError``
("timed out after N s"), retried like any other transient failure.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from argus_agent import __version__
from argus_agent.errors import (
    AgentTokenRejectedError,
    AuthError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TransientServerError,
)
from argus_agent.protocol import AckStatus, RegisterResult, ack_body

MAX_RETRY_AFTER_S = 3600.0
#: The largest answer read from the server (a poll of many commands stays far below it).
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class ArgusClient:
    """An async client for one Argus server. Not shared between event loops.

    Every method blocks only its coroutine, for at most ``timeout_s`` seconds in all (the
    request's overall deadline); each raises a ``ServerError`` subclass on failure.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s: expected a positive number of seconds, not {timeout_s}")
        self.base_url = base_url.rstrip("/")
        #: The overall deadline of one request, in seconds.
        self.deadline_s = timeout_s
        self._timeout = httpx.Timeout(timeout_s)
        self._client: httpx.AsyncClient | None = None
        #: Pools replaced by a fresh one, still open while their requests finish.
        self._retired: set[httpx.AsyncClient] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                headers={"User-Agent": f"argus-agent/{__version__}"},
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close every connection pool, retired ones included; the client can still be used
        (it reconnects)."""
        client, self._client = self._client, None
        pools = [*self._retired, *([client] if client is not None else [])]
        self._retired.clear()
        for pool in pools:
            await pool.aclose()
        for task in self._closing:  # their pools are closed above: nothing left to wait for
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _fresh_connection(self) -> None:
        """Make the next request open a new connection. The old pool is closed once requests
        still in flight on it (e.g. a heartbeat) had their deadline to finish, or at
        ``aclose``, whichever comes first."""
        old, self._client = self._client, None
        if old is None:
            return
        self._retired.add(old)

        async def close_later() -> None:
            await asyncio.sleep(self.deadline_s)
            if old in self._retired:
                self._retired.discard(old)
                await old.aclose()

        task = asyncio.get_running_loop().create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _bounded(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read its answer, at most ``MAX_ANSWER_BYTES`` of it (after
        content decoding): a server that answers without end cannot fill the agent's memory.
        Raises ProtocolError past the limit."""
        response = await self._http().send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise ProtocolError(
                        f"{request.method} {request.url.path}: the answer is larger than "
                        f"{MAX_ANSWER_BYTES // (1 << 20)} MiB"
                    )
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code, headers=response.headers, content=bytes(body), request=request
        )

    async def _request(
        self,
        method: str,
        path: str,
        token: str,
        json: Any | None = None,
        *,
        content: bytes | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(self.deadline_s):
                response = await self._bounded(
                    self._http().build_request(
                        method, path, json=json, content=content, headers=headers
                    )
                )
        except TimeoutError:  # the overall deadline (a trickling or silent server)
            self._fresh_connection()
            raise TransientServerError(
                f"{method} {path}: timed out after {self.deadline_s:g} s"
            ) from None
        except httpx.TimeoutException as exc:
            self._fresh_connection()
            raise TransientServerError(
                f"{method} {path}: timed out after {self.deadline_s:g} s ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            self._fresh_connection()
            raise TransientServerError(f"{method} {path}: {_transport_reason(exc)}") from None
        except httpx.HTTPError as exc:  # e.g. a body that fails to decode
            self._fresh_connection()
            reason = str(exc) or type(exc).__name__
            raise TransientServerError(f"{method} {path}: {reason}") from None
        if response.status_code >= 500:
            self._fresh_connection()
        if response.is_error:
            raise _error_for(method, path, response)
        return response

    async def register(
        self, user_token: str, hostname: str, capabilities: list[str]
    ) -> RegisterResult:
        """Register this host; the server rotates the token of an existing (hostname, user)."""
        body = {"hostname": hostname, "version": __version__, "capabilities": capabilities}
        response = await self._request("POST", "/api/agents/register", user_token, body)
        try:
            return RegisterResult.model_validate(_json(response))
        except ValidationError as exc:  # a server's answer we cannot use: its error, no crash
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "answer"
            raise ProtocolError(
                f"POST /api/agents/register: unusable answer ({where}: {first['msg']})"
            ) from None

    async def whoami(self, user_token: str) -> str:
        """The Argus username behind a reporter token (``GET /api/auth/me``)."""
        response = await self._request("GET", "/api/auth/me", user_token)
        body = _json(response)
        if not isinstance(body, dict) or not isinstance(body.get("username"), str):
            raise ProtocolError("GET /api/auth/me: answer has no 'username'")
        return body["username"]

    async def batch(self, user_token: str, batch_id: str) -> dict[str, Any]:
        """The batch document (``GET /api/batches/{id}``). Raises ServerError (404 also
        when the token may not see the batch)."""
        response = await self._request(
            "GET", f"/api/batches/{quote(batch_id, safe='')}", user_token
        )
        body = _json(response)
        if not isinstance(body, dict):
            raise ProtocolError("GET /api/batches/{id}: answer is not an object")
        return body

    async def batch_user(self, user_token: str, batch_id: str) -> str | None:
        """The OS user Argus recorded for a batch (its ``user``; the SDK fills it from
        ``$USER`` and a rerun batch copies its source's). None when the batch records none.
        Raises ServerError (404 also when the token may not see it)."""
        user = (await self.batch(user_token, batch_id)).get("user")
        return user if isinstance(user, str) and user else None

    async def poll(self, agent_id: str, agent_token: str) -> Any:
        """Fetch the pending commands; returns the raw body (bytes), which
        ``protocol.decode_commands`` decodes one command at a time, so that one command the
        JSON decoder chokes on (a huge integer, deep nesting) cannot fail the whole poll."""
        response = await self._request("GET", f"/api/agents/{agent_id}/jobs", agent_token)
        return response.content

    async def ack(
        self,
        agent_id: str,
        agent_token: str,
        cmd_id: str,
        status: AckStatus,
        *,
        pid: int | None = None,
        error: str | None = None,
    ) -> None:
        """Acknowledge one command. Raises ConflictError (409) when it was acked already."""
        await self._request(
            "POST",
            f"/api/agents/{agent_id}/jobs/{cmd_id}/ack",
            agent_token,
            ack_body(status, pid, error),
        )

    async def post_events(self, user_token: str, bodies: list[bytes]) -> dict[str, Any]:
        """``POST /api/events/batch`` with already-encoded events (at most 500); returns the
        answer ``{accepted, rejected, results: [{event_id, status, error}]}``."""
        content = b'{"events":[' + b",".join(bodies) + b"]}"
        response = await self._request("POST", "/api/events/batch", user_token, content=content)
        answer = _json(response)
        if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
            raise ProtocolError("POST /api/events/batch: answer has no 'results' list")
        return answer

    async def heartbeat(self, agent_id: str, agent_token: str, note: str | None = None) -> None:
        """Tell the server this agent is alive."""
        body = {"note": note} if note else None
        await self._request("POST", f"/api/agents/{agent_id}/heartbeat", agent_token, body)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ProtocolError(
            f"{response.request.method} {response.request.url.path}: answer is not JSON",
            status=response.status_code,
        ) from None


def _transport_reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({text})"
    return text


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)[:500]
    return str(body)[:200]


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds, within [0, 1 h].

    A missing or unreadable header means 1 s.
    """
    if not value:
        return 1.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1.0
        seconds = parsed.timestamp() - (now if now is not None else time.time())
    if not math.isfinite(seconds):
        return 1.0
    return max(0.0, min(seconds, MAX_RETRY_AFTER_S))


def _error_for(method: str, path: str, response: httpx.Response) -> ServerError:
    status = response.status_code
    detail = _detail(response)
    where = f"{method} {path}: HTTP {status}: {detail}"
    if status == 429:
        wait = retry_after_seconds(response.headers.get("Retry-After"))
        return RateLimitedError(where, retry_after=wait, detail=detail)
    if status >= 500 or status in (408,):
        return TransientServerError(where, status=status, detail=detail)
    if status == 401 and detail == "agent token unknown":
        return AgentTokenRejectedError(where, status=status, detail=detail)
    if status in (401, 403):
        return AuthError(where, status=status, detail=detail)
    if status == 404:
        return NotFoundError(where, status=status, detail=detail)
    if status == 409:
        return ConflictError(where, status=status, detail=detail)
    return ProtocolError(where, status=status, detail=detail)
