"""The emulated WS-Management server, driven by the unmodified pypsrp client over real sockets."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from pypsrp.exceptions import AuthenticationError, WinRMTransportError, WSManFaultError
from pypsrp.shell import Process, SignalCode, WinRS
from pypsrp.wsman import WSMan

from tests.fixtures.wsman import HAVE_CMD, STAND_IN, WINRM_PASSWORD, WINRM_USER, WinrmHostFixture
from winbuilder.emulator import tls
from winbuilder.emulator.wsman import envelope as env
from winbuilder.emulator.wsman.faults import FaultRule, FaultSchedule

Factory = Callable[..., WinrmHostFixture]
TIMED_OUT = 2150858793


def client(h: WinrmHostFixture, password: str | None = None, **kw: Any) -> WSMan:
    """A pypsrp WSMan for the host (NTLM; HTTPS verified against the host's own certificate)."""
    https = h.url.startswith("https")
    kw.setdefault("operation_timeout", 5)
    kw.setdefault("auth", "negotiate")
    return WSMan(h.url.split("//")[1].rsplit(":", 1)[0], port=h.port, username=h.user,
                 password=password if password is not None else h.password, ssl=https,
                 cert_validation=str(h.cert_pem_path) if https else False, reconnection_retries=0, **kw)  # type: ignore[arg-type]  # a CA path works too


@pytest.fixture
def host(winrm_host_factory: Factory) -> WinrmHostFixture:
    """HTTPS host running the stand-in cmd (protocol tests need /bin/sh semantics)."""
    return winrm_host_factory(interpreter=STAND_IN)


def run(shell: WinRS, line: str) -> Process:
    p = Process(shell, line)
    p.invoke()
    return p


# -- lifecycle -----------------------------------------------------------------------------------------------


def test_shell_lifecycle_records_options(host: WinrmHostFixture) -> None:
    with client(host) as wsman:
        wsman.update_max_payload_size()
        assert wsman.max_envelope_size == 500 * 1024
        shell = WinRS(wsman, codepage=65001, environment={"FOO": "bar baz"}, working_directory="C:\\work")
        shell.open()
        assert shell.id
        info = host.shell_info()
        assert info == [{"id": shell.id, "codepage": 65001, "workdir": "C:\\work",
                         "environment": {"FOO": "bar baz"}, "commands": []}]
        p = run(shell, 'echo "$FOO"; echo err >&2')
        assert (p.rc, p.stdout, p.stderr) == (0, b"bar baz\n", b"err\n")
        assert shell._get_shell()["ShellId"] == shell.id
        shell.close()
    assert host.stats()["shells"] == 0
    assert host.stats()["requests"]["Delete"] == 1


@pytest.mark.parametrize("code", [0, 1, 42, 255, 3221225477])
def test_exit_codes_round_trip(host: WinrmHostFixture, code: int) -> None:
    with client(host) as wsman, WinRS(wsman) as shell:
        assert run(shell, f"exit /b {code}").rc == code


def test_utf8_bytes_pass_through(host: WinrmHostFixture) -> None:
    text = "héllo ✓ 日本語 \U0001f600"
    with client(host) as wsman, WinRS(wsman, codepage=65001) as shell:
        p = run(shell, f"printf '%s' '{text}'")
        assert p.stdout.decode("utf-8") == text
        blob = bytes(range(256)) * 4
        p = Process(shell, "cat")
        p.begin_invoke()
        p.send(blob, end=True)
        p.end_invoke()
        assert p.stdout == blob


def test_http_with_message_encryption(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(https=False, interpreter=STAND_IN)
    assert h.url.startswith("http://") and h.cert_sha256 is None
    with client(h) as wsman, WinRS(wsman) as shell:
        assert run(shell, "echo hi").stdout == b"hi\n"


def test_http_refuses_unencrypted(winrm_http_host: WinrmHostFixture) -> None:
    with client(winrm_http_host, encryption="never") as wsman, pytest.raises(AuthenticationError):
        wsman.update_max_payload_size()


def test_https_fixture_uses_default_interpreter_when_present(winrm_host: WinrmHostFixture) -> None:
    with client(winrm_host) as wsman, WinRS(wsman) as shell:
        assert run(shell, "exit /b 7").rc == 7


@pytest.mark.skipif(not HAVE_CMD, reason="winbuilder.emulator.cmd not available yet")
def test_real_cmd_emulator(winrm_host: WinrmHostFixture) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("src/main.go")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with client(winrm_host) as wsman, WinRS(wsman, codepage=65001) as shell:
        p = run(shell, "echo %USERNAME% & cd")
        assert p.stdout.split() == [b"builder", b"C:\\Users\\builder"]
        assert run(shell, "exit /b 3221225477").rc == 3221225477
        assert run(shell, "md C:\\ws").rc == 0
        p = Process(shell, "tar.exe", ["-xf", "-", "-C", "C:\\ws"])
        p.begin_invoke()
        p.send(buf.getvalue(), end=True)
        p.end_invoke()
        assert p.rc == 0, p.stderr
        assert run(shell, "type C:\\ws\\src\\main.go").stdout == b"hello"
    assert (winrm_host.root / "C" / "ws" / "src" / "main.go").read_bytes() == b"hello"


# -- streaming -----------------------------------------------------------------------------------------------


def test_operation_timeout_fault_then_receive_again(host: WinrmHostFixture) -> None:
    with client(host) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "sleep 1.5; echo late")
        p.begin_invoke()
        with pytest.raises(WSManFaultError) as err:
            shell.receive("stdout stderr", p.id, timeout=1)
        assert err.value.code == TIMED_OUT
        p.end_invoke()
        assert (p.rc, p.stdout) == (0, b"late\n")


def test_large_output_streams_in_bounded_responses(host: WinrmHostFixture) -> None:
    size = 6 * 1024 * 1024
    with client(host, max_envelope_size=153600) as wsman, WinRS(wsman) as shell:
        p = Process(shell, f"head -c {size} /dev/zero")
        p.begin_invoke()
        receives = 0
        while p.state != "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done":
            p.poll_invoke()
            receives += 1
        assert len(p.stdout) == size and p.rc == 0
        assert receives >= size // 153600
    st = host.stats()
    assert st["bytes_out"] < size * 4 / 3 + receives * 2000


def test_stdin_streams_into_tar(host: WinrmHostFixture) -> None:
    buf = io.BytesIO()
    payload = os.urandom(3 * 1024 * 1024)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("ws/a.bin", payload), ("ws/sub/b.txt", "ünï\n".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    with client(host) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "tar -xf - -C C")
        p.begin_invoke()
        step = wsman.max_payload_size
        for off in range(0, len(archive), step):
            end = off + step >= len(archive)
            shell.send("stdin", archive[off:off + step], command_id=p.id, end=end)
        p.end_invoke()
        assert p.rc == 0, p.stderr
    assert (host.root / "C" / "ws" / "a.bin").read_bytes() == payload
    assert (host.root / "C" / "ws" / "sub" / "b.txt").read_text("utf-8") == "ünï\n"


def test_send_does_not_deadlock_with_chatty_child(host: WinrmHostFixture) -> None:
    data = os.urandom(5 * 1024 * 1024)
    with client(host) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "cat")
        p.begin_invoke()
        step = wsman.max_payload_size
        for off in range(0, len(data), step):
            shell.send("stdin", data[off:off + step], command_id=p.id, end=off + step >= len(data))
        p.end_invoke()
        assert p.stdout == data


def test_signal_terminate_kills_process_group(host: WinrmHostFixture) -> None:
    with client(host) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "sleep 30 & sleep 30; echo never")
        p.begin_invoke()
        time.sleep(0.3)
        assert host.stats()["commands_running"] == 1
        t0 = time.monotonic()
        p.signal(SignalCode.TERMINATE)
        p.end_invoke()
        assert time.monotonic() - t0 < 5
        assert b"never" not in p.stdout
        assert host.stats()["commands_running"] == 0


def test_signal_terminate_timeout_command(host: WinrmHostFixture) -> None:
    with client(host) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "timeout /t 30")
        p.begin_invoke()
        p.signal(SignalCode.TERMINATE)
        t0 = time.monotonic()
        p.end_invoke()
        assert time.monotonic() - t0 < 5


def test_signal_ctrl_c_interrupts(host: WinrmHostFixture) -> None:
    with client(host) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "sleep 30")
        p.begin_invoke()
        time.sleep(0.3)
        p.signal(SignalCode.CTRL_C)
        p.end_invoke()
        assert p.rc == 0xC000013A  # STATUS_CONTROL_C_EXIT


def test_delete_shell_kills_commands(host: WinrmHostFixture) -> None:
    with client(host) as wsman:
        shell = WinRS(wsman)
        shell.open()
        Process(shell, "sleep 30").begin_invoke()
        time.sleep(0.2)
        shell.close()
    assert host.stats()["commands_running"] == 0


# -- limits and faults ---------------------------------------------------------------------------------------


def test_max_shells_quota(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(max_shells=2, interpreter=STAND_IN)
    with client(h) as wsman, WinRS(wsman), WinRS(wsman):
        with pytest.raises(WSManFaultError) as err:
            WinRS(wsman).open()
        assert err.value.code == 2150859173


def test_max_operations_quota_released_by_delete(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(max_ops=3, interpreter=STAND_IN)
    with client(h) as wsman:
        with WinRS(wsman) as shell:
            run(shell, "true")
            run(shell, "true")
            with pytest.raises(WSManFaultError) as err:
                run(shell, "true")
            assert err.value.code == 2150859174
        with WinRS(wsman) as shell:
            assert run(shell, "exit /b 3").rc == 3


def test_envelope_limit_answers_413(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(max_envelope_kb=150, interpreter=STAND_IN)
    with client(h, max_envelope_size=512000) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "cat >/dev/null")
        p.begin_invoke()
        shell.send("stdin", b"x" * 100_000, command_id=p.id)
        with pytest.raises(WinRMTransportError) as err:
            shell.send("stdin", b"x" * 200_000, command_id=p.id, end=True)
        assert err.value.code == 413
        shell.send("stdin", b"", command_id=p.id, end=True)
        p.end_invoke()
        assert p.rc == 0


def test_fault_schedule(winrm_host_factory: Factory, tmp_path: Path) -> None:
    schedule = FaultSchedule((
        FaultRule(kind="wsman_fault", action="Receive", nth=1, code=2150859174),
        FaultRule(kind="http_status", action="Command", nth=2, status=503),
    ))
    h = winrm_host_factory(faults=schedule, interpreter=STAND_IN)
    with client(h) as wsman, WinRS(wsman) as shell:
        p = Process(shell, "echo ok")
        p.begin_invoke()
        with pytest.raises(WSManFaultError) as err:
            p.poll_invoke()
        assert err.value.code == 2150859174
        p.end_invoke()
        assert p.stdout == b"ok\n"
        with pytest.raises(WinRMTransportError) as terr:
            Process(shell, "echo again").begin_invoke()
        assert terr.value.code == 503
    assert h.stats()["faults_injected"] == 2
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"rules": [{"kind": "drop", "action": "Send", "nth": 2, "after": True}]}))
    assert FaultSchedule.load(path).rules == (FaultRule(kind="drop", action="Send", nth=2, after=True),)
    with pytest.raises(ValueError):
        FaultSchedule.from_dict({"rules": [{"kind": "explode"}]})


def test_fault_drop_connection(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(faults=FaultSchedule((FaultRule(kind="drop", action="Create"),)), interpreter=STAND_IN)
    with client(h) as wsman, pytest.raises(requests.exceptions.ConnectionError):
        WinRS(wsman).open()
    with client(h) as wsman, WinRS(wsman) as shell:
        assert run(shell, "exit /b 5").rc == 5


def test_rtt_is_injected(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(rtt=0.05, interpreter=STAND_IN)
    with client(h) as wsman:
        wsman.update_max_payload_size()  # 3 HTTP requests (NTLM legs)
        t0 = time.monotonic()
        wsman.update_max_payload_size()
        assert time.monotonic() - t0 >= 0.05


# -- authentication ------------------------------------------------------------------------------------------


def test_wrong_password_is_401_fast(host: WinrmHostFixture) -> None:
    t0 = time.monotonic()
    with client(host, password="wrong") as wsman, pytest.raises(AuthenticationError):
        WinRS(wsman).open()
    assert time.monotonic() - t0 < 2
    assert host.stats()["auth_failures"] >= 1


def test_basic_off_by_default(host: WinrmHostFixture, winrm_host_factory: Factory) -> None:
    with client(host, auth="basic") as wsman, pytest.raises(AuthenticationError):
        wsman.update_max_payload_size()
    h = winrm_host_factory(basic=True, interpreter=STAND_IN)
    with client(h, auth="basic") as wsman, WinRS(wsman) as shell:
        assert run(shell, "exit /b 9").rc == 9
    with client(h, auth="basic", password="nope") as wsman, pytest.raises(AuthenticationError):
        wsman.update_max_payload_size()


def test_two_hosts_one_process_separate_credentials(winrm_host_factory: Factory) -> None:
    a = winrm_host_factory(password="alpha-pass", interpreter=STAND_IN)
    b = winrm_host_factory(password="bravo-pass", interpreter=STAND_IN)
    errors: list[BaseException] = []

    def ok(h: WinrmHostFixture) -> None:
        try:
            for _ in range(3):
                with client(h) as wsman:
                    wsman.update_max_payload_size()
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=ok, args=(h,)) for h in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with client(a, password="bravo-pass") as wsman, pytest.raises(AuthenticationError):
        wsman.update_max_payload_size()
    a.set_password("charlie-pass")
    with client(a, password="alpha-pass") as wsman, pytest.raises(AuthenticationError):
        wsman.update_max_payload_size()
    with client(a) as wsman:
        wsman.update_max_payload_size()


def test_no_password_until_set(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(password=None, interpreter=STAND_IN)
    with client(h, password="anything") as wsman, pytest.raises(AuthenticationError):
        wsman.update_max_payload_size()
    h.set_password("fresh-pass")
    with client(h) as wsman:
        wsman.update_max_payload_size()


def test_credentials_file_holds_hash_only(host: WinrmHostFixture) -> None:
    path = host.host._creds.path
    assert path.stat().st_mode & 0o777 == 0o600
    assert WINRM_PASSWORD not in path.read_text()


# -- network -------------------------------------------------------------------------------------------------


def test_connection_filter_drops(winrm_host_factory: Factory) -> None:
    seen: list[str] = []

    def deny(ip: str) -> bool:
        seen.append(ip)
        return False

    h = winrm_host_factory(connection_filter=deny, interpreter=STAND_IN)
    with client(h) as wsman, pytest.raises(requests.exceptions.ConnectionError):
        wsman.update_max_payload_size()
    assert seen and seen[0] == "127.0.0.1"
    assert h.stats()["connections_refused"] >= 1


def test_supplied_certificate_on_other_loopback_address(winrm_host_factory: Factory) -> None:
    bundle = tls.generate_self_signed(["127.0.0.7"], common_name="guest-1")
    try:
        h = winrm_host_factory(cert_pem=bundle.cert_pem_path, key_pem=bundle.key_pem_path,
                               listen=("127.0.0.7", 0), interpreter=STAND_IN)
        assert h.url == f"https://127.0.0.7:{h.port}/wsman"
        assert (h.cert_sha256, h.cert_sha1) == (bundle.sha256, bundle.sha1)
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.7", h.port)))
        import hashlib

        assert hashlib.sha1(der).hexdigest() == bundle.sha1  # noqa: S324 - thumbprint
        with client(h) as wsman:
            wsman.update_max_payload_size()
        h.host.close()
        assert bundle.cert_pem_path.exists()  # supplied files are not ours to delete
    finally:
        bundle.remove()


def test_close_removes_temp_files(winrm_host_factory: Factory) -> None:
    h = winrm_host_factory(root=None, interpreter=STAND_IN)
    paths = [h.host._creds.directory, h.cert_pem_path.parent, h.host.root]
    assert all(p.exists() for p in paths)
    h.host.close()
    assert not any(p.exists() for p in paths)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", h.port)) != 0


def test_cli_ready_line_and_sigterm(tmp_path: Path) -> None:
    environ = dict(os.environ, WINBUILDER_PASSWORD=WINRM_PASSWORD)
    proc = subprocess.Popen(
        [sys.executable, "-m", "winbuilder.emulator", "host", "--listen", "127.0.0.1:0", "--user", WINRM_USER,
         "--root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        word, url, fp = line.split()
        assert word == "ready" and url.startswith("https://127.0.0.1:") and fp.startswith("cert-sha256=")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
        import hashlib

        assert hashlib.sha256(der).hexdigest() == fp.split("=", 1)[1]
        wsman = WSMan("127.0.0.1", port=port, username=WINRM_USER, password=WINRM_PASSWORD, ssl=True,
                      cert_validation=False, auth="negotiate", operation_timeout=5)
        with wsman, WinRS(wsman) as shell:
            assert shell.id
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_cli_requires_password() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "WINBUILDER_PASSWORD"}
    res = subprocess.run([sys.executable, "-m", "winbuilder.emulator", "host", "--user", "u"], env=environ,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "WINBUILDER_PASSWORD" in res.stderr


# -- sans-IO -------------------------------------------------------------------------------------------------


def test_parse_duration() -> None:
    assert env.parse_duration("PT20S") == 20
    assert env.parse_duration("PT20.500S") == 20.5
    assert env.parse_duration("P1DT1H1M1S") == 86400 + 3661
    with pytest.raises(ValueError):
        env.parse_duration("20")


def test_parse_request_rejects_garbage() -> None:
    with pytest.raises(env.Fault) as err:
        env.parse_request(b"<not-xml")
    assert err.value.sender
    fault = env.build_fault(err.value, "uuid:X", "M")
    assert b"<a:RelatesTo>uuid:X</a:RelatesTo>" in fault and b'Code="2150858800"' in fault


def test_receive_response_fits_overhead() -> None:
    cid = env.new_id()
    body = env.build_receive_response("uuid:" + env.new_id(), cid, [("stdout", b"a" * 3000), ("stderr", b"b")],
                                      True, 3221225477, ("stdout", "stderr"))
    assert len(body) - len(base64.b64encode(b"a" * 3000)) - len(base64.b64encode(b"b")) < env.receive_overhead(cid)
    assert b"<rsp:ExitCode>3221225477</rsp:ExitCode>" in body
