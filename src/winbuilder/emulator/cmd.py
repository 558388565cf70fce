r"""An emulated ``cmd.exe /c`` for the emulated Windows hosts (WS-Management server and sshd ``ForceCommand``).

Usage (one command line per process, like ``cmd.exe /c``)::

    python -m winbuilder.emulator.cmd --root SANDBOX [--cwd C:\Users\USER] [--user USER]
                                      [--exit-code-file PATH] [-c "COMMAND LINE"]

* Without ``-c`` the line comes from ``SSH_ORIGINAL_COMMAND`` (sshd ``ForceCommand``), to which the ``cmd /c``
  quote rule is applied as Windows OpenSSH runs ``cmd.exe /c <command>`` (see ``strip_slash_c_quotes``); the ``-c``
  text is taken as already stripped. With neither, exit 0 (no interactive shell).
* Lines longer than 8191 characters are truncated to 8191, as cmd.exe does (it may then even succeed).
* stdin/stdout/stderr are the process's own file descriptors, passed unchanged to child programs (``tar -xf -``
  reads the very stdin bytes). Output is bytes as produced; the emulated console runs code page 65001 (UTF-8).
* Exit status: cmd's exit code (the ERRORLEVEL after the last command) masked to 32 bits; the process exit status
  is ``code & 0xFF``. With ``--exit-code-file PATH`` the full unsigned decimal code is written to PATH first.
  A child killed by a signal counts as exit code 1. On SIGTERM the interpreter SIGKILLs its children (the whole
  process group when it leads one) and exits 143 (also written to the exit-code file).
* Paths: drive ``X:\`` is ``SANDBOX/X/`` (``winbuilder.emulator.paths``). The initial directory is
  ``C:\Users\<user>`` (created) unless ``--cwd``. ``USERNAME``, ``USERPROFILE``, ``COMPUTERNAME``
  (``WINBUILDER-EMU``), ``SystemRoot``, ``TEMP``/``TMP`` ... are set; the rest of the process environment is kept.

The supported subset of cmd.exe (Microsoft "cmd", "if", "set", "exit" docs; parser phases as documented by the
community for cmd.exe):

* Phase 1, command-line mode: ``%NAME%`` is expanded once for the whole line *before* it runs (case-insensitive
  names; ``%CD%``, ``%ERRORLEVEL%``, ``%RANDOM%``, ``%DATE%``, ``%TIME%`` are dynamic; ``%N:~s,l%`` and
  ``%N:a=b%`` are supported); an undefined ``%X%`` stays literal. So ``set X=1 & echo %X%`` prints ``%X%`` as on
  Windows; ``call`` expands again at run time (``call echo %^ERRORLEVEL%``).
* Phase 2: ``"`` quoting, ``^`` escape outside quotes, ``&``, ``&&``, ``||``, ``|`` (each side runs on a copy of
  the shell state, like cmd's child cmd.exe), ``( ... )`` groups, redirections ``<``, ``>``, ``>>``, ``N>``,
  ``N>>``, ``N>&M`` (the digit needs a delimiter before it) with the ``NUL`` device. A syntax error prints
  "X was unexpected at this time." and exits 255.
* Internal commands: ``cd``/``chdir`` (``/d``; without ``/d`` another drive's directory is not entered),
  ``md``/``mkdir`` (intermediate dirs), ``echo`` (``echo.``, ``echo text> f`` writes ``text\r\n``),
  ``type``, ``set`` (``set N=V``, ``set "N=V"``, ``set N=`` unsets, ``set [prefix]`` lists, ``set /a``),
  ``exit [/b] [N]``, ``del``/``erase`` (files, wildcards), ``rd``/``rmdir`` (``/s /q``), ``copy``, ``move``,
  ``ren``, ``if [/i] [not] errorlevel N|exist P|defined V|A==B|A EQU B ...`` with ``( ) else ( )``, ``call``,
  ``pushd``/``popd``, ``ver``, ``rem``, ``cls``/``title``/``setlocal``/``endlocal`` (no-ops at the command line).
  ``echo``, ``rem`` and groups leave ERRORLEVEL alone, ``del`` of a missing file too (as on Windows); the others
  set 0 on success and a non-zero code on failure.
* Built-in programs: ``hostname``, ``whoami`` (``winbuilder-emu\user``), ``timeout /t N [/nobreak]`` (sleeps),
  ``certutil [-f] -decode|-encode IN OUT``, ``certutil -hashfile F [ALG]`` and nested ``cmd [/s] /c LINE``.
* Batch files (``.cmd``/``.bat`` found by path, in the current directory or with PATHEXT): lines run in order with
  batch-mode ``%`` expansion (``%%``, ``%0``-``%9``, ``%*``, ``%~dpnx1``), ``@``, ``echo on/off``, labels,
  ``goto``, ``call :label``, ``exit /b``, ``shift`` and ``setlocal [EnableDelayedExpansion]``/``endlocal``
  (``!VAR!``). A batch started without ``call`` returns like ``call``.
* Not supported: ``for``, ``dir`` (the host's ``dir`` runs instead), ``set /p`` prompts beyond one line, per-drive
  current directories, 8.3 names, NTFS case-insensitivity.
* Anything else runs from the host ``PATH`` of the interpreter's own environment (``set PATH`` does not change
  the lookup), with a trailing ``.exe`` stripped (``tar.exe`` -> ``tar``; ``C:\Windows\System32\tar.exe`` ->
  ``tar``), arguments split with the MSVCRT rules, arguments that are drive paths (``C:\ws``, ``c:/x``,
  ``--opt=C:\x``) mapped into the sandbox, cwd = the mapped current directory, ``HOME`` = the mapped
  ``%USERPROFILE%`` and ``TMPDIR`` = the mapped ``%TEMP%``, in the interpreter's process group.
  ``powershell``, ``pwsh`` and programs not found print cmd's "'X' is not recognized as an internal or external
  command, ..." message and set 9009.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from winbuilder.emulator import paths

MAX_LINE = 8191
"""cmd.exe's maximum command line length in characters; longer lines are truncated."""
NOT_FOUND_CODE = 9009
"""ERRORLEVEL for an unknown command, as cmd.exe sets it."""
SYNTAX_ERROR_CODE = 255
"""Exit code of ``cmd /c`` after a syntax error."""
SIGTERM_CODE = 143
"""Exit code written when the interpreter is terminated by SIGTERM (128 + 15)."""
COMPUTER_NAME = "WINBUILDER-EMU"
WINDOWS_VERSION = os.environ.get("WINBUILDER_EMU_WINVER", "10.0.20348.2340")
"""Reported by ``ver`` (Windows Server 2022 by default; override with ``WINBUILDER_EMU_WINVER``)."""
UNAVAILABLE = frozenset({"powershell", "pwsh", "powershell_ise"})
"""Programs that are never found, even if the host has them."""

_NOT_RECOGNIZED = "'{}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
_NO_FILE = "The system cannot find the file specified.\r\n"
_NO_PATH = "The system cannot find the path specified.\r\n"
_SYNTAX = "The syntax of the command is incorrect.\r\n"
_DELIMS = " \t,;="
_CMD_SEPARATORS = " \t,;=./\\(+[]:"


# ---------------------------------------------------------------------------------------------------------------------
# Syntax tree


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


class _Exit(Exception):
    """``exit`` (``whole``: leave the process) or ``exit /b`` (leave the batch / the ``cmd /c``)."""

    def __init__(self, code: int, whole: bool) -> None:
        super().__init__(code)
        self.code = code
        self.whole = whole


class _Goto(Exception):
    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


# ---------------------------------------------------------------------------------------------------------------------
# Phase 2: parser


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


# ---------------------------------------------------------------------------------------------------------------------
# Shell state and phase 1 (percent expansion)


@dataclass
class Shell:
    """Mutable state of one interpreter: sandbox root, current directory, environment and ERRORLEVEL.

    Attributes:
        root: the sandbox directory holding the drive folders.
        cwd: the current Windows directory, fully qualified (``C:\\Users\\me``).
        env: environment, keyed by upper-cased name -> (name as set, value).
        errorlevel: ERRORLEVEL as a signed 32-bit integer (cmd's view of exit codes).
        host_path: the host ``PATH`` used to find programs.
        echo: batch ``echo on`` state.
        delayed: delayed expansion (``!VAR!``) enabled.
        dirstack: ``pushd`` stack.
    """

    root: Path
    cwd: str
    env: dict[str, tuple[str, str]]
    errorlevel: int = 0
    host_path: str = ""
    echo: bool = True
    delayed: bool = False
    dirstack: list[str] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The value of ``name`` (case-insensitive) or None."""
        item = self.env.get(name.upper())
        return None if item is None else item[1]

    def set(self, name: str, value: str) -> None:
        """Set ``name`` (keeping the spelling of an existing name), or unset it when ``value`` is empty."""
        key = name.upper()
        if value == "":
            self.env.pop(key, None)
        else:
            self.env[key] = (self.env[key][0] if key in self.env else name, value)

    def host(self, win_path: str) -> Path:
        """Map a Windows path (relative to ``cwd``) into the sandbox."""
        return paths.to_host(win_path, self.cwd, self.root)

    def copy(self) -> Shell:
        """An independent copy (for pipes and nested ``cmd /c``)."""
        return replace(self, env=dict(self.env), dirstack=list(self.dirstack))


def _signed32(code: int) -> int:
    code &= 0xFFFFFFFF
    return code - (1 << 32) if code & 0x80000000 else code


def _dynamic(name: str, shell: Shell) -> str | None:
    key = name.upper()
    if key == "CD":
        return shell.cwd
    if key == "ERRORLEVEL":
        return str(shell.errorlevel)
    if key == "RANDOM":
        import random

        return str(random.randint(0, 32767))
    if key == "DATE":
        return time.strftime("%a %m/%d/%Y")
    if key == "TIME":
        t = time.time()
        return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 100) % 100:02d}"
    if key == "CMDEXTVERSION":
        return "2"
    return None


def lookup(name: str, shell: Shell) -> str | None:
    """Value of ``%name%`` with cmd's ``:~start,len`` and ``:find=replace`` modifiers; None when undefined.

    Args:
        name: the text between the percent signs, e.g. ``"PATH"``, ``"X:~0,3"``, ``"X:a=b"``.
        shell: the shell whose environment (then dynamic variables) is consulted.
    """
    base, colon, mod = name.partition(":")
    value = shell.get(base)
    if value is None:
        value = _dynamic(base, shell)
    if value is None or not base:
        return None
    if not colon:
        return value
    if mod.startswith("~"):
        m = re.fullmatch(r"~\s*(-?\d*)\s*(?:,\s*(-?\d+))?\s*", mod)
        if m is None:
            return None
        start = int(m.group(1) or 0)
        if start < 0:
            start = max(len(value) + start, 0)
        if m.group(2) is None:
            return value[start:]
        length = int(m.group(2))
        end = start + length if length >= 0 else len(value) + length
        return value[start:end] if end > start else ""
    if "=" not in mod:
        return None
    find, _, repl = mod.partition("=")
    if find.startswith("*"):
        idx = value.lower().find(find[1:].lower()) if find[1:] else 0
        return value if idx < 0 else repl + value[idx + len(find) - 1 :]
    if not find:
        return value
    return re.sub(re.escape(find), lambda _m: repl, value, flags=re.IGNORECASE)


def expand(text: str, shell: Shell) -> str:
    """Phase 1 percent expansion in command-line mode: an undefined ``%X%`` stays literal, ``%%`` is not special.

    Args:
        text: the raw command line.
        shell: supplies variable values.

    Returns:
        The expanded line.
    """
    if "%" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("%", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        k = text.find("%", j + 1)
        if k < 0:
            out.append(text[j:])
            break
        value = lookup(text[j + 1 : k], shell)
        if value is None:
            out.append(text[j:k])
            i = k
        else:
            out.append(value)
            i = k + 1
    return "".join(out)


def expand_delayed(text: str, shell: Shell) -> str:
    """Phase 5 ``!VAR!`` expansion (only when delayed expansion is on); undefined variables become empty."""
    if not shell.delayed or "!" not in text:
        return text
    return re.sub(r"!([^!\r\n]*)!", lambda m: lookup(m.group(1), shell) or "", text).replace("!", "")


# ---------------------------------------------------------------------------------------------------------------------
# IO helpers


@dataclass(frozen=True)
class Streams:
    """File descriptors a command reads and writes."""

    stdin: int = 0
    stdout: int = 1
    stderr: int = 2


def _write(fd: int, text: str | bytes) -> None:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:  # a closed pipe or console: cmd carries on silently
        pass


def _is_nul(target: str) -> bool:
    name = target.strip().rstrip(":").lower()
    return name == "nul" or name.endswith(("\\nul", "/nul"))


class _RedirectError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@contextmanager
def _redirected(redirects: tuple[Redirect, ...], shell: Shell, io: Streams) -> Iterator[Streams]:
    """Apply redirections left to right; yields the resulting streams and closes opened files afterwards.

    Raises:
        _RedirectError: when a target cannot be opened, with cmd's message.
    """
    fds = {0: io.stdin, 1: io.stdout, 2: io.stderr}
    opened: list[int] = []
    try:
        for r in redirects:
            target = expand_delayed(r.target, shell)
            if r.op == ">&":
                fds[r.fd] = fds.get(int(target), int(target))
                continue
            host = os.devnull if _is_nul(target) else str(shell.host(target))
            if r.op == "<":
                flags = os.O_RDONLY
            elif r.op == ">>":
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            try:
                fd = os.open(host, flags, 0o666)
            except IsADirectoryError:
                raise _RedirectError("Access is denied.\r\n") from None
            except OSError:
                raise _RedirectError(_NO_FILE if r.op == "<" else _NO_PATH) from None
            opened.append(fd)
            fds[r.fd] = fd
        yield Streams(fds[0], fds[1], fds[2])
    finally:
        for fd in opened:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------------
# Executor


def execute(node: Node | None, shell: Shell, io: Streams) -> bool:
    """Run a syntax tree. Updates ``shell.errorlevel``; returns the success flag used by ``&&`` and ``||``.

    Raises:
        _Exit: on ``exit`` / ``exit /b`` (internal; ``run_line`` handles it).
    """
    if node is None:
        return True
    if isinstance(node, Binary):
        if node.op == "|":
            return _pipe(node, shell, io)
        ok = execute(node.left, shell, io)
        if node.op == "&" or (node.op == "&&") == ok:
            return execute(node.right, shell, io)
        return ok
    if isinstance(node, If):
        if _condition(node.cond, shell):
            return execute(node.then, shell, io)
        return execute(node.otherwise, shell, io) if node.otherwise is not None else True
    try:
        with _redirected(node.redirects, shell, io) as inner:
            if isinstance(node, Group):
                return execute(node.body, shell, inner)
            return _dispatch(expand_delayed(node.text, shell), shell, inner)
    except _RedirectError as exc:
        _write(io.stderr, exc.message)
        shell.errorlevel = 1
        return False


def _pipe(node: Binary, shell: Shell, io: Streams) -> bool:
    import threading

    r, w = os.pipe()
    left_shell, right_shell = shell.copy(), shell.copy()

    def left() -> None:
        try:
            execute(node.left, left_shell, Streams(io.stdin, w, io.stderr))
        except _Exit:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=left, daemon=True)
    t.start()
    try:
        ok = execute(node.right, right_shell, Streams(r, io.stdout, io.stderr))
    except _Exit as exc:
        right_shell.errorlevel = _signed32(exc.code)
        ok = exc.code == 0
    finally:
        os.close(r)
    t.join()
    shell.errorlevel = right_shell.errorlevel
    return ok


def _condition(cond: Condition, shell: Shell) -> bool:
    left = expand_delayed(cond.left, shell)
    if cond.kind == "errorlevel":
        try:
            result = shell.errorlevel >= int(left)
        except ValueError:
            result = False
    elif cond.kind == "exist":
        result = _exists(left.replace('"', ""), shell)
    elif cond.kind == "defined":
        result = shell.get(left) is not None
    else:
        right = expand_delayed(cond.right, shell)
        a, b = (left.lower(), right.lower()) if cond.ignore_case else (left, right)
        if cond.op == "==":
            result = a == b
        else:
            na, nb = _number(a), _number(b)
            both = na is not None and nb is not None
            result = _compare(cond.op, (na or 0, "") if both else (0, a), (nb or 0, "") if both else (0, b))
    return result != cond.negate


def _compare(op: str, x: tuple[int, str], y: tuple[int, str]) -> bool:
    return {"EQU": x == y, "NEQ": x != y, "LSS": x < y, "LEQ": x <= y, "GTR": x > y, "GEQ": x >= y}[op]


def _number(text: str) -> int | None:
    """cmd's numeric literal: decimal, ``0x`` hex or ``0`` octal, optional sign."""
    m = re.fullmatch(r"([+-]?)(0x[0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text.strip())
    if m is None:
        return None
    digits = m.group(2)
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8) if digits[0] == "0" else int(digits)
    return -value if m.group(1) == "-" else value


def _exists(win_path: str, shell: Shell) -> bool:
    if _is_nul(win_path):
        return True
    if any(ch in win_path for ch in "*?"):
        return bool(_glob(win_path, shell))
    try:
        return shell.host(win_path).exists()
    except ValueError:
        return False


def _glob(pattern: str, shell: Shell) -> list[Path]:
    """Case-insensitive wildcard match of the last path component (``*`` and ``?``)."""
    import fnmatch

    host = shell.host(pattern)
    try:
        names = os.listdir(host.parent)
    except OSError:
        return []
    rx = re.compile(fnmatch.translate(host.name), re.IGNORECASE)
    return sorted(host.parent / n for n in names if rx.match(n))


def _tokens(text: str) -> list[str]:
    """Split builtin arguments on cmd delimiters, keeping quoted parts together (quotes removed)."""
    return [t.replace('"', "") for t in re.findall(r'(?:"[^"]*"?|[^\s,;"]+)+', text)]


Builtin = Callable[[str, Shell, Streams], int | None]
"""An internal command: (argument text incl. separator, shell, streams) -> new ERRORLEVEL or None (unchanged)."""


def _dispatch(text: str, shell: Shell, io: Streams) -> bool:
    stripped = text.lstrip(" \t,;=@")
    if not stripped.strip():
        return True
    m = re.match(r"[A-Za-z]+", stripped)
    if m is not None:
        name = m.group(0).lower()
        rest = stripped[m.end() :]
        builtin = _INTERNAL.get(name)
        if builtin is not None and (not rest or rest[0] in _CMD_SEPARATORS):
            try:
                code = builtin(rest, shell, io)
            except OSError:
                _write(io.stderr, "Access is denied.\r\n")
                code = 5
            if code is None:
                return True
            shell.errorlevel = _signed32(code)
            return code == 0
    code = _run_program(stripped, shell, io)
    shell.errorlevel = _signed32(code)
    return code == 0


def split_args(cmdline: str) -> list[str]:
    """Split a Windows command line like the Microsoft C runtime (``CommandLineToArgvW`` rules).

    The program name ends at the first whitespace outside quotes; for the other arguments ``2n`` backslashes plus
    ``"`` give ``n`` backslashes and toggle quoting, ``2n+1`` give ``n`` backslashes and a literal quote, and ``""``
    inside quotes is a literal quote.

    Args:
        cmdline: the full command line including the program.

    Returns:
        argv, e.g. ``["tar", "-C", "C:\\my ws"]`` for ``tar -C "C:\\my ws"``.
    """
    s = cmdline.lstrip(" \t")
    n = len(s)
    i = 0
    buf: list[str] = []
    quoted = False
    while i < n and (quoted or s[i] not in " \t"):
        if s[i] == '"':
            quoted = not quoted
        else:
            buf.append(s[i])
        i += 1
    args = ["".join(buf)]
    while True:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            return args
        buf = []
        quoted = False
        while i < n and (quoted or s[i] not in " \t"):
            c = s[i]
            if c == "\\":
                j = i
                while j < n and s[j] == "\\":
                    j += 1
                if j < n and s[j] == '"':
                    buf.append("\\" * ((j - i) // 2))
                    if (j - i) % 2:
                        buf.append('"')
                        j += 1
                else:
                    buf.append("\\" * (j - i))
                i = j
            elif c == '"':
                if quoted and i + 1 < n and s[i + 1] == '"':
                    buf.append('"')
                    i += 2
                else:
                    quoted = not quoted
                    i += 1
            else:
                buf.append(c)
                i += 1
        args.append("".join(buf))


def _after_program(text: str) -> str:
    """The raw text after the program name (which ends at whitespace outside quotes)."""
    s = text.lstrip(" \t")
    quoted = False
    for i, c in enumerate(s):
        if c == '"':
            quoted = not quoted
        elif c in " \t" and not quoted:
            return s[i:]
    return ""


def _map_arg(arg: str, shell: Shell) -> str:
    if paths.is_drive_path(arg):
        return str(shell.host(arg))
    key, eq, value = arg.partition("=")
    if eq and paths.is_drive_path(value):
        return key + "=" + str(shell.host(value))
    return arg


def _find(name: str, shell: Shell) -> tuple[str, Path | None]:
    """Resolve a program name: ("batch", path), ("builtin:<name>", None), ("exe", path) or ("", None)."""
    base = name
    if any(sep in name for sep in "\\/:"):
        try:
            host = shell.host(name)
        except ValueError:
            host = None
        if host is not None:
            for cand in (host, host.with_name(host.name + ".cmd"), host.with_name(host.name + ".bat")):
                if cand.is_file():
                    if cand.suffix.lower() in (".cmd", ".bat"):
                        return "batch", cand
                    if os.access(cand, os.X_OK):
                        return "exe", cand
        base = re.split(r"[\\/:]", name)[-1]
    lower = base.lower()
    if lower.endswith((".cmd", ".bat")) or "." not in lower:
        here = shell.host(base)
        for cand in (here, here.with_name(here.name + ".cmd"), here.with_name(here.name + ".bat")):
            if cand.suffix.lower() in (".cmd", ".bat") and cand.is_file():
                return "batch", cand
    if lower.endswith(".exe"):
        lower = lower[:-4]
        base = base[:-4]
    if not lower or lower in UNAVAILABLE:
        return "", None
    if lower in _PROGRAMS:
        return "builtin:" + lower, None
    import shutil

    for cand_name in dict.fromkeys((base, lower)):
        found = shutil.which(cand_name, path=shell.host_path)
        if found:
            return "exe", Path(found)
    return "", None


_CHILDREN: set[int] = set()
"""Pids of the running child programs (subprocess is imported on first use: built-in-only lines start faster)."""


def _run_program(text: str, shell: Shell, io: Streams) -> int:
    argv = split_args(text)
    kind, where = _find(argv[0], shell)
    if kind.startswith("builtin:"):
        return _PROGRAMS[kind[8:]](argv[1:], _after_program(text), shell, io)
    if kind == "batch" and where is not None:
        return run_batch(where, argv[0], _after_program(text), shell, io)
    if where is None:
        _write(io.stderr, _NOT_RECOGNIZED.format(argv[0]))
        return NOT_FOUND_CODE
    import subprocess

    env = {name: value for name, value in shell.env.values()}
    env["PATH"] = shell.host_path
    for var, unix in (("USERPROFILE", "HOME"), ("TEMP", "TMPDIR")):
        value = shell.get(var)
        if value and paths.is_drive_path(value):
            env[unix] = str(shell.host(value))
    try:
        cwd = shell.host(shell.cwd)
        proc = subprocess.Popen(
            [str(where), *(_map_arg(a, shell) for a in argv[1:])],
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            cwd=cwd,
            env=env,
        )
    except OSError:
        _write(io.stderr, _NOT_RECOGNIZED.format(argv[0]))
        return NOT_FOUND_CODE
    _CHILDREN.add(proc.pid)
    try:
        rc = proc.wait()
    finally:
        _CHILDREN.discard(proc.pid)
    return 1 if rc < 0 else rc


# ---------------------------------------------------------------------------------------------------------------------
# Internal commands


def _echo(rest: str, shell: Shell, io: Streams) -> int | None:
    if not rest or (rest[0] in _DELIMS and not rest[1:].strip()):
        _write(io.stdout, f"ECHO is {'on' if shell.echo else 'off'}.\r\n")
        return None
    body = rest[1:] if rest[0] in _CMD_SEPARATORS else rest
    if rest[0] in _DELIMS and body.strip().lower() in ("on", "off"):
        shell.echo = body.strip().lower() == "on"
        return None
    _write(io.stdout, body + "\r\n")
    return None


def _cd(rest: str, shell: Shell, io: Streams) -> int:
    arg = rest.strip(_DELIMS)
    switch = False
    m = re.match(r"/d(?:[\s,;=]+|$)", arg, re.IGNORECASE)
    if m is not None:
        switch = True
        arg = arg[m.end() :]
    arg = arg.replace('"', "").rstrip(" \t")
    if not arg:
        _write(io.stdout, shell.cwd + "\r\n")
        return 0
    if re.fullmatch(r"[A-Za-z]:", arg) and not switch:
        _write(io.stdout, (shell.cwd if arg[0].upper() == shell.cwd[0] else arg.upper() + "\\") + "\r\n")
        return 0
    target = paths.normalize(arg, shell.cwd)
    host = shell.host(target)
    if not host.is_dir():
        _write(io.stderr, "The directory name is invalid.\r\n" if host.exists() else _NO_PATH)
        return 1
    if switch or target[0] == shell.cwd[0]:
        shell.cwd = target
    return 0


def _md(rest: str, shell: Shell, io: Streams) -> int:
    names = _tokens(rest)
    if not names:
        _write(io.stderr, _SYNTAX)
        return 1
    code = 0
    for name in names:
        host = shell.host(name)
        if host.exists():
            _write(io.stderr, f"A subdirectory or file {name} already exists.\r\n")
            code = 1
            continue
        try:
            host.mkdir(parents=True)
        except OSError:
            _write(io.stderr, _NO_PATH)
            code = 1
    return code


def _type(rest: str, shell: Shell, io: Streams) -> int:
    names = _tokens(rest)
    if not names:
        _write(io.stderr, _SYNTAX)
        return 1
    code = 0
    for name in names:
        matches = _glob(name, shell) if any(c in name for c in "*?") else [shell.host(name)]
        if not matches or not matches[0].exists():
            _write(io.stderr, _NO_FILE)
            code = 1
            continue
        for host in matches:
            if len(names) > 1 or len(matches) > 1:
                _write(io.stderr, f"\r\n{host.name}\r\n\r\n\r\n")
            try:
                with open(host, "rb") as f:
                    while chunk := f.read(65536):
                        _write(io.stdout, chunk)
            except IsADirectoryError:
                _write(io.stderr, "Access is denied.\r\n")
                code = 1
            except OSError:
                _write(io.stderr, _NO_FILE)
                code = 1
    return code


def _set(rest: str, shell: Shell, io: Streams) -> int:
    arg = rest[1:] if rest[:1] in _CMD_SEPARATORS else rest
    arg = arg.lstrip(" \t")
    m = re.match(r"/a(?:\s+|$)", arg, re.IGNORECASE)
    if m is not None:
        return _set_a(arg[m.end() :], shell, io)
    m = re.match(r"/p(?:\s+|$)", arg, re.IGNORECASE)
    if m is not None:
        return _set_p(arg[m.end() :], shell, io)
    if arg.startswith('"'):
        end = arg.rfind('"')
        arg = arg[1:end] if end > 0 else arg[1:]
    if "=" not in arg:
        prefix = arg.strip().upper()
        items = sorted((k, n, v) for k, (n, v) in shell.env.items() if k.startswith(prefix))
        if not items:
            _write(io.stderr, f"Environment variable {arg.strip()} not defined\r\n")
            return 1
        _write(io.stdout, "".join(f"{n}={v}\r\n" for _k, n, v in items))
        return 0
    name, _, value = arg.partition("=")
    if not name:
        _write(io.stderr, _SYNTAX)
        return 1
    if not value and shell.get(name) is None:
        return 1
    shell.set(name, value)
    return 0


def _set_p(arg: str, shell: Shell, io: Streams) -> int:
    name, _, prompt = arg.partition("=")
    _write(io.stdout, prompt)
    data = bytearray()
    while True:
        b = os.read(io.stdin, 1)
        if not b or b == b"\n":
            break
        data += b
    line = data.decode("utf-8", "surrogateescape").rstrip("\r")
    if not line:
        return 1
    shell.set(name, line)
    return 0


def _set_a(expr: str, shell: Shell, io: Streams) -> int:
    try:
        value = _Arith(expr.replace('"', ""), shell).run()
    except ZeroDivisionError:
        _write(io.stderr, "Divide by zero error.\r\n")
        return 1073750993
    except (ArithmeticError, ValueError, IndexError):
        _write(io.stderr, "Missing operand.\r\n")
        return 1
    if not _IN_BATCH:
        _write(io.stdout, str(value))
    return 0


class _Arith:
    """``set /a``: integers (decimal/hex/octal), variables, ``( )``, unary ``- + ! ~``, ``* / %``, ``+ -``,
    ``<< >>``, ``&``, ``^``, ``|``, assignments ``= += -= *= /= %=`` and ``,`` (32-bit signed results)."""

    _BINARY: list[tuple[str, ...]] = [("|",), ("^",), ("&",), ("<<", ">>"), ("+", "-"), ("*", "/", "%")]

    def __init__(self, text: str, shell: Shell) -> None:
        self.toks = re.findall(r"0x[0-9a-fA-F]+|\d+|[A-Za-z_$#@.][\w$#@.]*|<<=|>>=|<<|>>|[-+*/%&|^]=|\S", text)
        self.i = 0
        self.shell = shell

    def run(self) -> int:
        value = self.assign()
        while self.i < len(self.toks) and self.toks[self.i] == ",":
            self.i += 1
            value = self.assign()
        if self.i != len(self.toks):
            raise ValueError("trailing tokens")
        return value

    def assign(self) -> int:
        tok = self.toks[self.i]
        nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else ""
        if re.fullmatch(r"[A-Za-z_$#@.][\w$#@.]*", tok) and nxt.endswith("=") and nxt not in ("==",):
            self.i += 2
            value = self.assign()
            if nxt != "=":
                value = self.apply(nxt[:-1], self.var(tok), value)
            self.shell.set(tok, str(value))
            return value
        return self.binary(0)

    def binary(self, level: int) -> int:
        if level == len(self._BINARY):
            return self.unary()
        value = self.binary(level + 1)
        while self.i < len(self.toks) and self.toks[self.i] in self._BINARY[level]:
            op = self.toks[self.i]
            self.i += 1
            value = self.apply(op, value, self.binary(level + 1))
        return value

    def unary(self) -> int:
        tok = self.toks[self.i]
        self.i += 1
        if tok in ("-", "+", "!", "~"):
            v = self.unary()
            return _signed32({"-": -v, "+": v, "!": int(v == 0), "~": ~v}[tok])
        if tok == "(":
            v = self.assign()
            while self.toks[self.i] == ",":
                self.i += 1
                v = self.assign()
            if self.toks[self.i] != ")":
                raise ValueError("missing )")
            self.i += 1
            return v
        num = _number(tok)
        if num is not None:
            return _signed32(num)
        if re.fullmatch(r"[A-Za-z_$#@.][\w$#@.]*", tok):
            return self.var(tok)
        raise ValueError("bad operand")

    def var(self, name: str) -> int:
        return _signed32(_number(self.shell.get(name) or "0") or 0)

    @staticmethod
    def apply(op: str, a: int, b: int) -> int:
        if op in ("/", "%") and b == 0:
            raise ZeroDivisionError
        result = {
            "+": lambda: a + b,
            "-": lambda: a - b,
            "*": lambda: a * b,
            "/": lambda: int(a / b),
            "%": lambda: a - int(a / b) * b,
            "&": lambda: a & b,
            "|": lambda: a | b,
            "^": lambda: a ^ b,
            "<<": lambda: a << (b & 31),
            ">>": lambda: a >> (b & 31),
        }[op]()
        return _signed32(result)


def _exit(rest: str, shell: Shell, io: Streams) -> int:
    args = _tokens(rest)
    whole = True
    if args and args[0].lower() == "/b":
        whole = False
        args = args[1:]
    code = shell.errorlevel
    if args:
        m = re.match(r"[+-]?\d+", args[0])
        code = int(m.group(0)) if m else 0
    raise _Exit(code & 0xFFFFFFFF, whole)


def _del(rest: str, shell: Shell, io: Streams) -> int | None:
    names = [t for t in _tokens(rest) if not t.startswith("/")]
    if not names:
        _write(io.stderr, _SYNTAX)
        return 1
    for name in names:
        host = shell.host(name)
        matches = _glob(name, shell) if any(c in name for c in "*?") else [host] if host.exists() else []
        if host.is_dir():
            matches = [p for p in host.iterdir()]
        files = [p for p in matches if p.is_file() or p.is_symlink()]
        if not files and not host.is_dir():
            _write(io.stderr, f"Could Not Find {paths.to_windows(host, shell.root)}\r\n")
        for p in files:
            try:
                p.unlink()
            except OSError:
                _write(io.stderr, f"{paths.to_windows(p, shell.root)}\r\nAccess is denied.\r\n")
    return None


def _rd(rest: str, shell: Shell, io: Streams) -> int:
    tokens = _tokens(rest)
    recurse = any(t.lower() == "/s" for t in tokens)
    names = [t for t in tokens if not t.startswith("/")]
    if not names:
        _write(io.stderr, _SYNTAX)
        return 1
    code = 0
    for name in names:
        host = shell.host(name)
        if not host.exists():
            _write(io.stderr, _NO_FILE)
            code = 2
        elif not host.is_dir():
            _write(io.stderr, "The directory name is invalid.\r\n")
            code = 267
        elif shell.host(shell.cwd) == host or host in shell.host(shell.cwd).parents:
            _write(io.stderr, "The process cannot access the file because it is being used by another process.\r\n")
            code = 32
        elif recurse:
            import shutil

            shutil.rmtree(host, ignore_errors=True)
        else:
            try:
                host.rmdir()
            except OSError:
                _write(io.stderr, "The directory is not empty.\r\n")
                code = 145
    return code


def _copy_or_move(rest: str, shell: Shell, io: Streams, move: bool) -> int:
    names = [t for t in _tokens(rest) if not t.startswith("/")]
    verb = "moved" if move else "copied"
    if not names or len(names) > 2:
        _write(io.stderr, _SYNTAX)
        return 1
    src = names[0]
    dst = shell.host(names[1] if len(names) > 1 else ".")
    sources = _glob(src, shell) if any(c in src for c in "*?") else [shell.host(src)]
    sources = [p for p in sources if p.exists() and (move or p.is_file())]
    if not sources and shell.host(src).is_dir() and not move:
        sources = [p for p in shell.host(src).iterdir() if p.is_file()]
    if not sources:
        _write(io.stderr, _NO_FILE)
        if not move:
            _write(io.stdout, f"        0 file(s) {verb}.\r\n")
        return 1
    import shutil

    done = 0
    for p in sources:
        target = dst / p.name if dst.is_dir() else dst
        try:
            if move:
                os.replace(p, target)
            else:
                shutil.copyfile(p, target)
            done += 1
        except OSError:
            _write(io.stderr, "Access is denied.\r\n")
    _write(io.stdout, f"        {done} file(s) {verb}.\r\n")
    return 0 if done == len(sources) else 1


def _ren(rest: str, shell: Shell, io: Streams) -> int:
    names = _tokens(rest)
    if len(names) != 2 or re.search(r"[\\/:]", names[1]):
        _write(io.stderr, _SYNTAX)
        return 1
    src = shell.host(names[0])
    if not src.exists():
        _write(io.stderr, _NO_FILE)
        return 1
    target = src.with_name(names[1])
    if target.exists():
        _write(io.stderr, "A duplicate file name exists, or the file\r\ncannot be found.\r\n")
        return 1
    os.rename(src, target)
    return 0


def _ver(rest: str, shell: Shell, io: Streams) -> int:
    _write(io.stdout, f"\r\nMicrosoft Windows [Version {WINDOWS_VERSION}]\r\n")
    return 0


def _noop(rest: str, shell: Shell, io: Streams) -> int:
    return 0


def _rem(rest: str, shell: Shell, io: Streams) -> None:
    return None


def _call(rest: str, shell: Shell, io: Streams) -> int | None:
    line = rest[1:] if rest[:1] in _DELIMS else rest
    if line.lstrip().startswith(":") and _BATCH_STACK:
        label, _, args = line.lstrip()[1:].partition(" ")
        return _BATCH_STACK[-1].call_label(label, args, shell, io)
    expanded = _BATCH_STACK[-1].expand(line, shell) if _BATCH_STACK else expand(line, shell)
    try:
        node = parse(expanded)
    except CmdSyntaxError as exc:
        _write(io.stderr, str(exc) + "\r\n")
        return SYNTAX_ERROR_CODE
    execute(node, shell, io)
    return shell.errorlevel


def _pushd(rest: str, shell: Shell, io: Streams) -> int:
    arg = rest.strip(_DELIMS).replace('"', "")
    if not arg:
        return 0
    target = paths.normalize(arg, shell.cwd)
    if not shell.host(target).is_dir():
        _write(io.stderr, _NO_PATH)
        return 1
    shell.dirstack.append(shell.cwd)
    shell.cwd = target
    return 0


def _popd(rest: str, shell: Shell, io: Streams) -> int:
    if shell.dirstack:
        shell.cwd = shell.dirstack.pop()
    return 0


def _setlocal(rest: str, shell: Shell, io: Streams) -> int:
    if _BATCH_STACK:
        _BATCH_STACK[-1].saved.append((dict(shell.env), shell.cwd, shell.delayed))
        words = rest.lower().split()
        if "enabledelayedexpansion" in words:
            shell.delayed = True
        elif "disabledelayedexpansion" in words:
            shell.delayed = False
    return 0


def _endlocal(rest: str, shell: Shell, io: Streams) -> int:
    if _BATCH_STACK and _BATCH_STACK[-1].saved:
        shell.env, shell.cwd, shell.delayed = _BATCH_STACK[-1].saved.pop()
    return 0


def _goto(rest: str, shell: Shell, io: Streams) -> int:
    label = rest.strip(_DELIMS).lstrip(":").split()
    if not _BATCH_STACK or not label:
        return 1
    raise _Goto(label[0])


def _shift(rest: str, shell: Shell, io: Streams) -> int:
    if _BATCH_STACK and _BATCH_STACK[-1].args:
        _BATCH_STACK[-1].args.pop(0)
    return 0


_INTERNAL: dict[str, Builtin] = {
    "echo": _echo,
    "cd": _cd,
    "chdir": _cd,
    "md": _md,
    "mkdir": _md,
    "type": _type,
    "set": _set,
    "exit": _exit,
    "del": _del,
    "erase": _del,
    "rd": _rd,
    "rmdir": _rd,
    "copy": lambda r, s, i: _copy_or_move(r, s, i, move=False),
    "move": lambda r, s, i: _copy_or_move(r, s, i, move=True),
    "ren": _ren,
    "rename": _ren,
    "ver": _ver,
    "rem": _rem,
    "call": _call,
    "pushd": _pushd,
    "popd": _popd,
    "cls": _noop,
    "title": _noop,
    "setlocal": _setlocal,
    "endlocal": _endlocal,
    "goto": _goto,
    "shift": _shift,
}


# ---------------------------------------------------------------------------------------------------------------------
# Built-in programs (what would be .exe files in System32)

Program = Callable[[list[str], str, Shell, Streams], int]
"""A built-in program: (argv without the name, raw argument text, shell, streams) -> exit code."""


def _hostname(argv: list[str], raw: str, shell: Shell, io: Streams) -> int:
    _write(io.stdout, (shell.get("COMPUTERNAME") or COMPUTER_NAME) + "\r\n")
    return 0


def _whoami(argv: list[str], raw: str, shell: Shell, io: Streams) -> int:
    user = shell.get("USERNAME") or "user"
    _write(io.stdout, f"{(shell.get('COMPUTERNAME') or COMPUTER_NAME).lower()}\\{user.lower()}\r\n")
    return 0


def _timeout(argv: list[str], raw: str, shell: Shell, io: Streams) -> int:
    seconds: int | None = None
    nobreak = False
    it = iter(argv)
    for a in it:
        if a.lower() == "/t":
            seconds = _number(next(it, ""))
        elif a.lower() == "/nobreak":
            nobreak = True
        elif _number(a) is not None and seconds is None:
            seconds = _number(a)
    if seconds is None or not -1 <= seconds <= 99999:
        _write(io.stderr, "ERROR: Invalid value for timeout (/T) specified. Valid range is -1 to 99999.\r\n")
        return 1
    tail = "press CTRL+C to quit ..." if nobreak else "press a key to continue ..."
    _write(io.stdout, f"\r\nWaiting for {seconds} seconds, {tail}")
    while seconds < 0:
        signal.pause()
    time.sleep(seconds)
    _write(io.stdout, "\r\n")
    return 0


_CERTUTIL_FAILED = "CertUtil: -{verb} command FAILED: {hr:#010x} ({text})\r\nCertUtil: {msg}\r\n"


def _certutil(argv: list[str], raw: str, shell: Shell, io: Streams) -> int:
    force = any(a.lower() in ("-f", "/f") for a in argv)
    args = [a for a in argv if a.lower() not in ("-f", "/f", "-v", "/v")]
    verb = args[0].lower().lstrip("-/") if args else ""
    if verb in ("decode", "encode") and len(args) == 3:
        import base64

        src, dst = shell.host(args[1]), shell.host(args[2])
        try:
            data = src.read_bytes()
        except OSError:
            return _certutil_fail(io, verb, 0x80070002, "WIN32: 2 ERROR_FILE_NOT_FOUND", _NO_FILE.strip())
        if dst.exists() and not force:
            return _certutil_fail(io, verb, 0x80070050, "WIN32: 80 ERROR_FILE_EXISTS", "The file exists.")
        if verb == "decode":
            lines = [ln for ln in data.splitlines() if not ln.strip().startswith(b"-----")]
            try:
                out = base64.b64decode(b"".join(b"".join(ln.split()) for ln in lines), validate=True)
            except ValueError:
                return _certutil_fail(io, verb, 0x80090005, "NTE_BAD_DATA", "Bad Data.")
        else:
            b64 = base64.b64encode(data)
            body = b"".join(b64[i : i + 64] + b"\r\n" for i in range(0, len(b64), 64))
            out = b"-----BEGIN CERTIFICATE-----\r\n" + body + b"-----END CERTIFICATE-----\r\n"
        try:
            dst.write_bytes(out)
        except OSError:
            return _certutil_fail(io, verb, 0x80070003, "WIN32: 3 ERROR_PATH_NOT_FOUND", _NO_PATH.strip())
        _write(io.stdout, f"Input Length = {len(data)}\r\nOutput Length = {len(out)}\r\n"
                          f"CertUtil: -{verb} command completed successfully.\r\n")
        return 0
    if verb == "hashfile" and len(args) in (2, 3):
        import hashlib

        alg = args[2].upper() if len(args) == 3 else "SHA1"
        if alg.lower() not in ("md5", "sha1", "sha256", "sha384", "sha512"):
            return _certutil_fail(io, verb, 0x80090008, "NTE_BAD_ALGID", "Invalid algorithm specified.")
        try:
            digest = hashlib.new(alg.lower(), shell.host(args[1]).read_bytes()).hexdigest()
        except OSError:
            return _certutil_fail(io, verb, 0x80070002, "WIN32: 2 ERROR_FILE_NOT_FOUND", _NO_FILE.strip())
        _write(io.stdout, f"{alg} hash of {args[1]}:\r\n{digest}\r\n"
                          "CertUtil: -hashfile command completed successfully.\r\n")
        return 0
    _write(io.stdout, "CertUtil: Unknown arg: " + (args[0] if args else "") + "\r\n")
    return 0x80070057


def _certutil_fail(io: Streams, verb: str, hr: int, text: str, msg: str) -> int:
    _write(io.stdout, _CERTUTIL_FAILED.format(verb=verb, hr=hr, text=text, msg=msg))
    return hr


def _cmd(argv: list[str], raw: str, shell: Shell, io: Streams) -> int:
    m = re.search(r"/[ck](?=\s|$|\")", raw, re.IGNORECASE)
    if m is None:
        return 0
    switches = raw[: m.start()].lower()
    line = raw[m.end() :].lstrip(" \t")
    line = strip_slash_c_quotes(line, "/s" in switches, lambda name: _find(name, shell)[0] != "")
    nested = shell.copy()
    nested.echo = True
    return run_line(line, nested, io, _nested=True)


_PROGRAMS: dict[str, Program] = {
    "hostname": _hostname,
    "whoami": _whoami,
    "timeout": _timeout,
    "certutil": _certutil,
    "cmd": _cmd,
}


def strip_slash_c_quotes(line: str, s_switch: bool, is_program: Callable[[str], bool]) -> str:
    """Apply cmd.exe's ``/c`` quote rule to the text after ``/c`` (from ``cmd /?``).

    Quotes are kept when there is no ``/s``, exactly two quotes, no ``&<>()@^|`` between them, whitespace between
    them, and the quoted string names a program. Otherwise a leading quote and the last quote are removed.

    Args:
        line: the text after ``/c``.
        s_switch: whether ``/s`` was given.
        is_program: tells whether a string names a runnable program.

    Returns:
        The command line cmd.exe runs.
    """
    if not line.startswith('"'):
        return line
    if not s_switch and line.count('"') == 2:
        inner = line[1 : line.index('"', 1)]
        if not any(c in inner for c in "&<>()@^|") and re.search(r"\s", inner) and is_program(inner):
            return line
    last = line.rfind('"')
    return line[1:last] + line[last + 1 :] if last > 0 else line[1:]


# ---------------------------------------------------------------------------------------------------------------------
# Batch files

_IN_BATCH = False


@dataclass
class _Batch:
    """One running batch file: its lines, arguments and ``setlocal`` stack."""

    path: Path
    name: str
    args: list[str]
    lines: list[str]
    saved: list[tuple[dict[str, tuple[str, str]], str, bool]] = field(default_factory=list)

    def arg(self, n: int, mods: str, shell: Shell) -> str:
        value = self.name if n == 0 else (self.args[n - 1] if n - 1 < len(self.args) else "")
        if not mods:
            return value
        bare = value.replace('"', "")
        if mods == "~":
            return bare
        full = paths.normalize(bare, shell.cwd) if bare else ""
        if n == 0:
            full = paths.to_windows(self.path, shell.root)
        drive, _, tail = full.partition("\\")
        folder, _, leaf = ("\\" + tail).rpartition("\\")
        stem, dot, ext = leaf.rpartition(".")
        if not dot:
            stem, ext = leaf, ""
        if "f" in mods:
            return full
        parts = {"d": drive, "p": folder + "\\", "n": stem, "x": dot + ext}
        return "".join(parts[c] for c in "dpnx" if c in mods)

    def expand(self, text: str, shell: Shell) -> str:
        """Phase 1 in batch mode: ``%%`` -> ``%``, arguments, undefined variables become empty."""

        def sub(m: re.Match[str]) -> str:
            tok = m.group(0)
            if tok == "%%":
                return "%"
            if tok == "%*":
                return " ".join(self.args)
            if m.group(2) is not None:
                return self.arg(int(m.group(2)), m.group(1) or "", shell)
            if m.group(3) is not None:
                return lookup(m.group(3), shell) or ""
            return ""

        return re.sub(r"%%|%\*|%(~[fdpnx]*)?([0-9])|%([^%\r\n]+)%|%", sub, text)

    def call_label(self, label: str, args: str, shell: Shell, io: Streams) -> int:
        sub = _Batch(self.path, self.name, _tokens_quoted(args), self.lines)
        return _run_batch_lines(sub, self._find_label(label, io), shell, io)

    def _find_label(self, label: str, io: Streams) -> int:
        if label.lower() == "eof":
            return len(self.lines)
        for i, line in enumerate(self.lines):
            m = re.match(r"\s*:(\S+)", line)
            if m and m.group(1).lower() == label.lower():
                return i + 1
        _write(io.stderr, f"The system cannot find the batch label specified - {label}\r\n")
        raise _Exit(1, whole=False)


_BATCH_STACK: list[_Batch] = []


def _tokens_quoted(text: str) -> list[str]:
    return re.findall(r'(?:"[^"]*"?|[^\s,;="]+)+', text)


def run_batch(path: Path, name: str, args: str, shell: Shell, io: Streams) -> int:
    """Run a ``.cmd``/``.bat`` file (the documented batch subset) and return its ERRORLEVEL.

    Args:
        path: host path of the batch file.
        name: the name as invoked (``%0``).
        args: the raw argument text (split with cmd's batch rules: delimiters outside quotes, quotes kept).
        shell: the shell; batch changes to the environment and directory persist, as in cmd.
        io: streams.

    Raises:
        _Exit: when the batch runs ``exit`` without ``/b``.
    """
    data = path.read_bytes().decode("utf-8", "surrogateescape")
    batch = _Batch(path, name, _tokens_quoted(args), data.replace("\r\n", "\n").split("\n"))
    return _run_batch_lines(batch, 0, shell, io)


def _run_batch_lines(batch: _Batch, start: int, shell: Shell, io: Streams) -> int:
    global _IN_BATCH
    was_in_batch, was_echo = _IN_BATCH, shell.echo
    _IN_BATCH = True
    _BATCH_STACK.append(batch)
    depth_saved = len(batch.saved)
    i = start
    try:
        while i < len(batch.lines):
            line = batch.lines[i]
            i += 1
            while _paren_depth(line) > 0 and i < len(batch.lines):
                line += "\n" + batch.lines[i]
                i += 1
            stripped = line.strip()
            if not stripped or stripped.startswith(":"):
                continue
            expanded = batch.expand(line, shell)
            if shell.echo and not expanded.lstrip().startswith("@"):
                _write(io.stdout, f"\r\n{shell.cwd}>{expanded.strip()}\r\n")
            try:
                execute(parse(expanded), shell, io)
            except CmdSyntaxError as exc:
                _write(io.stderr, str(exc) + "\r\n")
                shell.errorlevel = _signed32(SYNTAX_ERROR_CODE)
                break
            except _Goto as g:
                i = batch._find_label(g.label, io)
    except _Exit as exc:
        if exc.whole:
            raise
        shell.errorlevel = _signed32(exc.code)
    finally:
        _BATCH_STACK.pop()
        _IN_BATCH = was_in_batch
        while len(batch.saved) > depth_saved:
            shell.env, shell.cwd, shell.delayed = batch.saved.pop()
        shell.echo = was_echo if _BATCH_STACK == [] else shell.echo
    return shell.errorlevel & 0xFFFFFFFF


def _paren_depth(line: str) -> int:
    depth = 0
    quoted = False
    escaped = False
    for c in line:
        if escaped:
            escaped = False
        elif c == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif c == "^":
            escaped = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth > 0:
            depth -= 1
    return depth


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def run_line(line: str, shell: Shell, io: Streams, _nested: bool = False) -> int:
    """Run one command line like ``cmd.exe /c LINE`` and return cmd's exit code (unsigned 32-bit).

    Args:
        line: the command line (truncated to ``MAX_LINE`` characters here).
        shell: the state to run in (mutated).
        io: the streams commands use.

    Returns:
        The exit code, 0..0xFFFFFFFF.

    ``exit`` and ``exit /b`` both end the line (as in ``cmd /c``) with their code.
    """
    line = line[:MAX_LINE]
    try:
        node = parse(expand(line, shell))
    except CmdSyntaxError as exc:
        _write(io.stderr, str(exc) + "\r\n")
        return SYNTAX_ERROR_CODE
    try:
        execute(node, shell, io)
    except _Exit as exc:
        return exc.code & 0xFFFFFFFF
    return shell.errorlevel & 0xFFFFFFFF


def make_shell(root: Path, user: str, cwd: str | None = None, environ: dict[str, str] | None = None) -> Shell:
    """Build the initial shell state and create the user's profile and temp directories in the sandbox.

    Args:
        root: the sandbox directory.
        user: the Windows user name (``%USERNAME%``).
        cwd: the initial Windows directory; default ``C:\\Users\\<user>``.
        environ: the base environment; default ``os.environ``.

    Returns:
        The shell, ERRORLEVEL 0.
    """
    base = dict(os.environ if environ is None else environ)
    profile = paths.default_cwd(user)
    temp = profile + "\\AppData\\Local\\Temp"
    windows = {
        "USERNAME": user,
        "USERPROFILE": profile,
        "USERDOMAIN": COMPUTER_NAME,
        "COMPUTERNAME": COMPUTER_NAME,
        "HOMEDRIVE": "C:",
        "HOMEPATH": profile[2:],
        "SystemRoot": "C:\\Windows",
        "windir": "C:\\Windows",
        "SystemDrive": "C:",
        "ComSpec": "C:\\Windows\\system32\\cmd.exe",
        "TEMP": temp,
        "TMP": temp,
        "APPDATA": profile + "\\AppData\\Roaming",
        "LOCALAPPDATA": profile + "\\AppData\\Local",
        "ProgramData": "C:\\ProgramData",
        "ProgramFiles": "C:\\Program Files",
        "OS": "Windows_NT",
        "PATHEXT": ".COM;.EXE;.BAT;.CMD;.VBS;.VBE;.JS;.JSE;.WSF;.WSH;.MSC",
        "PROCESSOR_ARCHITECTURE": "AMD64",
        "NUMBER_OF_PROCESSORS": str(os.cpu_count() or 1),
        "PROMPT": "$P$G",
    }
    env: dict[str, tuple[str, str]] = {k.upper(): (k, v) for k, v in base.items()}
    env.update({k.upper(): (k, v) for k, v in windows.items()})
    shell = Shell(root=root, cwd=paths.normalize(cwd or profile, "C:\\"), env=env,
                  host_path=base.get("PATH", os.defpath))
    for d in (shell.cwd, temp, "C:\\Windows\\Temp"):
        shell.host(d).mkdir(parents=True, exist_ok=True)
    return shell


def _kill_children(deadline_s: float = 2.0) -> None:
    """SIGKILL every child: the whole process group when we lead it, else the children we started.

    The group is scanned (``/proc``) until only zombies remain or ``deadline_s`` seconds pass, because a member
    that is being killed can still be completing a ``fork``.
    """
    me = os.getpid()
    for pid in list(_CHILDREN):
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if os.getpgrp() != me:
        return
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        alive = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if int(fields[2]) == me and fields[0] != b"Z":
                    alive = True
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue
        if not alive:
            return
        time.sleep(0.005)


_USAGE = (
    "usage: python -m winbuilder.emulator.cmd --root SANDBOX [--cwd WINDIR] [--user USER]\n"
    "                                         [--exit-code-file PATH] [-c COMMAND_LINE]\n"
)


def _parse_argv(argv: list[str]) -> dict[str, str]:
    """Tiny option parser (argparse costs ~20 ms of start-up, which hundreds of ``echo >>`` calls feel).

    Raises:
        SystemExit: with status 2 and a usage message on bad arguments.
    """
    names = {"--root": "root", "--cwd": "cwd", "--user": "user", "--exit-code-file": "exit_code_file", "-c": "command"}
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if argv[i] in ("-h", "--help"):
            sys.stdout.write(_USAGE)
            raise SystemExit(0)
        if flag not in names or (not eq and i + 1 >= len(argv)):
            sys.stderr.write(_USAGE + f"error: unexpected argument {argv[i]!r}\n")
            raise SystemExit(2)
        if not eq:
            i += 1
            value = argv[i]
        opts[names[flag]] = value
        i += 1
    if "root" not in opts:
        sys.stderr.write(_USAGE + "error: --root is required\n")
        raise SystemExit(2)
    return opts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring). Returns the process exit status (code & 0xFF).

    Raises:
        SystemExit: on bad arguments (status 2).
    """
    opts = _parse_argv(sys.argv[1:] if argv is None else argv)
    exit_file = opts.get("exit_code_file")

    def finish(code: int) -> int:
        if exit_file:
            with open(exit_file, "w", encoding="ascii") as f:
                f.write(f"{code}\n")
        return code & 0xFF

    def on_sigterm(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _kill_children()
        with suppress(OSError):
            finish(SIGTERM_CODE)
        os._exit(SIGTERM_CODE)

    signal.signal(signal.SIGTERM, on_sigterm)
    user = opts.get("user") or os.environ.get("USERNAME") or os.environ.get("USER") or "user"
    root = Path(opts["root"]).resolve()
    shell = make_shell(root, user, opts.get("cwd"))
    if "command" in opts:
        line = opts["command"]
    else:
        original = os.environ.get("SSH_ORIGINAL_COMMAND")
        if original is None:
            return finish(0)
        line = strip_slash_c_quotes(original, False, lambda name: _find(name, shell)[0] != "")
    shell.env.pop("SSH_ORIGINAL_COMMAND", None)
    try:
        code = run_line(line, shell, Streams())
    except Exception:  # an emulator bug: show it, and still report an exit code
        import traceback

        _write(2, traceback.format_exc())
        code = 1
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
