"""Percent (phase 1) and ``!VAR!`` (phase 5) expansion, and splitting arguments the way cmd and the C runtime do."""

from __future__ import annotations

import re
import time

from winbuilder.emulator.cmd.shell import Shell


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


def _tokens(text: str) -> list[str]:
    """Split builtin arguments on cmd delimiters, keeping quoted parts together (quotes removed)."""
    return [t.replace('"', "") for t in re.findall(r'(?:"[^"]*"?|[^\s,;"]+)+', text)]


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
