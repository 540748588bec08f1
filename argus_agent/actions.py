"""What the running agent does when an operator asks on the control socket: drain, undrain
and a local stop. Each is recorded in the audit log with the peer's OS user (the kernel's
word for it, ``SO_PEERCRED``; only root and the agent's own user get this far, see
``control.py``).

- ``drain``: refuse new reruns from now on, across restarts (``drain.DrainState``; the
  dispatcher checks it before every launch), running jobs untouched.
- ``undrain``: accept reruns again.
- ``stop``: the dispatcher's stop (``Dispatcher.stop_locally``: the same shim escalation as a
  server's stop), optionally with its own grace period.
"""

from __future__ import annotations

from typing import Any

from argus_agent.audit import AuditLog
from argus_agent.control import (
    DrainRequest,
    Handler,
    Peer,
    RequestRefused,
    StopRequest,
    UndrainRequest,
)
from argus_agent.dispatcher import Dispatcher
from argus_agent.drain import DrainState
from argus_agent.errors import JobError
from argus_agent.logsetup import get_logger

log = get_logger(__name__)


class OperatorActions:
    """The control socket's ``drain``, ``undrain`` and ``stop`` handlers."""

    def __init__(self, drain: DrainState, dispatcher: Dispatcher, audit: AuditLog) -> None:
        self.drain = drain
        self.dispatcher = dispatcher
        self.audit = audit

    def handlers(self) -> dict[str, Handler]:
        """op → handler, for ``ControlServer``."""
        return {"drain": self.drain_host, "undrain": self.undrain_host, "stop": self.stop_job}

    async def drain_host(self, request: DrainRequest, peer: Peer) -> dict[str, Any]:
        """Start (or re-state) draining, as asked by ``peer``."""
        try:
            was = self.drain.drain(peer.user, request.reason)
        except OSError as exc:
            raise RequestRefused(
                f"cannot record the drain in {self.drain.path}: {exc.strerror or exc}; "
                "nothing changed"
            ) from None
        self.audit.record(
            "drain",
            by=peer.user,
            uid=peer.uid,
            pid=peer.pid,
            reason=request.reason,
            was_draining=was,
        )
        log.warning(
            "host draining: new reruns are refused until argus-agent undrain",
            by=peer.user,
            reason=request.reason,
            running_jobs=len(self.dispatcher.jobs.running()),
        )
        return {
            "was_draining": was,
            "drain": self.drain.as_dict(),
            "running_jobs": len(self.dispatcher.jobs.running()),
        }

    async def undrain_host(self, _request: UndrainRequest, peer: Peer) -> dict[str, Any]:
        """Stop draining, as asked by ``peer``."""
        before = self.drain.as_dict()
        try:
            was = self.drain.undrain()
        except OSError as exc:
            raise RequestRefused(
                f"cannot remove {self.drain.path}: {exc.strerror or exc}; the host stays draining"
            ) from None
        self.audit.record(
            "undrain",
            by=peer.user,
            uid=peer.uid,
            pid=peer.pid,
            was_draining=was,
            drained_by=before["by"],
            drained_since=before["since"],
        )
        if was:
            log.warning("host no longer draining: reruns are accepted again", by=peer.user)
        return {"was_draining": was, "drain": self.drain.as_dict()}

    async def stop_job(self, request: StopRequest, peer: Peer) -> dict[str, Any]:
        """Stop the job of ``request.batch_id``, as asked by ``peer``."""
        before = self.dispatcher.jobs.get(request.batch_id)
        already = before is not None and before.stop_requested_at is not None
        try:
            record = await self.dispatcher.stop_locally(
                request.batch_id, peer.user, request.grace_s
            )
        except JobError as exc:
            raise RequestRefused(str(exc)) from None
        except OSError as exc:
            raise RequestRefused(f"agent error: {exc.strerror or exc}") from None
        return {
            "batch_id": record.batch_id,
            "pid": record.pid,
            "run_as": record.run_as,
            "grace_s": record.stop_grace_s,
            # A stop under way keeps its first grace period.
            "already_stopping": already,
            "stop_requested_by": record.stop_requested_by,
            "stop_requested_at": record.stop_requested_at,
        }
