"""audio: PCM decoded from a media file or URL, resampled by torchaudio, in binary frames paced in real time."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from streamplex.channels.media import MAX_START_MS, local_media, media_ref
from streamplex.channels.media_decode import AudioDecoder, MediaLimits
from streamplex.channels.pacing import Clock
from streamplex.server.channel import Binary, Channel, ParamsModel, Skip, StreamContext

log = logging.getLogger(__name__)

Format = Literal["pcm_s16le", "f32le", "wav"]


class AudioParams(ParamsModel):
    source: str | None = Field(None, max_length=1024, description="A file under the server's media folder.")
    audio_url: str | None = Field(None, max_length=2048, description="An http(s) URL of a media file (only when the server allows URLs).")
    sample_rate: int = Field(44100, ge=8000, le=96000, description="Output sample rate in Hz (resampled with torchaudio).")
    channels: Literal[1, 2] | None = Field(None, description="Output channels: 1 (mixed down) or 2; default the source's (more than two are mixed to stereo).")
    format: Format = Field(
        "pcm_s16le", description="pcm_s16le or f32le (raw interleaved little-endian samples), or wav (a 16-bit WAV header frame, then pcm_s16le)."
    )
    chunk_ms: int = Field(100, ge=10, le=1000, description="Milliseconds of audio per binary frame.")
    realtime: bool = Field(True, description="Pace frames in real time; false streams as fast as the client reads.")
    start_ms: int = Field(0, ge=0, le=MAX_START_MS, description="Start this far into the source.")

    @model_validator(mode="after")
    def _one_source(self) -> AudioParams:
        if (self.source is None) == (self.audio_url is None):
            raise ValueError("give exactly one of `source` or `audio_url`")
        return self


def wav_header(sample_rate: int, channels: int) -> bytes:
    """A 44-byte 16-bit PCM WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block, block, 16)
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF)


def encode_samples(samples: np.ndarray, fmt: Format) -> bytes:
    """Interleave float32 (channels, n) samples as little-endian f32 or s16 (clipped to [-1, 1], rounded)."""
    frames = samples.T
    if fmt == "f32le":
        return frames.astype("<f4").tobytes()
    return np.rint(np.clip(frames, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class AudioChannel(Channel):
    name = "audio"
    summary = "PCM audio decoded from a media file (or URL), resampled to the requested rate, in binary frames paced in real time."
    Params = AudioParams
    media = True
    restartable = True

    def check(self, params: AudioParams) -> None:
        media_ref(self.settings, params.source, params.audio_url, "audio_url")

    def restarts(self, params: AudioParams) -> bool:
        return params.source is not None  # a URL may answer other bytes on another fetch

    async def stream(self, params: AudioParams, ctx: StreamContext) -> AsyncIterator[Any]:
        ref = media_ref(self.settings, params.source, params.audio_url, "audio_url")
        rate = params.sample_rate
        block = max(1, round(rate * params.chunk_ms / 1000))
        async with (
            local_media(self.settings, ref) as path,
            AudioDecoder(path, ref.label, sample_rate=rate, channels=params.channels, start_ms=params.start_ms, limits=MediaLimits.of(self.settings)) as audio,
        ):
            info = audio.info
            skip = Skip(ctx.start)  # going on elsewhere: decode and resample from the start, send from chunk `start`
            sample_format = "f32le" if params.format == "f32le" else "s16le"
            header = {
                "format": params.format,
                "sample_format": sample_format,
                "sample_rate": rate,
                "channels": audio.channels,
                "samples_per_chunk": block,
                "start_ms": params.start_ms,
                "realtime": params.realtime,
                "source": {
                    "codec": info.codec,
                    "sample_rate": info.sample_rate,
                    "channels": info.channels,
                    "duration_ms": None if info.duration_s is None else round(info.duration_s * 1000, 3),
                },
            }
            if not skip():
                yield header
            if params.format == "wav" and not skip():
                yield Binary(wav_header(rate, audio.channels))
            clock = Clock()
            sent = 0
            async for samples in audio.blocks(block):
                if not skip():
                    if params.realtime:
                        await clock.at(sent / rate)
                    yield Binary(encode_samples(samples, params.format))
                sent += samples.shape[1]
            log.info("audio stream %s sent %d samples of %s (%.1f s)", ctx.stream_id, sent, ref.label, sent / rate)
            if not skip():
                yield {"done": True, "samples": sent, "duration_ms": round(sent * 1000 / rate, 3)}
