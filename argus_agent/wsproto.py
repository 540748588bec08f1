"""The websocket protocol ``argus-agent.v1``: messages, limits and codes; no I/O.

One connection per agent, ``GET {server}/api/agents/{agent_id}/ws`` with the agent token,
subprotocol :data:`SUBPROTOCOL`. Every message is one JSON object in a text frame, with a
``type`` member choosing its model (see ``docs/protocol.md``, "The websocket protocol"):

- agent → server: :class:`Hello`, :class:`Ack`, :class:`Events`, :class:`ErrorMsg`;
- server → agent: :class:`Welcome`, :class:`CommandMsg`, :class:`AckResult`,
  :class:`Confirm`, :class:`ErrorMsg`.

:func:`decode_frame` turns one received frame into its model, or into a :class:`FrameError`
naming what was wrong (and the message id, cmd_id or seq it refers to where that can be read);
it never raises for anything the other side sends. Commands are decoded by the REST decoder
(:func:`argus_agent.protocol.decode_command`), so both channels give the dispatcher the same
:class:`~argus_agent.protocol.Command` or :class:`~argus_agent.protocol.MalformedCommand`.
:func:`encode_frame` and :func:`encode_events` make frames.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from argus_agent import protocol
from argus_agent.protocol import BATCH_ID_RE, CMD_ID_RE, Command, MalformedCommand

#: The websocket subprotocol (``Sec-WebSocket-Protocol``) naming this version.
SUBPROTOCOL = "argus-agent.v1"
#: The version number carried in ``welcome.protocol``.
PROTOCOL_VERSION = 1
#: The endpoint, relative to the server's base URL.
ENDPOINT = "/api/agents/{agent_id}/ws"

# -- limits -----------------------------------------------------------------------------------

#: The largest frame of any type other than ``events`` and ``command``, in bytes of UTF-8.
MAX_MESSAGE_BYTES = 1024 * 1024
#: The largest ``events`` frame, in bytes, and how many events it may carry (as REST batches).
MAX_EVENTS_FRAME_BYTES = 4 * 1024 * 1024
MAX_EVENTS_PER_FRAME = 500
#: The largest ``command`` frame: the REST decoder's bound on one command, in characters.
MAX_COMMAND_FRAME_CHARS = protocol.MAX_COMMAND_CHARS
#: The transport limit both sides set (``max_size`` of the websocket library): no frame of any
#: type is longer. A longer one is not read at all: the library closes with 1009.
MAX_FRAME_BYTES = MAX_EVENTS_FRAME_BYTES + 64 * 1024
#: The smallest ``welcome.max_message_bytes`` a server may announce.
MIN_MESSAGE_BYTES = 64 * 1024
#: How deeply a frame may nest (the frame object is level 1; an event's ``data`` is level 4).
MAX_FRAME_DEPTH = protocol.MAX_DEPTH + 2
#: The longest integer, in digits.
MAX_INT_DIGITS = protocol.MAX_INT_DIGITS
#: The longest ``reason`` of an error message, and ``error`` of an ack (as the REST ack).
MAX_REASON_CHARS = 1000
MAX_ACK_ERROR_CHARS = 2000
#: The largest sequence number (an SQLite integer).
MAX_SEQ = 2**63 - 1

# -- timing -----------------------------------------------------------------------------------

#: Websocket pings: a peer that does not answer one within ``PING_TIMEOUT_S`` is gone. With a
#: ping at most ``PING_INTERVAL_S`` after a peer hangs, a hung peer is detected within 4 s.
PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 2.0
#: How long a closing side waits for the other's close frame before dropping the TCP link.
CLOSE_TIMEOUT_S = 1.0
#: The server closes (4400) a connection whose ``hello`` has not arrived within this time.
HELLO_TIMEOUT_S = 10.0
#: A peer sending more than this many undecodable frames within the window is closed (1008).
BAD_FRAME_BURST = 100
BAD_FRAME_WINDOW_S = 10.0
#: How many ``events`` frames the reference client keeps unconfirmed at once (pipelining).
MAX_UNCONFIRMED_EVENTS_FRAMES = 8


class CloseCode(IntEnum):
    """Close codes used on the connection; the close reason always says why, readably."""

    NORMAL = 1000  # the agent stops, or the server shuts the session down on purpose
    GOING_AWAY = 1001  # the server shuts down
    POLICY = 1008  # too many bad frames (BAD_FRAME_BURST within BAD_FRAME_WINDOW_S)
    TOO_BIG = 1009  # a frame over MAX_FRAME_BYTES (sent by the websocket library itself)
    INTERNAL = 1011  # the server cannot go on (e.g. could not store an events frame)
    PROTOCOL = 4400  # no hello/welcome in time, a bad one, or a message out of order
    UNAUTHORIZED = 4401  # the token was revoked or rotated while connected
    UNSUPPORTED_VERSION = 4406  # no common subprotocol, or welcome.protocol is not ours
    REPLACED = 4409  # a newer connection of the same agent took over


class ErrorCode(StrEnum):
    """The ``code`` of an error message."""

    BAD_JSON = "bad_json"  # not UTF-8, not JSON, NaN/Infinity, trailing text
    UNKNOWN_TYPE = "unknown_type"  # not an object, no string 'type', or a type not for this side
    BAD_FIELD = "bad_field"  # a member missing, unknown, of the wrong type or out of range
    TOO_LARGE = "too_large"  # over a size limit: bytes, events per frame, depth, digits
    UNSUPPORTED_VERSION = "unsupported_version"  # a protocol version this side does not speak
    UNAUTHORIZED = "unauthorized"  # the token does not (or no longer) allow(s) this
    OUT_OF_ORDER = "out_of_order"  # a valid message at the wrong time (events before welcome)
    INTERNAL = "internal"  # the receiver failed; the message may be sent again


class Direction(StrEnum):
    """Who sends a frame."""

    TO_SERVER = "to_server"  # agent → server
    TO_AGENT = "to_agent"  # server → agent


# -- field types ------------------------------------------------------------------------------

_Int = Annotated[int, Field(strict=True)]
Seq = Annotated[int, Field(strict=True, ge=1, le=MAX_SEQ)]
Pid = Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]
SafeId = Annotated[str, Field(pattern=CMD_ID_RE.pattern)]
BatchId = Annotated[str, Field(pattern=BATCH_ID_RE.pattern)]
Seconds = Annotated[float, Field(strict=True, gt=0, le=3600, allow_inf_nan=False)]
Ref = Annotated[str, Field(min_length=1, max_length=128)]


def _type_required(schema: dict[str, Any]) -> None:
    """``type`` has a default (for building messages) but every frame must carry it."""
    if "type" in schema.get("properties", {}):
        schema["required"] = ["type", *[k for k in schema.get("required", []) if k != "type"]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_type_required)


# -- agent → server ---------------------------------------------------------------------------


class RunningJob(_Message):
    """A job of this agent that has not ended (``JobRecord.state``)."""

    batch_id: BatchId
    pid: Pid | None
    state: Literal["launching", "running", "stopping"]


class Hello(_Message):
    """The agent's first message: who it is and what it already has."""

    type: Literal["hello"] = "hello"
    agent_id: SafeId
    version: str = Field(min_length=1, max_length=64)
    hostname: str = Field(min_length=1, max_length=255)
    capabilities: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(max_length=64)
    running_jobs: list[RunningJob] = Field(max_length=10_000)
    #: The highest events seq the agent knows the server confirmed (None: none yet).
    last_confirmed_seq: Seq | None


class Ack(_Message):
    """The outcome of a command, as the REST ack (``status``, ``pid``, ``error``)."""

    type: Literal["ack"] = "ack"
    cmd_id: SafeId
    status: protocol.AckStatus
    pid: Pid | None = None
    error: str | None = Field(default=None, max_length=MAX_ACK_ERROR_CHARS)

    @classmethod
    def make(
        cls,
        cmd_id: str,
        status: protocol.AckStatus,
        pid: int | None = None,
        error: str | None = None,
    ) -> Ack:
        """An ack built by the REST rules (:func:`protocol.ack_body`: the error trimmed)."""
        return cls(cmd_id=cmd_id, **protocol.ack_body(status, pid, error))

    def rest_body(self) -> dict[str, Any]:
        """The same ack as the body of ``POST …/jobs/{cmd_id}/ack``."""
        return protocol.ack_body(self.status, self.pid, self.error)


class Events(_Message):
    """A batch of event envelopes (schema 1.1, each checked by the server on its own)."""

    type: Literal["events"] = "events"
    #: Strictly increasing per agent, across connections and agent restarts.
    seq: Seq
    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_EVENTS_PER_FRAME)


class ErrorMsg(_Message):
    """An error, either way: what was wrong, readably, and what it refers to."""

    type: Literal["error"] = "error"
    code: ErrorCode
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)
    #: The cmd_id, command id or seq (as text) of the message it refers to, when known.
    ref: Ref | None = None


# -- server → agent ---------------------------------------------------------------------------


class Welcome(_Message):
    """The server's answer to hello: its expectations and what it already holds."""

    type: Literal["welcome"] = "welcome"
    protocol: Literal[1] = PROTOCOL_VERSION
    server_version: str = Field(min_length=1, max_length=64)
    ping_interval_s: Seconds = PING_INTERVAL_S
    ping_timeout_s: Seconds = PING_TIMEOUT_S
    #: The highest events seq the server holds for this agent (None: none).
    confirmed_seq: Seq | None
    #: The largest frame the server accepts from this agent, in bytes.
    max_message_bytes: Annotated[int, Field(strict=True, ge=MIN_MESSAGE_BYTES, le=2**53)] = (
        MAX_EVENTS_FRAME_BYTES
    )


class CommandMsg(_Message):
    """A command pushed by the server: the fields of a REST command, same validation."""

    type: Literal["command"] = "command"
    id: SafeId
    kind: str = Field(min_length=1, max_length=64)
    batch_id: BatchId
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None

    @classmethod
    def from_command(cls, command: Command) -> CommandMsg:
        """The frame pushing a REST command."""
        return cls(**command.model_dump())

    def to_command(self) -> Command:
        """The command as the dispatcher takes it (the same object a poll yields)."""
        return Command.model_validate(self.model_dump(exclude={"type"}))


AckResultKind = Literal["ok", "conflict", "not_found", "invalid"]
#: ``ack_result.result`` and the REST ack status it mirrors.
ACK_RESULT_HTTP_STATUS: dict[str, int] = {
    "ok": 200,
    "conflict": 409,
    "not_found": 404,
    "invalid": 400,
}


class AckResult(_Message):
    """The server's answer to an ack, as the REST status: 200 / 409 / 404 / 400."""

    type: Literal["ack_result"] = "ack_result"
    cmd_id: SafeId
    result: AckResultKind
    detail: str | None = Field(default=None, max_length=MAX_ACK_ERROR_CHARS)

    @property
    def http_status(self) -> int:
        """The REST status this result stands for (to share the REST ack handling)."""
        return ACK_RESULT_HTTP_STATUS[self.result]

    @classmethod
    def from_http_status(cls, cmd_id: str, status: int, detail: str | None = None) -> AckResult:
        """The result for what the REST ack would have answered (other codes: invalid)."""
        result = next((k for k, v in ACK_RESULT_HTTP_STATUS.items() if v == status), "invalid")
        return cls(cmd_id=cmd_id, result=result, detail=_trim(detail, MAX_ACK_ERROR_CHARS))


class EventResult(_Message):
    """What became of one event (as an item of the REST batch answer's ``results``)."""

    event_id: str | None = Field(max_length=128)
    status: Literal["accepted", "rejected", "deduplicated"]
    db_id: _Int | None = None
    error: str | None = Field(default=None, max_length=MAX_ACK_ERROR_CHARS)


class Confirm(_Message):
    """The server holds every event of the frame ``seq`` (and of each frame before it)."""

    type: Literal["confirm"] = "confirm"
    seq: Seq
    accepted: Annotated[int, Field(strict=True, ge=0, le=MAX_EVENTS_PER_FRAME)]
    rejected: Annotated[int, Field(strict=True, ge=0, le=MAX_EVENTS_PER_FRAME)]
    results: list[EventResult] = Field(max_length=MAX_EVENTS_PER_FRAME)

    @classmethod
    def from_rest(cls, seq: int, answer: dict[str, Any]) -> Confirm:
        """The confirm carrying a REST batch answer (``{accepted, rejected, results}``)."""
        return cls(seq=seq, **answer)

    def rest_answer(self) -> dict[str, Any]:
        """The same answer as ``POST /api/events/batch`` gives (for the sender's handling)."""
        return self.model_dump(exclude={"type", "seq"})


AgentMessage = Annotated[Hello | Ack | Events | ErrorMsg, Field(discriminator="type")]
ServerMessage = Annotated[
    Welcome | CommandMsg | AckResult | Confirm | ErrorMsg, Field(discriminator="type")
]
Message = Hello | Ack | Events | ErrorMsg | Welcome | CommandMsg | AckResult | Confirm

_MODELS: dict[Direction, dict[str, type[_Message]]] = {
    Direction.TO_SERVER: {"hello": Hello, "ack": Ack, "events": Events, "error": ErrorMsg},
    Direction.TO_AGENT: {
        "welcome": Welcome,
        "command": CommandMsg,
        "ack_result": AckResult,
        "confirm": Confirm,
        "error": ErrorMsg,
    },
}
#: The member of each type naming what it refers to (an error's ``ref``).
_REF_KEY = {
    "command": "id",
    "ack": "cmd_id",
    "ack_result": "cmd_id",
    "events": "seq",
    "confirm": "seq",
}
_SENDER = {Direction.TO_SERVER: "the agent", Direction.TO_AGENT: "the server"}


# -- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameError:
    """A frame that could not be taken, and why.

    ``msg_type`` is the frame's ``type`` when it could be read, ``ref`` what it refers to
    (cmd_id, command id, or seq as text). For a bad ``command`` frame, ``command`` is the
    :class:`MalformedCommand` the REST decoder makes of it: hand it to the dispatcher, which
    acks it ``failed`` when it has an id.
    """

    code: ErrorCode
    reason: str
    ref: str | None = None
    msg_type: str | None = None
    command: MalformedCommand | None = None

    def to_message(self) -> ErrorMsg:
        """The error message telling the sender."""
        return ErrorMsg(code=self.code, reason=self.reason, ref=self.ref)

    def reply(self) -> ErrorMsg | AckResult | None:
        """What the receiver answers (``docs/protocol.md``): nothing to an ``error`` frame (no
        error ping-pong) nor to a bad command that the dispatcher acks ``failed``; an
        ``ack_result`` ``invalid`` to a bad ack naming its cmd_id (REST's 400); else an error."""
        if self.msg_type == "error":
            return None
        if self.command is not None and self.command.cmd_id is not None:
            return None
        if self.msg_type == "ack" and self.ref is not None:
            return AckResult(cmd_id=self.ref, result="invalid", detail=self.reason)
        return self.to_message()

    @property
    def close_code(self) -> CloseCode | None:
        """The close code when the connection cannot go on (a bad hello or welcome)."""
        if self.code is ErrorCode.UNSUPPORTED_VERSION:
            return CloseCode.UNSUPPORTED_VERSION
        if self.msg_type in ("hello", "welcome"):
            return CloseCode.PROTOCOL
        return None


class _TooLarge(ValueError):
    pass


class _NotJson(ValueError):
    pass


def _bounded_int(digits: str) -> int:
    count = len(digits.lstrip("-"))
    if count > MAX_INT_DIGITS:
        raise _TooLarge(f"an integer of {count} digits; at most {MAX_INT_DIGITS} accepted")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _TooLarge(f"a number out of range ({text[:40]})")
    return value


_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


def decode_frame(
    data: str | bytes | bytearray | memoryview, direction: Direction | str
) -> Message | FrameError:
    """Decode one received frame into its message model, or a :class:`FrameError`.

    ``direction`` is who sent it: :attr:`Direction.TO_SERVER` for a server reading the
    agent's frames, :attr:`Direction.TO_AGENT` for an agent reading the server's. Never
    raises for any ``data`` (a ``direction`` that is neither raises ValueError).
    """
    direction = Direction(direction)
    try:
        return _decode(data, direction)
    except Exception as exc:  # a decoder bug must not take a connection down
        return FrameError(ErrorCode.INTERNAL, f"the decoder failed: {type(exc).__name__}")


def _decode(data: object, direction: Direction) -> Any:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > MAX_FRAME_BYTES:
            return _oversize(len(raw))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return FrameError(ErrorCode.BAD_JSON, f"frame is not UTF-8 (at byte {exc.start})")
        size = len(raw)
    elif isinstance(data, str):
        text = data
        if len(text) > MAX_FRAME_BYTES:
            return _oversize(len(text))
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return FrameError(
                ErrorCode.BAD_JSON,
                f"frame is not valid Unicode (a lone surrogate at character {exc.start})",
            )
        if size > MAX_FRAME_BYTES:
            return _oversize(size)
    else:
        return FrameError(ErrorCode.BAD_JSON, f"a frame is text, not {type(data).__name__}")

    try:
        obj = json.loads(
            text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant
        )
    except _TooLarge as exc:
        return _unparsed(text, direction, ErrorCode.TOO_LARGE, f"frame holds {exc}")
    except _NotJson as exc:
        return _unparsed(text, direction, ErrorCode.BAD_JSON, f"frame is not JSON: {exc}")
    except RecursionError:
        return _unparsed(
            text,
            direction,
            ErrorCode.TOO_LARGE,
            f"frame nests more than {MAX_FRAME_DEPTH} levels deep; at most "
            f"{MAX_FRAME_DEPTH} accepted (MAX_FRAME_DEPTH)",
        )
    except ValueError as exc:
        where = (
            f" ({exc.msg} at character {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        )
        return _unparsed(text, direction, ErrorCode.BAD_JSON, f"frame is not JSON{where}")

    if not isinstance(obj, dict):
        return FrameError(
            ErrorCode.UNKNOWN_TYPE,
            f"a frame is a JSON object with a string 'type', not {_json_kind(obj)}",
        )
    msg_type = obj.get("type")
    if not isinstance(msg_type, str):
        what = "has no 'type'" if "type" not in obj else f"has a 'type' of {_json_kind(msg_type)}"
        return FrameError(ErrorCode.UNKNOWN_TYPE, f"frame {what}; a string is required")
    models = _MODELS[direction]
    if msg_type not in models:
        return _unknown_type(msg_type, direction)
    ref = _ref_of(msg_type, obj)

    if msg_type == "command":
        return _decode_command(obj, text, ref)

    limit, name = (
        (MAX_EVENTS_FRAME_BYTES, "MAX_EVENTS_FRAME_BYTES")
        if msg_type == "events"
        else (MAX_MESSAGE_BYTES, "MAX_MESSAGE_BYTES")
    )
    if size > limit:
        return FrameError(
            ErrorCode.TOO_LARGE,
            f"{msg_type} frame is {size} bytes; at most {limit} accepted ({name})",
            ref,
            msg_type,
        )
    if msg_type == "events" and isinstance(obj.get("events"), list):
        count = len(obj["events"])
        if count > MAX_EVENTS_PER_FRAME:
            return FrameError(
                ErrorCode.TOO_LARGE,
                f"events frame holds {count} events; at most {MAX_EVENTS_PER_FRAME} "
                "accepted (MAX_EVENTS_PER_FRAME)",
                ref,
                msg_type,
            )
    problem = _value_problem(obj, msg_type, check_strings=bool(_SURROGATE_ESCAPE_RE.search(text)))
    if problem is not None:
        code, reason = problem
        return FrameError(code, reason, ref, msg_type)
    try:
        return models[msg_type].model_validate(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = tuple(first["loc"])
        if msg_type == "welcome" and loc == ("protocol",):
            return FrameError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"welcome.protocol is {_shown_value(obj.get('protocol'))}; this side speaks "
                f"protocol {PROTOCOL_VERSION} ({SUBPROTOCOL})",
                ref,
                msg_type,
            )
        return FrameError(
            ErrorCode.BAD_FIELD, _trim(f"{_where(msg_type, loc)}: {first['msg']}"), ref, msg_type
        )


def _decode_command(obj: dict[str, Any], text: str, ref: str | None) -> CommandMsg | FrameError:
    """A command frame, decoded by the REST decoder so that a bad one becomes the same
    MalformedCommand (and is acked ``failed`` when it names an id)."""
    item = {k: v for k, v in obj.items() if k != "type"}
    # The text, as a poll's command is: the same bounds (MAX_COMMAND_CHARS...) and reasons.
    decoded = protocol.decode_command_text(text)
    if isinstance(decoded, MalformedCommand):
        code = ErrorCode.TOO_LARGE if _is_size_reason(decoded.reason) else ErrorCode.BAD_FIELD
        return _command_error(code, decoded, ref)
    unknown = sorted(set(item) - set(CommandMsg.model_fields))
    if unknown:
        bad = MalformedCommand(
            decoded.id,
            f"malformed command: {protocol._shown(unknown[0])}: Extra inputs are not permitted",
            decoded.kind,
            decoded.batch_id,
        )
        return _command_error(ErrorCode.BAD_FIELD, bad, ref)
    try:
        return CommandMsg.model_validate(obj)
    except ValidationError as exc:  # stricter than REST in nothing today; kept for safety
        first = exc.errors(include_url=False)[0]
        bad = MalformedCommand(
            decoded.id,
            _trim(f"malformed command: {_where('', tuple(first['loc']))}: {first['msg']}"),
            decoded.kind,
            decoded.batch_id,
        )
        return _command_error(ErrorCode.BAD_FIELD, bad, ref)


def _command_error(code: ErrorCode, bad: MalformedCommand, ref: str | None) -> FrameError:
    return FrameError(code, _trim(bad.reason), bad.cmd_id or ref, "command", bad)


def _is_size_reason(reason: str) -> bool:
    return "levels deep" in reason or "digits" in reason or "characters long" in reason


def _unparsed(text: str, direction: Direction, code: ErrorCode, reason: str) -> FrameError:
    """The error for a frame that is not JSON (or breaks a bound while parsing), with its type
    and ref read from its top-level members where the text allows."""
    found = _top_level_members(text)
    msg_type = found.get("type") if isinstance(found.get("type"), str) else None
    if msg_type not in _MODELS[direction]:
        msg_type = None
    ref = _ref_of(msg_type, found) if msg_type else None
    if msg_type == "command":
        decoded = protocol.decode_command_text(text)
        if isinstance(decoded, MalformedCommand):
            return _command_error(code, decoded, ref)
    return FrameError(code, _trim(reason), ref, msg_type)


def _top_level_members(text: str) -> dict[str, Any]:
    """The scalar top-level members ``type``, ``id``, ``cmd_id`` and ``seq`` of an object's
    text, read one by one up to where the text stops being JSON (a truncated or otherwise
    broken frame still names what it was)."""
    found: dict[str, Any] = {}
    try:
        j = protocol._skip_ws(text, 0)
        if not text.startswith("{", j):
            return found
        j = protocol._skip_ws(text, j + 1)
        while text.startswith('"', j):
            key_end = protocol._string_end(text, j)
            key = json.loads(text[j:key_end])
            j = protocol._skip_ws(text, key_end)
            if not text.startswith(":", j):
                break
            vstart = protocol._skip_ws(text, j + 1)
            vend, _ = protocol._value_end(text, vstart)
            if key in ("type", "id", "cmd_id", "seq") and vend - vstart <= 200:
                with contextlib.suppress(ValueError, RecursionError):
                    found[key] = json.loads(
                        text[vstart:vend], parse_int=_bounded_int, parse_constant=_no_constant
                    )
            j = protocol._skip_ws(text, vend)
            if not text.startswith(",", j):
                break
            j = protocol._skip_ws(text, j + 1)
    except (ValueError, RecursionError):
        pass
    return found


def _ref_of(msg_type: str, obj: dict[str, Any]) -> str | None:
    """What a message of ``msg_type`` refers to, when its member is usable."""
    key = _REF_KEY.get(msg_type)
    if key is None:
        return None
    value = obj.get(key)
    if key == "seq":
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEQ:
            return str(value)
        return None
    if isinstance(value, str) and CMD_ID_RE.match(value):
        return value
    return None


def _value_problem(obj: Any, msg_type: str, *, check_strings: bool) -> tuple[ErrorCode, str] | None:
    """The first bound a parsed frame breaks (nesting depth; with ``check_strings``, strings
    that are not valid Unicode), with where. Iterative: safe at any nesting."""
    stack: list[tuple[Any, tuple[Any, ...], int]] = [(obj, (), 1)]
    while stack:
        current, path, depth = stack.pop()
        if depth > MAX_FRAME_DEPTH and isinstance(current, dict | list):
            return (
                ErrorCode.TOO_LARGE,
                f"{_where(msg_type, path)}: nests more than {MAX_FRAME_DEPTH} levels deep; at "
                f"most {MAX_FRAME_DEPTH} accepted (MAX_FRAME_DEPTH)",
            )
        if isinstance(current, dict):
            for key, child in current.items():
                if check_strings and not protocol._is_unicode(key):
                    return (
                        ErrorCode.BAD_FIELD,
                        f"{_where(msg_type, path)}: a key is not valid Unicode",
                    )
                if isinstance(child, dict | list) or (check_strings and isinstance(child, str)):
                    stack.append((child, (*path, key), depth + 1))
        elif isinstance(current, list):
            for index, child in enumerate(current):
                if isinstance(child, dict | list) or (check_strings and isinstance(child, str)):
                    stack.append((child, (*path, index), depth + 1))
        elif isinstance(current, str) and not protocol._is_unicode(current):
            return (
                ErrorCode.BAD_FIELD,
                f"{_where(msg_type, path)}: not valid Unicode (a lone surrogate)",
            )
    return None


def _where(msg_type: str, loc: tuple[Any, ...]) -> str:
    """A path such as ``hello.running_jobs[2].pid`` (keys escaped and bounded)."""
    out = msg_type
    for part in loc[:12]:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + protocol._shown(str(part))
    return out or "frame"


def _unknown_type(msg_type: str, direction: Direction) -> FrameError:
    shown = protocol._shown(msg_type)[:64]
    other = Direction.TO_AGENT if direction is Direction.TO_SERVER else Direction.TO_SERVER
    if msg_type in _MODELS[other]:
        reason = f"'{shown}' is sent by {_SENDER[other]}, not by {_SENDER[direction]}"
    else:
        known = ", ".join(_MODELS[direction])
        reason = f"unknown message type '{shown}' (from {_SENDER[direction]}: {known})"
    return FrameError(ErrorCode.UNKNOWN_TYPE, reason)


def _oversize(size: int) -> FrameError:
    return FrameError(
        ErrorCode.TOO_LARGE,
        f"frame is at least {size} bytes; at most {MAX_FRAME_BYTES} accepted (MAX_FRAME_BYTES)",
    )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _shown_value(value: Any) -> str:
    if isinstance(value, bool | int | float) or value is None:
        return _trim(json.dumps(value), 40)
    return _json_kind(value)


def _trim(text: str | None, limit: int = MAX_REASON_CHARS) -> Any:
    if text is None:
        return None
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- encoding ---------------------------------------------------------------------------------


def encode_frame(message: Message) -> str:
    """The text frame of a message (every field written, None as null)."""
    return message.model_dump_json()


def encode_events(seq: int, bodies: list[bytes] | list[str]) -> str:
    """An ``events`` frame made of already encoded envelopes (the outbox's bodies, each one
    JSON object), without decoding them: the fast path for the sender."""
    if not 1 <= len(bodies) <= MAX_EVENTS_PER_FRAME:
        raise ValueError(f"an events frame holds 1 to {MAX_EVENTS_PER_FRAME} events")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"seq must be an integer from 1 to {MAX_SEQ}")
    joined = ",".join(b.decode("utf-8") if isinstance(b, bytes) else b for b in bodies)
    return f'{{"type":"events","seq":{seq},"events":[{joined}]}}'


# -- JSON Schema ------------------------------------------------------------------------------

_ADAPTERS = {
    Direction.TO_SERVER: TypeAdapter(AgentMessage),
    Direction.TO_AGENT: TypeAdapter(ServerMessage),
}
_SCHEMA_TITLES = {
    Direction.TO_SERVER: "argus-agent.v1: a message from the agent to the server",
    Direction.TO_AGENT: "argus-agent.v1: a message from the server to the agent",
}


def json_schema(direction: Direction | str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every message sent in ``direction``."""
    direction = Direction(direction)
    schema = _ADAPTERS[direction].json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:argus-agent:{SUBPROTOCOL}:{direction.value}",
        "title": _SCHEMA_TITLES[direction],
        **schema,
    }


def schema_files() -> dict[str, dict[str, Any]]:
    """The schema file names (``argus-agent schema --out DIR``) and their contents."""
    return {f"{SUBPROTOCOL}.{d.value}.schema.json": json_schema(d) for d in Direction}
