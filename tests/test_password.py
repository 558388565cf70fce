"""Client side of the GCE Windows password reset, round-tripped through the emulated guest agent."""

from __future__ import annotations

import base64
import json
import logging
import pickle
import random
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from winbuilder.emulator.agent import WindowsKeysAgent
from winbuilder.errors import CloudError, ExitCode
from winbuilder.password import (
    WINDOWS_KEYS,
    AgentError,
    Password,
    PasswordKey,
    PasswordReader,
    key_entry,
    merge_windows_keys,
    new_key,
    parse_expire_on,
    set_metadata_body,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def key() -> PasswordKey:
    return new_key()


class Guest:
    """An in-process guest: the agent writes serial port 4 into a string, passwords into a dict."""

    def __init__(self, now: datetime = NOW) -> None:
        self.serial = ""
        self.passwords: dict[str, str] = {}
        self.clock = now
        self.agent = WindowsKeysAgent(self._write, self.passwords.__setitem__, lambda: self.clock)

    def _write(self, text: str) -> None:
        self.serial += text


def pem(key: PasswordKey) -> str:
    return key._private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def feed_in_random_splits(reader: PasswordReader, text: str, rng: random.Random) -> Password | None:
    result = None
    pos = 0
    while pos < len(text):
        step = rng.randint(1, 40)
        got = reader.feed(text[pos:pos + step])
        pos += step
        if got is not None:
            assert result is None
            result = got
    return result


def round_trip(key: PasswordKey, hash_function: str, seed: int) -> tuple[Guest, Password | None]:
    guest = Guest()
    guest.serial = "boot noise\nnot json {\n" + json.dumps({"modulus": "b3RoZXI=", "passwordFound": True}) + "\n"
    entry = key_entry(key, "builder", "ci@example.com", 600, hash_function, now=NOW)
    items = merge_windows_keys([{"key": "other", "value": "x"}], entry, now=NOW)
    value = next(item["value"] for item in items if item["key"] == WINDOWS_KEYS)
    guest.agent.on_metadata(value)
    reader = PasswordReader(key, hash_function, user="builder")
    return guest, feed_in_random_splits(reader, guest.serial + "trailing partial", random.Random(seed))


@pytest.mark.parametrize("hash_function", ["sha1", "sha256", "sha512"])
def test_round_trip_each_hash(key: PasswordKey, hash_function: str) -> None:
    for seed in range(3):
        guest, password = round_trip(key, hash_function, seed)
        assert password is not None
        assert password.reveal() == guest.passwords["builder"]
        answer = json.loads(guest.serial.splitlines()[-1])
        assert answer["hashFunction"] == hash_function


def test_key_entry_shape(key: PasswordKey) -> None:
    entry = key_entry(key, "builder", "ci@example.com", 300, now=NOW)
    assert entry == {
        "userName": "builder",
        "modulus": key.modulus,
        "exponent": "AQAB",
        "email": "ci@example.com",
        "expireOn": "2024-05-01T12:05:00Z",
        "addToAdministrators": True,
    }
    modulus = base64.b64decode(key.modulus, validate=True)
    assert len(modulus) == 256 and modulus[0] & 0x80
    assert key._private_key.public_key().public_numbers().n == int.from_bytes(modulus, "big")
    assert key_entry(key, "u", "e", 1, "sha512", now=NOW, password_length=30)["hashFunction"] == "sha512"
    with pytest.raises(ValueError):
        key_entry(key, "a b", "e", 60)
    with pytest.raises(ValueError):
        key_entry(key, "u", "e", 0)
    with pytest.raises(ValueError):
        key_entry(key, "u", "e", 60, "md5")
    with pytest.raises(ValueError):
        key_entry(key, "u", "e", 60, password_length=10)


def test_fresh_key_each_time() -> None:
    assert new_key().modulus != new_key().modulus


def test_error_message_surfaces_at_once(key: PasswordKey) -> None:
    guest = Guest()
    guest.agent.fail_next = "error running resetPwd: access denied"
    guest.agent.on_metadata(json.dumps(key_entry(key, "builder", "e", 600, now=NOW)))
    assert "passwordFound" not in guest.serial  # the real agent omits false
    reader = PasswordReader(key, user="builder")
    with pytest.raises(AgentError) as info:
        reader.feed(guest.serial)
    assert "access denied" in str(info.value) and "builder" in str(info.value)
    assert isinstance(info.value, CloudError) and info.value.exit_code == ExitCode.CONNECTION
    assert reader.done and reader.feed("more\n") is None


def test_other_moduli_ignored(key: PasswordKey) -> None:
    other = new_key()
    guest = Guest()
    guest.agent.fail_next = "boom"
    guest.agent.on_metadata(json.dumps(key_entry(other, "someone", "e", 600, now=NOW)))
    guest.agent.on_metadata(json.dumps(key_entry(key, "builder", "e", 600, now=NOW)))
    reader = PasswordReader(key)
    lines = guest.serial.splitlines(keepends=True)
    assert reader.feed(lines[0]) is None  # the other key's error is not ours
    password = reader.feed(lines[1])
    assert password is not None and password.reveal() == guest.passwords["builder"]


def test_unusable_answers_raise(key: PasswordKey) -> None:
    line = {"modulus": key.modulus, "userName": "u", "passwordFound": True}
    with pytest.raises(AgentError, match="without a password"):
        PasswordReader(key).feed(json.dumps(line) + "\n")
    bad = base64.b64encode(b"\0" * 256).decode()
    with pytest.raises(AgentError, match="does not decrypt"):
        PasswordReader(key).feed(json.dumps(line | {"encryptedPassword": bad}) + "\n")
    with pytest.raises(AgentError, match="base64"):
        PasswordReader(key).feed(json.dumps(line | {"encryptedPassword": "%%%"}) + "\n")


def test_old_agent_without_hash_function_falls_back_to_sha1(key: PasswordKey) -> None:
    guest = Guest()
    guest.agent.on_metadata(json.dumps(key_entry(key, "builder", "e", 600, now=NOW)))  # sha1 on the wire
    answer = json.loads(guest.serial)
    del answer["hashFunction"]
    password = PasswordReader(key, "sha256").feed(json.dumps(answer) + "\r\n")
    assert password is not None and password.reveal() == guest.passwords["builder"]


def test_merge_keeps_other_items_byte_for_byte(key: PasswordKey) -> None:
    odd = "line1\r\n  spaced  \n\u00e9\u2028{\"json\": true}\n"
    expired = json.dumps({"userName": "old", "modulus": "m", "exponent": "AQAB",
                          "expireOn": "2024-05-01T11:00:00Z"})
    junk = "not json at all"
    keep = json.dumps({"userName": "x", "modulus": "m2", "exponent": "AQAB", "expireOn": "2024-05-01T13:00:00Z"})
    items = [{"key": "startup", "value": odd}, {"key": WINDOWS_KEYS, "value": f"{expired}\n{junk}\n{keep}"},
             {"key": "empty", "value": ""}, {"key": "novalue"}]
    before = json.loads(json.dumps(items))
    entry = key_entry(key, "builder", "e", 600, now=NOW)
    merged = merge_windows_keys(items, entry, now=NOW)
    assert items == before  # input untouched
    assert [item["key"] for item in merged] == ["startup", WINDOWS_KEYS, "empty", "novalue"]
    assert merged[0] == {"key": "startup", "value": odd} and merged[2:] == before[2:]
    assert merged[1]["value"].split("\n") == [junk, keep, json.dumps(entry, separators=(",", ":"))]
    unpruned = merge_windows_keys(items, entry, now=NOW, prune_expired=False)
    assert unpruned[1]["value"].startswith(expired + "\n")
    created = merge_windows_keys([{"key": "a", "value": "b"}], entry, now=NOW)
    assert created[0] == {"key": "a", "value": "b"} and json.loads(created[1]["value"]) == entry


def test_merge_trims_oldest_lines_to_the_metadata_limit(key: PasswordKey) -> None:
    filler = json.dumps({"pad": "x" * 1000})
    items = [{"key": WINDOWS_KEYS, "value": "\n".join([filler] * 300)}]
    merged = merge_windows_keys(items, key_entry(key, "u", "e", 60, now=NOW), now=NOW)
    value = merged[0]["value"]
    assert len(value.encode()) <= 256 * 1024 and json.loads(value.split("\n")[-1])["modulus"] == key.modulus


def test_set_metadata_body_keeps_fingerprint(key: PasswordKey) -> None:
    metadata = {"kind": "compute#metadata", "fingerprint": "abc=", "items": [{"key": "k", "value": "v"}]}
    body = set_metadata_body(metadata, key_entry(key, "u", "e", 60, now=NOW), now=NOW)
    assert body["fingerprint"] == "abc=" and body["kind"] == "compute#metadata"
    assert body["items"][0] == {"key": "k", "value": "v"} and body["items"][1]["key"] == WINDOWS_KEYS
    assert set_metadata_body({"fingerprint": "f"}, {"userName": "u"})["items"][0]["key"] == WINDOWS_KEYS
    with pytest.raises(ValueError):
        set_metadata_body({"items": []}, {})


@pytest.mark.parametrize(("value", "expected"), [
    ("2024-05-01T12:00:00Z", NOW),
    ("2024-05-01T12:00:00.123456789Z", NOW.replace(microsecond=123456)),
    ("2024-05-01T14:00:00+02:00", NOW),
    ("2024-05-01T07:30:00-0430", NOW),
    ("2024-05-01T12:00:00", None),
    ("2024-05-01 12:00:00Z", None),
    ("2024-02-30T12:00:00Z", None),
    ("2024-05-01T12:00:00+25:00", None),
    ("", None),
])
def test_parse_expire_on(value: str, expected: datetime | None) -> None:
    assert parse_expire_on(value) == expected


def test_reader_keeps_partial_lines_and_drops_huge_garbage(key: PasswordKey) -> None:
    guest = Guest()
    guest.agent.on_metadata(json.dumps(key_entry(key, "builder", "e", 600, now=NOW)))
    reader = PasswordReader(key)
    assert reader.feed("x" * (1024 * 1024 + 10)) is None  # no newline: dropped, not buffered forever
    assert reader.feed("\n") is None
    half = len(guest.serial) // 2
    assert reader.feed(guest.serial[:half]) is None
    password = reader.feed(guest.serial[half:])
    assert password is not None and password == Password(guest.passwords["builder"])


def test_no_secret_in_repr_str_or_logs(key: PasswordKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guest, password = round_trip(key, "sha256", 7)
    assert password is not None
    secret = password.reveal()
    private_pem = pem(key)
    body = private_pem.splitlines()[1]  # a line of base64 key material
    ciphertext = json.loads(guest.serial.splitlines()[-1])["encryptedPassword"]
    reader = PasswordReader(key, "sha256", user="builder")
    reader.feed(guest.serial[:-5])  # holds a partial answer line
    texts = [repr(password), str(password), f"{password}", f"{password!r}", repr(key), str(key), repr(reader),
             str(reader), repr(guest.agent), repr([password, key]), caplog.text]
    guest.agent.fail_next = "nope"
    guest.agent.on_metadata(json.dumps(key_entry(key, "builder", "e", 900, now=NOW)))
    with pytest.raises(AgentError) as info:
        PasswordReader(key).feed(guest.serial.splitlines(keepends=True)[-1])
    texts += [str(info.value), repr(info.value), caplog.text]
    for text in texts:
        assert secret not in text
        assert body not in text
        assert ciphertext not in text
    assert "***" in repr(password)
    with pytest.raises(TypeError):
        pickle.dumps(password)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        hash(password)


def test_expire_in_is_seconds_from_now(key: PasswordKey) -> None:
    entry = key_entry(key, "u", "e", 90.5, now=NOW + timedelta(hours=1))
    assert entry["expireOn"] == "2024-05-01T13:01:30Z"
