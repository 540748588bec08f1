"""What the operator commands print: `status` (80 columns), `jobs` and `logs`. Rendering
only, plus the log follower, which reads a job's log file while its shim still writes it,
and the check that the state dir is there and readable. The verdict on the agent's health
is ``statuscheck.health_verdict``'s, not decided here."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from argus_agent.errors import StateError
from argus_agent.jobs.cgroupfs import OOM_KILLED
from argus_agent.jobs.slurm_store import SlurmJobRecord, SlurmStore
from argus_agent.jobs.store import JobRecord, JobStore
from argus_agent.statuscheck import Verdict, health_verdict

FOLLOW_POLL_S = 0.25
#: The width every line of `status` fits (a terminal, a monitoring system's notification).
WIDTH = 80
INDENT = " " * 9
MIB = 1024 * 1024


def format_status(status: dict[str, Any], verdict: Verdict | None = None) -> str:
    """Render a status document (from the control socket) in at most 80 columns: the
    verdict and why, the server and channel, the outbox, the sender, GPU readings, drain,
    damaged state, warnings, and a table of the jobs. Long values wrap (or, in the table,
    end in an ellipsis), so every line fits a terminal or a monitoring system's mail."""
    verdict = verdict or health_verdict(status)
    ch = status.get("channel", {})
    lines = _wrap(
        f"argus-agent {status.get('version')}, pid {status.get('pid')}, "
        f"up {_duration(status.get('uptime_s'))}, on {status.get('hostname')}"
    )
    lines += _wrap(f"status   {verdict.state} (exit {verdict.code})")
    for reason in verdict.reasons:
        lines += _wrap(f"         - {reason}", INDENT + "  ")
    lines += _wrap(
        f"server   {status.get('server_url')} as {status.get('agent_id')} "
        f"(transport {ch.get('transport', 'poll')})"
    )
    lines += _wrap(f"state    {status.get('state_dir')}")
    lines += _channel_lines(ch)
    counts = status.get("commands", {})
    lines += _wrap(
        "commands " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if counts
        else "commands none yet"
    )
    tele = status.get("telemetry")
    if tele:
        lines += _telemetry_lines(tele)
    gpu = status.get("gpu") or {}
    lines += _wrap(
        f"GPU      {gpu.get('backend', '?')}" + (f" ({gpu['why']})" if gpu.get("why") else "")
    )
    if cgroups := status.get("cgroups"):  # whether jobs get cgroups, or why not
        where = f" ({cgroups['why']})" if cgroups.get("why") else f" under {cgroups.get('root')}"
        lines += _wrap(f"cgroups  {cgroups.get('mode')}{where}")
    if served := status.get("served_hosts"):  # jobs.slurm_hosts: names served besides ours
        states = ", ".join(f"{n} {state}" for state, n in sorted(served["states"].items()))
        lines += _wrap(
            f"served   {served['count']} host name(s) from {served['names_from']}"
            + (f": {states}" if states else "")
            + (f"; {served['unregistered']} unregistered" if served.get("unregistered") else "")
        )
        for problem in served.get("problems", [])[:3]:
            lines += _wrap(
                f"  {problem['hostname']}: {problem['state']}"
                + (f" ({problem['error']})" if problem.get("error") else ""),
                INDENT + "  ",
            )
    drain = status.get("drain") or {}
    if drain.get("draining"):
        lines += _wrap(
            f"drain    draining for {_since(drain.get('since'))}"
            + (f", by {drain['by']}" if drain.get("by") else "")
            + (f" ({drain['reason']})" if drain.get("reason") else "")
            + ": new reruns are refused, running jobs go on"
        )
    else:
        lines.append("drain    not draining")
    lines += _damaged_lines(status.get("damaged_state") or {}, status.get("state_dir"))
    for warning in status.get("warnings", []):
        lines += _wrap(f"warning  {warning}")
    lines += _job_lines(status.get("jobs", []))
    return "\n".join(lines)


def _channel_lines(ch: dict[str, Any]) -> list[str]:
    """E.g. ``channel  connected (websocket), connected for 3m, last contact 0s ago`` or
    ``channel  connected (polling: <why>), connected for 2h01m, last contact 2s ago,
    websocket probe in 9m``, or ``channel  backing_off (polling) for 3m, last contact 4m
    ago, retry in 2s``; wrapped between its parts."""
    kind = "websocket" if ch.get("kind") == "websocket" else "polling"
    why = ch.get("why")
    head = f"channel  {ch.get('state')} ({kind}" + (f": {why}" if why else "") + ")"
    parts = []
    # A websocket counts from its session's opening, polling from the first good poll.
    since = ch.get("connected_since") or ch.get("state_since")
    if since and ch.get("state") == "connected":
        parts.append(f"connected for {_since(since)}")
    elif since:
        head += f" for {_since(since)}"
    contact = ch.get("last_contact_at") or ch.get("last_ok_at")
    parts.append(f"last contact {_since(contact)} ago" if contact else "no contact yet")
    if ch.get("state") != "connected" and ch.get("next_retry_at"):
        parts.append(f"retry in {_duration(max(0.0, ch['next_retry_at'] - time.time()))}")
    if kind == "polling" and ch.get("next_probe_at"):
        parts.append(f"websocket probe in {_duration(max(0.0, ch['next_probe_at'] - time.time()))}")
    # One column is kept free on every line for the comma that may follow it.
    lines = _wrap(head, width=WIDTH - 1)
    for part in parts:
        if len(lines[-1]) + 2 + len(part) <= WIDTH - 1:
            lines[-1] += f", {part}"
        else:  # a part is never split across lines
            lines[-1] += ","
            lines += _wrap(INDENT + part, width=WIDTH - 1)
    return lines


def _telemetry_lines(tele: dict[str, Any]) -> list[str]:
    """The outbox, the sender, and what was dropped or lost."""
    lines: list[str] = []
    cap = tele.get("outbox_max_bytes")
    used = tele.get("outbox_bytes", 0)
    line = f"outbox   {tele.get('outbox_queued', 0)} event(s), {used / MIB:.1f} MiB"
    if cap:  # telemetry.outbox_max_mb counts MiB
        line += f" of {cap / MIB:.0f} MiB ({used / cap:.0%})"
    age = tele.get("outbox_oldest_age_s")
    line += f", oldest {_duration(age)} old" if age is not None else ""
    lines += _wrap(line)
    sender = tele.get("sender", {})
    lines += _wrap(
        f"sender   {sender.get('state')}"
        + (f" over {sender['via']}" if sender.get("via") else "")
        + f", {sender.get('sent', 0)} sent, {sender.get('rejected', 0)} rejected"
    )
    if sender.get("state") in ("backing_off", "auth_rejected", "rate_limited"):
        lines += _wrap(f"         last error: {sender.get('last_error')}")
    if sender.get("state") == "no_token":
        lines += _wrap(
            "         no reporter token: events are kept locally, not sent "
            "(set server.token_file, or ARGUS_TOKEN)"
        )
    dropped = tele.get("dropped") or {}
    lines += _wrap(
        "dropped  "
        + (_kinds(dropped) + " (the outbox was full)" if sum(dropped.values()) else "none")
    )
    lost = tele.get("lost") or {}
    if sum(lost.values()):
        lines += _wrap(f"lost     {_kinds(lost)} (the disk refused them)")
    if tele.get("write_errors"):
        last_write = tele.get("last_write_error") or {}
        lines += _wrap(
            f"         disk refused {tele['write_errors']} outbox write(s), last "
            f"{_since(last_write.get('at'))} ago: {last_write.get('error')}"
        )
    return lines


def _kinds(counts: dict[str, int]) -> str:
    names = {"snapshot": "resource snapshot(s)", "log": "log line(s)"}
    return ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(counts.items()) if n)


def _damaged_lines(damaged: dict[str, Any], state_dir: str | None) -> list[str]:
    """Damaged state files set aside and job records quarantined (kept until deleted);
    paths relative to the state dir (shown on the ``state`` line) to fit the width."""
    lines = []
    for entry in damaged.get("recovered", []):
        kept = ""
        if entry.get("salvaged_events") is not None:
            kept = f"; {entry['salvaged_events']} queued event(s) kept"
        elif entry.get("salvaged_commands") is not None:
            kept = f"; {entry['salvaged_commands']} command(s) kept"
        lines += _wrap(
            f"damaged  {entry.get('file', 'database')} set aside {_since(entry.get('at'))} ago "
            f"as {_relative(entry.get('path'), state_dir)}: {entry.get('reason')}"
            + kept
            + (f", {entry['lost_events']} event(s) lost" if entry.get("lost_events") else "")
        )
    for entry in damaged.get("quarantined_jobs", []):
        lines += _wrap(
            f"damaged  job {entry.get('batch_id')} quarantined in "
            f"{_relative(entry.get('path'), state_dir)}: {entry.get('reason')}"
        )
    if lines:
        lines.append("         (inspect, then delete the kept files to clear these lines)")
    return lines


def _relative(path: str | None, state_dir: str | None) -> str:
    if path and state_dir:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(state_dir))
    return str(path)


#: The job table's columns; BATCH and USER give way (ending in an ellipsis) to fit 80.
JOB_COLUMNS = ("BATCH", "PID", "USER", "STATE", "UPTIME", "CPU%", "RSS", "GPU MEM")
_RIGHT = {"PID", "UPTIME", "CPU%", "RSS", "GPU MEM"}
MAX_JOB_ROWS = 20


def _job_lines(jobs: list[dict[str, Any]]) -> list[str]:
    """``jobs     N running, M known`` and a table of the running jobs, then the latest
    ended ones (at most MAX_JOB_ROWS; `argus-agent jobs` lists all)."""
    running = [j for j in jobs if j.get("state") in ("running", "stopping", "launching")]
    ended = sorted(
        (j for j in jobs if j not in running), key=lambda j: j.get("ended_at") or 0, reverse=True
    )
    shown = (running + ended)[:MAX_JOB_ROWS]
    lines = [f"jobs     {len(running)} running, {len(jobs)} known"]
    if not shown:
        return lines
    rows = [JOB_COLUMNS] + [
        (
            str(j.get("batch_id")),
            str(j.get("pid") or "-"),
            str(j.get("run_as") or "-"),
            _short_state(j),
            _duration(j.get("uptime_s")),
            f"{j['cpu_pct']:.0f}" if j.get("cpu_pct") is not None else "-",
            _size(j.get("rss_bytes")),
            _size(j["gpu_mem_mb"] * MIB) if j.get("gpu_mem_mb") is not None else "-",
        )
        for j in shown
    ]
    lines += _table(rows, indent="  ", shrink=(2, 0))
    for j in shown:
        if j.get("log_error"):
            lines += _wrap(f"  log of {j.get('batch_id')} incomplete: {j['log_error']}", INDENT)
        if (j.get("slurm") or {}).get("log_unreadable"):
            why = j["slurm"]["log_unreadable"]
            lines += _wrap(f"  output of {j.get('batch_id')} not readable here: {why}", INDENT)
    if len(jobs) > len(shown):
        lines.append(f"  … and {len(jobs) - len(shown)} more (`argus-agent jobs` lists all)")
    return lines


def _short_state(job: dict[str, Any]) -> str:
    """The state, or for an ended job how it ended, in a few characters."""
    slurm = job.get("slurm") or {}
    if slurm.get("state"):  # a job under Slurm: Slurm's own word (PENDING, OUT_OF_MEMORY…)
        return str(slurm["state"])
    if job.get("state") != "ended":
        return str(job.get("state"))
    if str(job.get("outcome") or "").startswith(OOM_KILLED):  # JobRecord.oom_killed
        return "OOM"
    if job.get("exit_signal") is not None:
        with contextlib.suppress(ValueError):
            return signal.Signals(job["exit_signal"]).name
        return f"signal {job['exit_signal']}"
    if job.get("exit_code") is not None:
        return f"exit {job['exit_code']}"
    return "ended"


def _table(
    rows: list[tuple[str, ...]], *, indent: str = "", shrink: tuple[int, ...] = ()
) -> list[str]:
    """Columns two spaces apart; the columns in ``shrink`` (in that order) are cut to fit
    WIDTH, each down to 8 characters at the least."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for col in shrink:
        over = len(indent) + sum(widths) + 2 * (len(widths) - 1) - WIDTH
        if over > 0:
            widths[col] = max(8, widths[col] - over)
    header = rows[0]
    return [
        (
            indent
            + "  ".join(
                _fit(cell, w).rjust(w) if header[i] in _RIGHT else _fit(cell, w).ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        ).rstrip()
        for row in rows
    ]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _size(n: float | None) -> str:
    """Bytes in binary units, 4 or 5 characters (``512K``, ``340M``, ``1.2G``)."""
    if n is None:
        return "-"
    if n < MIB:
        return f"{n / 1024:.0f}K"
    if n < 1024 * MIB:
        return f"{n / MIB:.0f}M"
    return f"{n / (1024 * MIB):.1f}G"


def _wrap(text: str, indent: str = INDENT, *, width: int = WIDTH) -> list[str]:
    """One logical line as lines of at most ``width``, continued under ``indent``; a word
    longer than a line (a path) is cut, never left to overflow."""
    if len(text) <= width:
        return [text]
    return textwrap.wrap(
        text,
        width,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    )


def format_jobs(records: list[JobRecord]) -> str:
    """A table of jobs: batch id, pid (``slurm:ID`` for a job under Slurm), user, state
    (a Slurm job's queue state and nodes), start time, exit status."""
    header = ("BATCH", "PID", "USER", "STATE", "STARTED", "EXIT")
    rows = [header]
    for r in records:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at or r.launched_at))
        slurm = isinstance(r, SlurmJobRecord)
        rows.append(
            (
                r.batch_id,
                f"slurm:{r.slurm_job_id or '-'}" if slurm else str(r.pid or "-"),
                r.run_as or "-",
                _slurm_state(r) if slurm else r.state,
                started,
                "-" if r.ended_at is None else r.describe_exit(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def _slurm_state(record: SlurmJobRecord) -> str:
    """``RUNNING on node1``, ``PENDING (Resources)``: the queue's view of a Slurm job."""
    state = record.slurm_state or record.state
    if record.pending and record.slurm_reason:
        return f"{state} ({record.slurm_reason})"
    return f"{state} on {record.slurm_nodes}" if record.slurm_nodes else state


def load_job(store: JobStore | SlurmStore, batch_id: str) -> JobRecord:
    """The record of one job; StateError naming the batch when there is none."""
    if not (store.job_dir(batch_id) / "job.json").exists():
        raise StateError(f"no job for batch {batch_id} in {store.root}")
    try:
        return store.load(batch_id)
    except (OSError, ValueError, TypeError) as exc:
        raise StateError(f"job {batch_id}: state unreadable: {exc}") from None


def print_log(
    store: JobStore | SlurmStore,
    batch_id: str,
    *,
    tail: int | None,
    follow: bool,
    out: TextIO = sys.stdout,
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
                last = (rest or _last_byte(handle))[-1:]
                if last and last != b"\n":
                    out.write("\n")  # the end line starts a line of its own
                out.write(job_end_line(load_job(store, batch_id)) + "\n")
                out.flush()
                return
            time.sleep(FOLLOW_POLL_S)


def _last_byte(handle: Any) -> bytes:
    """The last byte of what ``handle`` has read so far (b"" at its start)."""
    at = handle.tell()
    if at == 0:
        return b""
    handle.seek(at - 1)
    return handle.read(1)


def job_end_line(record: JobRecord) -> str:
    """``-- job ended: exit code 0 (done)``, ``-- job ended: killed by signal 15 (SIGTERM),
    stopped on request of alice (stopped)``: how it ended, and what Argus was told
    (``batch_done`` for done; ``batch_failed`` otherwise)."""
    if record.stop_requested_at:
        outcome = "stopped"
    elif record.exit_code == 0 and record.exit_signal is None:
        outcome = "done"
    else:
        outcome = "failed"
    return f"-- job ended: {record.describe_exit()} ({outcome})"


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
    """Raise StateError when the state dir is missing or this user cannot read it, saying
    which and what to do."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise StateError(
            f"{path}: no such state dir: no agent has run with this configuration yet "
            "(register the host with `argus-agent register`, then start the agent; or pass "
            "the agent's --config, or set agent.state_dir)"
        ) from None
    except PermissionError:
        pass  # a parent dir this user may not enter: reported as below
    if not os.access(path, os.R_OK | os.X_OK):
        raise StateError(
            f"{path}: state dir not readable by this user (run as the agent's user, or root)"
        )
