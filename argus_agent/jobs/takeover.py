"""The agent's hold on a job's output pipes, and carrying the output on when the shim is gone.

A job's stdout and stderr are pipes that its shim reads. Were the shim the only reader, a
SIGKILLed shim (the OOM killer, an operator's ``kill``, the job itself) would leave the job
writing into pipes without readers, and the job would die of SIGPIPE at its next print. So
the agent holds read ends of its own (opened through ``/proc/<shim>/fd/N`` and checked by
inode; through the job's own fd 1 and 2 when the shim is already gone), reads nothing while
the shim lives, and once the shim is gone carries the output into the job's log exactly as
the shim would (``shim.JobOutput``: whole lines, the stream sidecar, the size cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from argus_agent.jobs.shim import READ_CHUNK, JobOutput
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


class OutputCarrier:
    """Reads a job's pipes on the event loop into its log once its shim is gone."""

    def __init__(self, pipes: OutputPipes, output: JobOutput) -> None:
        self.pipes = pipes
        self.output = output
        self._open: dict[int, bytes] = {fd: tag.encode() for tag, fd in pipes.fds.items()}
        self._all_closed = asyncio.Event()
        self._closed = False

    def start(self) -> None:
        """Begin reading (each pipe until end of file)."""
        loop = asyncio.get_running_loop()
        for fd in self._open:
            loop.add_reader(fd, self._readable, fd)
        if not self._open:
            self._all_closed.set()

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading a job's output failed", error=str(exc))
            data = b""
        if data:
            self.output.feed(self._open[fd], data)
            return
        self._close_stream(fd)

    def _close_stream(self, fd: int) -> None:
        tag = self._open.pop(fd)
        asyncio.get_running_loop().remove_reader(fd)
        self.output.end(tag)
        if not self._open:
            self._all_closed.set()

    async def finish(self, timeout_s: float) -> None:
        """Read until every pipe is at end of file or ``timeout_s`` passed (a daemon of the
        job may hold a pipe open), then close the log and the pipes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), timeout_s)
        self.abandon()

    def abandon(self) -> None:
        """Stop reading now: close the log (pending partial lines written) and the pipes.
        Idempotent."""
        for fd in list(self._open):
            self._close_stream(fd)
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.output.close()
        self.pipes.close()
