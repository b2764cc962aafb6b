"""configure_logging's filter masks passwords in URLs, with or without a user name."""

from __future__ import annotations

import logging

import pytest

from directord.log import _MaskSecrets


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://alice:s3cret@h/0?prefix=x", "rediss://alice:***@h/0?prefix=x"),
        ("amqp://guest:s3cret@h:5672/", "amqp://guest:***@h:5672/"),
        ("http://h:8080/path", "http://h:8080/path"),
        ("redis://alice@h/0", "redis://alice@h/0"),
    ],
)
def test_url_passwords_are_masked(text: str, masked: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "datastore %s", (text,), None)
    assert _MaskSecrets().filter(record)
    assert record.getMessage() == f"datastore {masked}"
    inline = logging.LogRecord("t", logging.INFO, __file__, 1, f"at {text} now", None, None)
    _MaskSecrets().filter(inline)
    assert inline.getMessage() == f"at {masked} now"
