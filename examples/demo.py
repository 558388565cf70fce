"""`make demo`: run the example build end to end on the emulated Windows host, as a user would.

1. Start `winbuilder emulator host` (WS-Management over HTTPS with NTLM, a fresh self-signed certificate) and read
   its `ready <url> cert-sha256=<hex>` line.
2. Copy examples/hello-windows-container to a scratch workspace (the repository is left untouched).
3. Run `winbuilder run ... --cert-sha256 <hex> -- build.cmd`: the workspace goes over, the output streams back, the
   exit code comes back, out/build-info.txt (created remotely) comes back, and the phase timings are printed.
4. Do the same with no --host against the emulated Compute Engine: winbuilder creates the firewall rule and the VM,
   gets the password through the guest agent, pins the certificate from the guest attributes, runs the build,
   copies back, and deletes everything; the demo then lists what is left in the project (nothing).
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


PROJECT, ZONE = "demo-project", "us-central1-a"


def gce_demo(scratch: Path) -> int:
    """No --host: winbuilder creates the VM on the emulated Compute Engine, builds there, and deletes it all."""
    cloudsdk = scratch / "gcloud-config"  # empty: the host's own gcloud credentials are never used
    cloudsdk.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "PROJECT_ID", "WINBUILDER_PASSWORD", "PASSWORD")}
    proc, ready = start(["gce", "--listen", "127.0.0.1:0", "--boot-seconds", "1"], env)
    try:
        fields = dict(part.split("=", 1) for part in ready.split()[1:])
        compute, metadata = fields["compute"], fields["metadata"]
        env.update({"GCE_METADATA_HOST": metadata, "GCE_METADATA_IP": metadata, "CLOUDSDK_CONFIG": str(cloudsdk),
                    "WINBUILDER_COMPUTE_ENDPOINT": compute})
        workspace = scratch / "workspace-gce"
        shutil.copytree(EXAMPLE, workspace)
        banner(f"emulated Compute Engine at {compute} (metadata server {metadata})")
        print(f"$ winbuilder run --project {PROJECT} --zone {ZONE} --image ltsc2022 -- build.cmd", flush=True)
        rc = subprocess.call([sys.executable, "-m", "winbuilder", "run", "--project", PROJECT, "--zone", ZONE,
                              "--image", "ltsc2022", "--egress-ip-url", compute + "/egress-ip",
                              "--workspace", str(workspace), "--", "build.cmd"], env=env)
        info = workspace / "out" / "build-info.txt"
        banner("after the run")
        print(f"copied back: {info.relative_to(scratch)}: {'yes' if info.exists() else 'MISSING'}")
        left = leftovers(env)
        print(f"left behind on Compute Engine: {left}")
        print(f"winbuilder exit code: {rc}")
        return rc if info.exists() and left == "nothing" else 1
    finally:
        stop(proc)


def leftovers(env: dict[str, str]) -> str:
    """Instances, disks and firewall rules still in the emulated project, asked through the real client."""
    script = (
        "from google.api_core.client_options import ClientOptions as O; from google.cloud import compute_v1 as c;"
        "import os; o=O(api_endpoint=os.environ['WINBUILDER_COMPUTE_ENDPOINT']);"
        f"i=list(c.InstancesClient(transport='rest',client_options=o).list(project='{PROJECT}',zone='{ZONE}'));"
        f"d=list(c.DisksClient(transport='rest',client_options=o).list(project='{PROJECT}',zone='{ZONE}'));"
        f"f=list(c.FirewallsClient(transport='rest',client_options=o).list(project='{PROJECT}'));"
        "print(len(i), len(d), len(f))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return f"could not list ({out.stderr.strip().splitlines()[-1:]})"
    instances, disks, rules = out.stdout.split()
    if (instances, disks, rules) == ("0", "0", "0"):
        return "nothing"
    return f"{instances} instances, {disks} disks, {rules} firewall rules"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="winbuilder-demo-") as tmp:
        rc = byo_demo(Path(tmp))
        if rc != 0:
            return rc
        return gce_demo(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
