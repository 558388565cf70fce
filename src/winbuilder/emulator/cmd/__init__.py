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

# Layout: ``shell`` (constants, messages, Shell, Streams, make_shell), ``syntax`` (phase 2: tree, parser, errors),
# ``expansion`` (phase 1/5 expansion, argument splitting), ``run`` (executor, redirections, host programs, SIGTERM
# clean-up, run_line), ``commands``/``files``/``arith`` (internal commands), ``programs`` (built-in programs),
# ``batch`` (.cmd/.bat files) and ``cli`` (main). ``run``, ``commands``, ``programs`` and ``batch`` call each other,
# so they import each other as modules (``from winbuilder.emulator.cmd import run``) and look names up at call time.

from winbuilder.emulator.cmd.batch import run_batch
from winbuilder.emulator.cmd.cli import main
from winbuilder.emulator.cmd.commands import Builtin
from winbuilder.emulator.cmd.expansion import expand, expand_delayed, lookup, split_args
from winbuilder.emulator.cmd.programs import Program, strip_slash_c_quotes
from winbuilder.emulator.cmd.run import execute, run_line
from winbuilder.emulator.cmd.shell import (
    COMPUTER_NAME,
    MAX_LINE,
    NOT_FOUND_CODE,
    SIGTERM_CODE,
    SYNTAX_ERROR_CODE,
    UNAVAILABLE,
    WINDOWS_VERSION,
    Shell,
    Streams,
    make_shell,
)
from winbuilder.emulator.cmd.syntax import Binary, CmdSyntaxError, Condition, Group, If, Node, Redirect, Simple, parse

__all__ = [
    "COMPUTER_NAME",
    "MAX_LINE",
    "NOT_FOUND_CODE",
    "SIGTERM_CODE",
    "SYNTAX_ERROR_CODE",
    "UNAVAILABLE",
    "WINDOWS_VERSION",
    "Binary",
    "Builtin",
    "CmdSyntaxError",
    "Condition",
    "Group",
    "If",
    "Node",
    "Program",
    "Redirect",
    "Shell",
    "Simple",
    "Streams",
    "execute",
    "expand",
    "expand_delayed",
    "lookup",
    "main",
    "make_shell",
    "parse",
    "run_batch",
    "run_line",
    "split_args",
    "strip_slash_c_quotes",
]
