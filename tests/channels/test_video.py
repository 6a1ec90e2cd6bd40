"""The video channel: JPEG frames at exactly the requested fps and width, the right source frame at each tick, pacing, errors, /ws."""

from __future__ import annotations

import asyncio
import io
import math
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from streamplex.channels.video import VideoChannel, qscale
from streamplex.server.channel import Binary, ChannelError, StreamContext
from streamplex.server.protocol import ErrorCode
from tests.channels.helpers import make, run
from tests.channels.mediafiles import SPEECH, VIDEO, broken_files, read_counter
from tests.channels.mediaws import read_stream
from tests.serverproc import ServerProc, connect, send


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG's pixels (RGB), decoded by FFmpeg; fails unless `data` is one complete, valid JPEG."""
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    with av.open(io.BytesIO(data), format="image2pipe", options={"vcodec": "mjpeg"}) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 1
    return frames[0].to_ndarray(format="rgb24")


def pairs(chunks: list[Any]) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]], dict[str, Any]]:
    head, *body, done = chunks
    assert len(body) % 2 == 0 and all(isinstance(m, dict) and isinstance(b, Binary) for m, b in zip(body[::2], body[1::2], strict=True))
    return head, [(m, b.payload) for m, b in zip(body[::2], body[1::2], strict=True)], done


@pytest.mark.parametrize(("fps", "width", "start_ms"), [(30, 160, 0), (10, 240, 0), (12.5, 101, 1500)])
async def test_frames_are_jpegs_at_the_fps_and_width_showing_the_right_source_frame(fps: float, width: int, start_ms: int) -> None:
    chunks = await run(make(VideoChannel), {"source": VIDEO, "fps": fps, "width": width, "start_ms": start_ms, "realtime": False})
    head, frames, done = pairs(chunks)
    height = round(width * 240 / 320 / 2) * 2
    assert head == {
        "format": "jpeg",
        "fps": fps,
        "width": width,
        "height": height,
        "start_ms": start_ms,
        "realtime": False,
        "source": {"codec": "h264", "width": 320, "height": 240, "fps": 25.0, "duration_ms": 4000.0},
    }
    assert len(frames) == done["frames"] == math.ceil((4 - start_ms / 1000) * fps)  # every tick before the end of the last frame
    for k, (meta, jpeg) in enumerate(frames):
        assert meta["frame"] == k and meta["time_ms"] == pytest.approx(start_ms + k * 1000 / fps, abs=0.001) and meta["bytes"] == len(jpeg)
        pixels = decode_jpeg(jpeg)
        assert pixels.shape == (height, width, 3)
        assert read_counter(pixels) == int((start_ms / 1000 + k / fps) * 25 + 1e-9)


async def test_repeated_frames_are_the_same_jpeg_and_quality_changes_size() -> None:
    _, frames, _ = pairs(await run(make(VideoChannel), {"source": VIDEO, "fps": 50, "realtime": False}))
    assert len(frames) == 200
    for (meta, jpeg), (_, before) in zip(frames[1:], frames, strict=False):
        assert meta["repeat"] == (jpeg == before)
    assert sum(meta["repeat"] for meta, _ in frames) == 100
    sizes = {}
    for quality in (5, 95):
        _, frames, _ = pairs(await run(make(VideoChannel), {"source": VIDEO, "fps": 5, "quality": quality, "realtime": False}))
        sizes[quality] = sum(len(j) for _, j in frames)
    assert sizes[5] < sizes[95] * 0.8
    assert (qscale(100), qscale(1)) == (2, 31)


async def test_realtime_paces_frames_by_their_timestamps() -> None:
    channel = make(VideoChannel)
    params = channel.parse({"source": VIDEO, "fps": 10, "width": 64, "start_ms": 2500})
    arrivals: list[tuple[float, float]] = []
    async for chunk in channel.stream(params, StreamContext("s", asyncio.Queue())):
        if isinstance(chunk, dict) and "frame" in chunk:
            arrivals.append((time.monotonic(), chunk["time_ms"] / 1000 - 2.5))
    assert len(arrivals) == 15
    start = arrivals[0][0]
    for arrived, due in arrivals:
        assert arrived - start >= due - 0.005
    assert arrivals[-1][0] - start == pytest.approx(1.4, abs=0.5)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"source": "../pyproject.toml"}, ErrorCode.FORBIDDEN),
        ({"source": "missing.mp4"}, ErrorCode.INVALID_PARAMS),
        ({}, ErrorCode.INVALID_PARAMS),
        ({"video_url": "https://example.com/v.mp4"}, ErrorCode.FORBIDDEN),
        ({"source": VIDEO, "audio_url": "https://example.com/v.mp4"}, ErrorCode.INVALID_PARAMS),
        ({"source": VIDEO, "fps": 0}, ErrorCode.INVALID_PARAMS),
        ({"source": VIDEO, "width": 8}, ErrorCode.INVALID_PARAMS),
        ({"source": VIDEO, "quality": 101}, ErrorCode.INVALID_PARAMS),
    ],
)
def test_refused_params(params: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(ChannelError) as info:
        make(VideoChannel).parse(params)
    assert info.value.code == code


async def test_broken_media_and_audio_only_files_end_with_bad_source(tmp_path: Path) -> None:
    (tmp_path / SPEECH).write_bytes(b"")
    channel = make(VideoChannel, media_dir=tmp_path)
    for name in broken_files(tmp_path):
        with pytest.raises(ChannelError) as info:
            await run(channel, {"source": name, "realtime": False})
        assert info.value.code == ErrorCode.BAD_SOURCE and info.value.message.startswith(name)
    with pytest.raises(ChannelError, match="has no video stream"):
        await run(make(VideoChannel), {"source": SPEECH})


async def test_video_over_the_websocket(server: ServerProc) -> None:
    ws = await connect(server)
    try:
        await send(ws, op="subscribe", id="v1", channel="video", params={"source": VIDEO, "fps": 5, "width": 80, "realtime": False})
        got = await read_stream(ws, "v1")
        assert got.end == {"op": "end", "id": "v1", "reason": "complete"}
        kinds = [kind for kind, _, _ in got.items]
        assert kinds == ["json"] + ["json", "binary"] * 20 + ["json"]
        metas = got.json[1:-1]
        for k, (meta, jpeg) in enumerate(zip(metas, got.binary, strict=True)):
            assert meta["time_ms"] == k * 200 and meta["bytes"] == len(jpeg)
            pixels = decode_jpeg(jpeg)
            assert pixels.shape == (60, 80, 3) and read_counter(pixels) == k * 5
        assert got.json[-1] == {"done": True, "frames": 20, "duration_ms": 4000.0}
    finally:
        await ws.close()


async def test_a_stream_going_on_at_chunk_n_sends_the_uninterrupted_runs_chunks_from_n() -> None:
    channel = make(VideoChannel)
    params = {"source": VIDEO, "fps": 30, "width": 96, "start_ms": 500, "realtime": False}  # 25 fps source: some frames repeat
    whole = await run(channel, params)
    assert channel.restarts(channel.parse(params)) and len(whole) > 20
    assert any(m["repeat"] for m in whole[1:-1:2]) and any(not m["repeat"] for m in whole[3:-1:2])
    for n in (1, 2, 5, 6, len(whole) // 2, len(whole) // 2 + 1, len(whole) - 1, len(whole)):
        assert await run(channel, params, start=n) == whole[n:], n


def test_a_url_source_does_not_restart() -> None:
    channel = make(VideoChannel, media_allow_urls=True)
    assert not channel.restarts(channel.parse({"video_url": "https://example.com/a.mp4"}))
