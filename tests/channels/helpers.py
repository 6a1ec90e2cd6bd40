"""Running a channel's stream directly, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from channels.base import Channel, Services, StreamContext
from server.broker import MemoryBroker
from server.config import Settings
from server.hub import Hub
from server.logbuffer import RingLogHandler


def make(cls: type[Channel], **settings: Any) -> Channel:
    s = Settings(api_keys="k", chat_model="", **settings)
    return cls(Services(settings=s, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict))


async def run(channel: Channel, params: dict[str, Any], start: int = 0) -> list[Any]:
    """The chunks of one stream; with `start`, as another node sends them going on after the client's first `start`."""
    parsed = channel.parse(params)
    return [chunk async for chunk in channel.stream(parsed, StreamContext("s", asyncio.Queue(), start=start))]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
