"""Running a channel's stream directly, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Channel, Services, StreamContext
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler


def make(cls: type[Channel], **settings: Any) -> Channel:
    s = Settings(api_keys="k", chat_model="", **settings)
    return cls(Services(settings=s, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict))


async def run(channel: Channel, params: dict[str, Any], start: int = 0) -> list[Any]:
    """The chunks of one stream; with `start`, as another node sends them going on after the client's first `start`."""
    parsed = channel.parse(params)
    return [chunk async for chunk in channel.stream(parsed, StreamContext("s", asyncio.Queue(), start=start))]


async def assert_goes_on_from_every_chunk(channel: Channel, params: dict[str, Any], whole: list[Any]) -> None:
    """Going on after any chunk n sends the uninterrupted run's chunks from n; the last chunk's `duration_ms`
    (wall time, the one field that differs between any two runs) is left out of the comparison."""
    whole[-1].pop("duration_ms")
    for n in range(1, len(whole) + 1):
        again = await run(channel, params, start=n)
        if again:
            again[-1].pop("duration_ms")
        assert again == whole[n:], n


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
