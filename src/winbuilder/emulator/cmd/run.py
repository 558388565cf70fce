"""The executor of the emulated cmd.exe: runs syntax trees (redirections, pipes, ``if``), dispatches to internal
commands, built-in programs and batch files, launches host programs and kills them on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from winbuilder.emulator import paths
from winbuilder.emulator.cmd import batch, commands, programs
from winbuilder.emulator.cmd.expansion import expand, expand_delayed, split_args
from winbuilder.emulator.cmd.shell import (
    _CMD_SEPARATORS,
    _NO_FILE,
    _NO_PATH,
    _NOT_RECOGNIZED,
    MAX_LINE,
    NOT_FOUND_CODE,
    SYNTAX_ERROR_CODE,
    UNAVAILABLE,
    Shell,
    Streams,
    _Exit,
    _glob,
    _number,
    _signed32,
    _write,
)
from winbuilder.emulator.cmd.syntax import Binary, CmdSyntaxError, Condition, Group, If, Node, Redirect, parse


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


def _exists(win_path: str, shell: Shell) -> bool:
    if _is_nul(win_path):
        return True
    if any(ch in win_path for ch in "*?"):
        return bool(_glob(win_path, shell))
    try:
        return shell.host(win_path).exists()
    except ValueError:
        return False


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


def _dispatch(text: str, shell: Shell, io: Streams) -> bool:
    stripped = text.lstrip(" \t,;=@")
    if not stripped.strip():
        return True
    m = re.match(r"[A-Za-z]+", stripped)
    if m is not None:
        name = m.group(0).lower()
        rest = stripped[m.end() :]
        builtin = commands._INTERNAL.get(name)
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
    if lower in programs._PROGRAMS:
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
        return programs._PROGRAMS[kind[8:]](argv[1:], _after_program(text), shell, io)
    if kind == "batch" and where is not None:
        return batch.run_batch(where, argv[0], _after_program(text), shell, io)
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
