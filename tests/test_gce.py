"""winbuilder.gce: pure helpers, and the wrappers against the emulated Compute API with the real client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from winbuilder import gce, provision
from winbuilder.emulator.compute.faults import FaultSchedule, HttpFault, OperationFault
from winbuilder.emulator.compute.server import GceEmulator
from winbuilder.errors import CapacityError, CloudError, ExitCode, UsageError
from winbuilder.spec import GceSpec

PROJECT = "test-project"
ZONE = "us-central1-a"

# -- pure -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "expected"), [
    ("ltsc2019", ("windows-cloud", "windows-2019-core-for-containers")),
    ("ltsc2022", ("windows-cloud", "windows-2022-core-for-containers")),
    ("ltsc2025", ("windows-cloud", "windows-2025-core-for-containers")),
    ("windows-2022-core", ("windows-cloud", "windows-2022-core")),
    ("projects/my-proj/global/images/family/baked", ("my-proj", "baked")),
    ("https://www.googleapis.com/compute/v1/projects/my-proj/global/images/family/baked", ("my-proj", "baked")),
    ("https://www.googleapis.com/compute/v1/projects/my-proj/global/images/baked-1",
     ("projects/my-proj/global/images/baked-1", None)),
])
def test_image_source(image: str, expected: tuple[str, str | None]) -> None:
    assert gce.image_source(image) == expected


@pytest.mark.parametrize("image", ["windows-server-2022-dc-core-v20250211", "Windows 2022", "ftp://x/y", ""])
def test_image_source_refuses_dated_and_malformed(image: str) -> None:
    with pytest.raises(UsageError):
        gce.image_source(image)


def test_zone_candidates() -> None:
    assert gce.zone_candidates("europe-west1-c", ["x"]) == ["europe-west1-c"]
    assert gce.zone_candidates(None, ["us-central1-f", "us-central1-a", "us-central1-b"]) == [
        "us-central1-a", "us-central1-b", "us-central1-f"]
    with pytest.raises(UsageError):
        gce.zone_candidates(None, [])


def test_network_paths() -> None:
    assert gce.network_path("default") == "global/networks/default"
    shared = "projects/host/global/networks/shared"
    assert gce.network_path(shared) == shared
    assert gce.subnetwork_path("sub", "us-east1") == "regions/us-east1/subnetworks/sub"
    assert gce.subnetwork_path("projects/host/regions/us-east1/subnetworks/s", "x").startswith("projects/host")


def test_operation_error_mapping() -> None:
    exhausted = {"status": "DONE", "error": {"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "m"}]}}
    with pytest.raises(gce.ZoneExhausted) as zone_err:
        gce.raise_for_operation("create", exhausted, ZONE)
    assert zone_err.value.zone == ZONE and zone_err.value.exit_code == ExitCode.CAPACITY
    quota = {"error": {"errors": [{"code": "QUOTA_EXCEEDED", "message": "Quota 'CPUS' exceeded. Limit: 24.0 in "
                                                                       "region us-central1."}]}}
    with pytest.raises(gce.QuotaExceeded, match="CPUS.*us-central1"):
        gce.raise_for_operation("create", quota, ZONE)
    other = {"error": {"errors": [{"code": "RESOURCE_NOT_READY", "message": "later"}]}}
    with pytest.raises(gce.GceOperationError) as op_err:
        gce.raise_for_operation("create", other)
    assert op_err.value.codes == ("RESOURCE_NOT_READY",)
    gce.raise_for_operation("create", {"status": "DONE"})


def test_labels_and_expiry() -> None:
    assert provision.instance_name("ab12cd34") == "winbuilder-ab12cd34"
    with pytest.raises(UsageError):
        provision.instance_name("Bad_ID")
    exp = provision.expires_epoch(3600, now=1_000_000)
    assert exp == 1_000_000 + 3600 + 60
    labels = provision.labels("ab12cd34", exp, (("team", "ci"),))
    assert labels == {"team": "ci", "winbuilder": "1", "winbuilder-run": "ab12cd34", "winbuilder-expires": str(exp)}
    assert provision.expired({"labels": labels}, exp + 1)
    assert not provision.expired({"labels": labels}, exp - 1)
    assert not provision.expired({"labels": {"winbuilder": "1"}}, exp)


def test_source_ranges_never_the_internet() -> None:
    assert provision.check_source_ranges(("203.0.113.7", "10.0.0.0/8")) == ["203.0.113.7/32", "10.0.0.0/8"]
    for bad in ("0.0.0.0/0", "::/0", "not-an-ip"):
        with pytest.raises(UsageError):
            provision.check_source_ranges((bad,))


def test_instance_body_shape() -> None:
    spec = GceSpec(project=PROJECT, spot=True, max_run_duration=7200, tags=("extra",), labels=(("k", "v"),),
                   internal_ip=True, subnetwork="sub", service_account="sa@p.iam.gserviceaccount.com")
    body = provision.instance_body(spec, "winbuilder-x", ZONE, "IMG", "winbuilder-x", "x", 123)
    assert body["scheduling"]["maxRunDuration"] == {"seconds": "7200"}
    assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["tags"]["items"] == ["winbuilder-x", "extra"]
    assert body["labels"]["winbuilder-expires"] == "123" and body["labels"]["k"] == "v"
    assert "accessConfigs" not in body["networkInterfaces"][0]
    assert body["networkInterfaces"][0]["subnetwork"] == "regions/us-central1/subnetworks/sub"
    assert {"key": "enable-guest-attributes", "value": "TRUE"} in body["metadata"]["items"]
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/e2-standard-4"


# -- against the emulator --------------------------------------------------------------------------------------------


@pytest.fixture
def compute(gce_emulator: GceEmulator) -> Iterator[gce.Compute]:
    from google.oauth2.credentials import Credentials

    yield gce.connect(PROJECT, gce_emulator.compute_url, Credentials(gce_emulator.issue_token()))  # type: ignore[no-untyped-call]


def _body(name: str, **extra: Any) -> dict[str, Any]:
    spec = GceSpec(project=PROJECT, max_run_duration=600, internal_ip=True)
    image = "projects/windows-cloud/global/images/family/windows-2022-core-for-containers"
    body = provision.instance_body(spec, name, ZONE, image, name, "t1", int(time.time()) + 600)
    body.update(extra)
    return body


def test_resolve_image_and_region(compute: gce.Compute) -> None:
    deadline = time.monotonic() + 30
    link = gce.resolve_image(compute, "ltsc2022", deadline)
    assert "/projects/windows-cloud/global/images/windows-server-2022-dc-core-for-containers-v" in link
    with pytest.raises(UsageError):
        gce.resolve_image(compute, "no-such-family", deadline)
    assert gce.region_zones(compute, "us-central1", deadline) == [
        "us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"]


def test_insert_wait_delete_and_404_is_success(compute: gce.Compute, gce_emulator: GceEmulator) -> None:
    deadline = time.monotonic() + 60
    op = gce.insert_instance(compute, ZONE, _body("winbuilder-t1"), deadline)
    # delete while the insert is pending: waits for it, then deletes
    assert gce.delete_instance(compute, ZONE, "winbuilder-t1", deadline, pending=op)
    assert gce_emulator.backend.instances() == [] and gce_emulator.backend.disks() == []
    assert not gce.delete_instance(compute, ZONE, "winbuilder-t1", deadline, insert_sent=False)


def test_transient_errors_are_retried(compute: gce.Compute, gce_emulator: GceEmulator) -> None:
    gce_emulator.backend.set_faults(FaultSchedule(http=(
        HttpFault("instances.insert", status=429, times=2), HttpFault("zoneOperations.wait", status=503))))
    deadline = time.monotonic() + 60
    op = gce.insert_instance(compute, ZONE, _body("winbuilder-t2"), deadline)
    doc = gce.wait_operation(compute, op, deadline)
    assert doc["status"] == "DONE"
    calls = gce_emulator.backend.calls()
    assert calls["compute.instances.insert"] == 3
    gce.delete_instance(compute, ZONE, "winbuilder-t2", deadline, insert_sent=False)


def test_non_transient_errors_are_not_retried(compute: gce.Compute, gce_emulator: GceEmulator) -> None:
    with pytest.raises(CloudError, match="HTTP 400"):
        gce.insert_instance(compute, ZONE, _body("Bad_Name"), time.monotonic() + 30)
    assert gce_emulator.backend.calls()["compute.instances.insert"] == 1


def test_operation_errors_are_read(compute: gce.Compute, gce_emulator: GceEmulator) -> None:
    gce_emulator.backend.set_faults(FaultSchedule(operations=(
        OperationFault("instances.insert", "QUOTA_EXCEEDED"),)))
    deadline = time.monotonic() + 30
    op = gce.insert_instance(compute, ZONE, _body("winbuilder-t3"), deadline)
    with pytest.raises(CapacityError, match="CPUS"):
        gce.wait_operation(compute, op, deadline)
    assert gce_emulator.backend.instances() == []


def test_wait_operation_deadline(compute: gce.Compute) -> None:
    from winbuilder.errors import DeadlineExceeded

    op = gce.insert_instance(compute, ZONE, _body("winbuilder-t4"), time.monotonic() + 30)
    with pytest.raises(DeadlineExceeded):
        gce.wait_operation(compute, op, time.monotonic() - 1)
    gce.delete_instance(compute, ZONE, "winbuilder-t4", time.monotonic() + 30, pending=op)


def test_metadata_conflict_and_serial(compute: gce.Compute, gce_emulator: GceEmulator) -> None:
    deadline = time.monotonic() + 30
    op = gce.insert_instance(compute, ZONE, _body("winbuilder-t5"), deadline)
    gce.wait_operation(compute, op, deadline)
    doc = gce.get_instance(compute, ZONE, "winbuilder-t5", deadline)
    gce_emulator.backend.set_faults(FaultSchedule(metadata_conflicts=1))
    body = {"fingerprint": doc["metadata"]["fingerprint"], "items": doc["metadata"]["items"]}
    with pytest.raises(gce.MetadataConflict):
        gce.set_metadata(compute, ZONE, "winbuilder-t5", body, deadline)
    text, nxt = gce.serial_output(compute, ZONE, "winbuilder-t5", 1, 0, deadline)
    assert nxt >= len(text.encode()) > 0
    assert gce.guest_attribute(compute, ZONE, "winbuilder-t5", "hostkeys/nothing", deadline) is None
    gce.delete_instance(compute, ZONE, "winbuilder-t5", deadline)


def test_firewall_insert_list_delete(compute: gce.Compute, gce_emulator: GceEmulator) -> None:
    deadline = time.monotonic() + 30
    spec = GceSpec(project=PROJECT)
    body = provision.firewall_body(spec, "winbuilder-t6-5986", "winbuilder-t6", 5986, ["127.0.0.1/32"], "t6")
    op = gce.insert_firewall(compute, body, deadline)
    # a delete racing the insert waits for it
    assert gce.delete_firewall(compute, "winbuilder-t6-5986", deadline, pending=op)
    assert gce.list_firewalls(compute, "winbuilder-", deadline) == []
    assert not gce.delete_firewall(compute, "winbuilder-t6-5986", deadline, insert_sent=False)
