"""A logging handler that keeps the server's recent records in a ring buffer and publishes each one live."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LOGS_TOPIC = "logs"
MAX_MESSAGE_CHARS = 8192


class LogRecordModel(BaseModel):
    """A log record as a node publishes it (`RingLogHandler._entry` plus its number `n`)."""

    model_config = ConfigDict(extra="ignore")

    time: str = Field(max_length=64)
    level: str = Field(max_length=32)
    levelno: int = Field(ge=0, le=1000)
    logger: str = Field(max_length=512)
    message: str = Field(max_length=MAX_MESSAGE_CHARS + 64)
    node: str = Field(max_length=256)
    n: int = Field(ge=0)


def check_record(message: Any) -> dict[str, Any]:
    """Another node's log record with exactly the fields a record has; raises pydantic's ValidationError otherwise."""
    return LogRecordModel.model_validate(message).model_dump()


class RingLogHandler(logging.Handler):
    """Implements streamplex.server.channel.LogSource. Records marked `extra={"secret": True}` are never kept."""

    topic = LOGS_TOPIC

    def __init__(self, capacity: int, node: str) -> None:
        super().__init__()
        self.node = node
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publish: Callable[[str, Any], None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, publish: Callable[[str, Any], None]) -> None:
        """Publish records live through `publish(topic, record)` on `loop` from now on."""
        self._loop, self._publish = loop, publish

    def detach(self) -> None:
        """Stop publishing live records."""
        self._loop = self._publish = None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "secret", False):
            return
        try:
            entry = self._entry(record)
        except Exception:
            self.handleError(record)
            return
        with self._lock:
            self._count += 1
            entry["n"] = self._count
            self._ring.append(entry)
        loop, publish = self._loop, self._publish
        if loop is not None and publish is not None and not loop.is_closed():
            loop.call_soon_threadsafe(publish, self.topic, entry)

    def _entry(self, record: logging.LogRecord) -> dict[str, Any]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"... [{len(message) - MAX_MESSAGE_CHARS} chars cut]"
        return {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "levelno": record.levelno,
            "logger": record.name,
            "message": message,
            "node": self.node,
        }

    def recent(self) -> list[dict[str, Any]]:
        """A copy of the buffered records, oldest first."""
        with self._lock:
            return list(self._ring)
