"""Damaged and full state on real files: a commit the disk refuses (a real full tmpfs), a
truncated ``outbox.db``, a garbage ``state.db``, job records with fields of the wrong type,
a read-only state dir, and a job whose log the full disk cut short.

Each agent-level test ends with the agent still handling a rerun and a stop. Mounting needs
root (CI runs as root); those tests are skipped otherwise, and every mount is unmounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from argus_agent.control import SOCKET_NAME
from argus_agent.devserver import DevServer
from argus_agent.errors import StateError
from argus_agent.events import EventKind, EventSource, OutEvent, make_event
from argus_agent.jobs.store import JobRecord, JobRecordError, JobStore
from argus_agent.ledger import CommandLedger
from argus_agent.outbox import LogOffset, Outbox
from argus_agent.telemetry.logs import LogTailer
from argus_agent.views import format_status
from tests.support import ArgusUser, RunningAgent, alive, eventually, register, server_events

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to mount a tmpfs (a real full or read-only disk)"
)
SOURCE = EventSource(project="p", host="h")


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on ``path`` (created), always unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the disk is full (no block left); returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _snapshots(batch: str, count: int, size: int = 1000) -> list[OutEvent]:
    return [
        make_event("resource_snapshot", EventKind.SNAPSHOT, batch, SOURCE, {"x": "y" * size})
        for _ in range(count)
    ]


async def _truth(box: Outbox) -> tuple[int, int]:
    """(events, bytes) as the database has them."""
    return await box.call(
        lambda db: db.execute(
            "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(size), 0) FROM events"
        ).fetchone()
    )


async def _status(state_dir: Path) -> dict:
    """The status document, asked on the control socket as `argus-agent status` does."""
    reader, writer = await asyncio.open_unix_connection(str(state_dir / SOCKET_NAME))
    try:
        writer.write(b"status\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return json.loads(line)


async def _rerun_and_stop(argus: ArgusUser, running: RunningAgent) -> None:
    """A new rerun starts and a stop ends it: the agent still does its job."""
    batch = argus.rerun(argus.record_batch("sleep 60"))
    started = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun's ack")
    assert started["status"] == "started", started
    record = running.agent.jobs.get(batch)
    assert record is not None and record.pid is not None
    argus.stop(batch)
    stopped = await eventually(lambda: argus.acked(batch, "stop"), what="the stop's ack")
    assert stopped["status"] == "started", stopped
    ended = await running.agent.jobs.wait_ended(batch, timeout=15)
    assert ended.stop_requested_at is not None
    await eventually(lambda: not alive(record.pid), what="the job to be gone")


def _job(store: JobStore, batch: str) -> Path:
    return store.create(
        JobRecord(
            batch_id=batch,
            cmd_id=f"c-{batch}",
            command_line="train",
            argv=["/bin/sh", "-c", "train"],
            cwd="/",
            log_path=str(store.job_dir(batch) / "output.log"),
            launched_at=time.time() - 60,
        )
    )


# -- item 5: a refused commit leaves the counters true ----------------------------------------


@needs_root
async def test_a_commit_the_full_disk_refuses_changes_no_counter(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        box = Outbox(disk / "outbox.db", max_bytes=20_000, chunk_size=1)
        await box.start()
        try:
            await box.put(_snapshots("b-1", 30))  # over the cap, nothing older to drop
            await box.put(_snapshots("b-1", 30))  # drops the oldest
            drops = await box.unreported_drops()
            assert drops["b-1"]["snapshot"] > 0
            await box.remove([c.seq for c in await box.peek(1000)])  # the server has them
            await box.put(_snapshots("b-1", 10))
            assert await _truth(box) == (box.stats().queued, box.stats().bytes)
            before = box.stats()
            filler = fill(disk)

            # A refused commit of a notice: the count must not say one more is queued.
            notice = make_event("log_line", EventKind.NOTICE, "b-1", SOURCE, {"line": "dropped"})
            with pytest.raises(sqlite3.OperationalError, match="full"):
                await box.mark_drops_reported("b-1", drops["b-1"], notice)
            after = box.stats()
            assert (after.queued, after.bytes, after.dropped) == (
                before.queued,
                before.bytes,
                before.dropped,
            )
            assert await _truth(box) == (before.queued, before.bytes)
            assert (await box.unreported_drops()) == drops

            # A refused put that had to make room: nothing was dropped, nothing added.
            with pytest.raises(sqlite3.OperationalError, match="full"):
                await box.put(_snapshots("b-2", 10))
            assert (box.stats().queued, box.stats().bytes) == (before.queued, before.bytes)
            assert box.stats().dropped == before.dropped
            assert await _truth(box) == (before.queued, before.bytes)
            # The refused snapshots are lost (nobody sends them again): counted for status.
            assert box.stats().lost == {"snapshot": 10}
            assert box.write_errors == 2
            assert "full" in (box.last_write_error or {}).get("error", "")

            filler.unlink()  # space returns
            await box.put(_snapshots("b-1", 1))
            chunks = await box.peek(1000)
            lines = [json.loads(b)["data"].get("line", "") for c in chunks for b in c.bodies]
            assert any("10 resource snapshot(s)" in line and "lost" in line for line in lines), (
                "the batch is told once space returns"
            )
            await box.remove([c.seq for c in chunks])
            # Drained: an empty read and a zero count agree, so a sender goes idle.
            assert await box.peek(1000) == []
            assert (box.stats().queued, box.stats().bytes) == (0, 0) == await _truth(box)
        finally:
            await box.close()


# -- item 11: damaged state is set aside, and the agent serves --------------------------------


async def test_a_truncated_outbox_is_set_aside_and_the_agent_serves(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    state = settings.agent.state_dir
    path = state / "outbox.db"
    box = Outbox(path, max_bytes=1 << 30, chunk_size=10)
    await box.start()
    await box.put(_snapshots("b-old", 300))
    await box.put((), [LogOffset("b-old", 4096, 40)])
    await box.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated copy, a crashed disk
    async with RunningAgent(settings) as running:
        assert running.agent.outbox is not None
        recovered = running.agent.outbox.recovered_from
        assert len(recovered) == 1, recovered
        kept = Path(recovered[0]["path"])
        assert kept.parent == state and kept.name.startswith("outbox.db.corrupt-")
        assert kept.read_bytes() == data[: len(data) // 2], "kept for inspection as it was"
        assert recovered[0]["reason"] and recovered[0]["salvaged_events"] > 0
        # What could be read was kept: the oldest events, the log offsets.
        assert (await running.agent.outbox.log_offsets())["b-old"].offset == 4096
        await _rerun_and_stop(argus, running)
        status = await _status(state)
        assert status["damaged_state"]["recovered"][0]["path"] == str(kept)
        assert kept.name in format_status(status)  # relative to the state dir, to fit 80


async def test_an_outbox_damaged_while_open_is_replaced_keeping_what_is_readable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_bytes=1 << 30, chunk_size=10)
    await box.start()
    try:
        await box.put((), [LogOffset("b-1", 100, 1)])
        await box.put(_snapshots("b-1", 300))
        # Every read goes to the file (no page cache), which now holds the events' pages.
        await box.call(lambda db: db.execute("PRAGMA cache_size=1"))
        await box.call(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        size = path.stat().st_size
        with path.open("r+b") as handle:  # the second half of the file goes bad
            handle.seek(size // 2)
            handle.write(b"\xa5" * (size - size // 2))
        chunks = await box.peek(100_000)
        [recovered] = box.recovered_from
        kept = Path(recovered["path"])
        assert kept.name.startswith("outbox.db.corrupt-") and kept.stat().st_size == size
        assert 0 < recovered["salvaged_events"] < 300
        assert recovered["lost_events"] == 300 - recovered["salvaged_events"]
        assert sum(len(c.event_ids) for c in chunks) == recovered["salvaged_events"]
        assert box.stats().queued == recovered["salvaged_events"] == (await _truth(box))[0]
        assert (await box.log_offsets())["b-1"].offset == 100
        await box.put(_snapshots("b-1", 1))  # the fresh outbox takes events
        assert box.stats().queued == recovered["salvaged_events"] + 1
    finally:
        await box.close()


async def test_a_garbage_state_db_is_set_aside_and_the_agent_serves(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    state = settings.agent.state_dir
    (state / "state.db").write_bytes(b"not a database at all\n" * 500)
    async with RunningAgent(settings) as running:
        assert running.agent.ledger is not None
        recovered = running.agent.ledger.recovered_from
        assert len(recovered) == 1, recovered
        kept = Path(recovered[0]["path"])
        assert kept.name.startswith("state.db.corrupt-") and kept.exists()
        assert "not a database" in recovered[0]["reason"]
        await _rerun_and_stop(argus, running)
        status = await _status(state)
        assert [r["path"] for r in status["damaged_state"]["recovered"]] == [str(kept)]
        assert kept.name in format_status(status)  # relative to the state dir, to fit 80


async def test_job_records_with_wrong_types_are_quarantined_and_the_agent_serves(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    state = settings.agent.state_dir
    store = JobStore(state / "jobs")
    bad_pid = _job(store, "rerun-0000000000aa")
    (bad_pid / "started.json").write_text(
        json.dumps({"pid": "abc", "pgid": 1, "start_ticks": 1, "started_at": time.time()})
    )
    bad_exit = _job(store, "rerun-0000000000bb")
    (bad_exit / "exit.json").write_text(json.dumps({"exit_code": [], "ended_at": time.time()}))
    bad_intent = _job(store, "rerun-0000000000cc")
    (bad_intent / "job.json").write_text(json.dumps({"batch_id": "rerun-0000000000cc"}))
    good = _job(store, "rerun-0000000000dd")
    (good / "exit.json").write_text(json.dumps({"exit_code": 0, "ended_at": time.time()}))
    (good / "reported").touch()
    async with RunningAgent(settings) as running:
        jobs = running.agent.jobs
        assert jobs is not None
        assert [r.batch_id for r in jobs.records()] == ["rerun-0000000000dd"]
        quarantined = {q["batch_id"]: q for q in jobs.store.quarantined}
        assert set(quarantined) == {
            "rerun-0000000000aa",
            "rerun-0000000000bb",
            "rerun-0000000000cc",
        }
        assert "started.json" in quarantined["rerun-0000000000aa"]["reason"]
        assert "pid" in quarantined["rerun-0000000000aa"]["reason"]
        assert "exit_code" in quarantined["rerun-0000000000bb"]["reason"]
        assert "cmd_id" in quarantined["rerun-0000000000cc"]["reason"]
        for entry in quarantined.values():
            moved = Path(entry["path"])
            assert moved.parent == state / "jobs" / ".quarantine" and moved.is_dir()
            assert (moved / "job.json").exists(), "kept whole for inspection"
        status = await _status(state)  # the status socket answers
        assert len(status["damaged_state"]["quarantined_jobs"]) == 3
        assert ".quarantine" in format_status(status)
        await _rerun_and_stop(argus, running)
        assert (await _status(state))["jobs"]


def test_a_job_record_field_of_the_wrong_type_names_file_and_field(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    directory = _job(store, "rerun-0000000000ee")
    (directory / "exit.json").write_text(json.dumps({"exit_code": "7", "ended_at": 1.0}))
    with pytest.raises(JobRecordError, match=r"exit\.json.*exit_code") as caught:
        store.load("rerun-0000000000ee")
    assert caught.value.path == directory / "exit.json"
    (directory / "exit.json").write_text("[1, 2]")
    with pytest.raises(JobRecordError, match="not a JSON object"):
        store.load("rerun-0000000000ee")
    # Read-only listing (`argus-agent jobs`) skips it and moves nothing.
    assert store.load_all() == []
    assert directory.exists()


@needs_root
def test_a_read_only_state_dir_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m") as state:
        (state / "state.db").write_bytes(b"garbage" * 1000)
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        with pytest.raises(StateError) as caught:
            CommandLedger(state / "state.db")
        message = str(caught.value)
        assert str(state / "state.db") in message and "fix" in message
        assert (state / "state.db").exists(), "nothing was moved"
        with pytest.raises(StateError) as opened:
            CommandLedger(state / "other.db")
        assert str(state / "other.db") in str(opened.value) and "fix" in str(opened.value)

        async def start_outbox() -> None:
            box = Outbox(state / "outbox.db", max_bytes=1 << 20)
            try:
                await box.start()
            finally:
                await box.close()

        with pytest.raises(StateError) as outbox:
            asyncio.run(start_outbox())
        assert str(state / "outbox.db") in str(outbox.value) and "fix" in str(outbox.value)


# -- item 12: a full disk loses nothing silently ----------------------------------------------


def test_a_log_the_shim_could_not_write_ends_with_a_marker_once(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "output.log").write_text("one\ntwo\n")
    (job / "output.streams").write_bytes(b"oo")
    (job / "exit.json").write_text(
        json.dumps(
            {
                "exit_code": 0,
                "ended_at": time.time(),
                "log_error": "writing the log failed: No space left on device",
            }
        )
    )
    first = LogTailer("b-1", str(job / "output.log"), SOURCE, max_lines_per_s=0)
    events: list[dict] = []
    while (got := first.read(final=True)) is not None:
        chunks, offset = got
        events += [json.loads(b) for c in chunks for b in c.bodies.split(b"\n")]
    lines = [e["data"]["line"] for e in events]
    assert lines[:2] == ["one", "two"] and len(lines) == 3
    assert "No space left on device" in lines[2] and "after line 2" in lines[2]
    assert events[2]["data"]["stream"] == "agent"
    # Read again after a crash from the committed offset: the same marker (same id, so the
    # server keeps one), and nothing else.
    again = LogTailer("b-1", str(job / "output.log"), SOURCE, max_lines_per_s=0, start=offset)
    chunks, _ = again.read(final=True) or ([], offset)
    assert [c.event_ids for c in chunks] == [[events[2]["event_id"]]]
    assert again.read(final=True) is None


@needs_root
async def test_a_full_disk_while_a_job_runs_is_marked_in_its_stream_and_status(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "st", "8m") as state:
        settings = make_settings(
            server={"token": user_token}, telemetry={"log_poll_s": 0.05, "interval_s": 0.5}
        )
        await register(settings, user_token)
        go, progress = tmp_path / "go", tmp_path / "progress"
        pad = "x" * 100
        command = (
            f'i=0; while [ ! -e {go} ]; do i=$((i+1)); echo "line $i {pad}"; '
            f"echo $i > {progress}; sleep 0.01; done; exit 3"
        )
        async with RunningAgent(settings) as running:
            batch = argus.rerun(argus.record_batch(command))
            await eventually(lambda: argus.acked(batch, "rerun"), what="the ack")
            record = running.agent.jobs.get(batch)
            log_path = Path(record.log_path)
            await eventually(
                lambda: len(server_events(server.url, batch, "log_line")) >= 20, what="lines"
            )
            filler = fill(state)
            written = len(log_path.read_bytes().splitlines())

            def printed() -> int:
                with contextlib.suppress(ValueError, OSError):
                    return int(progress.read_text())
                return 0

            # The job prints on; the shim cannot store its lines (and the page left at the
            # end of the log holds far fewer than 200 of them).
            await eventually(lambda: printed() > written + 200, what="lines the disk refused")
            outbox = running.agent.outbox
            await eventually(lambda: outbox.stats().lost.get("snapshot"), what="a lost snapshot")
            filler.unlink()
            go.touch()
            failed = await eventually(
                lambda: server_events(server.url, batch, "batch_failed"), what="the job's end"
            )
            assert failed[0]["data"]["exit_code"] == 3
            kept = log_path.read_text().splitlines()
            assert len(kept) < printed(), "the disk really lost lines"

            def agent_lines() -> list[str]:
                return [
                    e["data"]["line"]
                    for e in server_events(server.url, batch, "log_line")
                    if e["data"].get("stream") == "agent" or "[argus-agent]" in e["data"]["line"]
                ]

            notices = await eventually(
                lambda: (
                    len(found := agent_lines()) >= 2
                    and any("snapshot" in line for line in found)
                    and found
                ),
                what="the notices of what was lost",
            )
            marker = next(line for line in notices if "No space left on device" in line)
            assert f"after line {len(kept)}" in marker
            sent = [
                e["data"]["line"]
                for e in server_events(server.url, batch, "log_line")
                if e["data"].get("stream") != "agent" and "[argus-agent]" not in e["data"]["line"]
            ]
            assert sent == kept, "every stored line sent once, in order"
            status = running.agent.snapshot()
            job = next(j for j in status["jobs"] if j["batch_id"] == batch)
            assert "No space left on device" in job["log_error"]
            assert status["telemetry"]["lost"]["snapshot"] > 0
            assert status["telemetry"]["write_errors"] > 0
            assert "lost" in format_status(status)
            await _rerun_and_stop(argus, running)
