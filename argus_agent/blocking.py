"""Blocking calls off the event loop, bounded by a timeout, in threads that never hold up
the agent's exit.

:func:`call_in_thread` runs what can hang for ever in the kernel (a ``stat`` on a dead NFS
mount, a user directory that does not answer) in its own daemon thread, so that the event
loop only ever waits for it as long as it chooses to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def call_in_thread(
    fn: Callable[[], T], timeout_s: float, threads: set[threading.Thread] | None = None
) -> T:
    """Run the blocking ``fn`` in a new daemon thread; its result or its exception, or
    TimeoutError after ``timeout_s`` (the thread is then left to return on its own: a thread
    blocked in the kernel cannot be stopped). ``threads`` collects the thread.

    Not ``asyncio.to_thread``: the default executor's threads are joined when the loop shuts
    down, so one ``stat`` hung on a dead NFS mount would hang the agent's exit as well, and
    each would hold one of its few workers for ever.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: Exception | None) -> None:
        if done.done():  # timed out meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        result: Any = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=work, name="argus-agent-check", daemon=True)
    if threads is not None:
        threads.add(thread)
    thread.start()
    return await asyncio.wait_for(done, timeout_s)
