"""Act on server commands exactly once and ack each exactly once.

The dispatcher takes decoded commands from a channel, consults the durable command ledger,
launches or stops jobs, and acks through the channel's ``ack`` callable. A redelivered
command is never acted on twice, not even across agent restarts; an ack that could not be
sent is retried by ``flush_acks`` until the server has it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping

from argus_agent.audit import AuditLog
from argus_agent.config import Settings
from argus_agent.errors import (
    ConflictError,
    JobError,
    LaunchError,
    NotFoundError,
    ServerError,
)
from argus_agent.jobs.policy import BatchOwner, UserDb
from argus_agent.jobs.spec import HostFacts, build_launch_spec, current_home, job_base_env
from argus_agent.jobs.supervisor import JobManager
from argus_agent.ledger import CommandLedger
from argus_agent.logsetup import get_logger
from argus_agent.protocol import KNOWN_KINDS, AckStatus, Command, MalformedCommand

log = get_logger(__name__)

AckFn = Callable[[str, AckStatus, int | None, str | None], Awaitable[None]]
#: Reads the OS user Argus recorded for a batch (None: the batch records none).
OwnerLookup = Callable[[str], Awaitable[str | None]]
#: How long reading a batch's recorded user may take before the env snapshot is used.
OWNER_LOOKUP_TIMEOUT_S = 10.0

INTERRUPTED = (
    "the agent restarted while handling this command; it is not retried so that nothing runs"
    " twice, request it again"
)


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
        on_launch_failed: Callable[[Command, str], Awaitable[None]] | None = None,
    ) -> None:
        #: The Argus account that registered this agent.
        self.agent_account = agent_account
        #: Reads a batch's recorded OS user from the server (needs a reporter token).
        self.owner_lookup = owner_lookup
        #: Told when a rerun's exec failed (not when policy refused it).
        self.on_launch_failed = on_launch_failed
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

    async def handle(self, item: Command | MalformedCommand, ack: AckFn) -> None:
        """Act on one delivered command (unless done before) and ack its result.

        Server errors from ``ack`` other than 409/404 propagate (the ack stays pending).
        """
        if isinstance(item, MalformedCommand):
            await self._handle_malformed(item, ack)
            return
        entry = self.ledger.get(item.id)
        if entry is None:
            if self.ledger.begin(item.id, item.kind, item.batch_id):
                try:
                    status, pid, error = await self._act(item)
                except Exception as exc:  # a bug must cost one command, not the daemon
                    log.exception("command handling failed", cmd_id=item.id, kind=item.kind)
                    status, pid, error = self._outcome_after_error(item, exc)
                self.ledger.record_result(item.id, status, pid=pid, error=error)
        elif entry.phase == "acting":
            # Claimed in an earlier life that died before recording a result.
            status, pid, error = await self._resume(item)
            self.ledger.record_result(item.id, status, pid=pid, error=error)
        elif entry.phase == "acked":
            log.debug("command redelivered after ack; ignored", cmd_id=item.id)
            return
        await self._send_ack(item.id, ack)

    def _outcome_after_error(
        self, command: Command, exc: Exception
    ) -> tuple[AckStatus, int | None, str | None]:
        """What to ack after an unexpected error: ``started`` if the job runs anyway."""
        record = self.jobs.get(command.batch_id)
        if command.kind == "rerun" and record is not None and record.cmd_id == command.id:
            return "started", record.pid, None
        return "failed", None, f"agent error: {type(exc).__name__}: {exc}"

    async def flush_acks(self, ack: AckFn) -> None:
        """Send every ack still pending in the ledger (e.g. after an outage or a restart)."""
        for entry in self.ledger.pending_acks():
            await self._send_ack(entry.cmd_id, ack)

    async def _resume(self, command: Command) -> tuple[AckStatus, int | None, str | None]:
        """The outcome of a command an earlier agent run began but did not finish.

        A rerun is never started again: if its job got as far as the exec, it is acked
        ``started``, else ``failed``. A stop is idempotent, so it is simply done again.
        """
        if command.kind == "stop":
            return await self._act(command)
        record = self.jobs.get(command.batch_id)
        if record is not None and record.cmd_id == command.id and record.started:
            return "started", record.pid, None
        if record is not None and record.cmd_id == command.id and record.exit_note:
            return "failed", None, f"{record.exit_note}; request the rerun again"
        return "failed", None, INTERRUPTED

    async def _handle_malformed(self, item: MalformedCommand, ack: AckFn) -> None:
        log.warning("malformed command refused", cmd_id=item.cmd_id, reason=item.reason)
        if item.cmd_id is None:
            return
        entry = self.ledger.get(item.cmd_id)
        if entry is None or entry.phase == "acting":
            self.ledger.begin(item.cmd_id, "malformed", None)
            self.ledger.record_result(item.cmd_id, "failed", error=item.reason)
        entry = self.ledger.get(item.cmd_id)
        if entry and entry.phase == "to_ack":
            await self._send_ack(item.cmd_id, ack)

    async def _act(self, command: Command) -> tuple[AckStatus, int | None, str | None]:
        requested_by = command.payload.get("requested_by")
        who = requested_by if isinstance(requested_by, str) else None
        if command.kind not in KNOWN_KINDS:
            reason = f"command kind {command.kind[:64]!r} is not supported by this agent version"
            log.warning("unknown command kind", cmd_id=command.id, kind=command.kind)
            self._audit("refuse", command, who, reason=reason)
            return "failed", None, reason
        try:
            if command.kind == "rerun":
                return await self._rerun(command, who)
            record = await self.jobs.stop(command.batch_id, who)
            self._audit("stop", command, who, pid=record.pid, run_as=record.run_as)
            return "started", record.pid, None
        except JobError as exc:
            log.warning(
                "command refused",
                cmd_id=command.id,
                kind=command.kind,
                batch_id=command.batch_id,
                reason=str(exc),
            )
            extra = {"cwd": command.payload.get("cwd")} if command.kind == "rerun" else {}
            self._audit("refuse", command, who, reason=str(exc), **extra)
            if isinstance(exc, LaunchError) and self.on_launch_failed is not None:
                try:
                    await self.on_launch_failed(command, str(exc))
                except Exception:
                    log.exception("reporting a failed launch failed", cmd_id=command.id)
            return "failed", None, str(exc)
        except OSError as exc:
            log.error("command failed", cmd_id=command.id, kind=command.kind, error=str(exc))
            self._audit("refuse", command, who, reason=f"agent error: {exc}")
            return "failed", None, f"agent error: {exc}"

    async def _rerun(
        self, command: Command, who: str | None
    ) -> tuple[AckStatus, int | None, str | None]:
        facts = HostFacts(
            agent_uid=os.geteuid(),
            now=time.time(),
            running_jobs=len(self.jobs.running()),
            home=self.home,
            agent_account=self.agent_account,
            batch_owner=await self._recorded_owner(command),
        )
        spec = build_launch_spec(
            command,
            settings=self.settings,
            base_env=self.base_env,
            facts=facts,
            userdb=self.userdb,
        )
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
        return "started", record.pid, None

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
        except ConflictError:
            self.ledger.mark_acked(cmd_id, "already acked (409)")
            log.info("command was already acked", cmd_id=cmd_id)
            return
        except NotFoundError:
            self.ledger.mark_acked(cmd_id, "server no longer knows the command (404)")
            log.warning("ack refused: command unknown to the server", cmd_id=cmd_id)
            return
        self.ledger.mark_acked(cmd_id)
        log.info(
            "command acked",
            cmd_id=cmd_id,
            kind=entry.kind,
            status=entry.ack_status,
            pid=entry.pid,
            error=entry.error,
        )
