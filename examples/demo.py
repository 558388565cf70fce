"""`make demo`: run the example build end to end on the emulated Windows host, as a user would.

1. Start `winbuilder emulator host` (WS-Management over HTTPS with NTLM, a fresh self-signed certificate) and read
   its `ready <url> cert-sha256=<hex>` line.
2. Copy examples/hello-windows-container to a scratch workspace (the repository is left untouched).
3. Run `winbuilder run ... --cert-sha256 <hex> -- build.cmd`: the workspace goes over, the output streams back, the
   exit code comes back, out/build-info.txt (created remotely) comes back, and the phase timings are printed.
4. If the Compute Engine emulator is available, do the same with no --host: winbuilder creates the VM, gets its
   password, pins its certificate, runs the build and deletes everything.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "hello-windows-container"


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """Start an emulator subprocess and return it with its `ready ...` line."""
    proc = subprocess.Popen([sys.executable, "-m", "winbuilder", "emulator", *args], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready "):
        proc.kill()
        sys.exit(f"demo: the emulator did not start (got {line!r})")
    return proc, line


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def byo_demo(scratch: Path) -> int:
    password = secrets.token_urlsafe(12) + "&^%"  # cmd.exe metacharacters on purpose: they must not matter
    env = dict(os.environ, WINBUILDER_PASSWORD=password)
    proc, ready = start(["host", "--listen", "127.0.0.1:0", "--user", "builder", "--root", str(scratch / "server")],
                        env)
    try:
        _, url, cert = ready.split()
        host_port = url.split("://", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        workspace = scratch / "workspace"
        shutil.copytree(EXAMPLE, workspace)
        banner(f"emulated Windows host at {url} ({cert})")
        cmd = [sys.executable, "-m", "winbuilder", "run", "--host", host, "--port", port, "--user", "builder",
               "--cert-sha256", cert.split("=", 1)[1], "--workspace", str(workspace),
               "--report", str(scratch / "report.json"), "--", "build.cmd"]
        print("$ winbuilder run --host", host, "--port", port, "--user builder --cert-sha256 ... -- build.cmd",
              flush=True)
        rc = subprocess.call(cmd, env=env)
        info = workspace / "out" / "build-info.txt"
        banner("copied back from the server")
        print(f"{info.relative_to(scratch)}:", info.read_text(encoding="utf-8") if info.exists() else "MISSING")
        print(f"winbuilder exit code: {rc}")
        return rc if info.exists() else 1
    finally:
        stop(proc)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="winbuilder-demo-") as tmp:
        return byo_demo(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
