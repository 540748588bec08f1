"""Fault injection: make the next N requests under a path prefix fail with a chosen status.

Used by agent tests to play server errors, rate limits and outages. Faults live in memory
(never in the database) and never apply to ``/api/_dev/``. An injected 5xx answer carries
``Connection: close``, as the real server may drop keep-alive after a 500.
"""

from __future__ import annotations

import http
import threading
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

DEV_PREFIX = "/api/_dev"


@dataclass
class Fault:
    """One armed fault; *remaining* counts down as matching requests are answered."""

    path_prefix: str
    status: int
    remaining: int
    retry_after: float | None = None
    detail: str | None = None
    method: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the fault as JSON-ready data."""
        return {
            "path_prefix": self.path_prefix,
            "status": self.status,
            "remaining": self.remaining,
            "retry_after": self.retry_after,
            "detail": self.detail,
            "method": self.method,
        }


class FaultRegistry:
    """The armed faults of one server, in the order they were added. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.injected = 0  # how many requests were answered by a fault

    def add(self, fault: Fault) -> None:
        """Arm *fault* (after any already armed)."""
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> int:
        """Disarm every fault; return how many were still armed."""
        with self._lock:
            n = len(self._faults)
            self._faults.clear()
            return n

    def list(self) -> list[dict[str, Any]]:
        """Return the armed faults."""
        with self._lock:
            return [f.as_dict() for f in self._faults]

    def take(self, method: str, path: str) -> Fault | None:
        """Consume one use of the first fault matching (*method*, *path*); None when none does.

        A fault whose count runs out is removed. Paths under ``/api/_dev`` never match.
        """
        if path.startswith(DEV_PREFIX):
            return None
        with self._lock:
            for i, fault in enumerate(self._faults):
                if not path.startswith(fault.path_prefix):
                    continue
                if fault.method and fault.method.upper() != method.upper():
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[i]
                self.injected += 1
                return Fault(**{**fault.__dict__})
        return None


def _format_retry_after(seconds: float) -> str:
    # Whole seconds as HTTP says; a fraction is kept so tests can ask for short waits.
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class FaultMiddleware:
    """ASGI middleware that answers a request from the registry before the app sees it."""

    def __init__(self, app: ASGIApp, registry: FaultRegistry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve *scope* from an armed fault if one matches, else pass it to the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fault = self.registry.take(scope["method"], scope["path"])
        if fault is None:
            await self.app(scope, receive, send)
            return
        # Read the request body first so the connection stays usable for the next request.
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = bool(message.get("more_body", False))
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = _format_retry_after(fault.retry_after)
        if fault.status >= 500:
            headers["Connection"] = "close"
        response: Response
        if fault.status < 200 or fault.status in (204, 304):
            response = Response(status_code=fault.status, headers=headers)
        else:
            try:
                phrase = http.HTTPStatus(fault.status).phrase
            except ValueError:
                phrase = "injected fault"
            response = JSONResponse(
                {"detail": fault.detail or phrase}, status_code=fault.status, headers=headers
            )
        await response(scope, receive, send)
