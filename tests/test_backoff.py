"""The one retry classifier, as a pure function: failed server calls → what the loop does next.
No sockets, no sleeps."""

from __future__ import annotations

import random

import pytest

from argus_agent.backoff import Action, Backoff, Decision, classify
from argus_agent.errors import (
    AgentTokenRejectedError,
    AuthError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TransientServerError,
)

AUTH_RETRY_S = 123.0

TABLE: list[tuple[str, BaseException, Decision]] = [
    (
        "connection refused",
        TransientServerError("GET /x: cannot connect"),
        Decision(Action.BACKOFF),
    ),
    (
        "overall deadline",
        TransientServerError("GET /x: timed out after 1 s"),
        Decision(Action.BACKOFF),
    ),
    ("5xx", TransientServerError("GET /x: HTTP 503", status=503), Decision(Action.BACKOFF)),
    ("408", TransientServerError("GET /x: HTTP 408", status=408), Decision(Action.BACKOFF)),
    (
        "429",
        RateLimitedError("GET /x: HTTP 429", retry_after=7.5),
        Decision(Action.RETRY_AFTER, 7.5),
    ),
    (
        "429 now",
        RateLimitedError("GET /x: HTTP 429", retry_after=0.0),
        Decision(Action.RETRY_AFTER, 0.0),
    ),
    (
        "agent token unknown",
        AgentTokenRejectedError("GET /x: HTTP 401", status=401),
        Decision(Action.AUTH_REJECTED, AUTH_RETRY_S),
    ),
    (
        "401",
        AuthError("POST /x: HTTP 401", status=401),
        Decision(Action.AUTH_REJECTED, AUTH_RETRY_S),
    ),
    (
        "403",
        AuthError("POST /x: HTTP 403", status=403),
        Decision(Action.AUTH_REJECTED, AUTH_RETRY_S),
    ),
    ("400", ProtocolError("POST /x: HTTP 400", status=400), Decision(Action.REFUSED)),
    ("413", ProtocolError("POST /x: HTTP 413", status=413), Decision(Action.REFUSED)),
    ("422", ProtocolError("POST /x: HTTP 422", status=422), Decision(Action.REFUSED)),
    ("409", ConflictError("POST /x: HTTP 409", status=409), Decision(Action.REFUSED)),
    # A wrong endpoint or proxy is not the request's fault: never a reason to drop events.
    ("404", NotFoundError("POST /x: HTTP 404", status=404), Decision(Action.BACKOFF)),
    ("405", ProtocolError("POST /x: HTTP 405", status=405), Decision(Action.BACKOFF)),
    ("415", ProtocolError("POST /x: HTTP 415", status=415), Decision(Action.BACKOFF)),
    ("not JSON", ProtocolError("GET /x: answer is not JSON", status=200), Decision(Action.BACKOFF)),
    ("no status", ProtocolError("POST /x: answer has no 'results' list"), Decision(Action.BACKOFF)),
    ("plain ServerError", ServerError("GET /x: ?"), Decision(Action.BACKOFF)),
    ("a bug", KeyError("jobs"), Decision(Action.BACKOFF)),
]


@pytest.mark.parametrize(
    ("exc", "expected"), [(exc, d) for _, exc, d in TABLE], ids=[name for name, _, _ in TABLE]
)
def test_classify(exc: BaseException, expected: Decision) -> None:
    assert classify(exc, auth_retry_s=AUTH_RETRY_S) == expected


def test_the_delay_is_the_fixed_wait_or_the_next_backoff() -> None:
    backoff = Backoff(initial=1.0, cap=8.0, rng=random.Random(3))
    assert Decision(Action.RETRY_AFTER, 7.5).delay(backoff) == 7.5
    assert Decision(Action.AUTH_REJECTED, AUTH_RETRY_S).delay(backoff) == AUTH_RETRY_S
    assert backoff.attempt == 0, "a fixed wait does not advance the backoff"
    assert 0 <= Decision(Action.BACKOFF).delay(backoff) <= 1.0
    assert 0 <= Decision(Action.REFUSED).delay(backoff) <= 2.0  # nothing to settle: back off
    assert backoff.attempt == 2
