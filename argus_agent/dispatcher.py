"""Act on server commands exactly once and ack each exactly once.

The dispatcher takes decoded commands from a channel, consults the durable command ledger,
launches or stops jobs, and acks through the channel's ``ack`` callable. A redelivered
command is never acted on twice, not even across agent restarts; an ack that could not be
sent is retried by ``flush_acks`` until the server has it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from argus_agent.config import JobSettings
from argus_agent.errors import ConflictError, JobError, NotFoundError
from argus_agent.jobs.spec import build_launch_spec, job_base_env
from argus_agent.jobs.supervisor import JobManager
from argus_agent.ledger import CommandLedger
from argus_agent.logsetup import get_logger
from argus_agent.protocol import KNOWN_KINDS, AckStatus, Command, MalformedCommand

log = get_logger(__name__)

AckFn = Callable[[str, AckStatus, int | None, str | None], Awaitable[None]]

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
        job_settings: JobSettings,
        *,
        server_url: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.ledger = ledger
        self.jobs = jobs
        self.job_settings = job_settings
        self.server_url = server_url
        self.base_env = job_base_env(
            os.environ if environ is None else environ,
            keep_argus_token=job_settings.inherit_argus_token,
        )
        self.home = Path.home()

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
                status, pid, error = await self._act(item)
                self.ledger.record_result(item.id, status, pid=pid, error=error)
        elif entry.phase == "acting":
            # Claimed in an earlier life that died before recording a result.
            record = self.jobs.get(item.batch_id)
            if item.kind == "rerun" and record is not None and record.cmd_id == item.id:
                self.ledger.record_result(item.id, "started", pid=record.pid)
            else:
                self.ledger.record_result(item.id, "failed", error=INTERRUPTED)
        elif entry.phase == "acked":
            log.debug("command redelivered after ack; ignored", cmd_id=item.id)
            return
        await self._send_ack(item.id, ack)

    async def flush_acks(self, ack: AckFn) -> None:
        """Send every ack still pending in the ledger (e.g. after an outage or a restart)."""
        for entry in self.ledger.pending_acks():
            await self._send_ack(entry.cmd_id, ack)

    async def _handle_malformed(self, item: MalformedCommand, ack: AckFn) -> None:
        log.warning("malformed command refused", cmd_id=item.cmd_id, reason=item.reason)
        if item.cmd_id is None:
            return
        if self.ledger.begin(item.cmd_id, "malformed", None):
            self.ledger.record_result(item.cmd_id, "failed", error=item.reason)
        entry = self.ledger.get(item.cmd_id)
        if entry and entry.phase == "to_ack":
            await self._send_ack(item.cmd_id, ack)

    async def _act(self, command: Command) -> tuple[AckStatus, int | None, str | None]:
        if command.kind not in KNOWN_KINDS:
            reason = f"command kind {command.kind[:64]!r} is not supported by this agent version"
            log.warning("unknown command kind", cmd_id=command.id, kind=command.kind)
            return "failed", None, reason
        try:
            if command.kind == "rerun":
                spec = build_launch_spec(
                    command,
                    settings=self.job_settings,
                    base_env=self.base_env,
                    server_url=self.server_url,
                    home=self.home,
                )
                record = await self.jobs.launch(spec)
                return "started", record.pid, None
            requested_by = command.payload.get("requested_by")
            record = await self.jobs.stop(
                command.batch_id, requested_by if isinstance(requested_by, str) else None
            )
            return "started", record.pid, None
        except JobError as exc:
            log.warning(
                "command refused",
                cmd_id=command.id,
                kind=command.kind,
                batch_id=command.batch_id,
                reason=str(exc),
            )
            return "failed", None, str(exc)
        except OSError as exc:
            log.error("command failed", cmd_id=command.id, kind=command.kind, error=str(exc))
            return "failed", None, f"agent error: {exc}"

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
