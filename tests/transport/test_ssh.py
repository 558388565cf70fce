"""SshTransport against a real OpenSSH sshd (the emulated host) and, for server misbehaviour and password auth, a small
asyncssh server in the test. Real sockets throughout."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from asyncssh.packet import UInt32

from tests.fixtures.sshd import SshHostFixture, write_client_key
from winbuilder.errors import (
    AuthError,
    ConnectionFailed,
    DeadlineExceeded,
    ProtocolError,
    SecurityError,
    UsageError,
)
from winbuilder.transport.ssh import SshTarget, SshTransport


def exit_b(code: int) -> str:
    return f"exit /b {code}"


def python(code: str) -> str:
    """A cmd.exe command line running a one-line Python program (the emulator finds ``python`` on the host PATH)."""
    assert '"' not in code and "\n" not in code
    return f'python -c "{code}"'


class Collect:
    """Output callbacks that record chunks and arrival times."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.first_out_at: float | None = None

    def on_stdout(self, data: bytes) -> None:
        if self.first_out_at is None:
            self.first_out_at = time.monotonic()
        self.out.append(data)

    def on_stderr(self, data: bytes) -> None:
        self.err.append(data)

    @property
    def stdout(self) -> bytes:
        return b"".join(self.out)

    @property
    def stderr(self) -> bytes:
        return b"".join(self.err)


def soon(seconds: float = 20.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def transport(ssh_host: SshHostFixture) -> Iterator[SshTransport]:
    t = SshTransport(ssh_host.target)
    t.connect(soon())
    try:
        yield t
    finally:
        t.close()


def run(t: SshTransport, command: str, **kwargs: object) -> tuple[int, Collect]:
    c = Collect()
    code = t.run(command, on_stdout=c.on_stdout, on_stderr=c.on_stderr, **kwargs)  # type: ignore[arg-type]
    return code, c


# --- commands, exit codes, streams -------------------------------------------------------------------------------


def test_exit_codes_pass_through_exactly(transport: SshTransport) -> None:
    for code in (0, 1, 3, 42, 255):
        assert run(transport, exit_b(code))[0] == code
    stats = transport.stats()
    assert stats.requests == 5


def test_stdout_and_stderr_are_separate_and_streamed(transport: SshTransport) -> None:
    script = ("import sys,time;sys.stdout.write('first\\n');sys.stdout.flush();"
              "sys.stderr.write('oops\\n');sys.stderr.flush();time.sleep(1.5);print('second');sys.exit(4)")
    started = time.monotonic()
    code, c = run(transport, python(script), deadline=soon())
    ended = time.monotonic()
    assert code == 4
    assert c.stdout.replace(b"\r\n", b"\n") == b"first\nsecond\n"
    assert c.stderr.replace(b"\r\n", b"\n") == b"oops\n"
    assert c.first_out_at is not None and c.first_out_at - started < ended - started - 1.0, "output was not streamed"
    stats = transport.stats()
    assert stats.stdout_bytes == len(c.stdout) and stats.stderr_bytes == len(c.stderr)


def test_utf8_is_byte_exact_both_ways(transport: SshTransport) -> None:
    text = "é 日本 ✓\n".encode()
    script = "import sys;sys.stdout.buffer.write(sys.stdin.buffer.read())"
    # Split a multi-byte character across two stdin chunks: bytes must come back unchanged.
    code, c = run(transport, python(script), stdin=[text[:4], text[4:]])
    assert code == 0
    assert c.stdout == text


def test_utf8_command_line_and_echo_are_byte_exact(transport: SshTransport) -> None:
    code, c = run(transport, "echo é 日本")
    assert code == 0
    assert c.stdout == "é 日本\r\n".encode()


def test_stdin_streams_a_20_mb_tar_into_tar_xf(ssh_host: SshHostFixture, transport: SshTransport) -> None:
    payload = {f"dir/file{i}.bin": os.urandom(1024) * (5 * 1024) for i in range(4)}  # 4 x 5 MiB
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in payload.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = archive.getvalue()
    step = transport.max_stdin_chunk
    chunks = (blob[i:i + step] for i in range(0, len(blob), step))
    code, c = run(transport, r"md C:\ws && tar -xf - -C C:\ws", stdin=chunks, deadline=soon(60))
    assert code == 0, c.stderr
    for name, data in payload.items():
        assert (ssh_host.root / "C" / "ws" / name).read_bytes() == data
    assert transport.stats().stdin_bytes == len(blob)


def test_stdin_streams_20_mb_with_backpressure(transport: SshTransport) -> None:
    chunk = bytes(range(256)) * (transport.max_stdin_chunk // 256)
    total = 20 * 1024 * 1024
    count = total // len(chunk)
    script = ("import sys,hashlib;h=hashlib.sha256();"
              "n=sum(h.update(b) or len(b) for b in iter(lambda: sys.stdin.buffer.read(65536), b''));"
              "print(n, h.hexdigest())")
    expected = hashlib.sha256(chunk * count).hexdigest()
    code, c = run(transport, python(script), stdin=(chunk for _ in range(count)), deadline=soon(60))
    assert code == 0, c.stderr
    assert c.stdout.split() == [str(len(chunk) * count).encode(), expected.encode()]
    assert transport.stats().stdin_bytes == len(chunk) * count


def test_command_exiting_without_reading_stdin_still_returns_its_code(transport: SshTransport) -> None:
    code, _ = run(transport, exit_b(3), stdin=(b"x" * 65536 for _ in range(400)), deadline=soon())
    assert code == 3


def test_large_output_is_streamed_in_bounded_memory(transport: SshTransport) -> None:
    total = 128 * 1024 * 1024
    script = f"import sys;b=b'z'*(1<<20);[sys.stdout.buffer.write(b) for _ in range({total >> 20})]"
    seen = 0

    def count(data: bytes) -> None:
        nonlocal seen
        seen += len(data)

    tracemalloc.start()
    try:
        code = transport.run(python(script), on_stdout=count, on_stderr=lambda b: None, deadline=soon(120))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0
    assert seen == total
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while streaming {total} bytes"


def test_command_line_longer_than_cmd_limit_is_refused(transport: SshTransport) -> None:
    with pytest.raises(UsageError):
        run(transport, "echo " + "x" * 8200)


# --- deadline ----------------------------------------------------------------------------------------------------


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_deadline_kills_the_command_and_the_connection_stays_usable(transport: SshTransport) -> None:
    marker = f"wb-deadline-{os.getpid()}-{time.monotonic_ns()}"
    script = f"import time;marker='{marker}';print('started', flush=True);time.sleep(60)"
    c = Collect()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        transport.run(python(script), on_stdout=c.on_stdout, on_stderr=c.on_stderr, deadline=started + 2.0)
    assert time.monotonic() - started < 6.0
    assert b"started" in c.stdout
    gone_by = time.monotonic() + 5.0
    while _processes_with(marker) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert _processes_with(marker) == [], "the remote command outlived its deadline"
    assert run(transport, exit_b(7))[0] == 7


# --- host key and authentication ---------------------------------------------------------------------------------


def test_repr_never_shows_the_password() -> None:
    target = SshTarget(host="h", user="u", password="s3cret-Pw")
    assert "s3cret-Pw" not in repr(target)


def test_known_hosts_file_is_accepted(ssh_host: SshHostFixture) -> None:
    with SshTransport(ssh_host.target_with(host_key=None, known_hosts=ssh_host.host.known_hosts_path)) as t:
        t.connect(soon())
        assert run(t, exit_b(0))[0] == 0


def test_no_host_key_is_a_security_error_with_a_hint(ssh_host: SshHostFixture) -> None:
    with SshTransport(ssh_host.target_with(host_key=None)) as t, pytest.raises(SecurityError) as info:
        t.connect(soon())
    assert "--host-key SHA256:" in str(info.value) and "--known-hosts" in str(info.value)


def test_wrong_host_key_fingerprint_is_refused(ssh_host: SshHostFixture) -> None:
    other = "SHA256:" + "A" * 43
    with SshTransport(ssh_host.target_with(host_key=other)) as t, pytest.raises(SecurityError) as info:
        t.connect(soon())
    assert ssh_host.host.host_key_fingerprint in str(info.value), "the message names the key the server offered"


def test_wrong_known_hosts_entry_is_refused(ssh_host: SshHostFixture, tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known = tmp_path / "known_hosts"
    known.write_text(f"[{ssh_host.host.host}]:{ssh_host.host.port} {other}")
    with SshTransport(ssh_host.target_with(host_key=None, known_hosts=known)) as t, pytest.raises(SecurityError):
        t.connect(soon())


def test_missing_key_file_or_credential_is_a_usage_error(ssh_host: SshHostFixture, tmp_path: Path) -> None:
    with SshTransport(ssh_host.target_with(key_path=tmp_path / "nope")) as t, pytest.raises(UsageError):
        t.connect(soon())
    with SshTransport(ssh_host.target_with(key_path=None)) as t, pytest.raises(UsageError):
        t.connect(soon())


def test_unauthorized_key_is_an_auth_error(ssh_host: SshHostFixture, tmp_path: Path) -> None:
    stranger, _ = write_client_key(tmp_path, "stranger")
    started = time.monotonic()
    with SshTransport(ssh_host.target_with(key_path=stranger)) as t, pytest.raises(AuthError):
        t.connect(soon())
    assert time.monotonic() - started < 5.0


# --- connection loss ---------------------------------------------------------------------------------------------


def test_connect_deadline_when_the_server_never_answers() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = SshTarget(host="127.0.0.1", port=silent.getsockname()[1], user="u", password="pw",
                           host_key="SHA256:" + "C" * 43, connect_timeout=30.0)
        started = time.monotonic()
        with SshTransport(target) as t, pytest.raises(DeadlineExceeded):
            t.connect(started + 1.0)
        assert time.monotonic() - started < 3.0


def test_sshd_killed_mid_command_is_connection_failed(ssh_host: SshHostFixture, transport: SshTransport) -> None:
    script = "import time;print('running', flush=True);time.sleep(30)"
    c = Collect()

    def kill_when_running(data: bytes) -> None:
        c.on_stdout(data)
        ssh_host.host.kill()

    with pytest.raises(ConnectionFailed) as info:
        transport.run(python(script), on_stdout=kill_when_running, on_stderr=c.on_stderr, deadline=soon())
    assert not isinstance(info.value, DeadlineExceeded)
    with pytest.raises(ConnectionFailed):
        run(transport, exit_b(0))


# --- an asyncssh server in the test: password auth, and server misbehaviour ----------------------------------------


class _Server(asyncssh.SSHServer):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def begin_auth(self, username: str) -> bool:
        self.log.append(f"begin_auth {username}")
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        self.log.append("validate_password")
        return password == "right & ^ pw"


async def _behave(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command or ""
    if command.startswith("exit "):
        process.exit(int(command.split()[1]))
    elif command.startswith("exit-raw "):
        # asyncssh's own exit() keeps 8 bits; Windows OpenSSH sends the whole 32-bit exit code.
        process.channel._send_request(b"exit-status", UInt32(int(command.split()[1])))
        process.channel.close()
    elif command == "signal":
        process.stdout.write(b"bye\n")
        process.exit_with_signal("SEGV", False, "segmentation fault")
    elif command == "no-status":
        process.stdout.write(b"bye\n")
        process.close()
    else:
        process.exit(127)


class AsyncsshServer:
    """An asyncssh server on a loopback port, its event loop in a thread."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.fingerprint: str = self.key.get_fingerprint()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> asyncssh.SSHAcceptor:
            return await asyncssh.listen(
                "127.0.0.1", 0, server_host_keys=[self.key], server_factory=lambda: _Server(self.log),
                process_factory=_behave, encoding=None)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def asyncssh_server() -> Iterator[AsyncsshServer]:
    server = AsyncsshServer()
    try:
        yield server
    finally:
        server.close()


def _target(server: AsyncsshServer, **changes: object) -> SshTarget:
    base: dict[str, object] = {"host": "127.0.0.1", "port": server.port, "user": "builder",
                               "password": "right & ^ pw", "host_key": server.fingerprint, "connect_timeout": 10.0}
    base.update(changes)
    return SshTarget(**base)  # type: ignore[arg-type]


def test_password_auth(asyncssh_server: AsyncsshServer) -> None:
    with SshTransport(_target(asyncssh_server)) as t:
        t.connect(soon())
        assert run(t, "exit 9")[0] == 9


def test_wrong_password_is_an_auth_error_without_the_secret(asyncssh_server: AsyncsshServer) -> None:
    with SshTransport(_target(asyncssh_server, password="wrong-Secret-1")) as t, pytest.raises(AuthError) as info:
        t.connect(soon())
    assert "wrong-Secret-1" not in str(info.value) and "wrong-Secret-1" not in repr(info.value)


def test_host_key_mismatch_is_refused_before_any_credential(asyncssh_server: AsyncsshServer) -> None:
    with SshTransport(_target(asyncssh_server, host_key="SHA256:" + "B" * 43)) as t, pytest.raises(SecurityError):
        t.connect(soon())
    time.sleep(0.2)  # let the server process whatever the client might have sent
    assert asyncssh_server.log == []


def test_md5_fingerprint_is_accepted(asyncssh_server: AsyncsshServer) -> None:
    with SshTransport(_target(asyncssh_server, host_key=asyncssh_server.key.get_fingerprint("md5"))) as t:
        t.connect(soon())
        assert run(t, "exit 0")[0] == 0


@pytest.mark.parametrize("code", [256, 0xC0000005, 0xFFFFFFFF])
def test_windows_32_bit_exit_codes_are_kept(asyncssh_server: AsyncsshServer, code: int) -> None:
    with SshTransport(_target(asyncssh_server)) as t:
        t.connect(soon())
        assert run(t, f"exit-raw {code}")[0] == code


@pytest.mark.parametrize(("command", "message"), [("signal", "signal SEGV"), ("no-status", "without an exit status")])
def test_missing_exit_status_is_never_success(asyncssh_server: AsyncsshServer, command: str, message: str) -> None:
    with SshTransport(_target(asyncssh_server)) as t:
        t.connect(soon())
        with pytest.raises(ProtocolError, match=message):
            run(t, command)


def test_unreachable_port_is_connection_failed(asyncssh_server: AsyncsshServer) -> None:
    port = asyncssh_server.port
    asyncssh_server.close()
    server = AsyncsshServer()  # keep the fixture's close() harmless
    try:
        with SshTransport(_target(server, port=port)) as t, pytest.raises(ConnectionFailed):
            t.connect(soon())
    finally:
        server.close()


# --- the emulator's command line -----------------------------------------------------------------------------------


def _emulator(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "winbuilder.emulator", "host", "--transport", "ssh", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_emulator_cli_prints_ready_and_stops_on_sigterm(ssh_host: SshHostFixture, tmp_path: Path) -> None:
    public = tmp_path / "keys" / "id_ed25519.pub"
    proc = _emulator(["--listen", "127.0.0.1:0", "--user", ssh_host.host.user, "--authorized-keys", str(public),
                      "--root", str(ssh_host.root)])
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        ready, url, host_key = line.split(" ")
        assert ready == "ready" and url.startswith("ssh://") and host_key.startswith("host-key=SHA256:")
        port = int(url.rsplit(":", 1)[1])
        with SshTransport(ssh_host.target_with(port=port, host_key=host_key.split("=", 1)[1])) as t:
            t.connect(soon())
            assert run(t, exit_b(5))[0] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_emulator_cli_refuses_another_user(ssh_host: SshHostFixture, tmp_path: Path) -> None:
    public = tmp_path / "keys" / "id_ed25519.pub"
    proc = _emulator(["--user", "someone-else", "--authorized-keys", str(public)])
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 64
    assert len(err.strip().splitlines()) == 1 and "someone-else" in err

