"""Telemetry end to end: snapshots of the whole tree, GPU attribution (fake NVML), log lines,
lifecycle events, delivery through outages, 429 and no token. Real server, real processes."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

from argus_agent.daemon import Agent
from argus_agent.devserver import DevServer
from argus_agent.telemetry.gpu import FakeGpuBackend, GpuDevice, GpuReader
from tests.support import (
    FIXTURES,
    ArgusUser,
    RunningAgent,
    alive,
    eventually,
    register,
    server_events,
)

PY = shlex.quote(sys.executable)
FAST = {"interval_s": 0.5, "log_poll_s": 0.1}


def _settings(make_settings, token: str, **telemetry):
    return make_settings(server={"token": token}, telemetry={**FAST, **telemetry})


async def _stop_and_wait(argus: ArgusUser, server: DevServer, *batches: str) -> None:
    """Press Stop on each batch, then wait until the agent acked each stop and reported each
    job's end: the jobs and their supervisors must not outlive the test (and its agent)."""
    for batch in batches:
        argus.stop(batch)
    for batch in batches:
        ack = await eventually(lambda b=batch: argus.acked(b, "stop"), what=f"stop ack of {batch}")
        assert ack["status"] == "started", ack
        end = await eventually(
            lambda b=batch: server_events(server.url, b, "batch_failed"), what=f"end of {batch}"
        )
        assert end[0]["data"]["error"] == (
            "killed by signal 15 (SIGTERM), stopped on request of alice"
        )


async def test_a_job_with_20_children_and_a_grandchild_is_sampled_as_22_processes(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    settings = _settings(make_settings, user_token)
    await register(settings, user_token)
    ready = tmp_path / "ready"
    async with RunningAgent(settings):
        batch = argus.rerun(
            argus.record_batch(f"exec {PY} {FIXTURES / 'spawn_tree.py'} {ready} 20")
        )
        await eventually(ready.exists, what="the tree")
        snap = await eventually(
            lambda: next(
                (
                    e
                    for e in reversed(server_events(server.url, batch, "resource_snapshot"))
                    if e["data"]["num_procs"] == 22
                ),
                None,
            ),
            what="a snapshot of 22 processes",
        )
        data = snap["data"]
        for key in (
            "cpu_util_pct",
            "ram_mb",
            "ram_total_mb",
            "disk_free_mb",
            "disk_total_mb",
            "proc_cpu_pct",
            "proc_ram_mb",
            "proc_gpu_mem_mb",
            "gpu_util_pct",
            "gpu_mem_mb",
            "gpu_mem_total_mb",
            "gpu_temp_c",
        ):
            assert key in data, key
        assert data["proc_ram_mb"] > 22 and data["num_threads"] >= 22
        assert data["ram_total_mb"] > 0 and data["disk_total_mb"] > 0
        assert data["gpu_util_pct"] is None  # no GPU here
        assert snap["source"]["host"] == settings.agent.hostname
        argus.stop(batch)
        await eventually(lambda: server_events(server.url, batch, "batch_failed"), what="end")


async def test_fake_nvml_attributes_gpu_memory_to_the_right_job(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path: Path
) -> None:
    settings = _settings(make_settings, user_token)
    await register(settings, user_token)
    fake = FakeGpuBackend(
        [
            GpuDevice(0, "GPU-aaaa", "Fake A100", 91.0, 30000.0, 40960.0, 71.0, {}),
            GpuDevice(1, "GPU-bbbb", "Fake A100", 12.0, 5000.0, 40960.0, 55.0, {}),
        ]
    )
    agent_settings = settings
    running = RunningAgent(agent_settings)
    running.agent = Agent(agent_settings, gpu_backend=fake)
    async with running:
        one = argus.rerun(argus.record_batch("exec sleep 300"))
        two = argus.rerun(
            argus.record_batch(f"exec {PY} {FIXTURES / 'fork_tree.py'} {tmp_path / 'pids'}")
        )
        await eventually(
            lambda: argus.acked(one, "rerun") and argus.acked(two, "rerun"), what="both running"
        )
        await eventually((tmp_path / "pids").exists, what="job two's tree")
        pid_one = running.agent.jobs.get(one).pid
        grandchild_two = int((tmp_path / "pids").read_text().split()[2])
        # GPU 0: job one (8 GiB) and a process of nobody we know; GPU 1: job two's grandchild.
        fake.set_processes(0, {pid_one: 8192.0, 999_999: 1024.0})
        fake.set_processes(1, {grandchild_two: 2048.0})

        def latest(batch: str) -> dict | None:
            snaps = server_events(server.url, batch, "resource_snapshot")
            return snaps[-1]["data"] if snaps and snaps[-1]["data"]["gpus"] else None

        first = await eventually(lambda: latest(one), what="job one's GPU snapshot")
        second = await eventually(lambda: latest(two), what="job two's GPU snapshot")
        assert first["proc_gpu_mem_mb"] == 8192.0
        assert [g["index"] for g in first["gpus"]] == [0]
        assert first["gpu_util_pct"] == 91.0 and first["gpu_mem_mb"] == 30000.0
        assert first["gpu_mem_total_mb"] == 40960.0 and first["gpu_temp_c"] == 71.0
        assert first["gpu_scope"] == "job"
        assert second["proc_gpu_mem_mb"] == 2048.0
        assert [g["index"] for g in second["gpus"]] == [1]
        assert second["gpu_util_pct"] == 12.0 and second["gpu_temp_c"] == 55.0
        tree_two = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
        await _stop_and_wait(argus, server, one, two)
        assert not any(alive(pid) for pid in [pid_one, *tree_two]), "stop ends the whole tree"


async def test_slow_gpu_reads_are_skipped_not_piled_up() -> None:
    fake = FakeGpuBackend([GpuDevice(0, "u", "n", 1.0, 1.0, 2.0, 30.0, {})], delay_s=0.5)
    reader = GpuReader(fake, timeout_s=0.1)
    assert await reader.read() is None  # timed out
    assert await reader.read() is None  # still running: no second call queued
    await asyncio.sleep(0.5)
    fake.delay_s = 0
    assert await reader.read() is not None
    assert fake.reads == 2
    reader.close()


async def test_log_lines_carry_text_stream_level_and_number_and_the_rate_cap_marks_skips(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = _settings(make_settings, user_token)
    await register(settings, user_token)
    async with RunningAgent(settings):
        # Lines of the two streams keep their order when they come apart in time (two pipes
        # read at once cannot order lines written within microseconds of each other).
        batch = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'chatty.py'} 8 0.05 0"))
        done = await eventually(
            lambda: server_events(server.url, batch, "batch_done"), what="batch_done"
        )
        lines = server_events(server.url, batch, "log_line")
        assert [e["data"]["line"] for e in lines] == [
            f"{['INFO', 'WARNING', 'ERROR', 'DEBUG'][i % 4]} step {i}" for i in range(1, 9)
        ]
        assert [e["data"]["line_no"] for e in lines] == list(range(1, 9))
        assert [e["data"]["stream"] for e in lines] == ["stdout", "stderr"] * 4
        assert [e["data"]["level"] for e in lines] == ["warning", "error", "debug", "info"] * 2
        assert done[0]["data"]["n_done"] == 1
        assert argus.batch(batch)["status"] == "done"
    capped = _settings(make_settings, user_token, log_max_lines_per_s=5)
    async with RunningAgent(capped):
        batch = argus.rerun(argus.record_batch(f"{PY} {FIXTURES / 'chatty.py'} 100 0 0"))
        await eventually(lambda: server_events(server.url, batch, "batch_done"), what="end")
        lines = [e["data"] for e in server_events(server.url, batch, "log_line")]
        sent = [d for d in lines if d["stream"] != "agent"]
        markers = [d for d in lines if d["stream"] == "agent"]
        assert 5 <= len(sent) < 100
        skipped = sum(int(m["line"].split()[1]) for m in markers)
        assert len(sent) + skipped == 100, "every line is sent or counted as skipped"
        assert "telemetry.log_max_lines_per_s = 5" in markers[0]["line"]


async def test_lifecycle_events_end_the_batch_with_the_reason(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = _settings(make_settings, user_token)
    await register(settings, user_token)
    async with RunningAgent(settings):
        failing = argus.rerun(argus.record_batch("exit 3"))
        stopped = argus.rerun(argus.record_batch("exec sleep 300"))
        await eventually(lambda: argus.acked(stopped, "rerun"), what="running")
        argus.stop(stopped)
        assert argus.batch(stopped)["status"] == "stopping"
        fail = await eventually(
            lambda: server_events(server.url, failing, "batch_failed"), what="batch_failed"
        )
        assert fail[0]["data"]["error"] == "exit code 3"
        assert fail[0]["data"]["exit_code"] == 3
        stop = await eventually(
            lambda: server_events(server.url, stopped, "batch_failed"), what="stop's batch_failed"
        )
        assert stop[0]["data"]["error"] == (
            "killed by signal 15 (SIGTERM), stopped on request of alice"
        )
        await eventually(
            lambda: argus.batch(stopped)["status"] == "failed", what="the batch to leave 'stopping'"
        )
        assert argus.batch(failing)["status"] == "failed"


async def test_without_a_token_events_stay_in_the_outbox_and_status_says_so(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    settings = make_settings(telemetry=FAST)
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("echo hello; exit 0"))
        await eventually(lambda: running.agent.outbox.stats().queued >= 2, what="queued events")
        assert running.agent.snapshot()["telemetry"]["sender"]["state"] == "no_token"
        assert server_events(server.url, batch, "log_line") == []


async def test_429_on_event_ingest_is_honoured(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    # A REST fault: events must go over REST (over the websocket nothing would meet it).
    settings = make_settings(server={"token": user_token, "transport": "poll"}, telemetry=FAST)
    await register(settings, user_token)
    argus.fault("/api/events/batch", 429, count=1, retry_after=1.0)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("echo one; echo two"))
        await eventually(lambda: running.agent.sender.state.state == "rate_limited", what="the 429")
        limited_at = asyncio.get_running_loop().time()
        await eventually(lambda: server_events(server.url, batch, "batch_done"), what="delivery")
        assert asyncio.get_running_loop().time() - limited_at >= 0.9
        assert [e["data"]["line"] for e in server_events(server.url, batch, "log_line")] == [
            "one",
            "two",
        ]
