"""The supervisor under trouble: a failing disk, a killed shim, an interrupted launch."""

from __future__ import annotations

import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path

from argus_agent.audit import AuditLog
from argus_agent.dispatcher import Dispatcher
from argus_agent.jobs.store import JobRecord, JobStore
from tests.support import ArgusUser, RunningAgent, alive, eventually, register, server_events

PY = shlex.quote(sys.executable)


async def test_jobs_start_with_no_signal_ignored(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        # grep, unlike a Python job, changes no signal disposition of its own
        batch = argus.rerun(argus.record_batch("exec grep SigIgn /proc/self/status"))
        ended = await eventually(
            lambda: (r := running.agent.jobs.get(batch)) and r.ended_at is not None and r,
            what="job end",
        )
        mask = int(Path(ended.log_path).read_text().split()[1], 16)
        for sig in (
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGPIPE,
            signal.SIGTERM,
        ):
            assert not mask & (1 << (sig - 1)), f"{sig.name} is ignored in the job"


async def test_a_log_the_disk_refuses_does_not_kill_the_job_or_lose_its_exit(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    go = tmp_path / "go"
    flood = (
        f"while [ ! -e {go} ]; do sleep 0.05; done; "
        f"{PY} -c 'for i in range(5000): print(\"x\" * 50, i)'; exit 5"
    )
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(flood))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        shim = running.agent.jobs.get(batch).shim_pid
        # From now on the shim may write only 2 KiB more to any file: writes fail (EFBIG).
        resource.prlimit(shim, resource.RLIMIT_FSIZE, (2048, 2048))
        go.touch()
        ended = await eventually(
            lambda: (r := running.agent.jobs.get(batch)) and r.ended_at is not None and r,
            timeout=20,
            what="job end",
        )
    assert ended.exit_code == 5, "the job ran to its own end, unharmed by the log"
    assert ended.log_truncated
    assert "writing the log failed" in (ended.log_error or "")


TICKER = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"


async def test_a_killed_shim_never_kills_its_job(
    argus: ArgusUser, make_settings, user_token: str, server
) -> None:
    """SIGKILL the job's supervisor: the job keeps running and printing, its output keeps
    reaching its log and Argus, a stop still ends it, and its real exit status is reported."""
    settings = make_settings(
        server={"token": user_token},
        jobs={"stop_grace_s": 1.0},
        telemetry={"interval_s": 0.5, "log_poll_s": 0.1},
    )
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(TICKER))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        log_path = Path(record.log_path)
        await eventually(lambda: log_path.read_text().count("\n") > 3, what="first ticks")
        os.kill(record.shim_pid, signal.SIGKILL)
        await eventually(lambda: not alive(record.shim_pid), what="shim gone")
        lines_at_kill = log_path.read_text().count("\n")
        # Printing into a pipe whose only reader died would kill the job (SIGPIPE).
        await eventually(
            lambda: log_path.read_text().count("\n") > lines_at_kill + 10,
            what="ticks written after the supervisor died",
        )
        assert alive(record.pid), "the job must survive its supervisor"
        assert running.agent.jobs.get(batch).running
        late = log_path.read_text().splitlines()[-1]
        await eventually(
            lambda: (
                late in [e["data"]["line"] for e in server_events(server.url, batch, "log_line")]
            ),
            what="a line written after the supervisor died to reach Argus",
        )
        argus.stop(batch)
        cmd = await eventually(lambda: argus.acked(batch, "stop"), what="stop ack")
        assert cmd["status"] == "started" and cmd["pid"] == record.pid
        await eventually(lambda: not alive(record.pid), timeout=5, what="job stopped")
        ended = await running.agent.jobs.wait_ended(batch, timeout=10)
        # The agent is the job's subreaper: it learns the real status.
        assert ended.exit_signal == signal.SIGTERM
        assert ended.describe_exit() == (
            "killed by signal 15 (SIGTERM), stopped on request of alice"
        )
        lines = log_path.read_text().splitlines()
        assert lines == [f"tick {i}" for i in range(len(lines))], "no line lost or torn"
        failed = await eventually(
            lambda: server_events(server.url, batch, "batch_failed"), what="batch_failed"
        )
        assert "killed by signal 15" in failed[0]["data"]["error"]


async def test_a_job_that_ends_after_its_shim_was_killed_reports_its_exit_code(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("sleep 1; echo done; exit 3"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        os.kill(record.shim_pid, signal.SIGKILL)
        ended = await running.agent.jobs.wait_ended(batch, timeout=10)
        assert ended.exit_code == 3 and ended.describe_exit() == "exit code 3"
        assert Path(ended.log_path).read_text() == "done\n"


async def test_after_an_agent_restart_a_killed_shims_job_is_reported_without_a_made_up_status(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    """With the agent gone too, nobody can learn the job's status: say so."""
    settings = make_settings()
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("exec sleep 300"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
    os.kill(record.shim_pid, signal.SIGKILL)
    await eventually(lambda: not alive(record.shim_pid), what="shim gone")
    os.kill(record.pid, signal.SIGKILL)
    await eventually(lambda: not alive(record.pid), what="job gone")
    async with RunningAgent(settings) as running:
        ended = running.agent.jobs.get(batch)
        assert ended.state == "ended"
        assert "exit status unknown" in ended.describe_exit()


async def test_what_a_job_left_running_is_stopped_when_its_shim_and_main_process_are_gone(
    argus: ArgusUser, make_settings, user_token: str, tmp_path: Path
) -> None:
    """The shim stops what a job leaves behind when its main process ends; with the shim
    killed and the agent away when the main process ended, the agent does it on its return:
    nothing a job started outlives it, however its supervisor ended."""
    settings = make_settings()
    await register(settings, user_token)
    marker = tmp_path / "leftover.pid"
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(f"sleep 300 & echo $! > {marker}; exec sleep 2"))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        await eventually(lambda: marker.exists() and marker.read_text().strip(), what="pid")
    leftover = int(marker.read_text())
    os.kill(record.shim_pid, signal.SIGKILL)
    await eventually(lambda: not alive(record.shim_pid), what="shim gone")
    await eventually(lambda: not alive(record.pid), what="the main process ended", timeout=10)
    assert alive(leftover)
    async with RunningAgent(settings) as running:
        assert running.agent.jobs.get(batch).state == "ended"
        await eventually(lambda: not alive(leftover), what="the leftover stopped", timeout=15)


async def test_a_launch_interrupted_by_a_crash_is_acked_failed_not_started(
    make_settings, user_token: str, tmp_path: Path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    store = JobStore(settings.agent.state_dir / "jobs")
    # The agent died after writing the job's intent, before its shim reported the exec.
    store.create(
        JobRecord(
            batch_id="rerun-00000000cafe",
            cmd_id="c-1",
            command_line="x",
            argv=["x"],
            cwd="/",
            log_path="/dev/null",
            launched_at=time.time(),
        )
    )
    async with RunningAgent(settings) as running:
        record = running.agent.jobs.get("rerun-00000000cafe")
        assert record.state == "ended" and "interrupted" in record.describe_exit()
        from argus_agent.protocol import Command

        dispatcher = Dispatcher(
            running.agent.ledger,
            running.agent.jobs,
            settings,
            audit=AuditLog(tmp_path / "audit.log"),
        )
        running.agent.ledger.begin("c-1", "rerun", "rerun-00000000cafe")  # the old claim
        acks = []

        async def ack(cmd_id, status, pid, error):
            acks.append((cmd_id, status, pid, error))

        await dispatcher.handle(
            Command(id="c-1", kind="rerun", batch_id="rerun-00000000cafe", payload={}), ack
        )
        assert acks == [
            (
                "c-1",
                "failed",
                None,
                "the launch was interrupted by an agent restart; request the rerun again",
            )
        ]


async def test_an_agent_restart_during_a_takeover_does_not_cost_the_job_its_output(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    """The output keeper is a process of its own: the job keeps a reader while no agent runs."""
    settings = make_settings(jobs={"stop_grace_s": 1.0})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch(TICKER))
        await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
        record = running.agent.jobs.get(batch)
        log_path = Path(record.log_path)
        os.kill(record.shim_pid, signal.SIGKILL)
        await eventually(
            lambda: (log_path.parent / "keeper.json").exists(), what="the output keeper"
        )
    lines_while_down = log_path.read_text().count("\n")
    await eventually(
        lambda: log_path.read_text().count("\n") > lines_while_down + 10,
        what="ticks written while no agent runs",
    )
    assert alive(record.pid)
    async with RunningAgent(settings) as running:
        assert running.agent.jobs.get(batch).running
        argus.stop(batch)
        await eventually(lambda: not alive(record.pid), timeout=5, what="job stopped")
        ended = await running.agent.jobs.wait_ended(batch, timeout=10)
        assert ended.stop_requested_at is not None
    lines = log_path.read_text().splitlines()
    assert lines == [f"tick {i}" for i in range(len(lines))], "no line lost or torn"
