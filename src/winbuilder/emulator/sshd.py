"""The emulated Windows host over SSH: a real OpenSSH ``sshd`` on loopback that runs the ``cmd.exe`` emulator.

Windows OpenSSH hands an exec request's command line to ``cmd.exe /c``. Here a real Debian ``sshd`` (package
``openssh-server``) serves the SSH protocol, and its ``ForceCommand`` runs ``winbuilder.emulator.cmd``, which reads
the command line from ``SSH_ORIGINAL_COMMAND``. Everything sshd needs (config, ed25519 host key, pid file,
authorized_keys, log) lives in a fresh 0700 temp dir that ``SshHost.close`` removes.

Limits, by design:

* Key authentication only. Password authentication would need a system account password (sshd checks the real
  password database), so ``PasswordAuthentication no``.
* The login user is the local user running the emulator: an unprivileged sshd can only log in as its own user (as
  root it can log in as root).
* Exit codes are 0..255: a Unix sshd cannot report Windows' 32-bit exit codes.
* sshd ignores ``signal`` channel requests for forced commands, and leaves a session's process running when its
  channel closes. Each session therefore runs under a small watchdog (``python -m winbuilder.emulator.sshd
  --session -- PROGRAM...``) that kills the program's process group as soon as sshd closes the session's
  stdout/stderr (channel closed by the client, or connection dropped), so "deadline passed, channel closed" leaves
  nothing running.

In-process use::

    host = start_sshd(SshHostConfig(user=getpass.getuser(), root=Path(tmp), authorized_keys=Path(pub)))
    host.url, host.host_key_fingerprint, host.known_hosts_path
    host.close()

Command line: ``winbuilder emulator host --transport ssh --user USER --authorized-keys FILE`` calls ``main``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from winbuilder.errors import ExitCode, UsageError, WinbuilderError

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
"""Where ``sshd`` is looked for (it must be started by absolute path so it can re-exec itself)."""

_BIND_FAILED = ("Cannot bind any address", "Address already in use")


@dataclass(frozen=True)
class SshHostConfig:
    """How to run the emulated SSH host.

    Attributes:
        user: login user; must be the user running the emulator (see the module docstring).
        root: sandbox directory of the ``cmd.exe`` emulator (``C:\\`` is ``ROOT/C``).
        authorized_keys: file with one or more OpenSSH public key lines (an ``authorized_keys`` file or a ``.pub``).
        listen_host: address to listen on.
        port: TCP port; 0 picks a free one.
        session_command: program (argv) each session runs; ``None`` runs ``winbuilder.emulator.cmd --root ROOT``.
            It gets the client's command line in ``SSH_ORIGINAL_COMMAND``.
        sshd_path: the sshd binary; ``None`` looks in ``SSHD_CANDIDATES`` and ``PATH``.
        startup_timeout: seconds to wait for sshd to accept connections.
    """

    user: str
    root: Path
    authorized_keys: Path
    listen_host: str = "127.0.0.1"
    port: int = 0
    session_command: tuple[str, ...] | None = None
    sshd_path: Path | None = None
    startup_timeout: float = 10.0


@dataclass
class SshHost:
    """A running sshd. Use ``close()`` (or ``with``) to stop it and remove its temp dir.

    Attributes:
        host: address it listens on.
        port: TCP port it listens on.
        user: the login user.
        host_key_fingerprint: ``SHA256:<base64>`` of the host key, as ``ssh-keygen -lf`` prints it.
        host_public_key: the host key as an OpenSSH public key line (``ssh-ed25519 AAAA...``).
        known_hosts_path: a known_hosts file with the ``[host]:port`` entry of this host.
        workdir: the 0700 temp dir with sshd's config, keys and log (``sshd.log``).
    """

    host: str
    port: int
    user: str
    host_key_fingerprint: str
    host_public_key: str
    known_hosts_path: Path
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """``ssh://user@host:port``."""
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL sshd and every connection it serves (emulates the server dying mid-command)."""
        _kill_tree(self.process, signal.SIGKILL)

    def close(self) -> None:
        """Terminate sshd and its connections, then remove the temp dir. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            _kill_tree(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill_tree(self.process, signal.SIGKILL)
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SshHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def current_user() -> str:
    """The name of the user this process runs as (from the password database, not ``$USER``)."""
    return pwd.getpwuid(os.getuid()).pw_name


def find_sshd(explicit: Path | None = None) -> Path | None:
    """Absolute path of the sshd binary, or ``None`` when it is not installed."""
    if explicit is not None:
        return explicit if explicit.is_file() else None
    for candidate in SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("sshd")
    return Path(found).resolve() if found else None


def fingerprint(public_key_line: str) -> str:
    """``SHA256:<unpadded base64>`` of an OpenSSH public key line, as ``ssh-keygen -lf`` prints it."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def start_sshd(config: SshHostConfig) -> SshHost:
    """Start sshd in the foreground and return once it accepts connections.

    Args:
        config: what to serve.

    Returns:
        The running host; the caller must ``close()`` it.

    Raises:
        UsageError: sshd is not installed, ``config.user`` is not the current user, or the authorized keys file is
            empty or unreadable.
        WinbuilderError: sshd did not start (the message carries the tail of its log).
    """
    sshd = find_sshd(config.sshd_path)
    if sshd is None:
        raise UsageError("sshd not found", "install it with `apt-get install openssh-server`")
    me = current_user()
    if config.user != me:
        raise UsageError(
            f"--user {config.user!r} is not the user running the emulator ({me!r})",
            f"sshd can only log in as its own user; pass --user {me}",
        )
    try:
        keys = [line for line in config.authorized_keys.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read authorized keys file {config.authorized_keys}: {exc.strerror}") from exc
    if not keys:
        raise UsageError(f"authorized keys file {config.authorized_keys} is empty", "the emulator needs key auth")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="wb-sshd-"))
    try:
        return _start_in(workdir, sshd, config, keys)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _start_in(workdir: Path, sshd: Path, config: SshHostConfig, keys: list[str]) -> SshHost:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    host_key = workdir / "ssh_host_ed25519_key"
    _write_private(host_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    authorized = workdir / "authorized_keys"
    _write_private(authorized, ("\n".join(keys) + "\n").encode())

    session = config.session_command or (
        sys.executable, "-m", "winbuilder.emulator.cmd", "--root", str(config.root))
    force_command = shlex.join([sys.executable, "-m", "winbuilder.emulator.sshd", "--session", "--", *session])
    log_path = workdir / "sshd.log"

    for _attempt in range(5):
        port = config.port or _free_port(config.listen_host)
        conf = workdir / "sshd_config"
        conf.write_text(_sshd_config(workdir, host_key, authorized, config, port, force_command))
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(sshd), "-D", "-e", "-f", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        if _wait_ready(process, config.listen_host, port, time.monotonic() + config.startup_timeout):
            known_hosts = workdir / "known_hosts"
            known_hosts.write_text(f"[{config.listen_host}]:{port} {public_line}\n")
            return SshHost(
                host=config.listen_host, port=port, user=config.user, host_key_fingerprint=fingerprint(public_line),
                host_public_key=public_line, known_hosts_path=known_hosts, workdir=workdir, process=process,
            )
        _kill_tree(process, signal.SIGKILL)
        process.wait()
        log_text = log_path.read_text(errors="replace")
        if config.port or not any(marker in log_text for marker in _BIND_FAILED):
            tail = " | ".join(log_text.strip().splitlines()[-5:])
            raise WinbuilderError(f"sshd did not start on {config.listen_host}:{port}: {tail or 'no output'}")
    raise WinbuilderError(f"sshd could not bind a free port on {config.listen_host}")


def _sshd_config(workdir: Path, host_key: Path, authorized: Path, config: SshHostConfig, port: int,
                 force_command: str) -> str:
    lines = [
        f"ListenAddress {config.listen_host}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {str(authorized).replace('%', '%%')}",
        f"AllowUsers {config.user}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitUserEnvironment no",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "LogLevel ERROR",
        # Sessions find programs (python, tar, ...) as the emulator's own process does; sshd would reset PATH.
        f'SetEnv "PATH={_session_path()}" PYTHONIOENCODING=utf-8',
        f"ForceCommand {force_command}",
    ]
    return "\n".join(lines) + "\n"


def _session_path() -> str:
    entries = [str(Path(sys.executable).parent), *os.environ.get("PATH", os.defpath).split(os.pathsep)]
    unique = [e for i, e in enumerate(entries) if e and e not in entries[:i] and '"' not in e]
    return os.pathsep.join(unique)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(process: subprocess.Popen[bytes], host: str, port: int, deadline: float) -> bool:
    """Probe until our sshd answers with an SSH banner; False if it exited or the deadline passed."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if s.recv(8).startswith(b"SSH-2.0"):
                    s.sendall(b"SSH-2.0-winbuilder-probe\r\n")  # a well-formed hello keeps sshd's log quiet
                    return process.poll() is None
        except OSError:
            pass
        time.sleep(0.02)
    return False


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _kill_tree(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal sshd and all its descendants (connection processes call setsid, so a process group is not enough)."""
    if process.poll() is not None:
        return
    tree = _children() if sys.platform == "linux" else {}
    todo, family = [process.pid], []
    while todo:
        pid = todo.pop()
        family.append(pid)
        todo.extend(tree.get(pid, []))
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen {listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main(listen: str, user: str, root: str | None, authorized_keys: str | None) -> None:
    """Serve an emulated Windows host over SSH until SIGTERM (``winbuilder emulator host --transport ssh``).

    Prints exactly one line, ``ready ssh://USER@HOST:PORT host-key=SHA256:...``, once sshd accepts connections.
    Errors are one line on stderr and exit with the error's ``exit_code``.

    Args:
        listen: ``HOST:PORT``; port 0 picks a free one.
        user: login user; must be the user running the emulator.
        root: sandbox directory of the cmd.exe emulator; ``None`` makes a temp dir (removed on exit).
        authorized_keys: file with the public keys allowed to log in (required: key auth only).
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    temp_root: str | None = None
    host: SshHost | None = None
    try:
        if authorized_keys is None:
            raise UsageError("--authorized-keys is required with --transport ssh",
                             "the SSH emulator supports key authentication only")
        listen_host, port = _parse_listen(listen)
        if root is None:
            temp_root = tempfile.mkdtemp(prefix="wb-root-")
            root = temp_root
        host = start_sshd(SshHostConfig(user=user, root=Path(root).resolve(), authorized_keys=Path(authorized_keys),
                                        listen_host=listen_host, port=port))
        print(f"ready {host.url} host-key={host.host_key_fingerprint}", flush=True)
        code = host.process.wait()
        print(f"error: sshd exited with status {code}", file=sys.stderr)
        sys.exit(ExitCode.CONNECTION)
    except _Terminated:
        pass
    except WinbuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if host is not None:
            host.close()
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)


def session_main(argv: Sequence[str]) -> int:
    """Run one SSH session's program under a watchdog (the ``ForceCommand``; see the module docstring).

    The program inherits stdin/stdout/stderr from sshd and runs in its own process group. When sshd closes the
    session's stdout or stderr (``POLLERR``/``POLLHUP``: the channel was closed or the connection dropped), the
    whole group is killed with SIGKILL.

    Args:
        argv: the program and its arguments.

    Returns:
        The program's exit status (a program killed by a signal is re-raised as that signal on this process).
    """
    child = subprocess.Popen(list(argv), start_new_session=True)
    poller = select.poll()
    pidfd = os.pidfd_open(child.pid)
    poller.register(pidfd, select.POLLIN)
    for fd in (1, 2):
        poller.register(fd, 0)  # POLLERR/POLLHUP are always reported
    try:
        while child.poll() is None:
            events = poller.poll()
            if any(fd in (1, 2) and ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for fd, ev in events):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return 255
    finally:
        os.close(pidfd)
    code = child.returncode
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] != ["--session", "--"] or len(args) < 3:
        print("usage: python -m winbuilder.emulator.sshd --session -- PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(64)
    sys.exit(session_main(args[2:]))
