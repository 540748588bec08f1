"""What the operator commands print: `status`, `jobs` and `logs`. Rendering only, plus the
log follower, which reads a job's log file while its shim still writes it."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from argus_agent.errors import StateError
from argus_agent.jobs.store import JobRecord, JobStore

FOLLOW_POLL_S = 0.25


def format_status(status: dict[str, Any]) -> str:
    """Render a status document (from the control socket) as a few readable lines."""
    ch = status.get("channel", {})
    lines = [
        f"argus-agent {status.get('version')} pid {status.get('pid')} "
        f"up {_duration(status.get('uptime_s'))} on {status.get('hostname')}",
        f"server   {status.get('server_url')} as {status.get('agent_id')} "
        f"(transport {ch.get('transport', 'poll')})",
        _channel_line(ch),
    ]
    if ch.get("state") != "connected" and ch.get("last_error"):
        lines.append(f"error    {ch['last_error']}")
    counts = status.get("commands", {})
    lines.append(
        "commands " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if counts
        else "commands none yet"
    )
    tele = status.get("telemetry")
    if tele:
        sender = tele.get("sender", {})
        dropped = sum(tele.get("dropped", {}).values())
        lost = sum((tele.get("lost") or {}).values())
        lines.append(
            f"events   {tele.get('outbox_queued', 0)} queued "
            f"({tele.get('outbox_bytes', 0) / 1e6:.1f} MB), sender {sender.get('state')}"
            + (f" over {sender['via']}" if sender.get("via") else "")
            + f", {sender.get('sent', 0)} sent, {sender.get('rejected', 0)} rejected"
            + (f", {dropped} dropped (outbox full)" if dropped else "")
            + (f", {lost} lost (the disk refused them)" if lost else "")
            + f"; GPU: {tele.get('gpu')}"
        )
        last_write = tele.get("last_write_error") or {}
        if tele.get("write_errors"):
            lines.append(
                f"         disk refused {tele['write_errors']} outbox write(s), last "
                f"{_since(last_write.get('at'))} ago: {last_write.get('error')}"
            )
        if sender.get("state") in ("backing_off", "auth_rejected", "rate_limited"):
            lines.append(f"         last error: {sender.get('last_error')}")
        if sender.get("state") == "no_token":
            lines.append(
                "         no reporter token: events are kept locally, not sent "
                "(set ARGUS_TOKEN or server.token)"
            )
    lines += _damaged_lines(status.get("damaged_state") or {})
    lines += [f"warning  {warning}" for warning in status.get("warnings", [])]
    jobs = status.get("jobs", [])
    running = sum(j["state"] in ("running", "stopping") for j in jobs)
    lines.append(f"jobs     {running} running, {len(jobs)} known")
    for job in jobs[:20]:
        lines.append(
            f"  {job['batch_id']:<24} pid {job['pid']!s:<8} {job['outcome']}"
            + (f" (log incomplete: {job['log_error']})" if job.get("log_error") else "")
        )
    return "\n".join(lines)


def _channel_line(ch: dict[str, Any]) -> str:
    """E.g. ``channel  connected (websocket), connected for 3m, last contact 0s ago`` or
    ``channel  connected (polling: <why>), last contact 2s ago, websocket probe in 9m``."""
    kind = "websocket" if ch.get("kind") == "websocket" else "polling"
    why = ch.get("why")
    line = f"channel  {ch.get('state')} ({kind}" + (f": {why}" if why else "") + ")"
    if ch.get("connected_since"):
        line += f", connected for {_since(ch['connected_since'])}"
    contact = ch.get("last_contact_at") or ch.get("last_ok_at")
    if contact:
        line += f", last contact {_since(contact)} ago"
    if kind == "polling" and ch.get("next_probe_at"):
        line += f", websocket probe in {_duration(max(0.0, ch['next_probe_at'] - time.time()))}"
    return line


def _damaged_lines(damaged: dict[str, Any]) -> list[str]:
    """Damaged state files set aside and job records quarantined (kept until deleted)."""
    lines = []
    for entry in damaged.get("recovered", []):
        kept = ""
        if entry.get("salvaged_events") is not None:
            kept = f"; {entry['salvaged_events']} queued event(s) kept"
        elif entry.get("salvaged_commands") is not None:
            kept = f"; {entry['salvaged_commands']} command(s) kept"
        lines.append(
            f"damaged  {entry.get('file', 'database')} set aside {_since(entry.get('at'))} ago "
            f"as {entry.get('path')}: {entry.get('reason')}"
            + kept
            + (f", {entry['lost_events']} event(s) lost" if entry.get("lost_events") else "")
        )
    for entry in damaged.get("quarantined_jobs", []):
        lines.append(
            f"damaged  job {entry.get('batch_id')} quarantined in {entry.get('path')}: "
            f"{entry.get('reason')}"
        )
    if lines:
        lines.append("         (inspect, then delete the kept files to clear these lines)")
    return lines


def format_jobs(records: list[JobRecord]) -> str:
    """A table of jobs: batch id, pid, user, state, start time, exit status."""
    header = ("BATCH", "PID", "USER", "STATE", "STARTED", "EXIT")
    rows = [header]
    for r in records:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at or r.launched_at))
        rows.append(
            (
                r.batch_id,
                str(r.pid or "-"),
                r.run_as or "-",
                r.state,
                started,
                "-" if r.ended_at is None else r.describe_exit(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def load_job(store: JobStore, batch_id: str) -> JobRecord:
    """The record of one job; StateError naming the batch when there is none."""
    if not (store.job_dir(batch_id) / "job.json").exists():
        raise StateError(f"no job for batch {batch_id} in {store.root}")
    try:
        return store.load(batch_id)
    except (OSError, ValueError, TypeError) as exc:
        raise StateError(f"job {batch_id}: state unreadable: {exc}") from None


def print_log(
    store: JobStore, batch_id: str, *, tail: int | None, follow: bool, out: TextIO = sys.stdout
) -> None:
    """Print a job's log (its last ``tail`` lines); with ``follow``, keep printing what the
    job writes until it has ended and its log is read to the end. Blocks; Ctrl-C ends it."""
    record = load_job(store, batch_id)
    path = Path(record.log_path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise StateError(f"job {batch_id} has no log yet ({path})") from None
    with handle:
        if tail is not None:
            last = deque(handle, maxlen=tail) if tail > 0 else deque()
            out.write(b"".join(last).decode(errors="replace"))
        else:
            while chunk := handle.read(1 << 16):
                out.write(chunk.decode(errors="replace"))
        out.flush()
        if not follow:
            return
        while True:
            chunk = handle.read(1 << 16)
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
                continue
            if (store.job_dir(batch_id) / "exit.json").exists():
                rest = handle.read()
                out.write(rest.decode(errors="replace"))
                out.flush()
                return
            time.sleep(FOLLOW_POLL_S)


def _since(ts: float | None) -> str:
    return _duration(time.time() - ts) if ts else "never"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def state_dir_readable(path: Path) -> None:
    """Raise StateError when the state dir cannot be read by this user."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise StateError(f"{path}: state dir not readable by this user (run as the agent's user)")
