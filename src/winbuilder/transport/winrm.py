"""WinRM transport: pypsrp's WinRS shell over WS-Management ([MS-WSMV]), with NTLM and a pinned TLS certificate.

Layers: ``WSMan`` (HTTP session, NTLM, message encryption, TLS) -> ``WinRS`` (one cmd shell, code page 65001) ->
``WinRMTransport.run`` (Command, Send, Receive until ``CommandState/Done``, Signal terminate on deadline).

Faults are named in ``WSManFaultCode`` and mapped once, in ``_translate``, to ``winbuilder.errors``.
"""

from __future__ import annotations

import base64
import logging
import time
import xml.etree.ElementTree as ET  # noqa: S405 - builds requests; parsing is pypsrp's
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import requests
import requests.adapters
from pypsrp.exceptions import AuthenticationError, WinRMError, WinRMTransportError, WSManFaultError
from pypsrp.shell import CommandState, SignalCode, WinRS
from pypsrp.wsman import NAMESPACES, SelectorSet, WSMan

from winbuilder.errors import (
    AuthError,
    ConnectionFailed,
    DeadlineExceeded,
    ProtocolError,
    SecurityError,
    WinbuilderError,
)
from winbuilder.staging import chunks, prefetch
from winbuilder.transport import OutputCallback, TransferStats, remaining

log = logging.getLogger(__name__)
T = TypeVar("T")

UTF8_CODEPAGE = 65001
DEFAULT_ENVELOPE_BYTES = 153600  # 150 KiB: safe on every server until the real MaxEnvelopeSizekb is known


class WSManFaultCode(IntEnum):
    """WS-Management fault codes winbuilder acts on ([MS-WSMV] 2.2.4.43 WSManFault, Windows error values)."""

    OPERATION_TIMEOUT = 2150858793  # w:TimedOut: no output within OperationTimeout; poll again
    SHELL_QUOTA = 2150859173  # MaxShellsPerUser exceeded
    OPERATION_QUOTA = 2150859174  # MaxConcurrentOperationsPerUser exceeded
    ENVELOPE_TOO_LARGE = 2150858817  # request larger than MaxEnvelopeSizekb


QUOTA_FAULTS = {WSManFaultCode.SHELL_QUOTA, WSManFaultCode.OPERATION_QUOTA}


@dataclass(frozen=True)
class WinRMTarget:
    """Where and how to connect.

    Attributes:
        host: DNS name or IP address.
        port: TCP port (5986 for HTTPS, 5985 for HTTP).
        user: Windows user name.
        password: the user's password. Never printed (``repr=False``).
        https: HTTPS (default). ``False`` means HTTP with NTLM message encryption, never plain text.
        ca_bundle: PEM file of CAs to verify the server certificate against (hostname checked too).
        cert_fingerprint: hex SHA-256 (64 digits) or SHA-1 Windows thumbprint (40 digits) of the server's DER
            certificate; checked by urllib3 on the very connection that then carries the credentials.
        insecure_skip_verify: accept any certificate (prints a warning every run; never the default).
        operation_timeout: WS-Man OperationTimeout in seconds for Receive ([MS-WSMV] 2.2.4.26, max 60).
        connect_timeout: TCP connect timeout in seconds.
    """

    host: str
    user: str
    password: str = field(repr=False)
    port: int = 5986
    https: bool = True
    ca_bundle: Path | None = None
    cert_fingerprint: str | None = None
    insecure_skip_verify: bool = False
    operation_timeout: int = 20
    connect_timeout: float = 30.0


class PinnedAdapter(requests.adapters.HTTPAdapter):
    """An HTTPS adapter whose connections fail the TLS handshake unless the peer certificate has this fingerprint.

    Uses urllib3's ``assert_fingerprint`` (SHA-1 or SHA-256 of the DER certificate), which is checked during the
    handshake of every connection, before any HTTP request (and so any NTLM message) is written to it.
    """

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def normalize_fingerprint(value: str) -> str:
    """Return a hex fingerprint as lower case without separators.

    Raises:
        ValueError: if it is not 40 (SHA-1) or 64 (SHA-256) hex digits.
    """
    hexdigits = value.replace(":", "").replace(" ", "").lower()
    if len(hexdigits) not in (40, 64) or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ValueError("a certificate fingerprint is 40 (SHA-1) or 64 (SHA-256) hex digits")
    return hexdigits


class WinRMTransport:
    """Runs cmd.exe command lines in one WinRS shell. Implements ``winbuilder.transport.Transport``.

    Args:
        target: connection parameters.
    """

    def __init__(self, target: WinRMTarget) -> None:
        self.target = target
        self._wsman: WSMan | None = None
        self._shell: WinRS | None = None
        self._counts = TransferStats()

    # -- Transport surface -------------------------------------------------------------------------------------

    @property
    def max_stdin_chunk(self) -> int:
        """Raw stdin bytes per Send so that the base64 payload and envelope fit ``MaxEnvelopeSizekb``."""
        if self._wsman is None:
            return DEFAULT_ENVELOPE_BYTES * 3 // 4 - 4096
        return int(self._wsman.max_payload_size)

    def connect(self, deadline: float) -> None:
        """Authenticate, learn ``MaxEnvelopeSizekb`` and open a shell with code page 65001.

        Raises:
            SecurityError: certificate mismatch (before any credential is sent).
            AuthError: the server refused the credentials.
            ConnectionFailed, DeadlineExceeded.
        """
        t = self.target
        if remaining(deadline) <= 0:
            raise DeadlineExceeded("the connect deadline passed before connecting", "raise --connect-timeout")
        wsman = WSMan(
            t.host,
            port=t.port,
            username=t.user,
            password=t.password,
            ssl=t.https,
            auth="ntlm",
            encryption="auto" if t.https else "always",
            cert_validation=self._cert_validation(),  # type: ignore[arg-type]  # a CA path works too
            connection_timeout=max(1, int(min(t.connect_timeout, remaining(deadline)))),
            read_timeout=t.operation_timeout + 15,
            operation_timeout=t.operation_timeout,
            max_envelope_size=DEFAULT_ENVELOPE_BYTES,
            no_proxy=False,
        )
        # pypsrp builds its requests session lazily; build it now to pin the certificate on its HTTPS adapter and
        # to resolve the proxy settings once (requests would otherwise re-read the environment on every request).
        session = wsman.transport._build_session()
        if t.https and t.cert_fingerprint:
            session.mount("https://", PinnedAdapter(normalize_fingerprint(t.cert_fingerprint)))
            session.verify = False
        session.proxies = requests.utils.get_environ_proxies(wsman.transport.endpoint)
        session.trust_env = False
        wsman.transport.session = session
        self._wsman = wsman
        self._learn_envelope_size()
        self._open_shell(deadline)

    def run(
        self,
        command_line: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        stdin: Iterable[bytes] | None = None,
        deadline: float | None = None,
    ) -> int:
        """Run one command line in the shell; see ``Transport.run``. [MS-WSMV] 3.1.4.11 (Command), 3.1.4.14
        (Receive), 3.1.4.13 (Send), 3.1.4.12 (Signal).

        Raises:
            DeadlineExceeded: after Signal terminate, when ``deadline`` passed.
            ConnectionFailed, ProtocolError, AuthError.
        """
        command_id = self._start_command(command_line, deadline)
        done = False
        try:
            self._send_stdin(command_id, stdin, deadline)
            while True:
                left = remaining(deadline)
                if left <= 0:
                    raise DeadlineExceeded("the command ran past --timeout and was terminated", "raise --timeout")
                wait = max(1, min(self.target.operation_timeout, int(left + 0.999)))
                try:
                    state, rc, streams = self._call(
                        partial(self._require_shell().receive, "stdout stderr", command_id, timeout=wait))
                except _Fault as fault:
                    if fault.code == WSManFaultCode.OPERATION_TIMEOUT:
                        continue
                    raise fault.translate() from fault.__cause__
                if streams.get("stdout"):
                    self._counts.stdout_bytes += len(streams["stdout"])
                    on_stdout(streams["stdout"])
                if streams.get("stderr"):
                    self._counts.stderr_bytes += len(streams["stderr"])
                    on_stderr(streams["stderr"])
                if state == CommandState.DONE:
                    done = True
                    if rc is None:
                        raise ProtocolError("the server reported the command done without an exit code",
                                            "check the WinRM service on the server")
                    return rc & 0xFFFFFFFF
        finally:
            if not done:
                self._terminate(command_id)

    def stats(self) -> TransferStats:
        """Counters since the transport was created (``requests`` = HTTP requests of WS-Man operations)."""
        return replace(self._counts)

    def close(self) -> None:
        """Delete the shell and close the HTTP session. Idempotent; never raises."""
        shell, self._shell = self._shell, None
        if shell is not None and shell.opened:
            try:
                self._counts.requests += 1
                shell.close()
            except Exception as exc:  # noqa: BLE001 - best effort at teardown
                log.debug("deleting the shell failed: %s", type(exc).__name__)
        wsman, self._wsman = self._wsman, None
        if wsman is not None:
            try:
                wsman.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the WinRM session failed: %s", type(exc).__name__)

    # -- internals ---------------------------------------------------------------------------------------------

    def _cert_validation(self) -> bool | str:
        t = self.target
        if not t.https or t.insecure_skip_verify or t.cert_fingerprint:
            return False
        if t.ca_bundle is not None:
            return str(t.ca_bundle)
        return True

    def _learn_envelope_size(self) -> None:
        """Read ``MaxEnvelopeSizekb`` from the server config ([MS-WSMV] 3.1.4.1 Get); keep 150 KiB if unreadable."""
        wsman = self._require_wsman()
        try:
            self._call(lambda: wsman.update_max_payload_size())
        except _Fault as fault:
            log.debug("reading MaxEnvelopeSizekb failed (fault %s); using 150 KiB", fault.code)
            return
        if wsman.max_envelope_size <= 0:
            wsman.update_max_payload_size(DEFAULT_ENVELOPE_BYTES)

    def _open_shell(self, deadline: float | None) -> None:
        """Create a cmd shell; on the shell quota fault, back off and retry until ``deadline``."""
        delay = 1.0
        while True:
            shell = WinRS(self._require_wsman(), codepage=UTF8_CODEPAGE)
            try:
                self._call(shell.open)
                self._shell = shell
                return
            except _Fault as fault:
                if fault.code != WSManFaultCode.SHELL_QUOTA or remaining(deadline) < delay:
                    raise fault.translate() from fault.__cause__
                log.warning("the server's shell quota (MaxShellsPerUser) is full; retrying in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def _recycle_shell(self, deadline: float | None) -> None:
        """Delete the shell (freeing its operations) and open a new one."""
        shell, self._shell = self._shell, None
        if shell is not None:
            try:
                self._call(shell.close)
            except (_Fault, WinbuilderError) as exc:
                log.debug("deleting the old shell failed: %s", exc)
        self._open_shell(deadline)

    def _start_command(self, command_line: str, deadline: float | None) -> str:
        """Send Command; on a per-user quota fault recycle the shell once and retry."""
        for attempt in (1, 2):
            try:
                response = self._call(lambda: self._require_shell().command(command_line, None))
            except _Fault as fault:
                if fault.code in QUOTA_FAULTS and attempt == 1:
                    log.warning("WinRM quota reached (fault %s); opening a fresh shell", fault.code)
                    self._recycle_shell(deadline)
                    continue
                raise fault.translate() from fault.__cause__
            elem = response.find("rsp:CommandResponse/rsp:CommandId", namespaces=NAMESPACES)
            if elem is None or not elem.text:
                raise ProtocolError("the server's CommandResponse has no CommandId", "check the WinRM service")
            return str(elem.text)
        raise AssertionError("unreachable")

    def _send_stdin(self, command_id: str, stdin: Iterable[bytes] | None, deadline: float | None) -> None:
        """Send stdin in envelope-sized chunks, the last with End="true"; with no stdin, an empty End (EOF).

        The ``rsp:Send`` bodies (base64 included) are built in a background thread (``staging.prefetch``), so
        reading the workspace and encoding overlap with waiting for the server.
        """
        shell = self._require_shell()
        wsman = self._require_wsman()
        selectors = SelectorSet()
        selectors.add_option("ShellId", str(shell.id))
        pieces = _lookahead(chunks(stdin or (), self.max_stdin_chunk))
        bodies = prefetch(((send_body(piece, command_id, last), len(piece)) for piece, last in pieces), depth=3)
        sent_any = False
        for body, size in bodies:
            if remaining(deadline) <= 0:
                raise DeadlineExceeded("the command ran past --timeout while sending input", "raise --timeout")
            self._call(partial(wsman.send, shell.resource_uri, body, selector_set=selectors))
            self._counts.stdin_bytes += size
            sent_any = True
        if not sent_any:
            self._call(partial(wsman.send, shell.resource_uri, send_body(b"", command_id, True),
                               selector_set=selectors))

    def _terminate(self, command_id: str) -> None:
        """Signal terminate ([MS-WSMV] 3.1.4.12); best effort, never raises."""
        shell = self._shell
        if shell is None or self._wsman is None:
            return
        try:
            self._call(lambda: shell.signal(SignalCode.TERMINATE, command_id))
        except (_Fault, WinbuilderError) as exc:
            log.debug("Signal terminate failed: %s", exc)

    def _require_wsman(self) -> WSMan:
        if self._wsman is None:
            raise ConnectionFailed("not connected", "call connect() first")
        return self._wsman

    def _require_shell(self) -> WinRS:
        if self._shell is None:
            raise ConnectionFailed("no WinRM shell is open", "call connect() first")
        return self._shell

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one WS-Man operation, counting it and translating foreign errors.

        Raises:
            _Fault: a WSManFault the caller may handle (others call ``.translate()``).
            WinbuilderError subclasses for everything else.
        """
        self._counts.requests += 1
        try:
            return fn()
        except WSManFaultError as exc:
            raise _Fault(exc) from exc
        except Exception as exc:
            raise _translate(exc, self.target) from exc


class _Fault(Exception):
    """Internal: a WSManFault with its numeric code, before translation."""

    def __init__(self, exc: WSManFaultError) -> None:
        super().__init__(exc)
        self.exc = exc
        try:
            self.code = int(exc.code)
        except (TypeError, ValueError):
            self.code = 0

    def translate(self) -> WinbuilderError:
        reason = (self.exc.reason or "").strip().splitlines()[0:1]
        text = f"WinRM fault {self.code}" + (f": {reason[0]}" if reason else "")
        if self.code in QUOTA_FAULTS:
            return ConnectionFailed(text, "close other WinRM sessions for this user or raise the WinRM quotas")
        if self.code == WSManFaultCode.ENVELOPE_TOO_LARGE:
            return ProtocolError(text, "lower the server's MaxEnvelopeSizekb mismatch; report this as a bug")
        return ProtocolError(text, "check the WinRM service on the server")


def _translate(exc: BaseException, target: WinRMTarget) -> WinbuilderError:
    """Map a pypsrp/requests/urllib3 exception to a winbuilder error. Messages carry no secrets."""
    where = f"{target.host}:{target.port}"
    if isinstance(exc, WinbuilderError):
        return exc
    if isinstance(exc, AuthenticationError):
        return AuthError(f"{where} refused the credentials of user {target.user!r}",
                         "check the user name and password (WINBUILDER_PASSWORD or --password-file)")
    if isinstance(exc, requests.exceptions.SSLError):
        text = str(exc)
        if "fingerprint" in text.lower():
            return SecurityError(f"the certificate of {where} does not match the pinned fingerprint",
                                 "check --cert-sha256/--cert-thumbprint; no credential was sent")
        return SecurityError(f"the certificate of {where} could not be verified",
                             "pass --ca-bundle, --cert-sha256 or --cert-thumbprint; no credential was sent")
    if isinstance(exc, requests.exceptions.Timeout):
        return ConnectionFailed(f"{where} did not answer in time", "check the address, port and firewall")
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.ChunkedEncodingError):
        return ConnectionFailed(f"the connection to {where} failed or dropped",
                                "check the address, port, firewall and that WinRM is listening")
    if isinstance(exc, WinRMTransportError):
        code = getattr(exc, "code", 0)
        if code == 413:
            return ProtocolError(f"{where} refused a request as too large (HTTP 413)",
                                 "the server's MaxEnvelopeSizekb is smaller than it reported")
        return ConnectionFailed(f"{where} answered HTTP {code}", "check the WinRM service on the server")
    if isinstance(exc, WinRMError):
        return ProtocolError(f"WinRM error from {where}: {type(exc).__name__}", "check the WinRM service")
    return ProtocolError(f"unexpected error talking to {where}: {type(exc).__name__}", "report this as a bug")


def send_body(data: bytes, command_id: str, end: bool) -> ET.Element:
    """The ``rsp:Send`` body carrying ``data`` to the command's stdin ([MS-WSMV] 2.2.4.35, 3.1.4.13).

    ``End="true"`` on the last chunk closes the command's stdin.
    """
    rsp = NAMESPACES["rsp"]
    body = ET.Element(f"{{{rsp}}}Send")
    stream = ET.SubElement(body, f"{{{rsp}}}Stream", Name="stdin", CommandId=command_id)
    if end:
        stream.attrib["End"] = "true"
    stream.text = base64.b64encode(data).decode("ascii")
    return body


def _lookahead(pieces: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Yield (piece, is_last) so the last Send can carry End="true" without an extra empty request."""
    it = iter(pieces)
    try:
        prev = next(it)
    except StopIteration:
        return
    for piece in it:
        yield prev, False
        prev = piece
    yield prev, True

