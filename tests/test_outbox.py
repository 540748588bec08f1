"""The durable outbox on a real SQLite file: order, durability, offsets, chunks, the cap."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from argus_agent.events import EventKind, EventSource, make_event
from argus_agent.outbox import LogOffset, Outbox

SOURCE = EventSource(project="p", host="h")
TYPES = {
    EventKind.LOG: "log_line",
    EventKind.SNAPSHOT: "resource_snapshot",
    EventKind.LIFECYCLE: "batch_done",
    EventKind.NOTICE: "log_line",
}


def _events(kind: EventKind, batch: str, count: int, size: int = 100) -> list:
    return [
        make_event(TYPES[kind], kind, batch, SOURCE, {"line": "x" * size, "i": i})
        for i in range(count)
    ]


async def _ids(box: Outbox) -> list[str]:
    return [i for chunk in await box.peek(100_000) for i in chunk.event_ids]


async def test_events_come_out_in_order_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_bytes=10 << 20, chunk_size=2)
    await box.start()
    first = _events(EventKind.LOG, "b1", 3)
    await box.put(first, [LogOffset("b1", 300, 3)])
    done = _events(EventKind.LIFECYCLE, "b1", 1)
    await box.put(done)
    await box.close()
    again = Outbox(path, max_bytes=10 << 20, chunk_size=2)
    await again.start()
    chunks = await again.peek(10)
    # Runs of at most chunk_size events of one kind and batch, in order.
    assert [c.event_ids for c in chunks] == [
        [first[0].event_id, first[1].event_id],
        [first[2].event_id],
        [done[0].event_id],
    ]
    assert chunks[0].bodies == [first[0].body, first[1].body]
    assert json.loads(chunks[2].bodies[0])["event_type"] == "batch_done"
    assert (await again.log_offsets()) == {"b1": LogOffset("b1", 300, 3)}
    assert again.stats().queued == 4
    assert [c.event_ids for c in await again.peek(3)] == [c.event_ids for c in chunks[:2]]
    await again.remove([chunks[0].seq])
    assert await _ids(again) == [first[2].event_id, done[0].event_id]
    assert again.stats().queued == 2
    await again.close()


async def test_full_outbox_drops_oldest_snapshots_and_logs_never_lifecycle(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "outbox.db", max_bytes=12_000, chunk_size=1)
    await box.start()
    lifecycle = _events(EventKind.LIFECYCLE, "b1", 3, size=1000)
    await box.put(lifecycle[:1])
    snaps = _events(EventKind.SNAPSHOT, "b1", 10, size=500)
    await box.put(snaps)
    logs = _events(EventKind.LOG, "b2", 10, size=500)
    await box.put(logs)
    assert box.stats().bytes <= 12_000
    await box.put(lifecycle[1:])  # forces room: the oldest droppable events go first
    kept = await _ids(box)
    assert all(e.event_id in kept for e in lifecycle), "lifecycle events are never dropped"
    dropped_ids = [e.event_id for e in snaps + logs if e.event_id not in kept]
    assert dropped_ids == [e.event_id for e in (snaps + logs)[: len(dropped_ids)]], "oldest first"
    stats = box.stats()
    assert sum(stats.dropped.values()) == len(dropped_ids) > 0
    assert stats.bytes <= 12_000
    drops = await box.unreported_drops()
    assert sum(n for per in drops.values() for n in per.values()) == len(dropped_ids)
    # Told once: after the notice, nothing is left to report.
    batch = next(iter(drops))
    notice = make_event("log_line", EventKind.NOTICE, batch, SOURCE, {"line": "dropped"})
    await box.mark_drops_reported(batch, drops[batch], notice)
    assert batch not in await box.unreported_drops()
    assert notice.event_id in await _ids(box)
    # Only lifecycle left: it is still accepted, over the cap if need be.
    await box.remove(
        [
            c.seq
            for c in await box.peek(100_000)
            if json.loads(c.bodies[0])["event_type"] != "batch_done"
        ]
    )
    await box.put(_events(EventKind.LIFECYCLE, "b3", 30, size=1000))
    assert box.stats().queued == 33 and box.stats().bytes > 12_000
    await box.close()


async def test_many_puts_at_once_are_committed_together(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_bytes=100 << 20)
    await box.start()
    batches = [_events(EventKind.SNAPSHOT, f"b{i}", 20, size=50) for i in range(50)]
    await asyncio.gather(*(box.put(b) for b in batches))
    assert box.stats().queued == 1000
    assert len(await _ids(box)) == 1000
    assert sum(len(c.event_ids) for c in await box.peek(500)) <= 500
    await box.close()


async def test_peek_after_reads_past_the_chunks_being_sent_and_none_of_them_is_dropped(
    tmp_path: Path,
) -> None:
    """A sender keeping several batches unanswered asks for the next with ``after``: it gets
    the chunks past it, in order, and every chunk it was given stays queued when room is
    made (until removed, or until a peek without ``after`` starts over)."""
    box = Outbox(tmp_path / "outbox.db", max_bytes=12_000, chunk_size=2)
    await box.start()
    snaps = _events(EventKind.SNAPSHOT, "b1", 12, size=500)
    await box.put(snaps)
    first = await box.peek(2)
    second = await box.peek(2, after=first[-1].seq)
    third = await box.peek(4, after=second[-1].seq)
    given = [i for chunk in first + second + third for i in chunk.event_ids]
    assert given == [e.event_id for e in snaps[:8]]
    tail = await box.peek(100, after=third[-1].seq)
    assert [i for c in tail for i in c.event_ids] == [e.event_id for e in snaps[8:]]
    assert await box.peek(100, after=tail[-1].seq) == []
    assert box.stats().queued == 12  # an empty answer past a seq says nothing of the outbox
    # Start over with two batches being sent; room for 8 more: the oldest droppable chunks
    # go, but not those two.
    first = await box.peek(2)
    second = await box.peek(2, after=first[-1].seq)
    sent = [i for chunk in first + second for i in chunk.event_ids]
    await box.put(_events(EventKind.SNAPSHOT, "b2", 8, size=500))
    kept = await _ids(box)
    assert all(i in kept for i in sent), "a chunk being sent was dropped"
    dropped = [e.event_id for e in snaps if e.event_id not in kept]
    assert dropped and dropped == [e.event_id for e in snaps[4 : 4 + len(dropped)]]
    await box.close()
