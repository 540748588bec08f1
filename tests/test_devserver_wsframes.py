"""The reference server's fast way for events frames (``devserver/wsframes.py``) against the
protocol's full decoder: it must never take a frame the decoder refuses, nor read one
differently. Pure (no server)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argus_agent import wsproto as w
from argus_agent.devserver.wsframes import EVENT_LIST, checked_events
from tests.test_devserver_ws import envelope

#: Any JSON value, NaN, infinities and huge integers included (shared with the ingest tests).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(
        st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3), min_size=1, max_size=3
    ),
    deep=st.integers(min_value=0, max_value=w.MAX_FRAME_DEPTH + 2),
    cut=st.integers(min_value=0, max_value=40),
    seq=st.integers(min_value=-1, max_value=2**64),
)
def test_the_fast_events_path_takes_only_what_the_full_decoder_takes(
    data: list[dict[str, Any]], deep: int, cut: int, seq: int
) -> None:
    """The server's fast way for events frames (one pydantic call) must never take a frame
    the protocol's decoder refuses, nor read it differently."""
    nested: Any = "x"
    for _ in range(deep):
        nested = [nested]
    bodies = [json.dumps(envelope(data={**d, "n": nested})) for d in data]
    text = f'{{"type":"events","seq":{seq},"events":[{",".join(bodies)}]}}'
    for candidate in (text, text[: len(text) - cut] if cut else text):
        fast = checked_events({"text": candidate})
        if fast is None:
            continue
        full = w.decode_frame(candidate, w.Direction.TO_SERVER)
        assert isinstance(full, w.Events), full
        assert full.seq == fast.seq
        assert EVENT_LIST.validate_python(full.events) == fast.events


def test_the_fast_events_path_is_taken_by_a_plain_frame_and_not_by_a_doubtful_one() -> None:
    plain = w.encode_events(3, [json.dumps(envelope()) for _ in range(3)])
    fast = checked_events({"text": plain})
    assert fast is not None and fast.seq == 3 and len(fast.events) == 3
    too_deep: Any = []
    for _ in range(w.MAX_FRAME_DEPTH):
        too_deep = [too_deep]
    for doubtful in (
        w.encode_events(3, [json.dumps(envelope(data={"x": float("nan")}))]),  # NaN
        w.encode_events(3, [json.dumps(envelope(data={"x": 10**101}))]),  # past MAX_INT_DIGITS
        w.encode_events(3, [json.dumps(envelope(data={"x": too_deep}))]),  # nests too far
        w.encode_events(3, [json.dumps(envelope(data={"x": 1e308}))]).replace("e+308", "e999"),
        plain.replace('"log_line"', '"log_line", "extra": 1', 1),  # not an envelope
        plain.replace('"seq":3', '"seq":0', 1),
    ):
        assert checked_events({"text": doubtful}) is None
    assert checked_events({"bytes": plain.encode()}) is None  # a binary frame
