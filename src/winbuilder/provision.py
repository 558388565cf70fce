"""Create the Windows server on Compute Engine as flow steps, each registering its undo before it acts.

Steps (``steps(spec)``, prepended by ``flow.plan`` when ``spec.gce`` is set):

1. ``firewall``: a per-run ingress rule, tcp:5986 (22 for SSH), ``targetTags`` = the run's own tag,
   ``sourceRanges`` = ``--allow-from`` or the caller's egress address (never ``0.0.0.0/0``); skipped with
   ``--internal-ip``.
2. ``instance``: ``winbuilder-<run id>``, labelled ``winbuilder=1``, ``winbuilder-run``, ``winbuilder-expires``,
   with ``scheduling.maxRunDuration`` + ``instanceTerminationAction: DELETE`` (Compute Engine deletes it even if
   winbuilder is SIGKILLed); ``ZONE_RESOURCE_POOL_EXHAUSTED`` moves on to the next zone of the region.
3. ``password``: the GCE Windows password-reset protocol (background.md 3): serial port 4 ``next`` taken before
   a fingerprint-guarded ``setMetadata`` of ``windows-keys``, then incremental polling with backoff.
4. ``tls-pin``: guest attribute ``hostkeys/winrm`` (the listener's Windows thumbprint) pinned into the target.
5. ``ready``: TCP + TLS probes of the listener with per-probe timeouts (the pin checked on each handshake)
   under the boot deadline; on timeout the tail of serial port 1 is printed.

With ``--transport ssh`` the steps are ``ssh-key``, ``firewall`` (tcp:22), ``instance``, ``ssh-host-key``, ``ready``:

* ``ssh-key``: an ephemeral ed25519 key generated in memory; the private key goes only to a 0600 temp file (its
  delete is registered first) and the public key into metadata ``ssh-keys`` (``USER:ssh-ed25519 BASE64 COMMENT``)
  with ``enable-windows-ssh=TRUE``, at insert time; the Windows guest agent creates the user and authorizes the
  key, so there is no password step.
* ``ssh-host-key``: guest attribute ``hostkeys/ssh-ed25519`` (``ALGO BASE64``, as in known_hosts) pinned as the
  SSH host key (``SHA256:...``). Not published by the boot deadline: ``SecurityError``. There is no way around the
  pin for SSH (``--insecure-skip-verify`` is a usage error with ``--transport ssh``).
* ``ready``: the port must answer with an SSH banner (``SSH-2.0-...``, RFC 4253 4.2) under the boot deadline.

``gc()`` deletes winbuilder VMs whose ``winbuilder-expires`` label has passed and per-run firewall rules whose VMs
are gone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from winbuilder import flow, gce, redact
from winbuilder.errors import CapacityError, CloudError, DeadlineExceeded, SecurityError, UsageError
from winbuilder.password import Password, PasswordReader, key_entry, new_key, set_metadata_body
from winbuilder.spec import GceSpec, RunSpec, TargetSpec, TlsSpec

log = logging.getLogger(__name__)

LABEL = "winbuilder"
RUN_LABEL = "winbuilder-run"
EXPIRES_LABEL = "winbuilder-expires"
NAME_PREFIX = "winbuilder-"
WINRM_PORT = 5986
SSH_PORT = 22
UNDO_TIMEOUT = 600.0
"""Seconds each delete (instance, firewall rule) may take at teardown."""
API_TIMEOUT = 300.0
"""Seconds a create (rule, instance) may take, operation included."""
PIN_GRACE = 300.0
"""Seconds to wait for ``hostkeys/winrm`` once the password has arrived (the guest has booted by then)."""
POLL_FIRST = 0.2
POLL_MAX = 10.0
"""Serial/guest-attribute polling: first delay and cap, seconds (the delay grows by half each time)."""
PROBE_TIMEOUT = 5.0
"""Seconds per readiness probe (TCP connect, then the TLS handshake)."""
SERIAL_TAIL = 2000
"""Characters of serial port 1 shown when the server never became ready."""
METADATA_RETRIES = 10
SSH_HOST_KEY_ATTRIBUTE = "hostkeys/ssh-ed25519"
"""Guest attribute where GCE Windows images publish their OpenSSH ed25519 host key (with guest attributes on)."""
SSH_BANNER_MAX = 255
"""Longest SSH identification line in bytes (RFC 4253 4.2)."""


@dataclass
class GceState:
    """What the Compute Engine steps share (kept in ``ctx.notes["_gce"]``, never reported).

    Attributes:
        compute: the API clients.
        name: instance name; tag: the run's network tag; rule: the firewall rule name.
        zone: the zone the instance lives in, once created.
        host: the address to connect to; boot_deadline: ``time.monotonic()`` limit for password, pin, readiness.
        password: the decrypted password (never printed).
        ssh_keys: the ``ssh-keys`` metadata entry of the run's key (SSH only; public).
    """

    compute: gce.Compute
    name: str
    tag: str
    rule: str
    zone: str | None = None
    host: str | None = None
    boot_deadline: float = 0.0
    password: Password | None = field(default=None, repr=False)
    ssh_keys: str | None = None


def steps(spec: RunSpec) -> list[flow.NamedStep]:
    """The Compute Engine steps for ``spec`` (empty when ``spec.gce`` is None)."""
    if spec.gce is None:
        return []
    out = [] if spec.gce.internal_ip else [flow.NamedStep("firewall", step_firewall)]
    if spec.target is not None and spec.target.transport == "ssh":
        return [flow.NamedStep("ssh-key", step_ssh_key), *out, flow.NamedStep("instance", step_instance),
                flow.NamedStep("ssh-host-key", step_ssh_host_key), flow.NamedStep("ready", step_ready)]
    return [*out, flow.NamedStep("instance", step_instance), flow.NamedStep("password", step_password),
            flow.NamedStep("tls-pin", step_tls_pin), flow.NamedStep("ready", step_ready)]


# -- pure helpers -------------------------------------------------------------------------------------------------


def instance_name(run_id: str) -> str:
    """``winbuilder-<run id>`` (a valid Compute name: lower case, starts with a letter, <= 63 characters).

    Raises:
        UsageError: the run id is not ``[a-z0-9-]`` or the name would be too long.
    """
    name = f"{NAME_PREFIX}{run_id}"
    if not run_id or len(name) > 63 or not all(c.isdigit() or ("a" <= c <= "z") or c == "-" for c in run_id):
        raise UsageError(f"run id {run_id!r} cannot name a Compute Engine instance", "this is a bug")
    return name


def labels(run_id: str, expires_epoch: int, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """Instance labels: ``extra`` plus ``winbuilder=1``, ``winbuilder-run=<id>``, ``winbuilder-expires=<epoch s>``."""
    out = dict(extra)
    out.update({LABEL: "1", RUN_LABEL: run_id, EXPIRES_LABEL: str(int(expires_epoch))})
    return out


def expires_epoch(max_run_duration: float, now: float | None = None) -> int:
    """Unix time (seconds) after which the VM is an orphan: now + ``max_run_duration`` + one minute of slack."""
    return int((time.time() if now is None else now) + max_run_duration + 60)


def expired(instance: dict[str, Any], now: float) -> bool:
    """Whether an instance's ``winbuilder-expires`` label is in the past (no or bad label: False)."""
    value = (instance.get("labels") or {}).get(EXPIRES_LABEL, "")
    return value.isdigit() and int(value) < now


def check_source_ranges(ranges: tuple[str, ...]) -> list[str]:
    """Validate ``--allow-from`` CIDRs; an address without a prefix length becomes /32 (/128).

    Raises:
        UsageError: a malformed CIDR, or one that admits the whole internet (``0.0.0.0/0``, ``::/0``).
    """
    out = []
    for text in ranges:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise UsageError(f"--allow-from {text!r} is not a CIDR range", "e.g. --allow-from 203.0.113.7/32") from None
        if net.prefixlen == 0:
            raise UsageError(f"--allow-from {text!r} would open the port to the whole internet",
                             "name your CI's egress range, or use --internal-ip")
        out.append(str(net))
    return out


def egress_range(url: str, timeout: float = 10.0) -> str:
    """The caller's egress address as a /32 (/128), from a "what is my IP" URL answering plain text.

    Raises:
        UsageError: the URL did not answer with one IP address.
    """
    import requests

    try:
        reply = requests.get(url, timeout=timeout)
        reply.raise_for_status()
        address = ipaddress.ip_address(reply.text.strip())
    except (requests.RequestException, ValueError) as exc:
        raise UsageError(f"could not learn this machine's egress address from {url} ({type(exc).__name__})",
                         "pass --allow-from CIDR (your CI's egress range) or --internal-ip") from None
    return f"{address}/{address.max_prefixlen}"


def firewall_body(spec: GceSpec, rule: str, tag: str, port: int, ranges: list[str], run_id: str) -> dict[str, Any]:
    """The per-run ingress rule (REST JSON of a ``Firewall``)."""
    return {
        "name": rule,
        "description": f"winbuilder run {run_id}: tcp:{port} to the run's VM only; deleted at teardown",
        "network": gce.network_path(spec.network or "default"),
        "direction": "INGRESS",
        "priority": 1000,
        "allowed": [{"IPProtocol": "tcp", "ports": [str(port)]}],
        "sourceRanges": ranges,
        "targetTags": [tag],
    }


def instance_body(spec: GceSpec, name: str, zone: str, image: str, tag: str, run_id: str,
                  expires: int, metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """The ``instances.insert`` body (REST JSON of an ``Instance``).

    Args:
        spec: the VM options.
        name: instance name; zone: its zone; image: source image self link; tag: the run's network tag.
        run_id: for the labels; expires: the ``winbuilder-expires`` label (Unix seconds).
        metadata: more metadata items after ``enable-guest-attributes=TRUE`` (e.g. ``ssh_metadata(...)``).
    """
    region = zone.rsplit("-", 1)[0]
    all_labels = labels(run_id, expires, spec.labels)
    nic: dict[str, Any] = {"network": gce.network_path(spec.network or "default")}
    if spec.subnetwork:
        nic["subnetwork"] = gce.subnetwork_path(spec.subnetwork, region)
    if not spec.internal_ip:
        nic["accessConfigs"] = [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
    scheduling: dict[str, Any] = {
        "maxRunDuration": {"seconds": str(int(spec.max_run_duration))},
        "instanceTerminationAction": "DELETE",
    }
    if spec.spot:
        scheduling.update({"provisioningModel": "SPOT", "onHostMaintenance": "TERMINATE", "automaticRestart": False})
    body: dict[str, Any] = {
        "name": name,
        "description": f"winbuilder run {run_id}",
        "machineType": f"zones/{zone}/machineTypes/{spec.machine_type}",
        "labels": all_labels,
        "tags": {"items": list(dict.fromkeys([tag, *spec.tags]))},
        "disks": [{"boot": True, "autoDelete": True, "initializeParams": {
            "sourceImage": image, "diskSizeGb": str(spec.boot_disk_gb),
            "diskType": f"zones/{zone}/diskTypes/{spec.boot_disk_type}", "labels": all_labels}}],
        "networkInterfaces": [nic],
        "metadata": {"items": [{"key": "enable-guest-attributes", "value": "TRUE"},
                               *({"key": k, "value": v} for k, v in metadata)]},
        "scheduling": scheduling,
    }
    if spec.service_account:
        body["serviceAccounts"] = [{"email": spec.service_account, "scopes": list(spec.scopes)}]
    return body


def ssh_keys_entry(user: str, public_key: str) -> str:
    """One ``ssh-keys`` metadata line: ``USER:ALGO BASE64 COMMENT`` (the GCE guest agents' format).

    Raises:
        UsageError: ``user`` is empty or holds ``:`` or white space, or ``public_key`` is not one key line.
    """
    if not user or ":" in user or any(c.isspace() for c in user):
        raise UsageError(f"user name {user!r} cannot go into ssh-keys metadata", "use letters, digits, . _ -")
    key = public_key.strip()
    if "\n" in key or len(key.split()) < 2:
        raise UsageError("the SSH public key is not one OpenSSH key line", "this is a bug")
    return f"{user}:{key}"


def ssh_metadata(ssh_keys: str) -> tuple[tuple[str, str], ...]:
    """Metadata items that make a GCE Windows image start OpenSSH and authorize ``ssh_keys`` (its lines)."""
    return (("enable-windows-ssh", "TRUE"), ("ssh-keys", ssh_keys))


def host_key_fingerprint(known_hosts_value: str) -> str:
    """``SHA256:<base64>`` (as ``ssh-keygen -lf`` prints it) of an ``ALGO BASE64 [COMMENT]`` public key.

    Raises:
        ValueError: not an OpenSSH public key.
    """
    import asyncssh

    try:
        key = asyncssh.import_public_key(known_hosts_value.strip())
    except (asyncssh.KeyImportError, UnicodeError) as exc:
        raise ValueError(f"not an OpenSSH public key ({type(exc).__name__})") from None
    fingerprint: str = key.get_fingerprint("sha256")
    return fingerprint


def instance_address(instance: dict[str, Any], internal: bool) -> str | None:
    """The external NAT IP (or the internal IP with ``internal``) of an instance's first interface."""
    nics = instance.get("networkInterfaces") or [{}]
    if internal:
        return nics[0].get("networkIP") or None
    configs = nics[0].get("accessConfigs") or [{}]
    return configs[0].get("natIP") or None


def _backoff(delay: float) -> float:
    return min(POLL_MAX, delay * 1.5)


def _sleep_until(delay: float, deadline: float) -> None:
    time.sleep(max(0.0, min(delay, deadline - time.monotonic())))


# -- the steps ----------------------------------------------------------------------------------------------------


def _gce(ctx: flow.RunContext) -> GceSpec:
    if ctx.spec.gce is None:
        raise UsageError("no Compute Engine settings", "this is a bug")
    return ctx.spec.gce


def state(ctx: flow.RunContext) -> GceState:
    """The shared Compute Engine state of this run (clients built on first use)."""
    found = ctx.notes.get("_gce")
    if isinstance(found, GceState):
        return found
    spec = _gce(ctx)
    run_id = ctx.spec.run_id
    name = instance_name(run_id)
    compute = gce.connect(spec.project, spec.compute_endpoint)
    st = GceState(compute=compute, name=name, tag=name, rule=f"{name}-{_port(ctx)}")
    ctx.notes["_gce"] = st
    return st


def _port(ctx: flow.RunContext) -> int:
    t = ctx.target
    if t is not None and t.port is not None:
        return t.port
    return SSH_PORT if t is not None and t.transport == "ssh" else WINRM_PORT


def step_firewall(ctx: flow.RunContext) -> None:
    """Create the per-run firewall rule (undo: delete it, waiting for a pending insert)."""
    spec = _gce(ctx)
    ranges = check_source_ranges(spec.allow_from) if spec.allow_from else [egress_range(spec.egress_ip_url)]
    st = state(ctx)
    body = firewall_body(spec, st.rule, st.tag, _port(ctx), ranges, ctx.spec.run_id)
    pending: dict[str, gce.OperationRef] = {}

    def undo() -> None:
        gce.delete_firewall(st.compute, st.rule, time.monotonic() + UNDO_TIMEOUT, pending.get("op"))

    ctx.undo.callback(flow.quietly, f"delete firewall rule {st.rule}", undo, ctx)
    deadline = time.monotonic() + API_TIMEOUT
    op = gce.insert_firewall(st.compute, body, deadline)
    pending["op"] = op
    gce.wait_operation(st.compute, op, deadline, f"create firewall rule {st.rule}")
    ctx.notes["firewall"] = st.rule
    ctx.kept.append(f"firewall rule {st.rule} (tcp:{_port(ctx)} from {', '.join(ranges)}): delete it with "
                    f"gcloud compute firewall-rules delete {st.rule} --project {spec.project} --quiet")
    flow.status(f"firewall rule {st.rule}: tcp:{_port(ctx)} from {', '.join(ranges)} to tag {st.tag}")


def step_instance(ctx: flow.RunContext) -> None:
    """Create the VM, falling back across the region's zones on ``ZONE_RESOURCE_POOL_EXHAUSTED``.

    Raises:
        QuotaExceeded: at once (no zone helps).
        CapacityError: every zone was exhausted.
        CloudError, DeadlineExceeded: the API failed.
    """
    spec = _gce(ctx)
    st = state(ctx)
    deadline = time.monotonic() + API_TIMEOUT
    image = gce.resolve_image(st.compute, spec.image, deadline)
    zones = gce.zone_candidates(spec.zone, [] if spec.zone else gce.region_zones(st.compute, spec.region or "",
                                                                                 deadline))
    expires = expires_epoch(spec.max_run_duration)
    exhausted: list[str] = []
    for zone in zones:
        if _create_in(ctx, st, spec, zone, image, expires):
            break
        exhausted.append(zone)
    else:
        raise CapacityError(f"no capacity for {spec.machine_type} in zones {', '.join(exhausted)}",
                                "try another --region or --machine-type, or later")
    zone = st.zone or ""
    doc = gce.get_instance(st.compute, zone, st.name, deadline)
    st.host = instance_address(doc, spec.internal_ip)
    if not st.host:
        raise CloudError(f"instance {st.name} has no {'internal' if spec.internal_ip else 'external'} address",
                         "check the network configuration")
    st.boot_deadline = time.monotonic() + spec.boot_timeout
    ctx.notes.update({"instance": st.name, "zone": zone, "project": spec.project})
    base = ctx.target or TargetSpec(host="", user=spec.user)
    ctx.target = replace(base, host=st.host, user=spec.user)
    how = (f"ssh -i {ctx.target.ssh.key_path} {spec.user}@{st.host}" if ctx.target.transport == "ssh" else
           f"reset the password with gcloud compute reset-windows-password {st.name} --zone {zone} --user {spec.user}")
    ctx.kept.append(f"instance {st.name} in zone {zone} (project {spec.project}): reach it at "
                    f"{st.host}:{_port(ctx)} ({how}); delete it with gcloud compute instances delete "
                    f"{st.name} --zone {zone} --project {spec.project} --quiet")
    flow.status(f"instance {st.name} in {zone}: {st.host} ({spec.machine_type}, deleted by Compute Engine after "
                f"{int(spec.max_run_duration)} s at the latest)")


def _create_in(ctx: flow.RunContext, st: GceState, spec: GceSpec, zone: str, image: str, expires: int) -> bool:
    """Insert the VM in ``zone``; False when the zone is exhausted (the VM then does not exist)."""
    pending: dict[str, gce.OperationRef] = {}

    def undo() -> None:
        gce.delete_instance(st.compute, zone, st.name, time.monotonic() + UNDO_TIMEOUT, pending.get("op"))

    ctx.undo.callback(flow.quietly, f"delete instance {st.name} in {zone}", undo, ctx)
    deadline = time.monotonic() + API_TIMEOUT
    extra = ssh_metadata(st.ssh_keys) if st.ssh_keys is not None else ()
    body = instance_body(spec, st.name, zone, image, st.tag, ctx.spec.run_id, expires, extra)
    op = gce.insert_instance(st.compute, zone, body, deadline)
    pending["op"] = op
    try:
        if op.name:
            gce.wait_operation(st.compute, op, deadline, f"create instance {st.name}")
    except gce.ZoneExhausted as exc:
        flow.status(f"zone {zone} has no capacity; trying the next zone ({exc.message})")
        return False
    st.zone = zone
    return True


def step_ssh_key(ctx: flow.RunContext) -> None:
    """Generate the run's ephemeral ed25519 key (undo: delete its private key file).

    The private key exists in memory and in one 0600 file created with ``O_EXCL`` in the temp directory (the
    delete is registered before the file exists); the public key becomes the ``ssh-keys`` entry the instance step
    puts in the metadata at insert time.

    Raises:
        UsageError: the user name cannot go into ``ssh-keys``.
        OSError: the key file could not be written.
    """
    import asyncssh

    spec = _gce(ctx)
    st = state(ctx)
    run_id = ctx.spec.run_id
    path = Path(tempfile.gettempdir()) / f"winbuilder-{run_id}-{secrets.token_hex(6)}.key"

    def undo() -> None:
        path.unlink(missing_ok=True)

    ctx.undo.callback(flow.quietly, f"delete the private key file {path}", undo, ctx)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"winbuilder-{run_id}")
    entry = ssh_keys_entry(spec.user, key.export_public_key().decode("ascii"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    del key
    st.ssh_keys = entry
    base = ctx.target or TargetSpec(host="", user=spec.user, transport="ssh")
    ctx.target = replace(base, user=spec.user, ssh=replace(base.ssh, key_path=path))
    ctx.kept.append(f"private key {path} (authorized for {spec.user} through ssh-keys): delete it when done")
    log.debug("ssh-keys: ephemeral ed25519 key for %s, private key in %s", spec.user, path)


def step_ssh_host_key(ctx: flow.RunContext) -> None:
    """Pin the SSH host key from guest attribute ``hostkeys/ssh-ed25519`` (``ALGO BASE64``, as in known_hosts).

    Polls with backoff until the boot deadline (the image publishes it once OpenSSH has started).

    Raises:
        SecurityError: not published by the boot deadline, or not a public key.
    """
    st = state(ctx)
    target = ctx.target
    if target is None:
        raise UsageError("no server to pin", "this is a bug")
    deadline = st.boot_deadline
    delay = POLL_FIRST
    while True:
        value = gce.guest_attribute(st.compute, st.zone or "", st.name, SSH_HOST_KEY_ATTRIBUTE, deadline)
        if value is not None or time.monotonic() + delay >= deadline:
            break
        _sleep_until(delay, deadline)
        delay = _backoff(delay)
    if value is None:
        _print_serial_tail(st, st.zone or "")
        raise SecurityError(f"instance {st.name} did not publish its SSH host key (guest attribute "
                            f"{SSH_HOST_KEY_ATTRIBUTE}) in time",
                            "raise --boot-timeout, or use an image that publishes host keys to guest attributes")
    try:
        pin = host_key_fingerprint(value)
    except ValueError:
        raise SecurityError(f"guest attribute {SSH_HOST_KEY_ATTRIBUTE} of {st.name} is not an SSH public key",
                            "check the image") from None
    ctx.target = replace(target, ssh=replace(target.ssh, host_key=pin, known_hosts=None))
    flow.status(f"SSH host key pinned: {pin} (from guest attribute {SSH_HOST_KEY_ATTRIBUTE})")


def step_password(ctx: flow.RunContext) -> None:
    """Get the Windows password through the guest agent ([background.md] 3, "GCE Windows password reset").

    Raises:
        AgentError: the agent answered with ``errorMessage``.
        DeadlineExceeded: no answer by the boot deadline (the tail of serial port 1 is printed).
    """
    spec = _gce(ctx)
    st = state(ctx)
    zone = st.zone or ""
    deadline = st.boot_deadline
    offset = _serial_next(st, zone, 4, deadline)
    key = new_key()
    remaining = max(60.0, deadline - time.monotonic())
    entry = key_entry(key, spec.user, st.compute.email, expire_in=remaining + 300)
    reader = PasswordReader(key, user=spec.user)
    _write_windows_key(st, zone, entry, deadline)
    log.debug("windows-keys: key %s written; reading serial port 4 from offset %d", key.fingerprint, offset)
    delay = POLL_FIRST
    while True:
        try:
            text, offset = gce.serial_output(st.compute, zone, st.name, 4, offset, deadline)
        except gce.NotReady:
            text = ""
        password = reader.feed(text)
        if password is not None:
            st.password = password
            break
        if time.monotonic() + delay >= deadline:
            _print_serial_tail(st, zone)
            raise DeadlineExceeded(f"no Windows password from the guest agent of {st.name} in time",
                                   "first boot can take 5-20 minutes: raise --boot-timeout")
        _sleep_until(delay, deadline)
        delay = _backoff(delay)
    base = ctx.target or TargetSpec(host=st.host or "", user=spec.user)
    redact.add_secret(password.reveal())
    ctx.target = replace(base, password=password.reveal())
    flow.status(f"password for {spec.user} received from the guest agent (key {key.fingerprint})")


def _serial_next(st: GceState, zone: str, port: int, deadline: float) -> int:
    delay = POLL_FIRST
    while True:
        try:
            return gce.serial_output(st.compute, zone, st.name, port, 0, deadline)[1]
        except gce.NotReady:
            if time.monotonic() + delay >= deadline:
                raise DeadlineExceeded(f"instance {st.name} never started", "raise --boot-timeout") from None
            _sleep_until(delay, deadline)
            delay = _backoff(delay)


def _write_windows_key(st: GceState, zone: str, entry: dict[str, Any], deadline: float) -> None:
    """Read-merge-write ``windows-keys``, guarded by the metadata fingerprint; re-read and retry on 412."""
    for _ in range(METADATA_RETRIES):
        doc = gce.get_instance(st.compute, zone, st.name, deadline)
        body = set_metadata_body(doc.get("metadata") or {}, entry, now=datetime.now(UTC))
        try:
            op = gce.set_metadata(st.compute, zone, st.name, body, deadline)
        except gce.MetadataConflict:
            log.debug("metadata of %s changed meanwhile; reading it again", st.name)
            continue
        gce.wait_operation(st.compute, op, deadline, f"set metadata of {st.name}")
        return
    raise CloudError(f"the metadata of {st.name} kept changing ({METADATA_RETRIES} conflicts)",
                     "something else is writing the instance metadata")


def step_tls_pin(ctx: flow.RunContext) -> None:
    """Pin the WinRM certificate from guest attribute ``hostkeys/winrm`` (hex SHA-1 thumbprint).

    Raises:
        SecurityError: not published in time (unless ``--insecure-skip-verify``), or malformed.
    """
    from winbuilder.transport.winrm import normalize_fingerprint

    st = state(ctx)
    target = ctx.target
    if target is None or target.transport != "winrm" or target.winrm_http:
        return
    insecure = target.tls.insecure_skip_verify
    deadline = min(st.boot_deadline, time.monotonic() + PIN_GRACE)
    delay = POLL_FIRST
    while True:
        value = gce.guest_attribute(st.compute, st.zone or "", st.name, "hostkeys/winrm", deadline)
        if value is not None or insecure or time.monotonic() + delay >= deadline:
            break
        _sleep_until(delay, deadline)
        delay = _backoff(delay)
    if value is None:
        if insecure:
            flow.status("WARNING: no certificate thumbprint published (guest attribute hostkeys/winrm); "
                        "--insecure-skip-verify: connecting WITHOUT verifying the server")
            return
        raise SecurityError(f"instance {st.name} did not publish its WinRM certificate (guest attribute "
                            "hostkeys/winrm) in time", "use an image that publishes it, or --insecure-skip-verify")
    try:
        pin = normalize_fingerprint(value)
    except ValueError:
        raise SecurityError(f"guest attribute hostkeys/winrm of {st.name} is not a thumbprint",
                            "check the image's setup scripts") from None
    ctx.target = replace(target, tls=TlsSpec(cert_fingerprint=pin))
    flow.status(f"WinRM certificate pinned: SHA-1 {pin.upper()} (from guest attribute hostkeys/winrm)")


def step_ready(ctx: flow.RunContext) -> None:
    """Wait until the listener accepts TCP and completes a TLS handshake (checked against the pin).

    Raises:
        SecurityError: the certificate does not match the pin (before any credentials are sent).
        DeadlineExceeded: not ready by the boot deadline; the tail of serial port 1 is printed.
    """
    st = state(ctx)
    target = ctx.target
    if target is None:
        raise UsageError("no server to wait for", "this is a bug")
    port = target.effective_port
    tls = target.transport == "winrm" and not target.winrm_http
    ssh = target.transport == "ssh"
    delay = POLL_FIRST
    last = "no probe yet"
    while True:
        remaining = st.boot_deadline - time.monotonic()
        if remaining <= 0:
            _print_serial_tail(st, st.zone or "")
            raise DeadlineExceeded(f"{target.host}:{port} did not answer in time ({last})",
                                   "raise --boot-timeout, or check the firewall (--allow-from) and the image")
        try:
            if ssh:
                probe_ssh(target.host, port, min(PROBE_TIMEOUT, remaining))
            else:
                probe(target.host, port, tls, target.tls.cert_fingerprint, min(PROBE_TIMEOUT, remaining))
            return
        except SecurityError:
            raise
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        _sleep_until(delay, st.boot_deadline)
        delay = _backoff(delay)


def probe(host: str, port: int, tls: bool, pin: str | None, timeout: float) -> None:
    """One readiness probe: TCP connect, then (``tls``) a handshake whose certificate must match ``pin``.

    No credentials are sent. Args: ``timeout`` in seconds, per connect and per handshake.

    Raises:
        OSError: not reachable yet (refused, reset, timed out, handshake failed).
        SecurityError: the certificate's fingerprint differs from ``pin`` (SHA-1 or SHA-256 hex).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if not tls:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the pin below is the check
        sock.settimeout(timeout)
        with context.wrap_socket(sock) as wrapped:
            der = wrapped.getpeercert(binary_form=True) or b""
    if pin is None:
        return
    want = pin.replace(":", "").lower()
    have = (hashlib.sha1(der).hexdigest() if len(want) == 40  # noqa: S324 - the Windows thumbprint, a pin
            else hashlib.sha256(der).hexdigest())
    if have != want:
        raise SecurityError(f"the certificate of {host}:{port} does not match the pinned thumbprint",
                            "someone may be intercepting the connection; nothing was sent")


def probe_ssh(host: str, port: int, timeout: float) -> None:
    """One SSH readiness probe: TCP connect, then the server's identification line ``SSH-2.0-...`` (RFC 4253 4.2).

    Nothing is sent. Args: ``timeout`` in seconds, for the connect and for the banner.

    Raises:
        OSError: not reachable yet, or the connection closed (or said something else) before a banner.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) <= SSH_BANNER_MAX:
            chunk = sock.recv(SSH_BANNER_MAX + 1)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"SSH-"):
        raise ConnectionError(f"{host}:{port} closed the connection without an SSH banner")


def _print_serial_tail(st: GceState, zone: str) -> None:
    try:
        text, _ = gce.serial_output(st.compute, zone, st.name, 1, None, time.monotonic() + 30)
    except CloudError as exc:
        flow.status(f"could not read serial port 1 of {st.name}: {exc}")
        return
    tail = text[-SERIAL_TAIL:]
    flow.status(f"last output of serial port 1 of {st.name}:")
    for line in tail.splitlines():
        flow.status(f"  | {line.rstrip()}")


# -- gc -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GcResult:
    """What ``gc`` found (and deleted unless ``dry_run``): ``instances`` as ``zone/name``, ``rules`` names."""

    instances: tuple[str, ...]
    rules: tuple[str, ...]
    dry_run: bool


def gc(compute: gce.Compute, zones: list[str] | None = None, dry_run: bool = False, grace: float = 600.0,
       now: float | None = None) -> GcResult:
    """Delete winbuilder VMs whose ``winbuilder-expires`` label has passed, and per-run firewall rules (named
    ``winbuilder-<run>-<port>``) older than ``grace`` seconds whose run has no VM left.

    Args:
        compute: the clients (one project).
        zones: limit VMs to these zones (None: all zones).
        dry_run: only report.
        grace: seconds a rule may exist without a VM (a run creates its rule before its VM).
        now: Unix time (tests).

    Raises:
        CloudError: listing or deleting failed.
    """
    current = time.time() if now is None else now
    deadline = time.monotonic() + UNDO_TIMEOUT
    live_runs: set[str] = set()
    doomed: list[tuple[str, str]] = []
    for zone, inst in gce.list_instances(compute, f'labels.{LABEL} = "1"', deadline):
        if zones is not None and zone not in zones:
            live_runs.add((inst.get("labels") or {}).get(RUN_LABEL, ""))
            continue
        if expired(inst, current):
            doomed.append((zone, str(inst["name"])))
        else:
            live_runs.add((inst.get("labels") or {}).get(RUN_LABEL, ""))
    rules = []
    for rule in gce.list_firewalls(compute, NAME_PREFIX, deadline):
        tags = [t for t in rule.get("targetTags", []) if t.startswith(NAME_PREFIX)]
        runs = {t[len(NAME_PREFIX):] for t in tags}
        if not runs or runs & live_runs or _age(rule, current) < grace:
            continue
        rules.append(str(rule["name"]))
    if not dry_run:
        for zone, name in doomed:
            gce.delete_instance(compute, zone, name, deadline, insert_sent=False)
        for name in rules:
            gce.delete_firewall(compute, name, deadline, insert_sent=False)
    return GcResult(tuple(f"{z}/{n}" for z, n in doomed), tuple(rules), dry_run)


def _age(resource: dict[str, Any], now: float) -> float:
    stamp = resource.get("creationTimestamp")
    if not stamp:
        return float("inf")
    try:
        return now - datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return float("inf")


__all__ = [
    "GcResult", "GceState", "check_source_ranges", "egress_range", "expired", "expires_epoch", "firewall_body", "gc",
    "host_key_fingerprint", "instance_address", "instance_body", "instance_name", "labels", "probe", "probe_ssh",
    "ssh_keys_entry", "ssh_metadata", "state", "step_firewall", "step_instance", "step_password", "step_ready",
    "step_ssh_host_key", "step_ssh_key", "step_tls_pin", "steps",
]
