"""The built-in programs of the emulated cmd.exe (what would be .exe files in System32): ``hostname``, ``whoami``,
``timeout``, ``certutil`` and nested ``cmd /c``; and cmd's ``/c`` quote rule."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

from winbuilder.emulator.cmd import run
from winbuilder.emulator.cmd.shell import _NO_FILE, _NO_PATH, COMPUTER_NAME, Shell, Streams, _number, _write

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
    line = strip_slash_c_quotes(line, "/s" in switches, lambda name: run._find(name, shell)[0] != "")
    nested = shell.copy()
    nested.echo = True
    return run.run_line(line, nested, io, _nested=True)


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
