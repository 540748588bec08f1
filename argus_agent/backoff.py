"""Reconnect timing as pure pieces: full-jitter exponential delays and poll jitter.

Nothing here sleeps or does I/O; callers pass the delay to ``asyncio.sleep``. Tests drive it
with a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from argus_agent.errors import AgentError


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS' "full jitter"; python-websockets' ``backoff``).

    The n-th delay (n from 0) is uniform in ``[0, min(cap, initial * factor**n)]``, so the first
    retry comes within ``initial`` seconds. ``reset()`` after a success starts over.
    """

    initial: float = 1.0
    cap: float = 60.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next retry; advances the attempt counter."""
        ceiling = min(self.cap, self.initial * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Forget past failures (call after a successful exchange)."""
        self.attempt = 0


def jittered(interval: float, fraction: float = 0.1, rng: random.Random | None = None) -> float:
    """``interval`` moved by up to ±``fraction`` of itself, so hosts don't poll in lockstep."""
    rng = rng or random
    return interval * (1 + rng.uniform(-fraction, fraction))


def is_retryable(exc: BaseException) -> bool:
    """Whether trying the same request again later can succeed (transient network/5xx/429)."""
    return isinstance(exc, AgentError) and exc.transient
