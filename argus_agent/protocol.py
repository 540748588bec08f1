"""Wire models of the Argus v0.3.0 agent protocol; decoding and encoding only, no I/O.

Commands arrive as JSON from ``GET /api/agents/{id}/jobs``. A hostile or broken server may
send anything, and one bad command must never keep the others from being handled, so the
answer is not decoded as a whole (one 5000-digit integer or one value nested 5,000 deep
would fail it all, and every later poll with it):

1. :func:`split_jobs` scans the text once, without recursion and respecting strings, finds
   the top-level ``jobs`` array and cuts it into one text per command, noting how deeply each
   nests. Nothing inside a command is decoded here.
2. Each command text is decoded on its own (:func:`decode_command_text`), bounded in size
   (``MAX_COMMAND_CHARS``), depth (``MAX_DEPTH``) and integer length (``MAX_INT_DIGITS``),
   and refused when any string in it, key or value, is not valid Unicode (a lone surrogate
   such as ``"\\ud800"``, or bytes that are not UTF-8): SQLite, the audit log and a job's
   environment cannot hold one.
3. A refused command becomes a :class:`MalformedCommand` carrying the reason and whatever
   could be recovered from its text: its ``id`` (so the dispatcher acks it ``failed``), its
   ``kind`` and ``batch_id`` (so a refused rerun's batch can be ended with ``batch_failed``).

Only an answer that is not ``{"jobs": [...]}`` at all raises :class:`ProtocolError`.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from argus_agent.errors import ProtocolError

#: Batch ids name directories in the state dir: keep them to a safe shape.
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
CMD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

AckStatus = Literal["started", "failed"]
KNOWN_KINDS = ("rerun", "stop")

#: The largest command accepted, in characters of its JSON text (the launch policy allows
#: 64 KiB of command, 64 KB of overrides and 256 KiB of environment; escapes may grow them).
MAX_COMMAND_CHARS = 4 * 1024 * 1024
#: How deeply a command may nest (the command object is level 1; a rerun needs 3).
MAX_DEPTH = 32
#: Commands taken from one poll answer; the rest stay pending and come with the next poll,
#: so a huge answer costs bounded time per poll.
MAX_COMMANDS_PER_POLL = 1000
#: The longest integer accepted, in digits (Python refuses to convert past 4300).
MAX_INT_DIGITS = 100


class RegisterResult(BaseModel):
    """The answer of ``POST /api/agents/register`` (extra keys from newer servers ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: The shape every id of the protocol has (it goes into URL paths and frames).
    agent_id: str = Field(pattern=CMD_ID_RE.pattern)
    agent_token: str = Field(min_length=8, max_length=256, repr=False)
    poll_interval_s: float = Field(default=10.0, gt=0)
    server_time_utc: str | None = None


class Command(BaseModel):
    """One command from the server's job queue."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(pattern=CMD_ID_RE.pattern)
    kind: str = Field(min_length=1, max_length=64)
    batch_id: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None


@dataclass(frozen=True)
class MalformedCommand:
    """A command we cannot act on, and what could be recovered of it.

    ``cmd_id`` is set when it can still be acked ``failed``; ``kind`` and ``batch_id`` (a
    safe-shaped one only) when the item named them, so that a refused rerun's batch can be
    ended. ``reason`` names where an item is wrong, never a value of it (a lone surrogate
    would not survive the ledger, a value of ``env`` may be a secret).
    """

    cmd_id: str | None
    reason: str
    kind: str | None = None
    batch_id: str | None = None


class _Refused(ValueError):
    """Raised inside decoding for a command that breaks a bound; the message is the reason."""


# -- decoding the answer ---------------------------------------------------------------------


def decode_commands(body: object) -> list[Command | MalformedCommand]:
    """Decode the body of a jobs poll into commands, one bad item never spoiling the rest.

    ``body`` is the raw answer (bytes as received, or text); an already decoded object is
    accepted too and checked item by item. Raises ProtocolError only when the body as a whole
    is not ``{"jobs": [...]}``.
    """
    if isinstance(body, bytes | bytearray):
        # Bytes that are not UTF-8 become lone surrogates, refused in the one item holding them.
        body = bytes(body).decode("utf-8", "surrogateescape")
    if isinstance(body, str):
        body = body.removeprefix("\ufeff")  # a byte order mark some proxies add
        items = itertools.islice(split_jobs(body), MAX_COMMANDS_PER_POLL)
        return [decode_command_text(text, depth) for text, depth in items]
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise ProtocolError("jobs poll answer is not an object with a 'jobs' list")
    return [decode_command(item) for item in body["jobs"]]


def decode_command_text(text: str, depth: int | None = None) -> Command | MalformedCommand:
    """Decode one command from its JSON text (as cut by :func:`split_jobs`); never raises.

    ``depth`` is how deeply the text nests when the caller knows it already.
    """
    try:
        if len(text) > MAX_COMMAND_CHARS:
            raise _Refused(
                f"command is {len(text)} characters long; at most {MAX_COMMAND_CHARS} accepted"
            )
        if depth is None:
            _, depth = _value_end(text, _skip_ws(text, 0))
        if depth > MAX_DEPTH:
            raise _Refused(f"command nests {depth} levels deep; at most {MAX_DEPTH} accepted")
        item = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except _Refused as exc:
        return _recovered(text, f"malformed command: {exc}")
    except (ValueError, RecursionError) as exc:
        where = (
            f" ({exc.msg} at character {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        )
        return _recovered(text, f"malformed command: not valid JSON{where}")
    return decode_command(item)


def decode_command(item: Any) -> Command | MalformedCommand:
    """Decode one command item (already parsed JSON); never raises.

    Refuses an item nested deeper than ``MAX_DEPTH``, holding an integer longer than
    ``MAX_INT_DIGITS`` digits or a string that is not valid Unicode, naming where.
    """
    cmd_id, kind, batch_id = _identify(item)
    problem = _check_value(item)
    if problem is not None:
        return MalformedCommand(cmd_id, f"malformed command: {problem}", kind, batch_id)
    try:
        command = Command.model_validate(item)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "command"
        return MalformedCommand(
            cmd_id, f"malformed command: {where}: {first['msg']}", kind, batch_id
        )
    if not isinstance(command.batch_id, str) or not BATCH_ID_RE.fullmatch(command.batch_id):
        return MalformedCommand(
            command.id,
            f"malformed command: batch_id {command.batch_id[:80]!r} has an unsafe shape",
            command.kind,
        )
    return command


def _identify(item: Any) -> tuple[str | None, str | None, str | None]:
    """The item's ``id``, ``kind`` and ``batch_id`` where each is usable, else None."""
    if not isinstance(item, dict):
        return None, None, None
    return (
        _usable(item, "id", CMD_ID_RE),
        _usable(item, "kind"),
        _usable(item, "batch_id", BATCH_ID_RE),
    )


def _usable(item: dict, key: str, shape: re.Pattern[str] | None = None) -> str | None:
    value = item.get(key)
    if not isinstance(value, str) or not value or len(value) > 128 or not _is_unicode(value):
        return None
    if shape is not None and not shape.fullmatch(value):
        return None
    return value


def _recovered(text: str, reason: str) -> MalformedCommand:
    """A MalformedCommand for a text that could not be decoded: its id, kind and batch id are
    read from the object's top-level string members, where the text allows."""
    found: dict[str, Any] = {}
    try:
        start = _skip_ws(text, 0)
        if text.startswith("{", start):
            members, _ = _object_members(text, start)
            for key, vstart, vend in members:
                if key in ("id", "kind", "batch_id") and text.startswith('"', vstart):
                    found[key] = json.loads(text[vstart:vend])
    except (ValueError, RecursionError):
        pass
    cmd_id, kind, batch_id = _identify(found)
    return MalformedCommand(cmd_id, reason, kind, batch_id)


def _bounded_int(digits: str) -> int:
    count = len(digits.lstrip("-"))
    if count > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {count} digits; at most {MAX_INT_DIGITS} accepted")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value")


def _too_long(number: int) -> bool:
    return abs(number) >= 10**MAX_INT_DIGITS


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(key: str) -> str:
    """A key as it may appear in a reason (lone surrogates escaped, length bounded)."""
    return key[:80].encode("utf-8", "backslashreplace").decode("utf-8")


def _check_value(value: Any) -> str | None:
    """The first bound ``value`` breaks (depth, integer size, non-Unicode string), with the
    path to it; None when it keeps them all. Iterative: safe at any nesting."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        current, path, depth = stack.pop()
        if isinstance(current, dict | list) and depth > MAX_DEPTH:
            return f"{path or 'command'}: nests more than {MAX_DEPTH} levels deep"
        if isinstance(current, dict):
            for key, child in current.items():
                if isinstance(key, str) and not _is_unicode(key):
                    return f"{path or 'command'}: key {key[:80]!r} is not valid Unicode"
                stack.append(
                    (child, f"{path}.{_shown(str(key))}" if path else _shown(str(key)), depth + 1)
                )
        elif isinstance(current, list):
            for index, child in enumerate(current):
                stack.append((child, f"{path}[{index}]", depth + 1))
        elif isinstance(current, str) and not _is_unicode(current):
            # The value is not shown: it may be a secret (an env value, a token).
            return (
                f"{path or 'command'}: not valid Unicode (a lone surrogate, or bytes that "
                "are not UTF-8)"
            )
        elif isinstance(current, int) and not isinstance(current, bool) and _too_long(current):
            return f"{path or 'command'}: an integer of more than {MAX_INT_DIGITS} digits"
    return None


# -- cutting the answer into commands (a scanner over the JSON text) -------------------------

_WS_RE = re.compile(r"[ \t\n\r]*")
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STRUCTURE_RE = re.compile(r'["\[\]{}]')
_SCALAR_RE = re.compile(r'[^\s,:\[\]{}"]+')
_CLOSER = {"{": "}", "[": "]"}


def split_jobs(text: str) -> list[tuple[str, int]]:
    """Cut a jobs answer into ``(command text, nesting depth)`` pairs without decoding them.

    Checks only the structure it walks (matching brackets, terminated strings); each
    command's text is decoded later, on its own. Raises ProtocolError when the text is not
    ``{"jobs": [...]}`` (duplicate keys: the last one counts, as for ``json``).
    """
    try:
        start = _skip_ws(text, 0)
        if not text.startswith("{", start):
            raise ProtocolError("jobs poll answer is not an object with a 'jobs' list")
        members, end = _object_members(text, start)
        if _skip_ws(text, end) != len(text):
            raise _Refused(f"unexpected text after the answer at character {end}")
        jobs = [(vstart, vend) for key, vstart, vend in members if key == "jobs"]
        if not jobs or not text.startswith("[", jobs[-1][0]):
            raise ProtocolError("jobs poll answer is not an object with a 'jobs' list")
        return _array_items(text, jobs[-1][0])
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"jobs poll answer is not JSON: {exc}") from None


def _skip_ws(text: str, i: int) -> int:
    match = _WS_RE.match(text, i)
    return match.end() if match else i


def _string_end(text: str, i: int) -> int:
    match = _STRING_RE.match(text, i)
    if match is None:
        raise _Refused(f"unterminated string at character {i}")
    return match.end()


def _value_end(text: str, i: int) -> tuple[int, int]:
    """Where the JSON value starting at ``i`` ends, and how deeply it nests (0: a scalar)."""
    if i >= len(text):
        raise _Refused("unexpected end of the answer")
    first = text[i]
    if first == '"':
        return _string_end(text, i), 0
    if first not in _CLOSER:
        match = _SCALAR_RE.match(text, i)
        if match is None:
            raise _Refused(f"unexpected {first!r} at character {i}")
        return match.end(), 0
    open_: list[str] = [first]
    deepest = 1
    j = i + 1
    while open_:
        match = _STRUCTURE_RE.search(text, j)
        if match is None:
            raise _Refused(f"unterminated {open_[-1]!r} opened before character {j}")
        char, at = match.group(), match.start()
        if char == '"':
            j = _string_end(text, at)
        elif char in _CLOSER:
            open_.append(char)
            deepest = max(deepest, len(open_))
            j = at + 1
        elif _CLOSER[open_[-1]] == char:
            open_.pop()
            j = at + 1
        else:
            raise _Refused(f"unexpected {char!r} at character {at}")
    return j, deepest


def _object_members(text: str, i: int) -> tuple[list[tuple[str, int, int]], int]:
    """The ``(key, value start, value end)`` of the object at ``i`` (``{``), and its end."""
    members: list[tuple[str, int, int]] = []
    j = _skip_ws(text, i + 1)
    if text.startswith("}", j):
        return members, j + 1
    while True:
        if not text.startswith('"', j):
            raise _Refused(f"expected a key at character {j}")
        key_end = _string_end(text, j)
        key = json.loads(text[j:key_end])
        j = _skip_ws(text, key_end)
        if not text.startswith(":", j):
            raise _Refused(f"expected ':' at character {j}")
        vstart = _skip_ws(text, j + 1)
        vend, _ = _value_end(text, vstart)
        members.append((key, vstart, vend))
        j = _skip_ws(text, vend)
        if text.startswith("}", j):
            return members, j + 1
        if not text.startswith(",", j):
            raise _Refused(f"expected ',' or '}}' at character {j}")
        j = _skip_ws(text, j + 1)


def _array_items(text: str, i: int) -> list[tuple[str, int]]:
    """The ``(text, depth)`` of each item of the array at ``i`` (``[``)."""
    items: list[tuple[str, int]] = []
    j = _skip_ws(text, i + 1)
    if text.startswith("]", j):
        return items
    while True:
        end, depth = _value_end(text, j)
        items.append((text[j:end], depth))
        j = _skip_ws(text, end)
        if text.startswith("]", j):
            return items
        if not text.startswith(",", j):
            raise _Refused(f"expected ',' or ']' at character {j}")
        j = _skip_ws(text, j + 1)


# -- encoding --------------------------------------------------------------------------------


def ack_body(status: AckStatus, pid: int | None = None, error: str | None = None) -> dict:
    """The JSON body of an ack; ``error`` is trimmed to a size any server will store."""
    body: dict[str, Any] = {"status": status}
    if pid is not None:
        body["pid"] = pid
    if error is not None:
        body["error"] = error[:2000]
    return body
