"""Resource documents of the emulated Compute API and the validation of request bodies beyond the schema
(pure functions: no state; callers pass lookups in a ``BuildContext``).

Messages follow the real API's ``Invalid value for field 'resource.<path>': '<value>'. <why>`` shape.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from winbuilder.emulator.compute.errors import ApiError, invalid_field

#: Prefix of every ``selfLink`` (the real API's, so clients that parse links see real shapes).
API_PREFIX = "https://www.googleapis.com/compute/v1/"
_LINK_RE = re.compile(r"^(?:https://(?:www|compute)\.googleapis\.com/compute/(?:v1|beta|alpha)/)?")

#: Regions and zone suffixes the emulator knows (a subset of the real ones).
REGIONS: dict[str, tuple[str, ...]] = {
    "us-central1": ("a", "b", "c", "f"),
    "us-east1": ("b", "c", "d"),
    "us-east4": ("a", "b", "c"),
    "us-west1": ("a", "b", "c"),
    "europe-west1": ("b", "c", "d"),
    "europe-west4": ("a", "b", "c"),
    "asia-east1": ("a", "b", "c"),
}

#: Public Windows image families of ``windows-cloud``: family -> (image name stem, Windows build, description).
WINDOWS_FAMILIES: dict[str, tuple[str, str, str]] = {
    "windows-2016": ("windows-server-2016-dc", "14393", "Windows Server 2016 Datacenter"),
    "windows-2016-core": ("windows-server-2016-dc-core", "14393", "Windows Server 2016 Datacenter Core"),
    "windows-2019": ("windows-server-2019-dc", "17763", "Windows Server 2019 Datacenter"),
    "windows-2019-core": ("windows-server-2019-dc-core", "17763", "Windows Server 2019 Datacenter Core"),
    "windows-2019-core-for-containers": ("windows-server-2019-dc-core-for-containers", "17763",
                                         "Windows Server 2019 Datacenter Core for Containers"),
    "windows-2022": ("windows-server-2022-dc", "20348", "Windows Server 2022 Datacenter"),
    "windows-2022-core": ("windows-server-2022-dc-core", "20348", "Windows Server 2022 Datacenter Core"),
    "windows-2022-core-for-containers": ("windows-server-2022-dc-core-for-containers", "20348",
                                         "Windows Server 2022 Datacenter Core for Containers"),
    "windows-2025": ("windows-server-2025-dc", "26100", "Windows Server 2025 Datacenter"),
    "windows-2025-core": ("windows-server-2025-dc-core", "26100", "Windows Server 2025 Datacenter Core"),
    "windows-2025-core-for-containers": ("windows-server-2025-dc-core-for-containers", "26100",
                                         "Windows Server 2025 Datacenter Core for Containers"),
}

_NAME_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_NAME_REGEX_TEXT = "(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)"
_LABEL_KEY_RE = re.compile(r"[\w-]{1,63}\Z")
_LABEL_VALUE_RE = re.compile(r"[\w-]{0,63}\Z")
_METADATA_KEY_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}\Z")
_MACHINE_TYPE_RE = re.compile(
    r"(?:(?:e2|n1|n2|n2d|n4|c2|c2d|c3|c3d|c4|t2d|t2a|m1|m3)-(?:standard|highmem|highcpu)-\d+"
    r"|e2-(?:micro|small|medium)|f1-micro|g1-small|(?:(?:n1|n2|n2d|e2)-)?custom-\d+-\d+(?:-ext)?)\Z")
_DISK_TYPES = ("pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced")
_PORTS_RE = re.compile(r"(\d+)(?:-(\d+))?\Z")
_METADATA_LIMIT = 512 * 1024
WINDOWS_IMAGE_SIZE_GB = 50


def now_rfc3339() -> str:
    """The current time as the API writes timestamps (RFC 3339, milliseconds, explicit offset)."""
    return datetime.now(UTC).astimezone().isoformat(timespec="milliseconds")


def new_id() -> str:
    """A resource id: an unsigned 64-bit integer, as a string (proto3 JSON for uint64)."""
    return str(secrets.randbits(63) | (1 << 62))


def fingerprint_of(data: Any) -> str:
    """An opaque fingerprint (base64 of 8 bytes), different for every content and every change."""
    digest = hashlib.sha256(repr((data, secrets.token_bytes(8))).encode()).digest()[:8]
    return base64.b64encode(digest).decode("ascii")


def resource_path(link: str) -> str:
    """``https://www.googleapis.com/compute/v1/projects/p/...`` (or a partial URL) -> ``projects/p/...``."""
    return _LINK_RE.sub("", link.strip()).lstrip("/")


@dataclass(frozen=True)
class BuildContext:
    """Lookups and settings the builders need.

    Attributes:
        resolve_image: ``(project, sourceImage, field_path) -> image`` (raises ApiError 400 when unknown).
        resolve_network: ``(project, network, field_path) -> (network project, name)`` (raises ApiError 400).
        service_account_email: what ``"default"`` service accounts become.
        min_run_duration: smallest ``maxRunDuration`` accepted, seconds.
    """

    resolve_image: Callable[[str, str, str], dict[str, Any]]
    resolve_network: Callable[[str, str, str], tuple[str, str]]
    service_account_email: str
    min_run_duration: float


def build_instance(project: str, zone: str, body: dict[str, Any], ctx: BuildContext
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validates an ``instances.insert`` body and builds the instance resource and its boot disk.

    Returns:
        ``(instance, disk)`` documents; the instance is PROVISIONING and the disk CREATING.

    Raises:
        ApiError: 400 with the real API's "Invalid value for field 'resource...'" messages.
    """
    name = body.get("name")
    if not name:
        raise ApiError(400, "Invalid value for field 'resource.name': ''. Must be a match of regex "
                            f"'{_NAME_REGEX_TEXT}'", "invalid")
    if not _NAME_RE.match(name):
        raise invalid_field("resource.name", name, f"Must be a match of regex '{_NAME_REGEX_TEXT}'")
    zone_link = f"{API_PREFIX}projects/{project}/zones/{zone}"
    self_link = f"{zone_link}/instances/{name}"
    machine = body.get("machineType", "")
    m = re.fullmatch(r"(?:projects/[^/]+/)?zones/([^/]+)/machineTypes/([^/]+)", resource_path(machine))
    if not machine:
        raise ApiError(400, "Invalid value for field 'resource.machineType': ''. Machine type must be "
                            "specified.", "invalid")
    if not m:
        raise invalid_field("resource.machineType", machine,
                            "Must be a URL to a valid Compute resource of the correct type.")
    if m.group(1) != zone or not _MACHINE_TYPE_RE.match(m.group(2)):
        raise invalid_field("resource.machineType", machine,
                            f"Machine type with name '{m.group(2)}' does not exist in zone '{zone}'.")
    labels = body.get("labels") or {}
    for key, value in labels.items():
        if not _LABEL_KEY_RE.match(key) or not key[0].islower() or not _LABEL_VALUE_RE.match(value) \
                or key != key.lower() or value != value.lower():
            raise invalid_field("resource.labels", "",
                                f"Label value '{value}' or key '{key}' violates format constraints. Keys and "
                                "values can only contain lowercase letters, numeric characters, underscores "
                                "and dashes; keys must start with a lowercase letter; at most 63 characters.")
    tags = list((body.get("tags") or {}).get("items") or [])
    for i, tag in enumerate(tags):
        if not _NAME_RE.match(tag):
            raise invalid_field(f"resource.tags.items[{i}]", tag, f"Must be a match of regex '{_NAME_REGEX_TEXT}'")
    items = check_metadata_items((body.get("metadata") or {}).get("items") or [], "resource.metadata")
    # disks
    disks = body.get("disks") or []
    boots = [d for d in disks if d.get("boot")]
    if len(boots) != 1:
        raise ApiError(400, "Invalid value for field 'resource.disks': ''. Boot disk must be specified.",
                       "invalid")
    boot = boots[0]
    params = boot.get("initializeParams") or {}
    if not params.get("sourceImage"):
        raise ApiError(400, "Invalid value for field 'resource.disks[0].initializeParams.sourceImage': ''. "
                            "Source image must be specified.", "invalid")
    image = ctx.resolve_image(project, params["sourceImage"], "resource.disks[0].initializeParams.sourceImage")
    size = int(params.get("diskSizeGb") or image["diskSizeGb"])
    if size < int(image["diskSizeGb"]):
        raise invalid_field("resource.disks[0].initializeParams.diskSizeGb", size,
                            f"Requested disk size cannot be smaller than the image size "
                            f"({image['diskSizeGb']} GB)")
    disk_type = params.get("diskType") or f"zones/{zone}/diskTypes/pd-standard"
    dm = re.fullmatch(r"(?:projects/[^/]+/)?zones/([^/]+)/diskTypes/([^/]+)", resource_path(disk_type))
    if not dm:
        raise invalid_field("resource.disks[0].initializeParams.diskType", disk_type,
                            "Must be a URL to a valid Compute resource of the correct type.")
    if dm.group(1) != zone or dm.group(2) not in _DISK_TYPES:
        raise invalid_field("resource.disks[0].initializeParams.diskType", disk_type,
                            f"Disk type '{dm.group(2)}' does not exist in zone '{zone}'.")
    disk_name = params.get("diskName") or name
    disk_link = f"{zone_link}/disks/{disk_name}"
    disk = {"kind": "compute#disk", "id": new_id(), "creationTimestamp": now_rfc3339(), "name": disk_name,
            "sizeGb": str(size), "zone": zone_link, "status": "CREATING", "selfLink": disk_link,
            "sourceImage": image["selfLink"], "sourceImageId": image["id"],
            "type": f"{zone_link}/diskTypes/{dm.group(2)}", "licenses": image.get("licenses", []),
            "guestOsFeatures": image.get("guestOsFeatures", []), "users": [self_link],
            "labels": dict(params.get("labels") or {}), "physicalBlockSizeBytes": "4096",
            "architecture": "X86_64"}
    attached = [{"kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": "READ_WRITE",
                 "source": disk_link, "deviceName": boot.get("deviceName") or "persistent-disk-0", "index": 0,
                 "boot": True, "autoDelete": bool(boot.get("autoDelete", False)), "interface": "SCSI",
                 "licenses": image.get("licenses", []), "guestOsFeatures": image.get("guestOsFeatures", []),
                 "diskSizeGb": str(size), "architecture": "X86_64"}]
    # network
    nics = body.get("networkInterfaces") or []
    if not nics:
        raise ApiError(400, "Invalid value for field 'resource.networkInterfaces': ''. At least one network "
                            "interface must be specified.", "invalid")
    nic = nics[0]
    network = nic.get("network") or "global/networks/default"
    net_project, net_name = ctx.resolve_network(project, network, "resource.networkInterfaces[0].network")
    region = zone.rsplit("-", 1)[0]
    subnet = nic.get("subnetwork") or f"projects/{net_project}/regions/{region}/subnetworks/{net_name}"
    out_nic: dict[str, Any] = {
        "kind": "compute#networkInterface", "name": "nic0", "fingerprint": fingerprint_of(nic),
        "network": f"{API_PREFIX}projects/{net_project}/global/networks/{net_name}",
        "subnetwork": API_PREFIX + resource_path(subnet), "networkIP": "", "stackType": "IPV4_ONLY"}
    access = nic.get("accessConfigs") or []
    if access:
        out_nic["accessConfigs"] = [{"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT",
                                     "name": access[0].get("name") or "External NAT",
                                     "networkTier": access[0].get("networkTier") or "PREMIUM"}]
    # scheduling
    sched = dict(body.get("scheduling") or {})
    spot = sched.get("provisioningModel") == "SPOT"
    if sched.get("maxRunDuration") and not sched.get("instanceTerminationAction"):
        raise invalid_field("resource.scheduling.instanceTerminationAction", "",
                            "Instance termination action must be specified when maxRunDuration is set.")
    action = sched.get("instanceTerminationAction")
    if action is not None and action not in ("DELETE", "STOP"):
        raise invalid_field("resource.scheduling.instanceTerminationAction", action,
                            "Value must be one of [DELETE, STOP].")
    if sched.get("maxRunDuration"):
        seconds = int(sched["maxRunDuration"].get("seconds", 0))
        if seconds < ctx.min_run_duration or seconds > 120 * 86400:
            raise invalid_field("resource.scheduling.maxRunDuration.seconds", seconds,
                                f"Must be between {ctx.min_run_duration:g} seconds and 120 days.")
        sched["maxRunDuration"] = {"seconds": str(seconds),
                                   **({"nanos": sched["maxRunDuration"]["nanos"]}
                                      if sched["maxRunDuration"].get("nanos") else {})}
    scheduling = {"onHostMaintenance": "TERMINATE" if spot else "MIGRATE", "automaticRestart": not spot,
                  "preemptible": False, "provisioningModel": "SPOT" if spot else "STANDARD", **sched}
    accounts = []
    for sa in body.get("serviceAccounts") or []:
        email = sa.get("email") or "default"
        if email == "default":
            email = ctx.service_account_email
        accounts.append({"email": email, "scopes": list(sa.get("scopes") or [])})
    resource: dict[str, Any] = {
        "kind": "compute#instance", "id": new_id(), "creationTimestamp": now_rfc3339(), "name": name,
        "description": body.get("description", ""), "tags": {"items": tags, "fingerprint": fingerprint_of(tags)}
        if tags else {"fingerprint": fingerprint_of(tags)},
        "machineType": f"{zone_link}/machineTypes/{m.group(2)}", "status": "PROVISIONING", "zone": zone_link,
        "canIpForward": bool(body.get("canIpForward", False)), "networkInterfaces": [out_nic],
        "disks": attached, "metadata": {"kind": "compute#metadata", "fingerprint": fingerprint_of(items),
                                        **({"items": items} if items else {})},
        "serviceAccounts": accounts, "selfLink": self_link, "scheduling": scheduling,
        "cpuPlatform": "Intel Cascade Lake", "labels": dict(labels), "labelFingerprint": fingerprint_of(labels),
        "startRestricted": False, "deletionProtection": bool(body.get("deletionProtection", False)),
        "fingerprint": fingerprint_of(name), "satisfiesPzi": True,
    }
    if not accounts:
        del resource["serviceAccounts"]
    if not labels:
        del resource["labels"]
    return resource, disk


def build_firewall(project: str, body: dict[str, Any], ctx: BuildContext) -> dict[str, Any]:
    """Validates a ``firewalls.insert`` body and builds the rule resource.

    Raises:
        ApiError: 400 for a bad name, network, direction, allowed/denied, ports or source ranges.
    """
    name = body.get("name") or ""
    if not _NAME_RE.match(name):
        raise invalid_field("resource.name", name, f"Must be a match of regex '{_NAME_REGEX_TEXT}'")
    net_project, net_name = ctx.resolve_network(project, body.get("network") or "global/networks/default",
                                                  "resource.network")
    direction = body.get("direction") or "INGRESS"
    if direction not in ("INGRESS", "EGRESS"):
        raise invalid_field("resource.direction", direction, "Value must be one of [EGRESS, INGRESS].")
    allowed, denied = body.get("allowed") or [], body.get("denied") or []
    if bool(allowed) == bool(denied):
        raise ApiError(400, "Invalid value for field 'resource': ''. Exactly one of allowed or denied must be "
                            "specified.", "invalid")
    for kind, entries in (("allowed", allowed), ("denied", denied)):
        for i, entry in enumerate(entries):
            if not entry.get("IPProtocol"):
                raise ApiError(400, f"Required field 'resource.{kind}[{i}].IPProtocol' not specified",
                               "required")
            for j, port in enumerate(entry.get("ports") or []):
                pm = _PORTS_RE.match(port)
                if not pm or int(pm.group(1)) > 65535 or (pm.group(2) and int(pm.group(2)) > 65535):
                    raise invalid_field(f"resource.{kind}[{i}].ports[{j}]", port,
                                        "Must be a port number or a range of port numbers.")
    ranges = list(body.get("sourceRanges") or [])
    if direction == "INGRESS" and not ranges and not body.get("sourceTags") \
            and not body.get("sourceServiceAccounts"):
        ranges = ["0.0.0.0/0"]
    for i, cidr in enumerate(ranges):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise invalid_field(f"resource.sourceRanges[{i}]", cidr,
                                "Must be a CIDR address range that is contained in the network.") from None
    rule: dict[str, Any] = {
        "kind": "compute#firewall", "id": new_id(), "creationTimestamp": now_rfc3339(), "name": name,
        "description": body.get("description", ""),
        "network": f"{API_PREFIX}projects/{net_project}/global/networks/{net_name}",
        "priority": int(body.get("priority", 1000)), "direction": direction,
        "logConfig": {"enable": False}, "disabled": bool(body.get("disabled", False)),
        "selfLink": f"{API_PREFIX}projects/{project}/global/firewalls/{name}",
    }
    for key, value in (("allowed", allowed), ("denied", denied), ("sourceRanges", ranges),
                       ("sourceTags", body.get("sourceTags")), ("targetTags", body.get("targetTags")),
                       ("targetServiceAccounts", body.get("targetServiceAccounts")),
                       ("destinationRanges", body.get("destinationRanges"))):
        if value:
            rule[key] = list(value)
    return rule


def check_metadata_items(items: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    """Validates metadata items (key format, duplicates, 512 KB total) and returns clean copies.

    Raises:
        ApiError: 400 invalid field.
    """
    seen: set[str] = set()
    total = 0
    out = []
    for i, item in enumerate(items):
        key = item.get("key", "")
        if not _METADATA_KEY_RE.match(key):
            raise invalid_field(f"{where}.items[{i}].key", key, "Must be a match of regex '[a-zA-Z0-9-_]{1,128}'")
        if key in seen:
            raise invalid_field(f"{where}.items[{i}].key", key, "Duplicate metadata key.")
        seen.add(key)
        value = item.get("value", "")
        total += len(key.encode()) + len(value.encode())
        out.append({"key": key, "value": value})
    if total > _METADATA_LIMIT:
        raise invalid_field(where, "", "Metadata has exceeded the maximum size of 512 KB.")
    return out


def matches_tcp(entry: dict[str, Any], port: int) -> bool:
    """Whether an allowed/denied entry of a firewall rule covers TCP ``port``."""
    proto = str(entry.get("IPProtocol", "")).lower()
    if proto not in ("tcp", "6", "all"):
        return False
    ports = entry.get("ports") or []
    if not ports:
        return True
    for spec in ports:
        m = _PORTS_RE.match(spec)
        if m and int(m.group(1)) <= port <= int(m.group(2) or m.group(1)):
            return True
    return False


def image_doc(project: str, name: str, family: str, disk_size_gb: int, description: str) -> dict[str, Any]:
    """A ``compute#image`` resource."""
    return {"kind": "compute#image", "id": new_id(), "creationTimestamp": now_rfc3339(), "name": name,
            "description": description, "sourceType": "RAW", "status": "READY", "archiveSizeBytes": "22000000000",
            "diskSizeGb": str(disk_size_gb), "family": family,
            "selfLink": f"{API_PREFIX}projects/{project}/global/images/{name}", "labelFingerprint": "42WmSpB8rSM=",
            "guestOsFeatures": [{"type": "MULTI_IP_SUBNET"}, {"type": "UEFI_COMPATIBLE"},
                                {"type": "VIRTIO_SCSI_MULTIQUEUE"}, {"type": "GVNIC"}, {"type": "WINDOWS"}],
            "licenses": [], "storageLocations": ["us", "eu", "asia"], "architecture": "X86_64"}


def windows_image(family: str) -> dict[str, Any]:
    """The current image of a public ``windows-cloud`` family."""
    stem, _build, title = WINDOWS_FAMILIES[family]
    stamp = "20250211"
    doc = image_doc("windows-cloud", f"{stem}-v{stamp}", family, WINDOWS_IMAGE_SIZE_GB,
                     f"Microsoft, {title}, x64 built on {stamp}, supports Shielded VM features")
    doc["licenses"] = [f"{API_PREFIX}projects/windows-cloud/global/licenses/{stem}"]
    return doc
