"""The SDK's push path against the live server's models: a chat conversation continued by pushed turns."""

from __future__ import annotations

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
