"""Reading websocket frames of ``argus-agent.v1`` that the other side sent; no I/O.

:func:`decode_frame` turns one received frame into its message model (``wsproto``), or into
a :class:`FrameError` naming what was wrong (and the message id, cmd_id or seq it refers to
where that can be read), under the size, depth and number limits of ``wsproto``. It never
raises for anything the other side sends: every refusal is a value, with the reply the
protocol prescribes (:meth:`FrameError.reply`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from argus_agent import protocol
from argus_agent.protocol import CMD_ID_RE, MalformedCommand
from argus_agent.wsproto import (
    _MODELS,
    _REF_KEY,
    _SENDER,
    MAX_EVENTS_FRAME_BYTES,
    MAX_EVENTS_PER_FRAME,
    MAX_FRAME_BYTES,
    MAX_FRAME_DEPTH,
    MAX_INT_DIGITS,
    MAX_MESSAGE_BYTES,
    MAX_SEQ,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    AckResult,
    CloseCode,
    CommandMsg,
    Direction,
    ErrorCode,
    ErrorMsg,
    Message,
    _trim,
)

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
    #: A bad command frame's ``agent_id`` (a served name's), when it is a readable id.
    agent_id: str | None = None

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
    MalformedCommand (and is acked ``failed`` when it names an id, through the registration
    its ``agent_id`` names)."""
    decoded_or_error = _decode_command_body(obj, text, ref)
    if isinstance(decoded_or_error, FrameError):
        agent_id = obj.get("agent_id")
        if isinstance(agent_id, str) and CMD_ID_RE.fullmatch(agent_id):
            return dataclasses.replace(decoded_or_error, agent_id=agent_id)
    return decoded_or_error


def _decode_command_body(
    obj: dict[str, Any], text: str, ref: str | None
) -> CommandMsg | FrameError:
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
    if isinstance(value, str) and CMD_ID_RE.fullmatch(value):
        return value
    return None


def _value_problem(obj: Any, msg_type: str, *, check_strings: bool) -> tuple[ErrorCode, str] | None:
    """The first bound a parsed frame breaks (nesting depth; with ``check_strings``, strings
    that are not valid Unicode), with where. Iterative: safe at any nesting. The walk keeps
    no paths (an events frame holds thousands of values); only a frame that breaks a bound
    is walked again to say where."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            if depth > MAX_FRAME_DEPTH:
                return _locate_problem(obj, msg_type, check_strings=check_strings)
            for key, child in current.items():
                if check_strings and not protocol._is_unicode(key):
                    return _locate_problem(obj, msg_type, check_strings=check_strings)
                if isinstance(child, dict | list) or (check_strings and isinstance(child, str)):
                    stack.append((child, depth + 1))
        elif isinstance(current, list):
            if depth > MAX_FRAME_DEPTH:
                return _locate_problem(obj, msg_type, check_strings=check_strings)
            for child in current:
                if isinstance(child, dict | list) or (check_strings and isinstance(child, str)):
                    stack.append((child, depth + 1))
        elif isinstance(current, str) and not protocol._is_unicode(current):
            return _locate_problem(obj, msg_type, check_strings=check_strings)
    return None


def _locate_problem(
    obj: Any, msg_type: str, *, check_strings: bool
) -> tuple[ErrorCode, str] | None:
    """:func:`_value_problem`'s walk keeping the path, for the reason of a frame it refused."""
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
