"""Retry decisions and reconnect timing, as pure pieces: the one classifier of failed server
calls, full-jitter exponential delays and poll jitter.

``classify`` is the only place that decides what a failed call to the server means; the poll
channel and the event sender both act on its ``Decision``:

- 429 (``RateLimitedError``) → ``RETRY_AFTER``: wait as long as ``Retry-After`` says.
- 401/403 (``AgentTokenRejectedError``, ``AuthError``) → ``AUTH_REJECTED``: say so once and
  retry slowly, every ``agent.auth_retry_s`` (a new token may come meanwhile).
- 400/413/422 (``ProtocolError``) and 409 (``ConflictError``) → ``REFUSED``: this request can
  never succeed; the caller settles it (the sender drops the event, logging the server's
  reason). A caller with nothing to settle (a poll) backs off.
- everything else → ``BACKOFF``, retried after the next full-jitter delay: connection errors,
  the overall deadline, 408, 5xx, an answer we cannot read, bugs, and 404 (a proxy or a
  server being redeployed answers 404 too: never a reason to drop events).

Nothing here sleeps or does I/O; callers pass the delay to ``asyncio.sleep``. Tests drive it
with a seeded ``random.Random``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from argus_agent.errors import (
    AgentTokenRejectedError,
    AuthError,
    ConflictError,
    ProtocolError,
    RateLimitedError,
)

#: HTTP statuses that refuse a request for what it carries (400 malformed, 413 too large,
#: 422 invalid), not the service: sending the same request again gets the same answer.
REFUSED_STATUSES = frozenset({400, 413, 422})


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


class Action(enum.Enum):
    """What the loop whose server call failed does next (see the module docstring)."""

    BACKOFF = "backing_off"
    RETRY_AFTER = "rate_limited"
    AUTH_REJECTED = "auth_rejected"
    REFUSED = "refused"


@dataclass(frozen=True)
class Decision:
    """``classify``'s answer: the action and, where the wait is fixed, how long it is."""

    action: Action
    wait_s: float | None = None

    def delay(self, backoff: Backoff) -> float:
        """Seconds until the next try: the fixed wait, else ``backoff``'s next delay."""
        return self.wait_s if self.wait_s is not None else backoff.next_delay()


def classify(exc: BaseException, *, auth_retry_s: float) -> Decision:
    """Decide what a failed call to the server means; a pure function of the exception.

    ``auth_retry_s`` is the slow retry while credentials are refused (``agent.auth_retry_s``).
    An exception that is not a server error (a bug) backs off, so it can never spin.
    """
    if isinstance(exc, RateLimitedError):
        return Decision(Action.RETRY_AFTER, exc.retry_after)
    if isinstance(exc, AgentTokenRejectedError | AuthError):
        return Decision(Action.AUTH_REJECTED, auth_retry_s)
    if isinstance(exc, ConflictError):
        return Decision(Action.REFUSED)
    if isinstance(exc, ProtocolError) and exc.status in REFUSED_STATUSES:
        return Decision(Action.REFUSED)
    return Decision(Action.BACKOFF)
