"""The internal commands of the emulated cmd.exe (``echo``, ``cd``, ``set``, ``exit``, ``call``, ``goto``, ...)
and their table; the file-system ones are in ``files``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from winbuilder.emulator import paths
from winbuilder.emulator.cmd import batch, run
from winbuilder.emulator.cmd.arith import _Arith
from winbuilder.emulator.cmd.expansion import _tokens, expand
from winbuilder.emulator.cmd.files import _copy_or_move, _del, _md, _rd, _ren, _type
from winbuilder.emulator.cmd.shell import (
    _CMD_SEPARATORS,
    _DELIMS,
    _NO_PATH,
    _SYNTAX,
    SYNTAX_ERROR_CODE,
    WINDOWS_VERSION,
    Shell,
    Streams,
    _Exit,
    _Goto,
    _write,
)
from winbuilder.emulator.cmd.syntax import CmdSyntaxError, parse

Builtin = Callable[[str, Shell, Streams], int | None]
"""An internal command: (argument text incl. separator, shell, streams) -> new ERRORLEVEL or None (unchanged)."""


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
    if not batch._IN_BATCH:
        _write(io.stdout, str(value))
    return 0


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


def _ver(rest: str, shell: Shell, io: Streams) -> int:
    _write(io.stdout, f"\r\nMicrosoft Windows [Version {WINDOWS_VERSION}]\r\n")
    return 0


def _noop(rest: str, shell: Shell, io: Streams) -> int:
    return 0


def _rem(rest: str, shell: Shell, io: Streams) -> None:
    return None


def _call(rest: str, shell: Shell, io: Streams) -> int | None:
    line = rest[1:] if rest[:1] in _DELIMS else rest
    if line.lstrip().startswith(":") and batch._BATCH_STACK:
        label, _, args = line.lstrip()[1:].partition(" ")
        return batch._BATCH_STACK[-1].call_label(label, args, shell, io)
    expanded = batch._BATCH_STACK[-1].expand(line, shell) if batch._BATCH_STACK else expand(line, shell)
    try:
        node = parse(expanded)
    except CmdSyntaxError as exc:
        _write(io.stderr, str(exc) + "\r\n")
        return SYNTAX_ERROR_CODE
    run.execute(node, shell, io)
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
    if batch._BATCH_STACK:
        batch._BATCH_STACK[-1].saved.append((dict(shell.env), shell.cwd, shell.delayed))
        words = rest.lower().split()
        if "enabledelayedexpansion" in words:
            shell.delayed = True
        elif "disabledelayedexpansion" in words:
            shell.delayed = False
    return 0


def _endlocal(rest: str, shell: Shell, io: Streams) -> int:
    if batch._BATCH_STACK and batch._BATCH_STACK[-1].saved:
        shell.env, shell.cwd, shell.delayed = batch._BATCH_STACK[-1].saved.pop()
    return 0


def _goto(rest: str, shell: Shell, io: Streams) -> int:
    label = rest.strip(_DELIMS).lstrip(":").split()
    if not batch._BATCH_STACK or not label:
        return 1
    raise _Goto(label[0])


def _shift(rest: str, shell: Shell, io: Streams) -> int:
    if batch._BATCH_STACK and batch._BATCH_STACK[-1].args:
        batch._BATCH_STACK[-1].args.pop(0)
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
