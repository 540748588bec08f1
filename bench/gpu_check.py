"""Real-GPU check of the telemetry: does the sampler attribute a job's GPU memory to it?

Needs an NVIDIA GPU with its driver, and a Python with PyTorch for the CUDA job (``--python``).
Launches two jobs the way the agent does (each under its shim): one that allocates
``--gib`` GiB on the GPU and sleeps, one that only sleeps. Then takes resource snapshots of
both through the real NVML backend and prints what each snapshot says, and PASS or FAIL:
the CUDA job must be credited with at least the memory it allocated, on the GPU it uses, and
the other job with none. Also times NVML reads.

Usage: python bench/gpu_check.py [--python python3] [--gib 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argus_agent.config import JobSettings, TelemetrySettings
from argus_agent.jobs.policy import Identity
from argus_agent.jobs.spec import LaunchSpec
from argus_agent.jobs.store import JobStore
from argus_agent.jobs.supervisor import JobManager
from argus_agent.logsetup import configure
from argus_agent.outbox import Outbox
from argus_agent.telemetry.gpu import GpuReader, NvmlBackend
from argus_agent.telemetry.manager import Telemetry

CUDA_JOB = """
import sys, time, torch
x = torch.empty(int({gib} * 2**30), dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
open(sys.argv[1], "w").write(str(torch.cuda.memory_allocated()))
time.sleep(120)
"""


def _identity() -> Identity:
    return Identity.of_uid(os.geteuid())


def _spec(batch: str, argv: list[str], root: Path) -> LaunchSpec:
    return LaunchSpec(
        batch_id=batch,
        cmd_id=batch,
        source_batch_id=None,
        requested_by="check",
        command_line=" ".join(argv),
        argv=tuple(argv),
        cwd=root,
        env=dict(os.environ),
        identity=_identity(),
    )


async def main(python: str, gib: float) -> int:
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
    backend = NvmlBackend()
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        backend.read()
        timings.append(time.perf_counter() - started)
    print(
        f"NVML read of all GPUs: median {statistics.median(timings) * 1000:.2f} ms, "
        f"max {max(timings) * 1000:.2f} ms"
    )
    root = Path(tempfile.mkdtemp(prefix="argus-gpu-check-"))
    box = Outbox(root / "outbox.db", max_bytes=1 << 30)
    await box.start()
    jobs = JobManager(JobStore(root / "jobs"), JobSettings(stop_grace_s=5))
    telemetry = Telemetry(
        TelemetrySettings(interval_s=1.0),
        box,
        jobs,
        GpuReader(backend, timeout_s=5.0),
        hostname="gpu-check",
    )
    ready = root / "ready"
    try:
        cuda = await jobs.launch(
            _spec("cuda-job", [python, "-c", CUDA_JOB.format(gib=gib), str(ready)], root)
        )
        await jobs.launch(_spec("idle-job", ["/bin/sh", "-c", "exec sleep 120"], root))
        deadline = time.time() + 120
        while not ready.exists() and time.time() < deadline:
            await asyncio.sleep(0.5)
        if not ready.exists():
            print("FAIL: the CUDA job did not allocate its memory; its log:")
            print(Path(cuda.log_path).read_text()[-2000:])
            return 1
        allocated_mb = int(ready.read_text()) / 2**20
        print(f"CUDA job pid {cuda.pid} allocated {allocated_mb:.0f} MiB (torch)")
        await telemetry.sample_once()
        await asyncio.sleep(1.2)
        await telemetry.sample_once()
        snaps: dict[str, dict] = {}
        for chunk in await box.peek(1000):
            for body in chunk.bodies:
                event = json.loads(body)
                snaps[event["batch_id"]] = event["data"]
        for batch in ("cuda-job", "idle-job"):
            data = snaps[batch]
            shown = {
                k: data[k]
                for k in (
                    "proc_gpu_mem_mb",
                    "gpu_util_pct",
                    "gpu_mem_mb",
                    "gpu_mem_total_mb",
                    "gpu_temp_c",
                    "gpu_scope",
                    "num_procs",
                    "proc_cpu_pct",
                    "proc_ram_mb",
                )
            }
            print(f"{batch}: {json.dumps(shown)}")
            print(f"{batch} gpus: {json.dumps(data['gpus'])}")
        cuda_mb = snaps["cuda-job"]["proc_gpu_mem_mb"] or 0
        ok = (
            cuda_mb >= allocated_mb
            and len(snaps["cuda-job"]["gpus"]) >= 1
            and snaps["idle-job"]["proc_gpu_mem_mb"] == 0
            and snaps["idle-job"]["gpus"] == []
        )
        print(
            ("PASS" if ok else "FAIL") + f": CUDA job credited {cuda_mb} MiB on GPU(s) "
            f"{[g['index'] for g in snaps['cuda-job']['gpus']]}, idle job "
            f"{snaps['idle-job']['proc_gpu_mem_mb']} MiB"
        )
        return 0 if ok else 1
    finally:
        for record in jobs.running():
            await jobs.stop(record.batch_id, "check")
        for batch in ("cuda-job", "idle-job"):
            if jobs.get(batch):
                await jobs.wait_ended(batch, timeout=20)
        await jobs.shutdown()
        await box.close()
        backend.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3")
    parser.add_argument("--gib", type=float, default=2.0)
    configure("warning")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.python, args.gib)))
