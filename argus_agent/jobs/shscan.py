"""The POSIX-sh lexical scanner behind :func:`argus_agent.jobs.cmdline.check_appendable`.

This module owns reading a recorded command as shell text: :class:`Scanner` turns it into
:class:`Token` words and operators, refusing (:func:`refuse`, :class:`Refusal`) whatever it
cannot read with certainty in every POSIX-family shell, and :func:`literal_word` says which words
have one value whatever the shell expands. What the tokens mean (which command is last, which
program it runs) is for ``cmdline`` and ``reparsers``. Pure functions: no I/O, no processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

_BLANKS = " \t"
_METACHARS = " \t\n;&|<>()"
#: Longest first. ``&>``, ``|&``, ``;&`` and ``<<<`` are deliberately not here: dash reads them
#: as two operators, and splitting them is the reading that refuses more.
_OPERATORS = (
    *("<<-", "&&", "||", ";;", "<<", ">>", "<&", ">&", "<>", ">|"),
    *(";", "&", "|", "<", ">", "(", ")"),
)
_HERE_DOCUMENTS = frozenset({"<<", "<<-"})
_FD_PREFIX = re.compile(r"[0-9]+|\{[A-Za-z_][A-Za-z0-9_]*\}")
#: How deeply substitutions (here) and wrappers (reparsers) may nest before a refusal.
MAX_NESTING = 32


class Refusal(Exception):
    """The scanner cannot vouch for the command; ``why`` completes "cannot be added: ..."."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def refuse(why: str) -> NoReturn:
    """Stop the check: raise :class:`Refusal` with ``why``."""
    raise Refusal(why)


@dataclass(frozen=True)
class Token:
    """An operator (``op``) or a word: its text as written and, when it has no expansion, its
    value after quote removal (``literal``). ``fd`` marks ``2`` in ``2>x``."""

    text: str
    op: bool = False
    literal: str | None = None
    fd: bool = False
    #: An unquoted glob or brace character (``* ? [ {``): the word may become other words.
    pattern: bool = False


class Scanner:
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
        if depth > MAX_NESTING:
            refuse("its substitutions are nested too deeply")

    def _at(self, offset: int = 0) -> str:
        j = self.i + offset
        return self.s[j] if j < len(self.s) else ""

    def script(self, closer: str | None = None) -> list[Token]:
        """Tokens up to the end of the text, or up to (and past) the matching ``closer``."""
        tokens: list[Token] = []
        parens = 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in _BLANKS:
                self.i += 1
            elif c == "\n":
                if self.top:
                    refuse("it spans several lines")
                tokens.append(Token("\n", op=True))
                self.i += 1
            elif c == "#":  # only reached at the start of a token
                if self.top:
                    refuse("it ends with a # comment, which would swallow them")
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            elif c == "\\" and self._at(1) == "\n":
                if self.top:
                    refuse("it spans several lines")
                self.i += 2
            elif op := next((o for o in _OPERATORS if self.s.startswith(o, self.i)), None):
                if op in _HERE_DOCUMENTS:
                    refuse(f"it contains a here-document ({op})")
                self.i += len(op)
                if closer is not None and op == "(":
                    parens += 1
                elif closer is not None and op == ")":
                    if parens == 0:
                        return tokens
                    parens -= 1
                tokens.append(Token(op, op=True))
            else:
                word = self._word()
                if not self.top and word.text == "case":
                    refuse("it has a case statement inside a command substitution")
                tokens.append(word)
        if closer is not None:
            refuse("it ends inside an unterminated $(...)")
        return tokens

    def _word(self) -> Token:
        start = self.i
        literal: list[str] | None = []
        pattern = False
        while self.i < len(self.s) and (c := self.s[self.i]) not in _METACHARS:
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    refuse("it ends with a backslash")
                if nxt == "\n" and self.top:
                    refuse("it spans several lines")
                if literal is not None and nxt != "\n":
                    literal.append(nxt)
                self.i += 2
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    refuse("it ends inside an unterminated ' quote")
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
                # `[` is the test command unless a `]` follows (anywhere: `[a' ']` is a pattern).
                pattern = pattern or c in "*?{" or (c == "[" and "]" in self.s[self.i :])
                if literal is not None:
                    literal.append(c)
                self.i += 1
        text = self.s[start : self.i]
        fd = self._at() in ("<", ">") and _FD_PREFIX.fullmatch(text) is not None
        value = None if literal is None else "".join(literal)
        return Token(text, literal=value, fd=fd, pattern=pattern)

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
        refuse('it ends inside an unterminated " quote')

    def _dollar(self, *, in_quotes: bool) -> None:
        nxt = self._at(1)
        if nxt == "(":
            self.i += 2
            inner = Scanner(self.s, depth=self.depth + 1)
            inner.i = self.i
            inner.script(closer=")")
            self.i = inner.i
        elif nxt == "{":
            self.i += 2
            self._parameter(in_quotes=in_quotes)
        elif nxt == "'" and not in_quotes:
            refuse("it uses $'...' quoting, which POSIX shells read differently")
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
                refuse("it has quotes inside a double-quoted ${...}, which shells read differently")
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
        refuse("it ends inside an unterminated ${...}")

    def _backquoted(self, *, in_quotes: bool) -> None:
        """Past the closing backquote: the first one not escaped, whatever the quotes."""
        self.i += 1
        inner: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "`":
                self.i += 1
                Scanner("".join(inner), depth=self.depth + 1).script()
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
        refuse("it ends inside an unterminated `...` substitution")


def literal_word(token: Token) -> str | None:
    """The word's one value, or None when expansions could make it another word or several."""
    if token.literal is None or token.pattern:
        return None
    if token.text.startswith("~") and "/" not in token.literal:  # `~` or `~user`: a home
        return None
    return token.literal
