"""Run the reference server: :class:`DevServer` (background thread) and :func:`serve` (CLI).

:class:`DevServer` binds its own socket (so ``port=0`` works and the real port is known),
then runs uvicorn on it in a thread with its own event loop. The database outlives the
server when it is a file: a new DevServer on the same file and port finds all data. It also
configures uvicorn's websocket side (frame limit, pings, permessage-deflate when offered)
for :mod:`.ws`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from argus_agent import wsproto
from argus_agent.config import is_loopback

from .app import create_app
from .faults import FaultRegistry
from .frameworker import FrameWorker
from .ratelimit import TokenBucket
from .store import Store
from .ws import WsHub
from .wsoptions import WsFaults, WsOptions

_log = logging.getLogger(__name__)
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when their
    # proto says TCP; without it every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DevServer:
    """An Argus-compatible server on a real socket, for tests, ``demo`` and ``dev-server``.

    *ingest_rate_limit*: True for the real limit (burst 60, then 10/s per token), False for
    none, or ``(capacity, refill_per_s)``. Use as a context manager to start and stop it.

    The websocket endpoint (``docs/protocol.md``): *websocket* False serves none (a websocket
    request then gets HTTP 403, as from Argus v0.3.0), a :class:`WsOptions` tunes it (hello
    timeout, bad-frame burst, re-check period); *ws_subprotocol* is the one version it speaks
    (another, e.g. ``argus-agent.v2``, to test a mismatch). :attr:`ws_faults` arms websocket
    faults (:class:`WsFaults`); :meth:`ws_connected` says whether an agent is connected.
    """

    def __init__(
        self,
        db_path: str | Path = ":memory:",
        host: str = "127.0.0.1",
        port: int = 0,
        poll_interval_s: float = 10.0,
        ingest_rate_limit: bool | tuple[float, float] = True,
        *,
        websocket: bool | WsOptions = True,
        ws_subprotocol: str | None = None,
    ) -> None:
        self.db_path = db_path
        self.host = host
        self._requested_port = port
        self.poll_interval_s = poll_interval_s
        if ingest_rate_limit is True:
            self.rate_limiter: TokenBucket | None = TokenBucket(60, 10.0)
        elif ingest_rate_limit is False:
            self.rate_limiter = None
        else:
            self.rate_limiter = TokenBucket(*ingest_rate_limit)
        self.faults = FaultRegistry()
        options = websocket if isinstance(websocket, WsOptions) else WsOptions(enabled=websocket)
        if ws_subprotocol is not None:
            options = dataclasses.replace(options, subprotocol=ws_subprotocol)
        self.ws_options = options
        self.ws_faults = WsFaults()
        self._ws_hub: WsHub | None = None
        self.store: Store | None = None
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.port: int = port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server thread is up."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> DevServer:
        """Open the database, bind the socket and serve in a background thread.

        Blocks until the server accepts connections. Idempotent: a second call while running
        does nothing. Starting again after stop() reuses the port (and, for a file, the data).
        Raises OSError when the port cannot be bound, RuntimeError when uvicorn fails to start
        in time.
        """
        with self._lock:
            if self.running:
                return self
            store = self._ensure_store()
            try:
                sock = _bind(self.host, self._requested_port)
            except OSError:
                store.close()
                self.store = None
                raise
            self._sock = sock
            self.port = int(sock.getsockname()[1])
            # A later start() of this object comes back on the same port (and URL).
            self._requested_port = self.port
            app = create_app(
                store,
                poll_interval_s=self.poll_interval_s,
                rate_limiter=self.rate_limiter,
                faults=self.faults,
                ws=self.ws_options,
                ws_faults=self.ws_faults,
            )
            self._ws_hub = app.state.ws_hub
            config = uvicorn.Config(
                app,
                log_level="warning",
                log_config=None,
                access_log=False,
                lifespan="off",
                http="h11",
                ws="websockets-sansio",
                ws_max_size=wsproto.MAX_FRAME_BYTES,
                ws_ping_interval=self.ws_options.ping_interval_s,
                ws_ping_timeout=self.ws_options.ping_timeout_s,
                ws_per_message_deflate=True,  # used only when the agent offers it
                loop="asyncio",
                timeout_graceful_shutdown=2,
            )
            server = uvicorn.Server(config)
            self._server, self._error = server, None
            thread = threading.Thread(
                target=self._run,
                args=(server, sock, app.state.ws_hub),
                name=f"argus-devserver-{self.port}",
                daemon=True,
            )
            self._thread = thread
            thread.start()
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    error = self._error
                    self._teardown()
                    raise RuntimeError(f"dev server failed to start: {error!r}") from error
                time.sleep(0.01)
        return self

    def _run(self, server: uvicorn.Server, sock: socket.socket, hub: WsHub | None) -> None:
        try:
            asyncio.run(self._serve(server, sock, hub))
        except BaseException as exc:  # reported by start(); a thread must not die silently
            self._error = exc

    async def _serve(self, server: uvicorn.Server, sock: socket.socket, hub: WsHub | None) -> None:
        """uvicorn, with the frame worker (when asked) from before the first frame to after
        the last."""
        worker: FrameWorker | None = None
        if hub is not None and self.ws_options.frame_worker:
            worker = FrameWorker(self.ws_options.frame_worker_timeout_s)
            try:
                await worker.start()
            except OSError as exc:  # parsing in this process is slower, not wrong
                _log.warning("could not start the frame worker (%s); parsing frames here", exc)
                worker = None
        if hub is not None:
            hub.frame_worker = worker
        try:
            await server.serve(sockets=[sock])
        finally:
            if hub is not None and worker is not None:
                hub.frame_worker = None
                await worker.close()

    def stop(self) -> None:
        """Stop serving, close the socket and the database; blocks until down. Idempotent."""
        with self._lock:
            self._teardown()

    def ws_connected(self, agent_id: str) -> bool:
        """Whether *agent_id* holds a websocket session (past hello) right now."""
        return self._ws_hub is not None and self._ws_hub.connected(agent_id)

    @property
    def frame_worker_pid(self) -> int | None:
        """The pid of the frame worker (``WsOptions.frame_worker``) while it runs."""
        worker = self._ws_hub.frame_worker if self._ws_hub is not None else None
        return worker.pid if worker is not None and worker.alive else None

    def _teardown(self) -> None:
        if self._ws_hub is not None and self.running:
            self._ws_hub.close_all_threadsafe(wsproto.CloseCode.GOING_AWAY, "the server shuts down")
        self._ws_hub = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(_STOP_TIMEOUT_S)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self.store is not None:
            self.store.close()
        self._server = self._thread = self._sock = None
        self.store = None

    def _ensure_store(self) -> Store:
        if self.store is None:
            self.store = Store(self.db_path)
        return self.store

    def create_user(self, username: str) -> str:
        """Create *username* (if missing) and return a new ``em_live_`` token for it.

        Usable before start (the database opens then, and start keeps it) and while running.
        Raises ValueError on an empty name.
        """
        return self._ensure_store().create_user(username)

    def inject_command(self, agent_id: str, kind: str, batch_id: str, payload: Any) -> str:
        """Queue any command, valid or not, for *agent_id* (a hostile server, for tests)."""
        from .executor import inject_command

        return inject_command(self._ensure_store(), agent_id, kind, batch_id, payload)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


#: Printed to stderr when ``dev-server`` is given no ``--user``.
TOKEN_HINT = (
    "argus dev-server: no user created, so there is no token yet: run it again with "
    "--user NAME (repeatable) to create users and print their em_live_ tokens, or create "
    "one now: curl -X POST {url}/api/_dev/users -H 'Content-Type: application/json' "
    '-d \'{{"username": "alice"}}\''
)

#: Printed to stderr when ``dev-server`` listens on an address that is not loopback.
EXPOSED_WARNING = (
    "argus dev-server: WARNING: listening on {host}, which is not a loopback address: its "
    "/api/_dev routes have no authentication, so anyone who can reach {url} can create "
    "users and mint their tokens, read every command (recorded environments included) and "
    "event, change batch statuses and inject faults. It is a development tool: bind it to "
    "127.0.0.1 (the default) unless this network is yours alone."
)


def serve(
    host: str,
    port: int,
    db_path: str,
    users: list[str],
    poll_interval_s: float,
    *,
    websocket: bool = True,
    rate_limit: bool = True,
    frame_worker: bool = False,
) -> None:
    """Run a dev server in the foreground until SIGINT or SIGTERM (the ``dev-server`` command).

    Prints ``argus dev-server listening on <url>`` and then one ``user <name> token <token>``
    line per user (each gets a fresh em_live token) on stdout. On stderr: without *users*, a
    hint saying how to get a token (:data:`TOKEN_HINT`); on a *host* that is not loopback, a
    warning that the ``/api/_dev`` routes have no authentication (:data:`EXPOSED_WARNING`).
    *websocket* False serves no websocket endpoint (as Argus v0.3.0); *rate_limit* False
    turns the ingest limit off; *frame_worker* parses websocket events frames in a child
    process (:mod:`.frameworker`). Must be called from the main thread. Raises OSError when the
    port is taken.
    """
    stop = threading.Event()

    def _on_signal(_sig: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    srv = DevServer(
        db_path=db_path,
        host=host,
        port=port,
        poll_interval_s=poll_interval_s,
        websocket=WsOptions(enabled=websocket, frame_worker=frame_worker),
        ingest_rate_limit=rate_limit,
    )
    try:
        srv.start()
        print(f"argus dev-server listening on {srv.url}", flush=True)
        if not is_loopback(host):
            print(EXPOSED_WARNING.format(host=host, url=srv.url), file=sys.stderr, flush=True)
        for name in users:
            print(f"user {name} token {srv.create_user(name)}", flush=True)
        if not users:
            print(TOKEN_HINT.format(url=srv.url), file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not srv.running:
                print("argus dev-server: server thread exited", file=sys.stderr, flush=True)
                break
    finally:
        srv.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
