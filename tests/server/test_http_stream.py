"""The HTTP streaming routes against the live server: NDJSON, SSE, raw media, auth, limits, CORS, timeout and drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import httpx
import orjson
import pytest
import websockets

from streamplex.server.config import Settings
from tests.serverproc import PLAIN, ROOT, ServerProc, connect, recv, start_server

TEXT = {"text": "Curl users stream too. One line per chunk.", "unit": "words", "chunk_size": 2}


def lines(body: bytes) -> list[dict]:
    return [orjson.loads(line) for line in body.splitlines() if line.strip()]


async def test_ndjson_sse_and_errors(server: ServerProc) -> None:
    key = {"X-API-Key": server.key}
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        resp = await http.post("/api/v1/stream/text", json=TEXT, headers=key)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-ndjson"
        out = lines(resp.content)
        assert "".join(line["data"] for line in out[:-1]) == TEXT["text"] and [line["seq"] for line in out[:-1]] == list(range(len(out) - 1))
        assert out[-1] == {"end": "complete"}

        sse = await http.post("/api/v1/stream/text", json=TEXT, headers=key | {"Accept": "text/event-stream"})
        assert sse.headers["content-type"].startswith("text/event-stream")
        events = [block for block in sse.text.split("\n\n") if block]
        assert events[0] == 'event: chunk\nid: 0\ndata: {"seq":0,"data":"Curl users "}'
        assert events[-1] == 'event: end\ndata: {"end":"complete"}'

        assert (await http.post("/api/v1/stream/text", json=TEXT)).status_code == 401
        assert (await http.post("/api/v1/stream/text", json=TEXT, headers={"X-API-Key": "nope"})).status_code == 403
        bad = await http.post("/api/v1/stream/text", json={"text": "x", "unit": "lines"}, headers=key)
        assert bad.status_code == 400 and bad.json()["error"]["details"][0]["field"] == "unit"
        assert (await http.post("/api/v1/stream/text", content=b"[1]", headers=key)).json()["error"]["code"] == "bad_request"
        missing = await http.post("/api/v1/stream/nope", json={}, headers=key)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_channel"
        assert (await http.get("/api/v1/stream/text", headers=key)).status_code == 405
        chat = await http.post("/api/v1/stream/chat", json={"message": "hi"}, headers=key)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "unavailable"
        assert (await http.post("/api/v1/stream/text", content=b"\x00\x01", headers=key | {"Content-Type": "application/octet-stream"})).status_code == 415
        xml = await http.post("/api/v1/stream/data", json={"records": [{"c": "\x01"}], "format": "xml"}, headers=key)
        assert lines(xml.content)[-1]["error"]["code"] == "bad_source"


async def test_metrics_get_and_leaving_cancels(server: ServerProc) -> None:
    before = server.metric("streamplex_streams", 'channel="metrics"')  # a dropped session of an earlier test may hold some
    async with (
        httpx.AsyncClient(base_url=server.http, timeout=30) as http,
        http.stream("GET", "/api/v1/stream/metrics", params={"interval_ms": 200}, headers={"X-API-Key": server.key}) as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            assert "cpu" in orjson.loads(line)["data"]
            break
    deadline = time.monotonic() + 10
    while server.metric("streamplex_streams", 'channel="metrics"') > before:
        assert time.monotonic() < deadline, "the metrics stream outlived its HTTP client"
        await asyncio.sleep(0.05)


async def test_media_as_raw_bytes(server: ServerProc) -> None:
    key = {"X-API-Key": server.key}
    async with httpx.AsyncClient(base_url=server.http, timeout=60) as http:
        wav = await http.post("/api/v1/stream/audio", json={"source": "speech.wav", "format": "wav", "sample_rate": 16000, "realtime": False}, headers=key)
        assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
        info = orjson.loads(wav.headers["x-streamplex-info"])
        assert info["sample_rate"] == 16000 and wav.content[:4] == b"RIFF"
        assert abs((len(wav.content) - 44) // 2 - info["source"]["duration_ms"] * 16) <= 16  # every sample (16 per ms), to within a millisecond
        video = await http.post("/api/v1/stream/video", json={"source": "counter.mp4", "fps": 5, "width": 64, "realtime": False}, headers=key)
        assert video.headers["content-type"].startswith("multipart/x-mixed-replace")
        assert video.content.count(b"Content-Type: image/jpeg") == video.content.count(b"\xff\xd8\xff") >= 10
        ndjson = await http.post("/api/v1/stream/audio", json={"source": "speech.wav", "realtime": False}, headers=key | {"Accept": "application/x-ndjson"})
        out = lines(ndjson.content)
        assert out[0]["data"]["format"] == "pcm_s16le" and "binary" in out[1] and out[-1] == {"end": "complete"}


async def test_rate_limit_cors_and_timeout(tmp) -> None:
    srv = start_server(tmp, http_rate_limit=4, cors_origins="https://app.example", http_stream_timeout=1)
    key = {"X-API-Key": srv.key}
    try:
        async with httpx.AsyncClient(base_url=srv.http, timeout=30) as http:
            preflight = await http.options(
                "/api/v1/stream/text",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key,content-type"},
            )
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
            timed = await http.post("/api/v1/stream/metrics", json={"interval_ms": 200}, headers=key | {"Origin": "https://app.example"})
            assert timed.headers["access-control-allow-origin"] == "https://app.example"
            assert lines(timed.content)[-1] == {"end": "timeout"}
            foreign = await http.post("/api/v1/stream/text", json=TEXT, headers=key | {"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in foreign.headers
            statuses = [(await http.post("/api/v1/stream/text", json=TEXT, headers=key)).status_code for _ in range(2)]
            limited = await http.post("/api/v1/stream/text", json=TEXT, headers=key)
            assert statuses == [200, 200] and limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    finally:
        srv.stop()


async def test_drain_ends_http_streams(tmp) -> None:
    srv = start_server(tmp)
    try:
        got = []
        async with (
            httpx.AsyncClient(base_url=srv.http, timeout=30) as http,
            http.stream("POST", "/api/v1/stream/logs", json={"lines": 1}, headers={"X-API-Key": srv.key}) as resp,
        ):
            async for line in resp.aiter_lines():
                got.append(orjson.loads(line))
                if len(got) == 1:
                    srv.proc.send_signal(signal.SIGTERM)
        assert got[-1] == {"end": "shutdown"}
    finally:
        srv.stop()


async def test_raw_body_is_pushed_to_transcription(models_server: ServerProc) -> None:
    from streamplex.audio import read_wav_s16le

    pcm = read_wav_s16le(ROOT / "samples" / "media" / "speech.wav")
    async with httpx.AsyncClient(base_url=models_server.http, timeout=120) as http:
        resp = await http.post(
            "/api/v1/stream/transcription",
            params={"language": "en", "partials": "false"},
            content=pcm,
            headers={"X-API-Key": models_server.key, "Content-Type": "application/octet-stream"},
        )
    out = lines(resp.content)
    assert resp.status_code == 200 and out[-1] == {"end": "complete"}
    assert "streaming media from the server" in out[-2]["data"]["text"].lower()
    assert all(line["data"]["type"] != "partial" for line in out[:-1])


async def _open_metrics(http: httpx.AsyncClient, key: str, stack: contextlib.AsyncExitStack) -> httpx.Response:
    """A metrics stream held open (its first line read when admitted); the response, whatever its status."""
    resp = await stack.enter_async_context(http.stream("GET", "/api/v1/stream/metrics", params={"interval_ms": 200}, headers={"X-API-Key": key}))
    if resp.status_code == 200:
        lines = resp.aiter_lines()
        resp.lines = lines  # type: ignore[attr-defined]  # kept: a dropped iterator closes the response
        await anext(lines)
    else:
        await resp.aread()
    return resp


async def _eventually_admitted(http: httpx.AsyncClient, key: str) -> None:
    deadline = time.monotonic() + 10
    while (await http.post("/api/v1/stream/text", json=TEXT, headers={"X-API-Key": key})).status_code != 200:
        assert time.monotonic() < deadline, "a released HTTP stream slot never came back"
        await asyncio.sleep(0.1)


async def test_http_streams_are_capped_per_key(tmp) -> None:
    assert Settings().http_stream_timeout > 0 and Settings().http_key_max_streams > 0, "capped and timed out by default"
    srv = start_server(tmp, http_key_max_streams=3, http_rate_limit=0)
    try:
        async with httpx.AsyncClient(base_url=srv.http, timeout=30) as http:
            async with contextlib.AsyncExitStack() as held:
                assert [(await _open_metrics(http, srv.key, held)).status_code for _ in range(3)] == [200] * 3
                refused = await _open_metrics(http, srv.key, held)
                assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
                assert refused.json()["error"]["code"] == "rate_limited" and "HTTP streams" in refused.json()["error"]["message"]
                assert (await http.post("/api/v1/stream/text", json=TEXT, headers={"X-API-Key": PLAIN})).status_code == 200, "another key is not affected"
            await _eventually_admitted(http, srv.key)
            # Every way a stream ends gives its slot back: completion, the client leaving early, an error answer.
            for _ in range(4):
                assert (await http.post("/api/v1/stream/text", json=TEXT, headers={"X-API-Key": srv.key})).status_code == 200
                assert (await http.post("/api/v1/stream/text", json={"nope": 1}, headers={"X-API-Key": srv.key})).status_code == 400
                async with contextlib.AsyncExitStack() as gone:
                    await _open_metrics(http, srv.key, gone)
            await _eventually_admitted(http, srv.key)
            async with contextlib.AsyncExitStack() as held:
                assert [(await _open_metrics(http, srv.key, held)).status_code for _ in range(4)] == [200, 200, 200, 429]
    finally:
        srv.stop()


async def test_http_streams_hold_the_keys_connections_and_take_its_op_rate(tmp) -> None:
    srv = start_server(tmp, key_max_connections=2, key_rate=1, key_burst=3, http_rate_limit=0)
    try:
        async with httpx.AsyncClient(base_url=srv.http, timeout=30) as http, contextlib.AsyncExitStack() as held:
            ws = await connect(srv)
            assert (await _open_metrics(http, srv.key, held)).status_code == 200
            refused = await _open_metrics(http, srv.key, held)
            assert refused.status_code == 429 and "connections" in refused.json()["error"]["message"]
            async with websockets.connect(srv.url, additional_headers={"X-API-Key": srv.key}) as third:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await recv(third)
                assert info.value.rcvd is not None and info.value.rcvd.code == 4008, "the HTTP stream holds one of the key's connections"
            await ws.close()
            # Op rate: another key's burst of 3 requests, then 429 until the GCRA lets one through.
            answers = [await http.post("/api/v1/stream/text", json=TEXT, headers={"X-API-Key": PLAIN}) for _ in range(5)]
            assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
            assert "ops/s" in answers[3].json()["error"]["message"] and int(answers[3].headers["retry-after"]) >= 1
    finally:
        srv.stop()
