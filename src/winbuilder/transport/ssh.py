"""SSH transport: runs ``cmd.exe`` command lines on Windows OpenSSH with asyncssh.

Windows OpenSSH's default shell is ``cmd.exe``, so each command line is sent as-is in an RFC 4254 6.5 ``exec``
request on its own session channel, without a pty (a pty would turn output into ConPTY escape sequences and merge
stderr into stdout).

Design: the transport owns one private asyncio event loop and drives it with ``run_until_complete`` from the calling
thread, so output callbacks run in the caller's thread and no event-loop thread is left behind. The stdin iterator
is advanced in a one-thread executor, so a slow iterator never stalls output or the deadline. The public methods
must therefore not be called from inside a running event loop.

* Host keys are verified during key exchange, before any credential is sent: asyncssh checks the key when it
  processes the server's key exchange reply (RFC 4253 8) and only then starts user authentication (RFC 4252).
  ``test_host_key_mismatch_is_refused_before_any_credential`` pins this.
* Exit codes: Windows OpenSSH sends the process's whole 32-bit exit code in ``exit-status``; asyncssh keeps 8 bits,
  so ``_Process`` records the raw value (256 must never read as 0).
* Deadline: the channel is closed (and a KILL ``signal`` request sent, which OpenSSH honours only for non-forced
  commands). What the server then does with the process is its business; the emulated host kills it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncssh

from winbuilder.errors import (
    AuthError,
    ConnectionFailed,
    DeadlineExceeded,
    ProtocolError,
    SecurityError,
    UsageError,
    WinbuilderError,
)
from winbuilder.transport import OutputCallback, TransferStats, remaining

MAX_COMMAND_LINE = 8191
"""cmd.exe's command line limit in characters; longer lines would be truncated silently, so they are refused."""

READ_CHUNK = 64 * 1024
"""Bytes asked for per read of stdout/stderr (memory stays bounded by asyncssh's receive window)."""

STDIN_CHUNK = 256 * 1024
"""``max_stdin_chunk``: SSH has no per-request limit; this bounds what is buffered before ``drain()``."""

CLOSE_GRACE = 2.0
"""Seconds to wait for the server to confirm a channel or connection close."""

_HOST_KEY_HINT = "pass --host-key SHA256:... or --known-hosts FILE"

_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class SshTarget:
    """Where and how to log in over SSH (keyword arguments only).

    Attributes:
        host: host name or address.
        port: TCP port.
        user: login user.
        password: password for ``password``/``keyboard-interactive`` auth (RFC 4252 8); secret, never shown.
        key_path: OpenSSH/PEM private key file for ``publickey`` auth (RFC 4252 7).
        known_hosts: OpenSSH known_hosts file whose entries for ``[host]:port`` (or ``host`` on port 22) are trusted.
        host_key: trusted host key fingerprint, ``SHA256:<base64>`` as ``ssh-keygen -lf`` prints it, or
            ``MD5:xx:xx:...``.
        connect_timeout: seconds for TCP connect, key exchange and authentication together.
    """

    host: str
    port: int = 22
    user: str
    password: str | None = field(default=None, repr=False)
    key_path: Path | None = None
    known_hosts: Path | None = None
    host_key: str | None = None
    connect_timeout: float = 30.0


class _Client(asyncssh.SSHClient):
    """Checks the host key against a pinned fingerprint and remembers whether the connection was lost."""

    def __init__(self, fingerprint: str | None) -> None:
        self._fingerprint = fingerprint
        self.lost: Exception | None = None
        self.closed = False
        self.offered: str | None = None
        """SHA256 fingerprint of a host key that was not in known_hosts (for the error message)."""

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key.get_fingerprint("sha256")
        if self._fingerprint is None:
            return False
        algorithm = "md5" if self._fingerprint.upper().startswith("MD5:") else "sha256"
        actual: str = key.get_fingerprint(algorithm)
        if algorithm == "md5":
            return actual.lower() == self._fingerprint.lower()
        return actual.rstrip("=") == self._fingerprint.rstrip("=")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc


class _Process(asyncssh.SSHClientProcess[bytes]):
    """An ``SSHClientProcess`` that also keeps the full 32-bit ``exit-status`` value (RFC 4254 6.10).

    asyncssh keeps only the low 8 bits, as a Unix exit status has no more; Windows OpenSSH sends the process's whole
    exit code (``exit /b 256``, ``0xC0000005``), and 256 must not read as 0. The channel dispatches requests by
    attribute name, so the hook is installed on this channel only, before the ``exec`` request is sent.
    """

    raw_exit_status: int | None = None

    def connection_made(self, chan: Any) -> None:
        super().connection_made(chan)
        original = getattr(chan, "_process_exit_status_request", None)
        if original is None:  # a future asyncssh: fall back to its own (8-bit) exit status
            return

        def record(packet: Any) -> bool:
            payload: bytes = packet.get_remaining_payload()
            if len(payload) == 4:
                self.raw_exit_status = int.from_bytes(payload, "big")
            result: bool = original(packet)
            return result

        chan._process_exit_status_request = record


def _no_known_hosts(host: str, addr: str, port: int | None) -> tuple[list[Any], list[Any], list[Any]]:
    """An empty trust list: only the fingerprint check in ``_Client`` can accept the key."""
    return [], [], []


class SshTransport:
    """``Transport`` over SSH (see ``winbuilder.transport``): one connection, one session channel per ``run``.

    Args:
        target: where and how to log in.
    """

    def __init__(self, target: SshTarget) -> None:
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wb-ssh-stdin")
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._closed = False
        self._counts = TransferStats()

    @property
    def max_stdin_chunk(self) -> int:
        """Largest stdin chunk in bytes a caller should pass per iteration (``STDIN_CHUNK``)."""
        return STDIN_CHUNK

    @property
    def _where(self) -> str:
        return f"{self._target.user}@{self._target.host}:{self._target.port}"

    def connect(self, deadline: float) -> None:
        """Open the TCP connection, verify the host key, and authenticate (RFC 4253, RFC 4252).

        Args:
            deadline: ``time.monotonic()`` value by which it must be done.

        Raises:
            SecurityError: no host key to check against was given, or the host key did not match (raised before
                any credential is sent).
            AuthError: the server refused the key or password.
            UsageError: no credential was given, or the key file cannot be read.
            ConnectionFailed: the host is unreachable or the connection dropped.
            DeadlineExceeded: ``deadline`` or ``connect_timeout`` passed first.
        """
        target = self._target
        if self._closed:
            raise ConnectionFailed(f"SSH transport to {self._where} is closed")
        if target.known_hosts is None and target.host_key is None:
            raise SecurityError(f"no host key to verify {target.host}:{target.port} against", _HOST_KEY_HINT)
        if target.password is None and target.key_path is None:
            raise UsageError(f"no SSH credential for {self._where}", "pass a private key file or a password")
        if target.known_hosts is not None and not target.known_hosts.is_file():
            raise UsageError(f"known_hosts file {target.known_hosts} does not exist")
        if self._conn is not None:
            return
        client_keys: list[asyncssh.SSHKey] | None = None
        if target.key_path is not None:
            try:
                client_keys = [asyncssh.read_private_key(str(target.key_path))]
            except (OSError, asyncssh.KeyImportError) as exc:
                raise UsageError(f"cannot load SSH private key {target.key_path}: {type(exc).__name__}") from exc
        client = _Client(target.host_key)
        methods = (["publickey"] if client_keys else []) + (
            ["keyboard-interactive", "password"] if target.password is not None else [])
        self._client = client
        try:
            self._conn = self._call(self._connect(client, client_keys, methods, deadline), "connect")
        except SecurityError as exc:
            if client.offered:
                exc.message += f"; it offered {client.offered}"
            raise

    async def _connect(self, client: _Client, client_keys: list[asyncssh.SSHKey] | None, methods: list[str],
                       deadline: float) -> asyncssh.SSHClientConnection:
        target = self._target
        known_hosts: object = str(target.known_hosts) if target.known_hosts is not None else _no_known_hosts
        timeout = min(target.connect_timeout, remaining(deadline))
        try:
            async with asyncio.timeout(timeout):
                return await asyncssh.connect(
                    target.host, target.port, username=target.user, password=target.password,
                    client_keys=client_keys, agent_path=None, known_hosts=known_hosts,
                    client_factory=lambda: client, config=None, preferred_auth=",".join(methods),
                    gss_auth=False, gss_kex=False, host_based_auth=False, request_pty=False,
                    connect_timeout=None, keepalive_interval=30, keepalive_count_max=4,
                )
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"SSH connect to {self._where} did not finish within {timeout:.1f} s",
                "check the address, port and firewall, or raise the timeout",
            ) from exc

    def run(
        self,
        command_line: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        stdin: Iterable[bytes] | None = None,
        deadline: float | None = None,
    ) -> int:
        """Run ``command_line`` in an ``exec`` request on a new session channel (RFC 4254 6.5) and return its exit code.

        stdout and stderr (extended data type 1, RFC 4254 5.2) are handed to the callbacks as raw bytes as they
        arrive; stdin is written with flow control (``drain()``), then EOF is sent. The exit code is the
        ``exit-status`` request's value (RFC 4254 6.10).

        Args:
            command_line: the cmd.exe command line (at most 8191 characters).
            on_stdout: called with each stdout chunk, in order.
            on_stderr: called with each stderr chunk, in order.
            stdin: chunks for the command's stdin, then EOF; ``None`` sends EOF at once.
            deadline: ``time.monotonic()`` value; when it passes a KILL signal is sent (where the server honours
                it), the channel is closed, and ``DeadlineExceeded`` is raised.

        Returns:
            The exit status, 0..2**32-1: Windows OpenSSH reports the process's full exit code.

        Raises:
            DeadlineExceeded: the deadline passed; the channel was closed.
            ConnectionFailed: not connected, or the connection dropped.
            ProtocolError: the channel closed without an exit status, or with an exit signal (named).
            UsageError: the command line is longer than 8191 characters.
        """
        if len(command_line) > MAX_COMMAND_LINE:
            raise UsageError(f"command line is {len(command_line)} characters; cmd.exe takes at most "
                             f"{MAX_COMMAND_LINE}", "put long scripts in a file in the workspace")
        conn, client = self._conn, self._client
        if conn is None or client is None or client.closed:
            self._conn = None
            raise ConnectionFailed(f"not connected to {self._where}", "call connect() first")
        try:
            return self._call(self._run(conn, client, command_line, on_stdout, on_stderr, stdin, deadline), "run")
        except ConnectionFailed:
            if client.closed:
                self._conn = None
            raise

    async def _run(self, conn: asyncssh.SSHClientConnection, client: _Client, command_line: str,
                   on_stdout: OutputCallback, on_stderr: OutputCallback, stdin: Iterable[bytes] | None,
                   deadline: float | None) -> int:
        when = None if deadline is None else self._loop.time() + remaining(deadline)
        proc: _Process | None = None
        try:
            async with asyncio.timeout_at(when):
                try:
                    self._counts.requests += 1
                    _chan, session = await conn.create_session(_Process, command_line, encoding=None,
                                                               request_pty=False)
                    proc = cast(_Process, session)
                except asyncssh.ChannelOpenError as exc:
                    raise ConnectionFailed(f"SSH server {self._where} refused a session: {exc.reason}") from exc
                await self._pump_all(proc, on_stdout, on_stderr, stdin)
                await proc.wait_closed()
            done = proc
        except TimeoutError as exc:
            if proc is not None:
                await self._abort(proc)
            raise DeadlineExceeded(f"command on {self._where} ran past its deadline; its channel was closed",
                                   "raise the timeout, or look at the output above") from exc
        except BaseException:
            if proc is not None:
                proc.close()
            raise
        signal_info = done.exit_signal
        if signal_info is not None:
            name, core_dumped, message, _lang = signal_info
            detail = f" ({message.strip()})" if message.strip() else ""
            raise ProtocolError(f"command on {self._where} was killed by signal {name}"
                                f"{' (core dumped)' if core_dumped else ''}{detail}")
        status: int | None = done.exit_status
        if status is None:
            if client.closed:
                raise ConnectionFailed(f"connection to {self._where} dropped before the command finished",
                                       "its exit code is unknown; rerun the build")
            raise ProtocolError(f"SSH channel on {self._where} closed without an exit status",
                                "the command's exit code is unknown")
        raw = done.raw_exit_status
        return raw if raw is not None and raw & 0xFF == status else int(status)

    async def _pump_all(self, proc: asyncssh.SSHClientProcess[bytes], on_stdout: OutputCallback,
                        on_stderr: OutputCallback, stdin: Iterable[bytes] | None) -> None:
        tasks = [
            asyncio.ensure_future(self._pump(proc.stdout, on_stdout, stderr=False)),
            asyncio.ensure_future(self._pump(proc.stderr, on_stderr, stderr=True)),
            asyncio.ensure_future(self._feed(proc, stdin)),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, reader: asyncssh.SSHReader[bytes], callback: OutputCallback, *, stderr: bool) -> None:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            if stderr:
                self._counts.stderr_bytes += len(data)
            else:
                self._counts.stdout_bytes += len(data)
            callback(data)

    async def _feed(self, proc: asyncssh.SSHClientProcess[bytes], stdin: Iterable[bytes] | None) -> None:
        writer = proc.stdin
        try:
            if stdin is not None:
                chunks: Iterator[bytes] = iter(stdin)
                while True:
                    chunk = await self._loop.run_in_executor(self._executor, next, chunks, None)
                    if chunk is None:
                        break
                    if not chunk:
                        continue
                    writer.write(chunk)
                    self._counts.stdin_bytes += len(chunk)
                    await writer.drain()
            writer.write_eof()
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            # The command exited (or the connection dropped) before reading all of stdin. The exit status, or the
            # missing one, decides the outcome.
            return

    async def _abort(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError, asyncssh.Error):
            proc.send_signal("KILL")
        proc.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_GRACE):
                await proc.wait_closed()

    def stats(self) -> TransferStats:
        """Counters since the transport was created; ``requests`` counts session channels opened."""
        return replace(self._counts)

    def close(self) -> None:
        """Close the connection and the private event loop. Idempotent; never raises.

        Called from another thread (or a signal handler) while ``run`` is active, it only aborts the connection;
        ``run`` then raises ``ConnectionFailed``.
        """
        if self._closed:
            return
        conn = self._conn
        with contextlib.suppress(Exception):
            if self._loop.is_running():
                if conn is not None:
                    self._loop.call_soon_threadsafe(conn.abort)
                return
            self._closed = True
            self._conn = None
            if conn is not None:
                conn.close()
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(asyncio.wait_for(conn.wait_closed(), CLOSE_GRACE))
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Awaitable[_T], what: str) -> _T:
        """Run ``coro`` on the private loop, translating foreign errors into ``winbuilder.errors``."""
        if self._closed:
            raise ConnectionFailed(f"SSH transport to {self._where} is closed")
        try:
            return self._loop.run_until_complete(coro)
        except WinbuilderError:
            raise
        except Exception as exc:
            raise map_error(exc, self._where, what) from exc


def map_error(exc: BaseException, where: str, what: str) -> WinbuilderError:
    """Translate an asyncssh/OS error into a ``winbuilder.errors`` class (messages carry no secrets).

    Args:
        exc: the foreign exception.
        where: ``user@host:port`` for the message.
        what: the operation (``connect``, ``run``).

    Returns:
        ``SecurityError`` (host key), ``AuthError`` (refused credentials), ``DeadlineExceeded`` (timeouts),
        ``ProtocolError`` (SSH protocol violations), else ``ConnectionFailed``.
    """
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return SecurityError(f"SSH host key of {where} is not trusted: {exc.reason}",
                             f"check the server, then {_HOST_KEY_HINT}")
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthError(f"SSH server {where} refused the credentials", "check the user, key or password")
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"SSH {what} on {where} timed out")
    if isinstance(exc, asyncssh.ConnectionLost):
        return ConnectionFailed(f"SSH connection to {where} was lost during {what}: {exc.reason}")
    if isinstance(exc, asyncssh.DisconnectError):
        return ProtocolError(f"SSH server {where} disconnected during {what}: {exc.reason}")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"cannot reach SSH server {where}: {exc.strerror or type(exc).__name__}",
                                "check the address, port and firewall")
    if isinstance(exc, asyncssh.Error):
        return ConnectionFailed(f"SSH {what} on {where} failed: {exc.reason}")
    return WinbuilderError(f"SSH {what} on {where} failed unexpectedly: {type(exc).__name__}")
