"""Keeping API keys out of log records: the WebSocket layer logs handshake headers and frames at DEBUG level."""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
# A key-carrying name (header or JSON field, quoted or escaped or not), its separator, an optional scheme, then the secret.
_SECRET = re.compile(r"(?i)((?:x-api-key|api[_-]key|authorization)\\?['\"]?\s*[:=,]\s*\\?['\"]?(?:(?:bearer|basic|token)\s+)?)[^\s'\"\\,}\]&]+")


def redact(text: str) -> str:
    """`text` with every API key or bearer token it carries replaced by `[redacted]`."""
    return _SECRET.sub(rf"\1{REDACTED}", text)


class RedactKeys(logging.Filter):
    """A handler filter that rewrites a record's message without the keys in it (the record still goes out)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
