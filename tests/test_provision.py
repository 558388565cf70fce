"""Creating the Windows server on the emulated Compute Engine, end to end: the real ``flow.run`` (in-process) or the
real ``winbuilder`` command (subprocess), over real sockets, with the unmodified google-cloud-compute client.

Every test ends by checking that no instance, disk or per-run firewall rule is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gce import FAST
from tests.fixtures.sshd import require_sshd
from winbuilder import flow, gce, provision
from winbuilder.emulator.compute.faults import FaultSchedule, HttpFault, OperationFault
from winbuilder.emulator.compute.server import GceEmulator, start_gce
from winbuilder.errors import ExitCode
from winbuilder.spec import GceSpec, RunSpec, TargetSpec, TlsSpec

PROJECT = "test-project"
ZONE = "us-central1-a"


def start(**overrides: Any) -> GceEmulator:
    """A fast emulator (``FAST`` with ``overrides``); all share the process-wide guest address pool."""
    return start_gce(replace(FAST, **overrides), listen=("127.0.0.1", 0))


def leaked(emu: GceEmulator) -> list[str]:
    """Names of every instance, disk and firewall rule the emulator still holds."""
    b = emu.backend
    return ([f"instance {i['name']}" for i in b.instances()] + [f"disk {d['name']}" for d in b.disks()]
            + [f"firewall {f['name']}" for f in b.firewalls()])


def gce_spec(emu: GceEmulator, **overrides: Any) -> GceSpec:
    base: dict[str, Any] = {
        "project": PROJECT, "zone": ZONE, "region": None, "compute_endpoint": emu.compute_url,
        "egress_ip_url": emu.compute_url + "/egress-ip", "max_run_duration": 600.0, "boot_timeout": 30.0}
    base.update(overrides)
    return GceSpec(**base)


def run_spec(emu: GceEmulator, workspace: Path, command: str = "echo built> result.txt", *,
             insecure: bool = False, keep: bool = False, connect_timeout: float = 30, **overrides: Any) -> RunSpec:
    return RunSpec(command=command, workspace=workspace, run_id=flow.new_run_id(), keep_on_failure=keep,
                   target=TargetSpec(host="", user="winbuilder", tls=TlsSpec(insecure_skip_verify=insecure)),
                   connect_timeout=connect_timeout, gce=gce_spec(emu, **overrides))


def with_step(spec: RunSpec, after: str, fn: Callable[[flow.RunContext], None]) -> list[flow.NamedStep]:
    """``flow.plan(spec)`` with a test step inserted after the step named ``after``."""
    steps = flow.plan(spec)
    index = [s.name for s in steps].index(after) + 1
    return [*steps[:index], flow.NamedStep("test-hook", fn), *steps[index:]]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "src.txt").write_text("source\n")
    return ws


# -- in-process runs ------------------------------------------------------------------------------------------------


def test_happy_path(gce_env: GceEmulator, workspace: Path) -> None:
    spec = run_spec(gce_env, workspace)
    seen: dict[str, Any] = {}

    def snapshot(ctx: flow.RunContext) -> None:
        seen["instances"] = gce_env.backend.instances()
        seen["firewalls"] = gce_env.backend.firewalls()
        seen["disks"] = gce_env.backend.disks()
        seen["target"] = ctx.target

    result = flow.run(spec, with_step(spec, "ready", snapshot))
    assert result.exit_code == 0, result.error
    assert (workspace / "result.txt").read_text().strip() == "built"
    assert [p.name for p in result.phases][:7] == ["preflight", "firewall", "instance", "password", "tls-pin",
                                                   "ready", "test-hook"]
    (inst,) = seen["instances"]
    name = f"winbuilder-{spec.run_id}"
    assert inst["name"] == name
    assert inst["labels"]["winbuilder"] == "1" and inst["labels"]["winbuilder-run"] == spec.run_id
    assert int(inst["labels"]["winbuilder-expires"]) > time.time() + 500
    assert inst["scheduling"]["maxRunDuration"]["seconds"] == "600"
    assert inst["scheduling"]["instanceTerminationAction"] == "DELETE"
    (disk,) = seen["disks"]
    assert "/projects/windows-cloud/global/images/windows-server-2022-dc-core-for-containers-v" in disk["sourceImage"]
    assert name in inst["tags"]["items"]
    (rule,) = seen["firewalls"]
    assert rule["sourceRanges"] == ["127.0.0.1/32"] and rule["targetTags"] == [name]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["5986"]}]
    target = seen["target"]
    guest_thumb = target.tls.cert_fingerprint
    assert guest_thumb and len(guest_thumb) == 40 and not target.tls.insecure_skip_verify
    assert leaked(gce_env) == []


def test_internal_ip_makes_no_rule(gce_env: GceEmulator, workspace: Path) -> None:
    spec = run_spec(gce_env, workspace, internal_ip=True)
    result = flow.run(spec)
    assert result.exit_code == 0, result.error
    assert "compute.firewalls.insert" not in gce_env.backend.calls()
    assert leaked(gce_env) == []


def test_zone_fallback(gce_env: GceEmulator, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gce_env.backend.set_faults(FaultSchedule(operations=(
        OperationFault("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED", zone="us-central1-a"),)))
    spec = run_spec(gce_env, workspace, zone=None, region="us-central1")
    zones: list[str] = []
    result = flow.run(spec, with_step(spec, "instance", lambda ctx: zones.append(ctx.notes["zone"])))
    assert result.exit_code == 0, result.error
    assert zones == ["us-central1-b"]
    assert "zone us-central1-a has no capacity" in capsys.readouterr().err
    assert leaked(gce_env) == []


def test_quota_fails_fast(gce_env: GceEmulator, workspace: Path) -> None:
    gce_env.backend.set_faults(FaultSchedule(operations=(OperationFault("instances.insert", "QUOTA_EXCEEDED"),)))
    result = flow.run(run_spec(gce_env, workspace, zone=None, region="us-central1"))
    assert result.exit_code == ExitCode.CAPACITY
    assert result.error and "CPUS" in result.error and "us-central1" in result.error
    assert gce_env.backend.calls()["compute.instances.insert"] == 1  # no other zone tried
    assert leaked(gce_env) == []


def test_transient_api_errors_survived(gce_env: GceEmulator, workspace: Path) -> None:
    gce_env.backend.set_faults(FaultSchedule(http=(
        HttpFault("firewalls.insert", status=429), HttpFault("instances.insert", status=503),
        HttpFault("zoneOperations.wait", status=503, call=2), HttpFault("instances.setMetadata", status=429),
        HttpFault("instances.getSerialPortOutput", status=503, call=2, times=2),
        HttpFault("instances.delete", status=503), HttpFault("firewalls.delete", status=429))))
    result = flow.run(run_spec(gce_env, workspace))
    assert result.exit_code == 0, result.error
    calls = gce_env.backend.calls()
    assert calls["compute.instances.insert"] == 2 and calls["compute.firewalls.delete"] == 2
    assert leaked(gce_env) == []


def test_agent_error_surfaced(gce_env: GceEmulator, workspace: Path) -> None:
    gce_env.backend.set_faults(FaultSchedule(agent_error="The user account is disabled."))
    t0 = time.monotonic()
    result = flow.run(run_spec(gce_env, workspace))
    assert result.exit_code == ExitCode.CONNECTION
    assert result.error and "The user account is disabled." in result.error
    assert time.monotonic() - t0 < 20  # at once, not at the boot deadline
    assert leaked(gce_env) == []


def test_fingerprint_conflict_retried_keeping_other_metadata(gce_env: GceEmulator, workspace: Path) -> None:
    gce_env.backend.set_faults(FaultSchedule(metadata_conflicts=2))
    spec = run_spec(gce_env, workspace)
    seen: list[dict[str, str]] = []

    def snapshot(ctx: flow.RunContext) -> None:
        (inst,) = gce_env.backend.instances()
        seen.append({i["key"]: i["value"] for i in inst["metadata"]["items"]})

    result = flow.run(spec, with_step(spec, "password", snapshot))
    assert result.exit_code == 0, result.error
    (items,) = seen
    assert items["someone-else-1"] == items["someone-else-2"] == "changed concurrently"
    assert items["enable-guest-attributes"] == "TRUE"
    assert len(items["windows-keys"].splitlines()) == 1
    assert gce_env.backend.calls()["compute.instances.setMetadata"] == 3
    assert leaked(gce_env) == []


def test_tls_pin_mismatch_refused_before_credentials(gce_env: GceEmulator, workspace: Path) -> None:
    spec = run_spec(gce_env, workspace)
    hosts: list[Any] = []

    def impostor(ctx: flow.RunContext) -> None:
        st = provision.state(ctx)
        guest = gce_env.backend.guest(PROJECT, st.zone or "", st.name)
        assert guest.booted.wait(10)
        with guest._lock:  # the published thumbprint is not the listener's certificate
            guest._attributes[("hostkeys", "winrm")] = "AB" * 20
        hosts.extend(guest._hosts)

    result = flow.run(spec, with_step(spec, "password", impostor))
    assert result.exit_code == ExitCode.SECURITY, result.error
    assert hosts and all(h.stats()["http_requests"] == 0 for h in hosts)  # not one HTTP request, no NTLM
    assert leaked(gce_env) == []


def test_pin_missing_is_a_security_error(gce_env: GceEmulator, workspace: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision, "PIN_GRACE", 0.5)
    spec = run_spec(gce_env, workspace)

    def unpublish(ctx: flow.RunContext) -> None:
        st = provision.state(ctx)
        guest = gce_env.backend.guest(PROJECT, st.zone or "", st.name)
        with guest._lock:
            guest._attributes.clear()

    result = flow.run(spec, with_step(spec, "password", unpublish))
    assert result.exit_code == ExitCode.SECURITY
    assert result.error and "hostkeys/winrm" in result.error
    assert leaked(gce_env) == []


def test_boot_timeout_prints_serial_tail(gce_env: GceEmulator, workspace: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    gce_env.backend.set_faults(FaultSchedule(winrm_late=60))
    result = flow.run(run_spec(gce_env, workspace, boot_timeout=3))
    assert result.exit_code == ExitCode.TIMEOUT
    err = capsys.readouterr().err
    assert "last output of serial port 1" in err and "Instance setup finished" in err
    assert leaked(gce_env) == []


def test_gc_cleans_expired(gce_env: GceEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    from google.oauth2.credentials import Credentials

    from winbuilder.cli import main

    compute = gce.connect(PROJECT, gce_env.compute_url, Credentials(gce_env.issue_token()))  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 60
    image = gce.resolve_image(compute, "ltsc2022", deadline)
    spec = gce_spec(gce_env)
    for run_id, expires in (("old1", int(time.time()) - 10), ("new1", int(time.time()) + 3600)):
        name = provision.instance_name(run_id)
        gce.wait_operation(compute, gce.insert_instance(
            compute, ZONE, provision.instance_body(spec, name, ZONE, image, name, run_id, expires), deadline), deadline)
        gce.wait_operation(compute, gce.insert_firewall(compute, provision.firewall_body(
            spec, f"{name}-5986", name, 5986, ["127.0.0.1/32"], run_id), deadline), deadline)
    main(["gc", "--project", PROJECT, "--zone", ZONE, "--dry-run", "--grace", "1s"])
    assert "would delete instance us-central1-a/winbuilder-old1" in capsys.readouterr().out
    assert len(gce_env.backend.instances()) == 2
    time.sleep(1.1)
    main(["gc", "--project", PROJECT, "--region", "us-central1", "--grace", "1s"])
    out = capsys.readouterr().out
    assert "deleted instance us-central1-a/winbuilder-old1 (expired)" in out
    assert "deleted firewall rule winbuilder-old1-5986" in out
    assert [i["name"] for i in gce_env.backend.instances()] == ["winbuilder-new1"]
    assert [f["name"] for f in gce_env.backend.firewalls()] == ["winbuilder-new1-5986"]


# -- the fault matrix -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    faults: FaultSchedule
    expect: int | None  # None: any failure code
    overrides: tuple[tuple[str, Any], ...] = ()


MATRIX = (
    Scenario("no fault", FaultSchedule(), 0),
    Scenario("429 firewall insert", FaultSchedule(http=(HttpFault("firewalls.insert", 429, times=2),)), 0),
    Scenario("503 instance insert", FaultSchedule(http=(HttpFault("instances.insert", 503),)), 0),
    Scenario("503 global op wait", FaultSchedule(http=(HttpFault("globalOperations.wait", 503),)), 0),
    Scenario("429 setMetadata", FaultSchedule(http=(HttpFault("instances.setMetadata", 429),)), 0),
    Scenario("503 serial port", FaultSchedule(http=(HttpFault("instances.getSerialPortOutput", 503, times=3),)), 0),
    Scenario("503 guest attributes", FaultSchedule(http=(HttpFault("instances.getGuestAttributes", 503),)), 0),
    Scenario("503 instance delete", FaultSchedule(http=(HttpFault("instances.delete", 503, times=2),)), 0),
    Scenario("429 firewall delete", FaultSchedule(http=(HttpFault("firewalls.delete", 429),)), 0),
    Scenario("delete operation fails once", FaultSchedule(operations=(
        OperationFault("instances.delete", "INTERNAL_ERROR", times=1),)), 0),
    Scenario("quota", FaultSchedule(operations=(OperationFault("instances.insert", "QUOTA_EXCEEDED"),)),
             ExitCode.CAPACITY, (("zone", None), ("region", "us-central1"))),
    Scenario("one zone exhausted", FaultSchedule(operations=(
        OperationFault("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED", zone=ZONE),)), 0,
        (("zone", None), ("region", "us-central1"))),
    Scenario("every zone exhausted", FaultSchedule(operations=(
        OperationFault("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED"),)), ExitCode.CAPACITY,
        (("zone", None), ("region", "us-central1"))),
    Scenario("firewall insert fails", FaultSchedule(operations=(
        OperationFault("firewalls.insert", "RESOURCE_NOT_READY"),)), ExitCode.CONNECTION),
    Scenario("agent error", FaultSchedule(agent_error="Access is denied."), ExitCode.CONNECTION),
    Scenario("metadata conflicts", FaultSchedule(metadata_conflicts=3), 0),
    Scenario("WinRM never comes", FaultSchedule(winrm_late=60), ExitCode.TIMEOUT, (("boot_timeout", 3.0),)),
    Scenario("WinRM drops", FaultSchedule(winrm_drop_after=0.3), None, (("connect_timeout", 3.0),)),
)


def test_fault_matrix(gce_env: GceEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every scenario runs against its own emulator (no auth: the tokens come from ``gce_env``'s metadata server)."""
    timings: dict[str, float] = {}

    def one(scenario: Scenario) -> tuple[str, int, list[str]]:
        t0 = time.monotonic()
        emu = start(faults=scenario.faults, require_auth=False)
        try:
            ws = tmp_path / scenario.name.replace(" ", "-")
            ws.mkdir()
            (ws / "a.txt").write_text("a")
            result = flow.run(run_spec(emu, ws, **dict(scenario.overrides)))
            return scenario.name, result.exit_code, leaked(emu)
        finally:
            emu.close()
            timings[scenario.name] = time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(one, MATRIX))
    total_leaked = sum(len(leaks) for _, _, leaks in outcomes)
    with capsys.disabled():
        print(f"\nfault matrix: {len(MATRIX)} scenarios, {total_leaked} leaked")
        print(" ".join(f"{k}={v:.1f}s" for k, v in timings.items()))
    for scenario, (name, code, leaks) in zip(MATRIX, outcomes, strict=True):
        assert leaks == [], f"{name}: {leaks}"
        if scenario.expect is None:
            assert code != 0, name
        else:
            assert code == scenario.expect, f"{name}: exit {code}"
    assert total_leaked == 0


# -- the real command, as a subprocess --------------------------------------------------------------------------------


@pytest.fixture
def cloudsdk(tmp_path: Path) -> Path:
    path = tmp_path / "cloudsdk"
    path.mkdir()
    return path


def command_env(emu: GceEmulator, cloudsdk: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "PROJECT_ID", "GOOGLE_CLOUD_PROJECT", "WINBUILDER_PASSWORD")}
    env.update({"GCE_METADATA_HOST": emu.metadata_host, "GCE_METADATA_IP": emu.metadata_host,
                "WINBUILDER_COMPUTE_ENDPOINT": emu.compute_url, "CLOUDSDK_CONFIG": str(cloudsdk),
                "PYTHONUNBUFFERED": "1"})
    return env


class Proc:
    """A ``winbuilder run`` subprocess whose stdout/stderr are collected by threads."""

    def __init__(self, emu: GceEmulator, cloudsdk: Path, workspace: Path, *args: str) -> None:
        argv = [sys.executable, "-m", "winbuilder", "run", "--project", PROJECT, "--zone", ZONE,
                "--egress-ip-url", emu.compute_url + "/egress-ip", "--workspace", str(workspace), *args]
        self.popen = subprocess.Popen(argv, env=command_env(emu, cloudsdk), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, sink: list[bytes]) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line)

    def text(self) -> str:
        return b"".join(self.out + self.err).decode("utf-8", "replace")

    def wait(self, timeout: float = 120) -> int:
        rc = self.popen.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc


def _wait_for(cond: Callable[[], bool], timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


@dataclass(frozen=True)
class Phase:
    name: str
    faults: FaultSchedule
    ready: Callable[[GceEmulator, Proc], bool]
    command: str = "echo ok"


def _calls(method: str) -> Callable[[GceEmulator, Proc], bool]:
    return lambda emu, proc: emu.backend.calls().get(method, 0) >= 1


SIGTERM_PHASES = (
    # slow global operations keep the run inside the firewall phase
    Phase("firewall", FaultSchedule(http=(HttpFault("globalOperations.wait", 503, times=3),)),
          _calls("compute.firewalls.insert")),
    # mid-insert: the signal lands while the insert operation is still being waited for
    Phase("instance", FaultSchedule(http=(HttpFault("zoneOperations.wait", 503, times=3),)),
          _calls("compute.instances.insert")),
    Phase("password", FaultSchedule(agent_delay=60), _calls("compute.instances.setMetadata")),
    Phase("ready", FaultSchedule(winrm_late=60), lambda emu, proc: "certificate pinned" in proc.text()),
    Phase("run", FaultSchedule(), lambda emu, proc: "connected to" in proc.text(), "timeout /t 60 /nobreak"),
)


def test_sigterm_in_each_phase_leaves_nothing(workspace: Path, cloudsdk: Path) -> None:
    def one(phase: Phase) -> tuple[str, int, list[str], str]:
        emu = start(faults=phase.faults)
        try:
            proc = Proc(emu, cloudsdk, workspace, "--boot-timeout", "90s", "--command", phase.command)
            try:
                _wait_for(lambda: phase.ready(emu, proc) or proc.popen.poll() is not None)
                time.sleep(0.2)
                proc.popen.send_signal(signal.SIGTERM)
            finally:
                rc = proc.wait()
            return phase.name, rc, leaked(emu), proc.text()
        finally:
            emu.close()

    with ThreadPoolExecutor(max_workers=len(SIGTERM_PHASES)) as pool:
        outcomes = list(pool.map(one, SIGTERM_PHASES))
    for name, rc, leaks, text in outcomes:
        assert rc == ExitCode.SIGTERM, f"{name}: exit {rc}\n{text[-3000:]}"
        assert leaks == [], f"{name}: {leaks}"
        assert "cancelled by signal 15" in text, name


def test_sigkill_is_covered_by_max_run_duration(workspace: Path, cloudsdk: Path) -> None:
    emu = start(faults=FaultSchedule(agent_delay=60))
    try:
        proc = Proc(emu, cloudsdk, workspace, "--timeout", "1s", "--boot-timeout", "1s",
                    "--max-run-duration", "3s", "--command", "echo ok")
        _wait_for(lambda: bool(emu.backend.calls().get("compute.instances.setMetadata")))
        proc.popen.kill()
        assert proc.wait() == -signal.SIGKILL
        assert emu.backend.instances(), "the VM exists when winbuilder dies"
        _wait_for(lambda: not emu.backend.instances() and not emu.backend.disks(), timeout=30)
        # the rule outlives a SIGKILL; gc removes it once its VM is gone
        from google.oauth2.credentials import Credentials

        compute = gce.connect(PROJECT, emu.compute_url, Credentials(emu.issue_token()))  # type: ignore[no-untyped-call]
        result = provision.gc(compute, grace=0)
        assert len(result.rules) == 1
        assert leaked(emu) == []
    finally:
        emu.close()


def test_no_secret_in_debug_output(workspace: Path, cloudsdk: Path) -> None:
    emu = start()
    try:
        proc = Proc(emu, cloudsdk, workspace, "--debug", "--keep-on-failure", "--command", "exit /b 3")
        assert proc.wait() == 3, proc.text()[-3000:]
        text = proc.text()
        assert "kept for debugging" in text and "gcloud compute instances delete winbuilder-" in text
        (inst,) = emu.backend.instances()
        guest = emu.backend.guest(PROJECT, ZONE, inst["name"])
        password = guest._password
        assert password and len(password) >= 15
        serial4, _, _ = guest.serial[4].read(0)
        answer = json.loads(serial4.strip().splitlines()[-1])
        ciphertext = answer["encryptedPassword"]
        for secret in (password, ciphertext, base64.b64decode(ciphertext).hex()):
            assert secret not in text
        assert "DEBUG" in text  # --debug was on
        keys = next(i["value"] for i in inst["metadata"]["items"] if i["key"] == "windows-keys")
        assert "PRIVATE" not in keys and "encryptedPassword" not in keys
    finally:
        emu.close()


@pytest.fixture(autouse=True)
def _no_project_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PROJECT_ID", raising=False)
    yield


@pytest.mark.parametrize(("args", "message"), [
    (["--user", "a:b"], "cannot name the account"),
    (["--ssh-key", __file__], "--ssh-key given without --host"),
    (["--password-file", __file__], "--password-file given without --host"),
    (["--zone", "a", "--region", "b"], "--zone and --region"),
    (["--allow-from", "0.0.0.0/0"], "whole internet"),
    (["--timeout", "1h", "--boot-timeout", "20m", "--max-run-duration", "1h"], "must exceed"),
    (["--image", "windows-server-2022-dc-v20250101"], "dated image"),
    (["--winrm-http"], "not WinRM HTTP"),
    (["--transport", "ssh", "--insecure-skip-verify"], "does not apply to --transport ssh"),
    (["--labels", "novalue"], "key=value"),
])
def test_create_mode_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from winbuilder.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--project", PROJECT, *args, "--command", "build.cmd"])
    assert exit_info.value.code == ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_gce_options_need_create_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from winbuilder.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--host", "h", "--user", "u", "--zone", ZONE, "--spot", "--command", "x"])
    assert exit_info.value.code == ExitCode.USAGE
    assert "--zone, --spot apply only when winbuilder creates the server" in capsys.readouterr().err


# -- --transport ssh on a created server ------------------------------------------------------------------------------
# The emulated guest's sshd can only log in the local user running it, so these runs use that user (as --user).


def ssh_run_spec(emu: GceEmulator, workspace: Path, command: str = "echo built> result.txt",
                 **overrides: Any) -> RunSpec:
    from winbuilder.emulator.sshd import current_user

    require_sshd()
    user = current_user()
    return RunSpec(command=command, workspace=workspace, run_id=flow.new_run_id(), connect_timeout=30,
                   target=TargetSpec(host="", user=user, transport="ssh"), gce=gce_spec(emu, user=user, **overrides))


def _metadata(inst: dict[str, Any]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in inst["metadata"]["items"]}


def test_ssh_happy_path(gce_env: GceEmulator, workspace: Path) -> None:
    import asyncssh

    from winbuilder.emulator.sshd import fingerprint

    spec = ssh_run_spec(gce_env, workspace)
    seen: dict[str, Any] = {}

    def snapshot(ctx: flow.RunContext) -> None:
        st = provision.state(ctx)
        guest = gce_env.backend.guest(PROJECT, st.zone or "", st.name)
        (seen["instance"],) = gce_env.backend.instances()
        seen["firewalls"] = gce_env.backend.firewalls()
        seen["target"] = ctx.target
        seen["guest"] = guest
        seen["sshd"] = guest._sshd
        ((_, _, seen["published"]),) = guest.attributes("hostkeys/ssh-ed25519")
        assert ctx.target is not None and ctx.target.ssh.key_path is not None
        seen["mode"] = ctx.target.ssh.key_path.stat().st_mode & 0o777
        seen["public"] = asyncssh.read_private_key(str(ctx.target.ssh.key_path)).export_public_key().decode()

    result = flow.run(spec, with_step(spec, "ready", snapshot))
    assert result.exit_code == 0, result.error
    assert (workspace / "result.txt").read_text().strip() == "built"
    assert [p.name for p in result.phases][:7] == ["preflight", "ssh-key", "firewall", "instance", "ssh-host-key",
                                                   "ready", "test-hook"]
    assert "password" not in [p.name for p in result.phases]
    items = _metadata(seen["instance"])
    assert items["enable-windows-ssh"] == "TRUE" and items["enable-guest-attributes"] == "TRUE"
    assert "windows-keys" not in items  # no password step
    user = spec.gce.user if spec.gce else ""
    algo, blob, comment = seen["public"].split()
    assert items["ssh-keys"] == f"{user}:{algo} {blob} winbuilder-{spec.run_id}" and algo == "ssh-ed25519"
    assert "PRIVATE" not in json.dumps(seen["instance"])
    (rule,) = seen["firewalls"]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["22"]}] and rule["name"].endswith("-22")
    target = seen["target"]
    assert target.transport == "ssh" and target.password is None and seen["mode"] == 0o600
    assert target.ssh.host_key == fingerprint(seen["published"]) == seen["sshd"].host_key_fingerprint
    assert not target.ssh.key_path.exists(), "the private key file outlived the run"
    assert seen["guest"].closed and seen["sshd"].process.poll() is not None  # deletion stopped sshd
    assert leaked(gce_env) == []


def test_ssh_host_key_mismatch_refused(gce_env: GceEmulator, workspace: Path) -> None:
    import asyncssh

    spec = ssh_run_spec(gce_env, workspace)
    seen: dict[str, Any] = {}

    def impostor(ctx: flow.RunContext) -> None:
        st = provision.state(ctx)
        guest = gce_env.backend.guest(PROJECT, st.zone or "", st.name)
        _wait_for(lambda: bool(guest.attributes("hostkeys/ssh-ed25519")), timeout=20)
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        with guest._lock:  # the published host key is not the one sshd presents
            guest._attributes[("hostkeys", "ssh-ed25519")] = other
        assert ctx.target is not None
        seen["key_path"] = ctx.target.ssh.key_path

    result = flow.run(spec, with_step(spec, "instance", impostor))
    assert result.exit_code == ExitCode.SECURITY, result.error
    assert result.error and "host key" in result.error
    assert [p.name for p in result.phases if not p.ok] == ["connect"]
    assert not seen["key_path"].exists()
    assert leaked(gce_env) == []


def test_ssh_host_key_not_published_is_a_security_error(gce_env: GceEmulator, workspace: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ssh_run_spec(gce_env, workspace, boot_timeout=3.0)
    monkeypatch.setattr(provision, "SSH_HOST_KEY_ATTRIBUTE", "hostkeys/ssh-nothing")
    result = flow.run(spec)
    assert result.exit_code == ExitCode.SECURITY
    assert result.error and "hostkeys/ssh-nothing" in result.error
    assert leaked(gce_env) == []


def test_ssh_pure_helpers() -> None:
    from winbuilder.errors import UsageError

    pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAbO+qF1qJvPBHP+MDCLxNix7ZT73pr638Rttxmg452h"
    assert provision.ssh_keys_entry("builder", pub + " c\n") == f"builder:{pub} c"
    assert provision.host_key_fingerprint(pub) == "SHA256:mwYvBmPF8RXz01pqwZ+O2vCsUPSa9OcCXcFYBT74OZE"
    for bad in ("a:b", "a b", ""):
        with pytest.raises(UsageError):
            provision.ssh_keys_entry(bad, pub)
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        provision.host_key_fingerprint("ssh-ed25519 bm90IGEga2V5")


def test_ssh_sigterm_in_run_leaves_nothing(workspace: Path, cloudsdk: Path) -> None:
    import tempfile

    from winbuilder.emulator.sshd import current_user

    require_sshd()
    emu = start()
    try:
        proc = Proc(emu, cloudsdk, workspace, "--transport", "ssh", "--user", current_user(), "--boot-timeout", "90s",
                    "--command", "timeout /t 60 /nobreak")
        names: list[str] = []
        try:
            _wait_for(lambda: "connected to" in proc.text() or proc.popen.poll() is not None)
            names.extend(i["name"] for i in emu.backend.instances())
            keys = [p for n in names for p in Path(tempfile.gettempdir()).glob(f"{n}-*.key")]
            time.sleep(0.2)
            proc.popen.send_signal(signal.SIGTERM)
        finally:
            rc = proc.wait()
        text = proc.text()
        assert rc == ExitCode.SIGTERM, text[-3000:]
        assert "cancelled by signal 15" in text and "SSH host key pinned" in text
        assert len(names) == 1 and len(keys) == 1, "one VM and one private key file during the run"
        assert not keys[0].exists()
        assert leaked(emu) == []
    finally:
        emu.close()
