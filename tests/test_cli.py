"""The command line's contract: usage errors are one line with a fix and exit 64; secrets are never echoed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from winbuilder.errors import ExitCode


def winbuilder(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("WINBUILDER_PASSWORD", "PASSWORD")}
    return subprocess.run([sys.executable, "-m", "winbuilder", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, cwd=cwd, timeout=60)


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--host", "h", "--user", "u", "--command", ""], "empty"),
        (["run", "--host", "h", "--user", "u"], "no command"),
        (["run", "--host", "h", "--user", "u", "--command", "x", "--", "y"], "twice"),
        (["run", "--host", "h", "--command", "x"], "--user"),
        (["run", "--host", "h", "--user", "u", "--command", "x"], "no password"),
        (["run", "--host", "h", "--user", "u", "--no-copy", "false", "--command", "x"], "unexpected extra argument"),
        (["run", "--host", "h", "--user", "u", "--timeout", "soon", "--command", "x"], "duration"),
        (["run", "--host", "h", "--user", "u", "--remote-dir", "C:/ws", "--command", "x"], "remote-dir"),
        (["run", "--host", "h", "--user", "u", "--cert-sha256", "zz", "--command", "x"], "fingerprint"),
        (["run", "--bogus"], "No such option"),
    ],
)
def test_usage_errors_are_one_line_exit_64(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = winbuilder(*args, "--workspace", str(tmp_path), env={"WINBUILDER_PASSWORD": "Sekr1t&|^<>%"}
                      if "no password" not in needle else None)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    line = last_line(proc)
    assert line.startswith("winbuilder: error: ")
    assert needle.lower() in line.lower()
    assert " — " in line
    assert "Sekr1t" not in proc.stderr + proc.stdout


def test_password_flag_warns(tmp_path: Path) -> None:
    proc = winbuilder("run", "--host", "127.0.0.1", "--port", "1", "--user", "u", "--password", "Sekr1t&x",
                      "--connect-timeout", "3s", "--workspace", str(tmp_path), "--command", "ver")
    assert "visible in build history" in proc.stderr
    assert "Sekr1t" not in proc.stderr + proc.stdout
    assert proc.returncode == ExitCode.CONNECTION


def test_help_lists_the_main_options() -> None:
    proc = winbuilder("run", "--help")
    assert proc.returncode == 0
    for flag in ("--host", "--transport", "--cert-sha256", "--cert-thumbprint", "--timeout", "--exclude",
                 "--no-copy-back", "--shell", "--report"):
        assert flag in proc.stdout


def test_create_mode_without_google_credentials_is_an_auth_error(tmp_path: Path) -> None:
    closed = "127.0.0.1:9"  # nothing listens: "not on GCE", deterministically
    env = {"GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "CLOUDSDK_CONFIG": str(tmp_path),
           "GOOGLE_APPLICATION_CREDENTIALS": ""}
    proc = winbuilder("run", "--zone", "us-central1-a", "--workspace", str(tmp_path), "--command", "ver", env=env)
    assert proc.returncode == ExitCode.AUTH, proc.stderr
    assert last_line(proc).startswith("winbuilder: error: no Google credentials")
