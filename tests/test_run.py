"""`winbuilder run` end to end, as a subprocess, over real sockets: WinRM over HTTPS+NTLM, WinRM over HTTP with NTLM
message encryption (both against the emulated WS-Management server), and SSH against a real OpenSSH sshd.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from winbuilder.errors import ExitCode

PASSWORD = "Pa55&w0rd|^<>%!"
ALL = ["winrm-https", "winrm-http", "ssh"]


@dataclass
class Server:
    """A running emulated Windows host and the `winbuilder run` arguments that reach it."""

    kind: str
    args: list[str]
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    stats: Callable[[], dict[str, Any]] | None = None

    def remote(self, windows_path: str) -> Path:
        """The sandbox path of a ``C:\\...`` path."""
        drive, rest = windows_path.split(":", 1)
        return self.root / drive.upper() / rest.strip("\\").replace("\\", "/")


@pytest.fixture(params=ALL)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    yield from _server(request, request.param, tmp_path)


@pytest.fixture
def winrm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    yield from _server(request, "winrm-https", tmp_path)


def _server(request: pytest.FixtureRequest, kind: str, tmp_path: Path, **config: Any) -> Iterator[Server]:
    if kind == "ssh":
        fx = request.getfixturevalue("ssh_host")
        yield Server(kind, ["--transport", "ssh", "--host", fx.host.host, "--port", str(fx.host.port), "--user",
                            fx.host.user, "--ssh-key", str(fx.key_path), "--host-key", fx.host.host_key_fingerprint],
                     fx.root)
        return
    factory = request.getfixturevalue("winrm_host_factory")
    host = factory(https=kind == "winrm-https", password=PASSWORD, **config)
    args = ["--host", "127.0.0.1", "--port", str(host.port), "--user", host.config.user]
    args += ["--cert-sha256", host.cert_sha256] if kind == "winrm-https" else ["--winrm-http"]
    yield Server(kind, args, host.config.root, {"WINBUILDER_PASSWORD": PASSWORD}, host.stats)


def run(server: Server, *args: str, workspace: Path | None = None, timeout: float = 120,
        stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("WINBUILDER_PASSWORD", "PASSWORD")}
    env.update(server.env)
    ws = ["--workspace", str(workspace)] if workspace is not None else ["--no-copy", "--no-copy-back",
                                                                          "--workspace", str(server.root)]
    return subprocess.run([sys.executable, "-m", "winbuilder", "run", *server.args, *ws, *args], env=env,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_codes_pass_through(server: Server, code: int) -> None:
    proc = run(server, "--command", f"echo hi & exit /b {code}")
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.replace(b"\r\n", b"\n") == b"hi \n"


def test_exit_code_outside_0_255_prints_it_and_exits_1(server: Server) -> None:
    if server.kind == "ssh":
        pytest.skip("sshd reports its ForceCommand's 8-bit Linux exit status; Windows OpenSSH sends all 32 bits")
    proc = run(server, "--command", "exit /b 3221225477")
    assert proc.returncode == 1
    assert b"3221225477" in proc.stderr and b"0xC0000005" in proc.stderr


def test_utf8_arrives_byte_exact_even_split_across_reads(server: Server) -> None:
    text = "é 日本 ✓".encode()
    # the remote program writes the first half of a character, waits, then the rest: two Receives
    script = ("import sys,time;o=sys.stdout.buffer;d=bytes.fromhex(sys.argv[1]);"
              "o.write(d[:4]);o.flush();time.sleep(0.6);o.write(d[4:]);o.flush()")
    proc = run(server, "--", "python3", "-c", script, text.hex())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text
    proc = run(server, "--command", "echo é 日本")
    assert proc.stdout.rstrip(b"\r\n ") == "é 日本".encode()


def test_silent_command_longer_than_several_operation_timeouts(winrm: Server) -> None:
    started = time.monotonic()
    proc = run(winrm, "--operation-timeout", "1", "--command", "timeout /t 4 /nobreak >nul & echo done & exit /b 7")
    assert proc.returncode == 7, proc.stderr
    assert b"done" in proc.stdout
    assert time.monotonic() - started >= 4


def test_timeout_terminates_and_exits_124(server: Server) -> None:
    started = time.monotonic()
    proc = run(server, "--timeout", "2s", "--command", "echo started & timeout /t 60 /nobreak")
    elapsed = time.monotonic() - started
    assert proc.returncode == ExitCode.TIMEOUT, proc.stderr
    assert elapsed < 30
    assert b"started" in proc.stdout
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(b"winbuilder: error: ") and b"timeout" in last.lower()


def test_large_output_streams_with_bounded_memory(server: Server, tmp_path: Path) -> None:
    size = 150 * 1024 * 1024
    script = f"import sys;b=b'x'*65535+b'\\n';w=sys.stdout.buffer.write;[w(b) for _ in range({size}//65536)]"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = tmp_path / "out.bin"
    with out.open("wb") as f:
        proc = run(server, "--", "python3", "-c", script, stdout=f.fileno())
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == size
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb < 200 * 1024 or peak_kb == before, f"winbuilder peak RSS {peak_kb} KiB for {size} bytes"


def test_wrong_password_fails_fast_with_auth_code_and_no_secret(winrm: Server) -> None:
    winrm.env["WINBUILDER_PASSWORD"] = "Wr0ng&Secret!"
    started = time.monotonic()
    proc = run(winrm, "--debug", "--command", "echo never")
    assert proc.returncode == ExitCode.AUTH
    assert time.monotonic() - started < 15
    assert b"Wr0ng" not in proc.stderr + proc.stdout
    assert proc.stderr.splitlines()[-1].startswith(b"winbuilder: error: ")


def test_wrong_certificate_stops_before_any_request(winrm: Server) -> None:
    i = winrm.args.index("--cert-sha256")
    winrm.args[i + 1] = "ab" * 32
    assert winrm.stats is not None
    before = winrm.stats()["http_requests"]
    proc = run(winrm, "--command", "echo never")
    assert proc.returncode == ExitCode.SECURITY, proc.stderr
    assert winrm.stats()["http_requests"] == before  # not one HTTP request, so no NTLM message was sent


def test_thumbprint_pin_works(winrm: Server, winrm_host_factory: Any) -> None:
    host = winrm_host_factory(https=True, password=PASSWORD)
    args = ["--host", "127.0.0.1", "--port", str(host.port), "--user", host.config.user,
            "--cert-thumbprint", host.cert_sha1.upper()]
    proc = run(Server("winrm-https", args, host.config.root, {"WINBUILDER_PASSWORD": PASSWORD}), "--command", "ver")
    assert proc.returncode == 0, proc.stderr


def make_tree(root: Path) -> None:
    (root / "empty" / "nested-empty").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "src" / "main.c").write_bytes(b"int main(void){return 0;}\n")
    (root / "données").mkdir()
    (root / "données" / "日本語.txt").write_text("こんにちは\n", encoding="utf-8")
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)
    (root / "link-to-main").symlink_to("src/main.c")
    (root / "link-to-dir").symlink_to("données")
    (root / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))


def snapshot(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes(), p.stat().st_mode & 0o111 != 0)
    return out


def test_workspace_round_trip_is_byte_exact(server: Server, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    make_tree(ws)
    before = snapshot(ws)
    report = tmp_path / "report.json"
    proc = run(server, "--report", str(report), "--command",
               "mkdir out & echo built> out\\result.txt & echo changed> src\\main.c & type données\\日本語.txt",
               workspace=ws)
    assert proc.returncode == 0, proc.stderr
    assert "こんにちは".encode() in proc.stdout
    remote = server.remote("C:\\workspace")
    assert (remote / "données" / "日本語.txt").read_text(encoding="utf-8") == "こんにちは\n"
    after = snapshot(ws)
    assert after.pop("out/result.txt") == ("file", b"built \r\n", False)
    assert after.pop("out") == ("dir",)
    assert after.pop("src/main.c") == ("file", b"changed \r\n", False)
    before.pop("src/main.c")
    assert after == before
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 0 and doc["remote_exit_code"] == 0
    assert [p["name"] for p in doc["phases"]] == ["preflight", "connect", "copy-in", "run", "copy-back",
                                                "cleanup"]
    assert doc["bytes"]["sent"] > 3 * 1024 * 1024 and doc["bytes"]["received"] > 3 * 1024 * 1024


def test_preflight_catches_bad_names_before_anything_moves(winrm: Server, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "aux.c").write_text("x")
    (ws / "Readme").write_text("x")
    (ws / "README").write_text("x")
    (ws / "trailing.").write_text("x")
    (ws / "what?.txt").write_text("x")
    assert winrm.stats is not None
    before = winrm.stats()["http_requests"]
    proc = run(winrm, "--command", "echo never", workspace=ws)
    assert proc.returncode == ExitCode.WORKSPACE, proc.stderr
    err = proc.stderr.decode()
    for name in ("aux.c", "README", "trailing.", "what?.txt"):
        assert name in err
    assert winrm.stats()["http_requests"] == before


def test_powershell_shell_runs_a_file_and_reports_9009_on_the_emulator(winrm: Server, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = run(winrm, "--shell", "powershell", "--command", "Write-Output 'hi'; exit 3", workspace=ws)
    # the emulator has no PowerShell: cmd.exe's answer for an unknown program, exit 9009 (> 255, so exit 1)
    assert proc.returncode == 1
    assert b"9009" in proc.stderr
    assert b"not recognized" in proc.stderr
    assert (winrm.remote("C:\\workspace") / ".winbuilder" / "run.ps1").read_bytes().startswith(b"\xef\xbb\xbf")
    assert not (ws / ".winbuilder").exists()  # the script is not copied back


@pytest.mark.parametrize("signum", [15, 2])
def test_signal_mid_command_terminates_it_and_exits_128_plus_n(server: Server, tmp_path: Path, signum: int) -> None:
    marker = server.remote("C:\\workspace") / "alive.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("WINBUILDER_PASSWORD", "PASSWORD")}
    env.update(server.env)
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "winbuilder", "run", *server.args, "--workspace", str(tmp_path), "--report",
         str(report), "--", "python3", "-c",
         f"import time,pathlib;p=pathlib.Path(r'{marker}');p.write_text('x');print('up',flush=True);"
         "[(time.sleep(0.2),p.write_text(str(i))) for i in range(600)]"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"up"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert err.splitlines()[-1].startswith(b"winbuilder: error: cancelled")
    # the remote command is gone: its heartbeat file stops changing
    time.sleep(1.0)
    last = marker.read_text()
    time.sleep(1.0)
    assert marker.read_text() == last
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 128 + signum and doc["remote_exit_code"] is None


def test_files_of_earlier_runs_do_not_come_back(winrm: Server, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "only-in-first.txt").write_text("x")
    assert run(winrm, "--command", "ver", workspace=first).returncode == 0
    proc = run(winrm, "--command", "if exist only-in-first.txt (exit /b 3) else (exit /b 0)", workspace=second)
    assert proc.returncode == 0, proc.stderr
    assert not (second / "only-in-first.txt").exists()
    proc = run(winrm, "--keep-remote", "--command", "if exist only-in-first.txt (exit /b 0) else (exit /b 4)",
               workspace=first)
    assert proc.returncode == 0


def test_winrm_http_with_certificate_options_is_a_usage_error(winrm: Server, tmp_path: Path) -> None:
    proc = run(winrm, "--winrm-http", "--command", "ver")
    assert proc.returncode == ExitCode.USAGE
    assert b"--winrm-http has no certificate" in proc.stderr.splitlines()[-1]
