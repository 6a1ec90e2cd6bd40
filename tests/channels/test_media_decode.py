"""Decoding with PyAV off the event loop: block-wise torchaudio resampling, exact start, exact fps, clear errors."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchaudio

from streamplex.channels.media_decode import AudioDecoder, StreamingResampler, VideoDecoder
from streamplex.server.channel import ChannelError
from streamplex.server.protocol import ErrorCode
from tests.channels.mediafiles import MEDIA, SPEECH, VIDEO, broken_files, read_counter


def source_samples(name: str) -> np.ndarray:
    with av.open(str(MEDIA / name)) as container:
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1).astype(np.float32) / 32768


@pytest.mark.parametrize(("orig", "new", "block"), [(44100, 16000, 1000), (22050, 44100, 333), (16000, 48000, 4096), (48000, 44100, 17), (16000, 16000, 500)])
def test_block_wise_resampling_equals_torchaudio_on_the_whole_signal(orig: int, new: int, block: int) -> None:
    signal = np.random.default_rng(1).standard_normal((2, 12345)).astype(np.float32)
    resampler = StreamingResampler(orig, new)
    parts = [resampler.push(signal[:, i : i + block]) for i in range(0, signal.shape[1], block)]
    parts.append(resampler.flush(2))
    got = np.concatenate(parts, axis=1)
    want = torchaudio.functional.resample(torch.from_numpy(signal), orig, new).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape == (2, math.ceil(12345 * new / orig))
    assert np.abs(got - want).max() < 1e-4


async def test_audio_comes_in_blocks_at_the_requested_rate() -> None:
    async with AudioDecoder(MEDIA / SPEECH, SPEECH, sample_rate=16000, channels=1) as audio:
        assert (audio.info.codec, audio.info.sample_rate, audio.info.channels) == ("pcm_s16le", 22050, 1)
        blocks = [b async for b in audio.blocks(1600)]
    source = source_samples(SPEECH)
    assert all(b.dtype == np.float32 and b.shape == (1, 1600) for b in blocks[:-1])
    assert 0 < blocks[-1].shape[1] <= 1600
    got = np.concatenate(blocks, axis=1)
    want = torchaudio.functional.resample(torch.from_numpy(source), 22050, 16000).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


async def test_start_ms_skips_to_the_exact_sample_and_channels_are_mixed_or_copied() -> None:
    async with AudioDecoder(MEDIA / SPEECH, SPEECH, sample_rate=22050, channels=2, start_ms=1500) as audio:
        got = np.concatenate([b async for b in audio.blocks(4096)], axis=1)
    source = source_samples(SPEECH)[0, round(1.5 * 22050) :]
    assert got.shape == (2, source.size)
    assert np.array_equal(got[0], got[1]) and np.abs(got[0] - source).max() < 1e-6


async def test_audio_from_the_video_files_aac_track() -> None:
    async with AudioDecoder(MEDIA / VIDEO, VIDEO, sample_rate=44100, start_ms=1000) as audio:
        assert audio.info.codec == "aac" and audio.channels == 1
        total = sum([b.shape[1] async for b in audio.blocks(4410)])
    assert abs(total / 44100 - (audio.info.duration_s or 0) + 1.0) < 0.05


@pytest.mark.parametrize(("fps", "width", "start_ms"), [(30, 160, 0), (10, 320, 0), (25, 96, 1000), (30, 200, 2000)])
async def test_video_frames_hit_the_fps_exactly_with_the_right_source_frame(fps: int, width: int, start_ms: int) -> None:
    async with VideoDecoder(MEDIA / VIDEO, VIDEO, fps=fps, width=width, start_ms=start_ms) as video:
        assert (video.info.width, video.info.height, video.info.fps) == (320, 240, 25.0)
        frames = [f async for f in video.frames()]
    assert len(frames) == round((4 - start_ms / 1000) * fps)
    height = round(width * 240 / 320 / 2) * 2
    for k, f in enumerate(frames):
        assert f.index == k and f.time_s == pytest.approx(start_ms / 1000 + k / fps)
        assert (f.frame.width, f.frame.height) == (width, height)
        # the source frame on screen at the tick: the last whose timestamp j/25 is at or before it
        assert read_counter(f.frame.to_ndarray(format="rgb24")) == (start_ms * 25 // 1000) + (k * 25) // fps
    assert sum(f.repeat for f in frames) == max(0, len(frames) - len({read_counter(f.frame.to_ndarray(format="rgb24")) for f in frames}))


@pytest.mark.parametrize("name", ["garbage.mp4", "truncated.mp4", "empty.wav", "unknown-codec.wav"])
@pytest.mark.parametrize("kind", ["audio", "video"])
async def test_broken_files_are_bad_source_naming_the_source_not_the_path(tmp_path: Path, name: str, kind: str) -> None:
    path = broken_files(tmp_path)[name]
    decoder = AudioDecoder(path, name, sample_rate=16000) if kind == "audio" else VideoDecoder(path, name, fps=10)
    with pytest.raises(ChannelError) as info:
        async with decoder:
            pass
    assert info.value.code == ErrorCode.BAD_SOURCE
    assert info.value.message.startswith(name) and str(tmp_path) not in info.value.message


async def test_a_file_without_the_stream_kind_is_bad_source() -> None:
    with pytest.raises(ChannelError, match="has no video stream") as info:
        async with VideoDecoder(MEDIA / SPEECH, SPEECH, fps=10):
            pass
    assert info.value.code == ErrorCode.BAD_SOURCE


async def test_leaving_early_closes_the_container_in_its_thread() -> None:
    decoder = AudioDecoder(MEDIA / SPEECH, SPEECH, sample_rate=16000)
    async with decoder:
        async for _ in decoder.blocks(160):
            break
    for _ in range(500):
        if decoder.container is None:
            break
        await asyncio.sleep(0.01)
    assert decoder.container is None


async def test_stereo_is_mixed_to_mono_by_the_mean(tmp_path: Path) -> None:
    left = (np.sin(np.arange(8000) / 10) * 8000).astype(np.int16)
    right = (left // 2).astype(np.int16)
    path = tmp_path / "stereo.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([left, right]).T.reshape(1, -1).copy(), format="s16", layout="stereo")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    async with AudioDecoder(path, "stereo.wav", sample_rate=8000, channels=1) as audio:
        assert audio.info.channels == 2 and audio.channels == 1
        got = np.concatenate([b async for b in audio.blocks(1000)], axis=1)
    assert got.shape == (1, 8000)
    assert np.abs(got[0] - (left / 32768 + right / 32768) / 2).max() < 1e-6
