"""Shared pieces of the emulated cmd.exe: constants, cmd's messages, the interpreter state (``Shell``), the
streams commands use, and the ``exit``/``goto`` control-flow signals."""

from __future__ import annotations

import os
import re
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


def _signed32(code: int) -> int:
    code &= 0xFFFFFFFF
    return code - (1 << 32) if code & 0x80000000 else code


def _number(text: str) -> int | None:
    """cmd's numeric literal: decimal, ``0x`` hex or ``0`` octal, optional sign."""
    m = re.fullmatch(r"([+-]?)(0x[0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text.strip())
    if m is None:
        return None
    digits = m.group(2)
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8) if digits[0] == "0" else int(digits)
    return -value if m.group(1) == "-" else value


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
