"""Reading a websocket session's frames ahead of handling them (:func:`read_ahead`), so that
the reference server's frame worker parses the next events frames while the session stores
the current one (:mod:`.ws`, :mod:`.frameworker`).

Two tasks per session: the caller's, which reads frames, starts each one's preparation and
queues it; and the handler, which takes them in order and answers them. At most *depth* frames
wait between the two, so a flood waits in TCP, not in the server's memory. Frames are handled
in the order they arrived, whatever order their preparations finish in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

_T = TypeVar("_T")
Frame = dict[str, Any]
#: A frame's preparation, started when it was read (None: nothing to prepare ahead).
Ahead = asyncio.Future[Any] | None
_Queue = asyncio.Queue[tuple[Frame, Ahead] | None]


async def read_ahead(
    receive: Callable[[], Awaitable[Frame | None]],
    start: Callable[[Frame], Ahead],
    handle: Callable[[Frame, Ahead], Awaitable[bool]],
    is_open: Callable[[], bool],
    *,
    depth: int,
    name: str,
) -> None:
    """Until the connection ends (*receive* gives None, or *is_open* says no) or *handle*
    returns False: read each frame, *start* its preparation, and *handle* the frames in
    order, at most *depth* behind. Frames read before the connection ended are still handled;
    those read after *handle* ended the session are not (their preparations are cancelled).
    The handler's failure is raised here."""
    queue: _Queue = asyncio.Queue(depth)
    handler = asyncio.create_task(_handle_all(queue, handle), name=name)
    try:
        while is_open():
            frame = await _unless_ended(receive(), handler)
            if frame is None:
                break
            ahead = start(frame)
            try:
                await _unless_ended(queue.put((frame, ahead)), handler)
            except _Ended:
                if ahead is not None:
                    ahead.cancel()
                raise
        await _unless_ended(queue.put(None), handler)
    except _Ended:
        _cancel_queued(queue)
    except BaseException:
        handler.cancel()
        _cancel_queued(queue)
        raise
    await handler


async def _handle_all(queue: _Queue, handle: Callable[[Frame, Ahead], Awaitable[bool]]) -> None:
    while (item := await queue.get()) is not None:
        if not await handle(*item):
            return


class _Ended(Exception):
    """The handler ended the session while the reader waited."""


async def _unless_ended(step: Awaitable[_T], handler: asyncio.Task[None]) -> _T:
    """*step*'s result; raises :class:`_Ended` (*step* cancelled) when *handler* ends first."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.wait((task, handler), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            # A cancelled task is done only once it ran again: wait for that, so that the
            # step is over (and its result, if it got one first, known) before going on.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((task,))
    if task.cancelled():
        raise _Ended
    return task.result()


def _cancel_queued(queue: _Queue) -> None:
    """Cancel the preparations of frames that will not be handled."""
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None and item[1] is not None:
            item[1].cancel()
