"""What every channel to the Argus server provides, and a shutdown-aware sleep."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class Channel(Protocol):
    """A connection to the server that delivers commands to the dispatcher and carries acks."""

    async def run(self, shutdown: asyncio.Event) -> None:
        """Serve until ``shutdown`` is set; never raises for server trouble (it retries)."""
        ...


async def sleep_unless(shutdown: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``shutdown`` is set; True when shutdown was requested."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shutdown.wait(), timeout=max(0.0, seconds))
    return shutdown.is_set()
