"""The agent keeps working through server trouble: rotated tokens, 429, 5xx, outages."""

from __future__ import annotations

import asyncio
import logging
import time

from argus_agent.devserver import DevServer
from argus_agent.registration import register_host
from tests.support import ArgusUser, RunningAgent, eventually, register


async def test_rotated_token_is_reported_once_and_agent_keeps_running(
    argus: ArgusUser, make_settings, user_token: str, caplog, tmp_path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    other = make_settings(agent={"state_dir": str(tmp_path / "other")})
    caplog.set_level(logging.INFO)
    async with RunningAgent(settings) as running:
        await eventually(lambda: running.agent.state.channel.state == "connected", what="poll")
        # Someone registers the same host again elsewhere: the server rotates the token.
        await register_host(other, user_token, force=True)
        state = await eventually(
            lambda: (
                running.agent.state.channel.state == "auth_rejected" and running.agent.state.channel
            ),
            what="auth rejection",
        )
        assert "argus-agent register --force" in state.last_error
        await asyncio.sleep(1.5)  # several slow retries (auth_retry_s = 0.5 in tests)
        assert not running.task.done(), "the daemon must keep running"
        errors = [r for r in caplog.records if "rejected this agent's token" in r.getMessage()]
        assert len(errors) == 1, "logged once, not on every retry"
        # The operator re-registers this agent's state dir: the daemon picks the new token up.
        await register_host(settings, user_token, force=True)
        await eventually(
            lambda: running.agent.state.channel.state == "connected",
            what="recovery with the new token",
        )


async def test_new_token_is_picked_up_without_waiting_for_the_slow_retry(
    make_settings, user_token: str, tmp_path
) -> None:
    settings = make_settings(agent={"auth_retry_s": 600})
    await register(settings, user_token)
    other = make_settings(agent={"state_dir": str(tmp_path / "other")})
    async with RunningAgent(settings) as running:
        await eventually(lambda: running.agent.state.channel.state == "connected", what="poll")
        await register_host(other, user_token, force=True)
        await eventually(
            lambda: running.agent.state.channel.state == "auth_rejected", what="auth rejection"
        )
        await register_host(settings, user_token, force=True)
        await eventually(
            lambda: running.agent.state.channel.state == "connected",
            timeout=5,
            what="recovery long before auth_retry_s",
        )


async def test_429_retry_after_is_honoured(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer
) -> None:
    # REST faults: the agent must poll (over the websocket nothing would meet them).
    settings = make_settings(server={"transport": "poll"}, agent={"poll_interval_s": 0.1})
    agent_id = await register(settings, user_token)
    async with RunningAgent(settings) as running:
        await eventually(lambda: running.agent.state.channel.state == "connected", what="poll")
        argus.fault(f"/api/agents/{agent_id}/jobs", 429, count=1, retry_after=1.5)
        state = await eventually(
            lambda: (
                running.agent.state.channel.state == "rate_limited" and running.agent.state.channel
            ),
            what="429 seen",
        )
        limited_at = time.time()
        assert abs((state.next_retry_at - state.last_error_at) - 1.5) < 0.05
        await eventually(
            lambda: (running.agent.state.channel.last_ok_at or 0) > limited_at,
            timeout=5,
            what="next good poll",
        )
        assert running.agent.state.channel.last_ok_at - limited_at >= 1.4


async def test_server_down_then_back_recovers_by_itself(
    argus: ArgusUser, make_settings, user_token: str, server: DevServer, tmp_path
) -> None:
    settings = make_settings()
    await register(settings, user_token)
    port, db = server.port, server.db_path
    async with RunningAgent(settings) as running:
        await eventually(lambda: running.agent.state.channel.state == "connected", what="poll")
        server.stop()
        # On the websocket the close (1001) is seen first; the failed reconnect follows.
        await eventually(
            lambda: (
                running.agent.state.channel.state == "backing_off"
                and "cannot connect" in (running.agent.state.channel.last_error or "")
            ),
            what="outage noticed",
        )
        back = DevServer(db_path=db, port=port, poll_interval_s=0.2, ingest_rate_limit=False)
        back.start()
        try:
            await eventually(
                lambda: running.agent.state.channel.state == "connected", what="recovery"
            )
            # and it works for real: a rerun pressed now runs
            source = argus.record_batch("sleep 30")
            batch = argus.rerun(source)
            cmd = await eventually(lambda: argus.acked(batch, "rerun"), what="ack")
            assert cmd["status"] == "started"
            argus.stop(batch)
            await eventually(lambda: argus.acked(batch, "stop"), what="stop ack")
        finally:
            await running.stop()
            back.stop()


async def test_500_is_retried_on_a_fresh_connection(
    argus: ArgusUser, make_settings, user_token: str
) -> None:
    settings = make_settings(server={"transport": "poll"}, agent={"poll_interval_s": 0.1})
    agent_id = await register(settings, user_token)
    async with RunningAgent(settings) as running:
        await eventually(lambda: running.agent.state.channel.state == "connected", what="poll")
        argus.fault(f"/api/agents/{agent_id}/jobs", 500, count=3)
        await eventually(
            lambda: running.agent.state.channel.state == "backing_off", what="5xx seen"
        )
        await eventually(
            lambda: running.agent.state.channel.state == "connected",
            what="recovered after 3 failures",
        )
        assert "HTTP 500" in running.agent.state.channel.last_error
