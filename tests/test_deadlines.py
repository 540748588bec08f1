"""No request can hang a loop: every call to the server has an overall deadline.

A raw asyncio loopback server stands in for a sick server or proxy: it trickles its answer
one byte every 0.5 s (each socket read gets data in time, so a per-read timeout never fires),
or accepts a request and never answers, or answers normally (canned, or by forwarding to the
reference server, so an agent can register and run through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from http import HTTPStatus
from typing import Literal

import httpx
import pytest

from argus_agent.argus_api import ArgusClient
from argus_agent.devserver import DevServer
from argus_agent.errors import TransientServerError
from argus_agent.protocol import decode_commands
from tests.support import ArgusUser, RunningAgent, agent_env, cli, eventually, register

Mode = Literal["answer", "trickle", "hang"]
TRICKLE_EVERY_S = 0.5
#: Generous bound for a call whose deadline is 1 s (the machines running tests are noisy).
BOUND_S = 10.0


class SickServer:
    """An HTTP/1.1 server on 127.0.0.1:0 whose ``mode`` decides each request's fate.

    ``answer``: the reference server's answer (``upstream``), or ``{"jobs": []}`` without one;
    ``trickle``: that same answer, one byte every 0.5 s; ``hang``: no answer at all. Every
    answer closes its connection, so a mode change applies to the very next request.
    """

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.mode: Mode = "answer"
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._forward: httpx.AsyncClient | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._never = asyncio.Event()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> SickServer:
        if self.upstream is not None:
            self._forward = httpx.AsyncClient(base_url=self.upstream, timeout=10)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        if self._forward is not None:
            await self._forward.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests += 1
            mode = self.mode
            if mode == "hang":
                await self._never.wait()
            answer = await self._answer(method, target, headers, body)
            if mode == "trickle":
                for i in range(len(answer)):
                    if reader.at_eof():  # the client gave up
                        break
                    writer.write(answer[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(TRICKLE_EVERY_S)
            else:
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stopped by __aexit__ (re-raising makes asyncio.streams log it as an error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> bytes:
        if self._forward is None:
            status, content, extra = 200, json.dumps({"jobs": []}).encode(), {}
        else:
            forwarded = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
            response = await self._forward.request(method, target, headers=forwarded, content=body)
            status, content = response.status_code, response.content
            extra = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(content)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


async def test_a_trickling_or_silent_server_fails_the_call_within_its_deadline() -> None:
    async with SickServer() as sick:
        client = ArgusClient(sick.url, timeout_s=1.0)
        try:
            assert _jobs(await asyncio.wait_for(client.poll("a-1", "tok"), BOUND_S)) == []
            for mode in ("trickle", "hang"):
                sick.mode = mode
                with pytest.raises(TransientServerError, match=r"timed out after 1 s") as failed:
                    await asyncio.wait_for(client.poll("a-1", "tok"), BOUND_S)
                assert "tok" not in str(failed.value)
            # The server answers again: the same client gets through, on a fresh connection.
            sick.mode = "answer"
            assert _jobs(await asyncio.wait_for(client.poll("a-1", "tok"), BOUND_S)) == []
        finally:
            await client.aclose()


async def test_a_trickling_server_puts_the_agent_in_backoff_and_it_recovers(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    async with SickServer(upstream=server.url) as sick:
        settings = make_settings(server={"url": sick.url, "timeout_s": 1.0})
        await register(settings, user_token)  # through the sick server while it answers
        async with RunningAgent(settings) as running:
            channel = running.agent.state.channel
            await eventually(lambda: channel.state == "connected", what="first poll")

            sick.mode = "trickle"
            await eventually(
                lambda: (
                    channel.state == "backing_off" and "timed out after 1 s" in channel.last_error
                ),
                what="the trickled poll given up and backed off",
            )
            env = agent_env(settings)
            shown = await asyncio.to_thread(cli, "status", "--json", env=env)
            assert json.loads(shown.stdout)["channel"]["state"] == "backing_off", shown.stderr
            assert "timed out after 1 s" in json.loads(shown.stdout)["channel"]["last_error"]
            plain = await asyncio.to_thread(cli, "status", env=env)
            assert plain.returncode != 0, plain.stdout

            sick.mode = "hang"
            seen = sick.requests
            await eventually(
                lambda: sick.requests > seen + 1 and channel.state == "backing_off",
                what="silent answers given up too",
            )
            assert "timed out after 1 s" in channel.last_error

            sick.mode = "answer"
            await eventually(lambda: channel.state == "connected", what="recovery by itself")
            batch = argus.rerun(argus.record_batch("echo hi"))
            cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="the rerun acked")
            assert cmd["status"] == "started"


def _jobs(answer: object) -> list:
    """The commands of a poll answer (the raw body: each command is decoded on its own)."""
    return decode_commands(answer)
