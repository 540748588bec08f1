"""The control socket: how `argus-agent status`, `drain`, `undrain` and `stop` talk to the
running daemon. Owns the protocol, who may use it, and the blocking client functions.

The socket is ``<state_dir>/agent.sock``, mode 0600 inside the 0700 state dir; on top of
that the peer's credentials (``SO_PEERCRED``) are checked: only root and the agent's own uid
are served. Anyone else is refused with a clear error and audited (``control_refused``).

A client sends one line (at most ``MAX_REQUEST`` bytes, within ``READ_TIMEOUT_S``) and gets
one line back:

- ``status`` (the original form, kept): the status document, bare.
- one JSON object ``{"op": OP, ...}``: answered ``{"ok": true, ...}`` or
  ``{"ok": false, "error": "..."}``. Ops and their fields (``REQUESTS``; unknown fields and
  ops are refused, the latter with the list of known ops)::

      {"op": "status"}                                   -> {"ok": true, "status": {...}}
      {"op": "drain", "reason": "new GPUs"}              -> {"ok": true, "drain": {...}, ...}
      {"op": "undrain"}                                  -> {"ok": true, "drain": {...}, ...}
      {"op": "stop", "batch_id": "b-1", "grace_s": 30}   -> {"ok": true, "pid": ..., ...}

What each op does is the daemon's business (``actions.py``): the server only checks the
peer and the request's shape and hands it, with the peer, to the op's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from argus_agent.audit import AuditLog
from argus_agent.blocking import call_in_thread
from argus_agent.drain import MAX_REASON, has_control_chars
from argus_agent.errors import AgentError, StateError
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

SOCKET_NAME = "agent.sock"
#: The longest request line (a drain reason of MAX_REASON characters fits easily).
MAX_REQUEST = 4096
#: How long a client may take to send its request line.
READ_TIMEOUT_S = 5.0
#: How long writing the answer may take (a client that does not read is dropped).
WRITE_TIMEOUT_S = 10.0
#: How long the peer's user name lookup may take (NSS can hang) before its uid is used.
NAME_LOOKUP_S = 2.0
#: The largest answer a client reads (a status document with thousands of jobs fits).
MAX_ANSWER = 64 << 20


# -- requests --------------------------------------------------------------------------------


def _no_control_chars(value: str | None) -> str | None:
    if value is not None and has_control_chars(value):
        raise ValueError("must not contain control characters (newlines, tabs, escapes)")
    return value


class _Request(BaseModel):
    # Strict: "30" is not a number and true is not one either; unknown fields are refused.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StatusRequest(_Request):
    """What the agent is doing (the status document)."""

    op: Literal["status"]


class DrainRequest(_Request):
    """Refuse new reruns from now on, across restarts, until ``undrain``."""

    op: Literal["drain"]
    reason: str | None = Field(default=None, max_length=MAX_REASON)

    _check_reason = field_validator("reason")(_no_control_chars)


class UndrainRequest(_Request):
    """Accept reruns again."""

    op: Literal["undrain"]


class StopRequest(_Request):
    """Stop the job of ``batch_id`` as a server's stop does; ``grace_s`` replaces
    ``jobs.stop_grace_s`` for this stop."""

    op: Literal["stop"]
    batch_id: str = Field(min_length=1, max_length=256)
    grace_s: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)

    _check_batch = field_validator("batch_id")(_no_control_chars)


#: Every op the protocol knows, and the shape of its request.
REQUESTS: dict[str, type[_Request]] = {
    "status": StatusRequest,
    "drain": DrainRequest,
    "undrain": UndrainRequest,
    "stop": StopRequest,
}


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel says (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int
    #: The uid's user name, or ``uid N`` when the user database does not know it.
    user: str


class RequestRefused(Exception):
    """Raised by a handler: the request is refused; the message is the client's error."""


#: Carries out one op for a peer; returns the answer's fields (``ok`` is added).
Handler = Callable[[Any, Peer], Awaitable[dict[str, Any]]]


# -- the server ------------------------------------------------------------------------------


class ControlServer:
    """Serves status snapshots built by ``snapshot()`` and the ops of ``handlers``."""

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], dict[str, Any]],
        handlers: Mapping[str, Handler] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.path = path
        self.snapshot = snapshot
        #: op → handler, for every op but ``status``.
        self.handlers = dict(handlers or {})
        #: Where refused peers are recorded (None: logged only).
        self.audit = audit
        # The names of the users who may connect, looked up once, not per request.
        self._names = {uid: _user_name(uid) for uid in (0, os.geteuid())}
        self._server: asyncio.base_events.Server | None = None

    @property
    def known_ops(self) -> list[str]:
        """The ops this server answers."""
        return sorted({"status", *self.handlers} & set(REQUESTS))

    async def start(self) -> None:
        """Bind the socket (replacing a stale one). Raises StateError when it cannot."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        try:
            old_umask = os.umask(0o077)
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, path=str(self.path), limit=MAX_REQUEST
                )
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot create the control socket: {exc}") from None

    async def close(self) -> None:
        """Stop serving and remove the socket; idempotent."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = await self._peer(writer)
            allowed = peer is not None and peer.uid in (0, os.geteuid())
            # The request is read before a refusal is sent: closing a unix socket with unread
            # data resets it, and the client would see ECONNRESET instead of the reason.
            line: bytes | None
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            except ValueError:  # longer than the stream's limit, MAX_REQUEST
                line = None
            except TimeoutError:
                if allowed:
                    return  # a client that never asks gets no answer
                line = b""  # one that may not ask is refused (and audited) all the same
            if peer is None or not allowed:
                answer: dict[str, Any] = self._refuse_peer(peer, line)
            elif line is None:
                answer = _error(
                    f"request too long: expected one line of at most {MAX_REQUEST} bytes"
                )
            else:
                answer = await self._answer(line, peer)
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _refuse_peer(self, peer: Peer | None, line: bytes | None) -> dict[str, Any]:
        op = _op_of(line)
        if peer is None:
            log.warning("control socket: peer credentials unavailable; refused", op=op)
            return _error("permission denied: the agent cannot tell who is asking")
        me = self._names[os.geteuid()]
        log.warning(
            "control socket: request from a user who is neither root nor the agent's user; refused",
            peer_user=peer.user,
            peer_uid=peer.uid,
            peer_pid=peer.pid,
            op=op,
        )
        if self.audit is not None:
            self.audit.record(
                "control_refused", op=op, peer_user=peer.user, peer_uid=peer.uid, peer_pid=peer.pid
            )
        return _error(
            f"permission denied: {peer.user} (uid {peer.uid}) may not control this agent; "
            f"only root and {me} (the agent's user) may"
        )

    async def _peer(self, writer: asyncio.StreamWriter) -> Peer | None:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None  # refused: nobody unknown is served
        pid, uid, gid = struct.unpack("3i", creds)
        name = self._names.get(uid)
        if name is None:
            try:
                name = await call_in_thread(lambda: _user_name(uid), NAME_LOOKUP_S)
            except TimeoutError:
                name = f"uid {uid}"
        return Peer(pid, uid, gid, name)

    async def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        text = line.decode(errors="replace").strip()
        if text == "status":
            return self._status(bare=True)  # the original plain form: the bare document
        if not text.startswith("{"):
            return _error(
                f"unknown request {text[:40]!r}; expected 'status' or one JSON object "
                f'{{"op": ...}} with op one of {", ".join(self.known_ops)}'
            )
        try:
            body = json.loads(text)
        except ValueError as exc:
            return _error(f"request is not valid JSON: {exc}")
        except RecursionError:
            return _error("request is not valid JSON: nested too deeply")
        op = body.get("op") if isinstance(body, dict) else None
        if not isinstance(op, str) or op not in self.known_ops:
            shown = repr(op[:40]) if isinstance(op, str) else "missing"
            return _error(f"unknown op {shown}; known ops: {', '.join(self.known_ops)}")
        try:
            request = REQUESTS[op].model_validate(body)
        except ValidationError as exc:
            return _error(f"{op}: {_first_problem(exc)}")
        if op == "status":
            return self._status(bare=False)
        try:
            return {"ok": True, **await self.handlers[op](request, peer)}
        except RequestRefused as exc:
            return _error(str(exc))
        except Exception as exc:  # a bug costs this request, never the daemon
            log.exception("control socket: request failed", op=op)
            return _error(f"agent error: {type(exc).__name__}: {exc}")

    def _status(self, *, bare: bool) -> dict[str, Any]:
        try:
            document = self.snapshot()
        except Exception as exc:
            log.exception("control socket: building the status failed")
            return _error(f"agent error: {type(exc).__name__}: {exc}")
        return document if bare else {"ok": True, "status": document}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _op_of(line: bytes | None) -> str | None:
    """What a (refused) request asked for, for the log: its op or its first word, short."""
    if not line:
        return None
    text = line.decode(errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError, RecursionError):
        op = json.loads(text).get("op")
        return op[:40] if isinstance(op, str) else None
    return text[:40].split(" ")[0] or None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# -- the client (blocking, for the CLI) -----------------------------------------------------


class AgentNotAnswering(StateError):
    """No agent answers on the control socket (none running, or it does not answer)."""

    exit_code = 2


class ControlRefused(AgentError):
    """The agent answered and refused the request; the message is its reason."""

    exit_code = 1


def _exchange(path: Path, line: bytes, timeout: float) -> Any:
    """Send one request line, read the one-line answer, parse it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(line)
            chunks: list[bytes] = []
            size = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise StateError(
                        f"{path}: the agent's answer is larger than {MAX_ANSWER} bytes"
                    )
    except (FileNotFoundError, ConnectionRefusedError):
        raise AgentNotAnswering(f"no agent is running (nothing answers on {path})") from None
    except TimeoutError:
        raise AgentNotAnswering(f"{path}: the agent did not answer within {timeout:g} s") from None
    except PermissionError as exc:
        raise AgentNotAnswering(
            f"{path}: cannot reach the agent: {exc.strerror} (run as root or as the agent's user)"
        ) from None
    except OSError as exc:
        raise AgentNotAnswering(f"{path}: cannot reach the agent: {exc}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise StateError(f"{path}: the agent's answer is not JSON") from None


def query_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running daemon for its status document (blocking). Raises AgentNotAnswering
    (a StateError) when none answers, ControlRefused when it refuses (another user)."""
    answer = _exchange(path, b"status\n", timeout)
    if not isinstance(answer, dict):
        raise StateError(f"{path}: the agent's answer is not a status document")
    if answer.get("ok") is False:
        raise ControlRefused(str(answer.get("error")))
    return answer


def request(path: Path, op: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
    """Send ``{"op": op, **fields}`` (None fields left out) and return the agent's answer
    when it is ``ok`` (blocking). Raises AgentNotAnswering when no agent answers,
    ControlRefused with the agent's reason when it refuses."""
    body = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
    # UTF-8 as is: escaped, one emoji takes 12 bytes and a MAX_REASON reason would not fit.
    line = json.dumps(body, ensure_ascii=False).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        raise ControlRefused(f"request too long: at most {MAX_REQUEST} bytes")
    answer = _exchange(path, line, timeout)
    if not isinstance(answer, dict):
        raise StateError(f"{path}: the agent's answer is not a JSON object")
    if "ok" not in answer:  # an agent from before ops existed answers {"error": ...}
        raise ControlRefused(
            f"the running agent does not know {op!r} ({answer.get('error')}); it is an older "
            "version: restart it (running jobs keep running)"
        )
    if not answer["ok"]:
        raise ControlRefused(str(answer.get("error") or "refused"))
    return answer


def request_drain(path: Path, reason: str | None = None) -> dict[str, Any]:
    """Ask the agent to drain (``drain`` op); its answer."""
    return request(path, "drain", reason=reason)


def request_undrain(path: Path) -> dict[str, Any]:
    """Ask the agent to accept reruns again (``undrain`` op); its answer."""
    return request(path, "undrain")


def request_stop(path: Path, batch_id: str, grace_s: float | None = None) -> dict[str, Any]:
    """Ask the agent to stop the job of ``batch_id`` (``stop`` op); its answer."""
    return request(path, "stop", batch_id=batch_id, grace_s=grace_s)
