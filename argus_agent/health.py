"""The health model of the daemon's long-running loops, which decides whether systemd's
watchdog is fed.

Each loop (command channel, heartbeat, event sender, sampler, log tailer, housekeeping)
reports progress with ``report(name, next_within_s)`` each time round: "I am fine, and I
will report again within ``next_within_s`` seconds" (the time it is about to wait: its poll
interval, a backoff delay, an idle wait). A loop is healthy while its next report is not
overdue by more than ``stall_timeout_s``, the time any one call of it may take. So a loop
waiting in backoff for a down server is healthy (it said how long it would wait), and a loop
blocked in a call (a hung filesystem, a lock that is never released, a bug) is not. The
daemon feeds the watchdog only while every loop is healthy, and names the unhealthy ones in
systemd's STATUS= (Buildkite's agent watchdog does the same).

Pure bookkeeping: no I/O, no asyncio; the clock is passed in for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: The stall timeout of a Health nobody configured (``agent.stall_timeout_s``'s default).
DEFAULT_STALL_S = 60.0


class Health:
    """Progress reports of named loops. Not thread-safe: use from the event loop."""

    def __init__(self, stall_timeout_s: float, *, clock: Callable[[], float] = time.monotonic):
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._due: dict[str, float] = {}

    def report(self, name: str, next_within_s: float = 0.0) -> None:
        """Loop ``name`` made progress and will report again within ``next_within_s``."""
        self._due[name] = self._clock() + max(0.0, next_within_s) + self.stall_timeout_s

    def forget(self, name: str) -> None:
        """Loop ``name`` ended on purpose (e.g. a sender without a token): stop watching it."""
        self._due.pop(name, None)

    def overdue(self) -> dict[str, float]:
        """The unhealthy loops → seconds past their deadline (empty when all are healthy)."""
        now = self._clock()
        return {name: round(now - due, 1) for name, due in self._due.items() if now > due}

    def healthy(self) -> bool:
        """Whether every watched loop is within its deadline."""
        return not self.overdue()

    def describe(self) -> str | None:
        """One line naming the unhealthy loops, or None."""
        late = self.overdue()
        if not late:
            return None
        names = ", ".join(f"{name} (stuck {seconds:.0f} s)" for name, seconds in late.items())
        return f"unhealthy: {names}"

    def watched(self) -> list[str]:
        """The names of the loops being watched."""
        return sorted(self._due)
