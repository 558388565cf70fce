"""Shell and command state of the emulated WinRS service ([MS-WSMV] 3.1.4.1 Create ... 3.1.4.14 Receive).

Each command is a child process (the emulated ``cmd.exe``) in its own process group. Output is streamed: two reader
threads push chunks of at most ``CHUNK`` bytes into one bounded queue, so a child that writes faster than the
client receives blocks on its pipe (backpressure) and memory stays bounded. Stdin goes through a bounded queue and a
writer thread, so a Send never waits on a child that is itself blocked writing output.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from winbuilder.emulator.wsman.envelope import (
    SIGNAL_CTRL_BREAK,
    SIGNAL_CTRL_C,
    SIGNAL_TERMINATE,
    Fault,
    FaultCode,
    ShellSpec,
    new_id,
    timed_out,
)

CHUNK = 64 * 1024  # bytes per read from a child's pipe
OUTPUT_QUEUE_CHUNKS = 32  # up to 2 MiB of output buffered per command
STDIN_QUEUE_CHUNKS = 64  # up to 64 Send payloads buffered per command
STATUS_CONTROL_C_EXIT = 0xC000013A  # exit code Windows reports for a console process ended by Ctrl+C
DEFAULT_IDLE_TIMEOUT = 7200.0  # seconds, Winrs IdleTimeout default
_SECRET_ENV = ("NTLM_USER_FILE", "WINBUILDER_PASSWORD")


@dataclass(frozen=True)
class Limits:
    """Per-user quotas of the emulated service (``winrm get winrm/config``).

    Attributes:
        max_shells: MaxShellsPerUser (fault 2150859173 on the Create beyond it).
        max_ops: MaxConcurrentOperationsPerUser (fault 2150859174). Shell creations and commands count, and stay
            counted until their shell is deleted.
        max_timeout_s: MaxTimeoutms in seconds; longer OperationTimeouts are clamped to it.
    """

    max_shells: int = 30
    max_ops: int = 1500
    max_timeout_s: float = 60.0


@dataclass(frozen=True)
class Launch:
    """How to start the emulated ``cmd.exe``.

    Attributes:
        interpreter: argv prefix; the server appends ``--root R --user U --cwd W --exit-code-file F -c LINE``.
        root: the sandbox directory holding the drive letters (``C:\\`` is ``root/C``).
        state_dir: private directory for exit-code files.
        user: the Windows user name the commands run as.
    """

    interpreter: tuple[str, ...]
    root: Path
    state_dir: Path
    user: str


@dataclass(frozen=True)
class ReceiveResult:
    """What one Receive returns.

    Attributes:
        chunks: ``(stream, data)`` in output order, adjacent chunks of one stream merged.
        done: the command finished and all its output is in this or earlier results.
        exit_code: the unsigned 32-bit exit code when ``done``.
    """

    chunks: list[tuple[str, bytes]]
    done: bool
    exit_code: int | None


class Command:
    """One running command ([MS-WSMV] 3.1.4.11). Create it with ``Command.start``."""

    def __init__(self, command_id: str, proc: subprocess.Popen[bytes], exit_file: Path) -> None:
        self.id = command_id
        self.proc = proc
        self._exit_file = exit_file
        self._out: queue.Queue[tuple[str, bytes | None]] = queue.Queue(OUTPUT_QUEUE_CHUNKS)
        self._in: queue.Queue[bytes | None] = queue.Queue(STDIN_QUEUE_CHUNKS)
        self._carry: tuple[str, bytes] | None = None
        self._eofs = 0
        self._done = False
        self._exit_code: int | None = None
        self._signalled: int | None = None
        self._stdin_closed = False
        self._receive_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read, args=("stdout",), daemon=True),
            threading.Thread(target=self._read, args=("stderr",), daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @classmethod
    def start(cls, launch: Launch, cwd: str, line: str, env: dict[str, str],
              command_id: str | None = None) -> Command:
        """Start ``line`` in the emulated cmd.exe.

        Args:
            launch: interpreter, sandbox root and state directory.
            cwd: the Windows working directory, e.g. ``C:\\Users\\builder``.
            line: the command line (Command and Arguments joined by spaces).
            env: extra environment variables of the shell.
            command_id: the client's CommandId, or None to assign one.

        Raises:
            OSError: the process could not be started.
        """
        cid = command_id or new_id()
        exit_file = launch.state_dir / f"exit-{cid}"
        child_env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        child_env.update(env)
        argv = [*launch.interpreter, "--root", str(launch.root), "--user", launch.user, "--cwd", cwd,
                "--exit-code-file", str(exit_file), "-c", line]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=launch.root, env=child_env, start_new_session=True, bufsize=0)
        return cls(cid, proc, exit_file)

    def _read(self, name: str) -> None:
        pipe = self.proc.stdout if name == "stdout" else self.proc.stderr
        assert pipe is not None
        fd = pipe.fileno()
        try:
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                self._out.put((name, data))
        finally:
            self._out.put((name, None))
            with contextlib.suppress(OSError):
                pipe.close()

    def _write(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        broken = False
        while True:
            item = self._in.get()
            if item is None:
                break
            if broken:
                continue  # keep draining so Send never blocks on a child that stopped reading
            try:
                stdin.write(item)
            except (BrokenPipeError, OSError, ValueError):
                broken = True
        with contextlib.suppress(OSError, ValueError):
            stdin.close()

    def send(self, data: bytes, end: bool) -> None:
        """Queue stdin bytes ([MS-WSMV] 3.1.4.13); ``end`` closes stdin after them. Data after the end is dropped.

        Blocks while the stdin queue is full and the child is alive (backpressure onto the client).
        """
        if self._stdin_closed:
            return
        for item in ([data] if data else []) + ([None] if end else []):
            while True:
                try:
                    self._in.put(item, timeout=0.2)
                    break
                except queue.Full:
                    if self.proc.poll() is not None and not self._threads[2].is_alive():
                        return
        if end:
            self._stdin_closed = True

    def receive(self, timeout: float, max_bytes: int) -> ReceiveResult:
        """Return the output available now ([MS-WSMV] 3.1.4.14), waiting up to ``timeout`` seconds for the first byte.

        Args:
            timeout: the request's OperationTimeout, seconds.
            max_bytes: the most output bytes (before base64) to return, so the response fits the envelope.

        Raises:
            Fault: ``TimedOut`` (2150858793) when nothing happened within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._receive_lock:
            if self._done:
                return ReceiveResult([], True, self._exit_code)
            chunks: list[tuple[str, bytes]] = []
            size = 0

            def take(item: tuple[str, bytes | None]) -> None:
                nonlocal size
                name, data = item
                if data is None:
                    self._eofs += 1
                    return
                room = max_bytes - size
                if len(data) > room:
                    data, rest = data[:room], data[room:]
                    self._carry = (name, rest)
                if chunks and chunks[-1][0] == name:
                    chunks[-1] = (name, chunks[-1][1] + data)
                else:
                    chunks.append((name, data))
                size += len(data)

            while True:
                if self._carry is not None:
                    carried, self._carry = self._carry, None
                    take(carried)
                while size < max_bytes and self._carry is None:
                    try:
                        take(self._out.get_nowait())
                    except queue.Empty:
                        break
                if chunks or self._eofs == 2:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    take(self._out.get(timeout=remaining))
                except queue.Empty:
                    break
            if self._eofs == 2 and self._carry is None and self._out.empty():
                wait = 0.0 if chunks else max(0.0, deadline - time.monotonic())
                try:
                    rc = self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    rc = None
                if rc is not None:
                    self._done = True
                    self._exit_code = self._read_exit_code(rc)
                    return ReceiveResult(chunks, True, self._exit_code)
            if not chunks:
                raise timed_out()
            return ReceiveResult(chunks, False, None)

    def _read_exit_code(self, returncode: int) -> int:
        try:
            text = self._exit_file.read_text(encoding="ascii").strip()
            return int(text, 0) & 0xFFFFFFFF
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self._exit_file.unlink()
        if returncode >= 0:
            return returncode & 0xFFFFFFFF
        if self._signalled == signal.SIGINT:
            return STATUS_CONTROL_C_EXIT
        return 1

    def signal(self, code: str) -> None:
        """Deliver a Signal ([MS-WSMV] 3.1.4.12): Terminate kills the process group, ctrl_c/ctrl_break interrupt it.

        Raises:
            Fault: unknown signal code.
        """
        if code == SIGNAL_TERMINATE:
            self.kill()
        elif code in (SIGNAL_CTRL_C, SIGNAL_CTRL_BREAK):
            self._signal_group(signal.SIGINT)
        else:
            raise Fault(FaultCode.INVALID_SELECTORS, "InvalidParameter", "The signal code is not supported.",
                        sender=True)

    def _signal_group(self, signum: int) -> None:
        self._signalled = signum
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """Kill the command's whole process group and close stdin. Never raises."""
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(queue.Full):
            self._in.put_nowait(None)

    def reap(self) -> None:
        """Kill, wait for the process and drop queued output (used on shell delete). Never raises."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        # drain so reader threads blocked on a full queue can finish
        end = time.monotonic() + 2
        while any(t.is_alive() for t in self._threads[:2]) and time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                self._out.get(timeout=0.05)
        with contextlib.suppress(OSError):
            self._exit_file.unlink()


@dataclass
class Shell:
    """One WinRS shell ([MS-WSMV] 3.1.4.1). Holds its commands; ``ops`` counts operations charged to the user."""

    id: str
    spec: ShellSpec
    codepage: int | None
    owner: str
    client_ip: str
    workdir: str
    idle_timeout: float
    commands: dict[str, Command] = field(default_factory=dict)
    ops: int = 1


class ShellTable:
    """All shells of one emulated host, with the per-user quotas. Thread-safe.

    Args:
        limits: the quotas.
        launch: how commands are started.
        default_workdir: the Windows working directory when the shell names none (the user's profile).
    """

    def __init__(self, limits: Limits, launch: Launch, default_workdir: str) -> None:
        self.limits = limits
        self.launch = launch
        self.default_workdir = default_workdir
        self._shells: dict[str, Shell] = {}
        self._lock = threading.Lock()

    def _ops(self) -> int:
        return sum(s.ops for s in self._shells.values())

    def _check_ops(self) -> None:
        if self._ops() >= self.limits.max_ops:
            raise Fault(FaultCode.MAX_OPERATIONS, "QuotaLimit",
                        "The WS-Management service cannot process the request. This user is allowed a maximum "
                        f"number of {self.limits.max_ops} concurrent operations, which has been exceeded. Close "
                        "existing operations for this user, or raise the quota for this user.")

    def create(self, spec: ShellSpec, options: dict[str, str], owner: str, client_ip: str) -> Shell:
        """Create a shell ([MS-WSMV] 3.1.4.1), honouring WINRS_CODEPAGE (recorded).

        Raises:
            Fault: MaxShellsPerUser (2150859173) or MaxConcurrentOperationsPerUser (2150859174) exceeded, or a bad
                WINRS_CODEPAGE.
        """
        codepage: int | None = None
        if "WINRS_CODEPAGE" in options:
            try:
                codepage = int(options["WINRS_CODEPAGE"])
            except ValueError as exc:
                raise Fault(FaultCode.INVALID_SELECTORS, "InvalidOptions", "WINRS_CODEPAGE is not a number.",
                            sender=True) from exc
        with self._lock:
            if len(self._shells) >= self.limits.max_shells:
                raise Fault(FaultCode.MAX_SHELLS, "QuotaLimit",
                            "The WS-Management service cannot process the request. This user is allowed a maximum "
                            f"number of {self.limits.max_shells} shells, which has been exceeded. Close existing "
                            "shells or raise the quota for this user.")
            self._check_ops()
            sid = spec.shell_id or new_id()
            shell = Shell(id=sid, spec=spec, codepage=codepage, owner=owner, client_ip=client_ip,
                          workdir=spec.working_directory or self.default_workdir,
                          idle_timeout=spec.idle_timeout or DEFAULT_IDLE_TIMEOUT)
            self._shells[sid] = shell
            return shell

    def get(self, shell_id: str | None) -> Shell:
        """Find a shell by its ShellId selector.

        Raises:
            Fault: ERROR_WINRS_SHELL_NOT_FOUND (2150858843).
        """
        with self._lock:
            shell = self._shells.get(shell_id or "")
        if shell is None:
            raise Fault(FaultCode.SHELL_NOT_FOUND, "InvalidSelectors",
                        f"The request for the Windows Remote Shell with ShellId {shell_id} failed because the shell "
                        "was not found on the server. Possible causes are: the specified ShellId is incorrect or "
                        "the shell no longer exists on the server. Provide the correct ShellId or create a new "
                        "shell and retry the operation.", sender=True)
        return shell

    def command(self, shell: Shell, line: str, command_id: str | None) -> Command:
        """Start a command in a shell ([MS-WSMV] 3.1.4.11); it counts as one operation until the shell is deleted.

        Raises:
            Fault: quota exceeded, or the process could not be started.
        """
        with self._lock:
            self._check_ops()
            shell.ops += 1
        try:
            cmd = Command.start(self.launch, shell.workdir, line, shell.spec.environment, command_id)
        except OSError as exc:
            raise Fault(FaultCode.INVALID_SELECTORS, "InternalError",
                        f"The command could not be started: {exc.strerror}") from exc
        with self._lock:
            shell.commands[cmd.id] = cmd
        return cmd

    @staticmethod
    def find_command(shell: Shell, command_id: str | None) -> Command:
        """Find a command of a shell.

        Raises:
            Fault: no such CommandId.
        """
        cmd = shell.commands.get(command_id or "")
        if cmd is None:
            raise Fault(FaultCode.INVALID_SELECTORS, "InvalidSelectors",
                        f"The command with CommandId {command_id} was not found in the shell.", sender=True)
        return cmd

    def delete(self, shell_id: str | None) -> None:
        """Delete a shell ([MS-WSMV] 3.1.4.2): kill its commands and release its operations.

        Raises:
            Fault: ERROR_WINRS_SHELL_NOT_FOUND.
        """
        shell = self.get(shell_id)
        with self._lock:
            self._shells.pop(shell.id, None)
        for cmd in list(shell.commands.values()):
            cmd.reap()

    def close_all(self) -> None:
        """Delete every shell (server shutdown). Never raises."""
        with self._lock:
            shells = list(self._shells.values())
            self._shells.clear()
        for shell in shells:
            for cmd in list(shell.commands.values()):
                cmd.reap()

    def counts(self) -> dict[str, int]:
        """``{"shells": n, "operations": n, "commands_running": n}`` for stats."""
        with self._lock:
            running = sum(1 for s in self._shells.values() for c in s.commands.values() if c.proc.poll() is None)
            return {"shells": len(self._shells), "operations": self._ops(), "commands_running": running}


def default_interpreter() -> tuple[str, ...]:
    """The emulated cmd.exe: ``python -m winbuilder.emulator.cmd``."""
    return (sys.executable, "-m", "winbuilder.emulator.cmd")
