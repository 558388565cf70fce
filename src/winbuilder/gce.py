"""Thin, typed wrappers over google-cloud-compute (REST transport), the only module that imports it.

Everything here speaks REST JSON (``dict``s with the Compute v1 field names, e.g. ``networkInterfaces``), waits
against one ``deadline`` (a ``time.monotonic()`` value), and translates google-api-core errors into
``winbuilder.errors`` at this edge:

* 429 and 5xx answers (and dropped connections) are retried with jittered exponential backoff until the deadline;
  nothing else is retried.
* an operation that ends ``DONE`` with ``error`` raises :class:`GceOperationError`; ``QUOTA_EXCEEDED`` raises
  :class:`QuotaExceeded`, ``ZONE_RESOURCE_POOL_EXHAUSTED`` raises :class:`ZoneExhausted` (both ``CapacityError``).
* a 404 raises :class:`ResourceNotFound`; deletes treat it as success.

google-cloud-compute is imported lazily (about 0.9 s): ``winbuilder run --host`` never pays for it.
``ExtendedOperation.result()`` is never used, because the operations client it builds ignores ``api_endpoint``;
:func:`wait_operation` polls with our own ``ZoneOperationsClient``/``GlobalOperationsClient.wait``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from winbuilder.errors import AuthError, CapacityError, CloudError, DeadlineExceeded, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")

API_PREFIX = "https://www.googleapis.com/compute/v1/"
WINDOWS_PROJECT = "windows-cloud"
SHORT_IMAGES = {
    "ltsc2019": "windows-2019-core-for-containers",
    "ltsc2022": "windows-2022-core-for-containers",
    "ltsc2025": "windows-2025-core-for-containers",
}
"""``--image`` short names -> Windows Server "Datacenter Core for Containers" families in ``windows-cloud``."""

RETRY_INITIAL = 0.5
"""Backoff unit of a retried 429/5xx, in seconds: attempt n sleeps a random time up to ``RETRY_INITIAL * 2**n``,
capped at ``RETRY_MAX`` (full jitter)."""
RETRY_MAX = 20.0
DELETE_ATTEMPTS = 3
"""A delete whose operation ends in an error is sent again, up to this many times in all."""
WAIT_SLICE = 110.0
"""Longest single ``operations.wait`` HTTP call, seconds (the API itself answers after about 2 minutes)."""

_DATED_IMAGE = re.compile(r"-v\d{8}")


class GceOperationError(CloudError):
    """A Compute operation ended ``DONE`` with ``error``.

    Attributes:
        errors: ``(code, message)`` pairs from ``operation.error.errors``.
    """

    def __init__(self, what: str, errors: tuple[tuple[str, str], ...], hint: str = "") -> None:
        detail = "; ".join(f"{code}: {message}" for code, message in errors) or "unknown error"
        super().__init__(f"{what} failed: {detail}", hint)
        self.errors = errors

    @property
    def codes(self) -> tuple[str, ...]:
        """The error codes, in order."""
        return tuple(code for code, _ in self.errors)


class ZoneExhausted(CapacityError):
    """``ZONE_RESOURCE_POOL_EXHAUSTED``: this zone has no capacity now; another zone of the region may."""

    def __init__(self, zone: str, message: str) -> None:
        super().__init__(f"zone {zone} has no capacity: {message}", "try another zone or region")
        self.zone = zone


class QuotaExceeded(CapacityError):
    """``QUOTA_EXCEEDED``: no zone helps; the message names the quota and region."""


class ResourceNotFound(CloudError):
    """The API answered 404 for a resource."""


@dataclass(frozen=True)
class Compute:
    """google-cloud-compute REST clients bound to one project and endpoint.

    Attributes:
        project: the project id resources are created in.
        endpoint: the ``api_endpoint`` (None: Google's).
        email: the caller's identity (a service account email, or ``default``), for ``windows-keys``.
        instances, firewalls, images, regions, zone_operations, global_operations: the clients.
    """

    project: str
    endpoint: str | None
    email: str
    instances: Any
    firewalls: Any
    images: Any
    regions: Any
    zone_operations: Any
    global_operations: Any


def resolve_project(explicit: str | None) -> str:
    """The project: ``explicit``, else ``$PROJECT_ID`` (Cloud Build), else the Application Default Credentials'.

    Raises:
        UsageError: none of them names a project.
    """
    if explicit:
        return explicit
    env = os.environ.get("PROJECT_ID")
    if env:
        return env
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        _, project = google.auth.default()
    except DefaultCredentialsError as exc:
        raise AuthError("no Google credentials (Application Default Credentials) were found",
                        "run in Cloud Build or on GCE, or run `gcloud auth application-default login`") from exc
    if not project:
        raise UsageError("no project given", "pass --project or set PROJECT_ID")
    return str(project)


def connect(project: str, endpoint: str | None = None, credentials: Any = None) -> Compute:
    """Build the REST clients (Application Default Credentials unless ``credentials`` is given).

    Args:
        project: project id.
        endpoint: ``api_endpoint`` such as ``http://127.0.0.1:8080`` (an emulator); None for Google's.
        credentials: a ``google.auth`` credentials object; None for ``google.auth.default()``.

    Raises:
        UsageError: no credentials could be found.
    """
    import google.auth
    from google.api_core.client_options import ClientOptions
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import compute_v1

    if credentials is None:
        try:
            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except DefaultCredentialsError as exc:
            raise AuthError("no Google credentials (Application Default Credentials) were found",
                            "run in Cloud Build or on GCE, or run `gcloud auth application-default login`") from exc
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None

    def make(cls: Any) -> Any:
        return cls(credentials=credentials, client_options=options, transport="rest")

    email = str(getattr(credentials, "service_account_email", None) or "default")
    return Compute(project=project, endpoint=endpoint, email=email,
                   instances=make(compute_v1.InstancesClient), firewalls=make(compute_v1.FirewallsClient),
                   images=make(compute_v1.ImagesClient), regions=make(compute_v1.RegionsClient),
                   zone_operations=make(compute_v1.ZoneOperationsClient),
                   global_operations=make(compute_v1.GlobalOperationsClient))


# -- errors and retries -------------------------------------------------------------------------------------------


def _transient(exc: BaseException) -> bool:
    import requests
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.TooManyRequests | gexc.ServerError):
        return True
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def call(what: str, fn: Callable[[], T], deadline: float) -> T:
    """Run one API call, retrying 429/5xx and dropped connections with backoff until ``deadline``.

    Args:
        what: a short description for errors ("insert instance winbuilder-x").
        fn: the call (no arguments).
        deadline: ``time.monotonic()`` value after which no new attempt starts.

    Raises:
        ResourceNotFound: HTTP 404.
        QuotaExceeded: HTTP 403 naming a quota.
        CloudError: any other API error, or transient errors until the deadline.
    """
    from google.api_core import exceptions as gexc
    from tenacity import RetryCallState, Retrying, retry_if_exception, wait_random_exponential

    def stop(state: RetryCallState) -> bool:
        return time.monotonic() + RETRY_INITIAL >= deadline or state.attempt_number >= 12

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.debug("%s: transient error (%s), retrying", what, _short(exc))

    try:
        for attempt in Retrying(retry=retry_if_exception(_transient), stop=stop, reraise=True,
                                wait=wait_random_exponential(multiplier=RETRY_INITIAL, max=RETRY_MAX),
                                before_sleep=before_sleep):
            with attempt:
                return fn()
    except gexc.NotFound as exc:
        raise ResourceNotFound(f"{what}: not found ({_short(exc)})") from exc
    except gexc.GoogleAPICallError as exc:
        message = _short(exc)
        if "QUOTA" in message.upper() and isinstance(exc, gexc.Forbidden):
            raise QuotaExceeded(f"{what}: {message}", "raise the quota or use another region") from exc
        raise CloudError(f"{what}: {message}", "check the project, permissions and arguments") from exc
    except Exception as exc:
        if _transient(exc):
            raise CloudError(f"{what}: {_short(exc)}", "the Compute API kept failing; try again later") from exc
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "?"
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    text = " ".join(str(message).split())[:300]
    return f"HTTP {int(code)} {text}" if isinstance(code, int) else text


def to_dict(message: Any) -> dict[str, Any]:
    """A google-cloud-compute message as REST JSON (camelCase names, enums as names)."""
    doc: dict[str, Any] = json.loads(type(message).to_json(message, use_integers_for_enums=False))
    return doc


# -- operations ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperationRef:
    """Where an operation lives: ``zone`` None means a global operation."""

    name: str
    zone: str | None


def operation_ref(op: Any) -> OperationRef:
    """The :class:`OperationRef` of an ``Operation`` message (or its REST JSON)."""
    doc = op if isinstance(op, dict) else to_dict(op)
    zone = doc.get("zone")
    return OperationRef(name=str(doc["name"]), zone=str(zone).rsplit("/", 1)[-1] if zone else None)


def operation_errors(doc: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """``operation.error.errors`` as ``(code, message)`` pairs (empty when the operation succeeded)."""
    errors = (doc.get("error") or {}).get("errors") or []
    return tuple((str(e.get("code", "UNKNOWN")), str(e.get("message", ""))) for e in errors)


def raise_for_operation(what: str, doc: dict[str, Any], zone: str | None = None) -> None:
    """Raise the mapped error of a finished operation, if it has one.

    Raises:
        ZoneExhausted: ``ZONE_RESOURCE_POOL_EXHAUSTED`` (also the ``..._WITH_DETAILS`` variant).
        QuotaExceeded: ``QUOTA_EXCEEDED``; the message names the quota and region.
        GceOperationError: any other error code.
    """
    errors = operation_errors(doc)
    if not errors:
        return
    for code, message in errors:
        if code.startswith("ZONE_RESOURCE_POOL_EXHAUSTED"):
            raise ZoneExhausted(zone or "?", message)
        if code == "QUOTA_EXCEEDED":
            raise QuotaExceeded(f"{what}: quota exceeded: {message}",
                                "request a quota increase or use another region (no zone of this region helps)")
    raise GceOperationError(what, errors)


def wait_operation(compute: Compute, op: Any, deadline: float, what: str = "operation") -> dict[str, Any]:
    """Wait until ``op`` is ``DONE`` (polling ``zoneOperations.wait``/``globalOperations.wait``) and check its error.

    Args:
        compute: the clients.
        op: the ``Operation`` returned by a ``*_unary`` call, its REST JSON, or an :class:`OperationRef`.
        deadline: ``time.monotonic()`` value.
        what: description for errors.

    Returns:
        The finished operation as REST JSON.

    Raises:
        DeadlineExceeded: not DONE by the deadline.
        ZoneExhausted, QuotaExceeded, GceOperationError: it ended with an error (see :func:`raise_for_operation`).
        CloudError: the polling calls failed.
    """
    ref = op if isinstance(op, OperationRef) else operation_ref(op)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"{what}: operation {ref.name} not done in time",
                                   "Compute Engine is slow; raise the timeout or retry")
        timeout = max(1.0, min(WAIT_SLICE, remaining))
        if ref.zone:
            result = call(what, lambda t=timeout: compute.zone_operations.wait(  # type: ignore[misc]
                project=compute.project, zone=ref.zone, operation=ref.name, timeout=t), deadline)
        else:
            result = call(what, lambda t=timeout: compute.global_operations.wait(  # type: ignore[misc]
                project=compute.project, operation=ref.name, timeout=t), deadline)
        doc = to_dict(result)
        if doc.get("status") == "DONE":
            raise_for_operation(what, doc, ref.zone)
            return doc


# -- images, zones, names ----------------------------------------------------------------------------------------


def image_source(image: str) -> tuple[str, str | None]:
    """Resolve ``--image`` into ``(project, family)`` or a full image path.

    Accepted:
        * ``ltsc2019`` / ``ltsc2022`` / ``ltsc2025``: the ``windows-cloud`` "core-for-containers" families;
        * a family name (``windows-2022-core``): a ``windows-cloud`` family;
        * ``projects/P/global/images/family/F`` or its full URL: family F of project P;
        * ``projects/P/global/images/NAME`` or its full URL: that image (e.g. a pre-baked one).

    Returns:
        ``(project, family)`` for families, or ``(path, None)`` for one named image (``projects/P/global/...``).

    Raises:
        UsageError: anything else, including a dated ``windows-cloud`` image name given as a family.
    """
    text = image.strip()
    if text in SHORT_IMAGES:
        return WINDOWS_PROJECT, SHORT_IMAGES[text]
    path = re.sub(r"^https://(?:www|compute)\.googleapis\.com/compute/v1/", "", text).strip("/")
    m = re.fullmatch(r"projects/([a-z][-a-z0-9.:]*)/global/images/(?:family/([a-z][-a-z0-9]*)|([a-z][-a-z0-9]*))",
                     path)
    if m:
        if m.group(2):
            return m.group(1), m.group(2)
        return path, None
    if re.fullmatch(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?", text):
        if _DATED_IMAGE.search(text):
            raise UsageError(f"--image {text!r} looks like a dated image name; those disappear",
                             "pass a family (e.g. windows-2022-core-for-containers), ltsc2022, or a full URL")
        return WINDOWS_PROJECT, text
    raise UsageError(f"--image {text!r} is not an image family, ltsc2019/ltsc2022/ltsc2025, or an image URL",
                     "e.g. --image ltsc2022 or --image projects/P/global/images/family/F")


def resolve_image(compute: Compute, image: str, deadline: float) -> str:
    """The self link of the image ``--image`` names now (a family is resolved with ``images.getFromFamily``).

    Raises:
        UsageError: see :func:`image_source`, or the image/family does not exist.
        CloudError: the API call failed.
    """
    project, family = image_source(image)
    try:
        if family is not None:
            found = call(f"image family {project}/{family}",
                         lambda: compute.images.get_from_family(project=project, family=family), deadline)
        else:
            parts = project.split("/")
            found = call(f"image {project}", lambda: compute.images.get(project=parts[1], image=parts[-1]), deadline)
    except ResourceNotFound:
        raise UsageError(f"--image {image!r}: no such image or family", "check the name and project") from None
    return str(to_dict(found)["selfLink"])


def region_zones(compute: Compute, region: str, deadline: float) -> list[str]:
    """The zones of ``region`` (sorted names).

    Raises:
        UsageError: no such region.
    """
    try:
        doc = to_dict(call(f"region {region}", lambda: compute.regions.get(project=compute.project, region=region),
                           deadline))
    except ResourceNotFound:
        raise UsageError(f"--region {region!r} does not exist", "e.g. --region us-central1") from None
    return sorted(str(z).rsplit("/", 1)[-1] for z in doc.get("zones", []))


def zone_candidates(zone: str | None, zones: list[str]) -> list[str]:
    """Zones to try in order: ``zone`` alone when given, else every zone of the region, sorted.

    Raises:
        UsageError: neither a zone nor any region zone.
    """
    if zone:
        return [zone]
    if not zones:
        raise UsageError("no zone to create the server in", "pass --zone or --region")
    return sorted(zones)


def network_path(value: str) -> str:
    """``--network``: a name (this project) or a path/URL (e.g. a Shared VPC host project's network)."""
    return value if "/" in value else f"global/networks/{value}"


def subnetwork_path(value: str, region: str) -> str:
    """``--subnetwork``: a name (this project, the zone's region) or a path/URL (Shared VPC)."""
    return value if "/" in value else f"regions/{region}/subnetworks/{value}"


# -- instances ---------------------------------------------------------------------------------------------------


def insert_instance(compute: Compute, zone: str, body: dict[str, Any], deadline: float) -> OperationRef:
    """``instances.insert`` with ``body`` (REST JSON of an ``Instance``); returns its operation (not waited).

    A 409 (the insert was retried after a dropped connection and had already arrived) is not an error: the
    name is unique to this run. The caller waits with :func:`wait_operation` or, after a 409, for the instance.

    Raises:
        QuotaExceeded, CloudError: the API refused the request.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    resource = compute_v1.Instance.from_json(json.dumps(body))
    name = body["name"]
    try:
        op = call(f"insert instance {name}", lambda: compute.instances.insert_unary(
            project=compute.project, zone=zone, instance_resource=resource), deadline)
    except CloudError as exc:
        if isinstance(exc.__cause__, gexc.Conflict):
            log.debug("instance %s already exists (a retried insert)", name)
            return OperationRef("", zone)
        raise
    return operation_ref(op)


def get_instance(compute: Compute, zone: str, name: str, deadline: float) -> dict[str, Any]:
    """``instances.get`` as REST JSON.

    Raises:
        ResourceNotFound: no such instance.
        CloudError: other failures.
    """
    return to_dict(call(f"get instance {name}",
                        lambda: compute.instances.get(project=compute.project, zone=zone, instance=name), deadline))


def delete_instance(compute: Compute, zone: str, name: str, deadline: float,
                    pending: OperationRef | None = None, insert_sent: bool = True, settle: float = 5.0) -> bool:
    """Delete an instance and wait until it is gone; 404 counts as deleted.

    A pending insert is waited for first (its errors ignored), so a VM still being created is not declared
    absent. When the insert was sent but its operation is unknown (cancelled mid-call), a 404 is re-checked for
    ``settle`` seconds before the VM is declared absent.

    Args:
        compute: the clients.
        zone, name: the instance.
        deadline: ``time.monotonic()`` value.
        pending: the insert operation, when known.
        insert_sent: whether an insert may have reached the API.
        settle: seconds to keep re-checking a 404 when the insert operation is unknown.

    A delete whose operation ends in an error is sent again (``DELETE_ATTEMPTS`` in all).

    Returns:
        True if an instance was deleted, False if there was none.

    Raises:
        CloudError, DeadlineExceeded: it could not be deleted by the deadline.
    """
    return _delete(compute, f"instance {name}", lambda: compute.instances.delete_unary(
        project=compute.project, zone=zone, instance=name), deadline, pending, insert_sent, settle)


def list_instances(compute: Compute, label_filter: str, deadline: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """``instances.aggregatedList`` with ``filter``; yields ``(zone, instance JSON)``.

    Raises:
        CloudError: the call failed.
    """
    pages = call("list instances", lambda: list(compute.instances.aggregated_list(
        request={"project": compute.project, "filter": label_filter})), deadline)
    for scope, scoped in pages:
        for inst in getattr(scoped, "instances", []) or []:
            yield str(scope).rsplit("/", 1)[-1], to_dict(inst)


def set_metadata(compute: Compute, zone: str, name: str, body: dict[str, Any], deadline: float) -> OperationRef:
    """``instances.setMetadata`` with ``body`` (``{"fingerprint", "items"}``), compare-and-swap on fingerprint.

    Raises:
        MetadataConflict: HTTP 412, the fingerprint is stale (read again and rebuild the body).
        CloudError: other failures.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    resource = compute_v1.Metadata.from_json(json.dumps(body))
    try:
        op = call(f"set metadata of {name}", lambda: compute.instances.set_metadata_unary(
            project=compute.project, zone=zone, instance=name, metadata_resource=resource), deadline)
    except CloudError as exc:
        if isinstance(exc.__cause__, gexc.PreconditionFailed):
            raise MetadataConflict(f"metadata of {name} changed meanwhile") from exc.__cause__
        raise
    return operation_ref(op)


class MetadataConflict(CloudError):
    """``setMetadata`` answered 412: the metadata fingerprint moved (someone else wrote it)."""


def serial_output(compute: Compute, zone: str, name: str, port: int, start: int | None,
                  deadline: float) -> tuple[str, int]:
    """``instances.getSerialPortOutput`` from byte offset ``start`` (None: the oldest retained byte).

    Returns:
        ``(contents, next)``: the text and the offset to ask next.

    Raises:
        NotReady: the instance is not running yet (HTTP 400 ``resourceNotReady``).
        ResourceNotFound, CloudError: other failures.
    """
    from google.api_core import exceptions as gexc

    request: dict[str, Any] = {"project": compute.project, "zone": zone, "instance": name, "port": port}
    if start is not None:
        request["start"] = start
    try:
        doc = to_dict(call(f"serial port {port} of {name}",
                           lambda: compute.instances.get_serial_port_output(request=request), deadline))
    except CloudError as exc:
        if isinstance(exc.__cause__, gexc.BadRequest) and "not ready" in str(exc).lower():
            raise NotReady(str(exc)) from exc.__cause__
        raise
    return str(doc.get("contents", "")), int(doc.get("next", start or 0))


class NotReady(CloudError):
    """The instance cannot answer yet (serial port of an instance that is not running)."""


def guest_attribute(compute: Compute, zone: str, name: str, key: str, deadline: float) -> str | None:
    """The guest attribute ``key`` (``namespace/key``, e.g. ``hostkeys/winrm``), or None if not published yet.

    Raises:
        CloudError: the call failed for another reason than 404.
    """
    try:
        doc = to_dict(call(f"guest attribute {key} of {name}", lambda: compute.instances.get_guest_attributes(
            request={"project": compute.project, "zone": zone, "instance": name, "variable_key": key}), deadline))
    except ResourceNotFound:
        return None
    value = doc.get("variableValue")
    return str(value) if value else None


# -- firewalls ---------------------------------------------------------------------------------------------------


def insert_firewall(compute: Compute, body: dict[str, Any], deadline: float) -> OperationRef:
    """``firewalls.insert`` with ``body`` (REST JSON of a ``Firewall``); returns its global operation.

    Raises:
        CloudError: the API refused it.
    """
    from google.cloud import compute_v1

    resource = compute_v1.Firewall.from_json(json.dumps(body))
    op = call(f"insert firewall rule {body['name']}", lambda: compute.firewalls.insert_unary(
        project=compute.project, firewall_resource=resource), deadline)
    return operation_ref(op)


def delete_firewall(compute: Compute, name: str, deadline: float, pending: OperationRef | None = None,
                    insert_sent: bool = True, settle: float = 5.0) -> bool:
    """Delete a firewall rule and wait; 404 counts as deleted. Waits for a pending insert first (see
    :func:`delete_instance` for ``pending``/``insert_sent``/``settle``).

    Returns:
        True if a rule was deleted.

    Raises:
        CloudError, DeadlineExceeded: it could not be deleted by the deadline.
    """
    return _delete(compute, f"firewall rule {name}", lambda: compute.firewalls.delete_unary(
        project=compute.project, firewall=name), deadline, pending, insert_sent, settle)


def _delete(compute: Compute, what: str, send: Callable[[], Any], deadline: float, pending: OperationRef | None,
            insert_sent: bool, settle: float) -> bool:
    """The delete loop shared by instances and firewall rules (see :func:`delete_instance`).

    Waits for a pending insert (its errors ignored); re-checks a 404 for ``settle`` seconds when the insert was sent
    but its operation is unknown; sends the delete again when its operation fails (``DELETE_ATTEMPTS`` in all);
    an operation error ``RESOURCE_NOT_FOUND`` counts as deleted.

    Returns:
        True if something was deleted, False if there was nothing.
    """
    if pending is not None and pending.name:
        try:
            wait_operation(compute, pending, deadline, f"insert {what}")
        except CloudError as exc:
            log.debug("pending insert of %s ended with %s", what, exc)
    settle_until = time.monotonic() + (settle if insert_sent and (pending is None or not pending.name) else 0.0)
    failures = 0
    while True:
        try:
            op = call(f"delete {what}", send, deadline)
        except ResourceNotFound:
            if time.monotonic() >= settle_until:
                return False
            time.sleep(0.2)
            continue
        try:
            wait_operation(compute, op, deadline, f"delete {what}")
        except GceOperationError as exc:
            if any(code == "RESOURCE_NOT_FOUND" for code in exc.codes):
                return True
            failures += 1
            if failures >= DELETE_ATTEMPTS:
                raise
            log.debug("delete of %s failed (%s); trying again", what, exc)
            time.sleep(RETRY_INITIAL * failures)
            continue
        return True


def list_firewalls(compute: Compute, name_prefix: str, deadline: float) -> list[dict[str, Any]]:
    """Firewall rules whose name starts with ``name_prefix`` (REST JSON).

    Raises:
        CloudError: the call failed.
    """
    rules = call("list firewall rules", lambda: list(compute.firewalls.list(project=compute.project)), deadline)
    return [doc for doc in (to_dict(rule) for rule in rules) if str(doc.get("name", "")).startswith(name_prefix)]


__all__ = [
    "Compute", "GceOperationError", "MetadataConflict", "NotReady", "OperationRef", "QuotaExceeded",
    "ResourceNotFound", "SHORT_IMAGES", "ZoneExhausted", "call", "connect", "delete_firewall", "delete_instance",
    "get_instance", "guest_attribute", "image_source", "insert_firewall", "insert_instance", "list_firewalls",
    "list_instances", "network_path", "operation_errors", "raise_for_operation", "region_zones", "resolve_image",
    "resolve_project", "serial_output", "set_metadata", "subnetwork_path", "to_dict", "wait_operation",
    "zone_candidates",
]
