"""The agent's hold on a job's output pipes, and carrying the output on when the shim is gone.

A job's stdout and stderr are pipes that its shim reads. Were the shim the only reader, a
SIGKILLed shim (the OOM killer, an operator's ``kill``, the job itself) would leave the job
writing into pipes without readers, and the job would die of SIGPIPE at its next print. So
the agent holds read ends of its own (opened through ``/proc/<shim>/fd/N`` and checked by
inode; through the job's own fd 1 and 2 when the shim is already gone) and reads nothing
from them. Once the shim is gone, it hands copies of them to an output keeper
(``shim.py --keep-output``), a small process of its own that carries the output into the
job's log exactly as the shim would (whole lines, the stream sidecar, the size cap), so the
job keeps a reader even when the agent itself is restarted or killed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from argus_agent.fsutil import atomic_write_json
from argus_agent.jobs.procfs import signal_process
from argus_agent.jobs.proctree import is_same_process, start_ticks
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

#: The job's own fd for each stream (used when the shim is already gone).
JOB_FDS = {"o": 1, "e": 2}


class OutputPipes:
    """The agent's read ends of one job's output pipes (stream tag ``o``/``e`` → fd)."""

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds

    @classmethod
    def attach(
        cls, shim_pid: int | None, job_pid: int | None, pipes: dict[str, Any] | None
    ) -> OutputPipes | None:
        """Open read ends of the pipes recorded in ``started.json`` (``pipes``: tag →
        ``{fd, inode}``), through the shim's fd or else the job's own; None when none could
        be opened (then a killed shim still costs the job its output). Blocking, small."""
        fds: dict[str, int] = {}
        for tag, info in (pipes or {}).items():
            if not isinstance(info, dict) or tag not in JOB_FDS:
                continue
            candidates = [(shim_pid, info.get("fd")), (job_pid, JOB_FDS[tag])]
            for pid, fd_number in candidates:
                fd = _open_pipe(pid, fd_number, info.get("inode"))
                if fd is not None:
                    fds[tag] = fd
                    break
        return cls(fds) if fds else None

    def close(self) -> None:
        """Close every read end still open. Idempotent."""
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


def _open_pipe(pid: int | None, fd_number: Any, inode: Any) -> int | None:
    if pid is None or not isinstance(fd_number, int) or not isinstance(inode, int):
        return None
    try:
        fd = os.open(f"/proc/{pid}/fd/{fd_number}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino == inode:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


class OutputKeeper:
    """The process that carries a taken-over job's output into its log (``shim.py
    --keep-output``): a process of its own, so a restart or crash of the agent does not
    take the job's last reader away. Its pid and start time are kept in ``keeper.json`` in
    the job dir, so a later agent finds it instead of starting a second reader."""

    def __init__(self, job_dir: Path, python: str, shim_path: Path) -> None:
        self.job_dir = job_dir
        self.python = python
        self.shim_path = shim_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def record_path(self) -> Path:
        return self.job_dir / "keeper.json"

    def running_elsewhere(self) -> bool:
        """Whether a keeper started by an earlier agent still carries the output."""
        try:
            info = json.loads(self.record_path.read_text())
            return is_same_process(int(info["pid"]), int(info["start_ticks"]))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def alive(self) -> bool:
        """Whether a keeper (this agent's or an earlier one's) carries the output now."""
        if self.process is not None:
            return self.process.returncode is None
        return self.running_elsewhere()

    async def start(self, pipes: OutputPipes, log_path: str, max_bytes: int) -> None:
        """Start a keeper reading ``pipes`` (the agent keeps its own read ends open).
        Raises OSError when it cannot be started."""
        spec = {
            "log_path": log_path,
            "streams_path": str(self.job_dir / "output.streams"),
            "log_max_bytes": max_bytes,
            "fds": dict(pipes.fds),
        }
        errors = os.open(self.job_dir / "keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.process = await asyncio.create_subprocess_exec(
                self.python,
                "-I",
                "-S",
                str(self.shim_path),
                "--keep-output",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=errors,
                pass_fds=tuple(pipes.fds.values()),
                cwd=self.job_dir,
                env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"},
                start_new_session=True,
            )
        finally:
            os.close(errors)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(spec).encode())
        await self.process.stdin.drain()
        self.process.stdin.close()
        ticks = start_ticks(self.process.pid)
        atomic_write_json(self.record_path, {"pid": self.process.pid, "start_ticks": ticks})

    async def finish(self, timeout_s: float) -> None:
        """Give the keeper ``timeout_s`` to read to the end (the job's pipes close when its
        last process is gone), then stop it (SIGTERM: it writes what it has and exits)."""
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.terminate()
                await self.process.wait()
            return
        deadline = time.monotonic() + timeout_s
        while self.running_elsewhere() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            info = json.loads(self.record_path.read_text())
            signal_process(int(info["pid"]), int(info["start_ticks"]), signal.SIGTERM)
