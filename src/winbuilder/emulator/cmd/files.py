"""The file-system internal commands of the emulated cmd.exe: ``md``, ``type``, ``del``, ``rd``, ``copy``,
``move`` and ``ren``."""

from __future__ import annotations

import os
import re

from winbuilder.emulator import paths
from winbuilder.emulator.cmd.expansion import _tokens
from winbuilder.emulator.cmd.shell import _NO_FILE, _NO_PATH, _SYNTAX, Shell, Streams, _glob, _write


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
