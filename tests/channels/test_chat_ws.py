"""End to end over /ws with the real chat model: two chat streams and a metrics stream interleaved on one socket."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import orjson
import pytest
import websockets

from tests.serverproc import KEY, PLAIN, ServerProc, connect, recv, send, start_server


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("chat"), chat_model="smollm2-135m-instruct")
    try:
        for _ in range(1800):  # the first run converts the bundled GGUF once
            status = orjson.loads(srv.get("/ready")[1])["channels"]["chat"]
            if status != "loading":
                break
            asyncio.run(asyncio.sleep(0.1))
        assert status == "available", srv.log()[-3000:]
        yield srv
    finally:
        srv.stop()


async def test_two_chats_and_metrics_interleave(chat_server: ServerProc) -> None:
    ws = await connect(chat_server)
    await send(ws, op="subscribe", id="c1", channel="chat", params={"message": "What is the capital of France?", "max_tokens": 24, "temperature": 0})
    await send(ws, op="subscribe", id="c2", channel="chat", params={"message": "Name a colour.", "max_tokens": 24, "temperature": 0})
    await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 250})
    await send(ws, op="subscribe", id="bad", channel="chat", params={"message": "hi", "model": "gpt-3.5-turbo"})
    text = {"c1": "", "c2": ""}
    finals, order, metrics = {}, [], 0
    async with asyncio.timeout(120):
        while len(finals) < 2:
            frame = await recv(ws, timeout=60)
            if frame["op"] == "error":
                assert frame["id"] == "bad" and frame["code"] == "invalid_params" and "smollm2" in frame["message"]
            elif frame["op"] == "chunk" and frame["id"] == "m":
                metrics += 1
                order.append("m")
            elif frame["op"] == "chunk":
                order.append(frame["id"])
                text[frame["id"]] += frame["data"].get("delta", "")
                if "finish_reason" in frame["data"]:
                    finals[frame["id"]] = frame["data"]
    assert "Paris" in text["c1"]
    assert text["c2"].strip()
    for final in finals.values():
        assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] > 0
    assert metrics >= 1 and "engine" in (await _metrics_chunk(ws))
    assert len({order.index("c1"), order.index("c2")}) == 2 and order.count("c1") > 1 and order.count("c2") > 1
    await ws.close()


async def _metrics_chunk(ws) -> dict:
    while True:
        frame = await recv(ws)
        if frame["op"] == "chunk" and frame["id"] == "m":
            return frame["data"]


async def test_chat_cut_mid_answer_resumes_without_loss(chat_server: ServerProc) -> None:
    params = {"message": "Write one sentence about the sea.", "max_tokens": 40, "temperature": 0}

    async def deltas(frames: dict[int, dict]) -> str:
        return "".join(frames[i].get("delta", "") for i in sorted(frames))

    ws = await connect(chat_server)
    await send(ws, op="subscribe", id="c", channel="chat", params=params)
    whole: dict[int, dict] = {}
    while True:
        frame = await recv(ws, timeout=60)
        if frame["op"] == "chunk":
            whole[frame["seq"]] = frame["data"]
        elif frame["op"] == "end":
            break
    await ws.close()

    ws = await connect(chat_server)
    token = ws.ready["resume"]["token"]
    await send(ws, op="subscribe", id="c", channel="chat", params=params)
    got: dict[int, dict] = {}
    while sum("delta" in d for d in got.values()) < 5:
        frame = await recv(ws, timeout=60)
        if frame["op"] == "chunk":
            got[frame["seq"]] = frame["data"]
    ws.transport.abort()  # the TCP connection drops, no close frame
    await asyncio.sleep(0.5)
    ws = await connect(chat_server)
    await send(ws, op="resume", token=token, streams={"c": max(got)})
    resumed = await recv(ws)
    assert resumed["op"] == "resumed" and resumed["streams"]["c"]["resumed"], resumed
    while True:
        frame = await recv(ws, timeout=60)
        if frame["op"] == "chunk":
            assert frame["seq"] not in got
            got[frame["seq"]] = frame["data"]
        elif frame["op"] == "end":
            assert frame["reason"] == "complete"
            break
    await ws.close()
    assert sorted(got) == list(range(len(got)))
    assert await deltas(got) == await deltas(whole) and len(await deltas(whole)) > 20


def _prefix_hits(server: ServerProc) -> float:
    """The chat runner's prefix-cache hits, from /metrics."""
    lines = [line for line in server.get("/metrics")[1].decode().splitlines() if line.startswith("streamplex_engine_prefix_cache_hits_total{")]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


async def test_a_second_keys_identical_prompt_gets_no_cache_hit(chat_server: ServerProc) -> None:
    """No cross-tenant timing signal: the prefix cache is per API key, so another key's prompt never speeds up yours."""
    question = f"Spell the word {secrets.token_hex(4)} backwards."  # new to the cache, whatever ran before

    async def ask(key: str) -> float:
        before = _prefix_hits(chat_server)
        async with websockets.connect(chat_server.url, additional_headers={"X-API-Key": key}) as ws:
            assert (await recv(ws))["op"] == "ready"
            await send(ws, op="subscribe", id="c", channel="chat", params={"message": question, "max_tokens": 4, "temperature": 0})
            while not ((frame := await recv(ws, timeout=60))["op"] == "end" and frame["id"] == "c"):
                pass
            assert frame["reason"] == "complete", frame
        return _prefix_hits(chat_server) - before

    await ask(KEY)  # may hit the key's own earlier prompts (the template's system prompt)
    assert await ask(PLAIN) == 0, "another key's identical prompt must not be served from the cache"
    assert await ask(KEY) == 1 and await ask(PLAIN) == 1, "a key's own repeated prompt is"
