"""The websocket protocol argus-agent.v1 (argus_agent/wsproto.py): pure, no sockets.

Every message round-trips; the decoder never raises for anything a peer may send (about
10,000 generated hostile frames, each thrown at both directions) and always names what was
wrong; a bad command becomes exactly the MalformedCommand the REST decoder makes of it; the
``schema`` command writes JSON Schema for both directions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argus_agent import cli, protocol
from argus_agent import wsproto as ws
from argus_agent.wsproto import Direction, ErrorCode, FrameError

TO_SERVER, TO_AGENT = Direction.TO_SERVER, Direction.TO_AGENT

ENVELOPE = {
    "event_id": "0123456789abcdef",
    "schema_version": "1.1",
    "event_type": "log_line",
    "timestamp": "2025-01-01T00:00:00.000000Z",
    "batch_id": "rerun-0123456789ab",
    "source": {"project": "p", "host": "h"},
    "data": {"line": "héllo ✓", "level": "info"},
}

SAMPLES: list[tuple[Direction, Any]] = [
    (
        TO_SERVER,
        ws.Hello(
            agent_id="agent-0123456789ab",
            version="0.1.0",
            hostname="gpu-box",
            capabilities=["rerun", "stop"],
            running_jobs=[
                ws.RunningJob(batch_id="rerun-aaaaaaaaaaaa", pid=4242, state="running"),
                ws.RunningJob(batch_id="rerun-bbbbbbbbbbbb", pid=None, state="launching"),
            ],
            last_confirmed_seq=17,
        ),
    ),
    (
        TO_SERVER,
        ws.Hello(
            agent_id="agent-0123456789ab",
            version="0.1.0",
            hostname="h",
            capabilities=[],
            running_jobs=[],
            last_confirmed_seq=None,
        ),
    ),
    (TO_SERVER, ws.Ack(cmd_id="c-1", status="started", pid=99)),
    (TO_SERVER, ws.Ack(cmd_id="c-2", status="failed", error="no job for batch x on this host")),
    (TO_SERVER, ws.Events(seq=1, events=[ENVELOPE, {**ENVELOPE, "event_id": "fedcba9876543210"}])),
    (TO_SERVER, ws.ErrorMsg(code=ErrorCode.BAD_JSON, reason="frame is not JSON", ref=None)),
    (
        TO_AGENT,
        ws.Welcome(server_version="0.3.0+ref", confirmed_seq=None),
    ),
    (
        TO_AGENT,
        ws.Welcome(
            server_version="x",
            ping_interval_s=5,
            ping_timeout_s=2.5,
            confirmed_seq=2**63 - 1,
            max_message_bytes=ws.MIN_MESSAGE_BYTES,
        ),
    ),
    (
        TO_AGENT,
        ws.CommandMsg(
            id="cmd-1",
            kind="rerun",
            batch_id="rerun-0123456789ab",
            payload={
                "source_batch_id": "b-1",
                "command": "python train.py",
                "cwd": None,
                "env": {"A": "1"},
                "host": "gpu-box",
                "overrides": {"lr": 0.1, "opt.name": "adam"},
                "requested_by": "alice",
            },
            created_at="2025-01-01T00:00:00Z",
        ),
    ),
    (TO_AGENT, ws.CommandMsg(id="cmd-2", kind="stop", batch_id="b-2")),
    (TO_AGENT, ws.AckResult(cmd_id="cmd-1", result="ok")),
    (TO_AGENT, ws.AckResult(cmd_id="cmd-1", result="conflict", detail="already acked")),
    (
        TO_AGENT,
        ws.Confirm(
            seq=3,
            accepted=2,
            rejected=1,
            rejections=[{"event_id": "e-000003", "error": "bad"}],
        ),
    ),
    (TO_AGENT, ws.ErrorMsg(code=ErrorCode.TOO_LARGE, reason="too big", ref="12")),
]

MODELS = {d: tuple(ws._MODELS[d].values()) for d in Direction}


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "message"), SAMPLES, ids=lambda v: getattr(v, "type", v))
def test_every_message_round_trips(direction: Direction, message: Any) -> None:
    text = ws.encode_frame(message)
    assert json.loads(text)["type"] == message.type
    assert ws.decode_frame(text, direction) == message
    assert ws.decode_frame(text.encode(), direction) == message
    # The same frame from the wrong side is refused, naming who sends it.
    other = TO_AGENT if direction is TO_SERVER else TO_SERVER
    if message.type != "error":
        wrong = ws.decode_frame(text, other)
        assert isinstance(wrong, FrameError)
        assert wrong.code is ErrorCode.UNKNOWN_TYPE
        assert message.type in wrong.reason


def test_every_type_has_a_sample() -> None:
    for direction in Direction:
        sampled = {m.type for d, m in SAMPLES if d is direction}
        assert sampled == set(ws._MODELS[direction])


def test_encode_events_matches_the_model_and_skips_decoding() -> None:
    bodies = [json.dumps(ENVELOPE, ensure_ascii=False).encode(), json.dumps(ENVELOPE)]
    text = ws.encode_events(7, bodies)
    assert ws.decode_frame(text, TO_SERVER) == ws.Events(seq=7, events=[ENVELOPE, ENVELOPE])
    with pytest.raises(ValueError):
        ws.encode_events(0, bodies)
    with pytest.raises(ValueError):
        ws.encode_events(1, [])
    with pytest.raises(ValueError):
        ws.encode_events(1, [b"{}"] * (ws.MAX_EVENTS_PER_FRAME + 1))


def test_ack_follows_the_rest_rules() -> None:
    ack = ws.Ack.make("c-1", "failed", error="x" * 5000)
    assert len(ack.error or "") == 2000
    assert ack.rest_body() == protocol.ack_body("failed", None, "x" * 5000)
    assert ws.Ack.make("c-1", "started", pid=12).rest_body() == {"status": "started", "pid": 12}


def test_ack_result_mirrors_the_rest_status() -> None:
    for result, status in ws.ACK_RESULT_HTTP_STATUS.items():
        made = ws.AckResult.from_http_status("c-1", status)
        assert made.result == result and made.http_status == status
    assert ws.AckResult.from_http_status("c-1", 422).result == "invalid"


def test_confirm_lists_only_rejected_events_and_reads_as_a_rest_answer() -> None:
    confirm = ws.Confirm(
        seq=4, accepted=1, rejected=1, rejections=[{"event_id": "e-000002", "error": "bad type"}]
    )
    assert confirm.rest_answer() == {
        "accepted": 1,
        "rejected": 1,
        "results": [
            {"event_id": "e-000002", "status": "rejected", "db_id": None, "error": "bad type"}
        ],
        "unlisted_held": True,
    }
    assert ws.decode_frame(ws.encode_frame(confirm), TO_AGENT) == confirm


def test_pushed_command_is_the_rest_command() -> None:
    item = {"id": "c-9", "kind": "rerun", "batch_id": "rerun-1", "payload": {"command": "x"}}
    decoded = ws.decode_frame(json.dumps({"type": "command", **item}), TO_AGENT)
    assert isinstance(decoded, ws.CommandMsg)
    assert decoded.to_command() == protocol.decode_command(item)
    assert ws.CommandMsg.from_command(decoded.to_command()) == decoded


# -- refusals that name the problem -----------------------------------------------------------

BAD_COMMANDS = [
    {"id": "c-1", "kind": "rerun", "batch_id": "../etc", "payload": {}},
    {"id": "c-1", "kind": "rerun", "payload": {}},
    {"id": "c-1", "kind": "rerun", "batch_id": "b-1", "payload": "x"},
    {"id": "c-1", "kind": "", "batch_id": "b-1"},
    {"id": "c 1", "kind": "rerun", "batch_id": "b-1"},
    {"id": "c-1", "kind": "rerun", "batch_id": "b-1", "payload": {"cwd": "\ud800"}},
    {"id": "c-1", "kind": "rerun", "batch_id": "b-1", "payload": {"n": 10**150}},
]


@pytest.mark.parametrize("item", BAD_COMMANDS)
def test_bad_command_is_the_rest_malformed_command(item: dict[str, Any]) -> None:
    text = json.dumps({"type": "command", **item})
    bad = ws.decode_frame(text, TO_AGENT)
    assert isinstance(bad, FrameError)
    assert bad.msg_type == "command"
    assert bad.command == protocol.decode_command_text(json.dumps(item))
    assert bad.reason == bad.command.reason
    if bad.command.cmd_id:
        assert bad.ref == bad.command.cmd_id
        assert bad.reply() is None  # the dispatcher's ack `failed` answers it
    else:
        assert isinstance(bad.reply(), ws.ErrorMsg)


def test_unparseable_command_keeps_its_id_as_rest_does() -> None:
    deep = '{"type":"command","id":"c-7","kind":"rerun","batch_id":"b-7","payload":'
    deep += "[" * 50_000 + "]" * 50_000 + "}"
    bad = ws.decode_frame(deep, TO_AGENT)
    assert isinstance(bad, FrameError)
    assert bad.code is ErrorCode.TOO_LARGE
    assert bad.command == protocol.decode_command_text(deep)
    assert bad.command is not None and bad.command.cmd_id == "c-7"
    assert bad.command.batch_id == "b-7"
    huge = '{"type":"command","id":"c-8","kind":"stop","batch_id":"b-8","payload":{"n":'
    huge += "9" * 5000 + "}}"
    bad = ws.decode_frame(huge, TO_AGENT)
    assert isinstance(bad, FrameError) and bad.command is not None
    assert bad.command.cmd_id == "c-8" and "5000 digits" in bad.reason


def test_command_with_an_unknown_member_is_refused_but_acked() -> None:
    text = json.dumps({"type": "command", "id": "c-1", "kind": "stop", "batch_id": "b", "x": 1})
    bad = ws.decode_frame(text, TO_AGENT)
    assert isinstance(bad, FrameError) and bad.command is not None
    assert bad.command.cmd_id == "c-1" and "x: Extra inputs" in bad.reason


@pytest.mark.parametrize(
    ("frame", "direction", "code", "words", "ref"),
    [
        ("{", TO_SERVER, ErrorCode.BAD_JSON, "not JSON", None),
        ('{"type":"ack","cmd_id":"c-5","status":', TO_SERVER, ErrorCode.BAD_JSON, "", "c-5"),
        ('{"type":"events","seq":9,"events":[NaN]}', TO_SERVER, ErrorCode.BAD_JSON, "NaN", "9"),
        (b"\xff\xfe", TO_AGENT, ErrorCode.BAD_JSON, "UTF-8", None),
        ('"hello"', TO_SERVER, ErrorCode.UNKNOWN_TYPE, "a string", None),
        ('{"seq":1}', TO_AGENT, ErrorCode.UNKNOWN_TYPE, "no 'type'", None),
        ('{"type":7}', TO_AGENT, ErrorCode.UNKNOWN_TYPE, "a number", None),
        ('{"type":"ping"}', TO_AGENT, ErrorCode.UNKNOWN_TYPE, "'ping'", None),
        ('{"type":"hello"}', TO_AGENT, ErrorCode.UNKNOWN_TYPE, "sent by the agent", None),
        (
            '{"type":"ack","cmd_id":"c-5","status":"done"}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "status",
            "c-5",
        ),
        (
            '{"type":"ack","cmd_id":"c-5","status":"failed","x":1}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "ack.x",
            "c-5",
        ),
        (
            '{"type":"events","seq":true,"events":[{}]}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "events.seq",
            None,
        ),
        (
            '{"type":"events","seq":0,"events":[{}]}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "events.seq",
            None,
        ),
        (
            '{"type":"events","seq":2,"events":[]}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "events.events",
            "2",
        ),
        (
            '{"type":"events","seq":2,"events":[1]}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "events.events[0]",
            "2",
        ),
        (
            '{"type":"events","seq":2,"events":[{"a":"\\udc00"}]}',
            TO_SERVER,
            ErrorCode.BAD_FIELD,
            "events[0].a",
            "2",
        ),
        (
            '{"type":"events","seq":2,"events":[{"a":1e999}]}',
            TO_SERVER,
            ErrorCode.TOO_LARGE,
            "out of range",
            "2",
        ),
        (
            '{"type":"confirm","seq":' + "1" * 200 + "}",
            TO_AGENT,
            ErrorCode.TOO_LARGE,
            "200 digits",
            None,
        ),
        (
            '{"type":"welcome","protocol":2,"server_version":"x","confirmed_seq":null}',
            TO_AGENT,
            ErrorCode.UNSUPPORTED_VERSION,
            "speaks protocol 1",
            None,
        ),
        (
            '{"type":"error","code":"nope","reason":"x"}',
            TO_AGENT,
            ErrorCode.BAD_FIELD,
            "error.code",
            None,
        ),
    ],
)
def test_refusals_name_the_problem(
    frame: str | bytes, direction: Direction, code: ErrorCode, words: str, ref: str | None
) -> None:
    bad = ws.decode_frame(frame, direction)
    assert isinstance(bad, FrameError), bad
    assert bad.code is code, bad
    assert words in bad.reason
    assert bad.ref == ref


def test_replies_follow_the_rules() -> None:
    bad_ack = ws.decode_frame('{"type":"ack","cmd_id":"c-5","status":"done"}', TO_SERVER)
    assert isinstance(bad_ack, FrameError)
    reply = bad_ack.reply()
    assert isinstance(reply, ws.AckResult) and reply.result == "invalid"
    bad_error = ws.decode_frame('{"type":"error","code":"x","reason":""}', TO_SERVER)
    assert isinstance(bad_error, FrameError) and bad_error.reply() is None  # no ping-pong
    bad_hello = ws.decode_frame('{"type":"hello"}', TO_SERVER)
    assert isinstance(bad_hello, FrameError) and bad_hello.close_code is ws.CloseCode.PROTOCOL
    version = ws.decode_frame(
        '{"type":"welcome","protocol":9,"server_version":"x","confirmed_seq":null}', TO_AGENT
    )
    assert isinstance(version, FrameError)
    assert version.close_code is ws.CloseCode.UNSUPPORTED_VERSION
    bad_events = ws.decode_frame('{"type":"events","seq":3,"events":[]}', TO_SERVER)
    assert isinstance(bad_events, FrameError) and bad_events.close_code is None


def test_size_limits_are_named() -> None:
    big_hello = json.dumps(
        {
            "type": "hello",
            "agent_id": "a",
            "version": "1",
            "hostname": "h",
            "capabilities": [],
            "running_jobs": [],
            "last_confirmed_seq": None,
            "pad": "x" * ws.MAX_MESSAGE_BYTES,
        }
    )
    bad = ws.decode_frame(big_hello, TO_SERVER)
    assert isinstance(bad, FrameError) and bad.code is ErrorCode.TOO_LARGE
    assert "MAX_MESSAGE_BYTES" in bad.reason and bad.msg_type == "hello"

    line = json.dumps({**ENVELOPE, "data": {"line": "y" * 10_000}})
    frame = ws.encode_events(5, [line] * (ws.MAX_EVENTS_FRAME_BYTES // len(line) + 1))
    assert ws.MAX_EVENTS_FRAME_BYTES < len(frame) <= ws.MAX_FRAME_BYTES
    bad = ws.decode_frame(frame, TO_SERVER)
    assert isinstance(bad, FrameError) and bad.code is ErrorCode.TOO_LARGE
    assert "MAX_EVENTS_FRAME_BYTES" in bad.reason and bad.ref == "5"

    many = '{"type":"events","seq":6,"events":[' + ",".join(["{}"] * 501) + "]}"
    bad = ws.decode_frame(many, TO_SERVER)
    assert isinstance(bad, FrameError) and "MAX_EVENTS_PER_FRAME" in bad.reason

    for huge in ("x" * (ws.MAX_FRAME_BYTES + 1), b"x" * (ws.MAX_FRAME_BYTES + 1), "é" * 2_200_000):
        bad = ws.decode_frame(huge, TO_AGENT)
        assert isinstance(bad, FrameError) and "MAX_FRAME_BYTES" in bad.reason

    deep = '{"type":"events","seq":8,"events":[' + "[" * 40 + "]" * 40 + "]}"
    bad = ws.decode_frame(deep, TO_SERVER)
    assert isinstance(bad, FrameError) and "MAX_FRAME_DEPTH" in bad.reason and bad.ref == "8"
    deeper = '{"type":"events","seq":8,"events":[' + "[" * 100_000 + "]" * 100_000 + "]}"
    bad = ws.decode_frame(deeper, TO_SERVER)
    assert isinstance(bad, FrameError) and bad.code is ErrorCode.TOO_LARGE and bad.ref == "8"


def test_welcome_limits() -> None:
    base = {"type": "welcome", "server_version": "x", "confirmed_seq": None}
    for bad in (
        {"max_message_bytes": 1000},
        {"ping_interval_s": 0},
        {"ping_timeout_s": -1},
        {"ping_interval_s": "2"},
    ):
        assert isinstance(ws.decode_frame(json.dumps({**base, **bad}), TO_AGENT), FrameError)


# -- hostile frames: the decoder never raises --------------------------------------------------
# Each example derives several frames from what hypothesis drew (the value itself, wrapped in
# a frame of some type, cut short, as bytes), and each frame is thrown at both directions:
# about 12,300 frames in all (checked by test_enough_hostile_frames_were_thrown).

surrogates = st.characters(categories=["Cs"])
hostile_chars = st.characters() | surrogates
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(hostile_chars, max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(hostile_chars, max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
hostile_text = st.text(hostile_chars, max_size=120)
ALL_TYPES = sorted({t for d in Direction for t in ws._MODELS[d]} | {"", "Hello", "ping"})
FIELDS = sorted(
    {name for d in Direction for model in ws._MODELS[d].values() for name in model.model_fields}
    | {"extra", "type"}
)
hostile_values = (
    json_scalars
    | json_values
    | st.integers(min_value=-(10**120), max_value=10**120)
    | st.sampled_from(
        [0, -1, 2**63, 2**64, 1e308, -0.0, [], {}, "", "c-1", "b-1", "rerun-1", "x" * 300]
    )
    | st.sampled_from([s for _, m in SAMPLES for s in m.model_dump().values()])
)
THROWN = {"frames": 0}


def _check(frame: str | bytes) -> None:
    THROWN["frames"] += 1
    for direction in Direction:
        result = ws.decode_frame(frame, direction)
        if isinstance(result, FrameError):
            assert result.code is not ErrorCode.INTERNAL, result
            assert isinstance(result.code, ErrorCode)
            assert 0 < len(result.reason) <= ws.MAX_REASON_CHARS
            result.reason.encode("utf-8")  # the reason is always sendable
            reply = result.reply()
            if reply is not None:
                assert ws.decode_frame(ws.encode_frame(reply), TO_AGENT) == reply
            if result.command is not None:
                assert result.msg_type == "command"
        else:
            assert isinstance(result, MODELS[direction]), result
            # What was taken can be sent on and is read back the same.
            assert ws.decode_frame(ws.encode_frame(result), direction) == result


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def hostile(examples: int) -> settings:
    """Settings for a hostile-frame test: no deadline, ``examples`` examples."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


@hostile(1000)
@given(json_values, st.sampled_from(ALL_TYPES))
def test_hostile_json_values(value: Any, msg_type: str) -> None:
    text = json.dumps(value)
    _check(text)
    _check(_dumps({"type": msg_type, "events": value, "payload": value, "seq": value}))
    _check(text[: len(text) // 2])


@hostile(1300)
@given(
    st.sampled_from(ALL_TYPES),
    st.dictionaries(st.sampled_from(FIELDS), hostile_values, max_size=8),
)
def test_hostile_members_of_every_type(msg_type: str, members: dict[str, Any]) -> None:
    frame = {**members, "type": msg_type}
    text = json.dumps(frame)
    _check(text)
    _check(_dumps(frame).encode("utf-8", "surrogatepass"))
    if msg_type == "command":
        # A bad command is the REST decoder's MalformedCommand, whatever is wrong with it.
        item = {k: v for k, v in frame.items() if k != "type"}
        result = ws.decode_frame(text, TO_AGENT)
        rest = protocol.decode_command_text(json.dumps(item))
        if isinstance(rest, protocol.MalformedCommand):
            assert isinstance(result, FrameError) and result.command == rest


@hostile(1500)
@given(st.binary(max_size=200), hostile_text)
def test_hostile_bytes_and_text(data: bytes, text: str) -> None:
    _check(data)
    _check(text)
    _check(text.encode("utf-8", "surrogatepass"))


@hostile(800)
@given(
    st.sampled_from([ws.encode_frame(m) for _, m in SAMPLES]),
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), hostile_text | st.just("")),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_mutated_valid_frames(frame: str, edits: list[tuple[int, str]], truncate: bool) -> None:
    for at, insert in edits:
        at %= len(frame) + 1
        frame = frame[:at] + insert[:20] + frame[at + (0 if insert else 1) :]
    if truncate and frame:
        frame = frame[: len(frame) // 2]
    _check(frame)
    _check(frame.encode("utf-8", "surrogatepass"))


@hostile(200)
@given(
    st.sampled_from(ALL_TYPES),
    st.integers(min_value=1, max_value=3000),
    st.sampled_from(["[", '{"a":', '{"type":"events","seq":4,"events":[']),
    st.integers(min_value=1, max_value=400),
)
def test_deep_nesting_and_long_numbers(msg_type: str, depth: int, opener: str, digits: int) -> None:
    closer = {"[": "]", '{"a":': "}", '{"type":"events","seq":4,"events":[': "]}"}[opener]
    _check(f'{{"type":"{msg_type}","x":{opener * depth}1{closer * depth}}}')
    _check(f'{{"type":"{msg_type}","seq":{"7" * digits},"cmd_id":"c","id":"c"}}')
    _check(opener * depth)  # unterminated


def test_enough_hostile_frames_were_thrown() -> None:
    if THROWN["frames"] == 0:
        pytest.skip("run together with the hostile-frame tests above")
    assert THROWN["frames"] >= 10_000


# -- the schema command ---------------------------------------------------------------------


def _check_schema(schema: dict[str, Any], direction: Direction) -> None:
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(schema["discriminator"]["mapping"]) == set(ws._MODELS[direction])
    for ref in schema["discriminator"]["mapping"].values():
        definition = schema["$defs"][ref.rsplit("/", 1)[1]]
        assert definition["additionalProperties"] is False
        assert definition["required"][0] == "type"


def test_schema_command_writes_json_schema_for_both_directions(tmp_path: Path) -> None:
    assert cli.main(["schema", "--out", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [
        "argus-agent.v1.to_agent.schema.json",
        "argus-agent.v1.to_server.schema.json",
    ]
    for path, direction in zip(files, (TO_AGENT, TO_SERVER), strict=True):
        _check_schema(json.loads(path.read_text()), direction)


def test_schema_command_prints_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["protocol"] == ws.SUBPROTOCOL
    for direction in Direction:
        _check_schema(printed[direction.value], direction)
