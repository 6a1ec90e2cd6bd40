"""One budget per connection (issue 15, issue 16 part 4): params, pushed input, outbox and replay buffers counted together;
replay buffers give back their oldest frames so the sum stays under `connection_memory`."""

from __future__ import annotations

import asyncio

import orjson

from streamplex.channels.text import TextChannel
from streamplex.server.auth import Principal
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Services
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.protocol import EndReason, Subscribe
from streamplex.server.session import Session
from streamplex.server.telemetry import Stats


def session_with(settings: Settings) -> Session:
    services = Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict)
    return Session(settings, {"text": TextChannel(services)}, Principal("test", None), Stats())


async def drain(session: Session, until_ended: set[str]) -> list[dict]:
    """Read the outbox as a client would, until every stream in `until_ended` has ended; check the budget after every frame."""
    frames = []
    while until_ended:
        frame = orjson.loads(await session.outbox.get())
        frames.append(frame)
        budget = session.budget
        assert budget.used() <= budget.limit, (budget.params, budget.inbox, budget.replay, budget.outbox.size)
        assert budget.replay == sum(s.replay_bytes for s in [*session.streams.values(), *session.ended.values()])
        if frame["op"] == "end":
            until_ended.discard(frame["id"])
    return frames


async def test_replay_buffers_stay_inside_the_connection_budget() -> None:
    settings = Settings(api_keys="k", connection_memory=48_000, outbox_bytes=8192, resume_buffer_bytes=1 << 20)
    session = session_with(settings)
    text = "".join(f"w{i} " for i in range(3000))  # ~16 KB of params per stream, ~60 KB of frames: over the budget's rest
    for stream_id in ("a", "b"):
        op = Subscribe(op="subscribe", id=stream_id, channel="text", params={"text": text, "unit": "words", "chunk_size": 5})
        session.subscribe(op, size=len(orjson.dumps(op.params)))
    assert session.budget.params > 2 * len(text)
    frames = await drain(session, {"a", "b"})
    assert {f["id"] for f in frames if f["op"] == "end"} == {"a", "b"}
    # Ended streams gave their params back; their replay buffers fill what is left, newest frames kept.
    budget = session.budget
    assert budget.params == 0 and budget.replay > 0 and budget.used() <= budget.limit
    stream = session.ended["b"]
    missed = stream.missed(stream.seq - 3)
    assert missed is not None and [orjson.loads(p)["seq"] for p in missed] == [stream.seq - 2, stream.seq - 1]
    assert stream.missed(0) is None  # the oldest frames were given back: a resume from there is a resume_gap
    await session.end_all(EndReason.UNSUBSCRIBED, notify=False)


async def test_a_new_stream_takes_room_from_replay_buffers() -> None:
    settings = Settings(api_keys="k", connection_memory=48_000, outbox_bytes=8192, resume_buffer_bytes=1 << 20)
    session = session_with(settings)
    text = "".join(f"word{i} " for i in range(5000))
    session.subscribe(Subscribe(op="subscribe", id="a", channel="text", params={"text": text, "chunk_size": 100}), size=100)
    await drain(session, {"a"})
    filled = session.budget.replay
    assert filled > 30_000
    session.subscribe(Subscribe(op="subscribe", id="b", channel="text", params={"text": "x", "interval_ms": 60000}), size=20_000)
    assert filled - 20_000 < session.budget.replay <= settings.connection_memory - 20_000 and session.budget.used() <= session.budget.limit
    await session.unsubscribe("b")
    await asyncio.sleep(0)


async def test_replay_keeps_frames_for_resume_buffer_age_only() -> None:
    session = session_with(Settings(api_keys="k", resume_buffer_age=10))
    session.subscribe(Subscribe(op="subscribe", id="a", channel="text", params={"text": "x", "interval_ms": 60000}), size=10)
    stream = session.streams["a"]
    for seq in range(20):  # one frame a second, written by hand
        stream.record(seq, f"frame {seq}", 1 << 20, now=1000.0 + seq, max_age=10)
    stream.seq = 20
    assert stream.missed(8) == [f"frame {seq}" for seq in range(9, 20)]  # sent at most 10 s before the newest
    assert stream.missed(7) is None and session.budget.replay == stream.replay_bytes
    await session.unsubscribe("a")  # kept among the ended streams for a resume: its replay stays charged, its params go
    assert session.budget.params == 0 and session.budget.replay == stream.replay_bytes > 0
