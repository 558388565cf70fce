"""One emulated GCE Windows guest: addresses, WinRM listeners, serial ports, guest attributes, password agent.

What a real GCE Windows image does, and what the emulator does instead:

* The instance has an internal IP and, when an access config was requested, an external (NAT) IP. Here they are
  loopback addresses: external ``127.0.0.N`` and internal ``127.0.1.N`` (same N, N >= 2, chosen so that the guest
  port is free on both).
* The image's WinRM HTTPS listener on 5986 uses a self-signed certificate created at first boot. Here one
  certificate (``winbuilder.emulator.tls``) is served by a WS-Man host on each address, on ``port`` (5986 by
  default, configurable in the emulator).
* A VPC firewall guards the external address: the external listener admits a connection only when
  ``admits(client_ip, port)`` says a firewall rule allows it. The internal address stands for "inside the VPC" and
  is not checked.
* Boot takes ``boot_seconds``; serial port 1 then logs the listener certificate's thumbprint and
  ``Instance setup finished``. With metadata ``enable-guest-attributes=TRUE`` the thumbprint (upper-case hex SHA-1
  of the DER certificate, as Windows shows it) is published as guest attribute ``hostkeys/winrm``.
* The guest agent watches metadata ``windows-keys`` after boot (``winbuilder.emulator.agent``), writes its answers to
  serial port 4 and sets the password on the listeners.
* Serial ports keep the last ``serial_buffer_bytes`` bytes (1 MB on GCE); offsets count bytes from boot.
* With metadata ``enable-windows-ssh=TRUE`` at insert time (``GuestSpec.ssh``) the image's OpenSSH server starts at
  boot. Here a real sshd (``winbuilder.emulator.sshd``) runs on a private port of the internal address, behind a
  ``FilteredProxy`` on ``ssh_port`` (22 as on GCE) of both addresses; the external one admits only what the VPC
  firewall allows, like the WinRM listeners. The ports are bound with the WinRM ones, so an address whose SSH port
  is taken is skipped. The keys of metadata ``ssh-keys`` (``USERNAME:ALGO BASE64 COMMENT`` lines, re-read on every
  change) are authorized, and the host key is published as guest attribute ``hostkeys/ssh-ed25519`` (``ALGO
  BASE64``, as in known_hosts). Limit: sshd can only log in the local user running the emulator, so every
  ``ssh-keys`` USERNAME is mapped onto that user: clients must log in as it (``winbuilder.emulator.sshd``).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from winbuilder.emulator.compute.faults import FaultSchedule

log = logging.getLogger(__name__)

#: Serial ports of a GCE instance.
SERIAL_PORTS = (1, 2, 3, 4)
#: GCE keeps this much output per serial port.
DEFAULT_SERIAL_BUFFER = 1024 * 1024
#: Default user the listeners accept before the agent has created one (no password: nobody can log in).
DEFAULT_USER = "Administrator"


class SerialPort:
    """A byte-offset serial console with a bounded buffer (the Compute ``getSerialPortOutput`` model).

    Args:
        capacity: bytes retained; older output is discarded.
    """

    def __init__(self, capacity: int = DEFAULT_SERIAL_BUFFER) -> None:
        self._capacity = capacity
        self._data = bytearray()
        self._base = 0  # offset of self._data[0]
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        """Appends UTF-8 text."""
        with self._lock:
            self._data += text.encode("utf-8")
            excess = len(self._data) - self._capacity
            if excess > 0:
                del self._data[:excess]
                self._base += excess

    def read(self, start: int | None) -> tuple[str, int, int]:
        """Reads from a byte offset, as ``getSerialPortOutput`` does.

        Args:
            start: byte offset (None or 0: from the oldest retained byte). An offset older than the retained
                buffer starts at the oldest retained byte; an offset past the end returns nothing. A negative
                offset counts back from the end.

        Returns:
            ``(contents, start, next)``: the text, the offset it really starts at, and the offset to ask next.
        """
        with self._lock:
            end = self._base + len(self._data)
            if start is None:
                begin = self._base
            elif start < 0:
                begin = max(self._base, end + start)
            else:
                begin = min(max(start, self._base), end)
            chunk = bytes(self._data[begin - self._base:])
        return chunk.decode("utf-8", errors="replace"), begin, end


@dataclass(frozen=True)
class GuestSpec:
    """What a guest needs to know about its instance.

    Attributes:
        name: instance name (the Windows computer name and certificate CN).
        project, zone: where it lives (for log lines).
        external: whether an access config (external IP) was requested.
        port: the WinRM HTTPS port to listen on (5986 on GCE).
        boot_seconds: seconds from start to ``Instance setup finished``.
        agent_delay: seconds the agent takes to answer a new key.
        faults: the emulator's fault schedule (agent and WinRM entries apply here).
        serial_buffer_bytes: bytes each serial port retains.
        interpreter: argv prefix of the emulated ``cmd.exe`` (None: the WS-Man host's default).
        ssh: start an OpenSSH server at boot (metadata ``enable-windows-ssh=TRUE`` at insert time).
        ssh_port: its port on both addresses (22 on GCE; binding it needs root).
    """

    name: str
    project: str
    zone: str
    external: bool = True
    port: int = 5986
    boot_seconds: float = 2.0
    agent_delay: float = 0.1
    faults: FaultSchedule = FaultSchedule()
    serial_buffer_bytes: int = DEFAULT_SERIAL_BUFFER
    interpreter: tuple[str, ...] | None = None
    ssh: bool = False
    ssh_port: int = 22


class AddressPool:
    """Hands out guest numbers N (external 127.0.0.N, internal 127.0.1.N), N in 2..254, each once at a time."""

    def __init__(self) -> None:
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def candidates(self) -> list[int]:
        """Free numbers, lowest first."""
        with self._lock:
            return [n for n in range(2, 255) if n not in self._used]

    def claim(self, n: int) -> bool:
        """Marks N used; False if it already was."""
        with self._lock:
            if n in self._used:
                return False
            self._used.add(n)
            return True

    def release(self, n: int) -> None:
        """Frees N."""
        with self._lock:
            self._used.discard(n)


PROCESS_POOL = AddressPool()
"""The pool every emulator in this process shares, so two emulators never hand out (or re-bind) the same 127.0.0.N."""


def thumbprint(cert_pem_path: Path) -> str:
    """The Windows thumbprint of a PEM certificate: upper-case hex SHA-1 of the DER encoding."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_pem_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - the Windows thumbprint, not a security hash


class Guest:
    """One emulated Windows guest. Thread-safe; ``close()`` is idempotent.

    Args:
        spec: the instance facts and timings.
        admits: ``(client_ip, port) -> bool``, the VPC firewall of the external address.
        pool: the emulator's address pool.

    Raises:
        OSError: (from ``start``) no address in the pool had the port free.
    """

    def __init__(self, spec: GuestSpec, admits: Callable[[str, int], bool], pool: AddressPool) -> None:
        self.spec = spec
        self._admits = admits
        self._pool = pool
        self.number = 0
        self.external_ip: str | None = None
        self.internal_ip = ""
        self.port = spec.port
        self.serial = {p: SerialPort(spec.serial_buffer_bytes) for p in SERIAL_PORTS}
        self._attributes: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._hosts: list[Any] = []
        self._user = DEFAULT_USER
        self._password: str | None = None
        self._cert: Any = None
        self.thumbprint = ""
        self.booted = threading.Event()
        self._winrm_open_at: float | None = None
        self._closed = threading.Event()
        self._metadata: dict[str, str] = {}
        self._agent_queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._ssh_proxies: list[Any] = []
        self._sshd: Any = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Allocates the addresses, binds the listeners and starts booting.

        Raises:
            OSError: no free address had the port available; RuntimeError: the WS-Man host is unavailable.
        """
        from winbuilder.emulator import tls

        self._cert = tls.generate_self_signed(["localhost"], common_name=self.spec.name)
        self.thumbprint = self._cert.sha1.upper()
        last: OSError | None = None
        for n in self._pool.candidates():
            if not self._pool.claim(n):
                continue
            try:
                self._bind_ssh(n)
                self._bind(n)
            except OSError as exc:
                self._close_ssh()
                self._close_hosts()
                self._pool.release(n)
                if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                    raise
                last = exc
                continue
            self.number = n
            break
        else:
            self._cert.remove()
            ports = f"{self.spec.port}" + (f" and {self.spec.ssh_port}" if self.spec.ssh else "")
            raise OSError(errno.EADDRINUSE, f"no guest address has port {ports} free") from last
        for target, name in ((self._boot, "boot"), (self._agent_loop, "agent")):
            thread = threading.Thread(target=target, name=f"guest-{self.spec.name}-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _bind(self, n: int) -> None:
        internal = f"127.0.1.{n}"
        external = f"127.0.0.{n}" if self.spec.external else None
        self._hosts = []
        self._hosts.append(self._start_host(internal, self._inside_filter))
        if external is not None:
            self._hosts.append(self._start_host(external, self._outside_filter))
        self.internal_ip = internal
        self.external_ip = external

    def _bind_ssh(self, n: int) -> None:
        """Binds the SSH port of both addresses (proxies; sshd itself starts at boot)."""
        if not self.spec.ssh:
            return
        from winbuilder.emulator.tcp_proxy import FilteredProxy

        self._ssh_proxies = [FilteredProxy((f"127.0.1.{n}", self.spec.ssh_port), self._sshd_address,
                                           lambda ip: True)]
        if self.spec.external:
            self._ssh_proxies.append(FilteredProxy((f"127.0.0.{n}", self.spec.ssh_port), self._sshd_address,
                                                   lambda ip: self._admits(ip, self.spec.ssh_port)))

    def _sshd_address(self) -> tuple[str, int] | None:
        with self._lock:
            host = None if self.closed else self._sshd
        return None if host is None else (host.host, host.port)

    def _start_sshd(self) -> None:
        """Starts sshd on a private port of the internal address, with the ``ssh-keys`` of the metadata."""
        from winbuilder.emulator.sshd import SshHost, SshHostConfig, current_user, start_sshd

        root = Path(self._cert.directory) / "root"
        root.mkdir(exist_ok=True)
        keys = Path(self._cert.directory) / "ssh-keys"
        with self._lock:
            keys.write_text(_authorized_keys(self._metadata.get("ssh-keys", "")))
        host: SshHost | None
        try:
            host = start_sshd(SshHostConfig(user=current_user(), root=root, authorized_keys=keys,
                                            listen_host=self.internal_ip))
        except Exception as exc:  # the guest goes on without SSH, as a failed service would
            log.warning("guest %s: sshd did not start: %s", self.spec.name, exc)
            self.serial[1].write(f"{_stamp()} GCEInstanceSetup: OpenSSH server failed to start.\r\n")
            return
        current = ""
        with self._lock:
            if not self.closed:
                self._sshd, host = host, None
                current = self._metadata.get("ssh-keys", "")
        if host is not None:  # closed meanwhile
            host.close()
            return
        self._write_ssh_keys(current)
        self.serial[1].write(f"{_stamp()} GCEInstanceSetup: OpenSSH server started (enable-windows-ssh).\r\n")

    def _write_ssh_keys(self, value: str) -> None:
        """Replaces sshd's authorized keys with the keys of an ``ssh-keys`` value (atomic rename)."""
        with self._lock:
            host = self._sshd
        if host is None:
            return
        path = Path(host.workdir) / "authorized_keys"
        tmp = path.with_suffix(".new")
        tmp.write_text(_authorized_keys(value))
        tmp.chmod(0o600)
        tmp.replace(path)

    def _close_ssh(self) -> None:
        with self._lock:
            proxies, self._ssh_proxies = self._ssh_proxies, []
            host, self._sshd = self._sshd, None
        for proxy in proxies:
            proxy.close()
        if host is not None:
            host.close()

    def _start_host(self, ip: str, connection_filter: Callable[[str], bool]) -> Any:
        from winbuilder.emulator.wsman.server import HostConfig, start_host

        root = Path(self._cert.directory) / "root"  # one C:\ drive behind both addresses
        root.mkdir(exist_ok=True)
        config = HostConfig(user=self._user, password=self._password, root=root, https=True,
                            cert_pem=self._cert.cert_pem_path, key_pem=self._cert.key_pem_path,
                            connection_filter=connection_filter, interpreter=self.spec.interpreter)
        return start_host(config, listen=(ip, self.spec.port))

    def close(self) -> None:
        """Stops the guest: listeners closed, threads told to stop, address released. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._agent_queue.put(None)
        self._close_ssh()
        self._close_hosts()
        if self.number:
            self._pool.release(self.number)
        if self._cert is not None:
            self._cert.remove()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed.is_set()

    def _close_hosts(self) -> None:
        with self._lock:
            hosts, self._hosts = self._hosts, []
        for host in hosts:
            try:
                host.close()
            except Exception:  # closing must never fail the caller
                log.debug("guest %s: closing a listener failed", self.spec.name, exc_info=True)

    # ----------------------------------------------------------------------------------------------- firewall
    def _winrm_open(self) -> bool:
        return self._winrm_open_at is not None and time.monotonic() >= self._winrm_open_at and not self.closed

    def _inside_filter(self, client_ip: str) -> bool:
        return self._winrm_open()

    def _outside_filter(self, client_ip: str) -> bool:
        return self._winrm_open() and self._admits(client_ip, self.spec.port)

    # ----------------------------------------------------------------------------------------------- boot
    def _boot(self) -> None:
        name = self.spec.name
        s1 = self.serial[1]
        s1.write("SeaBIOS (version 1.8.2-google)\r\nBooting from Hard Disk 0...\r\n")
        s1.write(f"{_stamp()} GCEGuestAgent: GCE Agent Started (version 20250101.00)\r\n")
        if self._closed.wait(self.spec.boot_seconds):
            return
        if self.spec.ssh:
            self._start_sshd()
        s1.write(f"{_stamp()} GCEInstanceSetup: Configuring WinRM...\r\n")
        s1.write(f"{_stamp()} GCEInstanceSetup: Waiting for WinRM to be running...\r\n")
        s1.write(f"{_stamp()} GCEInstanceSetup: WinRM certificate details: Subject: CN={name}, "
                 f"Thumbprint: {self.thumbprint}\r\n")
        with self._lock:
            self._publish_attributes()
            late = self.spec.faults.winrm_late
            self._winrm_open_at = time.monotonic() + late
            self.booted.set()
            keys = self._metadata.get("windows-keys")
        s1.write(f"{_stamp()} GCEInstanceSetup: ------------------------------------------------------------\r\n")
        s1.write(f"{_stamp()} GCEInstanceSetup: Instance setup finished. {name} is ready to use.\r\n")
        s1.write(f"{_stamp()} GCEInstanceSetup: ------------------------------------------------------------\r\n")
        if keys is not None:
            self._agent_queue.put(keys)
        drop = self.spec.faults.winrm_drop_after
        if drop is not None and not self._closed.wait(late + drop):
            s1.write(f"{_stamp()} GCEGuestAgent: WinRM service stopped.\r\n")
            self._close_hosts()

    def _publish_attributes(self) -> None:
        if self._metadata.get("enable-guest-attributes", "").upper() == "TRUE":
            self._attributes[("hostkeys", "winrm")] = self.thumbprint
            if self._sshd is not None:
                self._attributes[("hostkeys", "ssh-ed25519")] = self._sshd.host_public_key

    # ----------------------------------------------------------------------------------------------- metadata
    def on_metadata(self, items: dict[str, str]) -> None:
        """Tells the guest the instance metadata changed (call after every change; cheap when nothing did).

        Args:
            items: the whole metadata as key -> value.
        """
        with self._lock:
            before = self._metadata.get("windows-keys")
            ssh_before = self._metadata.get("ssh-keys")
            self._metadata = dict(items)
            if self.booted.is_set():
                self._publish_attributes()
            changed = self.booted.is_set() and items.get("windows-keys") != before
        if changed:
            self._agent_queue.put(items.get("windows-keys", ""))
        if items.get("ssh-keys") != ssh_before:
            self._write_ssh_keys(items.get("ssh-keys", ""))

    def _agent_loop(self) -> None:
        from winbuilder.emulator.agent import WindowsKeysAgent

        agent = WindowsKeysAgent(serial=self.serial[4].write, set_password=self._set_password,
                                 now=lambda: datetime.now(UTC),
                                 delay=self.spec.agent_delay + self.spec.faults.agent_delay,
                                 sleep=lambda s: None if self._closed.wait(s) else None)
        while True:
            value = self._agent_queue.get()
            if value is None or self.closed:
                return
            if self.spec.faults.agent_error is not None:
                agent.fail_next = self.spec.faults.agent_error
            try:
                agent.on_metadata(value)
            except Exception:  # the agent must not die; the real one logs and goes on
                log.exception("guest %s: agent failed", self.spec.name)

    def _set_password(self, user: str, password: str) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("the instance is shutting down")
            self._password = password
            hosts = list(self._hosts)
            same_user = user.lower() == self._user.lower()
            self._user = user
        if same_user or _accepts_user(hosts):
            for host in hosts:
                if _accepts_user(hosts):
                    host.set_password(password, user=user)
                else:
                    host.set_password(password)
            return
        # The listener knows one account: a new user means new listeners on the same addresses and cert.
        self._close_hosts()
        with self._lock:
            n = self.number
        self._bind(n)

    # ----------------------------------------------------------------------------------------------- queries
    def attributes(self, query_path: str | None = None, key: str | None = None) -> list[tuple[str, str, str]]:
        """Guest attributes under a query path (``hostkeys/`` or ``hostkeys/winrm``) or one ``namespace/key``.

        Returns:
            ``(namespace, key, value)`` triples, sorted.
        """
        with self._lock:
            items = sorted((ns, k, v) for (ns, k), v in self._attributes.items())
        path = (key if key is not None else query_path or "").strip("/")
        if not path:
            return items
        ns, _, name = path.partition("/")
        return [(n, k, v) for n, k, v in items if n == ns and (not name or k == name)]

    def status(self) -> dict[str, Any]:
        """A summary for assertions and logs (no secrets)."""
        return {"name": self.spec.name, "external_ip": self.external_ip, "internal_ip": self.internal_ip,
                "port": self.port, "booted": self.booted.is_set(), "winrm_open": self._winrm_open(),
                "thumbprint": self.thumbprint, "closed": self.closed, "user": self._user,
                "ssh_port": self.spec.ssh_port if self.spec.ssh else None, "sshd": self._sshd is not None}


def _accepts_user(hosts: list[Any]) -> bool:
    if not hosts:
        return False
    try:
        return "user" in inspect.signature(hosts[0].set_password).parameters
    except (TypeError, ValueError):
        return False


def _authorized_keys(ssh_keys: str) -> str:
    """An authorized_keys text from an ``ssh-keys`` metadata value: the ``ALGO BASE64 COMMENT`` part of every
    ``USERNAME:...`` line, whatever USERNAME (all map onto the local user); a comment line when there is none."""
    keys = [line.partition(":")[2].strip() for line in ssh_keys.splitlines() if ":" in line]
    keys = [k for k in keys if k and not k.startswith("#")]
    return "\n".join(keys or ["# no ssh-keys in the instance metadata"]) + "\n"


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y/%m/%d %H:%M:%S")
