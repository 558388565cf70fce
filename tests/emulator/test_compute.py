"""The emulated Compute Engine API, metadata server and Windows guests, driven by the unmodified google-cloud-compute
client (REST transport, ``api_endpoint``), google-auth and pypsrp over real sockets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from pypsrp.shell import Process, WinRS
from pypsrp.wsman import WSMan

from tests.fixtures.gce import FAST, GceClients
from winbuilder import password as pw
from winbuilder.emulator.compute import filters
from winbuilder.emulator.compute.errors import ApiError
from winbuilder.emulator.compute.faults import FaultSchedule, HttpFault, OperationFault
from winbuilder.emulator.compute.server import GceEmulator, start_gce
from winbuilder.emulator.guest import SerialPort

PROJECT = "test-project"
ZONE = "us-central1-a"
TAG = "wb-run-1"


# -- helpers ---------------------------------------------------------------------------------------------------
def instance_body(name: str = "wb-test-1", *, external: bool = True, tags: tuple[str, ...] = (TAG,),
                  max_run: int | None = None, zone: str = ZONE,
                  image: str = "projects/windows-cloud/global/images/family/windows-2022-core"
                  ) -> compute_v1.Instance:
    nic = compute_v1.NetworkInterface(network="global/networks/default")
    if external:
        nic.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    body = compute_v1.Instance(
        name=name, machine_type=f"zones/{zone}/machineTypes/n2-standard-4",
        disks=[compute_v1.AttachedDisk(
            boot=True, auto_delete=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=image, disk_size_gb=64, disk_type=f"zones/{zone}/diskTypes/pd-balanced"))],
        network_interfaces=[nic],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key="enable-guest-attributes", value="TRUE"),
                                            compute_v1.Items(key="other", value="keep me\nbyte for byte ")]),
        labels={"winbuilder": "1", "winbuilder-run": "abc"}, tags=compute_v1.Tags(items=list(tags)))
    if max_run is not None:
        body.scheduling = compute_v1.Scheduling(max_run_duration=compute_v1.Duration(seconds=max_run),
                                                instance_termination_action="DELETE")
    return body


def wait_zone(c: GceClients, op_name: str, deadline: float = 20.0) -> Any:
    """Our own wait loop (ExtendedOperation.result() would go to the real API)."""
    end = time.monotonic() + deadline
    while True:
        op = c.zone_operations.wait(project=PROJECT, zone=ZONE, operation=op_name)
        if op.status == compute_v1.Operation.Status.DONE:
            return op
        assert time.monotonic() < end, "operation did not finish"


def wait_global(c: GceClients, op_name: str) -> Any:
    while True:
        op = c.global_operations.wait(project=PROJECT, operation=op_name)
        if op.status == compute_v1.Operation.Status.DONE:
            return op


def create(c: GceClients, body: compute_v1.Instance) -> Any:
    op = c.instances.insert(project=PROJECT, zone=ZONE, instance_resource=body)
    done = wait_zone(c, op.name)
    assert not done.error.errors, done.error
    return c.instances.get(project=PROJECT, zone=ZONE, instance=body.name)


def serial(c: GceClients, name: str, port: int, start: int = 0) -> Any:
    return c.instances.get_serial_port_output(request=compute_v1.GetSerialPortOutputInstanceRequest(
        project=PROJECT, zone=ZONE, instance=name, port=port, start=start))


def until(predicate: Any, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def thumbprint_attr(c: GceClients, name: str) -> str:
    def read() -> str | None:
        try:
            ga = c.instances.get_guest_attributes(request=compute_v1.GetGuestAttributesInstanceRequest(
                project=PROJECT, zone=ZONE, instance=name, query_path="hostkeys/"))
        except gexc.NotFound:
            return None
        return str(next(i.value for i in ga.query_value.items if i.key == "winrm"))
    return str(until(read))


def peer_thumbprint(ip: str, port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((ip, port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - the Windows thumbprint


def tls_reachable(ip: str, port: int) -> bool:
    try:
        peer_thumbprint(ip, port)
    except (OSError, ssl.SSLError):
        return False
    return True


ISSUE = "issue"  # api(): issue a fresh token


def api(emu: GceEmulator, method: str, path: str, body: Any = None, token: str | None = ISSUE
        ) -> requests.Response:
    headers = {}
    if token == ISSUE:
        token = emu.issue_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, f"{emu.compute_url}/compute/v1/{path}", json=body, headers=headers, timeout=10)


def add_rule(c: GceClients, name: str, source: str, tags: list[str] | None = None, port: str = "5986") -> None:
    rule = compute_v1.Firewall(name=name, network="global/networks/default", direction="INGRESS",
                               allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=[port])],
                               source_ranges=[source], target_tags=tags or [])
    op = c.firewalls.insert(project=PROJECT, firewall_resource=rule)
    assert not wait_global(c, op.name).error.errors


# -- the whole flow --------------------------------------------------------------------------------------------
def test_happy_path_insert_password_winrm_delete(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    c = gce_clients
    image = c.images.get_from_family(project="windows-cloud", family="windows-2022-core-for-containers")
    inst = create(c, instance_body(image=image.self_link))
    assert inst.status == "RUNNING"
    nic = inst.network_interfaces[0]
    ext, internal = nic.access_configs[0].nat_i_p, nic.network_i_p
    assert ext.startswith("127.0.0.") and internal.startswith("127.0.1.")

    thumb = thumbprint_attr(c, inst.name)
    until(lambda: "Instance setup finished" in serial(c, inst.name, 1).contents)
    assert f"Thumbprint: {thumb}" in serial(c, inst.name, 1).contents
    add_rule(c, "wb-allow", "127.0.0.1/32", [TAG])
    assert peer_thumbprint(ext, 5986) == thumb == peer_thumbprint(internal, 5986)  # the pin holds

    key = pw.new_key()
    start = int(serial(c, inst.name, 4).next_)
    entry = pw.key_entry(key, "builder", "ci@example.com", 300)
    current = c.instances.get(project=PROJECT, zone=ZONE, instance=inst.name).metadata
    body = pw.set_metadata_body(json.loads(compute_v1.Metadata.to_json(current)), entry)
    op = c.instances.set_metadata(project=PROJECT, zone=ZONE, instance=inst.name,
                                  metadata_resource=compute_v1.Metadata.from_json(json.dumps(body)))
    wait_zone(c, op.name)
    after = {i.key: i.value for i in c.instances.get(project=PROJECT, zone=ZONE, instance=inst.name).metadata.items}
    assert after["other"] == "keep me\nbyte for byte "

    reader = pw.PasswordReader(key, user="builder")
    secret = None
    end = time.monotonic() + 10
    while secret is None:
        assert time.monotonic() < end
        out = serial(c, inst.name, 4, start)
        secret = reader.feed(out.contents)
        start = int(out.next_)
        time.sleep(0.05)

    wsman = WSMan(ext, port=5986, username="builder", password=secret.reveal(), ssl=True, auth="negotiate",
                  cert_validation=False, reconnection_retries=0, operation_timeout=5)
    with wsman, WinRS(wsman) as shell:
        proc = Process(shell, "exit /b 7")
        proc.invoke()
        assert proc.rc == 7

    op = c.instances.delete(project=PROJECT, zone=ZONE, instance=inst.name)
    assert c.instances.get(project=PROJECT, zone=ZONE, instance=inst.name).status == "STOPPING"
    wait_zone(c, op.name)
    with pytest.raises(gexc.NotFound):
        c.instances.get(project=PROJECT, zone=ZONE, instance=inst.name)
    assert gce_emulator.backend.instances() == [] and gce_emulator.backend.disks() == []
    assert not tls_reachable(internal, 5986)  # deletion stopped the guest
    with pytest.raises(gexc.NotFound):  # a retried delete: 404, which the client treats as success
        c.instances.delete(project=PROJECT, zone=ZONE, instance=inst.name)


def test_operation_steps_one_state_per_poll(gce_clients: GceClients) -> None:
    c = gce_clients
    op = c.instances.insert(project=PROJECT, zone=ZONE, instance_resource=instance_body())
    assert op.status == compute_v1.Operation.Status.PENDING
    states = [c.zone_operations.get(project=PROJECT, zone=ZONE, operation=op.name).status for _ in range(3)]
    assert states == [compute_v1.Operation.Status.RUNNING, compute_v1.Operation.Status.DONE,
                      compute_v1.Operation.Status.DONE]


def test_firewall_enforced_on_external_address_only(gce_clients: GceClients) -> None:
    c = gce_clients
    inst = create(c, instance_body())
    ext, internal = inst.network_interfaces[0].access_configs[0].nat_i_p, inst.network_interfaces[0].network_i_p
    thumbprint_attr(c, inst.name)  # booted
    assert tls_reachable(internal, 5986)  # inside the VPC: no check
    assert not tls_reachable(ext, 5986)  # no rule: dropped
    add_rule(c, "wrong-tag", "127.0.0.1/32", ["someone-else"])
    add_rule(c, "wrong-source", "10.0.0.0/8", [TAG])
    add_rule(c, "wrong-port", "127.0.0.1/32", [TAG], port="22")
    assert not tls_reachable(ext, 5986)
    add_rule(c, "right", "127.0.0.0/24", [TAG])
    assert tls_reachable(ext, 5986)
    op = c.firewalls.delete(project=PROJECT, firewall="right")
    wait_global(c, op.name)
    assert not tls_reachable(ext, 5986)
    names = [f.name for f in c.firewalls.list(request=compute_v1.ListFirewallsRequest(project=PROJECT))]
    assert names == ["wrong-port", "wrong-source", "wrong-tag"]


def test_internal_only_instance_has_no_nat_ip(gce_clients: GceClients) -> None:
    inst = create(gce_clients, instance_body(external=False))
    assert not inst.network_interfaces[0].access_configs
    assert inst.network_interfaces[0].network_i_p.startswith("127.0.1.")


# -- failures the client must handle ----------------------------------------------------------------------------
def test_zone_exhausted_operation_error(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    gce_emulator.backend.set_faults(FaultSchedule(operations=(
        OperationFault("instances.insert", "ZONE_RESOURCE_POOL_EXHAUSTED", zone=ZONE),
        OperationFault("instances.insert", "QUOTA_EXCEEDED", zone="us-central1-b"))))
    c = gce_clients
    op = c.instances.insert(project=PROJECT, zone=ZONE, instance_resource=instance_body())  # 200
    done = wait_zone(c, op.name)
    assert done.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"
    assert f"projects/{PROJECT}/zones/{ZONE}" in done.error.errors[0].message
    assert done.http_error_status_code == 503
    with pytest.raises(gexc.NotFound):
        c.instances.get(project=PROJECT, zone=ZONE, instance="wb-test-1")
    op = c.instances.insert(project=PROJECT, zone="us-central1-b",
                            instance_resource=instance_body(zone="us-central1-b"))
    done = c.zone_operations.wait(project=PROJECT, zone="us-central1-b", operation=op.name)
    assert done.error.errors[0].code == "QUOTA_EXCEEDED"
    assert done.error.errors[0].message == "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1."
    assert gce_emulator.backend.instances() == []


def test_http_429_and_503_injected(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    gce_emulator.backend.set_faults(FaultSchedule(http=(HttpFault("compute.zones.get", 429, call=1),
                                                        HttpFault("zones.get", 503, call=3),
                                                        HttpFault("instances.insert", 503, call=1))))
    c = gce_clients
    with pytest.raises(gexc.TooManyRequests):
        c.zones.get(project=PROJECT, zone=ZONE)
    assert c.zones.get(project=PROJECT, zone=ZONE).name == ZONE
    assert c.zones.get(project=PROJECT, zone=ZONE).status == "UP"  # the client's own retry absorbed the 503
    assert gce_emulator.backend.calls()["compute.zones.get"] == 4
    with pytest.raises(gexc.ServiceUnavailable):  # inserts are not retried by the client
        c.instances.insert(project=PROJECT, zone=ZONE, instance_resource=instance_body())
    assert gce_emulator.backend.instances() == []
    create(c, instance_body())


def test_fingerprint_conflict_412(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    c = gce_clients
    inst = create(c, instance_body())
    gce_emulator.backend.set_faults(FaultSchedule(metadata_conflicts=1))
    stale = inst.metadata
    new = compute_v1.Metadata(fingerprint=stale.fingerprint, items=[*stale.items, compute_v1.Items(key="a", value="b")])
    with pytest.raises(gexc.PreconditionFailed) as err:
        c.instances.set_metadata(project=PROJECT, zone=ZONE, instance=inst.name, metadata_resource=new)
    assert "fingerprint" in str(err.value)
    fresh = c.instances.get(project=PROJECT, zone=ZONE, instance=inst.name).metadata
    assert fresh.fingerprint != stale.fingerprint
    assert "someone-else-1" in {i.key for i in fresh.items}
    new = compute_v1.Metadata(fingerprint=fresh.fingerprint, items=[*fresh.items, compute_v1.Items(key="a", value="b")])
    wait_zone(c, c.instances.set_metadata(project=PROJECT, zone=ZONE, instance=inst.name,
                                          metadata_resource=new).name)
    keys = [i.key for i in c.instances.get(project=PROJECT, zone=ZONE, instance=inst.name).metadata.items]
    assert keys == ["enable-guest-attributes", "other", "someone-else-1", "a"]


def test_agent_error_message_on_serial_4(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    gce_emulator.backend.set_faults(FaultSchedule(agent_error="The user name or password is incorrect."))
    c = gce_clients
    inst = create(c, instance_body())
    thumbprint_attr(c, inst.name)
    key = pw.new_key()
    body = pw.set_metadata_body(json.loads(compute_v1.Metadata.to_json(inst.metadata)),
                                pw.key_entry(key, "builder", "ci@example.com", 300))
    c.instances.set_metadata(project=PROJECT, zone=ZONE, instance=inst.name,
                             metadata_resource=compute_v1.Metadata.from_json(json.dumps(body)))
    reader = pw.PasswordReader(key)
    with pytest.raises(pw.AgentError, match="user name or password is incorrect"):
        until(lambda: reader.feed(serial(c, inst.name, 4).contents), timeout=5)


def test_max_run_duration_deletes_instance_and_disk(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    c = gce_clients
    inst = create(c, instance_body(max_run=1))
    assert inst.scheduling.max_run_duration.seconds == 1
    internal = inst.network_interfaces[0].network_i_p
    assert gce_emulator.backend.disks()
    until(lambda: not gce_emulator.backend.instances(), timeout=5)
    assert gce_emulator.backend.disks() == []
    assert not tls_reachable(internal, 5986)
    ops = [o for o in gce_emulator.backend.operations() if o["operationType"] == "delete"]
    assert ops and ops[0]["user"] == "system" and ops[0]["status"] == "DONE"


def test_winrm_late_and_drop(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    gce_emulator.backend.set_faults(FaultSchedule(winrm_late=0.6, winrm_drop_after=0.6))
    c = gce_clients
    inst = create(c, instance_body(external=False))
    internal = inst.network_interfaces[0].network_i_p
    until(lambda: "Instance setup finished" in serial(c, inst.name, 1).contents)
    assert not tls_reachable(internal, 5986)  # setup finished, WinRM not yet
    until(lambda: tls_reachable(internal, 5986), timeout=5)
    until(lambda: not tls_reachable(internal, 5986), timeout=5)


# -- request validation ---------------------------------------------------------------------------------------
def test_schema_validation_400s(gce_emulator: GceEmulator) -> None:
    path = f"projects/{PROJECT}/zones/{ZONE}/instances"
    good = json.loads(compute_v1.Instance.to_json(instance_body()))
    r = api(gce_emulator, "POST", path, {**good, "nmae": "x"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"] == ("Invalid JSON payload received. Unknown name \"nmae\" at 'instance_resource': "
                              "Cannot find field.")
    assert err["status"] == "INVALID_ARGUMENT" and err["errors"][0]["reason"] == "invalid"
    misplaced = {**good, "natIP": "1.2.3.4"}  # belongs in networkInterfaces[].accessConfigs[]
    assert "Unknown name \"natIP\"" in api(gce_emulator, "POST", path, misplaced).json()["error"]["message"]
    nested = json.loads(json.dumps(good))
    nested["disks"][0]["initializeParams"]["diskSizeGb"] = "sixty"
    msg = api(gce_emulator, "POST", path, nested).json()["error"]["message"]
    assert msg == ("Invalid value at 'instance_resource.disks[0].initialize_params.disk_size_gb' (TYPE_INT64), "
                   "\"sixty\"")
    assert api(gce_emulator, "POST", path, {**good, "canIpForward": "yes"}).status_code == 400
    assert api(gce_emulator, "POST", path, {**good, "tags": ["a"]}).json()["error"]["message"].endswith(
        "cannot start list.")
    r = api(gce_emulator, "GET", f"{path}/x/serialPort?port=1&bogus=1")
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    assert api(gce_emulator, "POST", path, {**good, "name": "Bad_Name"}).status_code == 400
    assert gce_emulator.backend.instances() == []


def test_semantic_validation_through_client(gce_clients: GceClients) -> None:
    body = instance_body()
    body.machine_type = "n2-standard-4"  # must be a (partial) URL
    with pytest.raises(gexc.BadRequest, match="resource.machineType"):
        gce_clients.instances.insert(project=PROJECT, zone=ZONE, instance_resource=body)
    body = instance_body(image="projects/windows-cloud/global/images/family/windows-1999")
    with pytest.raises(gexc.BadRequest, match="image"):
        gce_clients.instances.insert(project=PROJECT, zone=ZONE, instance_resource=body)
    create(gce_clients, instance_body())
    with pytest.raises(gexc.Conflict):
        gce_clients.instances.insert(project=PROJECT, zone=ZONE, instance_resource=instance_body())


def test_api_requires_issued_token(gce_emulator: GceEmulator) -> None:
    r = api(gce_emulator, "GET", f"projects/{PROJECT}/zones/{ZONE}", token=None)
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    assert api(gce_emulator, "GET", f"projects/{PROJECT}/zones/{ZONE}", token="forged").status_code == 401
    assert api(gce_emulator, "GET", f"projects/{PROJECT}/zones/{ZONE}").status_code == 200


# -- lists, images, regions -------------------------------------------------------------------------------------
def test_list_filter_labels_and_status(gce_clients: GceClients) -> None:
    c = gce_clients
    create(c, instance_body("wb-a"))
    other = instance_body("other-b")
    other.labels = {"team": "x"}
    create(c, other)
    def names(expr: str) -> list[str]:
        req = compute_v1.ListInstancesRequest(project=PROJECT, zone=ZONE, filter=expr)
        return [i.name for i in c.instances.list(request=req)]
    assert names('labels.winbuilder = "1" AND status = RUNNING') == ["wb-a"]
    assert names("(labels.winbuilder = 1) (status = TERMINATED)") == []
    assert names("labels.winbuilder:*") == ["wb-a"]
    assert names("name = wb-* OR name = other-*") == ["other-b", "wb-a"]
    assert names("NOT labels.team = x") == ["wb-a"]
    agg = c.instances.aggregated_list(request=compute_v1.AggregatedListInstancesRequest(
        project=PROJECT, filter="labels.winbuilder = 1"))
    assert [i.name for _, scoped in agg for i in scoped.instances] == ["wb-a"]


def test_images_regions_zones(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    c = gce_clients
    for family in ("windows-2019-core-for-containers", "windows-2022-core-for-containers",
                   "windows-2025-core-for-containers", "windows-2022-core"):
        image = c.images.get_from_family(project="windows-cloud", family=family)
        assert image.family == family and image.status == "READY" and int(image.disk_size_gb) == 50
    with pytest.raises(gexc.NotFound):
        c.images.get_from_family(project="windows-cloud", family="windows-2012")
    gce_emulator.backend.register_image("my-images", "prebaked", name="prebaked-v1")
    assert c.images.get_from_family(project="my-images", family="prebaked").name == "prebaked-v1"
    region = c.regions.get(project=PROJECT, region="us-central1")
    assert [z.rsplit("/", 1)[-1] for z in region.zones] == ["us-central1-a", "us-central1-b", "us-central1-c",
                                                             "us-central1-f"]
    zones = [z.name for z in c.zones.list(request=compute_v1.ListZonesRequest(project=PROJECT))]
    assert "europe-west4-a" in zones and c.zones.get(project=PROJECT, zone="us-east1-b").status == "UP"


# -- serial ports ------------------------------------------------------------------------------------------------
def test_serial_port_offsets() -> None:
    port = SerialPort(capacity=10)
    port.write("abcdef")
    assert port.read(0) == ("abcdef", 0, 6)
    assert port.read(4) == ("ef", 4, 6)
    assert port.read(6) == ("", 6, 6)
    assert port.read(60) == ("", 6, 6)
    port.write("ghijklmn")  # 14 bytes written, 10 kept: bytes 4..13
    assert port.read(0) == ("efghijklmn", 4, 14)  # older than the buffer: starts at the oldest kept byte
    assert port.read(12) == ("mn", 12, 14)
    assert port.read(-3) == ("lmn", 11, 14)
    port.write("é")
    assert port.read(14) == ("é", 14, 16)  # offsets are bytes


def test_serial_port_through_api(gce_clients: GceClients) -> None:
    inst = create(gce_clients, instance_body())
    until(lambda: "Instance setup finished" in serial(gce_clients, inst.name, 1).contents)
    out = serial(gce_clients, inst.name, 1)
    assert out.start == 0 and out.next_ == len(out.contents.encode())
    tail = serial(gce_clients, inst.name, 1, start=out.next_ - 5)
    assert tail.start == out.next_ - 5 and tail.contents == out.contents[-5:]
    with pytest.raises(gexc.BadRequest):
        serial(gce_clients, inst.name, 5)


# -- metadata server, ADC, CLI -----------------------------------------------------------------------------------
def test_metadata_server_and_egress_ip(gce_emulator: GceEmulator) -> None:
    base = f"http://{gce_emulator.metadata_host}"
    ping = requests.get(base + "/", timeout=5)
    assert ping.status_code == 200 and ping.headers["Metadata-Flavor"] == "Google"
    assert requests.get(base + "/computeMetadata/v1/project/project-id", timeout=5).status_code == 403
    flavor = {"Metadata-Flavor": "Google"}
    assert requests.get(base + "/computeMetadata/v1/project/project-id", headers=flavor, timeout=5).text == PROJECT
    token = requests.get(base + "/computeMetadata/v1/instance/service-accounts/default/token", headers=flavor,
                         timeout=5).json()
    assert token["token_type"] == "Bearer" and token["expires_in"] > 0
    assert api(gce_emulator, "GET", f"projects/{PROJECT}/zones/{ZONE}", token=token["access_token"]).ok
    assert requests.get(base + "/egress-ip", timeout=5).text.strip() == "127.0.0.1"


ADC_SCRIPT = """
import os
import google.auth
from google.auth.transport.requests import AuthorizedSession
creds, project = google.auth.default()
reply = AuthorizedSession(creds).get(os.environ["EP"] + f"/compute/v1/projects/{project}/zones/us-central1-a")
print(project, type(creds).__name__, reply.status_code, reply.json()["name"])
"""


def test_adc_token_flow_in_fresh_process(gce_env: GceEmulator) -> None:
    """A fresh process: google-auth reads GCE_METADATA_HOST at import, finds "GCE" and gets a token."""
    env = {**os.environ, "EP": gce_env.compute_url}
    out = subprocess.run([sys.executable, "-c", ADC_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [PROJECT, "Credentials", "200", "us-central1-a"]


def test_adc_in_process_with_unmodified_client(gce_env: GceEmulator) -> None:
    """In-process (google.auth possibly imported already): the client finds ADC by itself."""
    import google.auth

    creds, project = google.auth.default()
    assert project == PROJECT and gce_env.backend.tokens_issued() == 0
    client = compute_v1.ZonesClient(client_options={"api_endpoint": gce_env.compute_url}, transport="rest")
    assert client.get(project=project, zone=ZONE).name == ZONE
    assert gce_env.backend.tokens_issued() == 1  # the client's token came from the metadata server


def test_cli_main_prints_ready_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "winbuilder.emulator", "gce", "--listen", "127.0.0.1:0",
                             "--boot-seconds", "0.1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        words = line.split()
        assert words[0] == "ready" and words[1].startswith("compute=http://127.0.0.1:")
        host = words[2].removeprefix("metadata=")
        assert words[1] == f"compute=http://{host}"
        assert requests.get(f"http://{host}/", timeout=5).headers["Metadata-Flavor"] == "Google"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_fault_schedule_from_json(tmp_path: Any) -> None:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"http": [{"method": "instances.insert", "status": 503, "call": 2}],
                                "operations": [{"method": "instances.insert", "code": "QUOTA_EXCEEDED"}],
                                "agent_error": "boom", "metadata_conflicts": 1, "winrm_late": 1.5}))
    sched = FaultSchedule.load(path)
    assert sched.http[0].hits("compute.instances.insert", 2) and not sched.http[0].hits("instances.insert", 1)
    assert sched.operations[0].code == "QUOTA_EXCEEDED" and sched.winrm_late == 1.5
    with pytest.raises(ValueError):
        FaultSchedule.from_dict({"nope": 1})


def test_filter_parser() -> None:
    doc = {"name": "wb-1", "status": "RUNNING", "labels": {"winbuilder": "1", "winbuilder-expires": "100"}}
    assert filters.compile_filter('labels.winbuilder = "1" AND status = RUNNING')(doc)
    assert filters.compile_filter("labels.winbuilder-expires < 200")(doc)
    assert not filters.compile_filter("labels.winbuilder-expires > 200")(doc)
    assert filters.compile_filter("status = TERMINATED OR status = RUNNING")(doc)
    with pytest.raises(ApiError, match="Invalid list filter expression"):
        filters.compile_filter("status = (")


def test_second_emulator_gets_other_addresses(gce_emulator: GceEmulator, gce_clients: GceClients) -> None:
    """Two emulators (e.g. parallel test runs) never fight over 127.0.0.N:5986."""
    first = create(gce_clients, instance_body())
    other = start_gce(replace(FAST, project=PROJECT), listen=("127.0.0.1", 0))
    try:
        from google.api_core.client_options import ClientOptions
        from google.oauth2.credentials import Credentials

        creds = Credentials(other.issue_token())  # type: ignore[no-untyped-call]
        opts = ClientOptions(api_endpoint=other.compute_url)
        client = compute_v1.InstancesClient(credentials=creds, transport="rest", client_options=opts)
        ops = compute_v1.ZoneOperationsClient(credentials=creds, transport="rest", client_options=opts)
        op = client.insert(project=PROJECT, zone=ZONE, instance_resource=instance_body())
        ops.wait(project=PROJECT, zone=ZONE, operation=op.name)
        ops.wait(project=PROJECT, zone=ZONE, operation=op.name)
        second = client.get(project=PROJECT, zone=ZONE, instance="wb-test-1")
        assert second.network_interfaces[0].network_i_p != first.network_interfaces[0].network_i_p
    finally:
        other.close()


def test_stalled_operation_and_failed_delete() -> None:
    """A STALL fault keeps the operation RUNNING (the client's deadline must fire); a failed delete keeps the VM."""
    emu = start_gce(replace(FAST, wait_timeout=0.3, operation_step_seconds=0.05), listen=("127.0.0.1", 0))
    try:
        emu.backend.set_faults(FaultSchedule(operations=(
            OperationFault("instances.insert", "STALL", times=1),
            OperationFault("instances.delete", "RESOURCE_NOT_READY", times=1))))
        token = emu.issue_token()
        path = f"projects/{PROJECT}/zones/{ZONE}"
        body = json.loads(compute_v1.Instance.to_json(instance_body()))
        op = api(emu, "POST", f"{path}/instances", body, token=token).json()
        started = time.monotonic()
        waited = api(emu, "POST", f"{path}/operations/{op['name']}/wait", token=token).json()
        assert waited["status"] == "RUNNING" and 0.25 < time.monotonic() - started < 5
        assert api(emu, "GET", f"{path}/instances/wb-test-1", token=token).json()["status"] == "PROVISIONING"
        body["name"] = "wb-test-2"
        op = api(emu, "POST", f"{path}/instances", body, token=token).json()
        until(lambda: api(emu, "POST", f"{path}/operations/{op['name']}/wait", token=token).json()["status"]
              == "DONE")
        op = api(emu, "DELETE", f"{path}/instances/wb-test-2", token=token).json()
        done = until(lambda: (d := api(emu, "POST", f"{path}/operations/{op['name']}/wait", token=token).json())
                     ["status"] == "DONE" and d)
        assert done["error"]["errors"][0]["code"] == "RESOURCE_NOT_READY"
        assert api(emu, "GET", f"{path}/instances/wb-test-2", token=token).json()["status"] == "RUNNING"
    finally:
        emu.close()
