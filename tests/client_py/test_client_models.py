"""The SDK's push path against the live server's models: a chat conversation continued by pushed turns, live audio
held until acknowledged."""

from __future__ import annotations

import time

import streamplex
from tests.serverproc import ServerProc


async def test_chat_turns_pushed_on_one_stream(models_server: ServerProc) -> None:
    replies: list[str] = [""]
    async with (
        streamplex.connect(models_server.url, api_key=models_server.key) as client,
        client.subscribe("chat", message="What is the capital of France?", max_tokens=16, keep_open=True) as sub,
    ):
        async for chunk in sub:
            replies[-1] += chunk.data.get("delta", "")
            if "finish_reason" in chunk.data:
                if len(replies) == 1:
                    await sub.push("And of Italy?")
                    await sub.end_input()
                replies.append("")
    assert "Paris" in replies[0] and "Rome" in replies[1], replies
    assert sub.reason == "complete"


async def test_live_audio_is_held_until_acknowledged_and_a_full_buffer_makes_push_wait(models_server: ServerProc) -> None:
    """A live transcription's pushed audio stays in the SDK until the server's `ack` covers it, never more than
    `input_buffer` bytes: pushed much faster than acks come, `push` waits (nothing is dropped)."""
    limit = 64 * 1024
    frame = bytes(3200)  # 100 ms of silence
    async with (
        streamplex.connect(models_server.url, api_key=models_server.key, input_buffer=limit) as client,
        client.subscribe("transcription", language="en") as sub,
    ):
        assert sub._input is not None and sub._input.limit == limit, "the server acknowledges a live transcription's input"
        held, waited = [], 0
        for _ in range(100):  # 10 s of audio, 5 times the buffer
            started = time.monotonic()
            await sub.push(frame)
            waited += time.monotonic() - started > 0.05
            held.append(len(sub._input.data))
        await sub.end_input()
        chunks = [chunk.data async for chunk in sub]
    assert max(held) <= limit and waited, (max(held), waited)
    assert sub._input.base > 0 and not sub._input.data, "acknowledged input was dropped, and the rest once the stream ended"
    assert chunks[-1]["type"] == "transcript" and chunks[-1]["duration_s"] == 10.0, chunks[-1]
