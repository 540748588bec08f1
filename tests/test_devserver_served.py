"""The reference server's side of served names on the websocket (``hello.serves``): driven by
the ``websockets`` client directly, over real sockets on 127.0.0.1.

A served name is accepted only with its registration's token, registered by the same Argus
user under that host name; its commands are pushed tagged with its agent id and acked as
its; when two connections serve one name only the newer gets its commands; a name whose
token was rotated is no longer served.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from argus_agent import wsproto as w
from argus_agent.devserver import DevServer, WsOptions
from tests.support import ArgusUser, eventually
from tests.test_devserver_ws import Agent, dev_server, receive

#: How long a connection that must get nothing is watched (an absence, not a timing).
QUIET_S = 1.0


def _serves(*agents: Agent, token: str | None = None) -> list[w.ServedName]:
    return [
        w.ServedName(agent_id=a.agent_id, hostname=a.hostname, token=token or a.token)
        for a in agents
    ]


async def test_only_a_name_whose_token_is_held_and_whose_user_matches_is_served(
    server: DevServer, user_token: str, argus: ArgusUser
) -> None:
    login = Agent(server, user_token, "login-1")
    gpu_a = Agent(server, user_token, "gpu-a")
    gpu_b = Agent(server, user_token, "gpu-b")
    bob = server.create_user("bob")
    gpu_c = Agent(server, bob, "gpu-c")  # another user's registration, its token held
    serves = [
        *_serves(gpu_a),
        *_serves(gpu_b, token="ag_live_" + "0" * 40),  # the id without its token
        *_serves(gpu_c),
        w.ServedName(agent_id=gpu_a.agent_id, hostname="gpu-z", token=gpu_a.token),
    ]
    async with login.session(serves=serves) as (conn, welcome):
        assert welcome.serving == [gpu_a.agent_id]
        source = await asyncio.to_thread(argus.record_batch, "python train.py", host="gpu-a")
        batch = await asyncio.to_thread(argus.rerun, source)
        pushed = await receive(conn)
        assert isinstance(pushed, w.CommandMsg)
        assert (pushed.batch_id, pushed.agent_id) == (batch, gpu_a.agent_id)
        await conn.send(w.encode_frame(w.Ack.make(pushed.id, "started", pid=4242)))
        assert await receive(conn) == w.AckResult(cmd_id=pushed.id, result="ok")
        acked = argus.command_for(batch, "rerun")
        assert (acked["agent_id"], acked["status"]) == (gpu_a.agent_id, "started")
        rows = {r["hostname"]: r for r in httpx.get(f"{server.url}/api/_dev/agents").json()}
        assert rows["gpu-a"]["ws_connected"] and not rows["gpu-b"]["ws_connected"]
        # gpu-b was not accepted: its command waits for gpu-b's own poll, not pushed here.
        other = await asyncio.to_thread(argus.record_batch, "python eval.py", host="gpu-b")
        await asyncio.to_thread(argus.rerun, other)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.recv(), QUIET_S)


async def test_two_connections_serving_one_name_do_not_both_get_its_commands(
    server: DevServer, user_token: str, argus: ArgusUser
) -> None:
    """Two login nodes (a failover pair) announcing the same name: the newer connection
    serves it, the older stops getting its commands: a rerun is never pushed twice."""
    first = Agent(server, user_token, "login-1")
    second = Agent(server, user_token, "login-2")
    gpu_a = Agent(server, user_token, "gpu-a")
    async with first.session(serves=_serves(gpu_a)) as (old, welcome_old):
        assert welcome_old.serving == [gpu_a.agent_id]
        async with second.session(serves=_serves(gpu_a)) as (new, welcome_new):
            assert welcome_new.serving == [gpu_a.agent_id]
            source = await asyncio.to_thread(argus.record_batch, "python t.py", host="gpu-a")
            batch = await asyncio.to_thread(argus.rerun, source)
            pushed = await receive(new)
            assert (pushed.batch_id, pushed.agent_id) == (batch, gpu_a.agent_id)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(old.recv(), QUIET_S)


async def test_a_served_name_whose_token_was_rotated_is_no_longer_served(tmp_path: Path) -> None:
    with dev_server(tmp_path, websocket=WsOptions(recheck_s=0.2)) as srv:
        token = srv.create_user("alice")
        user = ArgusUser(srv.url, token)
        login = Agent(srv, token, "login-1")
        gpu_a = Agent(srv, token, "gpu-a")
        async with login.session(serves=_serves(gpu_a)) as (conn, welcome):
            assert welcome.serving == [gpu_a.agent_id]
            rotated = Agent(srv, token, "gpu-a")  # register again: same id, new token
            assert rotated.agent_id == gpu_a.agent_id and rotated.token != gpu_a.token

            def served() -> bool:
                rows = httpx.get(f"{srv.url}/api/_dev/agents").json()
                return next(r for r in rows if r["hostname"] == "gpu-a")["ws_connected"]

            await eventually(lambda: not served(), what="gpu-a no longer served")
            source = await asyncio.to_thread(user.record_batch, "python t.py", host="gpu-a")
            await asyncio.to_thread(user.rerun, source)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.recv(), QUIET_S)
        user.close()
