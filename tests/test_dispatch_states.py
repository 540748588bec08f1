"""The dispatcher's exactly-once state machine as pure functions: every tricky delivery
(redelivery after the ack, a crash while acting, 409/404 on the ack, malformed commands with
and without an id, refused reruns) without a socket, a process or a sleep."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from argus_agent.dispatcher import (
    INTERRUPTED,
    AckVerdict,
    Act,
    Claim,
    ForeignRefusals,
    Outcome,
    Record,
    Refuse,
    ReportRefusal,
    SendAck,
    foreign_user,
    on_ack_answer,
    on_delivery,
    on_outcome,
    outcome_after_error,
)
from argus_agent.errors import (
    AgentTokenRejectedError,
    AuthError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    TransientServerError,
)
from argus_agent.jobs.policy import BatchOwner
from argus_agent.jobs.store import JobRecord
from argus_agent.ledger import CommandLedger, LedgerEntry
from argus_agent.protocol import Command, MalformedCommand

BATCH = "rerun-0123456789ab"


def entry(phase: str, kind: str = "rerun", cmd_id: str = "c-1") -> LedgerEntry:
    return LedgerEntry(cmd_id, kind, BATCH, phase, None, None, None, time.time(), None, None)


def command(kind: str = "rerun", cmd_id: str = "c-1") -> Command:
    return Command(id=cmd_id, kind=kind, batch_id=BATCH, payload={"requested_by": "alice"})


def job(cmd_id: str = "c-1", *, started: bool = False, exit_note: str | None = None) -> JobRecord:
    return JobRecord(
        batch_id=BATCH,
        cmd_id=cmd_id,
        command_line="x",
        argv=["x"],
        cwd="/",
        log_path="/dev/null",
        launched_at=time.time(),
        pid=4242 if started else None,
        started_at=time.time() if started else None,
        exit_note=exit_note,
    )


# -- deliveries ------------------------------------------------------------------------------


def test_a_new_command_is_claimed_before_it_is_acted_on() -> None:
    assert on_delivery(None, command(), None) == (Claim(), Act())
    assert on_delivery(None, command("stop"), None) == (Claim(), Act())


@pytest.mark.parametrize("kind", ["rerun", "stop", "reboot"])
def test_a_redelivery_after_the_ack_does_nothing(kind: str) -> None:
    assert on_delivery(entry("acked", kind), command(kind), job(started=True)) == ()


def test_a_redelivery_with_the_ack_pending_only_sends_the_ack() -> None:
    assert on_delivery(entry("to_ack"), command(), None) == (SendAck(),)
    malformed = MalformedCommand("c-1", "bad", "rerun", BATCH)
    assert on_delivery(entry("to_ack", "malformed"), malformed, None) == (SendAck(),)


def test_a_stop_claimed_before_a_crash_is_done_again() -> None:
    assert on_delivery(entry("acting", "stop"), command("stop"), job(started=True)) == (Act(),)


def test_a_rerun_claimed_before_a_crash_is_never_started_again() -> None:
    started = job(started=True)
    assert on_delivery(entry("acting"), command(), started) == (
        Record(Outcome("started", 4242)),
        SendAck(),
    )
    # It never got to the exec: failed, and its batch is ended with the reason.
    steps = on_delivery(entry("acting"), command(), None)
    assert steps == (
        ReportRefusal(INTERRUPTED),
        Record(Outcome("failed", error=INTERRUPTED)),
        SendAck(),
    )
    noted = on_delivery(entry("acting"), command(), job(exit_note="the launch was interrupted"))
    reason = "the launch was interrupted; request the rerun again"
    assert noted == (ReportRefusal(reason), Record(Outcome("failed", error=reason)), SendAck())


def test_a_crashed_rerun_does_not_end_a_batch_that_runs_another_commands_job() -> None:
    steps = on_delivery(entry("acting"), command(), job("c-other", started=True))
    assert steps == (Record(Outcome("failed", error=INTERRUPTED)), SendAck())


def test_a_malformed_command_with_an_id_is_acked_failed_once() -> None:
    rerun = MalformedCommand("c-1", "malformed command: an integer of 5000 digits", "rerun", BATCH)
    failed = Outcome("failed", error=rerun.reason)
    assert on_delivery(None, rerun, None) == (
        Refuse(rerun.reason),
        Claim(),
        ReportRefusal(rerun.reason),
        Record(failed),
        SendAck(),
    )
    # Claimed in an earlier life as something else: the refusal is recorded over it.
    assert on_delivery(entry("acting"), rerun, None) == (
        Refuse(rerun.reason),
        ReportRefusal(rerun.reason),
        Record(failed),
        SendAck(),
    )
    assert on_delivery(entry("acked", "malformed"), rerun, None) == ()
    # ... unless its job got as far as the exec before: the job runs, its batch is not ended.
    launched = job(started=True)
    assert on_delivery(entry("acting"), rerun, launched) == (
        Refuse(rerun.reason),
        Record(Outcome("started", 4242)),
        SendAck(),
    )
    stop = MalformedCommand("c-2", "malformed command: x", "stop", BATCH)
    assert ReportRefusal(stop.reason) not in on_delivery(None, stop, None)


def test_a_malformed_command_without_an_id_is_only_refused() -> None:
    rerun = MalformedCommand(None, "malformed command: nests 5002 levels", "rerun", BATCH)
    assert on_delivery(None, rerun, None) == (Refuse(rerun.reason), ReportRefusal(rerun.reason))
    anonymous = MalformedCommand(None, "malformed command: not an object")
    assert on_delivery(None, anonymous, None) == (Refuse(anonymous.reason),)


# -- outcomes --------------------------------------------------------------------------------


def test_a_started_rerun_is_recorded_then_acked() -> None:
    started = Outcome("started", 99)
    assert on_outcome("rerun", "c-1", BATCH, started, job(started=True)) == (
        Record(started),
        SendAck(),
    )


def test_a_refused_rerun_ends_its_batch_before_the_result_is_recorded() -> None:
    refused = Outcome("failed", error="working directory /x does not exist on this host")
    assert on_outcome("rerun", "c-1", BATCH, refused, None) == (
        ReportRefusal("working directory /x does not exist on this host"),
        Record(refused),
        SendAck(),
    )
    exec_failed = Outcome("failed", error="cannot start /bin/nope", exec_failed=True)
    steps = on_outcome("rerun", "c-1", BATCH, exec_failed, job())
    assert steps[0] == ReportRefusal("exec failure: cannot start /bin/nope")


def test_only_reruns_end_their_batch_and_never_another_commands_job() -> None:
    failed = Outcome("failed", error="no job for batch x on this host")
    assert on_outcome("stop", "c-1", BATCH, failed, None) == (Record(failed), SendAck())
    taken = Outcome("failed", error=f"a job for batch {BATCH} already exists on this host")
    for holder in (job("c-1", started=True), job("c-1"), job("c-2", started=True)):
        assert on_outcome("rerun", "c-2", BATCH, taken, holder) == (Record(taken), SendAck())


def test_an_unexpected_error_is_acked_started_only_if_the_job_runs() -> None:
    boom = RuntimeError("boom")
    assert outcome_after_error(command(), job(started=True), boom) == Outcome("started", 4242)
    assert outcome_after_error(command(), None, boom) == Outcome(
        "failed", error="agent error: RuntimeError: boom"
    )
    assert outcome_after_error(command("stop"), job(started=True), boom).status == "failed"


# -- ack answers -----------------------------------------------------------------------------


def test_what_an_ack_answer_means() -> None:
    assert on_ack_answer(None) == AckVerdict(True)
    assert on_ack_answer(ConflictError("409", status=409)) == AckVerdict(
        True, "already acked (409)"
    )
    assert on_ack_answer(NotFoundError("404", status=404)) == AckVerdict(
        True, "server no longer knows the command (404)"
    )
    for pending in (
        TransientServerError("down"),
        RateLimitedError("429", retry_after=1),
        AgentTokenRejectedError("401"),
        AuthError("403"),
        ProtocolError("400"),
    ):
        assert on_ack_answer(pending) == AckVerdict(False), pending


def test_a_result_with_a_lone_surrogate_is_stored(tmp_path: Path) -> None:
    ledger = CommandLedger(tmp_path / "state.db")
    try:
        assert ledger.begin("c-1", "rerun", BATCH)
        ledger.record_result("c-1", "failed", error="working directory /x\ud800 does not exist")
        stored = ledger.get("c-1")
        assert stored is not None and stored.phase == "to_ack"
        assert stored.error == "working directory /x\\ud800 does not exist"
    finally:
        ledger.close()


# -- foreign users ---------------------------------------------------------------------------


def test_which_refusals_are_for_another_user() -> None:
    per_user = {"agent_uid": 1000, "agent_user": "alice", "agent_account": "alice"}
    bob = BatchOwner("bob", "batch")
    own = BatchOwner("alice", "batch")
    assert foreign_user("alice", bob, allowed_requesters=(), **per_user) == ("bob", "OS user")
    assert foreign_user("bob", own, allowed_requesters=(), **per_user) == ("bob", "Argus user")
    assert foreign_user("bob", own, allowed_requesters=["*"], **per_user) is None
    assert foreign_user("carol", own, allowed_requesters=["carol"], **per_user) is None
    assert foreign_user("alice", own, allowed_requesters=(), **per_user) is None
    assert foreign_user("alice", None, allowed_requesters=(), **per_user) is None
    system = {**per_user, "agent_uid": 0, "agent_user": "root"}
    assert foreign_user("bob", bob, allowed_requesters=(), **system) is None


def test_foreign_refusals_are_counted_with_the_last_one() -> None:
    seen = ForeignRefusals()
    assert seen.warning() is None and seen.as_dict()["count"] == 0
    seen.note("bob", "OS user", "rerun-1", 1000.0)
    seen.note("carol", "Argus user", "rerun-2", 2000.0)
    shown = seen.as_dict()
    assert {k: shown[k] for k in ("count", "last_user", "last_user_kind", "last_batch_id")} == {
        "count": 2,
        "last_user": "carol",
        "last_user_kind": "Argus user",
        "last_batch_id": "rerun-2",
    }
    assert shown["last_at"] == 2000.0
    assert "one system agent" in shown["warning"] and "'carol'" in shown["warning"]
