"""Benchmark: press Rerun → the job running under Slurm, and the Slurm launcher's cost per
look at the queue with 100 running jobs.

Part 1 (latency): a test cluster (``tests/slurmenv.py``: munged, slurmctld, slurmd on this
machine, ``SchedulerParameters=batch_sched_delay=0``), the reference server, and a real
``argus-agent run`` process with ``jobs.launcher = "slurm"`` (default ``jobs.slurm_poll_s``
of 2 s; the websocket channel, so commands arrive in milliseconds). Each trial presses Rerun
on a batch whose command first writes the time (``date +%s.%N``), then sleeps; the trial
measures press → ack (the agent ran its checks and sbatch, and acked the Slurm job id) and
press → the job's first instruction on the node, then presses Stop and waits for its end.
Slurm's own share is ack → first instruction (scheduling, the batch step's launch), and a
baseline submits the same script with ``sbatch`` directly.

Part 2 (cost): a second cluster declaring 128 CPUs (``SlurmdParameters=config_overrides``,
``proctrack/linuxproc``) so that 100 ``sleep`` jobs run at once; the launcher (``SlurmJobs``,
in this process) submits them, then ticks: one squeue for all 100, and the copy of each job's
output. Per tick: this process's CPU time, its children's (squeue), wall time and slurmctld's
CPU time; one sstat reading of all 100 separately (every ``jobs.slurm_usage_interval_s``).

Part 3 (served host names): one ``argus-agent run`` process serving ``--served`` host names
(``jobs.slurm_hosts``; it registers them itself), polling each at ``--interval`` over REST
(what Argus v0.3.0 offers), then over one websocket announcing them all; its CPU time and
memory over ``--seconds``, less an agent serving none.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge.
Usage: python bench/slurm.py [--trials 10] [--jobs 100] [--ticks 20] [--served 256]
       [--seconds 30] [--interval 2] [--parts 123]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from argus_agent.config import JobSettings  # noqa: E402
from argus_agent.devserver import DevServer  # noqa: E402
from argus_agent.jobs.policy import Identity  # noqa: E402
from argus_agent.jobs.slurm import SlurmJobs  # noqa: E402
from argus_agent.jobs.slurm_store import SlurmStore  # noqa: E402
from argus_agent.jobs.spec import LaunchSpec  # noqa: E402
from argus_agent.logsetup import configure  # noqa: E402
from tests.slurmenv import started_cluster, unavailable  # noqa: E402
from tests.support import AgentProcess, ArgusUser, agent_env, settings_for  # noqa: E402

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.0f}"


def _range_ms(values: list[float]) -> str:
    return f"{min(values) * 1000:.0f}-{max(values) * 1000:.0f}"


def _wait(check, timeout: float = 60.0, interval: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError("benchmark step timed out")


# -- part 1 ----------------------------------------------------------------------------------


def latency(trials: int) -> None:
    with started_cluster() as cluster, tempfile.TemporaryDirectory(prefix="argus-bench-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        server = DevServer(db_path=Path(tmp) / "argus.sqlite", ingest_rate_limit=False)
        server.start()
        agent = None
        try:
            token = server.create_user("alice")
            argus = ArgusUser(server.url, token)
            settings = settings_for(server.url, Path(tmp), jobs={"launcher": "slurm"})
            env = agent_env(
                settings,
                ARGUS_TOKEN=token,
                SLURM_CONF=str(cluster.conf),
                ARGUS_AGENT_JOBS_LAUNCHER="slurm",
            )
            subprocess.run(
                [sys.executable, "-m", "argus_agent.cli", "register"],
                env=env,
                check=True,
                capture_output=True,
            )
            agent = AgentProcess(env, Path(tmp) / "agent.log")
            asyncio.run(agent.status())
            command = f'date +%s.%N > {work}/"start-$ARGUS_BATCH_ID"; exec sleep 300'
            source = argus.record_batch(command, cwd=str(work))
            to_ack, to_start, slurm_share = [], [], []
            for _ in range(trials):
                pressed = time.time()
                batch = argus.rerun(source)
                ack = _wait(lambda b=batch: argus.acked(b, "rerun"), interval=0.005)
                acked = time.time()  # seen within 5 ms (plus one HTTP round trip)
                started_file = work / f"start-{batch}"
                _wait(lambda f=started_file: f.exists() and f.read_text().strip())
                started = float(started_file.read_text())
                to_ack.append(acked - pressed)
                to_start.append(started - pressed)
                slurm_share.append(started - acked)
                argus.stop(batch)
                _wait(lambda j=ack["pid"]: j not in cluster.active(), interval=0.05)
            direct_call, direct_start = [], []
            for i in range(trials):
                started_file = work / f"direct-{i}"
                before = time.time()
                job = cluster.submit(
                    f"--chdir={work}", script=f"date +%s.%N > {started_file}; exec sleep 300"
                )
                returned = time.time()
                _wait(lambda f=started_file: f.exists() and f.read_text().strip())
                direct_call.append(returned - before)
                direct_start.append(float(started_file.read_text()) - before)
                cluster.cancel(job)
        finally:
            if agent is not None:
                agent.stop()
            server.stop()
    print(f"part 1: Rerun → job running under Slurm, {trials} trials (ms)")
    print("                                          median   range")
    print(f"press Rerun → acked (agent + sbatch)     {_median_ms(to_ack)}   {_range_ms(to_ack)}")
    print(
        f"press Rerun → job's first instruction    {_median_ms(to_start)}   {_range_ms(to_start)}"
    )
    print(
        f"  of it Slurm: ack → first instruction   {_median_ms(slurm_share)}   "
        f"{_range_ms(slurm_share)}"
    )
    print(
        f"direct sbatch call (baseline)            {_median_ms(direct_call)}   "
        f"{_range_ms(direct_call)}"
    )
    print(
        f"direct sbatch → first instruction        {_median_ms(direct_start)}   "
        f"{_range_ms(direct_start)}"
    )
    share = statistics.median(slurm_share) / statistics.median(to_start) * 100
    print(f"Slurm's share of press → running: {share:.0f} %")


# -- part 2 ----------------------------------------------------------------------------------


def _slurmctld_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def _cost(cluster, root: Path, count: int, ticks: int) -> None:  # type: ignore[no-untyped-def]
    work = root / "work"
    work.mkdir()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    settings = JobSettings(launcher="slurm", run_as="root", allow_root=True)
    jobs = SlurmJobs(SlurmStore(root / "slurm"), settings)
    jobs.adopt_existing()
    assert jobs._watcher is not None
    jobs._watcher.cancel()  # the benchmark ticks by itself
    identity = Identity.of_uid(0)
    submit = []
    for i in range(count):
        spec = LaunchSpec(
            batch_id=f"bench-{i:03d}",
            cmd_id=f"c{i}",
            source_batch_id=None,
            requested_by="bench",
            command_line="sleep 600",
            argv=("/bin/sh", "-c", "echo started; exec sleep 600"),
            cwd=work,
            env={"PATH": "/usr/bin:/bin", **identity.login_env()},
            identity=identity,
        )
        began = time.perf_counter()
        await jobs.launch(spec)
        submit.append(time.perf_counter() - began)
    deadline = time.monotonic() + 120
    while len([s for s in cluster.active().values() if s == "RUNNING"]) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {cluster.active()} running")
        await asyncio.sleep(0.5)
    ctld = cluster._procs["slurmctld"].pid
    jobs._next_usage = float("inf")
    await jobs.tick()  # states and first output copies settle
    own, children, wall, ctld_cpu = [], [], [], []
    for _ in range(ticks):
        await asyncio.sleep(0.5)
        t0, c0, k0 = time.process_time(), os.times(), _slurmctld_ticks(ctld)
        w0 = time.perf_counter()
        await jobs.tick()
        wall.append(time.perf_counter() - w0)
        own.append(time.process_time() - t0)
        c1 = os.times()
        children.append(
            (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
        )
        ctld_cpu.append((_slurmctld_ticks(ctld) - k0) / TICKS_PER_S)
    running = [j for j in jobs._jobs.values() if j.record.slurm_state == "RUNNING"]
    w0, t0, c0 = time.perf_counter(), time.process_time(), os.times()
    await jobs._read_usage(running)
    usage_wall, usage_own = time.perf_counter() - w0, time.process_time() - t0
    c1 = os.times()
    usage_child = (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
    read = len(jobs.latest)
    await jobs.shutdown()
    cluster.cancel_all(timeout=60)
    poll = settings.slurm_poll_s
    mean = statistics.mean
    print(f"\npart 2: {count} running Slurm jobs, {ticks} ticks (one squeue + output copies each)")
    print(f"submit (sbatch via the launcher), median ms per job     {_median_ms(submit)}")
    print("per tick                       mean ms   p95 ms   % core at one tick / 2 s")
    for name, values in (
        ("agent process CPU", own),
        ("its children (squeue) CPU", children),
        ("slurmctld CPU", ctld_cpu),
        ("wall time", wall),
    ):
        p95 = sorted(values)[int(len(values) * 0.95) - 1]
        core = mean(values) / poll * 100
        print(f"{name:28s} {mean(values) * 1000:8.1f} {p95 * 1000:8.1f}   {core:6.2f}")
    print(
        f"one sstat reading of {read} jobs: wall {usage_wall * 1000:.0f} ms, agent CPU "
        f"{usage_own * 1000:.1f} ms, sstat CPU {usage_child * 1000:.0f} ms "
        f"(every jobs.slurm_usage_interval_s = {settings.slurm_usage_interval_s:g} s)"
    )


def cost(count: int, ticks: int) -> None:
    options = {
        "cpus": 128,
        "cgroups": False,
        "memory_mb": 16000,
        "extra_conf": ["SlurmdParameters=config_overrides"],
    }
    with started_cluster(**options) as cluster, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_cost(cluster, Path(tmp), count, ticks))


# -- part 3 ----------------------------------------------------------------------------------


def _served_run(
    cluster,  # type: ignore[no-untyped-def]
    server: DevServer,
    token: str,
    root: Path,
    transport: str,
    names: list[str],
    seconds: float,
    interval: float,
) -> dict[str, float]:
    """One agent process serving ``names`` over ``transport``: the time until every name
    is registered and served, then its CPU time and memory over ``seconds``."""
    settings = settings_for(server.url, root, jobs={"launcher": "slurm"})
    env = agent_env(
        settings,
        ARGUS_TOKEN=token,
        SLURM_CONF=str(cluster.conf),
        ARGUS_AGENT_JOBS_LAUNCHER="slurm",
        ARGUS_AGENT_JOBS_SLURM_HOSTS=json.dumps(names),
        ARGUS_AGENT_SERVER_TRANSPORT=transport,
        ARGUS_AGENT_AGENT_POLL_INTERVAL_S=str(interval),
        ARGUS_AGENT_AGENT_HEARTBEAT_INTERVAL_S=str(interval),
    )
    subprocess.run(
        [sys.executable, "-m", "argus_agent.cli", "register"],
        env={**env, "ARGUS_AGENT_JOBS_SLURM_HOSTS": "[]"},  # the daemon registers the names
        check=True,
        capture_output=True,
    )
    started = time.monotonic()
    agent = AgentProcess(env, root / "agent.log")
    try:
        asyncio.run(agent.status())
        want = len(names)

        def serving() -> bool:
            doc = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "argus_agent.cli", "status", "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            states = (doc.get("served_hosts") or {}).get("states") or {}
            ok = states.get("connected", 0) + states.get("websocket", 0)
            return ok == want and (transport == "poll" or doc["channel"]["kind"] == "websocket")

        _wait(serving, timeout=300, interval=0.2)
        ready_s = time.monotonic() - started
        time.sleep(2 * interval)  # past the first round of polls
        proc = psutil.Process(agent.proc.pid)
        before = proc.cpu_times()
        time.sleep(seconds)
        after = proc.cpu_times()
        rss_mb = proc.memory_info().rss / 2**20
    finally:
        agent.stop()
    cpu = (after.user + after.system) - (before.user + before.system)
    return {"ready_s": ready_s, "cpu_s": cpu, "rss_mb": rss_mb}


def served(count: int, seconds: float, interval: float) -> None:
    """What serving ``count`` host names costs one agent: over REST polling (Argus v0.3.0:
    one poll per name per interval) and over one websocket announcing them all."""
    names = [f"gpu-node-{i:03d}" for i in range(count)]
    with started_cluster() as cluster, tempfile.TemporaryDirectory(prefix="argus-bench-") as tmp:
        server = DevServer(
            db_path=Path(tmp) / "argus.sqlite", ingest_rate_limit=False, poll_interval_s=interval
        )
        server.start()
        try:
            token = server.create_user("alice")
            runs = {
                (transport, n): _served_run(
                    cluster,
                    server,
                    token,
                    Path(tmp) / f"{transport}-{n}",
                    transport,
                    names[:n],
                    seconds,
                    interval,
                )
                for transport, n in (("poll", 0), ("poll", count), ("auto", 0), ("auto", count))
            }
        finally:
            server.stop()
    print(
        f"part 3: {count} served host names, one agent process, poll interval {interval:g} s, "
        f"{seconds:g} s measured"
    )
    print("channel      names  ready s  agent CPU % core  RSS MB  CPU µs per poll")
    for (transport, n), run in runs.items():
        polls = n * seconds / interval
        base = runs[(transport, 0)]
        extra = run["cpu_s"] - base["cpu_s"]
        per_poll = f"{extra / polls * 1e6:15.0f}" if polls and transport == "poll" else " " * 15
        label = "REST polling" if transport == "poll" else "websocket   "
        print(
            f"{label} {n:6d} {run['ready_s']:8.1f} {run['cpu_s'] / seconds * 100:17.2f} "
            f"{run['rss_mb']:7.1f} {per_poll}"
        )
    poll_extra = runs[("poll", count)]["cpu_s"] - runs[("poll", 0)]["cpu_s"]
    per_name = poll_extra / seconds / count * 100
    rss_per_name = (runs[("poll", count)]["rss_mb"] - runs[("poll", 0)]["rss_mb"]) / count
    print(
        f"per served name over REST at Argus' 10 s interval: {per_name * interval / 10:.4f} % "
        f"of a core, {rss_per_name * 1024:.0f} KiB; one agent process per name instead: "
        f"{runs[('poll', 0)]['rss_mb']:.0f} MiB each"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--served", type=int, default=256, help="served host names (part 3)")
    parser.add_argument("--seconds", type=float, default=30.0, help="part 3's measuring time")
    parser.add_argument("--interval", type=float, default=2.0, help="part 3's poll interval")
    parser.add_argument("--parts", default="123", help="which parts to run, e.g. 3")
    args = parser.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"cannot run: {why}")
    configure("warning")
    slurm = subprocess.run(["slurmd", "-V"], capture_output=True, text=True).stdout.strip()
    print(
        f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {slurm}"
    )
    if "1" in args.parts:
        latency(args.trials)
    if "2" in args.parts:
        cost(args.jobs, args.ticks)
    if "3" in args.parts:
        served(args.served, args.seconds, args.interval)


if __name__ == "__main__":
    main()
