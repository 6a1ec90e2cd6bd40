"""The chat channel at unit level: params, stop strings, pushed turns, and streams on the real bundled model."""

from __future__ import annotations

import asyncio
import random
import re
from types import SimpleNamespace
from typing import Any

import pytest

from streamplex.channels.chat import ChatChannel, StopText, pushed_turn
from streamplex.server.channel import END_OF_INPUT, CannotGoOn, ChannelError, Checkpoint, StreamContext, plain
from streamplex.server.config import Settings
from streamplex.server.engine import Engine
from streamplex.server.engine.causal_lm import CausalLMRunner
from streamplex.server.engine.loading import BUNDLED
from streamplex.server.engine.runner import RunnerSpec
from streamplex.server.protocol import ErrorCode
from tests.chatmodel import bundled_runner, engine_with

FRANCE = "What is the capital of France?"


def channel(engine: Engine | None) -> ChatChannel:
    return ChatChannel(SimpleNamespace(settings=Settings(), engine=engine))  # type: ignore[arg-type]


def context(stream_id: str = "s1") -> StreamContext:
    return StreamContext(stream_id, asyncio.Queue())


@pytest.fixture(scope="session")
def runner() -> CausalLMRunner:
    return bundled_runner()


def test_params() -> None:
    chat = channel(Engine([RunnerSpec("chat", BUNDLED, lambda: None)]))  # type: ignore[arg-type,return-value]
    params = chat.parse({"message": "hi", "system": "be brief", "stop": "\n"})
    assert params.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert params.stop == ["\n"] and params.max_tokens == 256 and params.temperature == 0
    for bad in (
        {},
        {"message": "a", "messages": [{"role": "user", "content": "b"}]},
        {"messages": [], "message": None},
        {"message": "a", "top_p": 0},
    ):
        with pytest.raises(ChannelError) as exc:
            chat.parse(bad)
        assert exc.value.code is ErrorCode.INVALID_PARAMS
    with pytest.raises(ChannelError, match=re.escape(f"unknown model 'gpt-3.5-turbo'; available: {BUNDLED}")) as exc:
        chat.parse({"message": "hi", "model": "gpt-3.5-turbo"})
    assert exc.value.code is ErrorCode.INVALID_PARAMS
    assert chat.status().state == "loading"
    assert channel(None).status().state == "unavailable"


def test_stop_text_holds_back_possible_starts() -> None:
    stops = StopText(["END", "\n\n"])
    assert stops.feed("Hello E") == ("Hello ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("x") == ("ENx", False)
    assert stops.feed(" and\n") == (" and", False)
    assert stops.feed("\nmore") == ("", True)


def test_pushed_turn_shapes() -> None:
    assert pushed_turn("next") == pushed_turn({"message": "next"}) == "next"
    for bad in ({"text": "x"}, {"message": 1}, b"bytes", 3):
        with pytest.raises(ChannelError):
            pushed_turn(bad)


async def chunks_of(chat: ChatChannel, raw: dict[str, Any], ctx: StreamContext | None = None) -> list[dict[str, Any]]:
    return [plain(chunk) async for chunk in chat.stream(chat.parse(raw), ctx or context())]


async def test_reply_then_pushed_turn_and_stop_string(runner: CausalLMRunner) -> None:
    async with engine_with(runner, max_batch=4, step_tokens=260, prefill_chunk=256) as engine:
        chat = channel(engine)
        assert chat.status().state == "available"
        chunks = await chunks_of(chat, {"message": FRANCE, "max_tokens": 32})
        assert "".join(c["delta"] for c in chunks) == "The capital of France is Paris."
        last = chunks[-1]
        assert last["finish_reason"] == "stop" and last["turn"] == 0
        usage = last["usage"]
        assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] == len(runner.encode_chat([{"role": "user", "content": FRANCE}]))
        assert usage["time_to_first_token_ms"] > 0 and usage["tokens_per_s"] > 0

        cut = await chunks_of(chat, {"message": FRANCE, "stop": ["Paris", "Rome"]})
        assert "".join(c["delta"] for c in cut) == "The capital of France is " and cut[-1]["finish_reason"] == "stop"

        short = await chunks_of(chat, {"message": "Tell me about the history of Rome.", "max_tokens": 5})
        assert short[-1]["finish_reason"] == "length" and short[-1]["usage"]["completion_tokens"] == 5

        ctx = context()
        await ctx.inbox.put({"message": "And the capital of Italy?"})
        await ctx.inbox.put(END_OF_INPUT)
        turns = await chunks_of(chat, {"message": FRANCE, "keep_open": True, "max_tokens": 32}, ctx)
        ends = [c for c in turns if "finish_reason" in c]
        assert [c["turn"] for c in ends] == [0, 1]
        second = "".join(c["delta"] for c in turns[turns.index(ends[0]) + 1 :])
        assert "Rome" in second


async def test_fifty_streams_opened_and_dropped_leave_nothing(runner: CausalLMRunner) -> None:
    async with engine_with(runner, max_batch=16, step_tokens=272, prefill_chunk=256) as engine:
        chat = channel(engine)
        rng = random.Random(3)
        drop_after = [rng.choice([0, 1, 3]) for _ in range(50)]
        deltas = [0] * 50
        queued = [False] * 50

        async def consume(i: int) -> None:
            params = chat.parse({"message": f"Count from {i} to {i + 50}.", "max_tokens": 64})
            async for item in chat.stream(params, context(f"s{i}")):
                chunk = plain(item)
                deltas[i] += "delta" in chunk
                queued[i] |= "queued" in chunk

        tasks = [asyncio.create_task(consume(i)) for i in range(50)]
        while any(not t.done() for t in tasks):
            await asyncio.sleep(0.01)
            for i, task in enumerate(tasks):
                if deltas[i] >= drop_after[i] and not task.done():
                    task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert any(queued) and sum(deltas) >= sum(drop_after)
        async with asyncio.timeout(10):
            while runner.stats()["rows"]:
                await asyncio.sleep(0.01)
        snapshot = engine.metrics()
        stats = snapshot["runners"][runner.name]
        assert snapshot["streams"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        assert stats["kv_reserved_tokens"] == 0 and runner.stats()["rows"] == runner.stats()["kv_bytes"] == 0


async def test_a_reply_goes_on_from_its_delivered_chunks_as_an_uninterrupted_run(runner: CausalLMRunner) -> None:
    """What a node does for a chat stream whose node died: prefill the prompt plus the tokens sent, decode on (greedy)."""
    async with engine_with(runner, max_batch=4, step_tokens=260, prefill_chunk=256) as engine:
        chat = channel(engine)
        for raw in ({"message": "Tell me about the history of Rome.", "max_tokens": 24}, {"message": FRANCE, "stop": ["Paris"]}):
            full = [item async for item in chat.stream(chat.parse(raw), context())]
            assert all(isinstance(item, Checkpoint) for item in full)
            chunks = [plain(item) for item in full]
            text = "".join(c["delta"] for c in chunks if "delta" in c)
            for k in sorted({1, len(full) // 2, len(full) - 1}):
                ctx = context()
                ctx.start, ctx.positions = k, [item.position for item in full[:k]]
                rest = [plain(item) async for item in chat.stream(chat.parse(raw), ctx)]
                sent = "".join(c["delta"] for c in chunks[:k] if "delta" in c)
                assert sent + "".join(c["delta"] for c in rest if "delta" in c) == text, (raw, k)
                assert rest[-1]["finish_reason"] == chunks[-1]["finish_reason"]
                assert rest[-1]["usage"]["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"]
                assert rest[-1]["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"]
        ctx = context()
        ctx.start, ctx.positions = len(full), [item.position for item in full]
        with pytest.raises(CannotGoOn):  # the reply was over: only an unfinished first reply goes on
            await chunks_of(chat, raw, ctx)
