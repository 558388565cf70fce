"""The emulated guest's password agent: the Windows side of the GCE password-reset protocol, sans-IO.

It follows the real Google guest agent (``GoogleCloudPlatform/guest-agent``, ``windows_accounts.go``,
``metadata.go``, ``utils.CheckExpired``), not winbuilder's habits, so the client is tested against the
protocol's real edges:

* ``windows-keys`` is split on ``\\n``; each line is decoded on its own and a line that does not decode (bad
  JSON, or a field of the wrong JSON type) is skipped. Field names match case-insensitively (Go's
  ``encoding/json``).
* A key is kept only when ``userName``, ``modulus`` and ``exponent`` are non-empty and ``expireOn`` parses and
  is not before the guest clock. ``expireOn`` parses as Go ``time.RFC3339`` (a zone is required: ``Z`` or
  ``±hh:mm``, optional fractional seconds) or, as the agent's fallback, with a ``±hhmm`` zone. A value without
  a zone, or none at all, counts as expired: the key is dropped silently.
* The agent remembers the keys of the last metadata it processed (its registry): a kept key whose
  ``userName``, ``modulus`` and ``expireOn`` match a remembered one is skipped. The registry is then replaced
  by all kept keys, including those that failed, so a failed key is not retried. (Like the real agent there
  is no de-duplication inside one metadata value, and a key that leaves the metadata and comes back is
  answered again.)
* For each new key: make a password (15 characters, or ``passwordLength`` up to 255, from letters, digits
  and ``~!@#$%^&*_-+=|\\(){}[]:;<>,.?/``, at least 3 of the 4 classes), create or reset the user, then encrypt
  with RSA-OAEP using ``hashFunction`` (default ``sha1``; ``sha256``, ``sha512``; anything else is an error).
  This emulator also makes sure every password holds at least one of ``& | ^ < > %`` (a password the real
  agent can produce too) so that quoting bugs always show.
* It writes one compact JSON line to serial port 4, fields in the agent's order and with Go's omitempty:
  success ``{"encryptedPassword","userName","passwordFound":true,"exponent","modulus","hashFunction"}``;
  failure ``{"errorMessage","userName","exponent","modulus"}`` -- ``passwordFound`` false is *omitted*, as
  the real agent's ``omitempty`` does. Go's HTML-safe escaping of ``< > &`` is reproduced.

Fault hooks, driven by the owner of the agent (the emulated guest or a test): ``fail_next`` makes the next key
fail with that ``errorMessage`` (the password is not set, as when ``resetPwd`` fails); ``delay`` (seconds)
sleeps through the injected ``sleep`` before answering a metadata change, as a slow first boot does.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import padding, rsa

from winbuilder.password import HASH_FUNCTIONS, parse_expire_on

__all__ = ["WindowsKey", "WindowsKeysAgent", "new_password", "parse_windows_keys"]

log = logging.getLogger(__name__)

LOWER: Final = "abcdefghijklmnopqrstuvwxyz"
UPPER: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS: Final = "0123456789"
SPECIAL: Final = "~!@#$%^&*_-+=|\\(){}[]:;<>,.?/"
CMD_METACHARS: Final = "&|^<>%"
MIN_LENGTH: Final = 15
MAX_LENGTH: Final = 255

# windowsKey's string fields, lower-cased (Go matches JSON names case-insensitively).
_STRING_FIELDS: Final = ("email", "expireon", "exponent", "modulus", "username", "hashfunction")


@dataclass(frozen=True)
class WindowsKey:
    """One decoded ``windows-keys`` line, as the agent's ``windowsKey`` struct holds it.

    Attributes:
        user_name, modulus, exponent, expire_on, email, hash_function: the string fields ("" when absent).
        add_to_administrators: ``None`` when absent.
        password_length: 0 when absent.
    """

    user_name: str
    modulus: str
    exponent: str
    expire_on: str
    email: str = ""
    hash_function: str = ""
    add_to_administrators: bool | None = None
    password_length: int = 0

    @property
    def identity(self) -> tuple[str, str, str]:
        """What the agent compares to decide a key was already answered: (userName, modulus, expireOn)."""
        return (self.user_name, self.modulus, self.expire_on)


def _decode_line(line: str) -> WindowsKey | None:
    """Decode one line like Go's ``json.Unmarshal`` into ``windowsKey``; ``None`` when that would fail."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if obj is None:  # Go: unmarshalling null into a struct is a no-op, giving an empty (invalid) key
        return None
    if not isinstance(obj, dict):
        return None
    fields: dict[str, Any] = {}
    for name, value in obj.items():  # case-insensitive; the last duplicate wins, as in Go
        fields[name.lower()] = value
    strings: dict[str, str] = {}
    for name in _STRING_FIELDS:
        value = fields.get(name)
        if value is None:
            strings[name] = ""
        elif isinstance(value, str):
            strings[name] = value
        else:
            return None
    admin = fields.get("addtoadministrators")
    if admin is not None and not isinstance(admin, bool):
        return None
    length = fields.get("passwordlength")
    if length is None:
        length = 0
    elif isinstance(length, bool) or not isinstance(length, int):
        return None
    return WindowsKey(
        user_name=strings["username"],
        modulus=strings["modulus"],
        exponent=strings["exponent"],
        expire_on=strings["expireon"],
        email=strings["email"],
        hash_function=strings["hashfunction"],
        add_to_administrators=admin,
        password_length=length,
    )


def parse_windows_keys(value: str, now: datetime) -> list[WindowsKey]:
    """Decode a ``windows-keys`` metadata value into the keys the agent would act on, in order.

    Args:
        value: the metadata value (one JSON object per line).
        now: the guest clock (aware; a naive value is taken as UTC).

    Returns:
        Keys with non-empty userName/modulus/exponent and an ``expireOn`` that parses and has not passed.
    """
    current = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    keys: list[WindowsKey] = []
    for line in value.split("\n"):
        key = _decode_line(line)
        if key is None:
            if line.strip():
                log.debug("windows-keys: skipping a line that does not decode")
            continue
        if not (key.user_name and key.modulus and key.exponent):
            continue
        expires = parse_expire_on(key.expire_on)
        if expires is None or expires < current:
            log.debug("windows-keys: skipping an expired or unparseable key for %s", key.user_name)
            continue
        keys.append(key)
    return keys


def new_password(length: int = 0) -> str:
    """Make a password like the agent's ``newPwd``, with at least one ``cmd.exe`` metacharacter.

    Args:
        length: requested length; values below 15 give 15, values above 255 give 255.

    Returns:
        A random password from letters, digits and the agent's special set, with at least 3 of the 4 character
        classes and at least one of ``& | ^ < > %``.
    """
    size = min(max(length, MIN_LENGTH), MAX_LENGTH)
    alphabet = LOWER + UPPER + DIGITS + SPECIAL
    while True:
        chars = [secrets.choice(alphabet) for _ in range(size)]
        if not any(ch in CMD_METACHARS for ch in chars):
            chars[secrets.randbelow(size)] = secrets.choice(CMD_METACHARS)
        classes = sum(any(ch in group for ch in chars) for group in (LOWER, UPPER, DIGITS, SPECIAL))
        if classes >= 3:
            return "".join(chars)


def _go_json(fields: list[tuple[str, Any]]) -> str:
    """Compact JSON as Go's ``json.Marshal`` writes it (HTML-safe escaping, non-ASCII kept)."""
    text = json.dumps(dict(fields), separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


class _KeyFailure(Exception):
    """An error the agent reports as ``errorMessage``."""


def _encrypt(key: WindowsKey, password: str) -> tuple[str, str]:
    """Return (base64 ciphertext, hash name) like ``createcredsJSON``; raises _KeyFailure with the Go text."""
    try:
        modulus = base64.b64decode(key.modulus, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _KeyFailure(f"error decoding modulus: {exc}") from None
    try:
        exponent = base64.b64decode(key.exponent, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _KeyFailure(f"error decoding exponent: {exc}") from None
    name = key.hash_function or "sha1"
    algorithm = HASH_FUNCTIONS.get(name)
    if algorithm is None:
        raise _KeyFailure(f"unknown hash function requested: {json.dumps(name)}")
    try:
        numbers = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
        public = numbers.public_key()
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm=algorithm()), algorithm=algorithm(), label=None)
        ciphertext = public.encrypt(password.encode("utf-8"), oaep)
    except ValueError as exc:
        raise _KeyFailure(f"error encrypting password: {exc}") from None
    return base64.b64encode(ciphertext).decode("ascii"), name


class WindowsKeysAgent:
    """The guest agent's account manager for one emulated Windows guest.

    Args:
        serial: writes text to serial port 4 (each answer is one line ending in ``\\n``).
        set_password: ``(user, password)`` creates the user or resets its password; raising makes the key fail
            with ``errorMessage`` "error running resetPwd: <exception text>".
        now: the guest clock (aware datetime), used for ``expireOn``.
        delay: seconds to wait (through ``sleep``) before answering a metadata change that holds new keys.
        sleep: how to wait; ``time.sleep`` by default.

    Attributes:
        fail_next: when set, the next new key fails with this ``errorMessage`` (before the password is set);
            it is cleared once used.
        delay: see Args; may be changed at any time.
    """

    def __init__(self, serial: Callable[[str], None], set_password: Callable[[str, str], None],
                 now: Callable[[], datetime], *, delay: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._serial = serial
        self._set_password = set_password
        self._now = now
        self._sleep = sleep
        self._registry: list[WindowsKey] = []
        self.fail_next: str | None = None
        self.delay = delay

    def __repr__(self) -> str:
        return f"WindowsKeysAgent(registry={len(self._registry)} keys, delay={self.delay})"

    def on_metadata(self, windows_keys_value: str) -> list[str]:
        """Process the current ``windows-keys`` value (call it whenever the metadata changes).

        Args:
            windows_keys_value: the whole metadata value ("" when the key is absent).

        Returns:
            The JSON lines written to serial port 4 (without newlines), one per new key, in metadata order.
        """
        keys = parse_windows_keys(windows_keys_value, self._now())
        seen = {key.identity for key in self._registry}
        to_add = [key for key in keys if key.identity not in seen]
        if to_add and self.delay > 0:
            self._sleep(self.delay)
        lines = [self._answer(key) for key in to_add]
        self._registry = keys
        return lines

    def _answer(self, key: WindowsKey) -> str:
        try:
            encrypted, hash_name = self._create_or_reset(key)
        except _KeyFailure as exc:
            log.debug("windows-keys: error setting the password of %s: %s", key.user_name, exc)
            line = _go_json([("errorMessage", str(exc)), ("userName", key.user_name),
                             ("exponent", key.exponent), ("modulus", key.modulus)])
        else:
            line = _go_json([("encryptedPassword", encrypted), ("userName", key.user_name),
                             ("passwordFound", True), ("exponent", key.exponent), ("modulus", key.modulus),
                             ("hashFunction", hash_name)])
        self._serial(line + "\n")
        return line

    def _create_or_reset(self, key: WindowsKey) -> tuple[str, str]:
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise _KeyFailure(message)
        password = new_password(key.password_length)
        log.debug("windows-keys: creating or resetting user %s", key.user_name)
        try:
            self._set_password(key.user_name, password)
        except Exception as exc:  # the caller's user store failed: reported like resetPwd's error
            raise _KeyFailure(f"error running resetPwd: {exc}") from None
        return _encrypt(key, password)
