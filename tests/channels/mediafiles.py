"""Media files for tests: the shipped samples, broken files, and a real local HTTP server."""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np

from streamplex.server.config import SAMPLES

MEDIA = SAMPLES / "media"
SPEECH = "speech.wav"  # espeak-ng, 22 050 Hz mono, about 7.2 s
VIDEO = "counter.mp4"  # 320x240 H.264 at 25 fps, 4 s, AAC mono 22 050 Hz; frame index in 7 binary cells


def wav_bytes(samples: np.ndarray, rate: int, format_tag: int = 1) -> bytes:
    """A 16-bit WAV file of mono int16 `samples` (a `format_tag` other than 1 names a codec nobody decodes)."""
    data = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", format_tag, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def broken_files(folder: Path) -> dict[str, Path]:
    """Files no decoder can read: random bytes, a truncated MP4, an empty file, an unknown WAV codec, and text."""
    full = (MEDIA / VIDEO).read_bytes()
    files = {
        "garbage.mp4": os.urandom(20000),
        "truncated.mp4": full[: len(full) // 2],
        "empty.wav": b"",
        "unknown-codec.wav": wav_bytes(np.zeros(8000, dtype=np.int16), 8000, format_tag=0x7777),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


class _Unseekable(io.RawIOBase):
    """A sink FFmpeg cannot seek back in: a muxer then leaves out the duration and frame count (as a live recording does)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def write_video(path: Path, width: int, height: int, frames: int, fps: int = 25, *, declared: bool = True, start_s: int = 0) -> Path:
    """An MPEG-4 video of grey frames, its first at `start_s` (as in a capture); `declared` False writes Matroska
    with no duration or frame count in it."""
    sink: _Unseekable | str = str(path) if declared else _Unseekable()
    with av.open(sink, "w", format=None if declared else "matroska") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i % 256, np.uint8), format="rgb24")
            frame.pts = start_s * fps + i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    if isinstance(sink, _Unseekable):
        path.write_bytes(bytes(sink.data))
    return path


def write_undeclared_audio(path: Path, seconds: float, rate: int = 16000, start_s: int = 0) -> Path:
    """FLAC in Matroska with no duration in it (how long it is shows only while decoding), its first sample at `start_s`."""
    sink = _Unseekable()
    with av.open(sink, "w", format="matroska") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        samples = (np.sin(np.arange(int(seconds * rate)) / 7) * 8000).astype(np.int16)
        for start in range(0, len(samples), 4096):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 4096].copy(), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start_s * rate + start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    path.write_bytes(bytes(sink.data))
    return path


def nesting_lists(folder: Path) -> dict[str, Path]:
    """An HLS playlist (with its MPEG-TS segment, made from the speech sample) and an ffconcat list, both naming a file beside them."""
    (folder / SPEECH).write_bytes((MEDIA / SPEECH).read_bytes())
    with av.open(str(MEDIA / SPEECH)) as source, av.open(str(folder / "segment0.ts"), "w") as out:
        stream = out.add_stream("mp2", rate=22050, layout="mono")
        for frame in source.decode(audio=0):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    (folder / "playlist.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:8\n#EXTINF:7.2,\nsegment0.ts\n#EXT-X-ENDLIST\n")
    (folder / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile '{SPEECH}'\n")
    return {"hls": folder / "playlist.m3u8", "concat": folder / "list.ffconcat"}


def read_counter(rgb: np.ndarray) -> int:
    """The frame index drawn in the top band of counter.mp4 (7 cells, white = 1, most significant bit left)."""
    height, width = rgb.shape[:2]
    band = rgb[round(height * 12 / 240) : round(height * 48 / 240)].mean(axis=2)
    cell = width / 7
    bits = [band[:, round(cell * (i + 0.3)) : round(cell * (i + 0.7))].mean() > 128 for i in range(7)]
    return int("".join("1" if b else "0" for b in bits), 2)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect"))
            self.end_headers()
            return
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to/"))
            self.end_headers()
            return
        super().do_GET()


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `folder` (with /redirect/NAME and /redirect-to/URL); yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
