"""The operator's commands: `argus-agent drain`, `undrain` and `stop BATCH_ID`.

Each sends one request over the control socket (``control.request_*``) to the agent running
on this state dir and prints what it did, in one or two lines. ``cli.py`` parses and
dispatches; this module talks and prints. Exit codes (through the errors' ``exit_code``):
0 done, 1 refused by the agent (its reason is printed), 2 no agent running or answering.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from argus_agent import control
from argus_agent.config import Settings

#: The commands this module carries out.
COMMANDS = ("drain", "undrain", "stop")


def run_operator_command(command: str, settings: Settings, args: argparse.Namespace) -> int:
    """Carry out ``command`` (one of ``COMMANDS``) against the running agent; the exit code.
    Raises AgentNotAnswering (exit 2) or ControlRefused (exit 1)."""
    path = settings.agent.state_dir / control.SOCKET_NAME
    if command == "drain":
        print(_drained(control.request_drain(path, args.reason)))
    elif command == "undrain":
        print(_undrained(control.request_undrain(path)))
    elif command == "stop":
        print(_stopping(control.request_stop(path, args.batch_id, args.grace)))
    else:  # cli.py routes only COMMANDS here
        raise ValueError(f"not an operator command: {command}")
    return 0


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):  # not a time (NaN, far past or future)
        return "?"


def _drained(answer: dict[str, Any]) -> str:
    state = answer.get("drain") or {}
    reason = f' ("{state["reason"]}")' if state.get("reason") else ""
    head = (
        f"already draining since {_when(state.get('since'))}; now recorded as by "
        f"{state.get('by')}{reason}"
        if answer.get("was_draining")
        else f"draining since {_when(state.get('since'))} by {state.get('by')}{reason}"
    )
    return (
        f"{head}: new reruns are refused, {answer.get('running_jobs', 0)} running job(s) go "
        "on, stops still work; `argus-agent undrain` ends it (it survives restarts)"
    )


def _undrained(answer: dict[str, Any]) -> str:
    if not answer.get("was_draining"):
        return "not draining: reruns are accepted (nothing changed)"
    return "no longer draining: reruns are accepted again"


def _stopping(answer: dict[str, Any]) -> str:
    grace = answer.get("grace_s")
    escalation = f"SIGKILL after {grace:g} s" if isinstance(grace, int | float) else "SIGKILL"
    head = "already stopping" if answer.get("already_stopping") else "stopping"
    return (
        f"{head} batch {answer.get('batch_id')} (pid {answer.get('pid')}, user "
        f"{answer.get('run_as')}): SIGTERM to its process tree, {escalation} to what is "
        "left; `argus-agent logs -f BATCH_ID` shows how it ends"
    )
