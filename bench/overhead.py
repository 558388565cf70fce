"""What winbuilder adds above the time Compute Engine and Windows take, on the emulator.

The emulated guest boots in ``--boot`` seconds, its password agent answers ``--agent`` seconds after that, and its
WinRM listener opens ``--winrm-late`` seconds after boot. Those are the injected delays; the critical path waits
``boot + max(agent, winrm_late)`` of them. A full ``flow.run`` (firewall rule, VM, password, TLS pin, readiness,
connect, copy in, ``echo``, copy back, teardown of VM and rule) is timed in-process; its wall time minus the injected
delays is winbuilder's overhead (polling granularity, API round trips, NTLM, copies, teardown).

The one-off import of google-cloud-compute (about 1 s on an idle machine, much more on a busy one) is measured and
reported apart: it is paid once per process, before any timing below starts.

Usage: python bench/overhead.py [--runs 3] [--boot 3] [--agent 1] [--winrm-late 1.5]
Prints the figures and whether the median overhead is within ``--target`` seconds (default 2); asserts nothing.
"""

from __future__ import annotations

import sys

# bench/copy.py is named like the stdlib's `copy`: keep this folder off sys.path so `import copy` finds the stdlib.
sys.path[:] = [p for p in sys.path if p not in ("", __import__("os").path.dirname(__file__))]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--boot", type=float, default=3.0, help="emulated boot, seconds")
    parser.add_argument("--agent", type=float, default=1.0, help="password agent delay after boot, seconds")
    parser.add_argument("--winrm-late", type=float, default=1.5, help="WinRM opens this long after boot, seconds")
    parser.add_argument("--target", type=float, default=2.0, help="overhead budget, seconds")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from winbuilder.emulator.compute.faults import FaultSchedule
    from winbuilder.emulator.compute.models import GceEmulatorConfig
    from winbuilder.emulator.compute.server import start_gce

    config = GceEmulatorConfig(boot_seconds=args.boot, agent_delay=args.agent, project="bench-project",
                               faults=FaultSchedule(winrm_late=args.winrm_late), min_run_duration=1.0)
    emu = start_gce(config, listen=("127.0.0.1", 0))
    # google-auth reads the metadata host when it is first imported: set the environment before.
    os.environ.update({"GCE_METADATA_HOST": emu.metadata_host, "GCE_METADATA_IP": emu.metadata_host,
                       "CLOUDSDK_CONFIG": tempfile.mkdtemp(prefix="wb-bench-sdk-")})
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    t = time.monotonic()
    from google.cloud import compute_v1  # noqa: F401 - timed on purpose

    import_seconds = time.monotonic() - t

    from winbuilder import flow
    from winbuilder.spec import GceSpec, RunSpec, TargetSpec

    injected = args.boot + max(args.agent, args.winrm_late)
    workspace = Path(tempfile.mkdtemp(prefix="wb-bench-ws-"))
    (workspace / "main.go").write_text("package main\n")
    rows = []
    try:
        for _ in range(args.runs):
            spec = RunSpec(command="echo built> out.txt", workspace=workspace, run_id=flow.new_run_id(),
                           target=TargetSpec(host="", user="winbuilder"),
                           gce=replace(GceSpec(project="bench-project"), zone="us-central1-a", region=None,
                                       compute_endpoint=emu.compute_url, egress_ip_url=emu.compute_url + "/egress-ip",
                                       max_run_duration=600, boot_timeout=120))
            t = time.monotonic()
            result = flow.run(spec)
            wall = time.monotonic() - t
            if result.exit_code != 0:
                print(f"run failed: {result.error}", file=sys.stderr)
                return 2
            left = len(emu.backend.instances()) + len(emu.backend.disks()) + len(emu.backend.firewalls())
            rows.append((wall, {p.name: p.duration for p in result.phases}, left))
    finally:
        emu.close()

    phases = list(rows[0][1])
    print()
    print(f"injected delays: boot {args.boot:.2f} s + max(agent {args.agent:.2f}, winrm-late {args.winrm_late:.2f}) "
          f"= {injected:.2f} s on the critical path")
    print(f"one-off import of google-cloud-compute: {import_seconds:.2f} s (not in the figures below)")
    print(f"{'run':>4} {'wall s':>8} {'overhead s':>11} {'left':>5}  " + " ".join(f"{p:>9}" for p in phases))
    for i, (wall, durations, left) in enumerate(rows, 1):
        print(f"{i:>4} {wall:8.2f} {wall - injected:11.2f} {left:5d}  "
              + " ".join(f"{durations.get(p, 0.0):9.2f}" for p in phases))
    median = statistics.median(wall - injected for wall, _, _ in rows)
    verdict = "met" if median <= args.target else "NOT met"
    print(f"median overhead: {median:.2f} s (target <= {args.target:.2f} s: {verdict}); teardown is the cleanup phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
