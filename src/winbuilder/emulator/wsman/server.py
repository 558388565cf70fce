"""The emulated WinRM listener: WS-Management over HTTP(S) ([MS-WSMV] 2.1, 3.1.4), one thread per TCP connection.

In process::

    host = start_host(HostConfig(user="builder", password="...", https=True), listen=("127.0.0.1", 0))
    host.url, host.port, host.cert_sha256, host.cert_sha1, host.cert_pem_path
    host.stats(); host.set_password("new"); host.close()

From the command line, ``winbuilder emulator host`` calls ``main()``.

Behaviour worth knowing (see also ``emulator/COVERAGE.md``):

* NTLM (Negotiate) is per connection; the 401 challenge carries exactly one ``WWW-Authenticate`` header; an
  empty-body POST that completes authentication is answered 200.
* Over plain HTTP only ``multipart/encrypted`` bodies are accepted (``AllowUnencrypted=false``); others get 401.
* A request larger than ``MaxEnvelopeSizekb`` gets HTTP 413 with an empty body (what Windows' listener answers;
  clients show "Bad HTTP response returned from the server. Code: 413").
* ``connection_filter(client_ip) -> False`` closes the new TCP connection at once, before reading anything: it
  stands for a VPC firewall drop (the client sees a reset, not a timeout).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from winbuilder.emulator import tls
from winbuilder.emulator.wsman import envelope as env
from winbuilder.emulator.wsman.auth import CredentialFile, NegotiateAcceptor, check_basic
from winbuilder.emulator.wsman.faults import FaultCounter, FaultSchedule
from winbuilder.emulator.wsman.shells import Launch, Limits, ShellTable, default_interpreter

MACHINE = "WINBUILDER-EMU"
_WIRE_SLACK = 64 * 1024  # encryption framing on top of MaxEnvelopeSize before we refuse unread
_IDLE_CONNECTION_TIMEOUT = 300.0  # seconds a keep-alive connection may sit idle


@dataclass(frozen=True)
class HostConfig:
    """Configuration of one emulated WinRM host.

    Attributes:
        user: the Windows account name accepted (case-insensitive; ``.\\user`` also works).
        password: its password; None means no credential works until ``Host.set_password``.
        root: sandbox directory holding the drive letters (``C:\\`` is ``root/C``); None: a temp dir, removed on
            close.
        https: HTTPS (5986 style) when True, else HTTP with NTLM message encryption (5985 style).
        rtt: injected delay per HTTP request, seconds.
        max_envelope_kb: MaxEnvelopeSizekb (requests above it get 413; Receive responses stay below it).
        max_shells: MaxShellsPerUser.
        max_ops: MaxConcurrentOperationsPerUser (shell creations + commands, until the shell is deleted).
        max_timeout_ms: MaxTimeoutms; longer OperationTimeouts are clamped.
        basic: accept Basic auth (HTTPS only), off by default as on GCE images.
        faults: injected failures (see ``faults.py``).
        cert_pem: certificate to serve (PEM path); None: generate a self-signed one.
        key_pem: its private key (PEM path), required with ``cert_pem``.
        connection_filter: called with the client IP on every new connection; False closes it unread.
        interpreter: argv prefix of the emulated cmd.exe; None: ``python -m winbuilder.emulator.cmd``.
    """

    user: str
    password: str | None = field(default=None, repr=False)
    root: Path | str | None = None
    https: bool = True
    rtt: float = 0.0
    max_envelope_kb: int = 500
    max_shells: int = 30
    max_ops: int = 1500
    max_timeout_ms: int = 60000
    basic: bool = False
    faults: FaultSchedule | None = None
    cert_pem: Path | None = None
    key_pem: Path | None = None
    connection_filter: Callable[[str], bool] | None = None
    interpreter: tuple[str, ...] | None = None


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.actions: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def action(self, name: str) -> None:
        with self.lock:
            self.actions[name] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    host: Host

    def verify_request(self, request: Any, client_address: Any) -> bool:
        filt = self.host.config.connection_filter
        ok = True
        if filt is not None:
            try:
                ok = bool(filt(str(client_address[0])))
            except Exception:  # a broken filter must not kill the accept loop
                ok = False
        if not ok:
            self.host._stats.add("connections_refused")
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        return ok

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.host._stats.add("connection_errors")


class Host:
    """A running emulated WinRM host; create with ``start_host``.

    Attributes:
        url: the endpoint, e.g. ``https://127.0.0.1:PORT/wsman``.
        port: the TCP port.
        cert_sha256: hex SHA-256 of the DER certificate (None over HTTP).
        cert_sha1: hex SHA-1 of it, the Windows thumbprint (None over HTTP).
        cert_pem_path: the certificate PEM (a CA bundle for clients), None over HTTP.
        root: the sandbox directory.
    """

    def __init__(self, config: HostConfig, listen: tuple[str, int]) -> None:
        self.config = config
        self._stats = _Stats()
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._faults = FaultCounter(config.faults)
        self._creds = CredentialFile(config.user, config.password)
        self._own_root = config.root is None
        self.root = Path(tempfile.mkdtemp(prefix="wb-root-")) if config.root is None else Path(config.root).resolve()
        (self.root / "C" / "Users" / config.user).mkdir(parents=True, exist_ok=True)
        self._state_dir = Path(tempfile.mkdtemp(prefix="wb-wsman-"))
        self.shells = ShellTable(
            Limits(config.max_shells, config.max_ops, config.max_timeout_ms / 1000.0),
            Launch(config.interpreter or default_interpreter(), self.root, self._state_dir, config.user),
            default_workdir=f"C:\\Users\\{config.user}")
        self._bundle: tls.CertBundle | None = None
        self.ssl_context: ssl.SSLContext | None = None
        try:
            if config.https:
                if config.cert_pem is not None:
                    if config.key_pem is None:
                        raise ValueError("cert_pem needs key_pem")
                    self._bundle = tls.load_bundle(Path(config.cert_pem), Path(config.key_pem))
                else:
                    self._bundle = tls.generate_self_signed([listen[0], "localhost"])
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(self._bundle.cert_pem_path, self._bundle.key_pem_path)
                self.ssl_context = ctx
            self._server = _Server(listen, _Handler, bind_and_activate=True)
        except BaseException:
            self._cleanup_files()
            raise
        self._server.host = self
        self.port: int = self._server.server_address[1]
        scheme = "https" if config.https else "http"
        addr = listen[0] if ":" not in listen[0] else f"[{listen[0]}]"
        self.url = f"{scheme}://{addr}:{self.port}/wsman"
        self.cert_sha256 = self._bundle.sha256 if self._bundle else None
        self.cert_sha1 = self._bundle.sha1 if self._bundle else None
        self.cert_pem_path = self._bundle.cert_pem_path if self._bundle else None
        self.server_config = env.ServerConfig(config.max_envelope_kb, config.max_timeout_ms, config.max_shells,
                                              config.max_ops, config.basic)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"wsman-{self.port}", daemon=True)
        self._thread.start()

    @property
    def user(self) -> str:
        """The accepted user name."""
        return self.config.user

    def set_password(self, password: str | None) -> None:
        """Replace the credential (atomically; in-flight authentications see the old or the new one).

        Raises:
            OSError: the credential file cannot be written.
        """
        self._creds.set_password(password)

    def stats(self) -> dict[str, Any]:
        """Counters: ``requests`` (by action), ``http_requests``, ``bytes_in``, ``bytes_out``, ``auth_failures``,
        ``connections``, ``connections_refused``, plus ``shells``/``operations``/``commands_running`` now."""
        with self._stats.lock:
            out: dict[str, Any] = {"requests": dict(self._stats.actions)}
            for key in ("http_requests", "bytes_in", "bytes_out", "auth_failures", "connections",
                        "connections_refused", "connection_errors", "faults_injected", "internal_errors"):
                out[key] = self._stats.counters.get(key, 0)
        out.update(self.shells.counts())
        return out

    def shell_info(self) -> list[dict[str, Any]]:
        """The open shells (id, codepage, working directory, environment), for tests."""
        with self.shells._lock:
            return [{"id": s.id, "codepage": s.codepage, "workdir": s.workdir,
                     "environment": dict(s.spec.environment), "commands": list(s.commands)}
                    for s in self.shells._shells.values()]

    def close(self) -> None:
        """Stop serving, kill all commands, close open connections and delete temp files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self.shells.close_all()
        self._thread.join(timeout=5)
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        self._creds.remove()
        if self._bundle is not None:
            self._bundle.remove()
        shutil.rmtree(self._state_dir, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request processing (sans socket) ------------------------------------------------------------------------

    def dispatch(self, data: bytes, client_ip: str) -> tuple[int, bytes, str]:
        """Handle one decrypted envelope. Returns ``(http_status, body, disposition)`` where disposition is
        ``"reply"``, ``"drop"`` (close without answering) or ``"drop_after"`` (performed, then close)."""
        relates = ""
        try:
            req = env.parse_request(data)
            relates = req.message_id
            self._stats.action(req.action)
            rule = self._faults.next(req.action)
            disposition = "reply"
            if rule is not None:
                self._stats.add("faults_injected")
                if rule.kind == "drop":
                    if not rule.after:
                        return 0, b"", "drop"
                    disposition = "drop_after"
                elif rule.kind == "http_status":
                    return rule.status, b"", "reply"
                else:
                    raise env.Fault(rule.code, "QuotaLimit" if rule.code in (2150859173, 2150859174)
                                    else "InternalError", f"Injected fault {rule.code}.")
            return 200, self._perform(req, client_ip), disposition
        except env.Fault as fault:
            return fault.http_status, env.build_fault(fault, relates, MACHINE), "reply"
        except Exception as exc:  # an emulator bug must still produce a well-formed answer
            self._stats.add("internal_errors")
            internal = env.Fault(0x80004005, "InternalError", f"Internal error in the emulator: {type(exc).__name__}")
            return 500, env.build_fault(internal, relates, MACHINE), "reply"

    def _perform(self, req: env.Request, client_ip: str) -> bytes:
        action, rid = req.action, req.message_id
        if action == "Get":
            if req.resource_uri.rstrip("/") == env.RESOURCE_CONFIG:
                return env.build_config_response(rid, self.server_config)
            if req.resource_uri in (env.RESOURCE_SHELL, env.RESOURCE_CMD):
                shell = self.shells.get(req.selectors.get("ShellId"))
                return env.build_shell_get_response(rid, env.shell_fields(
                    shell.id, shell.owner, shell.client_ip, shell.spec, shell.idle_timeout))
            raise _unknown_resource(req.resource_uri)
        if action not in ("Create", "Command", "Send", "Receive", "Signal", "Delete"):
            raise env.Fault(env.FaultCode.ACTION_NOT_SUPPORTED, "ActionNotSupported",
                            f"The action {req.action_uri} is not supported by the service.", sender=True)
        if req.resource_uri != env.RESOURCE_CMD:
            raise _unknown_resource(req.resource_uri)
        if action == "Create":
            spec = env.parse_shell(req.body)
            shell = self.shells.create(spec, req.options, self.config.user, client_ip)
            return env.build_create_response(rid, self.url, shell.id, self.config.user, client_ip, spec,
                                             shell.idle_timeout)
        shell = self.shells.get(req.selectors.get("ShellId"))
        if action == "Delete":
            self.shells.delete(shell.id)
            return env.build_empty_response("Delete", rid)
        if action == "Command":
            cspec = env.parse_command(req.body)
            cmd = self.shells.command(shell, cspec.line, cspec.command_id)
            return env.build_command_response(rid, cmd.id)
        if action == "Send":
            for chunk in env.parse_send(req.body):
                self.shells.find_command(shell, chunk.command_id).send(chunk.data, chunk.end)
            return env.build_empty_response("Send", rid)
        if action == "Signal":
            cid, code = env.parse_signal(req.body)
            self.shells.find_command(shell, cid).signal(code)
            return env.build_empty_response("Signal", rid)
        # Receive
        rspec = env.parse_receive(req.body)
        cmd = self.shells.find_command(shell, rspec.command_id)
        limit = self.config.max_envelope_kb * 1024
        if req.max_envelope_size:
            limit = min(limit, req.max_envelope_size)
        max_bytes = max(1024, (limit - env.receive_overhead(cmd.id)) * 3 // 4)
        timeout = min(req.operation_timeout or self.shells.limits.max_timeout_s, self.shells.limits.max_timeout_s)
        res = cmd.receive(timeout, max_bytes)
        return env.build_receive_response(rid, cmd.id, res.chunks, res.done, res.exit_code, rspec.streams)


def _unknown_resource(uri: str) -> env.Fault:
    return env.Fault(env.FaultCode.DESTINATION_UNREACHABLE, "DestinationUnreachable",
                     f"The WS-Management service cannot process the request. The resource URI {uri} was not found.",
                     sender=True)


class _Handler(BaseHTTPRequestHandler):
    """One TCP connection (HTTP/1.1 keep-alive); holds that connection's NTLM state."""

    protocol_version = "HTTP/1.1"
    server_version = "Microsoft-HTTPAPI/2.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = _IDLE_CONNECTION_TIMEOUT
    server: _Server

    def setup(self) -> None:
        host = self.server.host
        self._raw = self.request
        with host._conns_lock:
            host._conns.add(self._raw)
        host._stats.add("connections")
        self._acceptor = NegotiateAcceptor(host._creds)
        if host.ssl_context is not None:
            self.request.settimeout(15)
            self.request = host.ssl_context.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        host = self.server.host
        with host._conns_lock:
            host._conns.discard(self._raw)
        self._acceptor.reset()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # quiet: tests and benchmarks read stdout/stderr

    def _reply(self, status: int, body: bytes = b"", content_type: str | None = None,
               auth: list[str] | None = None, close: bool = False) -> None:
        host = self.server.host
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}", "Server: Microsoft-HTTPAPI/2.0"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        for value in auth or []:
            lines.append(f"WWW-Authenticate: {value}")
        lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + body)
        host._stats.add("bytes_out", len(head) + len(body))

    def _challenge(self) -> list[str]:
        values = ["Negotiate"]
        if self.server.host.config.basic and self.server.host.config.https:
            values.append('Basic realm="WSMAN"')
        return values

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._reply(405, close=False)

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        host = self.server.host
        cfg = host.config
        host._stats.add("http_requests")
        if cfg.rtt > 0:
            time.sleep(cfg.rtt)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._reply(411, close=True)
            return
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            self._reply(400, close=True)
            return
        max_env = cfg.max_envelope_kb * 1024
        if length > 2 * max_env + _WIRE_SLACK:
            self._reply(413, close=True)
            return
        body = self.rfile.read(length) if length else b""
        host._stats.add("bytes_in", len(body))
        if self.path.split("?")[0].lower() != "/wsman":
            self._reply(404)
            return

        final_token: list[str] = []
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        scheme = scheme.lower()
        if scheme in ("negotiate", "ntlm"):
            try:
                token = base64.b64decode(value.strip(), validate=True)
            except ValueError:
                token = b""
            res = self._acceptor.step(token) if token else None
            if res is None or res.failed:
                host._stats.add("auth_failures")
                self._acceptor.reset()
                self._reply(401, auth=["Negotiate"])
                return
            if not res.complete:
                self._reply(401, auth=["Negotiate " + base64.b64encode(res.token or b"").decode()])
                return
            if res.token:
                final_token = ["Negotiate " + base64.b64encode(res.token).decode()]
        elif scheme == "basic" and cfg.basic and cfg.https:
            if not check_basic(value, cfg.user, host._creds):
                host._stats.add("auth_failures")
                self._reply(401, auth=self._challenge())
                return
        elif not self._acceptor.complete:
            self._reply(401, auth=self._challenge())
            return

        ctype = self.headers.get("Content-Type", "")
        encrypted = ctype.lower().startswith("multipart/encrypted")
        if encrypted:
            try:
                data = self._acceptor.unwrap(body, ctype)
            except ValueError:
                self._reply(400, close=True)
                return
        else:
            data = body
            if data and not cfg.https:
                # AllowUnencrypted=false: Windows refuses clear-text SOAP over HTTP.
                host._stats.add("auth_failures")
                self._reply(401, auth=self._challenge())
                return
        if not data:
            self._reply(200, auth=final_token)
            return
        if len(data) > max_env:
            self._reply(413, auth=final_token)
            return

        client_ip = str(self.client_address[0])
        status, resp, disposition = host.dispatch(data, client_ip)
        if disposition != "reply":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if not resp:
            self._reply(status, auth=final_token)
            return
        if encrypted:
            out_type, resp = self._acceptor.wrap(resp)
        else:
            out_type = "application/soap+xml;charset=UTF-8"
        self._reply(status, resp, out_type, auth=final_token)


def start_host(config: HostConfig, listen: tuple[str, int] = ("127.0.0.1", 0)) -> Host:
    """Start an emulated WinRM host serving in a background thread.

    Args:
        config: what to emulate.
        listen: ``(address, port)``; port 0 picks a free one (read it back from ``host.port``).

    Returns:
        The running host; call ``close()`` when done.

    Raises:
        OSError: the address cannot be bound or temp files cannot be written.
        ValueError: ``cert_pem`` given without ``key_pem``.
    """
    return Host(config, listen)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(listen: str, user: str, http: bool, root: str | None, basic: bool, max_envelope_kb: int, max_shells: int,
         max_ops: int, rtt_ms: float, faults: str | None) -> None:
    """Serve an emulated WinRM host in the foreground until SIGTERM/SIGINT (``winbuilder emulator host``).

    The password comes from ``WINBUILDER_PASSWORD`` (removed from the environment once read, so commands do not
    inherit it). Prints exactly one line, ``ready <url> cert-sha256=<hex|none>``, once serving.

    Raises:
        SystemExit: the password is missing or the arguments are invalid.
    """
    password = os.environ.pop("WINBUILDER_PASSWORD", None)
    if not password:
        raise SystemExit("WINBUILDER_PASSWORD must hold the password for --user")
    schedule = FaultSchedule.load(faults) if faults else None
    config = HostConfig(user=user, password=password, root=Path(root) if root else None, https=not http,
                        rtt=rtt_ms / 1000.0, max_envelope_kb=max_envelope_kb, max_shells=max_shells,
                        max_ops=max_ops, basic=basic, faults=schedule)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host = start_host(config, _parse_listen(listen))
    try:
        sys.stdout.write(f"ready {host.url} cert-sha256={host.cert_sha256 or 'none'}\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        host.close()
