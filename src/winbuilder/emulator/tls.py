"""Self-signed TLS certificates for the emulated WinRM HTTPS listener (what a GCE Windows image creates at first boot).

The certificate and key are written as PEM files into a fresh 0700 temp directory (the key file is 0600). The
fingerprints are hex digests of the DER certificate: SHA-256 (what winbuilder pins) and SHA-1 (the Windows
"thumbprint" shown by ``winrm enumerate winrm/config/listener`` and published by the GCE guest agent).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertBundle:
    """A certificate on disk.

    Attributes:
        cert_pem_path: PEM certificate (usable as a CA bundle by clients, it is self-signed).
        key_pem_path: PEM private key, unencrypted, mode 0600.
        directory: the 0700 temp directory holding both (None when the files were supplied by the caller).
        sha256: lower-case hex SHA-256 of the DER certificate, no colons.
        sha1: lower-case hex SHA-1 of the DER certificate (the Windows thumbprint), no colons.
    """

    cert_pem_path: Path
    key_pem_path: Path
    directory: Path | None
    sha256: str
    sha1: str

    def remove(self) -> None:
        """Delete the temp directory (only when this module created it). Never raises."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def fingerprints(cert_pem: bytes) -> tuple[str, str]:
    """Fingerprints of a PEM certificate.

    Args:
        cert_pem: the PEM text of one certificate.

    Returns:
        ``(sha256_hex, sha1_hex)`` of the DER encoding, lower case, no colons.

    Raises:
        ValueError: the PEM does not hold a certificate.
    """
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest(), hashlib.sha1(der).hexdigest()  # noqa: S324 - a thumbprint, not security


def load_bundle(cert_pem_path: Path, key_pem_path: Path) -> CertBundle:
    """Describe a caller-supplied certificate/key pair (the files are left where they are, and never deleted).

    Raises:
        OSError: a file cannot be read.
        ValueError: the certificate file is not a PEM certificate.
    """
    sha256, sha1 = fingerprints(cert_pem_path.read_bytes())
    return CertBundle(cert_pem_path, key_pem_path, None, sha256, sha1)


def generate_self_signed(hosts: list[str], common_name: str = "winbuilder-emulator",
                         days: int = 30) -> CertBundle:
    """Create a self-signed server certificate (ECDSA P-256, SHA-256 signature) in a new 0700 temp directory.

    Args:
        hosts: names and IP addresses for the subjectAltName (e.g. ``["127.0.0.1", "localhost"]``).
        common_name: the subject CN (Windows uses the computer name).
        days: validity in days, starting one hour in the past to tolerate clock skew.

    Returns:
        The bundle; call ``remove()`` when done.

    Raises:
        OSError: the temp directory or files cannot be written.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = Path(tempfile.mkdtemp(prefix="wb-tls-"))  # mkdtemp creates it 0700
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    cert_path.write_bytes(cert_pem)
    sha256, sha1 = fingerprints(cert_pem)
    return CertBundle(cert_path, key_path, directory, sha256, sha1)
