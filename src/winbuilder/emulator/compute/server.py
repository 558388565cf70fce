"""The HTTP server of the GCE emulator: the Compute v1 API, the metadata server and an egress-IP echo, on one port.

Routing by path:

* ``/compute/v1/...`` -- the emulated Compute API (bearer token from the metadata server required).
* ``/`` and ``/computeMetadata/...`` -- the fake metadata server (``winbuilder.emulator.metadata``).
* ``GET /egress-ip`` -- the caller's address as plain text (a stand-in for a "what is my IP" service).

In-process use::

    emu = start_gce(GceEmulatorConfig(boot_seconds=0.2), listen=("127.0.0.1", 0))
    emu.compute_url, emu.metadata_host, emu.backend
    emu.close()

``main()`` is ``winbuilder emulator gce``: it prints ``ready compute=<url> metadata=<host:port>`` and serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from winbuilder.emulator import metadata
from winbuilder.emulator.compute import api, routes
from winbuilder.emulator.compute.errors import ApiError
from winbuilder.emulator.compute.faults import FaultSchedule
from winbuilder.emulator.compute.models import GceBackend, GceEmulatorConfig

__all__ = ["FaultSchedule", "GceEmulator", "GceEmulatorConfig", "main", "start_gce"]

log = logging.getLogger(__name__)

#: The zone the metadata server reports for "this VM".
RUNNER_ZONE = "us-central1-a"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: GceBackend
    identity: metadata.MetadataIdentity

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        raw = self._body()
        if url.path == "/egress-ip":
            self._send(200, "text/plain; charset=utf-8", (self.client_address[0] + "\n").encode())
            return
        if metadata.is_metadata_path(url.path):
            reply = metadata.handle(self.command, url.path, query, self.headers.get(metadata.FLAVOR_HEADER),
                                    self.server.identity)
            self._send(reply.status, reply.content_type, reply.body, reply.headers)
            return
        try:
            self.server.backend.check_token(self.headers.get("Authorization"))
            routed = routes.match(self.command, url.path)
            request = api.parse(routed, query, raw)
            result = self.server.backend.handle(request)
        except ApiError as exc:
            self._json(exc.code, exc.body(), exc.headers)
            return
        except Exception:  # a bug in the emulator: answer 500 like the API, keep serving
            log.exception("emulator error on %s %s", self.command, url.path)
            self._json(500, ApiError(500, "Internal error. Please try again or contact Google Support.",
                                     "backendError").body())
            return
        self._json(200, result)

    def _json(self, status: int, doc: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(status, "application/json; charset=UTF-8", json.dumps(doc).encode("utf-8"), headers)

    do_GET = _dispatch  # noqa: N815 - BaseHTTPRequestHandler's naming
    do_POST = _dispatch  # noqa: N815
    do_DELETE = _dispatch  # noqa: N815
    do_PUT = _dispatch  # noqa: N815
    do_PATCH = _dispatch  # noqa: N815


@dataclass(frozen=True)
class GceEmulator:
    """A running GCE emulator.

    Attributes:
        compute_url: ``http://HOST:PORT`` -- pass as ``client_options={"api_endpoint": ...}``.
        metadata_host: ``HOST:PORT`` -- the value of ``GCE_METADATA_HOST`` and ``GCE_METADATA_IP``.
        backend: the state (instances, disks, firewalls, operations, faults, ``reset()``).
        port: the TCP port.
    """

    compute_url: str
    metadata_host: str
    backend: GceBackend
    port: int
    _server: _Server
    _thread: threading.Thread

    def issue_token(self) -> str:
        """A valid bearer token (what the metadata server would hand out), for clients built in tests."""
        return self.backend.issue_token()[0]

    def close(self) -> None:
        """Stops serving and stops every guest. Idempotent."""
        self._server.shutdown()
        self._server.server_close()
        self.backend.close()
        self._thread.join(timeout=5)


def start_gce(config: GceEmulatorConfig | None = None, listen: tuple[str, int] = ("127.0.0.1", 0)) -> GceEmulator:
    """Starts the emulator in background threads.

    Args:
        config: settings (defaults: project ``test-project``, 2 s boot, guest port 5986).
        listen: ``(host, port)``; port 0 picks a free one.

    Returns:
        The running emulator; call ``close()``.

    Raises:
        OSError: the address cannot be bound.
    """
    config = config or GceEmulatorConfig()
    backend = GceBackend(config)
    try:
        server = _Server(listen, _Handler)
    except OSError:
        backend.close()
        raise
    server.backend = backend
    server.identity = metadata.MetadataIdentity(
        project=config.project, email=config.service_account_email, scopes=config.scopes, zone=RUNNER_ZONE,
        issue_token=backend.issue_token)
    host, port = server.server_address[0], server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="gce-emulator", daemon=True)
    thread.start()
    host_text = str(host)
    return GceEmulator(compute_url=f"http://{host_text}:{port}", metadata_host=f"{host_text}:{port}",
                       backend=backend, port=int(port), _server=server, _thread=thread)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(listen: str = "127.0.0.1:0", faults: str | None = None, boot_seconds: float = 2.0,
         **overrides: Any) -> None:
    """``winbuilder emulator gce``: serve until SIGTERM/SIGINT.

    Prints exactly ``ready compute=<url> metadata=<host:port>`` (flushed) once serving.

    Args:
        listen: ``HOST:PORT`` (port 0 picks one).
        faults: path of a JSON fault schedule (see ``faults.py``), or None.
        boot_seconds: emulated guest boot delay.
        overrides: other ``GceEmulatorConfig`` fields (e.g. ``guest_port``).

    Raises:
        ValueError: a malformed ``listen`` or fault file.
        OSError: the address cannot be bound.
    """
    schedule = FaultSchedule.load(faults) if faults else None
    config = replace(GceEmulatorConfig(), boot_seconds=boot_seconds, faults=schedule, **overrides)
    emu = start_gce(config, _parse_listen(listen))
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"ready compute={emu.compute_url} metadata={emu.metadata_host}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emu.close()
        sys.stdout.flush()
