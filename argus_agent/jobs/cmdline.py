"""The argv that relaunches a recorded command with overrides, and whether it can be built.

This module owns one decision: how a rerun's ``key=value`` overrides reach the recorded command.
The recorded command is shell text; the override values are not, and must never be parsed as
such. Quoting them into the text (``shlex.quote``) is only right for a POSIX shell, and even
there it goes wrong when the text ends inside an open quote, after a backslash, in a comment or
after an operator: the overrides get swallowed, misplaced, or run as code.

So nothing is pasted. The script becomes ``<command> "$@"`` and the rendered words are handed to
the shell as positional parameters after ``$0``; ``"$@"`` expands to exactly those words. That is
only right when ``"$@"`` lands as the trailing arguments of the command's last simple command,
which :func:`check_appendable` verifies with a small, deliberately conservative POSIX-sh scanner.
Whatever the scanner cannot vouch for is refused with a PayloadError whose message is shown to
the user who asked for the rerun; a rerun without overrides still runs the command unchanged.

Landing as arguments is not enough: the program that receives them may parse them as shell code
itself (``eval``, ``sh -c``, ``ssh host cmd``, bash's ``declare``/``let``/``printf -v`` with
``a[$(...)]`` subscripts, ...). So the last command must also pass, fail closed:

* its program word is a literal word (no ``$``, backquote, glob, brace or bare ``~``), since
  ``E=eval; $E cmd`` or ``/bin/ba* -c`` can name any program;
* the program's basename is not in :data:`SHELL_CODE_RUNNERS`, a denylist of known re-parsers;
  a POSIX shell is allowed only as ``sh script.sh ARGS`` (no options, a literal script), and
  ``printf`` only after a literal format of ``%s``-like conversions;
* a known wrapper (:data:`WRAPPERS`: ``nohup``, ``env``, ``timeout``, ``sudo``, ``srun``, ...)
  is looked through: its options and operands are skipped (an option it may or may not give an
  argument to is tried both ways) and the same test applies to every word that could be the
  program it runs; where that cannot be told (a non-literal word, ``env -S``, no program left)
  the command is refused;
* it starts with no keyword but ``!``, ``{``, ``if``/``then``/``else``/``elif``,
  ``while``/``until``/``do`` (zsh's ``repeat 3 eval``, ``if [[ x ]] eval``), and no ``)`` is
  glued before it (``@(bash) -c``, zsh's ``/bin/ba(sh) -c``);
* the command nowhere reads the shell's positional parameters (``$1``, ``"$@"``, ``getopts``,
  ``for x; do``, ``${!n}``, zsh's ``$argv``), which hold the overrides for every command, not
  only the last, even inside single quotes (an earlier ``eval``/``trap`` may run that text),
  and runs no ``alias``/``hash``/``enable``, which can make a harmless name run a shell.

This is a denylist on top of the lexical check, and it cannot be complete. It cannot know a
program that re-parses its arguments internally: a Python script that passes ``sys.argv`` to
``os.system``, a shell script doing ``eval "$@"``, a renamed or symlinked shell, a wrapper or
launcher missing from the lists (or ``deepspeed``/``accelerate`` reaching other nodes through
``pdsh``/``ssh`` from a default hostfile), functions or aliases from the shell's startup files,
files that ``source``/``.`` read earlier in the command, or an earlier ``eval`` of text built
at run time that reads ``$1``. Pure functions: no I/O, no processes.

The scanner is :mod:`argus_agent.jobs.shscan`, the denylists and the program and wrapper
checks :mod:`argus_agent.jobs.reparsers`; this module is the public API and the checks on the
structure of the command (its last simple command, what earlier ones may do).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from argus_agent.errors import PayloadError
from argus_agent.jobs.reparsers import (
    NAME_CHANGERS,
    SHELL_CODE_RUNNERS,
    WRAPPERS,
    Wrapper,
    check_program,
    normal_name,
)
from argus_agent.jobs.shscan import Refusal, Scanner, Token, literal_word, refuse

__all__ = [
    "POSIX_SHELLS",
    "RESERVED_WORDS",
    "SHELL_CODE_RUNNERS",
    "WRAPPERS",
    "OverrideValue",
    "Wrapper",
    "build_argv",
    "check_appendable",
    "posix_shell_name",
    "render_override",
]

OverrideValue = str | int | float | bool | None

#: Basenames of ``jobs.shell[0]`` that run ``-c SCRIPT NAME ARGS...`` with ARGS as ``"$@"``.
POSIX_SHELLS = frozenset({"sh", "bash", "dash", "ksh", "mksh", "zsh", "ash"})

#: Words that open, continue or close compound commands (POSIX, bash, zsh). The scanner refuses
#: them as the last word wherever they stand: quoting the word makes it ordinary again.
RESERVED_WORDS = frozenset(
    {
        "!", "{", "}", "case", "do", "done", "elif", "else", "esac", "fi", "for", "if", "in",
        "then", "until", "while", "[[", "]]", "function", "select", "time", "coproc",
        "foreach", "end", "repeat",
    }
)  # fmt: skip

#: Keywords that may stand before a simple command (others: `[[`, zsh's `repeat N`, ...).
_COMMAND_PREFIX_KEYWORDS = frozenset(
    {"!", "{", "if", "then", "else", "elif", "while", "until", "do"}
)
#: Positional parameters, which hold the overrides for the whole script: `$1`, `$@`, `${#@}`,
#: zsh's `${(q)@}`, `$argv` and `${(P)n}`, bash's `${!n}` and BASH_ARGV, `getopts`, and
#: `for x; do` / `select x; do` without `in`. Matched in the raw text, quotes or not: an earlier
#: `eval` or `trap` may run single-quoted text.
_POSITIONAL = re.compile(
    r"\$(?:[1-9@*]|\{(?:\([^)]*\))?[#!^=~+]*(?:[1-9@*]|argv\b))"
    r"|\$\{!|\$\{\([^)]*P|(?<![\w.])argv\b|BASH_ARGV|BASH_ARGC|(?<![\w-])getopts\b"
    r"|(?<![\w-])(?:for|select)(?:\s+(?!in\b)[A-Za-z_]\w*)+\s*(?:;|&|\n|\{|\bdo\b|$)"
)
_REDIRECTIONS = frozenset({"<", ">", ">>", "<&", ">&", "<>", ">|", "<<", "<<-"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")

_ADVICE = "rerun without overrides to run it exactly as recorded"


def render_override(key: str, value: OverrideValue) -> str:
    """One ``key=value`` word (unquoted), Hydra style: ``true``/``false``, ``null``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return f"{key}={text}"


def check_appendable(command: str) -> None:
    """Raise PayloadError unless ``command + ' "$@"'`` passes ``"$@"`` as the trailing
    arguments of the command's last simple command, in any POSIX-family shell, and that
    command's program is not known to run its arguments as shell code (module docstring)."""
    try:
        tokens = Scanner(command, top=True).script()
        _check_tail(tokens)
        _check_earlier(tokens, command)
    except Refusal as refusal:
        raise PayloadError(
            f"overrides cannot be added to the recorded command: {refusal.why}; {_ADVICE}"
        ) from None


def posix_shell_name(shell: Sequence[str]) -> str:
    """``$0`` for the job's shell (basename of ``shell[0]``); PayloadError unless ``shell`` is a
    POSIX-family shell whose last element is ``-c``, so the script comes right after it."""
    name = os.path.basename(shell[0]) if shell else ""
    if name not in POSIX_SHELLS or len(shell) < 2 or shell[-1] != "-c" or "-c" in shell[1:-1]:
        raise PayloadError(
            "overrides need a POSIX shell in jobs.shell (sh, bash, dash, ksh, mksh, zsh or ash, "
            f"ending in -c, e.g. ['/bin/sh', '-c']); this agent has {list(shell)!r}; {_ADVICE}"
        )
    return name


def build_argv(
    shell: Sequence[str], command: str, overrides: Mapping[str, Any]
) -> tuple[tuple[str, ...], str]:
    """(argv to execute, the line to show) for ``command`` run by ``shell`` with ``overrides``.

    Without overrides: ``(*shell, command)`` and ``command``. With overrides the script is
    ``command "$@"`` and the rendered words follow ``$0`` as positional parameters, so they reach
    the command verbatim and no shell parses them. The display line (logs, audit, what the Argus
    UI previews) is ``command`` plus each word shell-quoted; it is never executed.
    Raises PayloadError (see :func:`check_appendable`, :func:`posix_shell_name`).
    """
    if not overrides:
        return (*shell, command), command
    words = [render_override(key, value) for key, value in overrides.items()]
    check_appendable(command)
    name = posix_shell_name(shell)
    argv = (*shell, command + ' "$@"', name, *words)
    return argv, " ".join([command, *(shlex.quote(word) for word in words)])


def _check_tail(tokens: list[Token]) -> None:
    """Refuse unless the last token is a word ending a simple command that runs a program that
    takes its arguments as data."""
    if not tokens:
        refuse("it is empty")
    last = tokens[-1]
    if last.op:
        refuse(f"it ends with {last.text!r}, so they would not be arguments of its last command")
    if last.text in RESERVED_WORDS:
        refuse(f"it ends with the shell keyword {last.text!r} (quote it if it is an argument)")
    start = max(
        (n + 1 for n, t in enumerate(tokens) if t.op and t.text not in _REDIRECTIONS), default=0
    )
    command: list[Token] = []  # the program and its arguments, redirections left out
    keywords: list[str] = []
    target = False
    for token in tokens[start:]:
        if token.op:
            target = True
        elif target or token.fd:
            target = False
        elif command:
            command.append(token)
        elif token.text in RESERVED_WORDS and token.text != "time":
            keywords.append(token.text)
        elif assignment := _ASSIGNMENT.match(token.text):
            if assignment.group(1):
                refuse(
                    "it assigns an array element before its program, which dash reads as a pattern"
                )
        else:
            command.append(token)
    if not command:
        refuse("its last command runs no program (only assignments or redirections)")
    if start and tokens[start - 1].text in ("(", ")"):
        # `(a) b`, `@(bash) -c`, zsh's `/bin/ba(sh)`: the program may be glued to a pattern.
        refuse(f"its last command follows {tokens[start - 1].text!r}, so its program is unclear")
    if bad := next((k for k in keywords if k not in _COMMAND_PREFIX_KEYWORDS), None):
        refuse(f"its last command starts with the shell keyword {bad!r}")
    check_program(command)


def _check_earlier(tokens: list[Token], command: str) -> None:
    """Refuse what lets commands before the last one see or redirect the overrides."""
    for words in _simple_commands(tokens):
        name = literal_word(words[0])
        if name is not None and normal_name(name) in NAME_CHANGERS:
            refuse(f"it runs {normal_name(name)}, which can change what a command name runs")
    if found := _POSITIONAL.search(command):
        refuse(
            f"it reads the shell's positional parameters ({found.group().strip()!r}), "
            "which would hold them"
        )


def _simple_commands(tokens: list[Token]) -> list[list[Token]]:
    """The words of each top-level simple command from its program on (redirections out)."""
    commands: list[list[Token]] = []
    current: list[Token] = []
    target = False
    for token in [*tokens, Token(";", op=True)]:
        if token.op and token.text not in _REDIRECTIONS:
            if current:
                commands.append(current)
            current, target = [], False
        elif token.op:
            target = True
        elif target or token.fd:
            target = False
        elif current or not (token.text in RESERVED_WORDS or _ASSIGNMENT.match(token.text)):
            current.append(token)
    return commands
