"""The Slurm launcher against a job's owner who fights back, and a Slurm that fails.

A real single-node Slurm (``tests/slurmenv.py``); Slurm's client programs are wrapped by
scripts put first on the agent's PATH (the agent resolves them once, at start): a ``sbatch``
whose answer names another user's job (what an owner who writes into sbatch's output pipe
achieves), a ``squeue`` that fails, a ``scancel`` that fails once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from argus_agent.errors import JobError
from argus_agent.jobs.slurm_store import SLURM_DIR, SlurmStore
from tests.slurmenv import SlurmCluster
from tests.support import ArgusUser, RunningAgent, eventually, register
from tests.test_slurm import FIXTURES, PY, _ended, _lifecycle, lost_submission

UNREACHABLE = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


def _wrap(bin_dir: Path, name: str, body: str) -> None:
    """A ``name`` in ``bin_dir`` running ``body`` (sh), with $REAL the real program."""
    real = shutil.which(name)
    assert real is not None, f"{name} is not installed"
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nREAL={real}\n{body}\n")
    script.chmod(0o755)


@pytest.fixture
def wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Put a wrapped Slurm program first on PATH (for agents started from now on)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', os.defpath)}")
    return lambda name, body: _wrap(bin_dir, name, body)


async def test_an_sbatch_answer_naming_another_job_is_not_trusted(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, wrapped
) -> None:
    victim = slurm.submit(script="sleep 300")  # somebody else's job (root's, here)
    wrapped("sbatch", f'printf "%s;" {victim}\nexec "$REAL" "$@"')
    settings = slurm_settings(server={"token": user_token}, jobs={"stop_grace_s": 0.5})
    await register(settings, user_token)
    try:
        async with RunningAgent(settings) as running:
            batch = argus.rerun(argus.record_batch("sleep 120"))
            ack = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun ack")
            record = running.agent.jobs.get(batch)
            assert record.slurm_job_id != victim and ack["pid"] == record.slurm_job_id
            assert slurm.job(record.slurm_job_id)["Comment"] == f"argus-agent:{batch}"
            await running.agent.jobs.stop(batch, "test")
            await _ended(running, batch)
            assert slurm.active().get(victim) in ("PENDING", "RUNNING")  # never touched
    finally:
        slurm.cancel(victim)


async def test_a_failing_squeue_at_start_never_ends_a_lost_submission(
    argus: ArgusUser, slurm: SlurmCluster, slurm_settings, user_token: str, wrapped, tmp_path
) -> None:
    """The agent died between writing a record and reading sbatch's answer; at the next
    start the queue cannot be read: nothing is concluded (the job may be queued)."""
    wrapped("squeue", f'echo "{UNREACHABLE}" >&2\nexit 1')
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    batch = "rerun-cccccccccccc"
    store = SlurmStore(settings.agent.state_dir / SLURM_DIR)
    store.create(lost_submission(store, batch, tmp_path))
    async with RunningAgent(settings) as running:
        record = running.agent.jobs.get(batch)
        assert record is not None and record.ended_at is None and record.exit_note is None
        assert _lifecycle(argus, batch) == []
        await running.stop()
    assert store.load(batch).ended_at is None  # looked for again at the next start


async def test_a_stop_whose_term_fails_still_cancels_after_the_grace_period(
    slurm: SlurmCluster, slurm_settings, user_token: str, wrapped, tmp_path: Path, argus
) -> None:
    once = tmp_path / "scancel-failed"
    wrapped(
        "scancel",
        f'if [ ! -e {once} ]; then : > {once}; echo "{UNREACHABLE}" >&2; exit 1; fi\n'
        'exec "$REAL" "$@"',
    )
    settings = slurm_settings(server={"token": user_token})
    await register(settings, user_token)
    pid_file = tmp_path / "pid"
    source = argus.record_batch(f"exec {PY} {FIXTURES / 'ignore_term.py'} {pid_file}")
    async with RunningAgent(settings) as running:
        batch = argus.rerun(source)
        await eventually(
            lambda: (r := running.agent.jobs.get(batch)) is not None and r.slurm_state == "RUNNING",
            what="the job running",
        )
        with pytest.raises(JobError, match="Unable to contact slurm controller"):
            await running.agent.jobs.stop(batch, "test", grace_s=1.0)
        ended = await _ended(running, batch, timeout=30)
    assert once.exists() and ended.slurm_state == "CANCELLED" and ended.killed_after_grace
