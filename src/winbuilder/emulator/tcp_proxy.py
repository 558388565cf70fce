"""A small filtering TCP proxy: the VPC firewall in front of an emulated guest's sshd.

sshd cannot consult a Python predicate per connection (the WS-Man host's ``connection_filter`` can), so the guest's
SSH port is this proxy: each accepted connection is checked with ``admit(client_ip)`` and, when admitted and the
backend is up, spliced byte for byte to the backend (sshd on a private port). A refused connection is closed
unread, as the WS-Man host does: the client sees a reset or EOF, never an SSH banner.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

BUFFER = 64 * 1024
"""Bytes read per ``recv``."""
CONNECT_TIMEOUT = 5.0
"""Seconds to reach the backend."""


class FilteredProxy:
    """Listens on ``listen`` and splices admitted connections to ``backend()``. Thread-safe; ``close()`` idempotent.

    Args:
        listen: ``(host, port)`` to bind (port 0 picks one; read ``address`` back).
        backend: returns the ``(host, port)`` to splice to, or None while the service is down (connections are
            then closed at once).
        admit: ``client_ip -> bool``; False closes the connection unread (a firewall drop).

    Raises:
        OSError: (from the constructor) the address could not be bound.
    """

    def __init__(self, listen: tuple[str, int], backend: Callable[[], tuple[str, int] | None],
                 admit: Callable[[str], bool]) -> None:
        self._backend = backend
        self._admit = admit
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server(listen, backlog=64)
        self._listener.settimeout(0.25)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{listen[0]}:{self.address[1]}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops listening and cuts every spliced connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = list(self._live), set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in live:
            _close(sock)
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, str(peer[0])), daemon=True).start()

    def _serve(self, client: socket.socket, client_ip: str) -> None:
        try:
            admitted = self._admit(client_ip)
            target = self._backend() if admitted else None
        except Exception:  # a broken predicate must not kill the proxy
            log.debug("proxy filter failed", exc_info=True)
            target = None
        if target is None:
            _close(client)
            return
        try:
            upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._closed:
                _close(client)
                _close(upstream)
                return
            self._live.update((client, upstream))
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._live.difference_update((client, upstream))
        _close(client)
        _close(upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copies ``src`` to ``dst`` until EOF or an error, then half-closes ``dst``."""
    try:
        while data := src.recv(BUFFER):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
