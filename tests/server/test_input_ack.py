"""The acknowledgement of pushed input (`ack`) in a session, without Redis: it follows what the server received, at a
bounded rate; a resume on the same node says where the client sends again from, or ends the stream with `input_lost`
(the real transcription channel and Whisper)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from streamplex.channels.transcription import TranscriptionChannel
from streamplex.server.auth import Principal
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Services
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.protocol import EndReason, ErrorCode, ProtocolError, Subscribe
from streamplex.server.session import ACK_INTERVAL, Session
from streamplex.server.telemetry import Stats
from tests.asrmodel import bundled_whisper, engine_with
from tests.serverproc import ROOT

FRAME = 3200  # 100 ms of 16 kHz s16le


async def frames(session: Session) -> list[dict[str, Any]]:
    out = []
    while session.outbox.size:
        out.append(orjson.loads(await session.outbox.get()))
    return out


async def test_pushed_audio_is_acknowledged_as_received_and_a_same_node_resume_says_where_to_send_from() -> None:
    settings = Settings(api_keys="k", asr_model="", media_dir=ROOT / "samples" / "media")
    async with engine_with(bundled_whisper()) as engine:
        services = Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict, engine=engine)
        session = Session(settings, {"transcription": TranscriptionChannel(services)}, Principal("test", None), Stats())
        session.subscribe(Subscribe(op="subscribe", id="a", channel="transcription", params={"language": "en"}))
        session.subscribe(Subscribe(op="subscribe", id="f", channel="transcription", params={"source": "speech.wav"}))
        await session.unsubscribe("f")
        started = asyncio.get_running_loop().time()
        for _ in range(20):
            session.push("a", bytes(FRAME))
            await asyncio.sleep(0.02)
        await asyncio.sleep(2 * ACK_INTERVAL)
        elapsed = asyncio.get_running_loop().time() - started
        sent = await frames(session)
        assert {"op": "subscribed", "id": "a", "channel": "transcription", "ack": True} in sent
        assert {"op": "subscribed", "id": "f", "channel": "transcription"} in sent, "a file source's input is not acknowledged"
        acks = [f["input"] for f in sent if f["op"] == "ack"]
        assert acks == sorted(set(acks)) and acks[-1] == 20 * FRAME, acks
        assert len(acks) <= elapsed / ACK_INTERVAL + 1, "at most one ack per interval"

        report, _ = await session.resume({"a": -1}, {"a": 8 * FRAME})
        assert report["a"]["input"] == 20 * FRAME and "a" in session.streams
        report, replay = await session.resume({"a": -1}, {"a": 20 * FRAME + 2})  # the client dropped what the server needs
        assert report["a"]["input"] == 20 * FRAME and "a" not in session.streams
        assert orjson.loads(replay[-1]) == {"op": "end", "id": "a", "reason": "input_lost"}
        await session.end_all(EndReason.UNSUBSCRIBED)

        # A refused push would leave a hole in the audio: the stream ends with an error instead of going on without it.
        session.subscribe(Subscribe(op="subscribe", id="b", channel="transcription", params={"language": "en"}))
        with pytest.raises(ProtocolError) as refused:
            for _ in range(settings.push_queue + 2):
                session.push("b", bytes(FRAME))
        assert refused.value.code == ErrorCode.RATE_LIMITED and "b" not in session.streams
        end = [f for f in await frames(session) if f["op"] == "end"]
        assert end == [{"op": "end", "id": "b", "reason": "error", "error": {"code": "rate_limited", "message": end[0]["error"]["message"]}}]
        assert "cannot go on without it" in end[0]["error"]["message"]
