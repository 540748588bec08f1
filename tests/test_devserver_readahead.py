"""The reference server's read-ahead of websocket frames (``devserver/readahead.py``): frames
handled in order; the session ended by the handler quietly, or with the handler's own error;
the preparations of frames that will not be handled cancelled. Found by a hostile review:
ending while a step was pending raised InvalidStateError instead."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from argus_agent.devserver.readahead import read_ahead


def _receiver(frames: list[Any]) -> Any:
    async def receive() -> Any:
        if frames:
            return frames.pop(0)
        await asyncio.Event().wait()  # the client sends nothing more, the connection stays
        return None

    return receive


async def test_frames_are_handled_in_order_until_the_connection_ends() -> None:
    frames = [{"n": i} for i in range(20)]
    handled: list[int] = []

    async def handle(frame: Any, ahead: Any) -> bool:
        handled.append(frame["n"] if ahead is None else await ahead)
        return True

    async def receive() -> Any:
        return frames.pop(0) if frames else None  # then the connection ended

    loop = asyncio.get_running_loop()

    def start(frame: Any) -> Any:  # odd frames prepared "ahead", finishing out of order
        if frame["n"] % 2 == 0:
            return None
        future = loop.create_future()
        loop.call_later(0.01 * (20 - frame["n"]), future.set_result, frame["n"])
        return future

    await asyncio.wait_for(read_ahead(receive, start, handle, lambda: True, depth=4, name="t"), 5)
    assert handled == list(range(20))


async def test_the_handler_ending_the_session_ends_it_quietly() -> None:
    async def handle(frame: Any, ahead: Any) -> bool:
        return False  # a second hello, the bad-frame burst, a drop fault

    await asyncio.wait_for(
        read_ahead(_receiver([{"n": 1}]), lambda f: None, handle, lambda: True, depth=4, name="t"),
        5,
    )


async def test_the_handlers_own_error_is_raised() -> None:
    async def handle(frame: Any, ahead: Any) -> bool:
        raise OverflowError("the handler's own error")

    with pytest.raises(OverflowError, match="the handler's own error"):
        await asyncio.wait_for(
            read_ahead(
                _receiver([{"n": 1}]), lambda f: None, handle, lambda: True, depth=4, name="t"
            ),
            5,
        )


async def test_frames_read_but_not_handled_have_their_preparations_cancelled() -> None:
    loop = asyncio.get_running_loop()
    aheads: list[asyncio.Future[Any]] = []
    gate = asyncio.Event()

    def start(frame: Any) -> asyncio.Future[Any]:
        aheads.append(loop.create_future())
        return aheads[-1]

    async def handle(frame: Any, ahead: Any) -> bool:
        await gate.wait()
        return False

    loop.call_later(0.2, gate.set)  # by then the reader waits to queue a frame (depth 4)
    await asyncio.wait_for(
        read_ahead(
            _receiver([{"n": i} for i in range(10)]), start, handle, lambda: True, depth=4, name="t"
        ),
        5,
    )
    assert len(aheads) == 6  # the one handled, 4 queued, 1 in hand
    assert all(a.cancelled() for a in aheads[1:])
