"""Server-side authentication for the emulated WinRM listener: NTLM through SPNEGO ("Negotiate"), optional Basic,
and WinRM message encryption (``multipart/encrypted``, [MS-WSMV] 2.2.9.1).

Credentials: the host keeps the user's NT hash (never the plain password) in a 0600 file in the smbpasswd form
``USER:UID:LMHASH:NTHASH:FLAGS:LCT`` that pyspnego's NTLM acceptor reads from ``$NTLM_USER_FILE``. pyspnego reads the
env var when the context is created and when it checks the AUTHENTICATE message, so every step runs under one module
lock with the variable pointed at this host's file: hosts in one process keep separate credentials. The file is
replaced atomically, so ``set_password`` works while clients connect.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import spnego
from spnego._ntlm_raw.crypto import ntowfv1  # pyspnego's MD4 (OpenSSL 3 may lack it); no public equivalent
from spnego.exceptions import SpnegoError

_ENV_LOCK = threading.Lock()
_EMPTY_LM = "AAD3B435B51404EEAAD3B435B51404EE"  # the LM hash Windows stores when LM hashes are disabled
ENCRYPTED_PROTOCOL = "application/HTTP-SPNEGO-session-encrypted"
_BOUNDARY = b"--Encrypted Boundary"


def nt_hash(password: str) -> bytes:
    """The NT one-way function of a password (MD4 of UTF-16LE), 16 bytes ([MS-NLMP] 3.3.1)."""
    return bytes(ntowfv1(password))


class CredentialFile:
    """The 0600 NTLM credential store of one host, in its own 0700 temp directory.

    Args:
        user: the account name (matched case-insensitively, with no domain or the ``.`` domain).
        password: the password, or None for "no credential works yet".
    """

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.directory = Path(tempfile.mkdtemp(prefix="wb-ntlm-"))
        self.path = self.directory / "ntlm_user_file"
        self._hash: bytes | None = None
        self._lock = threading.Lock()
        self.set_password(password)

    def set_password(self, password: str | None) -> None:
        """Replace the stored credential atomically (None: nothing matches, every login gets 401).

        Raises:
            OSError: the file cannot be written.
        """
        digest = nt_hash(password) if password is not None else None
        lines = ""
        if digest is not None:
            hexed = digest.hex().upper()
            for name in (self.user, f".\\{self.user}"):
                lines += f"{name}:1000:{_EMPTY_LM}:{hexed}:[U]:LCT-00000000\n"
        with self._lock:
            fd, tmp = tempfile.mkstemp(dir=self.directory)  # mkstemp creates it 0600
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(lines)
            os.replace(tmp, self.path)
            self._hash = digest

    def check_password(self, password: str) -> bool:
        """Constant-time check of a Basic-auth password against the stored NT hash."""
        with self._lock:
            stored = self._hash
        return stored is not None and hmac.compare_digest(stored, nt_hash(password))

    def remove(self) -> None:
        """Delete the file and its directory. Never raises."""
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def _user_file(creds: CredentialFile) -> Iterator[None]:
    with _ENV_LOCK:
        old = os.environ.get("NTLM_USER_FILE")
        os.environ["NTLM_USER_FILE"] = str(creds.path)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = old


@dataclass(frozen=True)
class StepResult:
    """The outcome of one Negotiate step.

    Attributes:
        token: the token to send back in ``WWW-Authenticate: Negotiate <b64>`` (None: none to send).
        complete: the context is established (the user is authenticated).
        failed: the credentials were refused (answer 401 and drop the context).
    """

    token: bytes | None
    complete: bool
    failed: bool


class NegotiateAcceptor:
    """The NTLM-over-SPNEGO state of one TCP connection ([MS-NLMP], [MS-SPNG]); not thread-safe, one per connection.

    Args:
        creds: the host's credential file.
    """

    def __init__(self, creds: CredentialFile) -> None:
        self._creds = creds
        self._ctx: spnego.ContextProxy | None = None
        self.complete = False

    def step(self, token: bytes) -> StepResult:
        """Feed one token from ``Authorization: Negotiate <b64>``. A NEGOTIATE token starts a fresh context."""
        if self._ctx is None or self.complete or _is_ntlm_negotiate(token):
            self.complete = False
            try:
                with _user_file(self._creds):
                    self._ctx = spnego.server(protocol="negotiate", options=spnego.NegotiateOptions.use_negotiate)
            except SpnegoError:
                self._ctx = None
                return StepResult(None, False, True)
        try:
            with _user_file(self._creds):
                out = self._ctx.step(token)
        except SpnegoError:
            self._ctx = None
            return StepResult(None, False, True)
        self.complete = bool(self._ctx.complete)
        return StepResult(out, self.complete, False)

    def reset(self) -> None:
        """Forget the context (after a failure, or when the connection closes)."""
        self._ctx = None
        self.complete = False

    # [MS-WSMV] 2.2.9.1 encrypted message body

    def wrap(self, message: bytes) -> tuple[str, bytes]:
        """Encrypt a response body. Returns ``(content_type_header, body)``.

        Raises:
            RuntimeError: the context is not established.
        """
        if self._ctx is None or not self.complete:
            raise RuntimeError("no established security context")
        res = self._ctx.wrap_winrm(message)
        length = len(message) + res.padding_length
        body = b"".join([
            _BOUNDARY, b"\r\n\tContent-Type: ", ENCRYPTED_PROTOCOL.encode(),
            b"\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=", str(length).encode(),
            b"\r\n", _BOUNDARY, b"\r\n\tContent-Type: application/octet-stream\r\n",
            struct.pack("<i", len(res.header)), res.header, res.data, _BOUNDARY, b"--\r\n",
        ])
        ctype = f'multipart/encrypted;protocol="{ENCRYPTED_PROTOCOL}";boundary="Encrypted Boundary"'
        return ctype, body

    def unwrap(self, body: bytes, content_type: str) -> bytes:
        """Decrypt a ``multipart/encrypted`` request body.

        Raises:
            ValueError: the body is malformed, fails the integrity check, or the context is not established.
        """
        if self._ctx is None or not self.complete:
            raise ValueError("no established security context")
        m = re.search(r'boundary="?([^";]+)"?', content_type)
        if not m:
            raise ValueError("multipart/encrypted without a boundary")
        marker = b"--" + m.group(1).encode()
        parts = [p for p in body.split(marker) if p.strip(b"\r\n-")]
        if len(parts) != 2:
            raise ValueError("expected exactly one encrypted part")
        head, payload = parts
        lm = re.search(rb"Length=(\d+)", head)
        prefix = b"\r\n\tContent-Type: application/octet-stream\r\n"
        if not lm or not payload.startswith(prefix):
            raise ValueError("malformed encrypted part")
        data = payload[len(prefix):]
        if len(data) < 4:
            raise ValueError("short encrypted part")
        hlen = struct.unpack("<i", data[:4])[0]
        if hlen < 0 or hlen > len(data) - 4:
            raise ValueError("bad signature length")
        try:
            plain = bytes(self._ctx.unwrap_winrm(data[4:4 + hlen], data[4 + hlen:]))
        except SpnegoError as exc:
            raise ValueError("message integrity check failed") from exc
        if len(plain) != int(lm.group(1)):
            raise ValueError("decrypted length does not match OriginalContent Length")
        return plain


def _is_ntlm_negotiate(token: bytes) -> bool:
    """True for a first-leg token: a raw NTLM NEGOTIATE or a SPNEGO NegTokenInit (ASN.1 application tag 0)."""
    return token.startswith(b"NTLMSSP\x00\x01\x00\x00\x00") or token[:1] == b"\x60"


def check_basic(header_value: str, user: str, creds: CredentialFile) -> bool:
    """Check ``Authorization: Basic <b64 user:password>`` (RFC 7617). The user name is case-insensitive and may be
    written ``.\\user``.
    """
    try:
        decoded = base64.b64decode(header_value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return False
    name, sep, password = decoded.partition(":")
    if not sep:
        return False
    name = name.removeprefix(".\\")
    return name.lower() == user.lower() and creds.check_password(password)
