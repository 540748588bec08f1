"""The dispatcher's exactly-once state machine: pure decisions, values in, steps out.

Nothing here does I/O, sleeps or reads a clock: every decision is a pure function of (ledger
entry, command, outcome), tested without sockets or sleeps (``tests/test_dispatch_states.py``).
:class:`argus_agent.dispatcher.Dispatcher` only carries out the steps they return, in
order::

    on_delivery(entry, item, job)      a command arrives (again)
    on_outcome(..., outcome, job)      the result of acting on it is known
    on_ack_answer(error)               the server answered an ack

    ledger entry  delivered item         steps
    ------------  ---------------------  ----------------------------------------------------
    none          command                Claim (phase acting, committed), Act → on_outcome
    acting        stop                   Act again (a stop is idempotent)
    acting        rerun (or other kind)  never started again: Record started if its job got
                                         as far as the exec, else failed; SendAck
    to_ack        any                    SendAck (the stored result)
    acked         any                    nothing: redelivered after its ack, ignored
    none/acting   malformed with an id   Refuse (log, audit), Claim, Record failed, SendAck
    to_ack/acked  malformed with an id   as for a command
    -             malformed, no id       Refuse (log, audit: once per agent run); nothing
                                         can be acked, the server keeps redelivering it

    on_outcome: [ReportRefusal] (a rerun that failed), Record (phase to_ack), SendAck
    ack answer: 2xx → acked; 409 → acked ("already acked"); 404 → acked ("server no longer
    knows the command"); any other error → stays to_ack and propagates (sent again later)

A refused rerun (policy, bad cwd, expired, malformed with a recoverable batch id, an exec
that failed, an agent restart mid-launch…) leaves its new batch ``requested`` in Argus
v0.3.0, so ``ReportRefusal`` ends it with ``batch_failed`` carrying the reason (through
``on_launch_failed``, i.e. ``Telemetry.launch_failed``; sent when a reporter token is
available). The report comes before the result is recorded, so a crash in between reports
again on the next delivery, under the same event id. It is skipped when this host's job
table holds another command's job for that batch: a rerun into a running batch must not end
it.

Foreign users
-------------
Argus v0.3.0 sends a host's commands to one agent of that host, whoever owns it. A per-user
agent (not root) refuses batches of other OS users and requests of other Argus users
(:func:`foreign_user` says which); each such refusal is counted in a
:class:`ForeignRefusals`, which ``argus-agent status`` shows as a warning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from argus_agent.errors import ConflictError, NotFoundError
from argus_agent.jobs.policy import BatchOwner
from argus_agent.jobs.store import JobRecord
from argus_agent.ledger import LedgerEntry
from argus_agent.protocol import AckStatus, Command, MalformedCommand

INTERRUPTED = (
    "the agent restarted while handling this command; it is not retried so that nothing runs"
    " twice, request it again"
)


# -- the state machine: pure decisions -----------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What to ack for a command: ``started`` (with the job's pid) or ``failed`` (a reason).

    ``exec_failed``: the job's exec itself failed (its batch's error says "exec failure").
    """

    status: AckStatus
    pid: int | None = None
    error: str | None = None
    exec_failed: bool = False


@dataclass(frozen=True)
class Claim:
    """Commit phase ``acting`` for the command before anything is done."""


@dataclass(frozen=True)
class Act:
    """Launch or stop; the result then goes through :func:`on_outcome`."""


@dataclass(frozen=True)
class Refuse:
    """A malformed command: log and audit its refusal."""

    reason: str


@dataclass(frozen=True)
class ReportRefusal:
    """End the refused rerun's batch with ``batch_failed`` whose error is ``error``."""

    error: str


@dataclass(frozen=True)
class Record:
    """Commit the outcome (phase ``to_ack``)."""

    outcome: Outcome


@dataclass(frozen=True)
class SendAck:
    """Send the ack the ledger holds (and move to ``acked`` as the answer says)."""


Step = Claim | Act | Refuse | ReportRefusal | Record | SendAck


@dataclass(frozen=True)
class AckVerdict:
    """What an ack's answer means: ``acked`` (with a note for the ledger) or still pending."""

    acked: bool
    note: str | None = None


def on_delivery(
    entry: LedgerEntry | None, item: Command | MalformedCommand, job: JobRecord | None
) -> tuple[Step, ...]:
    """The steps for one delivery of ``item``, given its ledger ``entry`` and the job this
    host holds for its batch (``job``, None when none). Pure."""
    if entry is not None and entry.phase == "acked":
        return ()
    if entry is not None and entry.phase == "to_ack":
        return (SendAck(),)
    if isinstance(item, MalformedCommand):
        outcome = Outcome("failed", error=item.reason)
        if entry is not None and job is not None and job.cmd_id == entry.cmd_id and job.started:
            # Claimed (and launched) as a good command before a crash: its job runs.
            outcome = Outcome("started", job.pid)
        steps: tuple[Step, ...] = (Refuse(item.reason),)
        if entry is None and item.cmd_id is not None:
            steps += (Claim(),)
        return steps + on_outcome(item.kind, item.cmd_id, item.batch_id, outcome, job)
    if entry is None:
        return (Claim(), Act())
    # phase "acting": claimed in an earlier life that died before recording a result.
    if item.kind == "stop":
        return (Act(),)
    return on_outcome(item.kind, item.id, item.batch_id, resumed_outcome(item, job), job)


def on_outcome(
    kind: str | None,
    cmd_id: str | None,
    batch_id: str | None,
    outcome: Outcome,
    job: JobRecord | None,
) -> tuple[Step, ...]:
    """The steps once a command's ``outcome`` is known (``job``: the job this host holds for
    ``batch_id`` now). Pure."""
    steps: tuple[Step, ...] = ()
    if reports_refusal(kind, cmd_id, batch_id, outcome, job):
        error = outcome.error or "refused by the agent"
        steps += (ReportRefusal(f"exec failure: {error}" if outcome.exec_failed else error),)
    if cmd_id is not None:
        steps += (Record(outcome), SendAck())
    return steps


def reports_refusal(
    kind: str | None,
    cmd_id: str | None,
    batch_id: str | None,
    outcome: Outcome,
    job: JobRecord | None,
) -> bool:
    """Whether a failed outcome ends the command's batch with ``batch_failed``: only for a
    rerun whose batch is known, and never for a batch with a job that started on this host
    (its own end reports it) or that another command's job holds. Pure."""
    if kind != "rerun" or outcome.status != "failed" or batch_id is None:
        return False
    return job is None or (job.cmd_id == cmd_id and not job.started)


def resumed_outcome(command: Command, job: JobRecord | None) -> Outcome:
    """The outcome of a rerun an earlier agent run claimed but did not finish. Pure.

    It is never started again: if its job got as far as the exec it is acked ``started``,
    if its launch ended with a note that is the reason, else the agent's restart is.
    """
    if job is not None and job.cmd_id == command.id and job.started:
        return Outcome("started", job.pid)
    if job is not None and job.cmd_id == command.id and job.exit_note:
        return Outcome("failed", error=f"{job.exit_note}; request the rerun again")
    return Outcome("failed", error=INTERRUPTED)


def outcome_after_error(command: Command, job: JobRecord | None, exc: Exception) -> Outcome:
    """What to ack after an unexpected error while acting: ``started`` if the rerun's job
    runs anyway, else ``failed`` naming the error. Pure."""
    if command.kind == "rerun" and job is not None and job.cmd_id == command.id:
        return Outcome("started", job.pid)
    return Outcome("failed", error=f"agent error: {type(exc).__name__}: {exc}")


def on_ack_answer(error: Exception | None) -> AckVerdict:
    """What the server's answer to an ack means for the ledger. Pure.

    Raises nothing; an error that leaves the ack pending is re-raised by the caller.
    """
    if error is None:
        return AckVerdict(True)
    if isinstance(error, ConflictError):
        return AckVerdict(True, "already acked (409)")
    if isinstance(error, NotFoundError):
        return AckVerdict(True, "server no longer knows the command (404)")
    return AckVerdict(False)


# -- foreign users ---------------------------------------------------------------------------


@dataclass
class ForeignRefusals:
    """Commands the server handed this per-user agent for another user, which it refused.

    Argus v0.3.0 sends a host's commands to one agent of the host, whoever owns it, so
    per-user agents on a shared host receive each other's reruns (recorded environment
    included). ``count`` since the agent started; the last one's user, what kind of user it
    is (``"OS user"``: the batch's owner; ``"Argus user"``: who asked), batch and time.
    """

    count: int = 0
    last_user: str | None = None
    last_user_kind: str | None = None
    last_batch_id: str | None = None
    #: Unix time of the last one.
    last_at: float | None = None

    def note(self, user: str, user_kind: str, batch_id: str, at: float) -> None:
        """Count one more refusal, remembering it as the last."""
        self.count += 1
        self.last_user, self.last_user_kind = user, user_kind
        self.last_batch_id, self.last_at = batch_id, at

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{count, last_user, last_user_kind, last_batch_id, last_at,
        warning}`` (``warning`` is None while ``count`` is 0)."""
        return {
            "count": self.count,
            "last_user": self.last_user,
            "last_user_kind": self.last_user_kind,
            "last_batch_id": self.last_batch_id,
            "last_at": self.last_at,
            "warning": self.warning(),
        }

    def warning(self) -> str | None:
        """One line for ``status``, or None when there was no such command."""
        if not self.count:
            return None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_at or 0))
        return (
            f"the server handed this per-user agent {self.count} command(s) for other users "
            f"(last: {self.last_user_kind} {self.last_user!r}, batch {self.last_batch_id}, "
            f"{when}); Argus sends a host's commands to one agent of the host, so a shared "
            "host needs one system agent, not one per user (docs/operations.md)"
        )


def foreign_user(
    requested_by: str | None,
    owner: BatchOwner | None,
    *,
    agent_uid: int,
    agent_user: str | None,
    agent_account: str | None,
    allowed_requesters: Sequence[str],
) -> tuple[str, str] | None:
    """``(user, kind)`` when a per-user agent (``agent_uid`` not 0) got a rerun meant for
    another user: the batch belongs to another OS user, or another Argus user asked. Pure."""
    if agent_uid == 0:
        return None
    if owner is not None and agent_user is not None and owner.name != agent_user:
        return owner.name, "OS user"
    allowed = set(allowed_requesters) | ({agent_account} if agent_account else set())
    if requested_by and allowed and "*" not in allowed and requested_by not in allowed:
        return requested_by, "Argus user"
    return None
