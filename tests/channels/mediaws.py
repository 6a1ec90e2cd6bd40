"""Reading a media stream (JSON chunks and binary frames) from the real server's WebSocket."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from streamplex.server.protocol import parse_server_binary


@dataclass
class MediaStream:
    """What one stream id received, in order: ("json", seq, data) or ("binary", seq, payload), with arrival times."""

    items: list[tuple[str, int, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    end: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def json(self) -> list[Any]:
        return [data for kind, _, data in self.items if kind == "json"]

    @property
    def binary(self) -> list[bytes]:
        return [data for kind, _, data in self.items if kind == "binary"]


async def read_stream(ws: websockets.ClientConnection, stream_id: str, timeout: float = 60) -> MediaStream:
    """Every chunk and binary frame of `stream_id` until its `end` (or an `error` for it); checks seq runs 0, 1, 2, ..."""
    out = MediaStream()
    async with asyncio.timeout(timeout):
        while out.end is None and out.error is None:
            message = await ws.recv()
            if isinstance(message, bytes):
                sid, seq, payload = parse_server_binary(message)
                if sid == stream_id:
                    out.items.append(("binary", seq, payload))
                    out.arrivals.append(time.monotonic())
                continue
            frame = orjson.loads(message)
            if frame.get("id") != stream_id:
                continue
            if frame["op"] == "chunk":
                out.items.append(("json", frame["seq"], frame["data"]))
                out.arrivals.append(time.monotonic())
            elif frame["op"] == "end":
                out.end = frame
            elif frame["op"] == "error":
                out.error = frame
    assert [seq for _, seq, _ in out.items] == list(range(len(out.items)))
    return out
