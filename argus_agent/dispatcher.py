"""Act on server commands exactly once and ack each exactly once.

The dispatcher takes decoded commands from a channel, consults the durable command ledger,
launches or stops jobs, and acks through the channel's ``ack`` callable. A redelivered
command is never acted on twice, not even across agent restarts; an ack that could not be
sent is retried by ``flush_acks`` until the server has it.

The exactly-once state machine
------------------------------
Every decision is a pure function of (ledger entry, command, outcome), tested without
sockets or sleeps (``tests/test_dispatch_states.py``); :class:`Dispatcher` only carries out
the steps they return, in order::

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

Blocking checks
---------------
Building a launch spec stats and resolves the working directory and reads the user
database, either of which can hang for ever (a dead NFS mount, a directory service that
does not answer). It runs in its own daemon thread (:func:`call_in_thread`), bounded by
``check_timeout_s``; past it the rerun is refused ("… timed out after N s (hung
filesystem?)") and the event loop never waits on it.

Foreign users
-------------
Argus v0.3.0 sends a host's commands to one agent of that host, whoever owns it. A per-user
agent (not root) refuses batches of other OS users and requests of other Argus users; each
such refusal is counted in :attr:`Dispatcher.foreign_refusals` (see
:class:`ForeignRefusals`), which ``argus-agent status`` shows as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from argus_agent.audit import AuditLog
from argus_agent.config import Settings
from argus_agent.errors import (
    ConflictError,
    JobError,
    LaunchError,
    NotFoundError,
    PayloadError,
    ServerError,
)
from argus_agent.jobs.policy import BatchOwner, UserDb, owner_from_env
from argus_agent.jobs.spec import (
    HostFacts,
    LaunchSpec,
    build_launch_spec,
    current_home,
    job_base_env,
)
from argus_agent.jobs.store import JobRecord
from argus_agent.jobs.supervisor import JobManager
from argus_agent.ledger import CommandLedger, LedgerEntry
from argus_agent.logsetup import get_logger
from argus_agent.protocol import KNOWN_KINDS, AckStatus, Command, MalformedCommand

log = get_logger(__name__)

T = TypeVar("T")

AckFn = Callable[[str, AckStatus, int | None, str | None], Awaitable[None]]
#: Reads the OS user Argus recorded for a batch (None: the batch records none).
OwnerLookup = Callable[[str], Awaitable[str | None]]
#: Ends a refused rerun's batch: told the command (or what was recovered of it) and the text
#: for the batch's error.
RefusalReport = Callable[[Command | MalformedCommand, str], Awaitable[None]]
#: How long reading a batch's recorded user may take before the env snapshot is used.
OWNER_LOOKUP_TIMEOUT_S = 10.0
#: How long a launch's checks (user lookups, the working directory's realpath and stat) may
#: take before the rerun is refused.
CHECK_TIMEOUT_S = 15.0
#: Checks still hung in their threads beyond which a new rerun is refused without trying.
MAX_HUNG_CHECKS = 4
#: Malformed commands without an id remembered (to log and audit each once per run).
UNACKABLE_MEMORY = 256

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


# -- blocking calls off the loop -------------------------------------------------------------


async def call_in_thread(
    fn: Callable[[], T], timeout_s: float, threads: set[threading.Thread] | None = None
) -> T:
    """Run the blocking ``fn`` in a new daemon thread; its result or its exception, or
    TimeoutError after ``timeout_s`` (the thread is then left to return on its own: a thread
    blocked in the kernel cannot be stopped). ``threads`` collects the thread.

    Not ``asyncio.to_thread``: the default executor's threads are joined when the loop shuts
    down, so one ``stat`` hung on a dead NFS mount would hang the agent's exit as well, and
    each would hold one of its few workers for ever.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: Exception | None) -> None:
        if done.done():  # timed out meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        result: Any = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=work, name="argus-agent-check", daemon=True)
    if threads is not None:
        threads.add(thread)
    thread.start()
    return await asyncio.wait_for(done, timeout_s)


# -- the dispatcher ------------------------------------------------------------------------


class Dispatcher:
    """Routes commands to the job manager. Use from one event loop."""

    def __init__(
        self,
        ledger: CommandLedger,
        jobs: JobManager,
        settings: Settings,
        audit: AuditLog,
        *,
        environ: Mapping[str, str] | None = None,
        userdb: UserDb | None = None,
        agent_account: str | None = None,
        owner_lookup: OwnerLookup | None = None,
        on_launch_failed: RefusalReport | None = None,
        check_timeout_s: float = CHECK_TIMEOUT_S,
        agent_uid: int | None = None,
    ) -> None:
        #: The Argus account that registered this agent.
        self.agent_account = agent_account
        #: Reads a batch's recorded OS user from the server (needs a reporter token).
        self.owner_lookup = owner_lookup
        #: Told when a rerun is refused or its exec failed, to end its batch.
        self.on_launch_failed = on_launch_failed
        #: How long a launch's checks may take (see CHECK_TIMEOUT_S).
        self.check_timeout_s = check_timeout_s
        self.ledger = ledger
        self.jobs = jobs
        self.settings = settings
        self.audit = audit
        self.userdb = userdb or UserDb()
        self.base_env = job_base_env(
            os.environ if environ is None else environ,
            keep_argus_token=settings.jobs.inherit_argus_token,
        )
        self.home = current_home()
        #: The uid this agent runs as (0: a system agent; else a per-user agent).
        self.agent_uid = os.geteuid() if agent_uid is None else agent_uid
        #: The OS user this agent runs as (None when the user database does not know it).
        self.agent_user = _user_name(self.agent_uid)
        #: Reruns refused because they were meant for another user (per-user agents).
        self.foreign_refusals = ForeignRefusals()
        self._checks: set[threading.Thread] = set()
        self._unackable: dict[tuple[str | None, str | None, str], None] = {}

    async def handle(self, item: Command | MalformedCommand, ack: AckFn) -> None:
        """Act on one delivered command (unless done before) and ack its result.

        Server errors from ``ack`` other than 409/404 propagate (the ack stays pending).
        """
        cmd_id = item.id if isinstance(item, Command) else item.cmd_id
        if isinstance(item, MalformedCommand) and cmd_id is None:
            key = (item.kind, item.batch_id, item.reason)
            if key in self._unackable:
                log.debug("malformed command without an id redelivered", reason=item.reason)
                return
            self._unackable[key] = None
            if len(self._unackable) > UNACKABLE_MEMORY:
                del self._unackable[next(iter(self._unackable))]
        entry = self.ledger.get(cmd_id) if cmd_id is not None else None
        if entry is not None and entry.phase == "acked":
            log.debug("command redelivered after ack; ignored", cmd_id=cmd_id)
        await self._carry_out(on_delivery(entry, item, self._job(item.batch_id)), item, ack)

    async def flush_acks(self, ack: AckFn) -> None:
        """Send every ack still pending in the ledger (e.g. after an outage or a restart)."""
        for entry in self.ledger.pending_acks():
            await self._send_ack(entry.cmd_id, ack)

    def _job(self, batch_id: str | None) -> JobRecord | None:
        return self.jobs.get(batch_id) if batch_id is not None else None

    async def _carry_out(
        self, steps: tuple[Step, ...], item: Command | MalformedCommand, ack: AckFn
    ) -> None:
        """Carry out the steps of the state machine for ``item``, in order."""
        cmd_id = item.id if isinstance(item, Command) else item.cmd_id
        for step in steps:
            if isinstance(step, Claim) and cmd_id is not None:
                kind = item.kind if isinstance(item, Command) else "malformed"
                if not self.ledger.begin(cmd_id, kind, item.batch_id):
                    await self._send_ack(cmd_id, ack)  # claimed meanwhile: its ack only
                    return
            elif isinstance(step, Act) and isinstance(item, Command):
                outcome = await self._act_safely(item)
                follow = on_outcome(
                    item.kind, item.id, item.batch_id, outcome, self._job(item.batch_id)
                )
                await self._carry_out(follow, item, ack)
            elif isinstance(step, Refuse) and isinstance(item, MalformedCommand):
                self._refuse_malformed(item)
            elif isinstance(step, ReportRefusal):
                await self._report_refusal(item, step.error)
            elif isinstance(step, Record) and cmd_id is not None:
                outcome = step.outcome
                self.ledger.record_result(
                    cmd_id, outcome.status, pid=outcome.pid, error=outcome.error
                )
            elif isinstance(step, SendAck) and cmd_id is not None:
                await self._send_ack(cmd_id, ack)

    def _refuse_malformed(self, item: MalformedCommand) -> None:
        log.warning(
            "malformed command refused",
            cmd_id=item.cmd_id,
            kind=item.kind,
            batch_id=item.batch_id,
            reason=item.reason,
        )
        self.audit.record(
            "refuse",
            cmd_id=item.cmd_id,
            kind=item.kind,
            batch_id=item.batch_id,
            requested_by=None,
            reason=item.reason,
            malformed=True,
        )

    async def _report_refusal(self, item: Command | MalformedCommand, error: str) -> None:
        if self.on_launch_failed is None:
            return
        try:
            await self.on_launch_failed(item, error)
        except Exception:
            log.exception("reporting a refused rerun failed", batch_id=item.batch_id)

    async def _act_safely(self, command: Command) -> Outcome:
        try:
            return await self._act(command)
        except Exception as exc:  # a bug must cost one command, not the daemon
            log.exception("command handling failed", cmd_id=command.id, kind=command.kind)
            return outcome_after_error(command, self.jobs.get(command.batch_id), exc)

    async def _act(self, command: Command) -> Outcome:
        requested_by = command.payload.get("requested_by")
        who = requested_by if isinstance(requested_by, str) else None
        if command.kind not in KNOWN_KINDS:
            reason = f"command kind {command.kind[:64]!r} is not supported by this agent version"
            log.warning("unknown command kind", cmd_id=command.id, kind=command.kind)
            self._audit("refuse", command, who, reason=reason)
            return Outcome("failed", error=reason)
        try:
            if command.kind == "rerun":
                return await self._rerun(command, who)
            record = await self.jobs.stop(command.batch_id, who)
            self._audit("stop", command, who, pid=record.pid, run_as=record.run_as)
            return Outcome("started", record.pid)
        except JobError as exc:
            log.warning(
                "command refused",
                cmd_id=command.id,
                kind=command.kind,
                batch_id=command.batch_id,
                reason=str(exc),
            )
            extra = {"cwd": command.payload.get("cwd")} if command.kind == "rerun" else {}
            # Details for the local audit log only (e.g. where a refused cwd led).
            extra.update(exc.audit if isinstance(exc, PayloadError) else {})
            self._audit("refuse", command, who, reason=str(exc), **extra)
            return Outcome("failed", error=str(exc), exec_failed=isinstance(exc, LaunchError))
        except OSError as exc:
            log.error("command failed", cmd_id=command.id, kind=command.kind, error=str(exc))
            self._audit("refuse", command, who, reason=f"agent error: {exc}")
            return Outcome("failed", error=f"agent error: {exc}")

    async def _rerun(self, command: Command, who: str | None) -> Outcome:
        facts = HostFacts(
            agent_uid=self.agent_uid,
            now=time.time(),
            running_jobs=len(self.jobs.running()),
            home=self.home,
            agent_account=self.agent_account,
            batch_owner=await self._recorded_owner(command),
        )
        try:
            spec = await self._checked_spec(command, facts)
        except PayloadError:
            self._note_if_foreign(command, who, facts)
            raise
        record = await self.jobs.launch(spec)
        self._audit(
            "launch",
            command,
            who,
            pid=record.pid,
            run_as=spec.identity.user,
            uid=spec.identity.uid,
            command=spec.command_line,
            argv=list(spec.argv),
            owner=spec.owner.name if spec.owner else None,
            owner_source=spec.owner.source if spec.owner else None,
            recorded_cwd=spec.recorded_cwd,
            cwd=str(spec.cwd),
            dropped_env=list(spec.dropped_env),
            source_batch_id=spec.source_batch_id,
        )
        if spec.dropped_env:
            log.warning(
                "recorded environment variables dropped by jobs.env_deny",
                batch_id=command.batch_id,
                names=list(spec.dropped_env),
            )
        return Outcome("started", record.pid)

    async def _checked_spec(self, command: Command, facts: HostFacts) -> LaunchSpec:
        """``build_launch_spec`` (user lookups, realpath and stat of the cwd) in its own
        thread, bounded by ``check_timeout_s``. Raises PayloadError (policy, timeout)."""
        self._checks = {thread for thread in self._checks if thread.is_alive()}
        if len(self._checks) >= MAX_HUNG_CHECKS:
            raise PayloadError(
                f"{len(self._checks)} earlier launch checks are still hung (a hung filesystem "
                "or user directory?); new reruns are refused until they return"
            )
        build = functools.partial(
            build_launch_spec,
            command,
            settings=self.settings,
            base_env=self.base_env,
            facts=facts,
            userdb=self.userdb,
        )
        try:
            return await call_in_thread(build, self.check_timeout_s, self._checks)
        except TimeoutError:
            raise PayloadError(
                f"working directory check timed out after {self.check_timeout_s:g} s (hung "
                "filesystem, or a user lookup that does not answer?); nothing was started"
            ) from None

    def _note_if_foreign(self, command: Command, who: str | None, facts: HostFacts) -> None:
        owner = facts.batch_owner or owner_from_env(command.payload.get("env"))
        foreign = foreign_user(
            who,
            owner,
            agent_uid=facts.agent_uid,
            agent_user=self.agent_user,
            agent_account=self.agent_account,
            allowed_requesters=self.settings.jobs.allowed_requesters,
        )
        if foreign is None:
            return
        user, user_kind = foreign
        self.foreign_refusals.note(user, user_kind, command.batch_id, facts.now)
        log.warning(
            "the server handed this per-user agent a rerun for another user; on a shared "
            "host run one system agent instead of one per user (docs/operations.md)",
            batch_id=command.batch_id,
            user=user,
            user_kind=user_kind,
            count=self.foreign_refusals.count,
        )

    async def _recorded_owner(self, command: Command) -> BatchOwner | None:
        """The OS user Argus recorded for the rerun batch, read from the server; None when it
        cannot be read (no reporter token, no such batch for this token, server away): the
        policy then falls back on the env snapshot's ``USER``."""
        if self.owner_lookup is None:
            return None
        try:
            user = await asyncio.wait_for(
                self.owner_lookup(command.batch_id), OWNER_LOOKUP_TIMEOUT_S
            )
        except (ServerError, TimeoutError) as exc:
            log.warning(
                "cannot read the batch's recorded user; using the env snapshot's USER",
                batch_id=command.batch_id,
                reason=str(exc) or type(exc).__name__,
            )
            return None
        return BatchOwner(user, "batch") if user else None

    def _audit(self, action: str, cmd: Command, who: str | None, **fields: object) -> None:
        self.audit.record(
            action,
            cmd_id=cmd.id,
            kind=cmd.kind,
            batch_id=cmd.batch_id,
            requested_by=who,
            **fields,
        )

    async def _send_ack(self, cmd_id: str, ack: AckFn) -> None:
        entry = self.ledger.get(cmd_id)
        if entry is None or entry.phase != "to_ack" or entry.ack_status is None:
            return
        try:
            await ack(cmd_id, entry.ack_status, entry.pid, entry.error)
        except ServerError as exc:
            verdict = on_ack_answer(exc)
            if not verdict.acked:
                raise
            self.ledger.mark_acked(cmd_id, verdict.note)
            if isinstance(exc, ConflictError):
                log.info("command was already acked", cmd_id=cmd_id)
            else:
                log.warning("ack refused: command unknown to the server", cmd_id=cmd_id)
            return
        self.ledger.mark_acked(cmd_id, on_ack_answer(None).note)
        log.info(
            "command acked",
            cmd_id=cmd_id,
            kind=entry.kind,
            status=entry.ack_status,
            pid=entry.pid,
            error=entry.error,
        )


def _user_name(uid: int) -> str | None:
    """The name of user ``uid``, or None when the user database does not know it."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
