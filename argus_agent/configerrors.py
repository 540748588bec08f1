"""Configuration mistakes as one readable line each.

Owns turning a pydantic ``ValidationError`` of the settings model into lines of the form::

    config.toml: server.url: expected an http:// or https:// URL, got 'ftp://x'

naming where the value came from (a file, an environment variable, the command line), the
key, what was expected and the value (a token's value never). ``config.py`` owns the model
and calls :func:`describe`; nothing here reads files or the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

REDACTED = "'<redacted>'"

_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list of strings",
    "path_type": "expected a path",
    "model_type": "expected a table",
    "dict_type": "expected a table",
    "model_attributes_type": "expected a table",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def describe(
    exc: ValidationError,
    origin: Mapping[tuple[str, ...], str],
    label: str,
    sections: Mapping[str, type[BaseModel]],
    root: type[BaseModel],
) -> str:
    """One line per error of ``exc``. ``origin`` maps (section, key) to where the value came
    from (else ``label``, the config file's name); ``sections`` and ``root`` are the models,
    to list the allowed keys when a key is unknown."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = _expected(error)
        value = error.get("input")
        head, sep, tail = message.partition(": ")
        if sep and isinstance(value, dict) and head in value:
            # A validator of a table names the key it is about: "url: expected ...".
            loc, message, value = [*loc, head], tail, value.get(head)
        elif sep and not loc and "." in head:
            # A whole-settings validator names "section.key: expected ...".
            loc, message = head.split("."), tail
            value = (value or {}).get(loc[0], {}) if isinstance(value, dict) else None
            value = value.get(loc[1]) if isinstance(value, dict) else None
        key = ".".join(loc)
        source = origin.get(tuple(loc[:2]), label)
        if error["type"] == "extra_forbidden":
            model = sections.get(loc[0]) if len(loc) == 2 else root
            allowed = ", ".join(sorted(model.model_fields)) if model else ""
            lines.append(f"{source}: {key}: unknown key; expected one of {allowed}")
            continue
        got = "" if error["type"] == "missing" else f", got {shown_value(loc, value)}"
        lines.append(f"{source}: {key}: {message}{got}")
    return "\n".join(lines)


def shown_value(loc: list[str], value: Any) -> str:
    """``value`` as a message shows it: ``repr``, with a token's value replaced."""
    if loc and loc[-1] == "token":
        return REDACTED
    if isinstance(value, dict):
        return repr({k: ("<redacted>" if k == "token" else v) for k, v in value.items()})
    return repr(value)


def _expected(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {
            "greater_than": ">",
            "greater_than_equal": ">=",
            "less_than": "<",
            "less_than_equal": "<=",
        }[kind]
        bound = next(iter(ctx.values()), "")
        return f"expected a number {sign} {bound}"
    if kind in ("too_short", "string_too_short"):
        return "expected a non-empty value"
    if kind == "string_too_long":
        return f"expected at most {ctx.get('max_length')} characters"
    return _EXPECTED.get(kind, error["msg"].lower())
