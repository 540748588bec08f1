"""The configuration reference and the starter config, rendered from the config model.

Owns two texts made from the same source, the models in ``config.py`` (each field's type,
constraints, default, ``description`` and ``examples``): :func:`reference_markdown`, checked in
as docs/configuration.md (``argus-agent config reference``), and :func:`example_toml`, the
commented starter file that ``argus-agent init`` writes, checked in as
argus_agent/data/config.example.toml (``argus-agent config example``). A test fails when
either checked-in file is not what these functions give now, so neither can drift from the
code. Pure functions: nothing is read or written here.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from argus_agent.config import SECTIONS
from argus_agent.configbase import DEFAULT_TEXT
from argus_agent.configsources import ENV_PREFIX, SDK_ENV, may_be_unset, value_kind

WIDTH = 92
REFERENCE_PATH = "docs/configuration.md"
EXAMPLE_PATH = "argus_agent/data/config.example.toml"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_EXAMPLE_HEADER = """\
# argus-agent configuration (TOML). Every key is optional; the values shown are the defaults.
#
# Where it is read from: --config PATH, else /etc/argus-agent/config.toml when running as root,
# else ~/.config/argus-agent/config.toml. A missing default file means "all defaults".
# Environment overrides: ARGUS_URL and ARGUS_TOKEN (the names Argus' own SDK uses), and
# ARGUS_AGENT_<SECTION>_<KEY> for any key below, e.g. ARGUS_AGENT_JOBS_STOP_GRACE_S=30; a list
# or a table is JSON there: ARGUS_AGENT_JOBS_USERS='{"alice": "alice"}'.
# Unknown keys are refused. Check a file with: argus-agent config check
#
# Generated from the configuration model (argus-agent config example); every key is also
# described in docs/configuration.md.
"""

_REFERENCE_HEADER = """\
# Configuration reference

<!-- Generated from the configuration model (argus_agent/config.py) by
`argus-agent config reference > docs/configuration.md`: edit the field descriptions there,
not this file. A test fails when this file is not what that command prints. -->

Every key is optional. The agent reads, lowest precedence first:

1. built-in defaults (below);
2. the TOML file: `--config PATH`, else `/etc/argus-agent/config.toml` when running as root,
   else `~/.config/argus-agent/config.toml` (a missing default file means all defaults);
3. `ARGUS_AGENT_<SECTION>_<KEY>` environment variables, e.g. `ARGUS_AGENT_JOBS_STOP_GRACE_S=30`;
4. `ARGUS_URL` and `ARGUS_TOKEN`, the names Argus' own SDK uses.

Unknown keys and unknown `ARGUS_AGENT_*` variables are refused, each mistake explained in one
line naming the file or variable, the key, the value and what was expected.
`argus-agent config check` says which file and variables it read and prints the effective
configuration (secrets redacted); `argus-agent init` writes a commented starter file, the same
as [config.example.toml](../config.example.toml).

In the environment, one value is written as in TOML but without quotes (`30`, `true`,
`info`, `/srv/training`); a list or a table is JSON
(`ARGUS_AGENT_JOBS_USERS='{"alice": "alice", "admin": "*"}'`,
`ARGUS_AGENT_AGENT_HOST_ALIASES='["gpu-01", "gpu-01.lan"]'`; `jobs.shell` also takes a command
line, `ARGUS_AGENT_JOBS_SHELL='/bin/bash -c'`); an empty value unsets a key whose default is
unset (`ARGUS_AGENT_JOBS_MAX_JOBS=`).
"""


def example_toml() -> str:
    """The commented starter config: every key with its default, or a commented example
    for a key that is unset by default or whose default depends on the host."""
    out = [_EXAMPLE_HEADER]
    for section, model in SECTIONS.items():
        out.append(f"\n[{section}]\n")
        out.append(_comment(_one_paragraph(model.__doc__ or "")))
        for key, field in model.model_fields.items():
            out.append(_comment(_description(section, key, field, with_default_text=True)))
            default = _static_default(field)
            example = field.examples[0] if field.examples else None
            if default is not None:
                out.append(_toml_line(key, default))
            if example is not None:
                out.append("# " + _toml_line(key, example))
    return "".join(out)


def reference_markdown() -> str:
    """docs/configuration.md: per section, a table of its keys, then each key's text."""
    out = [_REFERENCE_HEADER]
    for section, model in SECTIONS.items():
        intro = textwrap.wrap(_one_paragraph(model.__doc__ or ""), WIDTH, break_on_hyphens=False)
        out.append(f"\n## [{section}]\n\n" + "\n".join(intro) + "\n\n")
        out.append("| key | type | default |\n|---|---|---|\n")
        for key, field in model.model_fields.items():
            default = _default_text(field)
            if len(default) > 50:
                default = f"see [`{section}.{key}`](#{section}{key})"
            out.append(f"| `{key}` | {_type_text(field)} | {default} |\n")
        for key, field in model.model_fields.items():
            names = [f"`{ENV_PREFIX}{section.upper()}_{key.upper()}`"]
            names += [f"`{name}`" for name, target in SDK_ENV.items() if target == (section, key)]
            out.append(f"\n### `{section}.{key}`\n\n")
            out.append(f"{_type_text(field)}; default {_default_text(field)}; ")
            out.append(f"environment {' or '.join(names)}.\n\n")
            text = _description(section, key, field, with_default_text=False)
            out.append("\n".join(textwrap.wrap(text, WIDTH, break_on_hyphens=False)) + "\n")
    return "".join(out)


def missing_docs() -> list[str]:
    """Keys the texts above cannot render well: no description, or no example for a key
    that is unset by default or whose default depends on the host."""
    missing = []
    for section, model in SECTIONS.items():
        for key, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{section}.{key}: no description= in its Field")
            if _static_default(field) is None and not field.examples:
                missing.append(f"{section}.{key}: no examples= for its commented example line")
    return missing


def _static_default(field: FieldInfo) -> Any:
    """The default, or None when it is unset or depends on the host (``DEFAULT_TEXT``)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and DEFAULT_TEXT in extra:
        return None
    return field.get_default(call_default_factory=True)


def _description(section: str, key: str, field: FieldInfo, *, with_default_text: bool) -> str:
    text = _one_paragraph(field.description or f"{section}.{key}")
    extra = field.json_schema_extra
    if with_default_text and isinstance(extra, dict) and DEFAULT_TEXT in extra:
        text += f" Default: {extra[DEFAULT_TEXT]}."
    return text


def _one_paragraph(text: str) -> str:
    return " ".join(inspect.cleandoc(text).split())


def _comment(text: str) -> str:
    lines = textwrap.wrap(text, WIDTH - 2, break_on_hyphens=False)
    return "".join(f"# {line}\n" for line in lines)


def _toml_line(key: str, value: Any) -> str:
    line = f"{key} = {_toml_value(value)}"
    if len(line) <= WIDTH or not isinstance(value, list):
        return line + "\n"
    # A long list goes on indented lines, as many items to a line as fit.
    items = textwrap.wrap(
        " ".join(_toml_value(v) + "," for v in value),
        WIDTH - 4,
        break_on_hyphens=False,
        break_long_words=False,
    )
    return f"{key} = [\n" + "".join(f"    {line}\n" for line in items) + "]\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    # JSON's string escapes are TOML's basic-string escapes.
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _default_text(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and DEFAULT_TEXT in extra:
        return str(extra[DEFAULT_TEXT])
    default = field.get_default(call_default_factory=True)
    return "unset" if default is None else f"`{_toml_value(default)}`"


_SCALARS = {"str": "string", "float": "number", "int": "integer", "bool": "true or false"}
_SCALARS["Path"] = "path"
_LIMITS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _type_text(field: FieldInfo) -> str:
    """``number > 0 and ≤ 300``, ``list of strings``, ``integer ≥ 1, or unset``..."""
    annotation = field.annotation
    optional = may_be_unset(annotation)
    inner = next(a for a in get_args(annotation) if a is not type(None)) if optional else annotation
    kind = value_kind(annotation)
    if kind == "list":
        text = "list of strings"
    elif kind == "table":
        text = "table of strings"
    elif get_origin(inner) is Literal:
        text = "one of " + ", ".join(f'`"{v}"`' for v in get_args(inner))
    else:
        text = _SCALARS.get(getattr(inner, "__name__", ""), str(inner))
    limits = _limits(field, "items" if kind == "list" else "characters")
    if limits:
        text += " " + limits
    return text + (", or unset" if optional else "")


def _limits(field: FieldInfo, unit: str) -> str:
    """The field's constraints (annotated-types objects, read by their attribute names)."""
    parts = []
    lengths: dict[str, int] = {}
    for item in field.metadata:
        for attr, sign in _LIMITS:
            bound = getattr(item, attr, None)
            if isinstance(bound, int | float):
                parts.append(f"{sign} {bound if isinstance(bound, int) else f'{bound:g}'}")
        for attr in ("min_length", "max_length"):
            if isinstance(getattr(item, attr, None), int):
                lengths[attr] = getattr(item, attr)
    if "max_length" in lengths:
        parts.append(f"of {lengths.get('min_length', 0)} to {lengths['max_length']} {unit}")
    elif lengths.get("min_length") == 1:
        parts.append("(not empty)")
    elif "min_length" in lengths:
        parts.append(f"of at least {lengths['min_length']} {unit}")
    return " and ".join(parts)
