"""What one ``winbuilder run`` is asked to do, as frozen, validated dataclasses. ``cli.py`` builds them; ``flow.py``
reads them. Validation errors are ``UsageError`` with a one-line fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from winbuilder.errors import UsageError

TransportName = Literal["winrm", "ssh"]
ShellName = Literal["cmd", "powershell"]

CMD_LINE_MAX = 8191  # cmd.exe's limit; longer lines are silently truncated by Windows
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_REMOTE_DIR = re.compile(r"^[A-Za-z]:\\(?:[^<>:\"|?*%!^&\r\n\\/]+\\?)*$")


def parse_duration(text: str, what: str = "duration") -> float:
    """Parse ``90``, ``90s``, ``15m``, ``1h30m`` or ``2.5h`` into seconds (> 0).

    Raises:
        UsageError: on anything else.
    """
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        m = _DURATION.fullmatch(value)
        if not value or m is None or not any(m.groups()):
            raise UsageError(f"{what} {text!r} is not a duration", "write it like 90s, 15m or 1h30m") from None
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise UsageError(f"{what} must be positive, got {text!r}", "write it like 90s, 15m or 1h30m")
    return seconds


def check_remote_dir(path: str) -> str:
    """Return ``path`` without a trailing backslash if it is an absolute Windows directory safe to quote for cmd.exe.

    Raises:
        UsageError: relative paths, forward slashes, or characters cmd.exe would interpret (``% ! ^ &``) or Windows
            forbids (``<>:"|?*``).
    """
    if not _REMOTE_DIR.fullmatch(path) or path.rstrip("\\") != path.rstrip("\\").rstrip(". "):
        raise UsageError(f"--remote-dir {path!r} is not a plain absolute Windows directory",
                         r"use a path like C:\workspace without % ! ^ & < > : \" | ? *")
    return path.rstrip("\\") if len(path) > 3 else path


_PROTECTED = {"windows", "users", "program files", "program files (x86)", "programdata", "system volume information",
              "recovery", "boot", "$recycle.bin"}


def check_cleanable(path: str) -> None:
    """Refuse to empty a drive root, a system folder or anything in one, ``C:\\Users`` or a profile itself
    (``C:\\Users\\<name>\\ws`` is fine).

    Raises:
        UsageError: ``path`` is one of those.
    """
    parts = [p.lower() for p in path.rstrip("\\").split("\\")[1:] if p]
    inside_a_profile = len(parts) > 2 and parts[0] == "users"
    if not parts or (parts[0] in _PROTECTED and not inside_a_profile):
        raise UsageError(f"--remote-dir {path} is emptied before each copy, and that folder must not be",
                         "pick a folder of its own, e.g. C:\\workspace, or pass --keep-remote")


@dataclass(frozen=True)
class TlsSpec:
    """How the WinRM HTTPS certificate is verified. Exactly one way is used, in this order: pin, CA bundle, system
    CAs; ``insecure_skip_verify`` disables verification (with a warning every run)."""

    cert_fingerprint: str | None = None
    ca_bundle: Path | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class SshSpec:
    """SSH client options: a private key file, and the host key check (known_hosts file or a fingerprint)."""

    key_path: Path | None = None
    known_hosts: Path | None = None
    host_key: str | None = None


@dataclass(frozen=True)
class TargetSpec:
    """A Windows server to connect to.

    Attributes:
        host: name or IP.
        port: TCP port; ``None`` means the transport's default (5986 HTTPS, 5985 HTTP, 22 SSH).
        user: Windows user name.
        password: never printed (``repr=False``); may be ``None`` for SSH with a key.
        transport: ``winrm`` or ``ssh``.
        winrm_http: WinRM over HTTP with NTLM message encryption instead of HTTPS.
        operation_timeout: WS-Man OperationTimeout for Receive, in seconds (1-60; [MS-WSMV] MaxTimeoutms is 60 s).
    """

    host: str
    user: str
    password: str | None = field(default=None, repr=False)
    port: int | None = None
    transport: TransportName = "winrm"
    winrm_http: bool = False
    operation_timeout: int = 20
    tls: TlsSpec = TlsSpec()
    ssh: SshSpec = SshSpec()

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.transport == "ssh":
            return 22
        return 5985 if self.winrm_http else 5986


@dataclass(frozen=True)
class GceSpec:
    """How to create the Windows server on Compute Engine (``winbuilder run`` without ``--host``).

    Attributes:
        project: project id (``--project``, else ``$PROJECT_ID``, else the ADC project; resolved by the CLI).
        zone: one zone, or None to pick (and fall back) across the zones of ``region``.
        region: used when ``zone`` is None.
        image: family name, ``ltsc2019``/``ltsc2022``/``ltsc2025``, or an image path/URL (never a dated name).
        machine_type: e.g. ``e2-standard-4`` (4 vCPU: fit for ``docker build``).
        boot_disk_gb: boot disk size in GB; boot_disk_type: ``pd-balanced``, ``pd-ssd``...
        spot: ``provisioningModel: SPOT``.
        service_account: email, or None for no service account on the VM; scopes: its OAuth scopes.
        labels: extra labels; tags: extra network tags.
        network, subnetwork: names or paths/URLs (Shared VPC); None = the project's ``default``.
        internal_ip: no external address and no firewall rule; connect to the internal IP.
        allow_from: source CIDRs of the per-run firewall rule; empty = the caller's egress address.
        egress_ip_url: a URL answering the caller's address as plain text.
        max_run_duration: seconds after which Compute Engine itself deletes the VM (``scheduling.maxRunDuration``).
        boot_timeout: seconds to wait for the password, the TLS pin and WinRM after the VM exists.
        compute_endpoint: Compute API endpoint (an emulator), or None for Google's.
        user: the Windows account the guest agent creates.
    """

    project: str
    zone: str | None = None
    region: str | None = "us-central1"
    image: str = "ltsc2022"
    machine_type: str = "e2-standard-4"
    boot_disk_gb: int = 128
    boot_disk_type: str = "pd-balanced"
    spot: bool = False
    service_account: str | None = None
    scopes: tuple[str, ...] = ("https://www.googleapis.com/auth/cloud-platform",)
    labels: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    network: str | None = None
    subnetwork: str | None = None
    internal_ip: bool = False
    allow_from: tuple[str, ...] = ()
    egress_ip_url: str = "https://checkip.amazonaws.com"
    max_run_duration: float = 6 * 3600.0
    boot_timeout: float = 25 * 60.0
    compute_endpoint: str | None = None
    user: str = "winbuilder"


@dataclass(frozen=True)
class RunSpec:
    """One build: where, what, and what moves.

    Attributes:
        command: the command line as typed (cmd.exe syntax, or a PowerShell script with ``shell="powershell"``).
        workspace: local directory copied to ``remote_dir`` and back.
        excludes: glob patterns left out of the copy in.
        timeout: seconds the command may run; then it is terminated and the run exits 124.
        connect_timeout: seconds to connect and authenticate.
        transfer_timeout: seconds each copy (in, back) may take.
        clean_remote: empty ``remote_dir`` before copying in (only when copying in), so that files of earlier runs
            on the same server neither affect the build nor come back. Refused for drive roots and system folders.
        report: where to write the JSON report, if anywhere.
    """

    command: str
    workspace: Path
    target: TargetSpec | None = None
    shell: ShellName = "cmd"
    remote_dir: str = "C:\\workspace"
    excludes: tuple[str, ...] = ()
    copy_in: bool = True
    copy_back: bool = True
    clean_remote: bool = True
    timeout: float = 4 * 3600.0
    connect_timeout: float = 120.0
    transfer_timeout: float = 3600.0
    report: Path | None = None
    keep_on_failure: bool = False
    run_id: str = ""
    gce: GceSpec | None = None

    def __post_init__(self) -> None:
        if not self.command.strip():
            raise UsageError("the command is empty", "pass --command 'build.cmd' or the words after --")
        if self.shell == "cmd" and len(self.command) + 3 * len(self.remote_dir) + 64 > CMD_LINE_MAX:
            raise UsageError(
                f"the command is {len(self.command)} characters; cmd.exe truncates lines at {CMD_LINE_MAX}",
                "put it in a script in the workspace, or use --shell powershell (sent as a file)")
        check_remote_dir(self.remote_dir)
        if self.clean_remote and self.copy_in:
            check_cleanable(self.remote_dir)
