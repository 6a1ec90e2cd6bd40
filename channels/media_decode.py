"""Decoding media files with PyAV off the event loop: audio as float32 PCM resampled by torchaudio, video as timed frames.

Each decoder owns one worker thread; the container is opened, read and closed there, so a slow
or large file never blocks the event loop. Decoding errors become ChannelError(bad_source) with a
message that names the client's source, never a server path.

FFmpeg opens only local files (`protocol_whitelist` file) in the demuxers of `MediaLimits.formats`, and a
source's frame size, duration and frame count are checked against `MediaLimits` when it is opened (what
the file declares) and again on every decoded frame (what it holds).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Self, TypeVar

import av
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from streamplex.server.channel import ChannelError
from streamplex.server.config import Settings
from streamplex.server.protocol import ErrorCode

T = TypeVar("T")
_DONE = object()


class StreamingResampler:
    """torchaudio's sinc resampling applied block by block: the concatenated output equals
    `torchaudio.functional.resample` of the whole signal (same kernel, same windows, same length).

    The kernel is torchaudio's; each block is filtered with numpy's einsum, which runs in the calling
    thread only. torch's conv1d would enter its intra-op thread pool for every small block, and on a busy
    CPU (the model engine, other streams) that costs many times the arithmetic (bench/media_pacing.py).
    """

    def __init__(self, orig_freq: int, new_freq: int) -> None:
        import torchaudio  # here, in the decoder's thread: a node whose streams never resample never loads torch

        self.identity = orig_freq == new_freq
        transform = torchaudio.transforms.Resample(orig_freq, new_freq)
        kernel = getattr(transform, "kernel", None)  # absent when the rates are equal
        self.kernel = np.zeros((1, 1), np.float32) if kernel is None else kernel[:, 0, :].numpy()  # (new phases, taps)
        self.width: int = getattr(transform, "width", 0)
        self.orig = orig_freq // transform.gcd
        self.new = new_freq // transform.gcd
        self.buffer: np.ndarray | None = None  # the padded input from the next output block on
        self.taken = 0
        self.given = 0

    def _blocks(self, buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        channels = buffer.shape[0]
        blocks = max(0, (buffer.shape[1] - 2 * self.width) // self.orig)
        if blocks == 0:
            return np.zeros((channels, 0), np.float32), buffer
        windows = sliding_window_view(buffer[:, : blocks * self.orig + 2 * self.width], self.kernel.shape[1], axis=1)[:, :: self.orig]
        out = np.einsum("cbk,pk->cbp", windows, self.kernel).reshape(channels, -1)
        return out, buffer[:, blocks * self.orig :]

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed (channels, n) float32 samples; return the output samples now complete."""
        self.taken += samples.shape[1]
        if self.identity:
            self.given += samples.shape[1]
            return samples
        if self.buffer is None:
            self.buffer = np.zeros((samples.shape[0], self.width), np.float32)
        out, self.buffer = self._blocks(np.concatenate((self.buffer, samples), axis=1))
        self.given += out.shape[1]
        return out

    def flush(self, channels: int) -> np.ndarray:
        """The remaining output after the last input (the signal is taken as silent past its end)."""
        if self.identity or self.buffer is None:
            return np.zeros((channels, 0), np.float32)
        tail = np.pad(self.buffer, ((0, 0), (0, self.width + self.orig)))
        out, _ = self._blocks(tail)
        self.buffer = None
        total = math.ceil(self.new * self.taken / self.orig)
        out = out[:, : max(0, total - self.given)]
        self.given += out.shape[1]
        return out


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """What a source may be: its demuxer, frame size, duration and frame count (the `media_*` settings)."""

    formats: str = Settings.model_fields["media_formats"].default
    max_pixels: int = Settings.model_fields["media_max_pixels"].default
    max_duration_s: float = Settings.model_fields["media_max_duration"].default
    max_frames: int = Settings.model_fields["media_max_frames"].default

    @classmethod
    def of(cls, settings: Settings) -> MediaLimits:
        return cls(settings.media_formats, settings.media_max_pixels, settings.media_max_duration, settings.media_max_frames)

    def check_declared(self, label: str, stream: Any, container: Any) -> float | None:
        """Refuse a stream whose declared duration or frame count is over the limits; return its duration if known."""
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and container.duration:
            duration = container.duration / av.time_base
        if duration is not None and duration > self.max_duration_s:
            raise _over(label, f"lasts {duration:.1f} s", f"{self.max_duration_s:g} s", "media_max_duration")
        if stream.frames and stream.frames > self.max_frames:
            raise _over(label, f"holds {stream.frames} frames", str(self.max_frames), "media_max_frames")
        return duration

    def check_size(self, label: str, width: int, height: int) -> None:
        """Refuse a frame size over `max_pixels`."""
        if width * height > self.max_pixels:
            raise _over(label, f"has {width}x{height} frames", f"{self.max_pixels} pixels", "media_max_pixels")

    def check_progress(self, label: str, frames: int, position_s: float) -> None:
        """Refuse a source that decodes past the frame count or duration limit."""
        if frames > self.max_frames:
            raise _over(label, f"decodes to more than {self.max_frames} frames", str(self.max_frames), "media_max_frames")
        if position_s > self.max_duration_s:
            raise _over(label, f"decodes past {self.max_duration_s:g} s", f"{self.max_duration_s:g} s", "media_max_duration")


def _origin(stream: Any, container: Any) -> Fraction:
    """The time of the stream's first frame (a recording or broadcast capture may start far from 0): times are taken from it."""
    if stream.start_time is not None and stream.time_base:
        return stream.start_time * stream.time_base
    return Fraction(container.start_time or 0, av.time_base)


def _over(label: str, what: str, limit: str, setting: str) -> ChannelError:
    return ChannelError(ErrorCode.BAD_SOURCE, f"{label}: {what}, over this server's limit of {limit} ({setting})")


def open_media(path: str | Path, label: str, limits: MediaLimits) -> Any:
    """Open `path` with PyAV as a local file in an allowed demuxer; raise ChannelError(bad_source) if it is neither
    (a URL or another protocol's name is refused, as is whatever a playlist or list inside the file would open)."""
    try:
        return av.open(str(path), metadata_errors="ignore", container_options={"protocol_whitelist": "file", "format_whitelist": limits.formats})
    except av.error.ArgumentError:
        # FFmpeg answers EINVAL when the probed demuxer (or a protocol) is not on the whitelist.
        raise ChannelError(
            ErrorCode.BAD_SOURCE, f"{label}: not a local file in a format this server opens ({limits.formats.replace(',', ', ')}; media_formats)"
        ) from None


class _Worker:
    """One thread that owns a decoder's PyAV objects; calls queue behind one another."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media-decode")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self, fn: Callable[[], object]) -> None:
        """Run `fn` after whatever is in flight (even when the awaiting task was cancelled), then let the thread go."""
        self.executor.submit(fn)
        self.executor.shutdown(wait=False)


_SOURCE_ERRORS = (ChannelError, av.FFmpegError, OSError)


def _source_error(label: str, exc: Exception) -> ChannelError:
    """The client-facing error for a file that cannot be read or decoded (never the server's path)."""
    if isinstance(exc, ChannelError):
        return exc
    if isinstance(exc, av.error.DecoderNotFoundError):
        return ChannelError(ErrorCode.BAD_SOURCE, f"{label}: its codec is unknown (no decoder for it here)")
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return ChannelError(ErrorCode.BAD_SOURCE, f"{label}: cannot decode ({reason})")


class _Decoder(ABC):
    """Shared life cycle: open in the worker thread, iterate a generator there, close there."""

    def __init__(self, path: Path, label: str, limits: MediaLimits) -> None:
        self.path = path
        self.label = label
        self.limits = limits
        self.worker = _Worker()
        self.container: Any = None
        self.generator: Generator[Any, None, None] | None = None

    def _open(self) -> None:
        try:
            self.container = open_media(self.path, self.label, self.limits)
            self._probe()
        except BaseException as exc:
            self._close()
            if isinstance(exc, _SOURCE_ERRORS):
                raise _source_error(self.label, exc) from None
            raise

    @abstractmethod
    def _probe(self) -> None:
        """Check the opened container has the stream needed and note its properties; raise ChannelError if not."""

    def _close(self) -> None:
        if self.generator is not None:
            self.generator.close()
        if self.container is not None:
            self.container.close()
            self.container = None

    def _next(self) -> Any:
        assert self.generator is not None
        try:
            return next(self.generator, _DONE)
        except _SOURCE_ERRORS as exc:
            raise _source_error(self.label, exc) from None

    async def __aenter__(self) -> Self:
        try:
            await self.worker.run(self._open)
        except BaseException:
            self.worker.close(self._close)  # also when cancelled while the open is still running in the thread
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.worker.close(self._close)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in this decoder's thread (e.g. encoding the frames it gave)."""
        return await self.worker.run(fn, *args)

    async def _iterate(self, generator: Generator[T, None, None]) -> AsyncIterator[T]:
        self.generator = generator
        while (item := await self.worker.run(self._next)) is not _DONE:
            yield item


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """The source's audio stream as found in the file."""

    codec: str
    sample_rate: int
    channels: int
    duration_s: float | None


class AudioDecoder(_Decoder):
    """`async with AudioDecoder(path, label, sample_rate=16000, channels=1) as audio:` then
    `async for block in audio.blocks(1600)`: float32 arrays of shape (channels, block_samples), the
    last one possibly shorter. `channels` None keeps the source's (more than two are mixed to stereo);
    `start_ms` skips the start exactly (to the sample). Raises ChannelError(bad_source)."""

    def __init__(
        self, path: Path, label: str, *, sample_rate: int, channels: int | None = None, start_ms: int = 0, limits: MediaLimits = MediaLimits()
    ) -> None:
        super().__init__(path, label, limits)
        self.sample_rate = sample_rate
        self.start_ms = start_ms
        self.requested_channels = channels
        self.info: AudioInfo
        self.channels = 0

    def _probe(self) -> None:
        if not self.container.streams.audio:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"{self.label}: has no audio stream")
        stream = self.container.streams.audio[0]
        ctx = stream.codec_context
        if ctx is None:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"{self.label}: its audio codec is unknown (no decoder for it here)")
        if not ctx.sample_rate or ctx.channels < 1:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"{self.label}: its audio stream has no sample rate or no channels")
        duration = self.limits.check_declared(self.label, stream, self.container)
        self.info = AudioInfo(codec=ctx.name, sample_rate=ctx.sample_rate, channels=ctx.channels, duration_s=duration)
        self.channels = self.requested_channels or min(2, ctx.channels)

    def _source_blocks(self) -> Iterator[np.ndarray]:
        """Source-rate float32 (channels, n) arrays from `start_ms` on."""
        stream = self.container.streams.audio[0]
        start = self.start_ms / 1000
        origin = float(_origin(stream, self.container))
        if start > 0:
            try:
                self.container.seek(int((origin + start) * av.time_base), any_frame=False)
            except av.FFmpegError:
                self.container.seek(0)
        # PyAV converts the sample format and mixes layouts beyond stereo down; mono and stereo are mapped
        # here, so that mono copied to two channels keeps its level.
        wanted = self.channels if self.info.channels > 2 else self.info.channels
        convert = av.AudioResampler(format="fltp", layout="mono" if wanted == 1 else "stereo", rate=self.info.sample_rate)
        skip: int | None = None if start > 0 else 0
        decoded = 0  # source samples
        for count, frame in enumerate(itertools.chain(self.container.decode(stream), [None]), 1):
            if frame is not None:
                decoded += frame.samples
                at = frame.time - origin if frame.time is not None else 0.0
                self.limits.check_progress(self.label, count, max(at, start + decoded / self.info.sample_rate))
            if skip is None and frame is not None:
                skip = max(0, round((start - (frame.time - origin if frame.time is not None else 0.0)) * self.info.sample_rate))
            for converted in convert.resample(frame):
                samples: np.ndarray = converted.to_ndarray()
                if skip:
                    dropped = min(skip, samples.shape[1])
                    samples, skip = samples[:, dropped:], skip - dropped
                if samples.shape[0] != self.channels:
                    samples = samples.mean(axis=0, keepdims=True) if self.channels == 1 else np.repeat(samples, 2, axis=0)
                if samples.shape[1]:
                    yield samples

    def _blocks(self, block_samples: int) -> Generator[np.ndarray, None, None]:
        resampler = StreamingResampler(self.info.sample_rate, self.sample_rate)
        pending: list[np.ndarray] = []
        held = 0

        def cut(out: np.ndarray) -> Iterator[np.ndarray]:
            nonlocal held
            if out.shape[1]:
                pending.append(out)
                held += out.shape[1]
            while held >= block_samples:
                joined = np.concatenate(pending, axis=1)
                yield np.ascontiguousarray(joined[:, :block_samples])
                rest = joined[:, block_samples:]
                pending[:] = [rest] if rest.shape[1] else []
                held = rest.shape[1]

        for samples in self._source_blocks():
            yield from cut(resampler.push(samples))
        yield from cut(resampler.flush(self.channels))
        if held:
            yield np.ascontiguousarray(np.concatenate(pending, axis=1))

    def blocks(self, block_samples: int) -> AsyncIterator[np.ndarray]:
        """Async iterator of float32 (channels, block_samples) arrays at `sample_rate`; the last may be shorter."""
        if block_samples < 1:
            raise ValueError("block_samples must be positive")
        return self._iterate(self._blocks(block_samples))


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """The source's video stream as found in the file."""

    codec: str
    width: int
    height: int
    fps: float | None
    duration_s: float | None


@dataclass(frozen=True, slots=True)
class TimedFrame:
    """Output frame `index`, shown at `time_s` (start_ms + index / fps), scaled; `repeat` when it is the previous source frame again."""

    index: int
    time_s: float
    frame: av.VideoFrame
    repeat: bool


class VideoDecoder(_Decoder):
    """`async with VideoDecoder(path, label, fps=30, width=320) as video:` then `async for f in video.frames()`.

    Output frame k is the source frame on screen at start_ms + k/fps (the last one whose timestamp is
    at or before it): source frames are dropped or repeated to give exactly `fps`. Frames come scaled
    to `width` (height keeps the aspect ratio, rounded to even) in yuvj420p. Raises ChannelError(bad_source)."""

    def __init__(self, path: Path, label: str, *, fps: float, width: int | None = None, start_ms: int = 0, limits: MediaLimits = MediaLimits()) -> None:
        super().__init__(path, label, limits)
        self.fps = fps
        self.start_ms = start_ms
        self.requested_width = width
        self.info: VideoInfo
        self.width = 0
        self.height = 0

    def _probe(self) -> None:
        if not self.container.streams.video:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"{self.label}: has no video stream")
        stream = self.container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"{self.label}: its video codec is unknown (no decoder for it here)")
        if not ctx.width or not ctx.height:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"{self.label}: its video stream has no frame size")
        self.limits.check_size(self.label, ctx.width, ctx.height)
        rate = stream.average_rate or stream.guessed_rate
        duration = self.limits.check_declared(self.label, stream, self.container)
        self.info = VideoInfo(codec=ctx.name, width=ctx.width, height=ctx.height, fps=float(rate) if rate else None, duration_s=duration)
        self.width = self.requested_width or ctx.width
        self.height = max(2, round(self.width * ctx.height / ctx.width / 2) * 2)

    def _scale(self, frame: av.VideoFrame) -> av.VideoFrame:
        return frame.reformat(width=self.width, height=self.height, format="yuvj420p", interpolation="AREA")

    def _frames(self) -> Generator[TimedFrame, None, None]:
        stream = self.container.streams.video[0]
        start = Fraction(self.start_ms, 1000)
        origin = _origin(stream, self.container)
        if start > 0:
            try:
                self.container.seek(int((origin + start) * av.time_base))
            except av.FFmpegError:
                self.container.seek(0)
        # Exact rational times, so a tick that falls on a source frame's timestamp shows that frame.
        step = 1 / Fraction(self.fps).limit_denominator(1001)
        rate = stream.average_rate or stream.guessed_rate
        default_duration = 1 / Fraction(rate) if rate else step
        index = 0
        raw: av.VideoFrame | None = None  # the source frame on screen at the next tick
        raw_time = Fraction(0)
        scaled: av.VideoFrame | None = None  # `raw` scaled, once it has been shown

        def show_until(limit: Fraction) -> Iterator[TimedFrame]:
            nonlocal index, scaled
            assert raw is not None
            while (at := start + index * step) < limit:
                repeat = scaled is not None
                if scaled is None:
                    scaled = self._scale(raw)
                yield TimedFrame(index, float(at), scaled, repeat)
                index += 1

        for count, frame in enumerate(self.container.decode(stream)):
            time = frame.pts * frame.time_base - origin if frame.pts is not None and frame.time_base else count * default_duration
            self.limits.check_size(self.label, frame.width, frame.height)
            self.limits.check_progress(self.label, count + 1, float(time))
            if raw is not None:
                yield from show_until(time)
            raw, raw_time, scaled = frame, time, None
        if raw is not None:
            duration = raw.duration * raw.time_base if raw.duration and raw.time_base else default_duration
            yield from show_until(raw_time + duration)

    def frames(self) -> AsyncIterator[TimedFrame]:
        """Async iterator of TimedFrame at exactly `fps`, from `start_ms` to the end of the last source frame."""
        return self._iterate(self._frames())
