"""Logging: structlog JSON lines for journald, readable lines on a terminal, tokens redacted.

``configure()`` is called once by the CLI. The redaction processor runs last before rendering,
so no renderer ever sees a token, whichever logger (ours, httpx, uvicorn) emitted the event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

#: Argus tokens (reporter ``em_live_``, agent ``ag_live_``) and bearer headers.
TOKEN_RE = re.compile(r"(em_live_|ag_live_)[A-Za-z0-9_\-]+|(Bearer\s+)[A-Za-z0-9._\-]+")
SECRET_KEYS = frozenset(
    {"token", "agent_token", "user_token", "authorization", "password", "secret", "jwt"}
)
REDACTED = "<redacted>"


def redact_text(text: str) -> str:
    """``text`` with every Argus token and bearer credential replaced."""

    def _sub(match: re.Match[str]) -> str:
        if match.group(1):
            return f"{match.group(1)}{REDACTED}"
        return f"{match.group(2)}{REDACTED}"

    return TOKEN_RE.sub(_sub, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if str(k).lower() in SECRET_KEYS and v else _redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub tokens from every key and value of an event."""
    for key in list(event_dict):
        value = event_dict[key]
        if key.lower() in SECRET_KEYS and value:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


def configure(
    level: str = "info", *, stream: TextIO | None = None, json: bool | None = None
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr by default).

    ``json`` None picks JSON lines when the stream is not a terminal (journald) and console
    lines on a terminal. Replaces earlier configuration; idempotent.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the log level of a configured process (a config reload), nothing else."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (usually the module's ``__name__``)."""
    return structlog.get_logger(name)
