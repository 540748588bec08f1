"""A job's log: its stdout and stderr as whole lines in ``output.log``, with a stream sidecar.

Stdlib only: used by the per-job supervisor (``shim.py``) and by the output keeper that
carries a job's output on when its supervisor was killed (``keep_output``, run as
``shim.py --keep-output``).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time

READ_CHUNK = 1 << 16
MAX_LINE = 1 << 16
PROGRESS_FLUSH_S = 1.0
TRUNCATION_MARKER = (
    "[argus-agent] log truncated: output reached log_max_bytes ({cap} bytes); "
    "further output of this job is discarded\n"
)
#: How long the keeper waits in select between progress flushes.
TICK_S = 0.2


class JobOutput:
    """The job's log: stdout and stderr merged line by line into ``output.log``, with a
    sidecar ``output.streams`` holding one byte per log line (``o`` stdout, ``e`` stderr,
    ``a`` a line the agent wrote), so readers know each line's stream.

    Only whole lines are written: a partial line waits for its newline (or for the end of
    its stream, or for ``MAX_LINE`` bytes, when a newline is added). The sidecar byte is
    written before its line, so a reader never finds a line without its stream. Past
    ``max_bytes`` one truncation marker is written and the rest is discarded (still read, so
    the job never blocks on a full pipe).
    """

    def __init__(self, log_path: str, streams_path: str, max_bytes: int) -> None:
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.streams_fd = os.open(streams_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.max_bytes = max_bytes
        self.bytes = os.fstat(self.log_fd).st_size
        self.truncated = False
        self.error: str | None = None
        self.partial = {b"o": b"", b"e": b""}
        self.partial_since = {b"o": 0.0, b"e": 0.0}

    def chown(self, uid: int, gid: int | None) -> None:
        """Give the log files to the job's user."""
        for fd in (self.log_fd, self.streams_fd):
            os.fchown(fd, uid, gid if gid is not None else -1)

    def feed(self, stream: bytes, data: bytes) -> None:
        """Take a chunk read from ``stream`` (``b"o"`` or ``b"e"``)."""
        if not self.partial[stream]:
            self.partial_since[stream] = time.monotonic()
        data = self.partial[stream] + data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) >= MAX_LINE:
            data, cut = data + b"\n", len(data) + 1
        self.partial[stream] = data[cut:]
        if cut:
            self.partial_since[stream] = time.monotonic()
            self._write_lines(stream, data[:cut])

    def flush_progress(self, idle_s: float) -> None:
        """Write out a partial line that redraws itself (``\r``, a progress bar) once it has
        waited ``idle_s`` for its newline, so followers of the log see progress."""
        now = time.monotonic()
        for stream, pending in self.partial.items():
            if b"\r" in pending and now - self.partial_since[stream] >= idle_s:
                self.partial[stream] = b""
                self._write_lines(stream, pending + b"\n")

    def end(self, stream: bytes) -> None:
        """The stream is closed: its last partial line is written with a newline."""
        rest, self.partial[stream] = self.partial[stream], b""
        if rest:
            self._write_lines(stream, rest + b"\n")

    def _write_lines(self, stream: bytes, lines: bytes) -> None:
        if self.truncated:
            return
        room = self.max_bytes - self.bytes
        if len(lines) > room:
            lines = lines[: max(room, 0)]
            if lines and not lines.endswith(b"\n"):
                lines += b"\n"
            marker = TRUNCATION_MARKER.format(cap=self.max_bytes).encode()
            self._write(self.streams_fd, stream * lines.count(b"\n") + b"a")
            self._write(self.log_fd, lines + marker)
            self.truncated = True
            return
        self._write(self.streams_fd, stream * lines.count(b"\n"))
        self._write(self.log_fd, lines)

    def _write(self, fd: int, data: bytes) -> None:
        """Write all of ``data``. A failing disk (full, quota, I/O error) must not end the
        shim: the log is closed for further output and the error recorded; the job runs on
        and its output is still read (and discarded), so it never blocks."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as exc:
                self.error = f"writing the log failed: {exc.strerror or exc}"
                self.truncated = True
                return
            view = view[written:]
            if fd == self.log_fd:
                self.bytes += written

    def close(self) -> None:
        """Write what is pending and close the files."""
        for stream in (b"o", b"e"):
            self.end(stream)
        os.close(self.log_fd)
        os.close(self.streams_fd)


def keep_output() -> int:
    """``--keep-output`` mode: carry the output of a job whose shim died into its log.

    Started by the agent (``takeover``) with the job's output pipes passed as fds and a JSON
    spec on stdin (``log_path``, ``streams_path``, ``log_max_bytes``, ``fds``: tag → fd). It
    reads until every pipe is at end of file (the job and everything it started closed
    them), writing whole lines as the shim would, then exits; SIGTERM ends it early. A
    process of its own, so the job keeps a reader whatever happens to the agent.
    """
    raw = json.loads(sys.stdin.buffer.read())
    fds = {int(fd): tag.encode() for tag, fd in raw["fds"].items()}
    output = JobOutput(raw["log_path"], raw["streams_path"], int(raw["log_max_bytes"]))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    selector = selectors.DefaultSelector()
    for fd in fds:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    while fds and not stopping:
        for key, _ in selector.select(TICK_S):
            try:
                data = os.read(key.fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if data:
                output.feed(fds[key.fd], data)
                continue
            output.end(fds.pop(key.fd))
            selector.unregister(key.fd)
            os.close(key.fd)
        output.flush_progress(PROGRESS_FLUSH_S)
    output.close()
    return 0
