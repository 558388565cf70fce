"""Defence in depth for secrets in logs: every known secret is replaced with ``***`` in log records.

Secrets are never logged on purpose; this catches an accident (a library that logs a request, an exception text).
Register a secret as soon as it is known: the CLI registers the given password, the Compute Engine steps the one
the guest agent returns.
"""

from __future__ import annotations

import logging
import threading

_secrets: set[str] = set()
_lock = threading.Lock()
MASK = "***"


def add_secret(value: str | None) -> None:
    """Register ``value`` so that log records containing it are masked. Empty values are ignored."""
    if value:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactFilter(logging.Filter):
    """A logging filter that masks registered secrets in the formatted message of each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
