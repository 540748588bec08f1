"""`argus-agent demo` works from the installed console script, on loopback, within 30 s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time


def test_demo_runs_end_to_end() -> None:
    exe = shutil.which("argus-agent") or os.path.join(
        os.path.dirname(sys.executable), "argus-agent"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARGUS_")}
    started = time.monotonic()
    result = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "agent acked started with pid" in out
    assert "Argus shows the batch 'running'" in out
    assert "epoch 1: loss=1.0000" in out
    assert "lr=0.001 optim.name=adam" in out
    assert "job ended: killed by signal 15 (SIGTERM), stopped on request of alice" in out
    assert "agent sends the job's telemetry: resource_snapshot" in out
    assert "Argus shows the batch 'failed'" in out
    assert "summary:" in out and "2 acked" in out and "1 batch_failed" in out
    assert elapsed < 30
