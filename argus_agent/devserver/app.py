"""The FastAPI app of the reference server: the Argus v0.3.0 routes the agent talks to.

Routes, status codes and ``detail`` texts follow the real server (``backend/api/agents.py``,
``backend/api/batches.py``, ``backend/api/events.py``, ``backend/deps.py``), including its
order of checks: user-token routes authenticate before validating the body; the agent routes
validate the body first and check the agent token inside the handler. The websocket endpoint
(argus-agent's own protocol, absent from Argus v0.3.0) is :mod:`.ws`'s, mounted here.
"""

# No `from __future__ import annotations`: FastAPI must see the closure-local aliases below.

import json
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from argus_agent import wsproto

from . import executor, ingest
from .dev_routes import build_dev_router
from .faults import FaultMiddleware, FaultRegistry
from .ratelimit import TokenBucket, retry_after_header
from .schemas import AckIn, BatchEventsIn, EventIn, HeartbeatIn, RegisterIn, RerunIn
from .store import AGENT_PREFIX, REPORTER_PREFIX, VIEWER_PREFIX, ApiError, Principal, Store
from .ws import WsHub
from .wsoptions import WsFaults, WsOptions

_BEARER = {"WWW-Authenticate": "Bearer"}
AuthHeader = Annotated[str | None, Header()]


def _bearer(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return authorization[7:].strip() or None


def authenticate_user(store: Store, authorization: str | None) -> Principal:
    """Resolve a user token (em_live or dev JWT) the way the real ``get_current_user`` does.

    Raises ApiError 401 ``Authentication required`` (no / unknown non-API token) or 401
    ``Invalid or expired API token`` (unknown ``em_`` token).
    """
    token = _bearer(authorization)
    if token is None:
        raise ApiError(401, "Authentication required", _BEARER)
    principal = store.resolve_user_token(token)
    if token.startswith((REPORTER_PREFIX, VIEWER_PREFIX)):
        if principal is None or principal.kind != "reporter":
            raise ApiError(401, "Invalid or expired API token", _BEARER)
        return principal
    if principal is None or principal.kind != "jwt":
        raise ApiError(401, "Authentication required", _BEARER)
    return principal


def authenticate_agent(store: Store, authorization: str | None, agent_id: str) -> dict[str, Any]:
    """Resolve an ``ag_live_`` token and check it belongs to *agent_id*; return the agent row.

    Raises ApiError 401 ``agent token required`` / ``invalid agent token prefix`` /
    ``agent token unknown``, or 403 when the token is another agent's.
    """
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "agent token required", _BEARER)
    token = authorization[7:].strip()
    if not token.startswith(AGENT_PREFIX):
        raise ApiError(401, "invalid agent token prefix", _BEARER)
    agent = store.agent_for_token(token)
    if agent is None:
        raise ApiError(401, "agent token unknown", _BEARER)
    if agent["id"] != agent_id:
        raise ApiError(403, "agent token does not match path agent_id")
    return agent


class _EscapedJSONResponse(JSONResponse):
    """A refusal, whose detail echoes what was refused: JSON with every non-ASCII character
    escaped, so that a lone surrogate in the input (``"\\ud800"``, which JSON allows and
    UTF-8 cannot encode) is answered 422 and not 500 (a client retrying on 5xx would send it
    forever)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(
    store: Store,
    *,
    poll_interval_s: float = 10.0,
    rate_limiter: TokenBucket | None = None,
    faults: FaultRegistry | None = None,
    ws: WsOptions | None = None,
    ws_faults: WsFaults | None = None,
) -> FastAPI:
    """Build the app over *store*. *rate_limiter* None disables the ingest limit.

    *faults* (a fresh registry when None) is exposed as ``app.state.faults``. *ws* configures
    the websocket endpoint (default: served, ``argus-agent.v1``; ``WsOptions(enabled=False)``:
    absent, as in Argus v0.3.0); its hub is ``app.state.ws_hub`` (None when absent).
    """
    faults = faults if faults is not None else FaultRegistry()
    ws = ws if ws is not None else WsOptions()
    app = FastAPI(title="argus-agent dev server", docs_url=None, redoc_url=None)
    app.state.store = store
    app.state.faults = faults
    hub = WsHub(store, ws, ws_faults or WsFaults()) if ws.enabled else None
    app.state.ws_hub = hub
    app.state.rate_limiter = rate_limiter
    interval: int | float = (
        int(poll_interval_s) if float(poll_interval_s).is_integer() else poll_interval_s
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _EscapedJSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, rendered so that it survives what it echoes.
        return _EscapedJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    def current_user(authorization: AuthHeader = None) -> Principal:
        return authenticate_user(store, authorization)

    def reporter(user: Annotated[Principal, Depends(current_user)]) -> Principal:
        # Event ingest: an em_live token only, then the per-token rate limit.
        if user.kind != "reporter":
            raise ApiError(403, "Reporter scope requires a personal API token")
        if rate_limiter is not None:
            allowed, wait = rate_limiter.try_consume(user.token_hash)
            if not allowed:
                raise ApiError(
                    429, "Rate limit exceeded", {"Retry-After": retry_after_header(wait)}
                )
        return user

    User = Annotated[Principal, Depends(current_user)]
    Reporter = Annotated[Principal, Depends(reporter)]

    @app.get("/api/auth/me")
    async def me(user: User) -> dict[str, Any]:
        """The user behind the token (the real server answers the same for em_live)."""
        return {
            "id": user.user_id,
            "username": user.username,
            "email": f"{user.username}@dev",
            "is_admin": user.is_admin,
            "email_verified": True,
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # ------------------------------------------------------------ agents

    @app.post("/api/agents/register", status_code=201)
    async def register(body: RegisterIn, user: User) -> dict[str, Any]:
        agent_id, token, now = store.register_agent(
            user.user_id, body.hostname, body.version, body.capabilities
        )
        return {
            "agent_id": agent_id,
            "agent_token": token,
            "poll_interval_s": interval,
            "server_time_utc": now,
        }

    @app.get("/api/agents/{agent_id}/jobs")
    async def poll(agent_id: str, authorization: AuthHeader = None) -> dict[str, Any]:
        authenticate_agent(store, authorization, agent_id)
        return {"jobs": executor.poll_commands(store, agent_id)}

    @app.post("/api/agents/{agent_id}/jobs/{cmd_id}/ack")
    async def ack(
        agent_id: str, cmd_id: str, body: AckIn, authorization: AuthHeader = None
    ) -> dict[str, Any]:
        authenticate_agent(store, authorization, agent_id)
        return executor.ack_command(store, agent_id, cmd_id, body.status, body.pid, body.error)

    @app.post("/api/agents/{agent_id}/heartbeat", status_code=204)
    async def heartbeat(
        agent_id: str, body: HeartbeatIn | None = None, authorization: AuthHeader = None
    ) -> Response:
        authenticate_agent(store, authorization, agent_id)
        with store.tx() as db:
            store.touch_agent(db, agent_id)
        return Response(status_code=204)

    # ------------------------------------------------------------ batches

    @app.get("/api/batches/{batch_id}")
    async def get_batch(batch_id: str, user: User) -> dict[str, Any]:
        batch = ingest.get_batch(store, batch_id)
        if batch is None:
            raise ApiError(404, "batch not found")
        return batch

    @app.post("/api/batches/{batch_id}/rerun", status_code=201)
    async def rerun(batch_id: str, body: RerunIn, user: User) -> dict[str, Any]:
        return executor.request_rerun(store, batch_id, user, body.overrides, body.name)

    @app.post("/api/batches/{batch_id}/stop")
    async def stop(batch_id: str, user: User) -> dict[str, Any]:
        return executor.request_stop(store, batch_id, user)

    # ------------------------------------------------------------ events

    @app.post("/api/events")
    async def post_event(event: EventIn, user: Reporter) -> dict[str, Any]:
        db_id, deduplicated = ingest.ingest_one(store, event, user.user_id)
        return {"accepted": True, "event_id": db_id, "deduplicated": deduplicated}

    @app.post("/api/events/batch")
    async def post_events(body: BatchEventsIn, user: Reporter) -> Response:
        outcomes = ingest.ingest_many(store, body.events, user.user_id)
        results = [
            ingest.event_result(event.event_id, outcome)
            for event, outcome in zip(body.events, outcomes, strict=True)
        ]
        # Plain JSON: FastAPI's generic encoder walks 500 results slowly, for nothing here.
        return JSONResponse(ingest.batch_answer(results))

    if hub is not None:
        app.router.add_websocket_route(wsproto.ENDPOINT, hub.endpoint)
    app.include_router(build_dev_router(store, faults, hub.status if hub is not None else None))
    app.add_middleware(FaultMiddleware, registry=faults)
    return app
