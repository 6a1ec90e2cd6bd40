"""End to end over /ws against the real server: auth, multiplexing, unsubscribe, bad frames, limits."""

from __future__ import annotations

import asyncio
import itertools
import json

import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from streamplex.server.protocol import parse_server_binary
from tests.serverproc import ServerProc, collect, connect, recv, send, start_server

ERROR_CODES = {
    "bad_request",
    "unknown_op",
    "unknown_channel",
    "invalid_params",
    "duplicate_id",
    "unknown_id",
    "rate_limited",
    "forbidden",
    "too_many_streams",
    "unavailable",
    "bad_source",
    "internal",
}


async def closed_with(ws: websockets.ClientConnection, timeout: float = 10) -> int:
    """Read until the server closes; the close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code


async def test_first_frame_auth_then_ready(server: ServerProc) -> None:
    ws = await connect(server)
    ready = ws.ready  # type: ignore[attr-defined]
    assert {c["name"] for c in ready["channels"]} >= {"text", "data", "logs", "metrics", "chat"}
    assert ready["limits"]["max_streams"] == 64 and ready["limits"]["protocol"] == 1
    await ws.close()


@pytest.mark.parametrize("header", ["X-API-Key: {key}", "Authorization: Bearer {key}"])
async def test_header_auth(server: ServerProc, header: str) -> None:
    name, value = header.format(key=server.key).split(": ")
    async with websockets.connect(server.url, additional_headers={name: value}) as ws:
        assert (await recv(ws))["op"] == "ready"


async def test_wrong_key_closes_4001_without_data(server: ServerProc) -> None:
    async with websockets.connect(server.url, additional_headers={"X-API-Key": "nope"}) as ws:
        assert await closed_with(ws) == 4001
    async with websockets.connect(server.url) as ws:
        await ws.send(json.dumps({"op": "auth", "api_key": "wrong"}))
        assert await closed_with(ws) == 4001
    async with websockets.connect(server.url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": "s", "channel": "text", "params": {"text": "x"}}))
        assert await closed_with(ws) == 4001


async def test_auth_deadline_and_failure_throttle(tmp) -> None:
    srv = start_server(tmp, auth_timeout=0.5, auth_fail_limit=3)
    try:
        async with websockets.connect(srv.url) as ws:
            assert await closed_with(ws) == 4002
        for _ in range(3):
            async with websockets.connect(srv.url) as ws:
                await ws.send(json.dumps({"op": "auth", "api_key": "bad"}))
                assert await closed_with(ws) == 4001
        async with websockets.connect(srv.url) as ws:  # refused before any key is read, even a right one
            assert await closed_with(ws) == 4003
    finally:
        srv.stop()


async def test_three_channels_interleave_on_one_socket(server: ServerProc) -> None:
    (server.documents_dir / "doc.txt").write_text("One. Two! Three? " * 50)  # type: ignore[attr-defined]
    ws = await connect(server)
    await send(ws, op="subscribe", id="t", channel="text", params={"document": "doc.txt", "unit": "sentences", "chunk_size": 1, "interval_ms": 20})
    await send(ws, op="subscribe", id="d", channel="data", params={"records": [{"i": i} for i in range(30)], "chunk_size": 1, "interval_ms": 20})
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
    order: list[str] = []
    seqs: dict[str, list[int]] = {"t": [], "d": [], "m": []}
    text, records, ended = "", [], set()
    while ended != {"t", "d"}:
        frame = await recv(ws)
        if frame["op"] == "chunk":
            order.append(frame["id"])
            seqs[frame["id"]].append(frame["seq"])
            if frame["id"] == "t":
                text += frame["data"]
            elif frame["id"] == "d":
                records += [json.loads(line) for line in frame["data"].splitlines()]
            else:
                assert frame["data"]["cpu"]["count"] >= 1 and frame["data"]["memory"]["total_bytes"] > 0
        elif frame["op"] == "end":
            assert frame["reason"] == "complete"
            ended.add(frame["id"])
    assert text == "One. Two! Three? " * 50
    assert records == [{"i": i} for i in range(30)]
    assert len(seqs["m"]) >= 3
    for ids in seqs.values():
        assert ids == list(range(len(ids)))
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches > 10, "streams did not interleave"
    await ws.close()


async def test_unsubscribe_mid_stream_stops_at_once(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "abc" * 1000, "chunk_size": 1, "interval_ms": 10})
    assert (await recv(ws))["op"] == "subscribed"
    for _ in range(3):
        assert (await recv(ws))["op"] == "chunk"
    await send(ws, op="unsubscribe", id="t")
    frames = []
    while (frame := await recv(ws))["op"] != "end":
        frames.append(frame)
    assert frame["reason"] == "unsubscribed" and len(frames) < 5
    await send(ws, op="ping")
    assert await recv(ws) == {"op": "pong"}
    await send(ws, op="unsubscribe", id="t")
    assert (await recv(ws))["code"] == "unknown_id"
    await ws.close()


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('{"id": "x"}', "bad_request"),
    ('{"op": 5}', "bad_request"),
    ('{"op": "fly"}', "unknown_op"),
    ('{"op": "subscribe", "id": "a", "channel": "nope"}', "unknown_channel"),
    ('{"op": "subscribe", "id": 7, "channel": "text"}', "bad_request"),
    ('{"op": "subscribe", "id": "", "channel": "text"}', "bad_request"),
    ('{"op": "subscribe", "id": "a", "channel": "text", "params": []}', "bad_request"),
    ('{"op": "subscribe", "id": "a", "channel": "text", "param": {}}', "bad_request"),
    ('{"op": "subscribe", "id": "a", "channel": "text", "params": {}}', "invalid_params"),
    ('{"op": "subscribe", "id": "a", "channel": "text", "params": {"text": "x", "chunk_size": "ten"}}', "invalid_params"),
    ('{"op": "subscribe", "id": "a", "channel": "text", "params": {"document": "../../etc/passwd"}}', "forbidden"),
    ('{"op": "subscribe", "id": "a", "channel": "text", "params": {"document": "missing.txt"}}', "invalid_params"),
    ('{"op": "subscribe", "id": "a", "channel": "data", "params": {"dataset": "/etc/passwd"}}', "forbidden"),
    ('{"op": "subscribe", "id": "a", "channel": "metrics", "params": {"interval_ms": 1}}', "invalid_params"),
    ('{"op": "subscribe", "id": "a", "channel": "logs", "params": {"level": "LOUD"}}', "invalid_params"),
    ('{"op": "unsubscribe", "id": "ghost"}', "unknown_id"),
    ('{"op": "push", "id": "ghost", "data": 1}', "unknown_id"),
    ('{"op": "auth", "api_key": "again"}', "bad_request"),
    (b"", "bad_request"),
    (b"\x05ab", "bad_request"),
    (b"\x02\xff\xfe payload", "bad_request"),
    (b"\x05ghost audio", "unknown_id"),
]


async def test_bad_frames_get_errors_while_another_connection_streams(server: ServerProc) -> None:
    healthy = await connect(server)
    await send(healthy, op="subscribe", id="h", channel="text", params={"text": "healthy " * 400, "unit": "words", "chunk_size": 1, "interval_ms": 5})
    assert (await recv(healthy))["op"] == "subscribed"
    ws = await connect(server)
    for frame, code in BAD_FRAMES:
        await ws.send(frame)
        reply = await recv(ws)
        assert reply["op"] == "error" and reply["code"] == code, (frame, reply)
        assert reply["code"] in ERROR_CODES and reply["message"]
    await ws.send('{"op": "subscribe", "id": "a", "channel": "text", "params": {"text": "x", "chunk_size": 0}}')
    details = (await recv(ws))["details"]
    assert details[0]["field"] == "chunk_size"
    await send(ws, op="subscribe", id="dup", channel="text", params={"text": "x" * 100, "chunk_size": 1, "interval_ms": 50})
    assert (await recv(ws))["op"] == "subscribed"
    await send(ws, op="subscribe", id="dup", channel="text", params={"text": "x"})
    while (reply := await recv(ws))["op"] == "chunk":
        pass
    assert reply["code"] == "duplicate_id"
    await send(ws, op="push", id="dup", data="more")
    while (reply := await recv(ws))["op"] == "chunk":
        pass
    assert reply["code"] == "bad_request" and "push" in reply["message"]
    await ws.close()
    words, end = await collect(healthy, "h")
    assert end["reason"] == "complete" and [c["seq"] for c in words] == list(range(len(words)))
    await healthy.close()


async def test_invalid_utf8_and_oversize_frames_close_as_documented(server: ServerProc) -> None:
    async with websockets.connect(server.url, max_size=None) as ws:
        await ws.send(json.dumps({"op": "auth", "api_key": server.key}))
        await recv(ws)
        await ws.send(b"x" * (1_048_576 + 1))
        assert await closed_with(ws) == 1009
    ws = await connect(server)
    await ws.send(b'{"op": "ping", "x": "\xff\xfe"}', text=True)
    assert await closed_with(ws) == 1007


async def test_rate_limit_refuses_then_closes(tmp) -> None:
    srv = start_server(tmp, rate=5, burst=5, rate_limit_strikes=20)
    try:
        ws = await connect(srv)
        for _ in range(10):
            await send(ws, op="ping")
        replies = [await recv(ws) for _ in range(10)]
        assert [r["op"] for r in replies].count("pong") == 5
        limited = [r for r in replies if r["op"] == "error"]
        assert {r["code"] for r in limited} == {"rate_limited"} and all(0 < r["retry_after"] <= 1 for r in limited)
        await asyncio.sleep(0.5)
        await send(ws, op="ping")
        assert await recv(ws) == {"op": "pong"}
        for _ in range(40):
            await send(ws, op="ping")
        assert await closed_with(ws) == 4008
        assert srv.metric("streamplex_rate_limited_total") >= 20
    finally:
        srv.stop()


async def test_limits_scopes_and_stream_cap(tmp) -> None:
    srv = start_server(tmp, max_streams=2, api_keys="sk-test-key,sk-metrics-only:metrics")
    try:
        ws = await connect(srv)
        for i in range(2):
            await send(ws, op="subscribe", id=f"m{i}", channel="metrics", params={})
            assert (await recv(ws))["op"] == "subscribed"
        await send(ws, op="subscribe", id="m2", channel="metrics", params={})
        assert (await recv(ws))["code"] == "too_many_streams"
        await ws.close()
        async with websockets.connect(srv.url, additional_headers={"X-API-Key": "sk-metrics-only"}) as scoped:
            ready = await recv(scoped)
            assert [c["name"] for c in ready["channels"]] == ["metrics"]
            await send(scoped, op="subscribe", id="t", channel="text", params={"text": "secret"})
            assert (await recv(scoped))["code"] == "forbidden"
            await send(scoped, op="subscribe", id="chat", channel="chat", params={"message": "hi"})
            assert (await recv(scoped))["code"] == "forbidden"
    finally:
        srv.stop()


async def test_chat_unavailable_without_model(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="c", channel="chat", params={"message": "hi"})
    reply = await recv(ws)
    assert reply["code"] == "unavailable"
    await ws.close()


async def test_disconnect_with_open_streams_leaves_nothing_behind(tmp) -> None:
    srv = start_server(tmp, resume_window=1)  # a dropped session waits this long for a resume
    try:
        for n in range(6):
            ws = await connect(srv)
            await send(ws, op="subscribe", id="t", channel="text", params={"text": "z" * 10_000, "chunk_size": 1, "interval_ms": 10})
            await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
            await send(ws, op="subscribe", id="l", channel="logs", params={})
            await recv(ws)
            if n % 2:
                await ws.close()  # a clean close: the session ends at once
            else:
                ws.transport.abort()  # vanish without a close frame: resumable, then reaped
        for _ in range(100):
            if srv.metric("streamplex_connections") == 0 and srv.metric("streamplex_streams", 'channel="text"') == 0:
                break
            await asyncio.sleep(0.1)
        assert srv.metric("streamplex_connections") == 0
        for channel in ("text", "metrics", "logs"):
            assert srv.metric("streamplex_streams", f'channel="{channel}"') == 0
        assert srv.metric("streamplex_outbox_bytes") == 0
    finally:
        srv.stop()


async def test_binary_frame_header_roundtrip() -> None:
    from streamplex.server.protocol import encode_binary

    assert parse_server_binary(encode_binary("s1", 7, b"pcm")) == ("s1", 7, b"pcm")


async def test_http_endpoints(server: ServerProc) -> None:
    status, body = server.get("/health")
    assert status == 200 and orjson.loads(body)["status"] == "alive"
    status, body = server.get("/ready")
    assert status == 200 and orjson.loads(body)["channels"]["text"] == "available"
    status, body = server.get("/channels")
    schemas = {c["name"]: c["params"] for c in orjson.loads(body)["channels"]}
    assert "chunk_size" in schemas["text"]["properties"] and "format" in schemas["data"]["properties"]
    status, body = server.get("/metrics")
    assert status == 200 and b"streamplex_frames_total" in body and b"streamplex_connections" in body


async def test_connections_past_max_connections_are_closed_1013(tmp) -> None:
    srv = start_server(tmp, max_connections=2)
    try:
        held = [await connect(srv), await websockets.connect(srv.url)]  # the second is not even authenticated
        extra = await websockets.connect(srv.url)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(extra.recv(), 5)
        assert extra.close_code == 1013, extra.close_code
        await held[1].close()
        await asyncio.sleep(0.3)
        again = await connect(srv)  # room again
        await again.close()
        await held[0].close()
        assert srv.metric("streamplex_closes_total", 'code="1013"') == 1
    finally:
        srv.stop()
