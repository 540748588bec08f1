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
Pure functions: no I/O, no processes.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from argus_agent.errors import PayloadError

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

_BLANKS = " \t"
_METACHARS = " \t\n;&|<>()"
#: Longest first. ``&>``, ``|&``, ``;&`` and ``<<<`` are deliberately not here: dash reads them
#: as two operators, and splitting them is the reading that refuses more.
_OPERATORS = (
    *("<<-", "&&", "||", ";;", "<<", ">>", "<&", ">&", "<>", ">|"),
    *(";", "&", "|", "<", ">", "(", ")"),
)
_REDIRECTIONS = frozenset({"<", ">", ">>", "<&", ">&", "<>", ">|", "<<", "<<-"})
_HERE_DOCUMENTS = frozenset({"<<", "<<-"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
_FD_PREFIX = re.compile(r"[0-9]+|\{[A-Za-z_][A-Za-z0-9_]*\}")
_MAX_NESTING = 32

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
    arguments of the command's last simple command, in any POSIX-family shell."""
    try:
        tokens = _Scanner(command, top=True).script()
        _check_tail(tokens)
    except _Refusal as refusal:
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


class _Refusal(Exception):
    """The scanner cannot vouch for the command; ``why`` completes "cannot be added: ..."."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _refuse(why: str) -> NoReturn:
    raise _Refusal(why)


@dataclass(frozen=True)
class _Token:
    """An operator (``op``) or a word: its text as written and, when it has no expansion, its
    value after quote removal (``literal``). ``fd`` marks ``2`` in ``2>x``."""

    text: str
    op: bool = False
    literal: str | None = None
    fd: bool = False


class _Scanner:
    """Tokens of a POSIX-sh script, refusing whatever it cannot read with certainty.

    ``top``: the recorded command itself, where a newline, a comment or a line continuation is
    refused. Otherwise the text of a ``$(...)`` (``closer`` is ``)``) or of a backquoted
    substitution (the whole text), whose own separators and comments are harmless.
    """

    def __init__(self, text: str, *, top: bool = False, depth: int = 0):
        self.s = text
        self.i = 0
        self.top = top
        self.depth = depth
        if depth > _MAX_NESTING:
            _refuse("its substitutions are nested too deeply")

    def _at(self, offset: int = 0) -> str:
        j = self.i + offset
        return self.s[j] if j < len(self.s) else ""

    def script(self, closer: str | None = None) -> list[_Token]:
        """Tokens up to the end of the text, or up to (and past) the matching ``closer``."""
        tokens: list[_Token] = []
        parens = 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in _BLANKS:
                self.i += 1
            elif c == "\n":
                if self.top:
                    _refuse("it spans several lines")
                tokens.append(_Token("\n", op=True))
                self.i += 1
            elif c == "#":  # only reached at the start of a token
                if self.top:
                    _refuse("it ends with a # comment, which would swallow them")
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            elif c == "\\" and self._at(1) == "\n":
                if self.top:
                    _refuse("it spans several lines")
                self.i += 2
            elif op := next((o for o in _OPERATORS if self.s.startswith(o, self.i)), None):
                if op in _HERE_DOCUMENTS:
                    _refuse(f"it contains a here-document ({op})")
                self.i += len(op)
                if closer is not None and op == "(":
                    parens += 1
                elif closer is not None and op == ")":
                    if parens == 0:
                        return tokens
                    parens -= 1
                tokens.append(_Token(op, op=True))
            else:
                word = self._word()
                if not self.top and word.text == "case":
                    _refuse("it has a case statement inside a command substitution")
                tokens.append(word)
        if closer is not None:
            _refuse("it ends inside an unterminated $(...)")
        return tokens

    def _word(self) -> _Token:
        start = self.i
        literal: list[str] | None = []
        while self.i < len(self.s) and (c := self.s[self.i]) not in _METACHARS:
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    _refuse("it ends with a backslash")
                if nxt == "\n" and self.top:
                    _refuse("it spans several lines")
                if literal is not None and nxt != "\n":
                    literal.append(nxt)
                self.i += 2
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    _refuse("it ends inside an unterminated ' quote")
                if literal is not None:
                    literal.append(self.s[self.i + 1 : end])
                self.i = end + 1
            elif c == '"':
                self.i += 1
                text = self._double_quoted()
                literal = None if literal is None or text is None else [*literal, text]
            elif c == "$":
                self._dollar(in_quotes=False)
                literal = None
            elif c == "`":
                self._backquoted(in_quotes=False)
                literal = None
            else:
                if literal is not None:
                    literal.append(c)
                self.i += 1
        text = self.s[start : self.i]
        fd = self._at() in ("<", ">") and _FD_PREFIX.fullmatch(text) is not None
        return _Token(text, literal=None if literal is None else "".join(literal), fd=fd)

    def _double_quoted(self) -> str | None:
        """Past the closing ``"``; the quoted value, or None if it has expansions."""
        value: list[str] | None = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return None if value is None else "".join(value)
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    break
                if value is not None and nxt != "\n":
                    value.append(nxt if nxt in '$`"\\' else c + nxt)
                self.i += 2
            elif c == "$":
                self._dollar(in_quotes=True)
                value = None
            elif c == "`":
                self._backquoted(in_quotes=True)
                value = None
            else:
                if value is not None:
                    value.append(c)
                self.i += 1
        _refuse('it ends inside an unterminated " quote')

    def _dollar(self, *, in_quotes: bool) -> None:
        nxt = self._at(1)
        if nxt == "(":
            self.i += 2
            inner = _Scanner(self.s, depth=self.depth + 1)
            inner.i = self.i
            inner.script(closer=")")
            self.i = inner.i
        elif nxt == "{":
            self.i += 2
            self._parameter(in_quotes=in_quotes)
        elif nxt == "'" and not in_quotes:
            _refuse("it uses $'...' quoting, which POSIX shells read differently")
        else:  # $name, $1, $?, or $"..." (whose quotes the caller reads next)
            self.i += 1

    def _parameter(self, *, in_quotes: bool) -> None:
        """Past the ``}`` closing a ``${``."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "}":
                self.i += 1
                return
            if c in "'\"" and in_quotes:
                _refuse(
                    "it has quotes inside a double-quoted ${...}, which shells read differently"
                )
            if c == "\\":
                if not self._at(1):
                    break
                self.i += 2
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    break
                self.i = end + 1
            elif c == '"':
                self.i += 1
                self._double_quoted()
            elif c == "$":
                self._dollar(in_quotes=in_quotes)
            elif c == "`":
                self._backquoted(in_quotes=in_quotes)
            else:
                self.i += 1
        _refuse("it ends inside an unterminated ${...}")

    def _backquoted(self, *, in_quotes: bool) -> None:
        """Past the closing backquote: the first one not escaped, whatever the quotes."""
        self.i += 1
        inner: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "`":
                self.i += 1
                _Scanner("".join(inner), depth=self.depth + 1).script()
                return
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    break
                special = nxt in "$`\\" or (in_quotes and nxt == '"')
                inner.append(nxt if special else c + nxt)
                self.i += 2
            else:
                inner.append(c)
                self.i += 1
        _refuse("it ends inside an unterminated `...` substitution")


def _check_tail(tokens: list[_Token]) -> None:
    """Refuse unless the last token is a word ending a simple command that runs a program."""
    if not tokens:
        _refuse("it is empty")
    last = tokens[-1]
    if last.op:
        _refuse(f"it ends with {last.text!r}, so they would not be arguments of its last command")
    if last.text in RESERVED_WORDS:
        _refuse(f"it ends with the shell keyword {last.text!r} (quote it if it is an argument)")
    start = max(
        (n + 1 for n, t in enumerate(tokens) if t.op and t.text not in _REDIRECTIONS), default=0
    )
    command: list[_Token] = []  # the program and its arguments, redirections left out
    target = False
    for token in tokens[start:]:
        if token.op:
            target = True
        elif target or token.fd:
            target = False
        elif command or not (token.text in RESERVED_WORDS or _ASSIGNMENT.match(token.text)):
            command.append(token)
    if not command:
        _refuse("its last command runs no program (only assignments or redirections)")
    program = command[0].literal
    if program in ("command", "builtin"):
        words = (t.literal for t in command[1:] if not (t.literal or "-").startswith("-"))
        program = next(words, None)
    if program == "eval":
        _refuse("its last command is eval, which would run them as shell code")
