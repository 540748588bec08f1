"""The websocket protocol ``argus-agent.v1``: messages, limits and codes; no I/O.

One connection per agent, ``GET {server}/api/agents/{agent_id}/ws`` with the agent token,
subprotocol :data:`SUBPROTOCOL`. Every message is one JSON object in a text frame, with a
``type`` member choosing its model (see ``docs/protocol.md``, "The websocket protocol"):

- agent → server: :class:`Hello`, :class:`Ack`, :class:`Events`, :class:`ErrorMsg`;
- server → agent: :class:`Welcome`, :class:`CommandMsg`, :class:`AckResult`,
  :class:`Confirm`, :class:`ErrorMsg`.

:func:`~argus_agent.wsdecode.decode_frame` (in ``wsdecode``, which owns reading frames the other
side sent) turns one received frame into its model, or into a
:class:`~argus_agent.wsdecode.FrameError` naming what was wrong; it never raises for anything
the other side sends. Both are importable from here too. Commands are decoded by the REST decoder
(:func:`argus_agent.protocol.decode_command`), so both channels give the dispatcher the same
:class:`~argus_agent.protocol.Command` or :class:`~argus_agent.protocol.MalformedCommand`.
:func:`encode_frame` and :func:`encode_events` make frames.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from argus_agent import protocol
from argus_agent.protocol import BATCH_ID_RE, CMD_ID_RE, Command

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


def _empty(value: Any) -> bool:
    """Optional fields are left out of a frame when empty (a v1 peer that predates them
    then sees the frame it knows)."""
    return value is None or value == []


class ServedName(_Message):
    """A host name the agent serves besides its own, through that name's registration
    (``jobs.slurm_hosts``: a Slurm login node serving compute nodes), with that
    registration's agent token as proof (the server checks it as a REST poll would)."""

    agent_id: SafeId
    hostname: str = Field(min_length=1, max_length=255)
    token: str = Field(min_length=1, max_length=256, repr=False)


class Hello(_Message):
    """The agent's first message: who it is and what it already has."""

    type: Literal["hello"] = "hello"
    agent_id: SafeId
    version: str = Field(min_length=1, max_length=64)
    hostname: str = Field(min_length=1, max_length=255)
    capabilities: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(max_length=64)
    #: Registrations this connection also serves (optional; left out when none): the
    #: server pushes their commands here too, and counts them alive while it is open.
    #: Declared before the fields that end the frame: a library's debug log of a frame
    #: shows its first and last characters, never its middle.
    serves: list[ServedName] = Field(default_factory=list, max_length=10_000, exclude_if=_empty)
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
    #: The agent ids of hello's ``serves`` the server accepted (optional; left out when
    #: none). The agent polls the others as before.
    serving: list[SafeId] = Field(default_factory=list, max_length=10_000, exclude_if=_empty)


class CommandMsg(_Message):
    """A command pushed by the server: the fields of a REST command, same validation."""

    type: Literal["command"] = "command"
    id: SafeId
    kind: str = Field(min_length=1, max_length=64)
    batch_id: BatchId
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    #: For a served name's command: that registration's agent id (one of welcome's
    #: ``serving``); left out for the connection's own agent.
    agent_id: SafeId | None = Field(default=None, exclude_if=_empty)

    @classmethod
    def from_command(cls, command: Command, agent_id: str | None = None) -> CommandMsg:
        """The frame pushing a REST command (of the served registration ``agent_id``)."""
        return cls(**command.model_dump(), agent_id=agent_id)

    def to_command(self) -> Command:
        """The command as the dispatcher takes it (the same object a poll yields)."""
        return Command.model_validate(self.model_dump(exclude={"type", "agent_id"}))


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


class Rejection(_Message):
    """One event of a frame that the server refused, and why."""

    event_id: str | None = Field(max_length=128)
    error: str = Field(max_length=MAX_ACK_ERROR_CHARS)


class Confirm(_Message):
    """The server holds every event of the frame ``seq`` (and of each frame before it)
    except those listed in ``rejections``: accepted or de-duplicated events are counted, not
    listed, so that a confirm costs next to nothing to build, send and read."""

    type: Literal["confirm"] = "confirm"
    seq: Seq
    accepted: Annotated[int, Field(strict=True, ge=0, le=MAX_EVENTS_PER_FRAME)]
    rejected: Annotated[int, Field(strict=True, ge=0, le=MAX_EVENTS_PER_FRAME)]
    #: Of ``accepted``, the events the server already held (by event_id): a resend.
    deduplicated: Annotated[int, Field(strict=True, ge=0, le=MAX_EVENTS_PER_FRAME)] = 0
    rejections: list[Rejection] = Field(default_factory=list, max_length=MAX_EVENTS_PER_FRAME)

    def rest_answer(self) -> dict[str, Any]:
        """The confirm as a REST batch answer for the sender's handling: ``results`` lists
        the rejected events, and ``unlisted_held`` says every other event was taken."""
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "results": [
                {"event_id": r.event_id, "status": "rejected", "db_id": None, "error": r.error}
                for r in self.rejections
            ],
            "unlisted_held": True,
        }


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


def __getattr__(name: str) -> Any:
    """``decode_frame`` and ``FrameError`` live in ``wsdecode`` (which imports this module),
    and are served from here too, loaded on first use."""
    if name in ("decode_frame", "FrameError"):
        from argus_agent import wsdecode

        return getattr(wsdecode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
