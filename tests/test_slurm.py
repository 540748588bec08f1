"""The Slurm launcher end to end: a real single-node Slurm (``tests/slurmenv.py``), the
reference server on a real socket, real agents (in the test's loop, or as processes that get
SIGKILLed), real users.

Rerun through sbatch with the resources of a recorded snapshot; as the batch's owner through
runuser; stop of a running and of a pending job; the end states Slurm reports (COMPLETED,
FAILED, OUT_OF_MEMORY, CANCELLED, TIMEOUT) and the end learned from the job's exit file once
Slurm has forgotten it; a submission Slurm rejects; re-adoption after the agent was killed;
recorded SLURM_* values that try to smuggle sbatch options in.
"""

from __future__ import annotations

import asyncio
import json
import pwd
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from argus_agent.jobs.slurm_store import SLURM_DIR, SlurmJobRecord, SlurmStore
from tests.slurmenv import SlurmCluster
from tests.support import (
    FIXTURES,
    AgentProcess,
    ArgusUser,
    RunningAgent,
    agent_env,
    cli,
    eventually,
    register,
    server_events,
    shared_tmp_dir,
    temp_os_user,
)

PY = shlex.quote(sys.executable)
REPORT = FIXTURES / "report_all.py"
SYSTEM_PY = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A working directory every user may enter, removed at the end."""
    with shared_tmp_dir("argus-slurm-work-", 0o755) as path:
        yield path


@pytest.fixture
def os_user() -> Iterator[pwd.struct_passwd]:
    """A real OS user with a home directory, removed (home and all) at the end."""
    with temp_os_user("argsl") as user:
        yield user


def lost_submission(store: SlurmStore, batch: str, cwd: Path) -> SlurmJobRecord:
    """The record of a submission whose sbatch answer was never read (the agent died)."""
    return SlurmJobRecord(
        batch_id=batch,
        cmd_id=f"c-{batch}",
        command_line="sleep 120",
        argv=["/bin/sh", "-c", "sleep 120"],
        cwd=str(cwd),
        log_path=str(store.job_dir(batch) / "output.log"),
        launched_at=time.time(),
        run_as="root",
        uid=0,
        gid=0,
        slurm_output_dir=str(cwd / f"argus-{batch}"),
    )


async def _report(path: Path, timeout: float = 20.0) -> dict:
    """What the job reported about itself (``report_all.py``)."""
    await eventually(path.exists, timeout=timeout, what=f"the job's report {path}")
    return json.loads(path.read_text())


async def _ended(running: RunningAgent, batch: str, timeout: float = 30.0) -> SlurmJobRecord:
    assert running.agent.jobs is not None
    record = await running.agent.jobs.wait_ended(batch, timeout=timeout)
    assert isinstance(record, SlurmJobRecord)
    return record


def _lifecycle(argus: ArgusUser, batch: str) -> list[dict]:
    return [
        e
        for e in server_events(argus.url, batch)
        if e["event_type"] in ("batch_done", "batch_failed")
    ]


# -- rerun ---------------------------------------------------------------------------------


async def test_rerun_submits_the_recorded_command_with_the_recorded_resources(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    work = tmp_path / "work dir's $HOME"  # quoted wherever it goes (no shell expands it)
    work.mkdir()
    report = tmp_path / "report.json"
    recorded = {
        "FROM_PAYLOAD": "yes",
        "MULTI_LINE": "one\ntwo",
        "REPORT_PATH": str(report),
        "SLEEP_S": "60",
        # The original allocation, as sbatch's output variables recorded it.
        "SLURM_JOB_ID": "4711",
        "SLURM_JOB_PARTITION": "second",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_CPUS_PER_TASK": "2",
        "SLURM_MEM_PER_NODE": "200",
        "SLURM_JOB_NAME": "train-big",
        "SLURM_JOB_NODELIST": "gpu-node-07",
        "CUDA_VISIBLE_DEVICES": "3",
        # An input variable of sbatch: must neither choose the partition nor reach the job.
        "SBATCH_PARTITION": "debug",
    }
    source = argus.record_batch(f"{PY} {REPORT} --epochs 3", cwd=str(work), env=recorded)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source, {"lr": 0.01, "name": "it's big"})
        seen = await _report(report)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the ack")
        assert ack["status"] == "started"
        record = running.agent.jobs.get(batch)
        assert isinstance(record, SlurmJobRecord)
        job_id = record.slurm_job_id
        assert ack["pid"] == job_id == record.pid  # acked with the Slurm job id
        # The resources of the original run.
        job = slurm.job(job_id)
        assert job["Partition"] == "second"
        assert job["NumCPUs"] == "2" and job["CPUs/Task"] == "2"
        assert job["MinMemoryNode"] == "200M"
        assert job["JobName"] == "train-big"
        assert job["NumNodes"] == "1"
        assert job["ReqNodeList"] == "(null)"  # not pinned: jobs.slurm_pin_node is off
        # The command, its overrides, cwd and environment.
        assert seen["argv"] == ["--epochs", "3", "lr=0.01", "name=it's big"]
        assert seen["cwd"] == str(work)
        env = seen["env"]
        assert env["FROM_PAYLOAD"] == "yes" and env["MULTI_LINE"] == "one\ntwo"
        assert env["ARGUS_BATCH_ID"] == batch and env["ARGUS_SOURCE_BATCH_ID"] == source
        assert env["ARGUS_URL"] == settings.server.url
        assert "ARGUS_TOKEN" not in env  # the reporter token stays with the agent
        assert env["SLURM_JOB_ID"] == str(job_id)  # the new job's, not the recorded 4711
        assert "SBATCH_PARTITION" not in env and "CUDA_VISIBLE_DEVICES" not in env
        # The job's output reaches Argus as log lines.
        lines = await eventually(
            lambda: [e["data"]["line"] for e in server_events(argus.url, batch, "log_line")],
            what="log lines",
        )
        assert "report written" in lines
        assert "ERROR: a line on stderr" in lines  # stderr goes to the same --output
        # Status and `argus-agent jobs` show the Slurm job.
        status = running.agent.snapshot()
        shown = next(j for j in status["jobs"] if j["batch_id"] == batch)
        assert shown["pid"] == job_id
        await eventually(lambda: running.agent.jobs.get(batch).slurm_state == "RUNNING")
        status = running.agent.snapshot()
        shown = next(j for j in status["jobs"] if j["batch_id"] == batch)
        assert shown["slurm"]["state"] == "RUNNING"
        assert shown["slurm"]["nodes"] == slurm.node
        assert status["slurm"]["queue_error"] is None
        # Its resources, as sstat reads them, filed under the node it runs on.
        snapshot = await eventually(
            lambda: server_events(argus.url, batch, "resource_snapshot"), what="a snapshot"
        )
        assert snapshot[0]["source"]["host"] == slurm.node
        data = snapshot[0]["data"]
        assert data["slurm_job_id"] == job_id and data["source"] == "sstat"
        assert data["proc_ram_mb"] > 0 and data["gpu_mem_mb"] is None
        argus.stop(batch)
        ended = await _ended(running, batch)
    assert ended.slurm_state in ("FAILED", "CANCELLED")
    listing = cli("jobs", env=agent_env(settings))
    assert f"slurm:{job_id}" in listing.stdout, listing.stdout + listing.stderr
    log = cli("logs", batch, env=agent_env(settings))
    assert "report written" in log.stdout, log.stdout + log.stderr


async def test_a_system_agent_submits_as_the_batchs_owner_and_refuses_unmapped_owners(
    argus: ArgusUser,
    slurm: SlurmCluster,
    slurm_settings,
    user_token: str,
    os_user: pwd.struct_passwd,
) -> None:
    # alice may rerun batches of this one OS user only (jobs.users), never root's.
    settings = slurm_settings(
        server={"token": user_token},  # reads the batch's recorded user
        jobs={"run_as": None, "allow_root": False, "users": {"alice": os_user.pw_name}},
    )
    await register(settings, user_token)
    home = Path(os_user.pw_dir)
    report = home / "report.json"
    # The user runs the system's Python (the test's may live in root's home) on a copy of
    # the script it can read.
    script = home / "report_all.py"
    shutil.copy(REPORT, script)
    command = f"{SYSTEM_PY} {script}"
    env = {"REPORT_PATH": str(report), "SLEEP_S": "60"}
    source = argus.record_batch(command, cwd=str(home), env=env, user=os_user.pw_name)
    foreign = argus.record_batch(command, cwd="/root", env=env, user="root")
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        seen = await _report(report)
        assert (seen["uid"], seen["gid"]) == (os_user.pw_uid, os_user.pw_gid)
        assert seen["env"]["HOME"] == str(home) and seen["env"]["USER"] == os_user.pw_name
        record = running.agent.jobs.get(batch)
        job = slurm.job(record.slurm_job_id)
        assert job["UserId"] == f"{os_user.pw_name}({os_user.pw_uid})"
        assert job["GroupId"].endswith(f"({os_user.pw_gid})")  # not root's group (sbatch --uid)
        # The output directory is the owner's, private, in the recorded working directory.
        out = Path(record.slurm_output_dir)
        assert out.parent == home and out.stat().st_uid == os_user.pw_uid
        assert out.stat().st_mode & 0o777 == 0o700
        # A batch recorded as root: refused by the policy, nothing submitted for it.
        refused = argus.rerun(foreign)
        ack = await eventually(lambda: argus.acked(refused, "rerun"), what="the refusal")
        assert ack["status"] == "failed"
        assert "root" in ack["error"]
        assert running.agent.jobs.get(refused) is None
        argus.stop(batch)
        ended = await _ended(running, batch)
        assert ended.stop_requested_by == "alice"
    assert slurm.queue()[record.slurm_job_id] in ("FAILED", "CANCELLED")


# -- stop ----------------------------------------------------------------------------------


async def test_stop_of_a_running_job_sends_term_then_cancels_after_the_grace_period(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    grace = 2.0
    settings = slurm_settings(server={"token": user_token}, jobs={"stop_grace_s": grace})
    await register(settings, user_token)
    pid_file = tmp_path / "pid"
    source = argus.record_batch(f"exec {PY} {FIXTURES / 'ignore_term.py'} {pid_file}")
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        await eventually(pid_file.exists, what="the job")
        await eventually(
            lambda: (
                "ignoring SIGTERM" in Path(running.agent.jobs.get(batch).log_path).read_text()
                if Path(running.agent.jobs.get(batch).log_path).exists()
                else False
            ),
            what="the job's handler, in its copied output",
        )
        argus.stop(batch)
        stopped = time.monotonic()
        ack = await eventually(lambda: argus.acked(batch, "stop"), what="the stop ack")
        assert ack["status"] == "started"
        await asyncio.sleep(grace / 2)
        assert running.agent.jobs.get(batch).running  # it ignores TERM: alive within the grace
        ended = await _ended(running, batch, timeout=grace + 15)
        assert time.monotonic() - stopped >= grace * 0.9
        events = await eventually(lambda: _lifecycle(argus, batch), what="the batch's end")
    assert ended.slurm_state == "CANCELLED"
    assert ended.killed_after_grace
    assert [e["event_type"] for e in events] == ["batch_failed"]
    assert "CANCELLED" in events[0]["data"]["error"]
    assert "stopped on request of alice" in events[0]["data"]["error"]


async def test_stop_of_a_pending_job_cancels_it(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str
) -> None:
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    # Every CPU of the node taken, so that the rerun waits in the queue.
    blocker = slurm.submit(f"--cpus-per-task={slurm.cpus}", script="sleep 120")
    await eventually(lambda: slurm.active().get(blocker) == "RUNNING", what="the blocker")
    source = argus.record_batch("sleep 120", env={"SLURM_CPUS_PER_TASK": "1"})
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        record = await eventually(
            lambda: (r := running.agent.jobs.get(batch)) and r.slurm_reason and r,
            what="the rerun pending",
        )
        assert record.slurm_state == "PENDING"
        assert record.slurm_reason in ("Resources", "Priority")
        assert running.agent.snapshot()["jobs"][0]["slurm"]["reason"] == record.slurm_reason
        argus.stop(batch)
        ended = await _ended(running, batch)
        assert argus.acked(batch, "stop")["status"] == "started"
        events = await eventually(lambda: _lifecycle(argus, batch), what="the batch's end")
    assert ended.slurm_state == "CANCELLED"
    assert not ended.killed_after_grace
    assert slurm.queue()[record.slurm_job_id] == "CANCELLED"
    assert slurm.active() == {blocker: "RUNNING"}
    slurm.cancel(blocker)
    assert "CANCELLED" in events[0]["data"]["error"]


async def test_a_stop_that_comes_after_the_job_ended_on_its_own_leaves_its_end_its_own(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    """Seen against the real Argus v0.3.0: the job completed, the agent's next look at the
    queue had not come yet, and Stop arrived. scancel answers "Invalid job id specified"
    (TERM to a completed job, Slurm 22.05); the stop is acked failed saying the job ended
    on its own, and the job is reported done, not "stopped on request", with an elapsed
    time that is never negative (Slurm's end time is whole seconds)."""
    settings = slurm_settings(server={"token": user_token}, jobs={"slurm_poll_s": 600})
    await register(settings, user_token)
    async with RunningAgent(settings) as running:
        batch = argus.rerun(argus.record_batch("true"))
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun")
        await eventually(lambda: slurm.queue().get(ack["pid"]) == "COMPLETED", what="its end")
        assert slurm.job(ack["pid"])["JobName"] == f"argus-{batch}"  # none was recorded
        assert running.agent.jobs.get(batch).running  # the agent has not looked yet
        argus.stop(batch)
        stop = await eventually(lambda: argus.acked(batch, "stop"), what="the stop's ack")
        assert stop["status"] == "failed" and "already ended on its own" in stop["error"], stop
        ended = await _ended(running, batch)
        assert (ended.slurm_state, ended.exit_code, ended.stop_requested_at) == (
            "COMPLETED",
            0,
            None,
        )
        events = await eventually(lambda: _lifecycle(argus, batch), what="its end reported")
    assert [e["event_type"] for e in events] == ["batch_done"]
    assert events[0]["data"]["elapsed_s"] >= 0


# -- how runs end --------------------------------------------------------------------------


async def test_end_states_are_reported_as_slurm_gives_them(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    """COMPLETED, FAILED (exit code), OUT_OF_MEMORY, CANCELLED by someone else, and TIMEOUT:
    Slurm's shortest time limit is a minute, enforced by slurmctld's check every 30 s, so
    this test takes about 90 s; the other ends are learned meanwhile."""
    # Every rerun gets a one-minute limit (Slurm 22.05 records none to recover).
    settings = slurm_settings(server={"token": user_token}, jobs={"slurm_time_limit": "1"})
    await register(settings, user_token)
    done = argus.record_batch("echo fine")
    failed = argus.record_batch("echo failing; exit 3")
    oom = argus.record_batch(
        f"exec {PY} {FIXTURES / 'eat_memory.py'} 400", env={"SLURM_MEM_PER_NODE": "64"}
    )
    cancelled = argus.record_batch("sleep 120")
    too_long = argus.record_batch("echo started; exec sleep 300")
    async with RunningAgent(settings) as running:
        batches = {
            name: argus.rerun(b)
            for name, b in [
                ("done", done),
                ("failed", failed),
                ("oom", oom),
                ("cancelled", cancelled),
                ("timeout", too_long),
            ]
        }
        victim = await eventually(
            lambda: running.agent.jobs.get(batches["cancelled"]), what="submitted"
        )
        await eventually(
            lambda: running.agent.jobs.get(batches["cancelled"]).slurm_state == "RUNNING"
        )
        slurm.run(["scancel", str(victim.slurm_job_id)])  # someone else cancels it
        ends = {name: await _ended(running, b, timeout=180) for name, b in batches.items()}
        for batch in batches.values():
            await eventually(lambda b=batch: _lifecycle(argus, b), what="each batch's end")
    assert (ends["done"].slurm_state, ends["done"].exit_code) == ("COMPLETED", 0)
    assert (ends["failed"].slurm_state, ends["failed"].exit_code, ends["failed"].slurm_exit) == (
        "FAILED",
        3,
        "3:0",
    )
    assert ends["cancelled"].slurm_state == "CANCELLED"
    assert ends["timeout"].slurm_state == "TIMEOUT"
    if slurm.cgroups:  # the memory cgroup's OOM kill (with RSS polling: FAILED 0:9)
        assert ends["oom"].slurm_state == "OUT_OF_MEMORY"
    for name, batch in batches.items():
        events = _lifecycle(argus, batch)
        assert len(events) == 1, (name, events)
        kind, data = events[0]["event_type"], events[0]["data"]
        if name == "done":
            assert kind == "batch_done"
            continue
        assert kind == "batch_failed", name
        assert f"Slurm job {ends[name].slurm_job_id} {ends[name].slurm_state}" in data["error"]
    failed_data = _lifecycle(argus, batches["failed"])[0]["data"]
    assert failed_data["exit_code"] == 3 and "exit code 3" in failed_data["error"]
    assert (
        "more memory than it asked for" in _lifecycle(argus, batches["oom"])[0]["data"]["error"]
        or not slurm.cgroups
    )
    # The last line came before the end (the output is copied before the end is reported).
    lines = [e["data"]["line"] for e in server_events(argus.url, batches["failed"], "log_line")]
    assert lines == ["failing"]


async def test_a_submission_slurm_rejects_is_acked_failed_with_sbatchs_message(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    work = tmp_path / "work"
    work.mkdir()
    source = argus.record_batch("sleep 1", cwd=str(work), env={"SLURM_JOB_PARTITION": "nosuch"})
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the ack")
        assert running.agent.jobs.get(batch) is None
        events = await eventually(lambda: _lifecycle(argus, batch), what="batch_failed")
    assert ack["status"] == "failed"
    assert "Invalid partition name specified" in ack["error"]  # sbatch's own words
    assert ack["error"].startswith("sbatch: error:")
    assert list(work.iterdir()) == []  # the output directory was removed again
    assert not (settings.agent.state_dir / SLURM_DIR / batch).exists()
    assert "Invalid partition name specified" in events[0]["data"]["error"]


# -- hostile recordings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SLURM_JOB_PARTITION", "x --uid=0"),
        ("SLURM_JOB_PARTITION", "debug\n#SBATCH --uid=0"),
        ("SLURM_CPUS_PER_TASK", "1 --uid=0"),
        ("SLURM_MEM_PER_NODE", "100 --gid=0"),
        ("SLURM_GPUS_PER_NODE", "1;touch /tmp/pwned"),
        ("SLURM_JOB_NODELIST", "node1 --uid=0"),
    ],
)
async def test_recorded_slurm_values_that_hide_an_option_are_refused(
    argus: ArgusUser,
    slurm: SlurmCluster,
    slurm_settings,
    user_token: str,
    variable: str,
    value: str,
) -> None:
    settings = slurm_settings(jobs={"slurm_pin_node": True})
    await register(settings, user_token)
    before = slurm.queue()
    source = argus.record_batch("id", env={variable: value})
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the refusal")
        assert running.agent.jobs.get(batch) is None
    assert ack["status"] == "failed"
    assert variable in ack["error"] and "refused" in ack["error"]
    assert slurm.queue() == before  # nothing was submitted


async def test_a_working_directory_slurm_would_read_as_a_pattern_is_refused(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings()
    await register(settings, user_token)
    work = tmp_path / "100%j"  # --output=.../100%j/... would name another file
    work.mkdir()
    source = argus.record_batch("id", cwd=str(work))
    async with RunningAgent(settings):
        batch = argus.rerun(source)
        ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the refusal")
    assert ack["status"] == "failed" and "jobs.slurm_output_dir" in ack["error"]
    assert list(work.iterdir()) == []


# -- agent restarts ------------------------------------------------------------------------


async def test_a_killed_agent_readopts_its_slurm_jobs_and_reports_ends_it_missed(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    env = agent_env(
        settings,
        ARGUS_TOKEN=user_token,
        SLURM_CONF=str(slurm.conf),
        ARGUS_AGENT_JOBS_LAUNCHER="slurm",
        ARGUS_AGENT_JOBS_SLURM_POLL_S="0.2",
        ARGUS_AGENT_JOBS_DEFAULT_CWD=str(settings.jobs.default_cwd),
    )
    long_job = argus.record_batch("echo started; sleep 120")
    short_job = argus.record_batch("echo short; sleep 3; exit 5")
    agent = AgentProcess(env, tmp_path / "agent1.log")
    try:
        await agent.status()
        long_batch, short_batch = argus.rerun(long_job), argus.rerun(short_job)
        for batch in (long_batch, short_batch):
            await eventually(lambda b=batch: argus.acked(b, "rerun"), what="acks")
        ids = {b: argus.acked(b, "rerun")["pid"] for b in (long_batch, short_batch)}
        await eventually(lambda: slurm.active().get(ids[short_batch]) == "RUNNING")
    finally:
        agent.kill()  # SIGKILL: no chance to tidy up
    # The short job ends while no agent watches.
    await eventually(lambda: slurm.queue()[ids[short_batch]] == "FAILED", timeout=20)
    assert slurm.active()[ids[long_batch]] == "RUNNING"
    agent = AgentProcess(env, tmp_path / "agent2.log")
    try:
        status = await agent.status()
        jobs = {j["batch_id"]: j for j in status["jobs"]}
        assert jobs[long_batch]["slurm"]["job_id"] == ids[long_batch]
        events = await eventually(lambda: _lifecycle(argus, short_batch), what="the missed end")
        assert events[0]["event_type"] == "batch_failed"
        assert "exit code 5" in events[0]["data"]["error"]
        # The re-adopted job is stopped as any other.
        argus.stop(long_batch)
        await eventually(lambda: _lifecycle(argus, long_batch), timeout=30, what="its end")
        assert argus.acked(long_batch, "stop")["pid"] == ids[long_batch]
    finally:
        assert agent.stop() == 0
    lines = [e["data"]["line"] for e in server_events(argus.url, short_batch, "log_line")]
    assert lines == ["short"]


async def test_an_end_slurm_forgot_is_read_from_the_jobs_exit_file(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    """A job that ended so long ago that slurmctld forgot it (MinJobAge) and no accounting
    remembers it: the exit status its batch script wrote is what is reported."""
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    out = tmp_path / "argus-rerun-0123456789ab"
    out.mkdir()
    (out / "output.log").write_text("the last words\n")
    (out / "exit_code").write_text("7\n")
    store = SlurmStore(settings.agent.state_dir / SLURM_DIR)
    forgotten = slurm.first_job_id - 1  # never known to this cluster
    store.create(
        SlurmJobRecord(
            batch_id="rerun-0123456789ab",
            cmd_id="c-1",
            command_line="train",
            argv=["/bin/sh", "-c", "train"],
            cwd=str(tmp_path),
            log_path=str(store.job_dir("rerun-0123456789ab") / "output.log"),
            launched_at=time.time() - 3600,
            run_as="root",
            uid=0,
            gid=0,
            pid=forgotten,
            slurm_job_id=forgotten,
            slurm_state="RUNNING",
            slurm_output_dir=str(out),
        )
    )
    async with RunningAgent(settings) as running:
        ended = await _ended(running, "rerun-0123456789ab")
        events = await eventually(lambda: _lifecycle(argus, "rerun-0123456789ab"))
    assert ended.slurm_end_source == "exit file"
    assert (ended.slurm_state, ended.exit_code) == ("FAILED", 7)
    assert "exit code 7" in events[0]["data"]["error"]
    assert "batch script recorded" in events[0]["data"]["error"]
    lines = [e["data"]["line"] for e in server_events(argus.url, "rerun-0123456789ab", "log_line")]
    assert lines == ["the last words"]


async def test_a_submission_whose_answer_was_lost_is_found_by_its_comment_or_ended(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, tmp_path: Path
) -> None:
    """The agent was killed between writing the record and reading sbatch's answer: the job
    is found in the queue by its ``--comment`` and adopted; a record whose job is not there
    ends as interrupted."""
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    store = SlurmStore(settings.agent.state_dir / SLURM_DIR)
    for batch in ("rerun-aaaaaaaaaaaa", "rerun-bbbbbbbbbbbb"):
        store.create(lost_submission(store, batch, tmp_path))
    queued = slurm.submit("--comment=argus-agent:rerun-aaaaaaaaaaaa", script="sleep 120")
    async with RunningAgent(settings) as running:
        found = running.agent.jobs.get("rerun-aaaaaaaaaaaa")
        assert found is not None and found.slurm_job_id == queued and found.pid == queued
        await eventually(
            lambda: running.agent.jobs.get("rerun-aaaaaaaaaaaa").slurm_state == "RUNNING"
        )
        lost = await _ended(running, "rerun-bbbbbbbbbbbb")
        assert "interrupted by an agent restart" in (lost.exit_note or "")
        events = await eventually(lambda: _lifecycle(argus, "rerun-bbbbbbbbbbbb"))
        assert events[0]["event_type"] == "batch_failed"
        await running.agent.jobs.stop("rerun-aaaaaaaaaaaa", "test")
        await _ended(running, "rerun-aaaaaaaaaaaa")
