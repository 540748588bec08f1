"""Pure pieces, no sockets and no sleeps: backoff, command decoding, launch spec policy."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from argus_agent.argus_api import retry_after_seconds
from argus_agent.backoff import Backoff, jittered
from argus_agent.jobs.spec import job_base_env
from argus_agent.protocol import Command, MalformedCommand, decode_command, decode_commands


def test_backoff_first_retry_within_initial_then_capped_and_reset() -> None:
    backoff = Backoff(initial=1.0, cap=60.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(30)]
    assert delays[0] <= 1.0
    assert all(0 <= d <= 60.0 for d in delays)
    assert max(delays[10:]) > 10  # it grows
    backoff.reset()
    assert backoff.next_delay() <= 1.0


@given(
    st.integers(min_value=0, max_value=200),
    st.floats(min_value=0.01, max_value=10),
    st.floats(min_value=10, max_value=600),
)
def test_backoff_bounds_hold_for_any_attempt(attempt: int, initial: float, cap: float) -> None:
    backoff = Backoff(initial=initial, cap=cap, attempt=attempt, rng=random.Random(attempt))
    assert 0 <= backoff.next_delay() <= min(cap, initial * 2 ** min(attempt, 64))


@given(st.floats(min_value=0.1, max_value=3600))
def test_poll_jitter_is_within_ten_percent(interval: float) -> None:
    assert 0.9 * interval <= jittered(interval) <= 1.1 * interval


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("3") == 3
    assert retry_after_seconds(None) == 1.0
    assert retry_after_seconds("garbage") == 1.0
    assert retry_after_seconds("99999") == 3600
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10


def test_decode_commands_isolates_bad_items() -> None:
    body = {
        "jobs": [
            {"id": "c1", "kind": "rerun", "batch_id": "rerun-0123456789ab", "payload": {}},
            {"id": "c2", "kind": "stop"},
            {"kind": "stop", "batch_id": "x"},
            "not an object",
            {"id": "c3", "kind": "stop", "batch_id": "../../etc/passwd", "payload": {}},
        ]
    }
    first, second, third, fourth, fifth = decode_commands(body)
    assert isinstance(first, Command) and first.kind == "rerun"
    assert isinstance(second, MalformedCommand) and second.cmd_id == "c2"
    assert "batch_id" in second.reason
    assert isinstance(third, MalformedCommand) and third.cmd_id is None
    assert isinstance(fourth, MalformedCommand)
    assert isinstance(fifth, MalformedCommand) and "unsafe shape" in fifth.reason
    with pytest.raises(Exception, match="'jobs' list"):
        decode_commands({"nope": 1})


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=10,
    )
)
def test_decode_never_raises_on_hostile_items(item: object) -> None:
    assert isinstance(decode_command(item), Command | MalformedCommand)


def test_job_base_env_drops_agent_only_variables() -> None:
    env = {
        "PATH": "/bin",
        "NOTIFY_SOCKET": "/run/x",
        "ARGUS_AGENT_JOBS_SHELL": "x",
        "ARGUS_TOKEN": "em_live_x",
        "ARGUS_URL": "u",
    }
    assert job_base_env(env, keep_argus_token=False) == {"PATH": "/bin", "ARGUS_URL": "u"}
    assert job_base_env(env, keep_argus_token=True)["ARGUS_TOKEN"] == "em_live_x"
