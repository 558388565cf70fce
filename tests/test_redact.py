"""Secrets registered with winbuilder.redact never reach a log line."""

from __future__ import annotations

import logging

import pytest

from winbuilder import redact


def test_registered_secret_is_masked_in_log_records(caplog: pytest.LogCaptureFixture) -> None:
    redact.add_secret("S3cret&|^")
    redact.add_secret(None)
    redact.add_secret("")
    logger = logging.getLogger("winbuilder.test.redact")
    caplog.handler.addFilter(redact.RedactFilter())
    with caplog.at_level(logging.DEBUG, logger="winbuilder.test.redact"):
        logger.debug("sending %s to %s", "S3cret&|^", "host")
    assert caplog.messages == ["sending *** to host"]
    assert redact.redact("a S3cret&|^ b") == "a *** b"
