"""The emulated guest password agent follows the real agent's protocol (dedup, expiry, OAEP, errorMessage)."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from winbuilder.emulator.agent import SPECIAL, WindowsKeysAgent, new_password, parse_windows_keys

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - the protocol default OAEP hash
    "sha256": hashes.SHA256(),
    "sha512": hashes.SHA512(),
}


@pytest.fixture(scope="module")
def private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(value: int) -> str:
    return base64.b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).decode()


def entry(private: rsa.RSAPrivateKey, user: str = "builder", expire: str = "2024-05-01T12:10:00Z",
          **extra: object) -> dict[str, object]:
    numbers = private.public_key().public_numbers()
    return {"userName": user, "modulus": b64(numbers.n), "exponent": b64(numbers.e), "email": "e@x",
            "expireOn": expire} | extra


def decrypt(private: rsa.RSAPrivateKey, answer: dict[str, object], name: str = "sha1") -> str:
    algorithm = HASHES[name]
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=algorithm), algorithm=algorithm, label=None)
    return private.decrypt(base64.b64decode(str(answer["encryptedPassword"])), oaep).decode()


class Guest:
    def __init__(self, **kwargs: object) -> None:
        self.serial: list[str] = []
        self.passwords: dict[str, str] = {}
        self.clock = NOW
        self.sleeps: list[float] = []
        self.agent = WindowsKeysAgent(self.serial.append, self.passwords.__setitem__, lambda: self.clock,
                                      sleep=self.sleeps.append, **kwargs)  # type: ignore[arg-type]

    def answers(self) -> list[dict[str, object]]:
        assert all(chunk.endswith("\n") and chunk.count("\n") == 1 for chunk in self.serial)
        return [json.loads(chunk) for chunk in self.serial]


@pytest.mark.parametrize("name", ["", "sha1", "sha256", "sha512"])
def test_answer_decrypts_to_the_password_set(private: rsa.RSAPrivateKey, name: str) -> None:
    guest = Guest()
    extra = {"hashFunction": name} if name else {}
    lines = guest.agent.on_metadata(json.dumps(entry(private, **extra)))
    [answer] = guest.answers()
    assert lines == [guest.serial[0].rstrip("\n")]
    assert list(answer) == ["encryptedPassword", "userName", "passwordFound", "exponent", "modulus", "hashFunction"]
    assert answer["passwordFound"] is True and answer["userName"] == "builder"
    assert answer["modulus"] == entry(private)["modulus"] and answer["hashFunction"] == (name or "sha1")
    assert decrypt(private, answer, name or "sha1") == guest.passwords["builder"]


def test_repeated_key_answered_once_new_expiry_answered_again(private: rsa.RSAPrivateKey) -> None:
    guest = Guest()
    value = json.dumps(entry(private))
    guest.agent.on_metadata(value)
    guest.agent.on_metadata(value)
    guest.agent.on_metadata(value + "\n" + json.dumps(entry(private, user="other")))
    assert [a["userName"] for a in guest.answers()] == ["builder", "other"]
    guest.agent.on_metadata(json.dumps(entry(private, expire="2024-05-01T12:20:00Z")))
    assert len(guest.answers()) == 3
    first = guest.passwords["builder"]
    assert decrypt(private, guest.answers()[2]) == first  # the reset overwrote the earlier password


def test_field_names_match_case_insensitively(private: rsa.RSAPrivateKey) -> None:
    guest = Guest()
    raw = {key.upper(): value for key, value in entry(private).items()}
    guest.agent.on_metadata(json.dumps(raw))
    assert guest.answers()[0]["userName"] == "builder"


@pytest.mark.parametrize("expire", [
    "2024-05-01T11:59:59Z",          # past by the guest clock
    "2024-05-01T12:10:00",           # no zone: unparseable, dropped
    "2024-05-01 12:10:00Z",          # not RFC 3339
    "tomorrow",
    "",
])
def test_past_or_unparseable_expiry_ignored(private: rsa.RSAPrivateKey, expire: str) -> None:
    guest = Guest()
    assert guest.agent.on_metadata(json.dumps(entry(private, expire=expire))) == []
    assert guest.serial == [] and guest.passwords == {}


def test_expiry_is_judged_by_the_guest_clock(private: rsa.RSAPrivateKey) -> None:
    guest = Guest()
    guest.clock = NOW + timedelta(hours=1)
    assert guest.agent.on_metadata(json.dumps(entry(private))) == []
    guest.clock = NOW
    assert len(guest.agent.on_metadata(json.dumps(entry(private, expire="2024-05-01T13:59:59+02:00")))) == 0
    assert len(guest.agent.on_metadata(json.dumps(entry(private, expire="2024-05-01T14:10:00+0200")))) == 1


def test_bad_lines_skipped(private: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = json.dumps(entry(private))
    bad = ["{not json", "[]", "null", json.dumps(entry(private, user=5)),  # type: ignore[arg-type]
           json.dumps(entry(private, passwordLength="20")), json.dumps(entry(private, addToAdministrators="yes")),
           json.dumps(entry(private, user="")), json.dumps({k: v for k, v in entry(private).items()
                                                           if k != "exponent"})]
    guest = Guest()
    guest.agent.on_metadata("\n".join([*bad, good, ""]))
    assert len(guest.answers()) == 1


def test_error_lines(private: rsa.RSAPrivateKey) -> None:
    guest = Guest()
    guest.agent.fail_next = "error running resetPwd: <access & denied>"
    guest.agent.on_metadata(json.dumps(entry(private)))
    assert guest.passwords == {} and guest.agent.fail_next is None
    raw = guest.serial[0]
    assert "\\u003caccess \\u0026 denied\\u003e" in raw  # Go's HTML-safe escaping
    [answer] = guest.answers()
    assert list(answer) == ["errorMessage", "userName", "exponent", "modulus"]  # passwordFound false omitted
    assert answer["errorMessage"] == "error running resetPwd: <access & denied>"
    # the failed key is remembered, not retried
    guest.agent.on_metadata(json.dumps(entry(private)))
    assert len(guest.serial) == 1


def test_encryption_failures_after_the_password_was_set(private: rsa.RSAPrivateKey) -> None:
    guest = Guest()
    value = "\n".join([
        json.dumps(entry(private, user="a", hashFunction="md5")),
        json.dumps(entry(private, user="b", modulus="@@not base64@@")),
        json.dumps(entry(private, user="c", exponent="AQAB", modulus=b64(12345))),
    ])
    guest.agent.on_metadata(value)
    answers = guest.answers()
    assert [a["userName"] for a in answers] == ["a", "b", "c"]
    assert answers[0]["errorMessage"] == 'unknown hash function requested: "md5"'
    assert str(answers[1]["errorMessage"]).startswith("error decoding modulus")
    assert str(answers[2]["errorMessage"]).startswith("error encrypting password")
    assert all("passwordFound" not in a for a in answers)
    assert set(guest.passwords) == {"a", "b", "c"}  # as on the real agent, the reset happened first


def test_set_password_failure_reported(private: rsa.RSAPrivateKey) -> None:
    def refuse(user: str, password: str) -> None:
        raise RuntimeError("the account is locked")

    serial: list[str] = []
    agent = WindowsKeysAgent(serial.append, refuse, lambda: NOW)
    agent.on_metadata(json.dumps(entry(private)))
    assert json.loads(serial[0])["errorMessage"] == "error running resetPwd: the account is locked"


def test_slow_agent_waits_only_when_answering(private: rsa.RSAPrivateKey) -> None:
    guest = Guest(delay=2.5)
    guest.agent.on_metadata("")
    assert guest.sleeps == []
    guest.agent.on_metadata(json.dumps(entry(private)))
    guest.agent.on_metadata(json.dumps(entry(private)))
    assert guest.sleeps == [2.5] and len(guest.serial) == 1


@pytest.mark.parametrize("length", [0, 15, 16, 40, 255, 300])
def test_passwords_meet_windows_complexity(length: int) -> None:
    for _ in range(20):
        password = new_password(length)
        assert len(password) == min(max(length, 15), 255)
        classes = [any(c.islower() for c in password), any(c.isupper() for c in password),
                   any(c.isdigit() for c in password), any(c in SPECIAL for c in password)]
        assert sum(classes) >= 3
        assert any(c in "&|^<>%" for c in password)
        assert set(password) <= set(SPECIAL) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def test_password_length_honoured(private: rsa.RSAPrivateKey) -> None:
    guest = Guest()
    guest.agent.on_metadata(json.dumps(entry(private, passwordLength=40)))
    assert len(guest.passwords["builder"]) == 40


def test_parse_windows_keys_naive_clock_is_utc(private: rsa.RSAPrivateKey) -> None:
    keys = parse_windows_keys(json.dumps(entry(private)), NOW.replace(tzinfo=None))
    assert [k.user_name for k in keys] == ["builder"] and keys[0].add_to_administrators is None


def test_no_password_in_logs(private: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guest = Guest()
    guest.agent.on_metadata(json.dumps(entry(private)))
    assert guest.passwords["builder"] not in caplog.text + repr(guest.agent)
