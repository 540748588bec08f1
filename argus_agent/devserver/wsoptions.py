"""How the reference server's websocket endpoint (``ws.py``) behaves: its switches
(:class:`WsOptions`: no endpoint at all, another subprotocol, timings) and the faults tests
arm on it (:class:`WsFaults`: refuse upgrades, drop a connection after N frames, a changed
welcome)."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any

from argus_agent import wsproto

#: How long the frame worker may answer nothing while frames wait before it counts as stuck
#: (it is killed, and the server parses frames itself). A frame of 500 log lines takes it
#: about 12 ms; the slowest frame the protocol allows (4 MiB of deeply nested values) took
#: 4.4 s on a 2-core VM.
FRAME_WORKER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WsOptions:
    """How the endpoint behaves. ``enabled=False``: no endpoint (as Argus v0.3.0, whose
    uvicorn answers a websocket request for an unknown path with HTTP 403)."""

    enabled: bool = True
    #: The one subprotocol this server speaks (tests set e.g. ``argus-agent.v2``).
    subprotocol: str = wsproto.SUBPROTOCOL
    hello_timeout_s: float = wsproto.HELLO_TIMEOUT_S
    #: What welcome announces; the runner configures uvicorn's pings with the same values.
    ping_interval_s: float = wsproto.PING_INTERVAL_S
    ping_timeout_s: float = wsproto.PING_TIMEOUT_S
    bad_frame_burst: int = wsproto.BAD_FRAME_BURST
    bad_frame_window_s: float = wsproto.BAD_FRAME_WINDOW_S
    #: How often a session without a wake-up re-checks the queue (a safety net: commands
    #: are pushed on commit), re-checks the token (4401) and bumps the agent's last_seen.
    recheck_s: float = wsproto.PING_INTERVAL_S
    #: Parse events frames in a child process (:mod:`.frameworker`) while the server stores
    #: the frames before them: the server's events/s on two cores or more. ``dev-server``
    #: turns it on; in-process servers (tests, the demo) keep it off unless asked.
    frame_worker: bool = False
    #: How long the worker may answer nothing while frames wait before it counts as stuck.
    frame_worker_timeout_s: float = FRAME_WORKER_TIMEOUT_S


class WsFaults:
    """Faults of the websocket endpoint, armed by tests from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drops: collections.deque[int] = collections.deque()
        self._rejects: collections.deque[tuple[int, str | None]] = collections.deque()
        #: Members merged into (or replacing those of) every welcome, e.g. ``{"protocol": 2}``.
        self.welcome_extra: dict[str, Any] | None = None

    def drop_after(self, frames: int, connections: int = 1) -> None:
        """The next *connections* sessions are closed 1011 right after handling their
        *frames*-th frame after hello: that frame is acted on (events stored, ack recorded)
        but not answered, as when a server dies between storing and confirming."""
        if frames < 1:
            raise ValueError("frames must be at least 1")
        with self._lock:
            self._drops.extend([frames] * connections)

    def reject_upgrades(self, status: int, count: int = 1, detail: str | None = None) -> None:
        """Answer the next *count* upgrade requests with HTTP *status* (before auth)."""
        with self._lock:
            self._rejects.extend([(status, detail)] * count)

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._drops.clear()
            self._rejects.clear()
            self.welcome_extra = None

    def take_drop(self) -> int | None:
        """The drop armed for a new session, if any (consumed)."""
        with self._lock:
            return self._drops.popleft() if self._drops else None

    def take_reject(self) -> tuple[int, str | None] | None:
        """The refusal armed for a new upgrade request, if any (consumed)."""
        with self._lock:
            return self._rejects.popleft() if self._rejects else None
