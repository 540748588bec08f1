"""Turn a job's log file into ``log_line`` events, resuming exactly where it left off.

The shim writes whole lines to ``output.log`` and one stream byte per line to
``output.streams``. A :class:`LogTailer` reads the lines after its offset, gives each its
stream, a level when one is recognisable, and its line number, and hands back the events
together with the new offset; the caller commits both in one outbox transaction, so after
any crash the tailer resumes right after the last committed line.

Lines beyond ``max_lines_per_s`` (a token bucket, one second of burst) are not sent; a marker
line says how many were skipped. The log file itself keeps every line.

Output the shim could not store (it records ``log_error`` in ``exit.json``, e.g. a full disk:
it stops writing the log at the first failed write) is lost before the tailer sees it. The
final read of an ended job whose ``exit.json`` names such an error adds one marker line
saying after which line the output was lost and why, so the gap is visible in the stream.
The marker's event id is derived from the batch, so a final read repeated after a crash
sends the same event again and the server keeps one.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from json.encoder import encode_basestring as encode_json_string

from argus_agent.events import (
    EventChunk,
    EventKind,
    EventSource,
    encode_event,
    envelope_head,
    new_event_id,
    utc_timestamp,
)
from argus_agent.outbox import LogOffset

READ_BYTES = 4 * 1024 * 1024
MAX_LINE_CHARS = 16 * 1024
STREAMS = {ord("o"): "stdout", ord("e"): "stderr", ord("a"): "agent"}
LEVEL_RE = re.compile(
    r"\b(CRITICAL|FATAL|ERROR|WARNING|WARN|INFO|DEBUG)\b|Traceback \(most recent call last\)"
)
LEVELS = {
    "CRITICAL": "critical",
    "FATAL": "critical",
    "ERROR": "error",
    "WARNING": "warning",
    "WARN": "warning",
    "INFO": "info",
    "DEBUG": "debug",
}


def line_level(line: str) -> str | None:
    """The log level a line names near its start, if any (``Traceback`` counts as error)."""
    match = LEVEL_RE.search(line, 0, 160)
    if match is None:
        return None
    return LEVELS.get(match.group(1), "error") if match.group(1) else "error"


def line_text(line: str) -> str:
    """A line as sent: progress-bar redraws (``\\r``) reduced to what a terminal would show
    last, and capped in length."""
    if "\r" in line:
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    if len(line) > MAX_LINE_CHARS:
        line = line[:MAX_LINE_CHARS] + "…"
    return line


@dataclass
class _Bucket:
    rate: float
    tokens: float
    at: float

    def take_many(self, now: float, wanted: int) -> int:
        """How many of ``wanted`` lines may go now (the rest are skipped)."""
        if self.rate <= 0:
            return wanted
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        allowed = min(wanted, int(self.tokens))
        self.tokens -= allowed
        return allowed


class LogTailer:
    """Reads one job's new log lines. Blocking file I/O: call ``read`` off the event loop."""

    def __init__(
        self,
        batch_id: str,
        log_path: str,
        source: EventSource,
        *,
        max_lines_per_s: float,
        start: LogOffset | None = None,
        chunk_size: int = 100,
    ) -> None:
        self.chunk_size = chunk_size
        self.batch_id = batch_id
        self.log_path = log_path
        self.streams_path = os.path.join(os.path.dirname(log_path), "output.streams")
        self._envelope_head = envelope_head("log_line", batch_id, source)
        self.offset = start.offset if start else 0
        self.line_no = start.line_no if start else 0
        self.skipped = start.skipped if start else 0
        self.max_lines_per_s = max_lines_per_s
        self.bucket = _Bucket(max_lines_per_s, max_lines_per_s, time.monotonic())
        self._id_prefix = ""
        self._id_counter = 0
        self.exit_path = os.path.join(os.path.dirname(log_path), "exit.json")
        self._loss_marked = False

    def set_rate(self, max_lines_per_s: float) -> None:
        """A new ``telemetry.log_max_lines_per_s`` (a config reload) for the next reads.
        Called from the event loop while ``read`` may run in a thread: each is one float
        assignment, and a read between the two merely uses the old rate once."""
        self.max_lines_per_s = max_lines_per_s
        self.bucket.rate = max_lines_per_s

    def read(
        self, *, final: bool = False, at: float | None = None
    ) -> tuple[list[EventChunk], LogOffset] | None:
        """Events for the complete lines after the offset (at most ``READ_BYTES``), and the
        offset after them; None when there is nothing new. ``final`` (the job has ended and
        its shim closed the log) also emits the marker of lines still counted as skipped.
        Events are stamped with the time of reading, or ``at`` (a job's end, for lines read
        after it, so that they never come later than its lifecycle event)."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(READ_BYTES)
        except FileNotFoundError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1
        if final and end == 0 and chunk:
            chunk, end = chunk + b"\n", len(chunk) + 1  # a last line without newline
            consumed = end - 1
        else:
            consumed = end
        # One decode per chunk; "\n" is one byte in UTF-8, so lines split the same way.
        lines = chunk[:end].decode("utf-8", errors="replace").split("\n")[:-1] if end else []
        if not lines and not (final and self.skipped):
            return self._loss_marker(at) if final else None
        streams = self._streams(len(lines))
        timestamp = utc_timestamp(at)
        self._id_prefix = new_event_id()[:24]  # time first: ids of later reads sort later
        allowed = self.bucket.take_many(time.monotonic(), len(lines))
        ids: list[str] = []
        bodies: list[str] = []
        if self.skipped and allowed:
            self._skipped_marker(ids, bodies, timestamp, self.line_no + 1)
        event = self._event
        line_no = self.line_no
        for index in range(allowed):
            code = streams[index] if index < len(streams) else 111  # ord("o")
            event(
                ids,
                bodies,
                timestamp,
                lines[index],
                STREAMS.get(code, "stdout"),
                line_no + index + 1,
            )
        self.skipped += len(lines) - allowed
        if final and self.skipped:
            self._skipped_marker(ids, bodies, timestamp, self.line_no + len(lines))
        self.offset += consumed
        self.line_no += len(lines)
        step = self.chunk_size
        chunks = [
            EventChunk(
                EventKind.LOG,
                self.batch_id,
                ids[i : i + step],
                "\n".join(bodies[i : i + step]).encode(),
            )
            for i in range(0, len(ids), step)
        ]
        return chunks, LogOffset(self.batch_id, self.offset, self.line_no, self.skipped)

    def _loss_marker(self, at: float | None) -> tuple[list[EventChunk], LogOffset] | None:
        """The one marker of output the shim could not store (once per tailer; None when
        ``exit.json`` names no log error)."""
        if self._loss_marked:
            return None
        self._loss_marked = True
        try:
            with open(self.exit_path, "rb") as handle:
                error = json.loads(handle.read()).get("log_error")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(error, str) or not error:
            return None
        text = (
            f"[argus-agent] the job's output after line {self.line_no} was lost: {error} "
            "(its log file ends there too; the job's exit status is kept)"
        )
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"argus-agent:{self.batch_id}:log-lost").hex
        ids: list[str] = []
        bodies: list[str] = []
        self._event(
            ids, bodies, utc_timestamp(at), text, "agent", self.line_no + 1, event_id=event_id
        )
        chunk = EventChunk(EventKind.LOG, self.batch_id, ids, bodies[0].encode())
        return [chunk], LogOffset(self.batch_id, self.offset, self.line_no, self.skipped)

    def _streams(self, count: int) -> bytes:
        try:
            with open(self.streams_path, "rb") as handle:
                handle.seek(self.line_no)
                return handle.read(count)
        except FileNotFoundError:
            return b""

    def _event(
        self,
        ids: list[str],
        bodies: list[str],
        timestamp: str,
        line: str,
        stream: str,
        number: int,
        event_id: str | None = None,
    ) -> None:
        # The data object is put together by hand (only the line's text needs escaping),
        # the envelope by events.encode_event: the hot path of tailing.
        text = line_text(line)
        level = "warning" if stream == "agent" else (line_level(text) or "info")
        if event_id is None:
            self._id_counter += 1
            event_id = f"{self._id_prefix}{self._id_counter:08x}"
        ids.append(event_id)
        bodies.append(
            encode_event(
                event_id,
                self._envelope_head,
                timestamp,
                f'{{"line":{encode_json_string(text)},"level":"{level}",'
                f'"stream":"{stream}","line_no":{number}}}',
            )
        )

    def _skipped_marker(
        self, ids: list[str], bodies: list[str], timestamp: str, number: int
    ) -> None:
        text = (
            f"[argus-agent] {self.skipped} log line(s) not sent: over "
            f"telemetry.log_max_lines_per_s = {self.max_lines_per_s:g} (the job's log file "
            "keeps them; `argus-agent logs` shows them)"
        )
        self.skipped = 0
        self._event(ids, bodies, timestamp, text, "agent", number)
