"""State of the emulated Compute Engine (moto's ``models.py``): projects, zones, instances, disks, firewalls,
operations and images, keyed by project and zone, resettable.

Lifecycles advance like the real ones (moto ``ManagedState`` style): an operation is PENDING, then RUNNING, then
DONE, one step per ``get`` poll, per ``operation_step_seconds`` of wall time, or quickly while a ``wait`` call
blocks. An operation's effect (the instance running, the firewall rule existing...) happens when it reaches DONE,
and an injected operation fault makes it end DONE with ``error`` instead, as the real API does after answering
the insert with 200.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from winbuilder.emulator.compute import filters
from winbuilder.emulator.compute.api import Request
from winbuilder.emulator.compute.errors import ApiError, already_exists, invalid_field, not_found
from winbuilder.emulator.compute.faults import OPERATION_ERROR_MESSAGES, FaultSchedule
from winbuilder.emulator.compute.resources import (
    API_PREFIX,
    REGIONS,
    WINDOWS_FAMILIES,
    WINDOWS_IMAGE_SIZE_GB,
    BuildContext,
    build_firewall,
    build_instance,
    check_metadata_items,
    fingerprint_of,
    image_doc,
    matches_tcp,
    new_id,
    now_rfc3339,
    resource_path,
    windows_image,
)
from winbuilder.emulator.guest import PROCESS_POOL, AddressPool, Guest, GuestSpec

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class GceEmulatorConfig:
    """Settings of one emulated Compute Engine (times in seconds).

    Attributes:
        project: the project the metadata server reports (any project name is accepted by the API).
        boot_seconds: guest boot delay until ``Instance setup finished``.
        agent_delay: seconds the password agent takes to answer a key.
        guest_port: port of every guest's WinRM HTTPS listeners (5986 as on GCE).
        faults: the fault schedule (None = no faults); ``backend.faults`` can be replaced at any time.
        service_account: the email the metadata server reports (``{project}`` is filled in).
        scopes: the scopes the metadata server reports.
        operation_step_seconds: an operation advances one state after this long even if nobody polls it.
        wait_timeout: longest ``operations.wait`` blocks (the real API: about 2 minutes).
        serial_buffer_bytes: bytes retained per serial port (1 MB on GCE).
        require_auth: require a bearer token issued by the metadata server (401 otherwise).
        token_seconds: lifetime of issued access tokens.
        min_run_duration: smallest ``scheduling.maxRunDuration`` accepted (30 s on GCE; tests lower it).
        guest_interpreter: argv prefix of the guests' emulated ``cmd.exe`` (None: the WS-Man host's default).
        ssh_port: port of the OpenSSH server of guests inserted with metadata ``enable-windows-ssh=TRUE`` (22 as on
            GCE, which needs root; firewall rules must then name this port).
    """

    project: str = "test-project"
    boot_seconds: float = 2.0
    agent_delay: float = 0.1
    guest_port: int = 5986
    faults: FaultSchedule | None = None
    service_account: str = "winbuilder-ci@{project}.iam.gserviceaccount.com"
    scopes: tuple[str, ...] = ("https://www.googleapis.com/auth/cloud-platform",)
    operation_step_seconds: float = 0.5
    wait_timeout: float = 120.0
    serial_buffer_bytes: int = 1024 * 1024
    require_auth: bool = True
    token_seconds: int = 3599
    min_run_duration: float = 30.0
    guest_interpreter: tuple[str, ...] | None = None
    ssh_port: int = 22

    @property
    def service_account_email(self) -> str:
        """The service account email with the project filled in."""
        return self.service_account.format(project=self.project)


_STATES = ("PENDING", "RUNNING", "DONE")


@dataclass
class Operation:
    """One zonal or global operation. ``effect`` runs once at DONE and returns errors (or None)."""

    name: str
    project: str
    zone: str | None
    op_type: str
    target_link: str
    target_id: str
    user: str
    effect: Callable[[], list[dict[str, str]] | None] | None = None
    status: str = "PENDING"
    id: str = field(default_factory=new_id)
    insert_time: str = field(default_factory=now_rfc3339)
    start_time: str | None = None
    end_time: str | None = None
    errors: list[dict[str, str]] | None = None
    changed_at: float = field(default_factory=time.monotonic)
    stalled: bool = False

    @property
    def self_link(self) -> str:
        """The operation's URL."""
        scope = f"zones/{self.zone}" if self.zone else "global"
        return f"{API_PREFIX}projects/{self.project}/{scope}/operations/{self.name}"

    def step(self) -> None:
        """Advances one state (PENDING -> RUNNING -> DONE); DONE runs the effect. No-op once DONE."""
        if self.status == "DONE" or (self.stalled and self.status == "RUNNING"):
            return
        self.status = _STATES[_STATES.index(self.status) + 1]
        self.changed_at = time.monotonic()
        if self.status == "RUNNING":
            self.start_time = now_rfc3339()
            return
        self.end_time = now_rfc3339()
        if self.effect is not None:
            effect, self.effect = self.effect, None
            try:
                self.errors = effect()
            except ApiError as exc:
                self.errors = [{"code": exc.reason.upper(), "message": exc.message}]
            except Exception as exc:  # an emulator bug must not leave the operation hanging
                log.exception("operation %s effect failed", self.name)
                self.errors = [{"code": "INTERNAL_ERROR", "message": f"Internal error: {type(exc).__name__}"}]

    def to_dict(self) -> dict[str, Any]:
        """The ``compute#operation`` resource."""
        out: dict[str, Any] = {
            "kind": "compute#operation", "id": self.id, "name": self.name, "operationType": self.op_type,
            "targetLink": self.target_link, "targetId": self.target_id, "status": self.status,
            "user": self.user, "progress": 100 if self.status == "DONE" else 0,
            "insertTime": self.insert_time, "selfLink": self.self_link,
        }
        if self.zone:
            out["zone"] = f"{API_PREFIX}projects/{self.project}/zones/{self.zone}"
        if self.start_time:
            out["startTime"] = self.start_time
        if self.end_time:
            out["endTime"] = self.end_time
        if self.errors:
            out["error"] = {"errors": [dict(e) for e in self.errors]}
            code = self.errors[0]["code"]
            status, text = {"QUOTA_EXCEEDED": (403, "FORBIDDEN"),
                            "ZONE_RESOURCE_POOL_EXHAUSTED": (503, "SERVICE UNAVAILABLE")}.get(
                code, (400, "BAD REQUEST"))
            out["httpErrorStatusCode"] = status
            out["httpErrorMessage"] = text
        return out


@dataclass
class InstanceRecord:
    """An instance: its resource document, its guest once running, and its maxRunDuration deadline."""

    resource: dict[str, Any]
    zone: str
    guest: Guest | None = None
    expires_at: float | None = None
    deleting: bool = False


@dataclass
class ProjectState:
    """Everything of one project."""

    instances: dict[tuple[str, str], InstanceRecord] = field(default_factory=dict)
    disks: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    firewalls: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending_firewalls: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=lambda: {"default"})
    operations: dict[str, Operation] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # family -> image


class GceBackend:
    """All emulated Compute state, plus guests, tokens and the fault schedule.

    Args:
        config: emulator settings.

    Thread-safe: every public method takes the backend lock. Call ``close()`` to stop the ticker and all guests.
    """

    def __init__(self, config: GceEmulatorConfig) -> None:
        self.config = config
        self.faults: FaultSchedule = config.faults or FaultSchedule()
        self._lock = threading.RLock()
        self.pool: AddressPool = PROCESS_POOL
        self._projects: dict[str, ProjectState] = {}
        self._tokens: dict[str, float] = {}
        self._calls: Counter[str] = Counter()
        self._op_fault_uses: Counter[int] = Counter()
        self._conflicts_used = 0
        self._op_seq = itertools.count(1)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="gce-ticker", daemon=True)
        self._ticker.start()
        self._handlers: dict[str, Callable[[Request], dict[str, Any]]] = {
            "compute.instances.insert": self.instances_insert,
            "compute.instances.get": self.instances_get,
            "compute.instances.list": self.instances_list,
            "compute.instances.aggregatedList": self.instances_aggregated_list,
            "compute.instances.delete": self.instances_delete,
            "compute.instances.setMetadata": self.instances_set_metadata,
            "compute.instances.getSerialPortOutput": self.instances_serial,
            "compute.instances.getGuestAttributes": self.instances_guest_attributes,
            "compute.zoneOperations.get": self.operations_get,
            "compute.zoneOperations.wait": self.operations_wait,
            "compute.globalOperations.get": self.operations_get,
            "compute.globalOperations.wait": self.operations_wait,
            "compute.firewalls.insert": self.firewalls_insert,
            "compute.firewalls.get": self.firewalls_get,
            "compute.firewalls.delete": self.firewalls_delete,
            "compute.firewalls.list": self.firewalls_list,
            "compute.images.getFromFamily": self.images_from_family,
            "compute.images.get": self.images_get,
            "compute.regions.get": self.regions_get,
            "compute.zones.list": self.zones_list,
            "compute.zones.get": self.zones_get,
            "compute.disks.get": self.disks_get,
            "compute.disks.list": self.disks_list,
        }

    # ================================================================================================ plumbing
    def handle(self, request: Request) -> dict[str, Any]:
        """Serves one parsed request.

        Returns:
            The JSON response document.

        Raises:
            ApiError: the API's error answer (including injected 429/503 faults).
        """
        with self._lock:
            self._calls[request.method_id] += 1
            number = self._calls[request.method_id]
            for fault in self.faults.http:
                if fault.hits(request.method_id, number):
                    raise _http_fault(fault.status)
        return self._handlers[request.method_id](request)

    def reset(self) -> None:
        """Forgets every resource, token, counter and fault, and stops all guests (moto ``reset``)."""
        with self._lock:
            guests = [r.guest for p in self._projects.values() for r in p.instances.values() if r.guest]
            self._projects.clear()
            self._tokens.clear()
            self._calls.clear()
            self._op_fault_uses.clear()
            self._conflicts_used = 0
            self.faults = self.config.faults or FaultSchedule()
        for guest in guests:
            guest.close()

    def close(self) -> None:
        """Stops the ticker and all guests. Idempotent."""
        self._stop.set()
        self.reset()

    def project(self, name: str) -> ProjectState:
        """The state of a project (created on first use: every project exists)."""
        with self._lock:
            state = self._projects.get(name)
            if state is None:
                state = self._projects[name] = ProjectState()
                if name == "windows-cloud":
                    for family in WINDOWS_FAMILIES:
                        state.images[family] = windows_image(family)
            return state

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.tick()
            except Exception:  # the ticker must survive anything
                log.exception("gce emulator tick failed")

    def tick(self) -> None:
        """Advances operations that nobody polls and enforces maxRunDuration (called every 50 ms)."""
        now = time.monotonic()
        with self._lock:
            for name, state in list(self._projects.items()):
                for op in list(state.operations.values()):
                    if op.status != "DONE" and now - op.changed_at >= self.config.operation_step_seconds:
                        op.step()
                for (zone, inst), record in list(state.instances.items()):
                    if record.expires_at is not None and now >= record.expires_at and not record.deleting:
                        self._expire(name, zone, inst, record)

    def _expire(self, project: str, zone: str, name: str, record: InstanceRecord) -> None:
        action = record.resource.get("scheduling", {}).get("instanceTerminationAction", "STOP")
        record.expires_at = None
        log.info("instance %s/%s/%s reached maxRunDuration: %s", project, zone, name, action)
        if record.guest is not None:
            record.guest.close()
        if action == "DELETE":
            op = self._new_op(project, zone, "delete", record.resource["selfLink"], record.resource["id"],
                              lambda: self._remove_instance(project, zone, name), user="system")
            while op.status != "DONE":
                op.step()
        else:
            record.resource["status"] = "TERMINATED"

    # ---------------------------------------------------------------------------------------------- tokens
    def issue_token(self) -> tuple[str, int]:
        """Issues an access token (what the metadata server hands out).

        Returns:
            ``(token, expires_in_seconds)``.
        """
        token = "ya29.emu-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.config.token_seconds
        return token, self.config.token_seconds

    def tokens_issued(self) -> int:
        """How many access tokens were issued (metadata server or ``issue_token``)."""
        with self._lock:
            return len(self._tokens)

    def check_token(self, authorization: str | None) -> None:
        """Checks an ``Authorization`` header.

        Raises:
            ApiError: 401 as the real API (missing, or not a live issued token).
        """
        if not self.config.require_auth:
            return
        challenge = (("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"'),)
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(401, "Request is missing required authentication credential. Expected OAuth 2 access "
                                "token, login cookie or other valid authentication credential. See "
                                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                           "required", headers=challenge)
        token = authorization.removeprefix("Bearer ").strip()
        with self._lock:
            expiry = self._tokens.get(token)
        if expiry is None or expiry < time.monotonic():
            raise ApiError(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                                "login cookie or other valid authentication credential. See "
                                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                           "authError", headers=challenge)

    # ---------------------------------------------------------------------------------------------- operations
    def _new_op(self, project: str, zone: str | None, op_type: str, target_link: str, target_id: str,
                effect: Callable[[], list[dict[str, str]] | None] | None, user: str | None = None) -> Operation:
        stamp = int(time.time() * 1000)
        name = f"operation-{stamp}-{secrets.token_hex(6)}-{secrets.token_hex(4)}-{next(self._op_seq):04d}"
        op = Operation(name, project, zone, op_type, target_link, target_id,
                       user or self.config.service_account_email, effect)
        self.project(project).operations[name] = op
        return op

    def _get_op(self, req: Request) -> Operation:
        project, zone, name = req.param("project"), req.param("zone"), req.param("operation")
        op = self.project(project).operations.get(name)
        if op is None or op.zone != zone:
            scope = f"zones/{zone}" if zone else "global"
            raise not_found(f"projects/{project}/{scope}/operations/{name}")
        return op

    def operations_get(self, req: Request) -> dict[str, Any]:
        """zoneOperations.get / globalOperations.get: one poll advances the operation one state."""
        with self._lock:
            op = self._get_op(req)
            op.step()
            return op.to_dict()

    def operations_wait(self, req: Request) -> dict[str, Any]:
        """zoneOperations.wait / globalOperations.wait: blocks until DONE or ``wait_timeout`` (then returns the
        operation as it is, as the real API does after about 2 minutes)."""
        deadline = time.monotonic() + self.config.wait_timeout
        while True:
            with self._lock:
                op = self._get_op(req)
                op.step()
                if op.status == "DONE" or time.monotonic() >= deadline or self._stop.is_set():
                    return op.to_dict()
            time.sleep(0.01)

    def _operation_fault(self, method: str, project: str, zone: str | None
                         ) -> tuple[list[dict[str, str]] | None, bool]:
        """The injected outcome of a new operation: ``(errors or None, stalled)``."""
        for index, fault in enumerate(self.faults.operations):
            if fault.method.removeprefix("compute.") != method.removeprefix("compute."):
                continue
            if fault.zone is not None and fault.zone != zone:
                continue
            if fault.times is not None and self._op_fault_uses[index] >= fault.times:
                continue
            self._op_fault_uses[index] += 1
            if fault.code == "STALL":
                return None, True
            region = zone.rsplit("-", 1)[0] if zone else "global"
            template = OPERATION_ERROR_MESSAGES.get(fault.code, f"Operation failed: {fault.code}.")
            return [{"code": fault.code, "message": template.format(project=project, zone=zone, region=region)}], False
        return None, False

    # ---------------------------------------------------------------------------------------------- zones
    def _check_zone(self, project: str, zone: str) -> str:
        region, _, suffix = zone.rpartition("-")
        if suffix not in REGIONS.get(region, ()):
            raise not_found(f"projects/{project}/zones/{zone}")
        return region

    def _zone_doc(self, project: str, zone: str) -> dict[str, Any]:
        region = self._check_zone(project, zone)
        return {"kind": "compute#zone", "id": str(2000 + sorted(REGIONS).index(region) * 10 + ord(zone[-1]) - 97),
                "creationTimestamp": "1969-12-31T16:00:00.000-08:00", "name": zone,
                "description": zone, "status": "UP",
                "region": f"{API_PREFIX}projects/{project}/regions/{region}",
                "selfLink": f"{API_PREFIX}projects/{project}/zones/{zone}",
                "availableCpuPlatforms": ["Intel Cascade Lake", "AMD Milan", "Intel Ice Lake"],
                "supportsPzs": False}

    def zones_get(self, req: Request) -> dict[str, Any]:
        """zones.get."""
        return self._zone_doc(req.param("project"), req.param("zone"))

    def zones_list(self, req: Request) -> dict[str, Any]:
        """zones.list (with ``filter``)."""
        project = req.param("project")
        docs = [self._zone_doc(project, f"{r}-{s}") for r in sorted(REGIONS) for s in REGIONS[r]]
        return _list_doc("compute#zoneList", f"projects/{project}/zones", docs, req)

    def regions_get(self, req: Request) -> dict[str, Any]:
        """regions.get, with its ``zones`` URLs."""
        project, region = req.param("project"), req.param("region")
        if region not in REGIONS:
            raise not_found(f"projects/{project}/regions/{region}")
        return {"kind": "compute#region", "id": str(1000 + sorted(REGIONS).index(region)),
                "creationTimestamp": "1969-12-31T16:00:00.000-08:00", "name": region, "description": region,
                "status": "UP", "selfLink": f"{API_PREFIX}projects/{project}/regions/{region}",
                "zones": [f"{API_PREFIX}projects/{project}/zones/{region}-{s}" for s in REGIONS[region]],
                "quotas": [{"metric": "CPUS", "limit": 24.0, "usage": 0.0}],
                "supportsPzs": False}

    # ---------------------------------------------------------------------------------------------- images
    def register_image(self, project: str, family: str, name: str | None = None,
                       disk_size_gb: int = WINDOWS_IMAGE_SIZE_GB, description: str = "") -> dict[str, Any]:
        """Registers an image as the newest of a family (e.g. a user's pre-baked image).

        Returns:
            The image resource.
        """
        image_name = name or f"{family}-v{datetime.now(UTC):%Y%m%d}"
        doc = image_doc(project, image_name, family, disk_size_gb, description)
        with self._lock:
            self.project(project).images[family] = doc
        return doc

    def images_from_family(self, req: Request) -> dict[str, Any]:
        """images.getFromFamily: the newest image of a family."""
        project, family = req.param("project"), req.param("family")
        with self._lock:
            image = self.project(project).images.get(family)
        if image is None:
            raise not_found(f"projects/{project}/global/images/family/{family}")
        return dict(image)

    def images_get(self, req: Request) -> dict[str, Any]:
        """images.get."""
        project, name = req.param("project"), req.param("image")
        image = self._image_by_name(project, name)
        if image is None:
            raise not_found(f"projects/{project}/global/images/{name}")
        return dict(image)

    def _image_by_name(self, project: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            for image in self.project(project).images.values():
                if image["name"] == name:
                    return image
        return None

    def _resolve_image(self, project: str, source: str, field_path: str) -> dict[str, Any]:
        path = resource_path(source)
        if path.startswith("global/"):
            path = f"projects/{project}/{path}"
        m = re.fullmatch(r"projects/([^/]+)/global/images/(?:family/([^/]+)|([^/]+))", path)
        image = None
        if m:
            if m.group(2):
                with self._lock:
                    image = self.project(m.group(1)).images.get(m.group(2))
            else:
                image = self._image_by_name(m.group(1), m.group(3))
        if image is None:
            raise invalid_field(field_path, source, "The referenced image resource cannot be found.")
        return image

    # ---------------------------------------------------------------------------------------------- networks
    def add_network(self, project: str, name: str) -> None:
        """Registers a VPC network (``default`` exists in every project)."""
        with self._lock:
            self.project(project).networks.add(name)

    def _resolve_network(self, project: str, link: str, field_path: str) -> tuple[str, str]:
        path = resource_path(link)
        if path.startswith("global/"):
            path = f"projects/{project}/{path}"
        m = re.fullmatch(r"projects/([^/]+)/global/networks/([^/]+)", path)
        if not m:
            raise invalid_field(field_path, link, "Must be a URL to a valid Compute resource of the correct type.")
        net_project, name = m.group(1), m.group(2)
        if name not in self.project(net_project).networks:
            raise invalid_field(field_path, link, "The referenced network resource cannot be found.")
        return net_project, name

    # ---------------------------------------------------------------------------------------------- instances
    def _instance(self, project: str, zone: str, name: str) -> InstanceRecord:
        self._check_zone(project, zone)
        record = self.project(project).instances.get((zone, name))
        if record is None:
            raise not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return record

    def instances_insert(self, req: Request) -> dict[str, Any]:
        """instances.insert: validates, records the instance PROVISIONING and returns a PENDING operation.

        Raises:
            ApiError: 400 invalid field values, 404 unknown zone, 409 name taken.
        """
        project, zone = req.param("project"), req.param("zone")
        body = req.body or {}
        with self._lock:
            self._check_zone(project, zone)
            resource, disk = build_instance(project, zone, body, self._build_context())
            if (zone, disk["name"]) in self.project(project).disks:
                raise already_exists(f"projects/{project}/zones/{zone}/disks/{disk['name']}")
            name = resource["name"]
            state = self.project(project)
            if (zone, name) in state.instances:
                raise already_exists(f"projects/{project}/zones/{zone}/instances/{name}")
            record = InstanceRecord(resource, zone)
            state.instances[(zone, name)] = record
            errors, stall = self._operation_fault("instances.insert", project, zone)
            op = self._new_op(project, zone, "insert", resource["selfLink"], resource["id"],
                              lambda: self._finish_insert(project, zone, record, disk, errors))
            op.stalled = stall
            return op.to_dict()

    def _finish_insert(self, project: str, zone: str, record: InstanceRecord, disk: dict[str, Any],
                       errors: list[dict[str, str]] | None) -> list[dict[str, str]] | None:
        state = self.project(project)
        name = record.resource["name"]
        if errors:
            if state.instances.get((zone, name)) is record:
                del state.instances[(zone, name)]
            return errors
        if state.instances.get((zone, name)) is not record or record.deleting:
            return None  # deleted while pending: nothing to start
        nic = record.resource["networkInterfaces"][0]
        ssh = _metadata_items(record.resource).get("enable-windows-ssh", "").upper() == "TRUE"
        spec = GuestSpec(name=name, project=project, zone=zone, external=bool(nic.get("accessConfigs")),
                         port=self.config.guest_port, boot_seconds=self.config.boot_seconds,
                         agent_delay=self.config.agent_delay, faults=self.faults,
                         serial_buffer_bytes=self.config.serial_buffer_bytes,
                         interpreter=self.config.guest_interpreter, ssh=ssh, ssh_port=self.config.ssh_port)
        guest = Guest(spec, lambda ip, port: self.firewall_admits(project, record, ip, port), self.pool)
        try:
            guest.start()
        except OSError as exc:
            del state.instances[(zone, name)]
            return [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                     "message": OPERATION_ERROR_MESSAGES["ZONE_RESOURCE_POOL_EXHAUSTED"].format(
                         project=project, zone=zone) + f" (emulator: {exc.strerror})"}]
        record.guest = guest
        nic["networkIP"] = guest.internal_ip
        if nic.get("accessConfigs") and guest.external_ip:
            nic["accessConfigs"][0]["natIP"] = guest.external_ip
        record.resource["status"] = "RUNNING"
        record.resource["lastStartTimestamp"] = now_rfc3339()
        disk["status"] = "READY"
        disk["lastAttachTimestamp"] = now_rfc3339()
        state.disks[(zone, disk["name"])] = disk
        guest.on_metadata(_metadata_items(record.resource))
        duration = record.resource.get("scheduling", {}).get("maxRunDuration")
        if duration:
            seconds = float(duration.get("seconds", 0)) + int(duration.get("nanos", 0)) / 1e9
            record.expires_at = time.monotonic() + seconds
        return None

    def _build_context(self) -> BuildContext:
        return BuildContext(resolve_image=self._resolve_image, resolve_network=self._resolve_network,
                            service_account_email=self.config.service_account_email,
                            min_run_duration=self.config.min_run_duration)

    def instances_get(self, req: Request) -> dict[str, Any]:
        """instances.get."""
        with self._lock:
            record = self._instance(req.param("project"), req.param("zone"), req.param("instance"))
            return _copy(record.resource)

    def instances_list(self, req: Request) -> dict[str, Any]:
        """instances.list with ``filter`` (labels, status, name ...), ``maxResults``, ``pageToken``."""
        project, zone = req.param("project"), req.param("zone")
        with self._lock:
            self._check_zone(project, zone)
            docs = [_copy(r.resource) for (z, _), r in sorted(self.project(project).instances.items()) if z == zone]
        return _list_doc("compute#instanceList", f"projects/{project}/zones/{zone}/instances", docs, req)

    def instances_aggregated_list(self, req: Request) -> dict[str, Any]:
        """instances.aggregatedList with ``filter``."""
        project = req.param("project")
        pred = filters.compile_filter(req.param("filter"))
        items: dict[str, Any] = {}
        with self._lock:
            for (zone, _), record in sorted(self.project(project).instances.items()):
                if pred(record.resource):
                    items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(_copy(record.resource))
        return {"kind": "compute#instanceAggregatedList", "id": f"projects/{project}/aggregated/instances",
                "items": items, "selfLink": f"{API_PREFIX}projects/{project}/aggregated/instances"}

    def instances_delete(self, req: Request) -> dict[str, Any]:
        """instances.delete: STOPPING now, gone (with auto-delete disks, guest stopped) when the operation is
        DONE."""
        project, zone, name = req.param("project"), req.param("zone"), req.param("instance")
        with self._lock:
            record = self._instance(project, zone, name)
            record.deleting = True
            record.expires_at = None
            record.resource["status"] = "STOPPING"
            errors, stall = self._operation_fault("instances.delete", project, zone)

            def effect() -> list[dict[str, str]] | None:
                if errors:
                    record.deleting = False
                    record.resource["status"] = "RUNNING"
                    return errors
                self._remove_instance(project, zone, name)
                return None

            op = self._new_op(project, zone, "delete", record.resource["selfLink"], record.resource["id"], effect)
            op.stalled = stall
            return op.to_dict()

    def _remove_instance(self, project: str, zone: str, name: str) -> None:
        state = self.project(project)
        record = state.instances.pop((zone, name), None)
        if record is None:
            return
        if record.guest is not None:
            record.guest.close()
        for attached in record.resource.get("disks", []):
            if attached.get("autoDelete"):
                disk_name = attached["source"].rsplit("/", 1)[-1]
                state.disks.pop((zone, disk_name), None)
            else:
                disk = state.disks.get((zone, attached["source"].rsplit("/", 1)[-1]))
                if disk is not None:
                    disk["users"] = []

    def instances_set_metadata(self, req: Request) -> dict[str, Any]:
        """instances.setMetadata: compare-and-swap on ``fingerprint`` (412 ``conditionNotMet`` when stale).
        The new metadata is visible at once; the returned operation completes as usual."""
        project, zone, name = req.param("project"), req.param("zone"), req.param("instance")
        body = req.body or {}
        with self._lock:
            record = self._instance(project, zone, name)
            meta = record.resource["metadata"]
            if self._conflicts_used < self.faults.metadata_conflicts:
                self._conflicts_used += 1
                items = list(meta.get("items", []))
                items.append({"key": f"someone-else-{self._conflicts_used}", "value": "changed concurrently"})
                meta["items"] = items
                meta["fingerprint"] = fingerprint_of(items)
            if body.get("fingerprint") != meta["fingerprint"]:
                raise ApiError(412, "Supplied fingerprint does not match current metadata fingerprint.",
                               "conditionNotMet")
            items = check_metadata_items(body.get("items") or [], "metadata")
            meta.clear()
            meta.update({"kind": "compute#metadata", "fingerprint": fingerprint_of(items),
                         **({"items": items} if items else {})})
            if record.guest is not None:
                record.guest.on_metadata(_metadata_items(record.resource))
            op = self._new_op(project, zone, "setMetadata", record.resource["selfLink"], record.resource["id"],
                              None)
            return op.to_dict()

    def instances_serial(self, req: Request) -> dict[str, Any]:
        """instances.getSerialPortOutput: ``port`` 1-4, ``start`` byte offset -> ``contents``, ``start``,
        ``next`` (int64 as strings)."""
        project, zone, name = req.param("project"), req.param("zone"), req.param("instance")
        port = req.param("port", 1)
        if not 1 <= port <= 4:
            raise invalid_field("port", port, "Must be between 1 and 4.")
        with self._lock:
            record = self._instance(project, zone, name)
            guest = record.guest
            link = record.resource["selfLink"]
        if guest is None or guest.closed:
            raise ApiError(400, f"The resource 'projects/{project}/zones/{zone}/instances/{name}' is not ready",
                           "resourceNotReady")
        contents, start, nxt = guest.serial[port].read(req.param("start"))
        return {"kind": "compute#serialPortOutput", "contents": contents, "start": str(start), "next": str(nxt),
                "selfLink": f"{link}/serialPort?port={port}"}

    def instances_guest_attributes(self, req: Request) -> dict[str, Any]:
        """instances.getGuestAttributes by ``queryPath`` (``hostkeys/``) or ``variableKey``
        (``hostkeys/winrm``); 404 when nothing is published there (yet)."""
        project, zone, name = req.param("project"), req.param("zone"), req.param("instance")
        query_path, key = req.param("queryPath"), req.param("variableKey")
        with self._lock:
            record = self._instance(project, zone, name)
            guest = record.guest
            link = record.resource["selfLink"]
        found = guest.attributes(query_path, key) if guest is not None else []
        where = key or query_path or ""
        if not found:
            raise not_found(f"projects/{project}/zones/{zone}/instances/{name}/guestAttributes/{where}")
        out: dict[str, Any] = {"kind": "compute#guestAttributes", "selfLink": f"{link}/guestAttributes/{where}"}
        if key is not None:
            out["variableKey"] = key
            out["variableValue"] = found[0][2]
        else:
            out["queryPath"] = query_path or ""
            out["queryValue"] = {"items": [{"namespace": n, "key": k, "value": v} for n, k, v in found]}
        return out

    # ---------------------------------------------------------------------------------------------- disks
    def disks_get(self, req: Request) -> dict[str, Any]:
        """disks.get."""
        project, zone, name = req.param("project"), req.param("zone"), req.param("disk")
        with self._lock:
            self._check_zone(project, zone)
            disk = self.project(project).disks.get((zone, name))
            if disk is None:
                raise not_found(f"projects/{project}/zones/{zone}/disks/{name}")
            return _copy(disk)

    def disks_list(self, req: Request) -> dict[str, Any]:
        """disks.list with ``filter``."""
        project, zone = req.param("project"), req.param("zone")
        with self._lock:
            self._check_zone(project, zone)
            docs = [_copy(d) for (z, _), d in sorted(self.project(project).disks.items()) if z == zone]
        return _list_doc("compute#diskList", f"projects/{project}/zones/{zone}/disks", docs, req)

    # ---------------------------------------------------------------------------------------------- firewalls
    def firewalls_insert(self, req: Request) -> dict[str, Any]:
        """firewalls.insert: validated now, the rule exists when the global operation is DONE."""
        project = req.param("project")
        body = req.body or {}
        with self._lock:
            rule = build_firewall(project, body, self._build_context())
            state = self.project(project)
            name = rule["name"]
            if name in state.firewalls or name in state.pending_firewalls:
                raise already_exists(f"projects/{project}/global/firewalls/{name}")
            state.pending_firewalls.add(name)
            errors, stall = self._operation_fault("firewalls.insert", project, None)

            def effect() -> list[dict[str, str]] | None:
                state.pending_firewalls.discard(name)
                if errors:
                    return errors
                state.firewalls[name] = rule
                return None

            op = self._new_op(project, None, "insert", rule["selfLink"], rule["id"], effect)
            op.stalled = stall
            return op.to_dict()

    def firewalls_get(self, req: Request) -> dict[str, Any]:
        """firewalls.get."""
        project, name = req.param("project"), req.param("firewall")
        with self._lock:
            rule = self.project(project).firewalls.get(name)
            if rule is None:
                raise not_found(f"projects/{project}/global/firewalls/{name}")
            return _copy(rule)

    def firewalls_list(self, req: Request) -> dict[str, Any]:
        """firewalls.list with ``filter``."""
        project = req.param("project")
        with self._lock:
            docs = [_copy(r) for _, r in sorted(self.project(project).firewalls.items())]
        return _list_doc("compute#firewallList", f"projects/{project}/global/firewalls", docs, req)

    def firewalls_delete(self, req: Request) -> dict[str, Any]:
        """firewalls.delete: the rule is gone when the global operation is DONE."""
        project, name = req.param("project"), req.param("firewall")
        with self._lock:
            state = self.project(project)
            rule = state.firewalls.get(name)
            if rule is None:
                raise not_found(f"projects/{project}/global/firewalls/{name}")

            def effect() -> None:
                state.firewalls.pop(name, None)

            return self._new_op(project, None, "delete", rule["selfLink"], rule["id"], effect).to_dict()

    def firewall_admits(self, project: str, record: InstanceRecord, client_ip: str, port: int) -> bool:
        """VPC ingress check for a TCP connection to an instance's external address.

        Rules of the instance's network (in its host project) with direction INGRESS and not disabled are
        matched on protocol/port, source range and target tags/service accounts; the lowest priority number
        wins and DENY beats ALLOW at equal priority; nothing matching means the implied deny.
        """
        with self._lock:
            network = resource_path(record.resource["networkInterfaces"][0]["network"])
            net_project = network.split("/")[1]
            tags = set((record.resource.get("tags") or {}).get("items") or [])
            accounts = {sa["email"] for sa in record.resource.get("serviceAccounts", [])}
            rules = list(self.project(net_project).firewalls.values())
            if net_project != project:
                rules += list(self.project(project).firewalls.values())
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        best: tuple[int, int] | None = None  # (priority, 0 for deny / 1 for allow)
        for rule in rules:
            if rule.get("direction") != "INGRESS" or rule.get("disabled") \
                    or resource_path(rule["network"]) != network:
                continue
            if rule.get("targetTags") and not tags & set(rule["targetTags"]):
                continue
            if rule.get("targetServiceAccounts") and not accounts & set(rule["targetServiceAccounts"]):
                continue
            if not any(address in ipaddress.ip_network(c, strict=False) for c in rule.get("sourceRanges", [])):
                continue
            for kind, verdict in (("denied", 0), ("allowed", 1)):
                if any(matches_tcp(e, port) for e in rule.get(kind, [])):
                    candidate = (int(rule.get("priority", 1000)), verdict)
                    if best is None or candidate < best:
                        best = candidate
        return best is not None and best[1] == 1

    # ---------------------------------------------------------------------------------------------- assertions
    def instances(self, project: str | None = None) -> list[dict[str, Any]]:
        """All instance resources (copies), optionally of one project."""
        with self._lock:
            return [_copy(r.resource) for p, s in self._projects.items() if project in (None, p)
                    for r in s.instances.values()]

    def disks(self, project: str | None = None) -> list[dict[str, Any]]:
        """All disk resources (copies)."""
        with self._lock:
            return [_copy(d) for p, s in self._projects.items() if project in (None, p) for d in s.disks.values()]

    def firewalls(self, project: str | None = None) -> list[dict[str, Any]]:
        """All firewall rules (copies)."""
        with self._lock:
            return [_copy(f) for p, s in self._projects.items() if project in (None, p)
                    for f in s.firewalls.values()]

    def operations(self, project: str | None = None) -> list[dict[str, Any]]:
        """All operations (documents), oldest first."""
        with self._lock:
            return [o.to_dict() for p, s in self._projects.items() if project in (None, p)
                    for o in s.operations.values()]

    def guest(self, project: str, zone: str, name: str) -> Guest:
        """The guest of a running instance.

        Raises:
            KeyError: no such instance, or it has no guest (not running yet).
        """
        with self._lock:
            record = self.project(project).instances.get((zone, name))
            if record is None or record.guest is None:
                raise KeyError(f"{project}/{zone}/{name}")
            return record.guest

    def set_faults(self, faults: FaultSchedule) -> None:
        """Replaces the fault schedule (counters restart). Guests created later use the new one."""
        with self._lock:
            self.faults = faults
            self._calls.clear()
            self._op_fault_uses.clear()
            self._conflicts_used = 0

    def calls(self) -> dict[str, int]:
        """How many times each method was called (method id -> count)."""
        with self._lock:
            return dict(self._calls)


# ================================================================================================ helpers
def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(doc)


def _metadata_items(resource: dict[str, Any]) -> dict[str, str]:
    return {i["key"]: i.get("value", "") for i in resource.get("metadata", {}).get("items", [])}


def _list_doc(kind: str, path: str, docs: list[dict[str, Any]], req: Request) -> dict[str, Any]:
    pred = filters.compile_filter(req.param("filter"))
    docs = [d for d in docs if pred(d)]
    order = req.param("orderBy")
    if order in ("creationTimestamp desc", "name desc"):
        docs.sort(key=lambda d: d.get(order.split()[0], ""), reverse=True)
    elif order in ("creationTimestamp", "name"):
        docs.sort(key=lambda d: d.get(order, ""))
    size = min(int(req.param("maxResults", 500)), 500)
    offset = int(req.param("pageToken") or 0) if str(req.param("pageToken") or "0").isdigit() else 0
    page = docs[offset:offset + size]
    out: dict[str, Any] = {"kind": kind, "id": path, "selfLink": API_PREFIX + path}
    if page:
        out["items"] = page
    if offset + size < len(docs):
        out["nextPageToken"] = str(offset + size)
    return out


def _http_fault(status: int) -> ApiError:
    if status == 429:
        return ApiError(429, "Rate Limit Exceeded", "rateLimitExceeded", "usageLimits")
    if status == 503:
        return ApiError(503, "The service is currently unavailable.", "backendError")
    return ApiError(status, "Internal error. Please try again or contact Google Support.", "backendError")


__all__ = ["API_PREFIX", "REGIONS", "WINDOWS_FAMILIES", "GceBackend", "GceEmulatorConfig", "Operation"]
