"""Batch files (``.cmd``/``.bat``) in the emulated cmd.exe: batch-mode ``%`` expansion, labels, ``goto``,
``call :label``, ``exit /b`` and the ``setlocal`` stack."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from winbuilder.emulator import paths
from winbuilder.emulator.cmd import run
from winbuilder.emulator.cmd.expansion import lookup
from winbuilder.emulator.cmd.shell import SYNTAX_ERROR_CODE, Shell, Streams, _Exit, _Goto, _signed32, _write
from winbuilder.emulator.cmd.syntax import CmdSyntaxError, parse

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
                run.execute(parse(expanded), shell, io)
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
