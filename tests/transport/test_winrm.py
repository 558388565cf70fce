"""The WinRM transport against the emulated WS-Management server, over real sockets with real NTLM."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from winbuilder.emulator.wsman.faults import FaultRule, FaultSchedule
from winbuilder.errors import AuthError, ConnectionFailed, DeadlineExceeded, SecurityError
from winbuilder.transport.winrm import WinRMTarget, WinRMTransport, WSManFaultCode

Factory = Callable[..., Any]


def target(host: Any, **changes: Any) -> WinRMTarget:
    fields: dict[str, Any] = {"host": "127.0.0.1", "port": host.port, "user": host.user, "password": host.password,
                              "https": host.cert_sha256 is not None, "cert_fingerprint": host.cert_sha256}
    fields.update(changes)
    return WinRMTarget(**fields)


def connect(t: WinRMTarget) -> WinRMTransport:
    transport = WinRMTransport(t)
    transport.connect(time.monotonic() + 20)
    return transport


def run(transport: WinRMTransport, line: str, stdin: list[bytes] | None = None,
        deadline: float | None = None) -> tuple[int, bytes, bytes]:
    out, err = bytearray(), bytearray()
    rc = transport.run(line, on_stdout=out.extend, on_stderr=err.extend, stdin=stdin, deadline=deadline)
    return rc, bytes(out), bytes(err)


def test_quota_fault_recycles_the_shell(winrm_host_factory: Factory) -> None:
    host = winrm_host_factory(max_ops=3)  # shell create + 2 commands, then the quota fault
    with_transport = connect(target(host))
    try:
        for i in range(5):
            rc, out, _ = run(with_transport, f"echo {i}& exit /b {i}")
            assert (rc, out) == (i, f"{i}\r\n".encode())
    finally:
        with_transport.close()
    assert host.stats()["requests"].get("Create", 0) >= 2


def test_injected_operation_quota_fault_mid_run_recovers(winrm_host_factory: Factory) -> None:
    faults = FaultSchedule((FaultRule("wsman_fault", action="Command", nth=2,
                                      code=int(WSManFaultCode.OPERATION_QUOTA)),))
    host = winrm_host_factory(faults=faults)
    transport = connect(target(host))
    try:
        assert run(transport, "exit /b 3")[0] == 3
        assert run(transport, "exit /b 4")[0] == 4
    finally:
        transport.close()


def test_dropped_connection_is_never_success(winrm_host_factory: Factory) -> None:
    host = winrm_host_factory(faults=FaultSchedule((FaultRule("drop", action="Receive", nth=1),)))
    transport = connect(target(host))
    try:
        with pytest.raises(ConnectionFailed):
            run(transport, "exit /b 0")
    finally:
        transport.close()


def test_http_503_is_a_connection_failure(winrm_host_factory: Factory) -> None:
    host = winrm_host_factory(faults=FaultSchedule((FaultRule("http_status", action="Command", nth=1, status=503),)))
    transport = connect(target(host))
    try:
        with pytest.raises(ConnectionFailed, match="503"):
            run(transport, "exit /b 0")
    finally:
        transport.close()


@pytest.mark.parametrize("envelope_kb", [150, 500])
def test_stdin_chunks_fit_the_servers_envelope(winrm_host_factory: Factory, envelope_kb: int) -> None:
    host = winrm_host_factory(max_envelope_kb=envelope_kb)
    transport = connect(target(host))
    chunk = transport.max_stdin_chunk
    try:
        assert envelope_kb * 1024 // 2 < chunk < envelope_kb * 1024 * 3 // 4
        data = bytes(range(256)) * (9 * 1024)  # 2.25 MiB
        chunks = [data[i:i + 100_000] for i in range(0, len(data), 100_000)]
        script = "import sys,hashlib;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
        rc, out, err = run(transport, f'python3 -c "{script}"', stdin=chunks)
        assert rc == 0, err
        assert out.strip() == hashlib.sha256(data).hexdigest().encode()
    finally:
        transport.close()
    assert host.stats()["requests"]["Send"] == -(-len(data) // chunk)


def test_deadline_terminates_the_command(winrm_host: Any) -> None:
    transport = connect(target(winrm_host))
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            run(transport, "timeout /t 60 /nobreak", deadline=time.monotonic() + 2)
        assert time.monotonic() - started < 10
        for _ in range(50):
            if winrm_host.stats()["commands_running"] == 0:
                break
            time.sleep(0.1)
        assert winrm_host.stats()["commands_running"] == 0
        assert run(transport, "exit /b 5")[0] == 5  # the shell is still usable
    finally:
        transport.close()
    assert winrm_host.stats()["shells"] == 0


def test_wrong_password_is_an_auth_error_without_the_secret(winrm_host: Any) -> None:
    started = time.monotonic()
    with pytest.raises(AuthError) as err:
        connect(target(winrm_host, password="Wr0ng&Secret"))
    assert time.monotonic() - started < 5
    assert "Wr0ng" not in str(err.value) and "Wr0ng" not in repr(err.value)


def test_pin_mismatch_sends_nothing(winrm_host: Any) -> None:
    with pytest.raises(SecurityError, match="pinned"):
        connect(target(winrm_host, cert_fingerprint="00" * 32))
    with pytest.raises(SecurityError):
        connect(target(winrm_host, cert_fingerprint="00" * 20))
    assert winrm_host.stats()["http_requests"] == 0


def test_unverifiable_certificate_is_refused_by_default(winrm_host: Any) -> None:
    with pytest.raises(SecurityError, match="could not be verified"):
        connect(target(winrm_host, cert_fingerprint=None))
    assert winrm_host.stats()["http_requests"] == 0


@pytest.mark.parametrize("how", ["sha1", "ca_bundle", "insecure"])
def test_other_ways_to_trust_the_certificate(winrm_host: Any, how: str) -> None:
    changes: dict[str, Any] = {
        "sha1": {"cert_fingerprint": winrm_host.cert_sha1.upper()},
        "ca_bundle": {"cert_fingerprint": None, "ca_bundle": Path(winrm_host.cert_pem_path)},
        "insecure": {"cert_fingerprint": None, "insecure_skip_verify": True},
    }[how]
    transport = connect(target(winrm_host, **changes))
    try:
        assert run(transport, "exit /b 9")[0] == 9
    finally:
        transport.close()


def test_http_uses_message_encryption(winrm_http_host: Any) -> None:
    transport = connect(target(winrm_http_host, https=False, port=winrm_http_host.port))
    try:
        rc, out, _ = run(transport, "echo secret-ish")
        assert rc == 0 and out.startswith(b"secret-ish")
    finally:
        transport.close()


def test_shell_uses_utf8_codepage(winrm_host: Any) -> None:
    transport = connect(target(winrm_host))
    try:
        assert [s["codepage"] for s in winrm_host.shell_info()] == [65001]
    finally:
        transport.close()
