"""Phase 2 of the emulated cmd.exe: the syntax tree, the parser and its syntax errors."""

from __future__ import annotations

import re
from dataclasses import dataclass

from winbuilder.emulator.cmd.shell import _DELIMS, _SYNTAX


@dataclass(frozen=True)
class Redirect:
    """One redirection. ``op`` is ``<``, ``>``, ``>>`` or ``>&`` (then ``target`` is a handle digit)."""

    fd: int
    op: str
    target: str


@dataclass(frozen=True)
class Simple:
    """A simple command: its raw text (carets removed, quotes kept, redirections cut out)."""

    text: str
    redirects: tuple[Redirect, ...] = ()


@dataclass(frozen=True)
class Group:
    """``( body )`` with redirections applying to the whole group; ``body`` None for ``()``."""

    body: Node | None
    redirects: tuple[Redirect, ...] = ()


@dataclass(frozen=True)
class Condition:
    """The condition of an ``if``: ``kind`` is ``errorlevel``, ``exist``, ``defined`` or ``compare``."""

    kind: str
    negate: bool
    ignore_case: bool
    left: str
    op: str = ""
    right: str = ""


@dataclass(frozen=True)
class If:
    """``if COND then [else otherwise]``."""

    cond: Condition
    then: Node
    otherwise: Node | None


@dataclass(frozen=True)
class Binary:
    """``left OP right`` with ``op`` one of ``&``, ``&&``, ``||``, ``|``."""

    op: str
    left: Node
    right: Node


Node = Simple | Group | If | Binary


class CmdSyntaxError(Exception):
    """A command line cmd.exe would refuse; the message is cmd's own text (without CRLF)."""


def parse(line: str) -> Node | None:
    """Parse one (already percent-expanded) command line, cmd.exe phase 2.

    Args:
        line: the command line; newlines inside ``( )`` separate commands, a newline at top level ends the line.

    Returns:
        The syntax tree, or None for an empty line.

    Raises:
        CmdSyntaxError: for input cmd.exe rejects, e.g. ``"& was unexpected at this time."``.
    """
    p = _Parser(line)
    p.skip_ws(newlines=True)
    if p.at_end(0):
        return None
    node = p.seq(0)
    return node


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.n = len(text)

    def peek(self, tok: str) -> bool:
        return self.s.startswith(tok, self.i)

    def skip_ws(self, newlines: bool = False) -> None:
        ws = " \t\n\r" if newlines else " \t\r"
        while self.i < self.n and self.s[self.i] in ws:
            self.i += 1

    def at_end(self, depth: int) -> bool:
        return self.i >= self.n or (self.s[self.i] == "\n" and depth == 0) or (depth > 0 and self.s[self.i] == ")")

    def seq(self, depth: int) -> Node:
        left = self.andor(depth)
        while True:
            self.skip_ws()
            if self.i < self.n and self.s[self.i] == "\n" and depth > 0:
                self.skip_ws(newlines=True)
                if self.at_end(depth):
                    return left
                left = Binary("&", left, self.andor(depth))
            elif self.peek("&") and not self.peek("&&"):
                self.i += 1
                self.skip_ws()
                if self.at_end(depth):
                    return left
                left = Binary("&", left, self.andor(depth))
            else:
                return left

    def andor(self, depth: int) -> Node:
        left = self.pipeline(depth)
        while True:
            self.skip_ws()
            if self.peek("&&") or self.peek("||"):
                op = self.s[self.i : self.i + 2]
                self.i += 2
                self.skip_ws()
                if self.at_end(depth):
                    raise CmdSyntaxError(_SYNTAX.strip())
                left = Binary(op, left, self.pipeline(depth))
            else:
                return left

    def pipeline(self, depth: int) -> Node:
        left = self.command(depth)
        while True:
            self.skip_ws()
            if self.peek("|") and not self.peek("||"):
                self.i += 1
                self.skip_ws()
                if self.at_end(depth):
                    raise CmdSyntaxError(_SYNTAX.strip())
                left = Binary("|", left, self.command(depth))
            else:
                return left

    def command(self, depth: int) -> Node:
        self.skip_ws()
        while self.i < self.n and self.s[self.i] in "@;,=":
            self.i += 1
            self.skip_ws()
        if self.i >= self.n:
            raise CmdSyntaxError(_SYNTAX.strip())
        c = self.s[self.i]
        if c in "&|":
            tok = "&&" if self.peek("&&") else "||" if self.peek("||") else c
            raise CmdSyntaxError(f"{tok} was unexpected at this time.")
        if c == ")" and depth > 0:
            raise CmdSyntaxError(") was unexpected at this time.")
        if c == "(":
            return self.group(depth)
        word = re.match(r"[A-Za-z]+", self.s[self.i :])
        if word is not None:
            w = word.group(0).lower()
            after = self.s[self.i + len(w) : self.i + len(w) + 1]
            if w == "if" and (after == "" or after in _DELIMS):
                return self.if_(depth)
            if w == "rem" and (after == "" or after in _DELIMS + "/"):
                end = self.s.find("\n", self.i)
                self.i = self.n if end < 0 else end
                return Simple("rem")
        return self.simple(depth)

    def group(self, depth: int) -> Group:
        self.i += 1
        self.skip_ws(newlines=True)
        body: Node | None = None
        if not self.peek(")"):
            body = self.seq(depth + 1)
            self.skip_ws(newlines=True)
        if not self.peek(")"):
            raise CmdSyntaxError(_SYNTAX.strip())
        self.i += 1
        redirects: list[Redirect] = []
        while True:
            self.skip_ws()
            m = re.match(r"([0-9]?)(>>|>|<)", self.s[self.i :])
            if m is None:
                break
            self.i += len(m.group(0))
            redirects.append(self.redirect(m.group(1), m.group(2), depth))
        return Group(body, tuple(redirects))

    def simple(self, depth: int) -> Simple:
        buf: list[str] = []
        redirects: list[Redirect] = []
        quoted = False
        s = self.s
        while self.i < self.n:
            c = s[self.i]
            if c == "\n":
                break
            if quoted:
                buf.append(c)
                self.i += 1
                quoted = c != '"'
                continue
            if c == '"':
                quoted = True
            elif c == "^":
                if self.i + 1 < self.n and s[self.i + 1] != "\n":
                    buf.append(s[self.i + 1])
                self.i += 2
                continue
            elif c in "&|" or (c == ")" and depth > 0):
                break
            elif c in "<>":
                handle = ""
                if buf and buf[-1].isdigit() and (len(buf) == 1 or buf[-2] in _DELIMS):
                    handle = buf.pop()
                op = ">>" if s.startswith(">>", self.i) else c
                self.i += len(op)
                redirects.append(self.redirect(handle, op, depth))
                continue
            buf.append(c)
            self.i += 1
        return Simple("".join(buf).rstrip("\r"), tuple(redirects))

    def redirect(self, handle: str, op: str, depth: int) -> Redirect:
        fd = int(handle) if handle else (0 if op == "<" else 1)
        if self.peek("&"):
            self.i += 1
            self.skip_ws()
            m = re.match(r"[0-9]", self.s[self.i :])
            if m is None:
                raise CmdSyntaxError(_SYNTAX.strip())
            self.i += 1
            return Redirect(fd, ">&", m.group(0))
        self.skip_ws()
        target = self.word(depth, stop="<>&|")
        if not target:
            raise CmdSyntaxError(_SYNTAX.strip())
        return Redirect(fd, op, target.replace('"', ""))

    def word(self, depth: int, stop: str) -> str:
        """A token up to whitespace or a ``stop`` character outside quotes; carets processed, quotes kept."""
        buf: list[str] = []
        quoted = False
        while self.i < self.n:
            c = self.s[self.i]
            if c in "\r\n":
                break
            if not quoted:
                if c in " \t" or c in stop or (c == ")" and depth > 0):
                    break
                if c == "^" and self.i + 1 < self.n:
                    buf.append(self.s[self.i + 1])
                    self.i += 2
                    continue
            if c == '"':
                quoted = not quoted
            buf.append(c)
            self.i += 1
        return "".join(buf)

    def if_(self, depth: int) -> If:
        self.i += 2
        negate = ignore_case = False
        while True:
            self.skip_delims()
            m = re.match(r"(/i|not)(?=[\s,;=]|$)", self.s[self.i :], re.IGNORECASE)
            if m is None:
                break
            if m.group(1).lower() == "not":
                negate = True
            else:
                ignore_case = True
            self.i += len(m.group(0))
        m = re.match(r"(errorlevel|exist|defined)(?=[\s,;=])", self.s[self.i :], re.IGNORECASE)
        if m is not None:
            self.i += len(m.group(0))
            self.skip_delims()
            arg = self.word(depth, stop="<>&|=,;")
            if not arg:
                raise CmdSyntaxError(_SYNTAX.strip())
            cond = Condition(m.group(1).lower(), negate, ignore_case, arg)
        else:
            left = self.word(depth, stop="<>&|=,;")
            self.skip_ws()
            if self.peek("=="):
                self.i += 2
                op = "=="
            else:
                self.skip_delims()
                m = re.match(r"(equ|neq|lss|leq|gtr|geq)(?=[\s,;=])", self.s[self.i :], re.IGNORECASE)
                if m is None or not left:
                    raise CmdSyntaxError(f"{self.word(depth, stop='&|') or 'if'} was unexpected at this time.")
                self.i += len(m.group(0))
                op = m.group(1).upper()
            self.skip_delims()
            right = self.word(depth, stop="<>&|=,;")
            if not right:
                raise CmdSyntaxError(_SYNTAX.strip())
            cond = Condition("compare", negate, ignore_case, left, op, right)
        self.skip_ws()
        if self.at_end(depth):
            raise CmdSyntaxError(_SYNTAX.strip())
        if not self.peek("("):
            return If(cond, self.seq(depth), None)
        then: Node = self.group(depth)
        self.skip_ws()
        otherwise: Node | None = None
        m = re.match(r"else(?=[\s(]|$)", self.s[self.i :], re.IGNORECASE)
        if m is not None:
            self.i += 4
            self.skip_ws()
            if self.at_end(depth):
                raise CmdSyntaxError(_SYNTAX.strip())
            otherwise = self.group(depth) if self.peek("(") else self.seq(depth)
        return If(cond, then, otherwise)

    def skip_delims(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t,;=":
            self.i += 1
