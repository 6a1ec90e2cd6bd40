"""Redaction of API keys in log records."""

from __future__ import annotations

import logging

import pytest

from streamplex.server.redact import RedactKeys, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("< x-api-key: sk-1", "< x-api-key: [redacted]"),
        ("< X-Api-Key:sk-1", "< X-Api-Key:[redacted]"),
        ("< authorization: Bearer sk-1", "< authorization: Bearer [redacted]"),
        ("< Authorization: Basic dXNlcjpwdw==", "< Authorization: Basic [redacted]"),
        ("""< TEXT '{"op": "auth", "api_key": "sk-1"}' [35 bytes]""", """< TEXT '{"op": "auth", "api_key": "[redacted]"}' [35 bytes]"""),
        ('{\\"api_key\\":\\"sk-1\\"}', '{\\"api_key\\":\\"[redacted]\\"}'),
        ("[('x-api-key', 'sk-1'), ('host', 'h')]", "[('x-api-key', '[redacted]'), ('host', 'h')]"),
        ("/path?api_key=sk-1&b=2", "/path?api_key=[redacted]&b=2"),
        ("authentication failed from 127.0.0.1", "authentication failed from 127.0.0.1"),
        ("session abc subscribed s1 to text", "session abc subscribed s1 to text"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_filter_rewrites_formatted_records() -> None:
    record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, "< %s", ("x-api-key: sk-secret",), None)
    assert RedactKeys().filter(record) is True
    assert record.getMessage() == "< x-api-key: [redacted]"
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "nothing %d", (1,), None)
    RedactKeys().filter(plain)
    assert plain.getMessage() == "nothing 1" and plain.args == (1,)
