"""Client side of the GCE Windows password-reset protocol, sans-IO (no network calls here).

The protocol (public doc "Automate Windows password generation"; background.md, "GCE Windows password reset"):

1. :func:`new_key` makes a fresh RSA-2048 key for each attempt (the guest agent ignores a key it has seen).
2. :func:`key_entry` builds the JSON object; :func:`set_metadata_body` (or :func:`merge_windows_keys`)
   appends it as one line to the ``windows-keys`` metadata value, keeping every other item byte for byte.
   ``gce.py`` sends the body with ``instances.setMetadata``; that call is compare-and-swap on
   ``fingerprint``, so on HTTP 412 it reads the metadata again and calls :func:`set_metadata_body` again.
3. The agent answers with one JSON line on serial port 4. ``gce.py`` takes ``next`` from
   ``getSerialPortOutput(port=4)`` *before* writing the key, then feeds each new chunk to
   :meth:`PasswordReader.feed`, which keeps partial lines, matches our ``modulus`` and decrypts
   ``encryptedPassword`` (RSA-OAEP, hash named by ``hashFunction``), or raises :class:`AgentError` at once on
   ``errorMessage``.

Secrets: the private key never leaves this process's memory (no serialisation API), and neither the key, the
ciphertext nor the password appear in any ``repr``/``str``, log record or exception message. The password is a
:class:`Password`; call :meth:`Password.reveal` only where it is handed to an authentication library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from winbuilder.errors import CloudError

__all__ = [
    "HASH_FUNCTIONS",
    "WINDOWS_KEYS",
    "AgentError",
    "Password",
    "PasswordKey",
    "PasswordReader",
    "format_expire_on",
    "key_entry",
    "merge_windows_keys",
    "new_key",
    "parse_expire_on",
    "set_metadata_body",
]

log = logging.getLogger(__name__)

WINDOWS_KEYS: Final = "windows-keys"
"""The instance metadata key the guest agent watches."""

HASH_FUNCTIONS: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha512": hashes.SHA512,
}
"""``hashFunction`` values the agent understands; ``sha1`` is the protocol default when the field is
absent."""

KEY_BITS: Final = 2048
PUBLIC_EXPONENT: Final = 65537
MAX_METADATA_VALUE_BYTES: Final = 256 * 1024
"""Compute Engine limit for one metadata value (bytes, UTF-8)."""
_MAX_PARTIAL_LINE: Final = 1024 * 1024
_MAX_AGENT_MESSAGE: Final = 300
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2}|[+-]\d{4})"
)


class AgentError(CloudError):
    """The guest agent answered our key with ``errorMessage`` (or with an answer we cannot use).

    The message names the user and quotes the agent's text (truncated, control characters removed); it never
    contains the password, the ciphertext or key material.
    """


class Password:
    """A password that does not print itself.

    ``repr``, ``str`` and ``format`` give ``Password(***)``; equality is constant-time; the value is only
    available through :meth:`reveal`. Not hashable and not picklable, so it cannot slip into a set, a cache
    key or a pickle by accident.

    Args:
        value: the plaintext password.
    """

    __slots__ = ("_value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the plaintext. Hand it straight to the authentication library; never log or format it."""
        return self._value

    def __repr__(self) -> str:
        return "Password(***)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Password):
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Password cannot be pickled")


@dataclass(frozen=True)
class PasswordKey:
    """One RSA-2048 key pair for one password-reset attempt.

    Attributes:
        modulus: standard base64 of the big-endian modulus (256 bytes), as sent in ``windows-keys``.
        exponent: standard base64 of the big-endian public exponent (``"AQAB"``).
        fingerprint: first 12 hex digits of SHA-256(modulus bytes); safe to log, identifies the attempt.
    """

    modulus: str
    exponent: str
    fingerprint: str
    _private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"PasswordKey(fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a PasswordKey cannot be pickled")

    def decrypt(self, ciphertext: bytes, hash_function: str) -> bytes:
        """RSA-OAEP-decrypt ``ciphertext`` (MGF1 and label-less OAEP with the named hash).

        Args:
            ciphertext: 256 bytes of RSA-OAEP output.
            hash_function: ``sha1``, ``sha256`` or ``sha512``.

        Raises:
            ValueError: unknown hash function, or the ciphertext does not decrypt under this key and hash.
        """
        algorithm = HASH_FUNCTIONS.get(hash_function)
        if algorithm is None:
            raise ValueError(f"unknown hash function {hash_function!r}")
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm=algorithm()), algorithm=algorithm(), label=None)
        return self._private_key.decrypt(ciphertext, oaep)


def _b64_int(value: int) -> str:
    return base64.b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode("ascii")


def new_key() -> PasswordKey:
    """Generate a fresh RSA-2048 key (public exponent 65537) for one attempt.

    The agent ignores a key it has already answered (same user, modulus and expireOn), so every attempt,
    retries included, needs a new key.

    Returns:
        A :class:`PasswordKey`; its private half stays in memory and is never serialised.
    """
    private = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_BITS)
    numbers = private.public_key().public_numbers()
    modulus_bytes = numbers.n.to_bytes(KEY_BITS // 8, "big")
    return PasswordKey(
        modulus=base64.b64encode(modulus_bytes).decode("ascii"),
        exponent=_b64_int(numbers.e),
        fingerprint=hashlib.sha256(modulus_bytes).hexdigest()[:12],
        _private_key=private,
    )


def format_expire_on(when: datetime) -> str:
    """Format ``when`` as RFC 3339 in UTC with an explicit ``Z`` (``2024-05-01T12:00:00Z``), seconds
    precision.

    Raises:
        ValueError: ``when`` is naive (no tzinfo).
    """
    if when.tzinfo is None:
        raise ValueError("expireOn needs an aware datetime")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expire_on(value: str) -> datetime | None:
    """Parse an ``expireOn`` value the way the guest agent does; ``None`` when it cannot.

    Accepted: RFC 3339 with a zone (``Z`` or ``±hh:mm``, optional fractional seconds), and the agent's
    fallback ``±hhmm`` zone form. A value without a zone is unparseable.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second, frac, zone = match.groups()
    try:
        if zone == "Z":
            tz = UTC
        else:
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            zh, zm = int(digits[:2]), int(digits[2:])
            if zh > 23 or zm > 59:
                return None
            tz = UTC if zh == zm == 0 else timezone(sign * timedelta(hours=zh, minutes=zm))
        micro = int((frac or "0")[:6].ljust(6, "0"))
        parts = (int(year), int(month), int(day), int(hour), int(minute), int(second))
        return datetime(*parts, micro, tzinfo=tz)
    except ValueError:
        return None


def key_entry(
    key: PasswordKey,
    user: str,
    email: str,
    expire_in: float,
    hash_function: str = "sha1",
    *,
    now: datetime | None = None,
    password_length: int | None = None,
) -> dict[str, Any]:
    """Build the ``windows-keys`` JSON object for ``key``.

    Fields: ``userName``, ``modulus``, ``exponent`` (standard base64, big-endian), ``email``, ``expireOn``
    (RFC 3339 UTC with ``Z``, judged by the guest clock), ``addToAdministrators: true``; ``hashFunction``
    only when it is not ``sha1`` (the default, so the entry stays the documented shape for the common case;
    agents too old to know the field answer with SHA-1, which :class:`PasswordReader` falls back to);
    ``passwordLength`` when given.

    Args:
        key: the attempt's key, from :func:`new_key`.
        user: Windows user name to create or reset (no whitespace).
        email: the caller's e-mail (informational for the agent; a service account address is fine).
        expire_in: seconds from ``now`` until the agent must ignore the entry (> 0). Allow for guest clock
            skew and a slow first boot: minutes, not seconds.
        hash_function: OAEP hash: ``sha1``, ``sha256`` or ``sha512``.
        now: current time (aware); defaults to the system clock.
        password_length: ask the agent for a longer password (it uses at least 15, at most 255 characters).

    Returns:
        A JSON-serialisable dict, ready for :func:`merge_windows_keys`.

    Raises:
        ValueError: bad ``user``, ``expire_in``, ``hash_function`` or ``password_length``.
    """
    if not user or any(ch.isspace() for ch in user):
        raise ValueError("user must be non-empty and contain no whitespace")
    if not expire_in > 0:
        raise ValueError("expire_in must be positive seconds")
    if hash_function not in HASH_FUNCTIONS:
        raise ValueError(f"hash_function must be one of {sorted(HASH_FUNCTIONS)}")
    if password_length is not None and not 15 <= password_length <= 255:
        raise ValueError("password_length must be within 15..255")
    current = now if now is not None else datetime.now(UTC)
    entry: dict[str, Any] = {
        "userName": user,
        "modulus": key.modulus,
        "exponent": key.exponent,
        "email": email,
        "expireOn": format_expire_on(current + timedelta(seconds=expire_in)),
        "addToAdministrators": True,
    }
    if hash_function != "sha1":
        entry["hashFunction"] = hash_function
    if password_length is not None:
        entry["passwordLength"] = password_length
    return entry


def _line_expired(line: str, now: datetime) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get("expireOn"), str):
        return False
    when = parse_expire_on(obj["expireOn"])
    return when is not None and when < now


def merge_windows_keys(
    items: Sequence[Mapping[str, Any]],
    entry: Mapping[str, Any],
    *,
    now: datetime | None = None,
    prune_expired: bool = True,
) -> list[dict[str, Any]]:
    """Return new metadata ``items`` with ``entry`` appended as one JSON line to ``windows-keys``.

    Every item other than ``windows-keys`` is copied unchanged (same key, same value string, same order).
    Inside ``windows-keys`` existing lines are kept byte for byte, except that with ``prune_expired`` lines
    whose ``expireOn`` parses and has passed (by ``now``) are dropped, as ``gcloud compute
    reset-windows-password`` does; lines we cannot judge are kept. If the value would exceed the 256 KiB
    metadata limit the oldest lines are dropped until it fits. The item is created (appended last) when
    absent.

    Args:
        items: the instance's metadata items, ``[{"key": str, "value": str}, ...]`` (REST JSON shape).
        entry: the object from :func:`key_entry`.
        now: current time (aware) for pruning; defaults to the system clock.
        prune_expired: drop expired lines from ``windows-keys``.

    Returns:
        A new list of new dicts; ``items`` is not modified.
    """
    current = now if now is not None else datetime.now(UTC)
    line = json.dumps(dict(entry), separators=(",", ":"), ensure_ascii=True)
    out: list[dict[str, Any]] = []
    found = False
    for item in items:
        copy = dict(item)
        if copy.get("key") == WINDOWS_KEYS and not found:
            found = True
            old = str(copy.get("value") or "")
            lines = [ln for ln in old.split("\n") if ln.strip()]
            if prune_expired:
                lines = [ln for ln in lines if not _line_expired(ln, current)]
            while lines and len("\n".join([*lines, line]).encode()) > MAX_METADATA_VALUE_BYTES:
                lines.pop(0)
            copy["value"] = "\n".join([*lines, line])
        out.append(copy)
    if not found:
        out.append({"key": WINDOWS_KEYS, "value": line})
    log.debug("windows-keys: appended an entry for user %s", entry.get("userName"))
    return out


def set_metadata_body(metadata: Mapping[str, Any], entry: Mapping[str, Any], *,
                      now: datetime | None = None) -> dict[str, Any]:
    """Build the ``instances.setMetadata`` request body that adds ``entry``, for a compare-and-swap write.

    The body carries the ``fingerprint`` of the metadata it was computed from, so the API refuses it (HTTP
    412) if anything changed meanwhile; the caller then reads the metadata again and calls this again.
    Compute v1 ``instances.setMetadata`` takes a ``Metadata`` resource.

    Args:
        metadata: the instance's current ``metadata`` as REST JSON: ``{"fingerprint": str, "items": [...]}``
            (``items`` may be missing when empty).
        entry: the object from :func:`key_entry`.
        now: current time for pruning expired lines (see :func:`merge_windows_keys`).

    Returns:
        ``{"fingerprint": <same>, "items": <merged>}`` (plus ``kind`` when the input had it).

    Raises:
        ValueError: ``metadata`` has no ``fingerprint`` (without it the write would not be guarded).
    """
    fingerprint = metadata.get("fingerprint")
    if not fingerprint:
        raise ValueError("metadata has no fingerprint; read the instance first")
    body: dict[str, Any] = {
        "fingerprint": fingerprint,
        "items": merge_windows_keys(list(metadata.get("items") or []), entry, now=now),
    }
    if "kind" in metadata:
        body["kind"] = metadata["kind"]
    return body


def _clean(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= _MAX_AGENT_MESSAGE else text[: _MAX_AGENT_MESSAGE - 1] + "…"


class PasswordReader:
    """Consumes serial port 4 output and yields the password for one key (sans-IO, [background.md] 3).

    Feed it every new chunk of ``getSerialPortOutput(port=4, start=next)``. Chunks may split lines (or UTF-8
    text) anywhere; the unfinished last line is kept for the next call. Lines that are not JSON objects, or
    whose ``modulus`` is not ours, are ignored.

    Args:
        key: the attempt's key.
        hash_function: the ``hashFunction`` requested in :func:`key_entry`. The answer's own
            ``hashFunction`` wins when present; when it is absent and decryption fails, SHA-1 (the protocol
            default) is tried.
        user: the user name asked for, used only in error messages.
    """

    def __init__(self, key: PasswordKey, hash_function: str = "sha1", user: str = "") -> None:
        if hash_function not in HASH_FUNCTIONS:
            raise ValueError(f"hash_function must be one of {sorted(HASH_FUNCTIONS)}")
        self._key = key
        self._hash = hash_function
        self._user = user
        self._partial = ""
        self._done = False

    def __repr__(self) -> str:
        return f"PasswordReader(key={self._key!r}, hash_function={self._hash!r}, done={self._done})"

    __str__ = __repr__

    @property
    def done(self) -> bool:
        """True once our answer has been seen (password returned or error raised)."""
        return self._done

    def feed(self, text: str) -> Password | None:
        """Consume one increment of serial output.

        Args:
            text: the ``contents`` of one ``getSerialPortOutput`` reply (only what is new since the last
                call).

        Returns:
            The decrypted :class:`Password` when this increment completes our answer line, else ``None``.
            After the answer has been returned, further input is ignored and ``None`` is returned.

        Raises:
            AgentError: our line carries ``errorMessage``, or an answer for our modulus cannot be decrypted or
                has neither password nor error. Raised at once; the message holds no secret.
        """
        if self._done:
            return None
        data = self._partial + text
        *lines, self._partial = data.split("\n")
        if len(self._partial) > _MAX_PARTIAL_LINE:
            log.debug("serial port 4: dropping an over-long unterminated line (%d chars)", len(self._partial))
            self._partial = ""
        for raw in lines:
            password = self._line(raw.strip())
            if password is not None:
                self._done = True
                self._partial = ""
                return password
        return None

    def _line(self, line: str) -> Password | None:
        if not line.startswith("{"):
            return None
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("modulus") != self._key.modulus:
            return None
        answered_user = obj.get("userName")
        user = answered_user if isinstance(answered_user, str) else self._user
        message = obj.get("errorMessage")
        if message:
            self._done = True
            log.debug("serial port 4: agent error for key %s", self._key.fingerprint)
            raise AgentError(
                f"the guest agent could not set the password of {user!r}: {_clean(str(message))}",
                "check the guest's serial port 1 log; a new attempt needs a new key",
            )
        encrypted = obj.get("encryptedPassword")
        if not obj.get("passwordFound") or not isinstance(encrypted, str) or not encrypted:
            self._done = True
            raise AgentError(f"the guest agent answered for {user!r} without a password or an error")
        log.debug("serial port 4: answer for key %s", self._key.fingerprint)
        return Password(self._decrypt(encrypted, obj.get("hashFunction"), user))

    def _decrypt(self, encrypted: str, answered_hash: object, user: str) -> str:
        try:
            ciphertext = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):
            self._done = True
            raise AgentError(f"the guest agent's answer for {user!r} is not valid base64") from None
        if isinstance(answered_hash, str) and answered_hash:
            candidates = [answered_hash]
        else:
            candidates = list(dict.fromkeys([self._hash, "sha1"]))
        for name in candidates:
            try:
                return self._key.decrypt(ciphertext, name).decode("utf-8")
            except (ValueError, UnsupportedAlgorithm, UnicodeDecodeError):
                continue
        self._done = True
        raise AgentError(
            f"the guest agent's answer for {user!r} does not decrypt with our key",
            "the agent may use another hashFunction; retry with a new key",
        ) from None
