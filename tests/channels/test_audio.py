"""The audio channel: format chunk, binary PCM frames at the requested rate and length, WAV, pacing, errors, and over /ws."""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import orjson
import pytest
import torch
import torchaudio

from streamplex.channels.audio import AudioChannel
from streamplex.channels.pacing import Clock
from streamplex.server.channel import Binary, ChannelError, StreamContext
from streamplex.server.protocol import ErrorCode
from tests.channels.helpers import make, run
from tests.channels.mediafiles import MEDIA, SPEECH, VIDEO, broken_files, http_server
from tests.channels.mediaws import read_stream
from tests.serverproc import ServerProc, connect, send


def source_samples(name: str) -> np.ndarray:
    with av.open(str(MEDIA / name)) as container:
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1).astype(np.float32) / 32768


def split(chunks: list[Any]) -> tuple[list[dict[str, Any]], list[bytes]]:
    return [c for c in chunks if isinstance(c, dict)], [c.payload for c in chunks if isinstance(c, Binary)]


async def test_f32le_chunks_have_the_requested_rate_and_length() -> None:
    chunks = await run(make(AudioChannel), {"source": SPEECH, "sample_rate": 16000, "channels": 1, "format": "f32le", "chunk_ms": 100, "realtime": False})
    (head, done), frames = split(chunks)
    assert isinstance(chunks[0], dict) and isinstance(chunks[-1], dict)
    assert head == {
        "format": "f32le",
        "sample_format": "f32le",
        "sample_rate": 16000,
        "channels": 1,
        "samples_per_chunk": 1600,
        "start_ms": 0,
        "realtime": False,
        "source": {"codec": "pcm_s16le", "sample_rate": 22050, "channels": 1, "duration_ms": pytest.approx(7203.583, abs=0.01)},
    }
    assert all(len(f) == 1600 * 4 for f in frames[:-1]) and 0 < len(f := frames[-1]) <= 1600 * 4 and len(f) % 4 == 0
    got = np.frombuffer(b"".join(frames), dtype="<f4")
    source = source_samples(SPEECH)
    assert got.size == done["samples"] == math.ceil(source.shape[1] * 16000 / 22050)
    assert done == {"done": True, "samples": got.size, "duration_ms": pytest.approx(got.size / 16, abs=0.001)}
    want = torchaudio.functional.resample(torch.from_numpy(source), 22050, 16000).numpy()[0]
    assert np.abs(got - want).max() < 1e-4


async def test_s16le_stereo_at_44100_interleaves_and_quantises() -> None:
    chunks = await run(make(AudioChannel), {"source": SPEECH, "channels": 2, "realtime": False})
    (head, done), frames = split(chunks)
    assert (head["format"], head["sample_rate"], head["channels"], head["samples_per_chunk"]) == ("pcm_s16le", 44100, 2, 4410)
    assert all(len(f) == 4410 * 2 * 2 for f in frames[:-1])
    pcm = np.frombuffer(b"".join(frames), dtype="<i2").reshape(-1, 2)
    assert pcm.shape[0] == done["samples"] == math.ceil(source_samples(SPEECH).shape[1] * 2)
    assert np.array_equal(pcm[:, 0], pcm[:, 1]) and np.abs(pcm).max() > 3000


async def test_wav_frames_concatenate_to_a_file_pyav_reads() -> None:
    chunks = await run(make(AudioChannel), {"source": VIDEO, "sample_rate": 8000, "format": "wav", "chunk_ms": 250, "realtime": False})
    (head, done), frames = split(chunks)
    assert head["sample_format"] == "s16le" and len(frames[0]) == 44 and frames[0][:4] == b"RIFF"
    assert all(len(f) == 2000 * 2 for f in frames[1:-1])
    with av.open(io.BytesIO(b"".join(frames))) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.sample_rate, stream.channels) == ("pcm_s16le", 8000, 1)
        assert sum(f.samples for f in container.decode(stream)) == done["samples"]
    assert done["samples"] == pytest.approx(head["source"]["duration_ms"] * 8, abs=8 * 30)


async def test_start_ms_skips_that_much() -> None:
    chunks = await run(make(AudioChannel), {"source": SPEECH, "sample_rate": 16000, "start_ms": 5000, "realtime": False})
    (head, done), _ = split(chunks)
    assert head["start_ms"] == 5000
    assert done["samples"] == pytest.approx((source_samples(SPEECH).shape[1] / 22050 - 5) * 16000, abs=2)


async def test_realtime_paces_frames_by_media_time() -> None:
    chunks: list[tuple[float, Any]] = []
    channel = make(AudioChannel)
    params = channel.parse({"source": VIDEO, "sample_rate": 16000, "start_ms": 2500, "chunk_ms": 100})
    async for chunk in channel.stream(params, StreamContext("s", asyncio.Queue())):
        chunks.append((time.monotonic(), chunk))
    binary = [(t, c) for t, c in chunks if isinstance(c, Binary)]
    start = binary[0][0]
    sent = 0
    for t, c in binary:
        assert t - start >= sent / 16000 - 0.005, "a frame went out before its media time"
        last_due = sent / 16000
        sent += len(c.payload) // 2
    assert 1.4 < sent / 16000 < 1.7
    assert binary[-1][0] - start == pytest.approx(last_due, abs=0.5)


async def test_the_clock_does_not_drift_when_each_step_costs_time() -> None:
    clock = Clock()
    begin = time.monotonic()
    for k in range(101):
        await clock.at(k * 0.01)
        time.sleep(0.004)  # work done per chunk; a per-chunk sleep would add it up to +0.4 s
    elapsed = time.monotonic() - begin
    assert 1.0 <= elapsed < 1.25


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"source": "../pyproject.toml"}, ErrorCode.FORBIDDEN),
        ({"source": "/etc/passwd"}, ErrorCode.FORBIDDEN),
        ({"source": "missing.wav"}, ErrorCode.INVALID_PARAMS),
        ({}, ErrorCode.INVALID_PARAMS),
        ({"source": SPEECH, "audio_url": "http://example.com/a.wav"}, ErrorCode.INVALID_PARAMS),
        ({"audio_url": "http://example.com/a.wav"}, ErrorCode.FORBIDDEN),
        ({"source": SPEECH, "sample_rate": 1000}, ErrorCode.INVALID_PARAMS),
        ({"source": SPEECH, "format": "mp3"}, ErrorCode.INVALID_PARAMS),
        ({"source": SPEECH, "channels": 6}, ErrorCode.INVALID_PARAMS),
        ({"source": SPEECH, "chunk_ms": 5}, ErrorCode.INVALID_PARAMS),
        ({"source": SPEECH, "start_ms": -1}, ErrorCode.INVALID_PARAMS),
    ],
)
def test_refused_params(params: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(ChannelError) as info:
        make(AudioChannel).parse(params)
    assert info.value.code == code


async def test_broken_media_ends_with_bad_source(tmp_path: Path) -> None:
    channel = make(AudioChannel, media_dir=tmp_path)
    for name in broken_files(tmp_path):
        with pytest.raises(ChannelError) as info:
            await run(channel, {"source": name, "realtime": False})
        assert info.value.code == ErrorCode.BAD_SOURCE and info.value.message.startswith(name)


async def test_a_url_on_an_allow_listed_loopback_server(tmp_path: Path) -> None:
    (tmp_path / SPEECH).write_bytes((MEDIA / SPEECH).read_bytes())
    with http_server(tmp_path) as base:
        allowed = make(AudioChannel, media_allow_urls=True, media_url_allow="127.0.0.1/32")
        (head, done), frames = split(await run(allowed, {"audio_url": f"{base}/{SPEECH}", "sample_rate": 16000, "realtime": False}))
        assert head["source"]["codec"] == "pcm_s16le" and sum(map(len, frames)) // 2 == done["samples"] == math.ceil(
            source_samples(SPEECH).shape[1] * 16000 / 22050
        )
        with pytest.raises(ChannelError) as info:
            await run(make(AudioChannel, media_allow_urls=True), {"audio_url": f"{base}/{SPEECH}".replace("127.0.0.1", "localhost")})
        assert info.value.code == ErrorCode.FORBIDDEN


def decoder_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("media-decode")}


async def test_cancelling_a_stream_releases_its_decoder_thread() -> None:
    before = decoder_threads()
    channel = make(AudioChannel)
    params = channel.parse({"source": SPEECH, "chunk_ms": 100})
    started = asyncio.Event()

    async def consume() -> None:
        async for chunk in channel.stream(params, StreamContext("s", asyncio.Queue())):
            if isinstance(chunk, Binary):
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 20)
    assert decoder_threads() - before, "the stream decodes in its own thread"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if not decoder_threads() - before:
            break
        await asyncio.sleep(0.01)
    assert not decoder_threads() - before


async def test_audio_over_the_websocket(server: ServerProc) -> None:
    ws = await connect(server)
    try:
        assert any(c["name"] == "audio" and c["status"] == "available" for c in ws.ready["channels"])
        await send(ws, op="subscribe", id="bad", channel="audio", params={"source": "../README.md"})
        refused = await read_stream(ws, "bad")
        assert refused.error is not None and refused.error["code"] == "forbidden"
        await send(
            ws,
            op="subscribe",
            id="a1",
            channel="audio",
            params={"source": SPEECH, "sample_rate": 24000, "format": "pcm_s16le", "chunk_ms": 200, "realtime": False},
        )
        got = await read_stream(ws, "a1")
        assert got.end == {"op": "end", "id": "a1", "reason": "complete"}
        head, done = got.json
        assert got.items[0][0] == "json" and got.items[-1][0] == "json" and head["samples_per_chunk"] == 4800
        assert all(len(p) == 4800 * 2 for p in got.binary[:-1])
        assert sum(len(p) for p in got.binary) // 2 == done["samples"] == math.ceil(source_samples(SPEECH).shape[1] * 24000 / 22050)
        await send(ws, op="subscribe", id="rt", channel="audio", params={"source": SPEECH})
        frames = 0
        while frames < 2:
            message = await asyncio.wait_for(ws.recv(), 20)
            frames += isinstance(message, bytes)
        await send(ws, op="unsubscribe", id="rt")
        while not isinstance(message := await asyncio.wait_for(ws.recv(), 20), str) or orjson.loads(message)["op"] != "end":
            pass  # frames already in flight
        assert orjson.loads(message) == {"op": "end", "id": "rt", "reason": "unsubscribed"}
    finally:
        await ws.close()


@pytest.mark.parametrize("fmt", ["wav", "f32le"])
async def test_a_stream_going_on_at_chunk_n_sends_the_uninterrupted_runs_chunks_from_n(fmt: str) -> None:
    channel = make(AudioChannel)
    params = {"source": SPEECH, "sample_rate": 22050, "format": fmt, "chunk_ms": 30, "start_ms": 100, "realtime": False}
    whole = await run(channel, params)
    assert channel.restarts(channel.parse(params)) and len(whole) > 10
    for n in (1, 2, 7, len(whole) - 1, len(whole)):
        assert await run(channel, params, start=n) == whole[n:], n


async def test_a_paced_stream_going_on_paces_from_its_first_sent_chunk() -> None:
    params = {"source": SPEECH, "sample_rate": 8000, "format": "pcm_s16le", "chunk_ms": 50, "realtime": True}
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks = await run(make(AudioChannel), params, start=135)  # the header and 134 frames (6.7 s of audio) made again at once
    elapsed = loop.time() - started
    frames = len(chunks) - 1
    assert chunks[-1]["done"] and 5 <= frames <= 12
    assert 0.05 * (frames - 1) - 0.01 <= elapsed < 0.05 * frames + 1.5  # paced from the first frame sent, not from the source's start


def test_a_url_source_does_not_restart() -> None:
    channel = make(AudioChannel, media_allow_urls=True)
    assert not channel.restarts(channel.parse({"audio_url": "https://example.com/a.wav"}))
