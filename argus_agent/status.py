"""The daemon's observable state: one mutable object the parts update, read by `status`.

The channel writes connection facts; the control socket serialises a snapshot of it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ChannelState:
    """What the channel last saw of the server.

    ``kind`` is what carries commands now (``websocket`` or ``poll``), ``transport`` what the
    configuration asked for (``server.transport``), ``why`` why the channel polls in ``auto``
    mode or why the websocket is down. ``connected_since`` is set while a websocket is open,
    ``last_contact_at`` is the last sign of life of the server (a frame or pong on the
    websocket, a successful poll), ``next_probe_at`` when ``auto`` tries the websocket again.
    ``state_since`` is when ``state`` last changed: for a polling channel, "connected since".
    """

    #: Declared before ``state`` so that ``__init__`` setting ``state`` stamps it.
    state_since: float | None = None
    kind: str = "poll"
    # connected | backing_off | rate_limited | auth_rejected | unavailable | starting
    state: str = "starting"
    last_ok_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    next_retry_at: float | None = None
    poll_interval_s: float | None = None
    last_heartbeat_at: float | None = None
    transport: str = "poll"
    why: str | None = None
    connected_since: float | None = None
    last_contact_at: float | None = None
    next_probe_at: float | None = None

    def __setattr__(self, name: str, value: object) -> None:
        # The channels set ``state`` in several places (and auto mirrors the poll channel's
        # view), so the time of a change is taken here, where every one of them passes.
        if name == "state" and value != getattr(self, "state", None):
            object.__setattr__(self, "state_since", time.time())
        object.__setattr__(self, name, value)

    def ok(self) -> None:
        """Record a successful exchange."""
        self.state = "connected"
        self.last_ok_at = self.last_contact_at = time.time()
        self.next_retry_at = None

    def failed(self, state: str, error: str, retry_in: float) -> None:
        """Record a failed exchange and when the next try is due."""
        now = time.time()
        self.state = state
        self.last_error = error
        self.last_error_at = now
        self.next_retry_at = now + retry_in


@dataclass
class AgentState:
    """Everything `argus-agent status` shows, apart from the job table."""

    version: str
    pid: int
    started_at: float
    server_url: str
    agent_id: str
    hostname: str
    state_dir: str
    channel: ChannelState = field(default_factory=ChannelState)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)
