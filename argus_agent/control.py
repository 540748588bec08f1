"""The control socket: a unix socket in the state dir answering `argus-agent status`.

Read-only: a client sends one line (``status``) and gets one JSON document back. The socket
is created with mode 0600 inside the 0700 state dir, and the peer's uid is checked to be ours
or root's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argus_agent.errors import StateError

SOCKET_NAME = "agent.sock"
MAX_REQUEST = 1024


class ControlServer:
    """Serves status snapshots built by ``snapshot()``."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one). Raises StateError when it cannot."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        try:
            old_umask = os.umask(0o077)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot create the control socket: {exc}") from None

    async def close(self) -> None:
        """Stop serving and remove the socket; idempotent."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _peer_allowed(writer):
                writer.write(b'{"error": "permission denied"}\n')
                return
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            request = line[:MAX_REQUEST].decode(errors="replace").strip()
            if request == "status":
                answer = self.snapshot()
            else:
                answer = {"error": f"unknown request {request[:40]!r}; expected 'status'"}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def query_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running daemon for its status (blocking). Raises StateError when none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"status\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise StateError(f"no agent is running (nothing answers on {path})") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot reach the agent: {exc}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise StateError(f"{path}: the agent's answer is not JSON") from None
