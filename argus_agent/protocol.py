"""Wire models of the Argus v0.3.0 agent protocol; decoding and encoding only, no I/O.

Commands arrive as JSON from ``GET /api/agents/{id}/jobs``. A hostile or broken server may
send anything, so decoding never raises for one bad command: it yields a
:class:`MalformedCommand` carrying the reason, which the dispatcher acks ``failed`` when the
command has an id it can ack.
"""

from __future__ import annotations

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


class RegisterResult(BaseModel):
    """The answer of ``POST /api/agents/register`` (extra keys from newer servers ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    agent_id: str = Field(min_length=1, max_length=128)
    agent_token: str = Field(min_length=8, repr=False)
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
    """A command we cannot act on. ``cmd_id`` is set when it can still be acked ``failed``."""

    cmd_id: str | None
    reason: str


def decode_commands(body: Any) -> list[Command | MalformedCommand]:
    """Decode the body of a jobs poll into commands, one bad item never spoiling the rest.

    Raises ProtocolError only when the body as a whole is not ``{"jobs": [...]}``.
    """
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise ProtocolError("jobs poll answer is not an object with a 'jobs' list")
    decoded: list[Command | MalformedCommand] = []
    for item in body["jobs"]:
        decoded.append(decode_command(item))
    return decoded


def decode_command(item: Any) -> Command | MalformedCommand:
    """Decode one command item; never raises."""
    raw_id = item.get("id") if isinstance(item, dict) else None
    cmd_id = raw_id if isinstance(raw_id, str) and CMD_ID_RE.match(raw_id) else None
    try:
        command = Command.model_validate(item)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "command"
        return MalformedCommand(cmd_id, f"malformed command: {where}: {first['msg']}")
    if not isinstance(command.batch_id, str) or not BATCH_ID_RE.match(command.batch_id):
        return MalformedCommand(
            command.id, f"malformed command: batch_id {command.batch_id[:80]!r} has an unsafe shape"
        )
    return command


def ack_body(status: AckStatus, pid: int | None = None, error: str | None = None) -> dict:
    """The JSON body of an ack; ``error`` is trimmed to a size any server will store."""
    body: dict[str, Any] = {"status": status}
    if pid is not None:
        body["pid"] = pid
    if error is not None:
        body["error"] = error[:2000]
    return body
