"""video: frames decoded from a media file or URL at exactly the requested fps, scaled, each a JPEG in a binary frame."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import av
from pydantic import Field, model_validator

from streamplex.channels.media import MAX_START_MS, local_media, media_ref
from streamplex.channels.media_decode import MediaLimits, VideoDecoder
from streamplex.channels.pacing import Clock
from streamplex.server.channel import Binary, Channel, ParamsModel, Skip, StreamContext

log = logging.getLogger(__name__)


class VideoParams(ParamsModel):
    source: str | None = Field(None, max_length=1024, description="A file under the server's media folder.")
    video_url: str | None = Field(None, max_length=2048, description="An http(s) URL of a media file (only when the server allows URLs).")
    fps: float = Field(30, gt=0, le=120, description="Output frames per second; source frames are dropped or repeated to hit it exactly.")
    width: int | None = Field(
        None, ge=16, le=3840, description="Output width in pixels (height keeps the aspect ratio, rounded to even); default the source's."
    )
    quality: int = Field(80, ge=1, le=100, description="JPEG quality, 1 (smallest) to 100 (best).")
    realtime: bool = Field(True, description="Pace frames in real time; false streams as fast as the client reads.")
    start_ms: int = Field(0, ge=0, le=MAX_START_MS, description="Start this far into the source.")

    @model_validator(mode="after")
    def _one_source(self) -> VideoParams:
        if (self.source is None) == (self.video_url is None):
            raise ValueError("give exactly one of `source` or `video_url`")
        return self


def qscale(quality: int) -> int:
    """FFmpeg's MJPEG quantiser scale for a 1..100 quality: 100 -> 2 (best), 1 -> 31 (smallest)."""
    return 2 + round((100 - quality) * 29 / 99)


class JpegEncoder:
    """FFmpeg's MJPEG encoder (through PyAV) for frames of one size; each frame is a complete JPEG."""

    def __init__(self, width: int, height: int, quality: int) -> None:
        self.context = av.CodecContext.create("mjpeg", "w")
        self.context.width, self.context.height = width, height
        self.context.pix_fmt = "yuvj420p"
        self.context.time_base = Fraction(1, 1000)
        self.context.qmin = self.context.qmax = qscale(quality)
        self.count = 0

    def encode(self, frame: av.VideoFrame) -> bytes:
        """One JPEG (SOI to EOI) of a yuvj420p frame of the encoder's size."""
        # PyAV rescales pts from the frame's time base to the encoder's: give it the encoder's, so pts stay increasing.
        frame.time_base = self.context.time_base
        frame.pts = self.count
        self.count += 1
        return b"".join(bytes(packet) for packet in self.context.encode(frame))


class VideoChannel(Channel):
    name = "video"
    summary = "Video frames decoded from a media file (or URL) at exactly the requested fps and width, each a JPEG in a binary frame, paced in real time."
    Params = VideoParams
    media = True
    restartable = True

    def check(self, params: VideoParams) -> None:
        media_ref(self.settings, params.source, params.video_url, "video_url")

    def restarts(self, params: VideoParams) -> bool:
        return params.source is not None  # a URL may answer other bytes on another fetch

    async def stream(self, params: VideoParams, ctx: StreamContext) -> AsyncIterator[Any]:
        ref = media_ref(self.settings, params.source, params.video_url, "video_url")
        async with (
            local_media(self.settings, ref) as path,
            VideoDecoder(path, ref.label, fps=params.fps, width=params.width, start_ms=params.start_ms, limits=MediaLimits.of(self.settings)) as video,
        ):
            info = video.info
            skip = Skip(ctx.start)  # going on elsewhere: decode from the start, encode and send from chunk `start`
            header = {
                "format": "jpeg",
                "fps": params.fps,
                "width": video.width,
                "height": video.height,
                "start_ms": params.start_ms,
                "realtime": params.realtime,
                "source": {
                    "codec": info.codec,
                    "width": info.width,
                    "height": info.height,
                    "fps": info.fps,
                    "duration_ms": None if info.duration_s is None else round(info.duration_s * 1000, 3),
                },
            }
            if not skip():
                yield header
            encoder = JpegEncoder(video.width, video.height, params.quality)
            clock = Clock()
            start = params.start_ms / 1000
            jpeg = b""
            unencoded: av.VideoFrame | None = None  # the last new frame, encoded only once a chunk needs it
            count = 0
            async for frame in video.frames():
                if not frame.repeat:
                    unencoded = frame.frame
                send_meta, send_jpeg = not skip(), not skip()
                if send_jpeg:
                    if unencoded is not None:
                        jpeg, unencoded = await video.run(encoder.encode, unencoded), None
                    if params.realtime:
                        await clock.at(frame.time_s - start)
                if send_meta:
                    yield {"frame": frame.index, "time_ms": round(frame.time_s * 1000, 3), "repeat": frame.repeat, "bytes": len(jpeg)}
                if send_jpeg:
                    yield Binary(jpeg)
                count += 1
            log.info("video stream %s sent %d frames of %s at %g fps", ctx.stream_id, count, ref.label, params.fps)
            if not skip():
                yield {"done": True, "frames": count, "duration_ms": round(count * 1000 / params.fps, 3)}
