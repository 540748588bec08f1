"""The reference Argus-compatible server (Argus v0.3.0's agent, batch and event endpoints).

Used by the agent's tests, ``argus-agent demo`` and ``argus-agent dev-server``. Needs the
``server`` extra (fastapi, uvicorn). Modules: :mod:`.store` (SQLite), :mod:`.ingest` (events
and batches), :mod:`.executor` (rerun, stop, the command queue), :mod:`.app` and
:mod:`.dev_routes` (HTTP), :mod:`.ws` (the websocket endpoint, argus-agent.v1),
:mod:`.faults`, :mod:`.ratelimit`, :mod:`.server` (runners).
"""

from .app import create_app
from .server import DevServer, serve
from .store import Store
from .wsoptions import WsFaults, WsOptions

__all__ = ["DevServer", "Store", "WsFaults", "WsOptions", "create_app", "serve"]
