"""Tokens never reach a log line, whatever logs them and however."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from argus_agent.logsetup import configure, get_logger, redact_text


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure("debug", stream=sys.stderr, json=False)


def _capture(json_lines: bool) -> io.StringIO:
    stream = io.StringIO()
    configure("debug", stream=stream, json=json_lines)
    return stream


def test_tokens_are_redacted_in_json_and_console_output() -> None:
    for json_lines in (True, False):
        stream = _capture(json_lines)
        log = get_logger("test")
        log.info(
            "registering with em_live_SECRET1",
            agent_token="ag_live_SECRET2",
            headers={"Authorization": "Bearer SECRET3"},
            note="token ag_live_SECRET4 used",
            nested=[{"token": "SECRET5"}],
        )
        logging.getLogger("httpx").warning("sent Authorization: Bearer SECRET6")
        try:
            raise RuntimeError("boom with em_live_SECRET7")
        except RuntimeError:
            log.exception("failed")
        output = stream.getvalue()
        assert "SECRET" not in output, output
        assert output.count("<redacted>") >= 6
    lines = [json.loads(line) for line in _capture(True).getvalue().splitlines()]
    assert lines == []


def test_json_lines_have_level_time_and_event() -> None:
    stream = _capture(True)
    get_logger("argus_agent.x").warning("hello", batch_id="b1")
    record = json.loads(stream.getvalue())
    assert record["event"] == "hello" and record["level"] == "warning"
    assert record["batch_id"] == "b1" and record["timestamp"].endswith("Z")


@given(
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
        min_size=1,
        max_size=60,
    ),
    st.sampled_from(["em_live_", "ag_live_", "Bearer "]),
    st.text(max_size=20),
    st.text(max_size=20),
)
def test_redact_text_removes_any_token(secret: str, prefix: str, before: str, after: str) -> None:
    text = f"{before}{prefix}{secret} {after}"
    assert f"{prefix}{secret}" not in redact_text(text)
