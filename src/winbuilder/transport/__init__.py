"""The transport seam: one small interface, two implementations (WinRM in ``winrm.py``, SSH in ``ssh.py``).

A transport runs one ``cmd.exe`` command line at a time on the Windows server. Output bytes are handed to callbacks
as they arrive (raw bytes; decoding is the caller's job, see ``winbuilder.output``). stdin is fed from an iterator of
byte chunks, then closed (EOF). The exit code is returned as the server reports it: any unsigned 32-bit value.

Every error is a ``winbuilder.errors`` class: ``AuthError``, ``SecurityError``, ``ConnectionFailed``/``ProtocolError``
(a dropped connection is never success), ``DeadlineExceeded`` (after the command was terminated).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

OutputCallback = Callable[[bytes], None]


@dataclass
class TransferStats:
    """Counters of one transport session. Sizes in bytes. Transports count into one and hand out copies.

    Attributes:
        requests: protocol round trips (HTTP requests for WinRM, channel opens for SSH).
        stdin_bytes: payload bytes sent to remote stdin.
        stdout_bytes: payload bytes received on stdout.
        stderr_bytes: payload bytes received on stderr.
    """

    requests: int = 0
    stdin_bytes: int = 0
    stdout_bytes: int = 0
    stderr_bytes: int = 0


class Transport(Protocol):
    """A connection to one Windows server that runs ``cmd.exe`` command lines."""

    @property
    def max_stdin_chunk(self) -> int:
        """Largest stdin chunk (bytes, before any encoding) one request can carry."""
        ...

    def connect(self, deadline: float) -> None:
        """Authenticate and open the shell/session.

        Args:
            deadline: ``time.monotonic()`` value by which it must be done.

        Raises:
            AuthError, SecurityError, ConnectionFailed, DeadlineExceeded.
        """
        ...

    def run(
        self,
        command_line: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        stdin: Iterable[bytes] | None = None,
        deadline: float | None = None,
    ) -> int:
        """Run ``command_line`` under ``cmd.exe /c`` and return its exit code (0..2**32-1).

        Args:
            command_line: the cmd.exe command line (at most 8191 characters).
            on_stdout: called with each stdout chunk, in order, as it arrives.
            on_stderr: called with each stderr chunk, in order, as it arrives.
            stdin: chunks to write to the command's stdin, then EOF. ``None`` sends EOF at once.
            deadline: ``time.monotonic()`` value; when it passes the command is terminated (WS-Man Signal
                terminate, or the SSH channel closed) and ``DeadlineExceeded`` is raised.

        Raises:
            DeadlineExceeded, ConnectionFailed, ProtocolError, AuthError.
        """
        ...

    def stats(self) -> TransferStats:
        """Counters since the transport was created."""
        ...

    def close(self) -> None:
        """Close the shell/session and the connection. Idempotent; never raises."""
        ...


def remaining(deadline: float | None, default: float = 3600.0) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value); ``default`` if there is none. Never negative."""
    if deadline is None:
        return default
    return max(0.0, deadline - time.monotonic())
