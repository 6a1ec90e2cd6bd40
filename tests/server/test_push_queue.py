"""Pushed input is bounded per stream: past `push_queue` items a push is refused with rate_limited (real chat channel and model)."""

from __future__ import annotations

import orjson
import pytest

from streamplex.channels.chat import ChatChannel
from streamplex.server.auth import Principal
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Services
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.protocol import EndReason, ErrorCode, ProtocolError, Subscribe
from streamplex.server.session import Session
from streamplex.server.telemetry import Stats
from tests.chatmodel import bundled_runner, engine_with


async def test_push_queue_is_bounded_and_frees_on_unsubscribe() -> None:
    settings = Settings(api_keys="k", chat_model="", push_queue=8)
    async with engine_with(bundled_runner()) as engine:
        services = Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict, engine=engine)
        session = Session(settings, {"chat": ChatChannel(services)}, Principal("test", None), Stats())
        session.subscribe(Subscribe(op="subscribe", id="c", channel="chat", params={"message": "Write a long story.", "max_tokens": 200, "keep_open": True}))
        accepted = 0
        with pytest.raises(ProtocolError) as info:
            for _ in range(100):
                session.push("c", "x" * 1000)
                accepted += 1
        assert accepted == settings.push_queue + 1 and info.value.code == ErrorCode.RATE_LIMITED and info.value.retry_after == 0.1
        with pytest.raises(ProtocolError):
            session.push("c", None, end=True)  # no room for the end marker either
        await session.unsubscribe("c")
        assert not session.streams and engine.metrics()["streams"] == 0
        frames = []
        while session.outbox.size:
            frames.append(orjson.loads(await session.outbox.get()))
        assert frames[-1] == {"op": "end", "id": "c", "reason": str(EndReason.UNSUBSCRIBED)}
