"""The client side of `argus-agent status`: asking the running agent, and the verdict a
monitoring system acts on.

Exit codes follow the monitoring-plugin convention (Nagios, Icinga, Sensu, Zabbix's
``system.run``): **0** healthy, **1** degraded, **2** no agent answers (none runs, or its
control socket is unreachable or silent). :func:`health_verdict` is the one function that
decides between 0 and 1, from the status document alone (pure), for the human and the JSON
output alike. Asking has a short deadline, so a hung agent is reported as not answering
(2) instead of hanging the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argus_agent.control import AgentNotAnswering, query_status
from argus_agent.errors import AgentError
from argus_agent.snapshot import SCHEMA

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2
STATES = {HEALTHY: "healthy", DEGRADED: "degraded", UNREACHABLE: "unreachable"}
#: How long `status` waits for the agent to accept and to answer. The agent answers from
#: memory in milliseconds; a monitoring check's own timeout is usually 10 s or more.
ASK_TIMEOUT_S = 2.0
#: An outbox this full (of ``telemetry.outbox_max_mb``) makes the agent degraded: at the
#: cap it starts dropping the oldest snapshots and log lines.
OUTBOX_NEAR_CAP = 0.9


@dataclass(frozen=True)
class Verdict:
    """How the agent is, for a monitoring system: an exit code and why."""

    code: int
    reasons: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """``healthy``, ``degraded`` or ``unreachable``."""
        return STATES[self.code]

    def as_dict(self) -> dict[str, Any]:
        """The ``verdict`` object of `status --json`."""
        return {"code": self.code, "state": self.state, "reasons": list(self.reasons)}


def ask_status(path: Path, timeout: float = ASK_TIMEOUT_S) -> dict[str, Any]:
    """The status document of the agent listening on ``path`` (blocking, ``timeout`` per
    wait). Raises AgentNotAnswering (exit 2) whatever kept it from getting one: no agent,
    a silent one, a refusal (another user), an answer that is not a status document."""
    try:
        return query_status(path, timeout)
    except AgentNotAnswering:
        raise
    except AgentError as exc:
        raise AgentNotAnswering(str(exc)) from None


def health_verdict(doc: Mapping[str, Any]) -> Verdict:
    """Healthy (0) or degraded (1), and why, from a status document. Pure.

    Degraded: the channel is not connected (server unreachable or refusing, agent token
    rejected, still starting), events cannot be delivered while commands can (reporter
    token rejected, events refused), the outbox is at least :data:`OUTBOX_NEAR_CAP` of its
    cap, the agent is draining, a loop is unhealthy (``health.py``), or a damaged state file
    was set aside or a job record quarantined (until the kept files are deleted).
    """
    reasons: list[str] = []
    channel = doc.get("channel") or {}
    if channel.get("state") != "connected":
        reasons.append(_channel_reason(channel))
    telemetry = doc.get("telemetry") or {}
    sender = telemetry.get("sender") or {}
    if sender.get("state") == "auth_rejected":
        reasons.append(f"the server rejects the reporter token: {sender.get('last_error')}")
    elif sender.get("state") == "backing_off" and channel.get("state") == "connected":
        # While the channel is down too, that reason already says why events wait.
        reasons.append(f"events are not delivered: {sender.get('last_error')}")
    cap = telemetry.get("outbox_max_bytes") or 0
    used = telemetry.get("outbox_bytes") or 0
    if cap and used >= OUTBOX_NEAR_CAP * cap:
        reasons.append(
            f"the outbox is near its cap: {used / cap:.0%} of {cap / (1 << 20):.0f} MiB "
            "(telemetry.outbox_max_mb); when full, the oldest snapshots and log lines "
            "are dropped"
        )
    drain = doc.get("drain") or {}
    if drain.get("draining"):
        by = f" (by {drain['by']})" if drain.get("by") else ""
        why = f": {drain['reason']}" if drain.get("reason") else ""
        reasons.append(f"draining{by}{why}; new reruns are refused until `argus-agent undrain`")
    overdue = (doc.get("health") or {}).get("overdue") or {}
    if overdue:
        names = ", ".join(f"{name} (stuck {late:.0f} s)" for name, late in overdue.items())
        reasons.append(f"unhealthy loop(s): {names}")
    damaged = doc.get("damaged_state") or {}
    if recovered := damaged.get("recovered"):
        files = ", ".join(sorted({str(e.get("file", "database")) for e in recovered}))
        reasons.append(
            f"{len(recovered)} damaged state file(s) set aside ({files}); inspect, then "
            "delete the kept copies"
        )
    if quarantined := damaged.get("quarantined_jobs"):
        reasons.append(f"{len(quarantined)} damaged job record(s) quarantined")
    served = doc.get("served_hosts") or {}
    if bad := served.get("problem_count"):
        first = (served.get("problems") or [{}])[0]
        reasons.append(
            f"{bad} served host name(s) not served, e.g. {first.get('hostname')} "
            f"({first.get('state')}: {first.get('error')})"
        )
    return Verdict(DEGRADED if reasons else HEALTHY, tuple(reasons))


def unreachable_verdict(error: AgentNotAnswering) -> Verdict:
    """The verdict when no agent answered (exit 2)."""
    return Verdict(UNREACHABLE, (str(error),))


def _channel_reason(channel: Mapping[str, Any]) -> str:
    state = channel.get("state")
    error = channel.get("last_error") or channel.get("why")
    detail = f": {error}" if error else ""
    if state == "starting":
        return "not yet in contact with the server (starting)"
    if state == "auth_rejected":
        return f"the server rejects the agent token{detail}"
    if state == "rate_limited":
        return f"the server is rate-limiting the agent{detail}"
    if state == "unavailable":
        return f"no usable channel to the server{detail}"
    return f"the server is unreachable or refusing ({state}){detail}"


#: `argus-agent status --help`: what it shows and its exit codes.
HELP_DESCRIPTION = """\
Ask the running agent (over the control socket in its state dir) what it is
doing: the verdict and why, the server and channel, the outbox, the sender, GPU
readings, drain, damaged state, warnings and its jobs, in 80 columns. It
answers within a second, also while the server is away: usable as a monitoring
check (Nagios/Icinga plugin convention)."""
HELP_EPILOG = """\
exit codes:
  0  healthy
  1  degraded: the server is unreachable or refusing, a token is rejected, the
     outbox is at 90 % of telemetry.outbox_max_mb or more, the agent is
     draining, a loop is unhealthy, or a damaged state file was set aside
  2  no agent is running, or its control socket cannot be reached or does not
     answer within 2 s
--json exits the same way; its document (schema argus-agent.status.v1,
docs/status.md) carries the verdict as "verdict": {"code", "state", "reasons"}.
"""


def json_document(doc: Mapping[str, Any], verdict: Verdict) -> dict[str, Any]:
    """What `status --json` prints: the agent's document and the verdict on it."""
    return {**doc, "verdict": verdict.as_dict()}


def unreachable_document(error: AgentNotAnswering) -> dict[str, Any]:
    """What `status --json` prints when no agent answered: the schema and the verdict."""
    return {"schema": SCHEMA, "verdict": unreachable_verdict(error).as_dict()}
