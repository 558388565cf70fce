"""One exception tree for winbuilder; every class carries the process exit code it maps to.

Foreign errors (pypsrp, asyncssh, requests, google-api-core) are translated at the edges (transport/winrm.py,
transport/ssh.py, gce.py) into these classes, chained with ``raise ... from exc``.

::

    WinbuilderError                 exit 70  (internal: a bug, or something unforeseen)
    ├── UsageError                  exit 64  bad flags or arguments
    ├── WorkspaceError              exit 65  the workspace cannot be copied (e.g. names Windows cannot hold)
    ├── ConnectionFailed            exit 69  host unreachable, connection dropped, infrastructure failure
    │   ├── ProtocolError           exit 69  the peer broke the protocol or a stream ended early
    │   └── CloudError              exit 69  a Compute Engine call or operation failed
    │       └── CapacityError       exit 75  quota exceeded or no zone had capacity
    ├── AuthError                   exit 77  credentials refused
    ├── SecurityError               exit 78  TLS certificate or SSH host key did not match; refused before credentials
    ├── DeadlineExceeded            exit 124 a phase (or the command) ran past its deadline
    └── Cancelled                   exit 130 (SIGINT) or 143 (SIGTERM)

A remote command's own exit code is not an error: 0-255 pass through exactly; anything else exits 1 after printing
the full value (see ``flow.exit_status``).

Messages never contain secrets. ``str(err)`` is "<what> — <what to do>" when ``hint`` is set.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the tool itself (documented in README.md, "Exit codes")."""

    OK = 0
    REMOTE_OUT_OF_RANGE = 1
    USAGE = 64
    WORKSPACE = 65
    CONNECTION = 69
    INTERNAL = 70
    CAPACITY = 75
    AUTH = 77
    SECURITY = 78
    TIMEOUT = 124
    SIGINT = 130
    SIGTERM = 143


class WinbuilderError(Exception):
    """Base of all winbuilder errors.

    Args:
        message: what went wrong, one line, no secrets.
        hint: what the user can do about it, one line.
    """

    exit_code: int = ExitCode.INTERNAL
    details: tuple[str, ...] = ()
    """Lines that the CLI prints before the one-line error (e.g. every path preflight rejected)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class UsageError(WinbuilderError):
    """Bad command-line input."""

    exit_code = ExitCode.USAGE


class WorkspaceError(WinbuilderError):
    """The workspace cannot be transferred as asked (preflight failures, unreadable files)."""

    exit_code = ExitCode.WORKSPACE


class ConnectionFailed(WinbuilderError):
    """The server could not be reached, or the connection dropped. Never success."""

    exit_code = ExitCode.CONNECTION


class ProtocolError(ConnectionFailed):
    """The peer answered outside the protocol (malformed reply, stream ended without an exit code)."""


class CloudError(ConnectionFailed):
    """A Compute Engine API call or operation failed."""


class CapacityError(CloudError):
    """Quota exceeded, or no zone of the region had capacity."""

    exit_code = ExitCode.CAPACITY


class AuthError(WinbuilderError):
    """The server refused the credentials."""

    exit_code = ExitCode.AUTH


class SecurityError(WinbuilderError):
    """The server's identity could not be verified (certificate pin, CA, or SSH host key mismatch)."""

    exit_code = ExitCode.SECURITY


class DeadlineExceeded(WinbuilderError):
    """A deadline passed: the command's ``--timeout``, or a phase's own deadline."""

    exit_code = ExitCode.TIMEOUT


class Cancelled(WinbuilderError):
    """SIGINT or SIGTERM arrived. ``exit_code`` is 128 + the signal number."""

    exit_code: int = ExitCode.SIGTERM

    def __init__(self, signum: int) -> None:
        super().__init__(f"cancelled by signal {signum}", "nothing was left running")
        self.signum = signum
        self.exit_code = 128 + signum
