"""Resume without loss: cut the TCP connection mid-stream, reconnect, resume, and reassemble."""

from __future__ import annotations

import asyncio
from typing import Any

import websockets

from tests.serverproc import ServerProc, connect, recv, send, start_server

TEXT = "".join(f"line {i:04d} of a document that streams in small chunks.\n" for i in range(400))
RECORDS = [{"id": i, "name": f"row {i}", "tags": ["a", "b"], "score": i / 7} for i in range(3000)]


def cut(ws: websockets.ClientConnection) -> None:
    """Drop the TCP connection with no close frame, as a lost network would."""
    ws.transport.abort()


async def until_end(ws: websockets.ClientConnection, stream_id: str, chunks: dict[int, Any], timeout: float = 30) -> dict[str, Any]:
    while True:
        frame = await recv(ws, timeout)
        if frame.get("id") != stream_id:
            continue
        if frame["op"] == "chunk":
            assert frame["seq"] not in chunks, f"seq {frame['seq']} delivered twice"
            chunks[frame["seq"]] = frame["data"]
        elif frame["op"] == "end":
            return frame


async def resume(server: ServerProc, token: str, streams: dict[str, int]) -> tuple[websockets.ClientConnection, dict[str, Any]]:
    ws = await connect(server)
    await send(ws, op="resume", token=token, streams=streams)
    return ws, await recv(ws)


async def test_text_stream_cut_mid_way_reassembles_exactly(server: ServerProc) -> None:
    ws = await connect(server)
    token = ws.ready["resume"]["token"]
    await send(ws, op="subscribe", id="t", channel="text", params={"text": TEXT, "unit": "words", "chunk_size": 5, "interval_ms": 5})
    chunks: dict[int, Any] = {}
    while len(chunks) < 40:
        frame = await recv(ws)
        if frame["op"] == "chunk":
            chunks[frame["seq"]] = frame["data"]
    cut(ws)
    await asyncio.sleep(0.5)  # the producer goes on meanwhile
    ws, resumed = await resume(server, token, {"t": max(chunks)})
    assert resumed["op"] == "resumed", resumed
    assert resumed["streams"]["t"]["resumed"] is True and resumed["streams"]["t"]["replayed"] > 0, resumed
    end = await until_end(ws, "t", chunks)
    await ws.close()
    assert end["reason"] == "complete"
    assert sorted(chunks) == list(range(len(chunks)))
    assert "".join(chunks[i] for i in range(len(chunks))) == TEXT


async def test_data_stream_cut_twice_equals_an_uninterrupted_run(server: ServerProc) -> None:
    params = {"records": RECORDS, "format": "ndjson", "chunk_size": 50}
    ws = await connect(server, max_size=None)
    await send(ws, op="subscribe", id="d", channel="data", params=params)
    whole: dict[int, Any] = {}
    await until_end(ws, "d", whole)
    await ws.close()

    ws = await connect(server, max_size=None)
    token = ws.ready["resume"]["token"]
    await send(ws, op="subscribe", id="d", channel="data", params=params)
    chunks: dict[int, Any] = {}
    for cuts in range(2):
        while len(chunks) < 10 * (cuts + 1):
            frame = await recv(ws)
            if frame["op"] == "chunk":
                chunks[frame["seq"]] = frame["data"]
        cut(ws)
        await asyncio.sleep(0.2)
        ws, resumed = await resume(server, token, {"d": max(chunks)})
        assert resumed["op"] == "resumed" and resumed["streams"]["d"]["resumed"], resumed
    end = await until_end(ws, "d", chunks)
    await ws.close()
    assert end["reason"] == "complete"
    assert "".join(chunks[i] for i in sorted(chunks)) == "".join(whole[i] for i in sorted(whole))
    assert sorted(chunks) == list(range(len(whole)))


async def test_resume_refusals_and_a_clean_close_is_not_resumable(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="resume", token="no-such-token", streams={})
    frame = await recv(ws)
    assert frame["op"] == "error" and frame["code"] == "resume_failed", frame
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "abc"})
    await send(ws, op="resume", token=ws.ready["resume"]["token"], streams={})
    frames = [await recv(ws) for _ in range(4)]
    assert any(f["op"] == "error" and f["code"] == "bad_request" for f in frames), frames
    token = ws.ready["resume"]["token"]
    await ws.close()  # 1000: the client is done, nothing to resume
    await asyncio.sleep(0.3)
    ws, frame = await resume(server, token, {})
    await ws.close()
    assert frame["op"] == "error" and frame["code"] == "resume_failed", frame


async def test_missed_frames_past_the_buffer_end_with_resume_gap(tmp) -> None:
    srv = start_server(tmp, resume_buffer_bytes=4096, outbox_bytes=65536)
    try:
        ws = await connect(srv)
        token = ws.ready["resume"]["token"]
        await send(ws, op="subscribe", id="d", channel="data", params={"records": RECORDS, "format": "ndjson", "chunk_size": 20})
        frame = await recv(ws)
        while frame["op"] != "chunk":
            frame = await recv(ws)
        cut(ws)
        await asyncio.sleep(0.5)
        ws, resumed = await resume(srv, token, {"d": frame["seq"]})
        end = await recv(ws)
        await ws.close()
        assert resumed["streams"]["d"]["resumed"] is False, resumed
        assert end == {"op": "end", "id": "d", "reason": "resume_gap"}, end
    finally:
        srv.stop()


async def test_session_expires_after_the_window(tmp) -> None:
    srv = start_server(tmp, resume_window=0.5)
    try:
        ws = await connect(srv)
        token = ws.ready["resume"]["token"]
        await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
        await recv(ws)
        cut(ws)
        await asyncio.sleep(1.5)
        ws, frame = await resume(srv, token, {})
        await ws.close()
        assert frame["code"] == "resume_failed", frame
        assert srv.metric("streamplex_streams", 'channel="metrics"') == 0
    finally:
        srv.stop()


async def test_at_most_resume_max_sessions_wait(tmp) -> None:
    srv = start_server(tmp, resume_max_sessions=1)
    try:
        tokens = []
        for _ in range(2):
            ws = await connect(srv)
            tokens.append(ws.ready["resume"]["token"])
            await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
            await recv(ws)
            cut(ws)
            await asyncio.sleep(0.3)
        ws, first = await resume(srv, tokens[0], {})
        await ws.close()
        ws, second = await resume(srv, tokens[1], {"m": 0})
        await ws.close()
        assert first["code"] == "resume_failed", first
        assert second["op"] == "resumed" and second["streams"]["m"]["resumed"], second
    finally:
        srv.stop()


async def test_a_stream_the_session_does_not_know_ends_with_resume_gap(server: ServerProc) -> None:
    """A client naming a stream its session never recorded (subscribed on a node that died before writing it to
    Redis) is told that stream cannot go on, instead of finding it silently missing from `resumed`."""
    ws = await connect(server)
    token = ws.ready["resume"]["token"]
    await send(ws, op="subscribe", id="t", channel="text", params={"text": TEXT, "unit": "words", "chunk_size": 5, "interval_ms": 5})
    chunks: dict[int, Any] = {}
    while len(chunks) < 5:
        frame = await recv(ws)
        if frame["op"] == "chunk":
            chunks[frame["seq"]] = frame["data"]
    cut(ws)
    await asyncio.sleep(0.2)
    ws, resumed = await resume(server, token, {"t": max(chunks), "ghost": 3})
    assert resumed["op"] == "resumed", resumed
    assert resumed["streams"]["t"]["resumed"] is True and resumed["streams"]["ghost"] == {"channel": None, "resumed": False}, resumed
    assert (await until_end(ws, "ghost", {}))["reason"] == "resume_gap"
    assert (await until_end(ws, "t", chunks))["reason"] == "complete"
    await ws.close()
