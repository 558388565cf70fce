"""The command-line entry point of the emulated cmd.exe (``python -m winbuilder.emulator.cmd``)."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import suppress
from pathlib import Path

from winbuilder.emulator.cmd.programs import strip_slash_c_quotes
from winbuilder.emulator.cmd.run import _find, _kill_children, run_line
from winbuilder.emulator.cmd.shell import SIGTERM_CODE, Streams, _write, make_shell

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
