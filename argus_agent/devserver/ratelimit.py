"""Per-key token bucket for event ingest (Argus v0.3.0: burst 60, then 10 requests/s).

Thread-safe and I/O-free; refills lazily on each call.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class TokenBucket:
    """A token bucket per key: *capacity* requests at once, refilled at *refill_per_s*.

    Raises ValueError on a non-positive capacity or rate.
    """

    def __init__(
        self,
        capacity: float = 60,
        refill_per_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity <= 0 or refill_per_s <= 0:
            raise ValueError("capacity and refill rate must be positive")
        self.capacity = float(capacity)
        self.refill_per_s = float(refill_per_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def try_consume(self, key: str) -> tuple[bool, float]:
        """Take one token for *key*: ``(True, 0.0)``, or ``(False, seconds until one refills)``."""
        now = self._clock()
        with self._lock:
            tokens, last = self._state.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + max(0.0, now - last) * self.refill_per_s)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return True, 0.0
            self._state[key] = (tokens, now)
            return False, (1.0 - tokens) / self.refill_per_s

    def reset(self) -> None:
        """Forget every key's state (all buckets full again)."""
        with self._lock:
            self._state.clear()


def retry_after_header(seconds: float) -> str:
    """Format a wait as the real server does: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
