"""The reference server's frame worker: a child process that parses and checks websocket
``events`` frames (:func:`wsframes.prepare_frame`), so that the server's own process only
stores them. Parsing and checking is nearly half of the server's CPU for an events frame; on
a machine with two cores or more, the worker does it for the next frames while the event loop
stores the current one (``bench/websocket.py``; ``dev-server`` runs one unless
``--no-frame-worker``; tests' in-process servers run none unless asked).

Parent side: :class:`FrameWorker`, used by :mod:`.ws` from the server's event loop. It owns
the child (``python -P -c`` running :func:`main`), one task reading its answers, and
the futures waiting for them. A worker that is gone (crashed, killed) or stuck (no answer
within ``answer_timeout_s``: it is killed) answers :class:`WorkerGone`; the session then
parses that frame itself and the server goes on without a worker (the log says so once).

Wire, over the child's stdin and stdout: a request is a header (request id, byte length) and
the frame's text in UTF-8; an answer is a header and the ``marshal`` of a
:class:`wsframes.PreparedFrame` as a plain tuple, or of None (not a well-formed events frame:
the session decodes it itself, for the protocol's exact answer); the worker's first message
is a header alone with id 0, "ready". ``marshal`` rather than
``pickle``: the answer is tuples of strings, numbers and JSON values, which marshal writes and
reads in 0.7 µs an event against pickle's 0.9 (a frame of 500 log lines); both ends are the
same interpreter, the one version of the format it needs.

Hand-written rather than a ``concurrent.futures.ProcessPoolExecutor`` (tried, measured with
``bench/websocket.py``'s events rounds on the same machine): the pool was no faster (medians
28,400/s and 28,900/s, within this machine's noise), and its worker, its forkserver and
multiprocessing's resource tracker all outlive a server that is SIGKILLed (a pool worker holds
both ends of its request queue, so it never sees the server go), which is what tests and
benchmarks do to servers.

The child exits when its stdin closes: when the server closes the worker, and when the
server's process dies (the kernel closes the pipe), so no worker outlives its server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import marshal
import signal
import struct
import sys
import time

from .wsframes import PreparedFrame, prepare_frame
from .wsoptions import FRAME_WORKER_TIMEOUT_S

_log = logging.getLogger(__name__)

#: Request id, then the length of what follows.
_HEADER = struct.Struct("<QI")
#: The id of the worker's first message, with nothing after it: ready (imports done, pipes
#: widened). Requests are numbered from 1.
_READY = 0
#: How long the worker may take to say it is ready, besides ``answer_timeout_s``.
_STARTUP_S = 60.0
_CLOSE_TIMEOUT_S = 5.0


class WorkerGone(Exception):
    """The worker is not running (never started, exited, or killed)."""


class FrameWorker:
    """The server side of one frame worker; every method runs on the server's event loop."""

    def __init__(self, answer_timeout_s: float = FRAME_WORKER_TIMEOUT_S) -> None:
        self.answer_timeout_s = answer_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[PreparedFrame | None]] = {}
        self._next_id = 0
        self._write_lock = asyncio.Lock()
        self._closing = False
        #: When the worker last answered (or was last idle; from its start until ready): a
        #: worker quiet for ``answer_timeout_s`` while requests wait is stuck.
        self._progress_at = time.monotonic()
        #: Whether the worker said it is ready (imports done, pipes widened).
        self._ready = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._reader is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child; an OSError (it cannot be started) is the caller's."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # not the current directory first on sys.path: this package's worker only
            "-c",
            "from argus_agent.devserver.frameworker import main; main()",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_answers(), name="frame-worker-answers")

    async def prepare(self, text: str) -> PreparedFrame | None:
        """The worker's :func:`prepare_frame` of *text*; raises :class:`WorkerGone`.

        The worker counts as stuck (and is killed) when it answers nothing for
        ``answer_timeout_s`` while requests wait, whether they wait for the answer or to be
        written (a SIGSTOPped worker also stops reading: a frame bigger than the pipe then
        waits in ``drain``); a worker answering a long queue slowly is not stuck."""
        if not self.alive or self._proc is None or self._proc.stdin is None:
            raise WorkerGone("no frame worker")
        self._next_id += 1
        request = self._next_id
        future: asyncio.Future[PreparedFrame | None] = asyncio.get_running_loop().create_future()
        if not self._pending:  # an idle worker owes nothing until now
            self._progress_at = time.monotonic()
        self._pending[request] = future
        exchange = asyncio.ensure_future(self._exchange(request, text, future))
        try:
            while True:
                # A worker still importing (about a second) is not stuck: it has _STARTUP_S
                # more to say it is ready.
                limit = self.answer_timeout_s + (0.0 if self._ready else _STARTUP_S)
                quiet = time.monotonic() - self._progress_at
                if quiet >= limit:
                    self._give_up(limit)
                    raise WorkerGone(f"no answer within {limit:g} s")
                done, _ = await asyncio.wait((exchange,), timeout=limit - quiet)
                if done:
                    return exchange.result()
        finally:  # answered, failed or cancelled: nothing waits for this id any more
            if not exchange.done():
                exchange.cancel()
            self._pending.pop(request, None)

    async def _exchange(
        self, request: int, text: str, future: asyncio.Future[PreparedFrame | None]
    ) -> PreparedFrame | None:
        assert self._proc is not None and self._proc.stdin is not None
        body = text.encode("utf-8", "surrogatepass")
        try:
            async with self._write_lock:  # one request's bytes never interleave another's
                self._proc.stdin.write(_HEADER.pack(request, len(body)))
                self._proc.stdin.write(body)
                await self._proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise WorkerGone(f"frame worker gone: {exc}") from exc
        return await future

    def _give_up(self, limit: float) -> None:
        """Stopped (SIGSTOP) or stuck: kill it, or every session would wait on it forever."""
        if self._proc is not None and self._proc.returncode is None:
            _log.warning("frame worker gave no answer within %g s; killing it", limit)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def _read_answers(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                request, length = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
                self._progress_at = time.monotonic()
                if request == _READY:
                    self._ready = True
                    continue
                answer = marshal.loads(await stdout.readexactly(length))
                prepared = None if answer is None else PreparedFrame(*answer)
                future = self._pending.pop(request, None)
                if future is not None and not future.done():
                    future.set_result(prepared)
        except Exception as exc:  # the worker is gone (EOF), or answered what it never would
            if self._proc.returncode is None and not isinstance(exc, asyncio.IncompleteReadError):
                _log.warning("frame worker answered garbage (%s); stopping it", exc)
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
        finally:
            self._reader = None
            code = await self._proc.wait()
            if not self._closing:
                _log.warning(
                    "frame worker exited (code %s); the server parses frames itself from now on",
                    code,
                )
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(WorkerGone(f"frame worker exited (code {code})"))
            self._pending.clear()

    async def close(self) -> None:
        """End the worker (its stdin closed; killed if it has not exited within 5 s)."""
        proc, self._closing = self._proc, True
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        reader = self._reader
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await reader


#: What the pipes to and from the worker are widened to (Linux's default is 64 KiB, and what
#: an unprivileged process may ask is 1 MiB): a frame of 500 log lines is 147 KB and its
#: answer 97 KB. Through 64 KiB pipes each crossed in pieces, and asyncio's pipe transport,
#: which moves what is left of its buffer after each piece, took 10 % of the server process's
#: CPU (py-spy, events rounds of ``bench/websocket.py``); 1 % once a frame fits.
_PIPE_BYTES = 1024 * 1024


def _widen_pipes() -> None:
    """Widen stdin and stdout where the system allows (either end of a pipe may)."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is None:  # not Linux
        return
    for stream in (sys.stdin, sys.stdout):
        with contextlib.suppress(OSError):  # past /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(stream.fileno(), setpipe, _PIPE_BYTES)


def main() -> None:
    """The child: answer requests on stdin until it closes."""
    # The server's process group gets the terminal's Ctrl-C too; the server ends the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _widen_pipes()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    answers.write(_HEADER.pack(_READY, 0))
    answers.flush()
    while True:
        header = requests.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        request, length = _HEADER.unpack(header)
        body = requests.read(length)
        if len(body) < length:
            return
        try:
            answer = prepare_frame(body.decode("utf-8", "surrogatepass"))
        except Exception:  # the server decodes this frame itself and answers for it
            logging.getLogger(__name__).exception("frame worker failed on a frame")
            answer = None
        data = marshal.dumps(None if answer is None else tuple(answer))
        answers.write(_HEADER.pack(request, len(data)))
        answers.write(data)
        answers.flush()
