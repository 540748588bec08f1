"""Turn a job's log file into ``log_line`` events, resuming exactly where it left off.

The shim writes whole lines to ``output.log`` and one stream byte per line to
``output.streams``. A :class:`LogTailer` reads the lines after its offset, gives each its
stream, a level when one is recognisable, and its line number, and hands back the events
together with the new offset; the caller commits both in one outbox transaction, so after
any crash the tailer resumes right after the last committed line.

Lines beyond ``max_lines_per_s`` (a token bucket, one second of burst) are not sent; a marker
line says how many were skipped. The log file itself keeps every line.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

from argus_agent.events import EventKind, EventSource, OutEvent, utc_timestamp
from argus_agent.outbox import LogOffset

READ_BYTES = 4 * 1024 * 1024
MAX_LINE_CHARS = 16 * 1024
STREAMS = {ord("o"): "stdout", ord("e"): "stderr", ord("a"): "agent"}
LEVEL_RE = re.compile(
    rb"\b(CRITICAL|FATAL|ERROR|WARNING|WARN|INFO|DEBUG)\b|Traceback \(most recent call last\)"
)
LEVELS = {
    b"CRITICAL": "critical",
    b"FATAL": "critical",
    b"ERROR": "error",
    b"WARNING": "warning",
    b"WARN": "warning",
    b"INFO": "info",
    b"DEBUG": "debug",
}


def line_level(line: bytes) -> str | None:
    """The log level a line names near its start, if any (``Traceback`` counts as error)."""
    match = LEVEL_RE.search(line, 0, 160)
    if match is None:
        return None
    return LEVELS.get(match.group(1), "error") if match.group(1) else "error"


def line_text(raw: bytes) -> str:
    """A line as sent: decoded, newline dropped, progress-bar redraws (``\\r``) reduced to
    what a terminal would show last, and capped in length."""
    raw = raw.rstrip(b"\n")
    if b"\r" in raw:
        parts = [p for p in raw.split(b"\r") if p.strip()]
        raw = parts[-1] if parts else b""
    text = raw.decode("utf-8", errors="replace")
    if len(text) > MAX_LINE_CHARS:
        text = text[:MAX_LINE_CHARS] + "…"
    return text


@dataclass
class _Bucket:
    rate: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


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
    ) -> None:
        self.batch_id = batch_id
        self.log_path = log_path
        self.streams_path = os.path.join(os.path.dirname(log_path), "output.streams")
        self.source_json = json.dumps(source.as_dict(), separators=(",", ":"))
        self.offset = start.offset if start else 0
        self.line_no = start.line_no if start else 0
        self.max_lines_per_s = max_lines_per_s
        self.bucket = _Bucket(max_lines_per_s, max_lines_per_s, time.monotonic())
        self.skipped = 0
        self._id_prefix = ""
        self._id_counter = 0

    def read(self, *, final: bool = False) -> tuple[list[OutEvent], LogOffset] | None:
        """Events for the complete lines after the offset (at most ``READ_BYTES``), and the
        offset after them; None when there is nothing new. ``final`` (the job has ended and
        its shim closed the log) also emits the marker of lines still counted as skipped."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(READ_BYTES)
        except FileNotFoundError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1
        if final and end == 0 and chunk:
            end = len(chunk)  # a last line without newline (not written by our shim)
        lines = chunk[:end].splitlines(keepends=True) if end else []
        if not lines and not (final and self.skipped):
            return None
        streams = self._streams(len(lines))
        timestamp = utc_timestamp()
        self._id_prefix = os.urandom(12).hex()
        now = time.monotonic()
        events: list[OutEvent] = []
        for index, raw in enumerate(lines):
            number = self.line_no + index + 1
            if not self.bucket.take(now):
                self.skipped += 1
                continue
            if self.skipped:
                events.append(self._skipped_marker(timestamp, number))
            stream = STREAMS.get(streams[index], "stdout") if index < len(streams) else "stdout"
            events.append(self._event(timestamp, raw, stream, number))
        if final and self.skipped:
            events.append(self._skipped_marker(timestamp, self.line_no + len(lines)))
        self.offset += end
        self.line_no += len(lines)
        return events, LogOffset(self.batch_id, self.offset, self.line_no)

    def _streams(self, count: int) -> bytes:
        try:
            with open(self.streams_path, "rb") as handle:
                handle.seek(self.line_no)
                return handle.read(count)
        except FileNotFoundError:
            return b""

    def _next_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:08x}"

    def _event(self, timestamp: str, raw: bytes, stream: str, number: int) -> OutEvent:
        text = line_text(raw)
        level = line_level(raw) or "info"
        if stream == "agent":
            level = "warning"
        data = json.dumps(
            {"line": text, "message": text, "level": level, "stream": stream, "line_no": number},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        event_id = self._next_id()
        body = (
            f'{{"event_id":"{event_id}","schema_version":"1.1","event_type":"log_line",'
            f'"timestamp":"{timestamp}","batch_id":{json.dumps(self.batch_id)},'
            f'"source":{self.source_json},"data":{data}}}'
        )
        return OutEvent(event_id, EventKind.LOG, self.batch_id, body.encode())

    def _skipped_marker(self, timestamp: str, number: int) -> OutEvent:
        text = (
            f"[argus-agent] {self.skipped} log line(s) not sent: over "
            f"telemetry.log_max_lines_per_s = {self.max_lines_per_s:g} (the job's log file "
            "keeps them; `argus-agent logs` shows them)"
        )
        self.skipped = 0
        return self._event(timestamp, text.encode(), "agent", number)
