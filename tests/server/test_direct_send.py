"""The direct send path over a real uvicorn server in this process: frames go out through `DirectProtocol.try_send`;
while the transport is paused they fall back to the ASGI send through the writer, in order; a transport paused too
long is closed as a slow consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import uvicorn
import websockets
from websockets.frames import Frame, Opcode

from streamplex.server.app import App, create_app
from streamplex.server.config import Settings
from streamplex.server.protocol import CloseCode
from streamplex.server.wsprotocol import DirectProtocol, LazyDeflate, frame_header
from tests.server.test_ws import closed_with
from tests.serverproc import KEY, free_port, recv, send


@dataclass
class Live:
    """An in-process server whose `try_send` calls are recorded as (protocol, sent)."""

    app: App
    url: str
    calls: list[tuple[DirectProtocol, bool]] = field(default_factory=list)

    async def connect(self, **kwargs: Any) -> websockets.ClientConnection:
        ws = await websockets.connect(self.url, additional_headers={"X-API-Key": KEY}, **kwargs)
        assert (await recv(ws))["op"] == "ready"
        return ws


@pytest.fixture
async def live(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Live]:
    port = free_port()
    settings = Settings(api_keys=KEY, chat_model="", asr_model="", embedding_model="", slow_consumer_timeout=1, heartbeat_interval=0, log_level="WARNING")
    server = Live(create_app(settings), f"ws://127.0.0.1:{port}/ws")
    try_send = DirectProtocol.try_send

    def spy(self: DirectProtocol, payload: str | bytes, compress: bool = True) -> bool:
        sent = try_send(self, payload, compress)
        server.calls.append((self, sent))
        return sent

    monkeypatch.setattr(DirectProtocol, "try_send", spy)
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, ws=DirectProtocol, log_config=None))
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        assert not task.done(), task
        await asyncio.sleep(0.05)
    try:
        yield server
    finally:
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)


def test_frame_header_matches_websockets_serializer() -> None:
    for length in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        for first, opcode in ((0x81, Opcode.TEXT), (0x82, Opcode.BINARY)):
            data = b"x" * length
            assert frame_header(first, length) + data == Frame(opcode, data).serialize(mask=False)


async def chunks_of(ws: websockets.ClientConnection, stream_id: str) -> list[dict[str, Any]]:
    chunks = []
    while (frame := await recv(ws))["op"] != "end":
        if frame["op"] == "chunk" and frame["id"] == stream_id:
            chunks.append(frame)
    assert frame["reason"] == "complete", frame
    return chunks


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_frames_go_out_through_try_send(live: Live, compression: str | None) -> None:
    ws = await live.connect(compression=compression)
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "".join(f"{i:04d}" for i in range(300)), "chunk_size": 4})
    assert (await recv(ws))["op"] == "subscribed"
    chunks = await chunks_of(ws, "t")
    assert [c["data"] for c in chunks] == [f"{i:04d}" for i in range(300)]
    assert [c["seq"] for c in chunks] == list(range(300))
    # ready, subscribed, 300 chunks and the end: every one written at once by try_send
    assert len(live.calls) == 303 and all(sent for _, sent in live.calls)
    await ws.close()


async def test_a_paused_transport_falls_back_to_the_writer_in_order(live: Live) -> None:
    ws = await live.connect()
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "".join(f"{i:04d}" for i in range(150)), "chunk_size": 4, "interval_ms": 5})
    assert (await recv(ws))["op"] == "subscribed"
    while (await recv(ws))["seq"] < 10:
        pass
    protocol = live.calls[-1][0]
    protocol.pause_writing()  # as the transport does past its high-water mark
    await asyncio.sleep(0.2)  # chunks keep coming: each is refused by try_send, then waits in the writer
    refused = sum(not sent for _, sent in live.calls)
    assert refused == 1  # the first one; later ones queue behind it for the writer
    protocol.resume_writing()
    rest = await chunks_of(ws, "t")
    assert [c["seq"] for c in rest] == list(range(11, 150)), "a frame was lost or reordered"
    assert [c["data"] for c in rest] == [f"{i:04d}" for i in range(11, 150)]
    assert live.calls[-1][1], "once the writer drained, frames go out through try_send again"
    await ws.close()


async def test_a_transport_paused_past_the_timeout_is_closed_as_slow_consumer(live: Live) -> None:
    ws = await live.connect()
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
    assert (await recv(ws))["op"] == "subscribed"
    assert (await recv(ws))["op"] == "chunk"
    protocol = live.calls[-1][0]
    protocol.pause_writing()
    closes = live.app.runtime.telemetry.stats.closes
    async with asyncio.timeout(10):
        while not closes[CloseCode.SLOW_CONSUMER]:
            await asyncio.sleep(0.05)
    protocol.resume_writing()  # the close frame waits behind the data in flight, as on a real socket
    assert await closed_with(ws) == CloseCode.SLOW_CONSUMER


async def test_try_send_refuses_once_the_client_has_closed(live: Live) -> None:
    ws = await live.connect()
    await send(ws, op="ping")
    assert (await recv(ws)) == {"op": "pong"}
    protocol = live.calls[-1][0]
    await ws.close()
    async with asyncio.timeout(5):
        while not protocol.disconnected:
            await asyncio.sleep(0.01)
    assert not protocol.try_send(orjson.dumps({"op": "pong"}).decode())


async def test_with_deflate_an_idle_connection_makes_no_zlib_context_until_a_compressed_frame(live: Live) -> None:
    ws = await live.connect(compression="deflate")
    protocol = live.calls[-1][0]
    (deflate,) = protocol.conn.extensions
    assert isinstance(deflate, LazyDeflate) and protocol.request is None and protocol.response is None
    assert "encoder" not in vars(deflate) and "decoder" not in vars(deflate), "ready goes out uncompressed"
    await send(ws, op="ping")  # compressed by the client
    assert await recv(ws) == {"op": "pong"}  # compressed by the server
    assert "encoder" in vars(deflate) and "decoder" in vars(deflate)
    await ws.close()
