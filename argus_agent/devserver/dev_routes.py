"""``/api/_dev/``: dev-only routes with no counterpart in Argus (no auth, never faulted).

Read-only listings for tests and the demo (agents, commands, events, batches), user creation,
fault injection, and a status override that stands in for the real server's watchdog.
"""

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from . import executor, ingest
from .faults import Fault, FaultRegistry
from .schemas import DevStatusIn, DevUserIn, FaultIn
from .store import Store


def build_dev_router(
    store: Store,
    faults: FaultRegistry,
    ws_status: Callable[[str], dict[str, Any]] | None = None,
) -> APIRouter:
    """Return the ``/api/_dev`` router over *store* and *faults*; *ws_status* adds each
    agent's websocket fields (``ws_connected``, ``ws_running_jobs``) to the agent listing."""
    router = APIRouter(prefix="/api/_dev", tags=["dev"])

    @router.get("/agents")
    async def agents() -> list[dict[str, Any]]:
        """Every registered agent, with its owner, last_seen and websocket state."""
        rows = store.list_agents()
        for row in rows:
            row.update(
                ws_status(row["agent_id"])
                if ws_status is not None
                else {"ws_connected": False, "ws_running_jobs": None}
            )
        return rows

    @router.get("/commands")
    async def commands(
        agent_id: str | None = None, batch_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every command, oldest first: status, pid, error, acked_at, deliveries."""
        return executor.list_commands(store, agent_id=agent_id, batch_id=batch_id)

    @router.get("/events")
    async def events(batch_id: str | None = None) -> list[dict[str, Any]]:
        """Every stored event (or one batch's), data included, in arrival order."""
        return ingest.list_events(store, batch_id)

    @router.get("/batches")
    async def batches() -> list[dict[str, Any]]:
        """Every batch, as ``GET /api/batches/{id}`` shows it."""
        return ingest.list_batches(store)

    @router.post("/batches/{batch_id}/status")
    async def force_status(batch_id: str, body: DevStatusIn) -> dict[str, Any]:
        """Set a batch's status, e.g. ``stalled`` (what the real watchdog would do)."""
        ingest.set_batch_status(store, batch_id, body.status)
        return {"batch_id": batch_id, "status": body.status}

    @router.post("/users", status_code=201)
    async def create_user(body: DevUserIn) -> dict[str, str]:
        """Create the user if missing; mint a new em_live token and a dev JWT stand-in."""
        token = store.create_user(body.username)
        return {"username": body.username, "token": token, "jwt": store.create_jwt(body.username)}

    @router.post("/faults", status_code=201)
    async def add_fault(body: FaultIn) -> dict[str, Any]:
        """Arm a fault: the next ``count`` matching requests get ``status``."""
        fault = Fault(
            path_prefix=body.path_prefix,
            status=body.status,
            remaining=body.count,
            retry_after=body.retry_after,
            detail=body.detail,
            method=body.method,
        )
        faults.add(fault)
        return fault.as_dict()

    @router.get("/faults")
    async def list_faults() -> dict[str, Any]:
        """The armed faults and how many requests faults have answered so far."""
        return {"faults": faults.list(), "injected": faults.injected}

    @router.delete("/faults")
    async def clear_faults() -> dict[str, int]:
        """Disarm every fault."""
        return {"cleared": faults.clear()}

    return router
