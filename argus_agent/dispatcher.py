"""Act on server commands exactly once and ack each exactly once.

The dispatcher takes decoded commands from a channel, consults the durable command ledger,
launches or stops jobs, and acks through the channel's ``ack`` callable. A redelivered
command is never acted on twice, not even across agent restarts; an ack that could not be
sent is retried by ``flush_acks`` until the server has it.

What to do with each delivery is decided by the pure state machine in
:mod:`argus_agent.dispatch_rules` (its docstring holds the state table); :class:`Dispatcher`
only carries out the steps it returns, in order: ledger commits, launches and stops through
the job manager, the audit log, refusal reports and acks. The state machine's names are
re-exported here.

Blocking checks
---------------
Building a launch spec stats and resolves the working directory and reads the user
database, either of which can hang for ever (a dead NFS mount, a directory service that
does not answer). It runs in its own daemon thread (:func:`argus_agent.blocking.call_in_thread`),
bounded by ``check_timeout_s``; past it the rerun is refused ("… timed out after N s (hung
filesystem?)") and the event loop never waits on it.

Foreign users
-------------
A per-user agent (not root) refuses batches of other OS users and requests of other Argus
users; each such refusal is counted in :attr:`Dispatcher.foreign_refusals` (see
:class:`argus_agent.dispatch_rules.ForeignRefusals`), which ``argus-agent status`` shows as
a warning.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from argus_agent.audit import AuditLog
from argus_agent.blocking import call_in_thread
from argus_agent.config import Settings
from argus_agent.dispatch_rules import (
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
    Step,
    foreign_user,
    on_ack_answer,
    on_delivery,
    on_outcome,
    outcome_after_error,
    reports_refusal,
    resumed_outcome,
)
from argus_agent.drain import DrainState
from argus_agent.errors import (
    ConflictError,
    JobError,
    LaunchError,
    PayloadError,
    ServerError,
)
from argus_agent.jobs.launcher import Launcher
from argus_agent.jobs.policy import BatchOwner, UserDb, owner_from_env
from argus_agent.jobs.spec import (
    HostFacts,
    LaunchSpec,
    build_launch_spec,
    current_home,
    job_base_env,
)
from argus_agent.jobs.store import JobRecord
from argus_agent.ledger import CommandLedger
from argus_agent.logsetup import get_logger
from argus_agent.protocol import KNOWN_KINDS, AckStatus, Command, MalformedCommand

__all__ = [
    "CHECK_TIMEOUT_S",
    "INTERRUPTED",
    "MAX_HUNG_CHECKS",
    "OWNER_LOOKUP_TIMEOUT_S",
    "UNACKABLE_MEMORY",
    "AckFn",
    "AckVerdict",
    "Act",
    "Claim",
    "Dispatcher",
    "ForeignRefusals",
    "Outcome",
    "OwnerLookup",
    "Record",
    "RefusalReport",
    "Refuse",
    "ReportRefusal",
    "SendAck",
    "Step",
    "call_in_thread",
    "foreign_user",
    "on_ack_answer",
    "on_delivery",
    "on_outcome",
    "outcome_after_error",
    "reports_refusal",
    "resumed_outcome",
]

log = get_logger(__name__)

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


# -- the dispatcher ------------------------------------------------------------------------


class Dispatcher:
    """Routes commands to the job manager. Use from one event loop."""

    def __init__(
        self,
        ledger: CommandLedger,
        jobs: Launcher,
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
        drain: DrainState | None = None,
    ) -> None:
        #: While it says draining, every rerun is refused ("host draining").
        self.drain = drain
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
        self._environ = os.environ if environ is None else environ
        self.base_env = job_base_env(
            self._environ, keep_argus_token=settings.jobs.inherit_argus_token
        )
        self.home = current_home()
        #: The uid this agent runs as (0: a system agent; else a per-user agent).
        self.agent_uid = os.geteuid() if agent_uid is None else agent_uid
        #: The OS user this agent runs as (None when the user database does not know it).
        self.agent_user = _user_name(self.agent_uid)
        #: Reruns refused because they were meant for another user (per-user agents).
        self.foreign_refusals = ForeignRefusals()
        #: The compute-node names this agent serves besides its own (``jobs.slurm_hosts``;
        #: kept current by the served-host poller): reruns of their batches pass the host check.
        self.served_hosts: frozenset[str] = frozenset()
        #: Commands being handled now. A command may arrive twice at once (pushed on the
        #: websocket and polled for a served name): the second delivery must not be taken
        #: for one an agent restart interrupted (the ledger's ``acting``).
        self._handling: set[str] = set()
        #: Reruns launch one at a time, whichever channel delivered them: the capacity check
        #: (jobs.max_jobs) and the launch must not interleave with another rerun's.
        self._launching = asyncio.Lock()
        self._checks: set[threading.Thread] = set()
        self._unackable: dict[tuple[str | None, str | None, str], None] = {}

    def apply_settings(self, settings: Settings) -> None:
        """Use ``settings`` (a reload) for the launches and stops that come next."""
        self.settings = settings
        self.base_env = job_base_env(
            self._environ, keep_argus_token=settings.jobs.inherit_argus_token
        )

    async def stop_locally(self, batch_id: str, by: str, grace_s: float | None) -> JobRecord:
        """An operator's stop on this host (`argus-agent stop`, user ``by``): the very stop a
        server's stop command starts (the shim's SIGTERM to the tree, SIGKILL after the
        grace), with ``grace_s`` instead of ``jobs.stop_grace_s`` when given; audited either
        way. Raises JobError (no such job, already ended) or OSError."""
        try:
            record = await self.jobs.stop(batch_id, f"{by} (local)", grace_s=grace_s)
        except (JobError, OSError) as exc:
            log.warning("local stop refused", batch_id=batch_id, by=by, reason=str(exc))
            self.audit.record(
                "refuse", kind="stop", batch_id=batch_id, local_user=by, reason=str(exc)
            )
            raise
        log.info("local stop", batch_id=batch_id, by=by, pid=record.pid, grace_s=grace_s)
        self.audit.record(
            "stop",
            kind="stop",
            batch_id=batch_id,
            local_user=by,
            pid=record.pid,
            run_as=record.run_as,
            grace_s=record.stop_grace_s,
        )
        return record

    def _refuse_if_draining(self) -> None:
        refusal = self.drain.refusal() if self.drain is not None else None
        if refusal is not None:
            raise PayloadError(refusal)

    async def handle(
        self, item: Command | MalformedCommand, ack: AckFn, *, via: str | None = None
    ) -> None:
        """Act on one delivered command (unless done before) and ack its result. ``via``:
        the served host name whose registration delivered it (None: this agent's own); its
        pending ack is flushed through that registration only.

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
        if cmd_id is not None and cmd_id in self._handling:
            log.debug("command delivered again while being handled; ignored", cmd_id=cmd_id)
            return
        entry = self.ledger.get(cmd_id) if cmd_id is not None else None
        if entry is not None and entry.phase == "acked":
            log.debug("command redelivered after ack; ignored", cmd_id=cmd_id)
        steps = on_delivery(entry, item, self._job(item.batch_id))
        if cmd_id is not None:
            self._handling.add(cmd_id)
        try:
            await self._carry_out(steps, item, ack, via)
        finally:
            self._handling.discard(cmd_id)

    async def flush_acks(self, ack: AckFn, *, via: str | None = None) -> None:
        """Send every ack still pending in the ledger (e.g. after an outage or a restart)
        for the commands delivered through ``via`` (None: this agent's own registration)."""
        for entry in self.ledger.pending_acks():
            if entry.via == via:
                await self._send_ack(entry.cmd_id, ack)

    def _job(self, batch_id: str | None) -> JobRecord | None:
        return self.jobs.get(batch_id) if batch_id is not None else None

    async def _carry_out(
        self,
        steps: tuple[Step, ...],
        item: Command | MalformedCommand,
        ack: AckFn,
        via: str | None,
    ) -> None:
        """Carry out the steps of the state machine for ``item``, in order."""
        cmd_id = item.id if isinstance(item, Command) else item.cmd_id
        for step in steps:
            if isinstance(step, Claim) and cmd_id is not None:
                kind = item.kind if isinstance(item, Command) else "malformed"
                if not self.ledger.begin(cmd_id, kind, item.batch_id, via):
                    await self._send_ack(cmd_id, ack)  # claimed meanwhile: its ack only
                    return
            elif isinstance(step, Act) and isinstance(item, Command):
                outcome = await self._act_safely(item)
                follow = on_outcome(
                    item.kind, item.id, item.batch_id, outcome, self._job(item.batch_id)
                )
                await self._carry_out(follow, item, ack, via)
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
                async with self._launching:
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
        self._refuse_if_draining()
        facts = HostFacts(
            agent_uid=self.agent_uid,
            now=time.time(),
            running_jobs=len(self.jobs.running()),
            home=self.home,
            agent_account=self.agent_account,
            served_hosts=self.served_hosts,
            **await self._recorded_owner(command),
        )
        try:
            spec = await self._checked_spec(command, facts)
        except PayloadError:
            self._note_if_foreign(command, who, facts)
            raise
        # Again: a drain that came while the checks ran (up to check_timeout_s) wins.
        self._refuse_if_draining()
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

    async def _recorded_owner(self, command: Command) -> dict[str, Any]:
        """The OS user Argus recorded for the rerun batch, read from the server, as
        HostFacts fields: ``batch_read`` tells the policy whether the batch could be read at
        all (no reporter token, a batch this token may not see, the server away: then the
        env snapshot's ``USER`` is used); a batch that was read but records no user has no
        known owner."""
        if self.owner_lookup is None:
            return {"batch_owner": None, "batch_read": False}
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
            return {"batch_owner": None, "batch_read": False}
        return {"batch_owner": BatchOwner(user, "batch") if user else None, "batch_read": True}

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
