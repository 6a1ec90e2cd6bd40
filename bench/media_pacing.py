"""Real-time pacing of the audio and video channels over a minute, against the naive per-chunk sleep.

Writes a long speech WAV (samples/media/speech.wav repeated) and a long 320x240 H.264 video into a
temporary media folder, starts the real server on it, and over `--seconds` of media:

- `--audio` audio streams (44.1 kHz mono s16, 100 ms chunks, realtime) and `--video` video streams
  (30 fps, 320 wide, realtime), each on its own WebSocket. For every binary frame the client notes its
  arrival; lag = arrival - first arrival - media time of the frame. Reported: the lag of the last frame
  (the drift over the run), and the largest and 95th-percentile lag over all frames.
- at the same time, in this process, the same audio decoded and paced the naive way a user would write
  it (`await asyncio.sleep(chunk_ms / 1000)` after each chunk) and with the channel's clock, lag
  measured the same way when each chunk is due to be sent.

Before that, one stream of each kind runs unpaced in this process, to give the cost of a stream as
seconds of media produced per second of wall time (x real time); and the block-wise resampling of
60 s of 44.1 kHz stereo to 16 kHz in 100 ms blocks is timed two ways side by side: torchaudio's
kernel applied with torch's conv1d (torch's intra-op threads, as set for the engine) and with numpy's
einsum in the calling thread (what channels/media_decode.py does).

Example: `python bench/media_pacing.py --seconds 60 --audio 8 --video 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import orjson
import torch
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.make_media_samples import frame_image  # noqa: E402
from streamplex.channels.audio import encode_samples  # noqa: E402
from streamplex.channels.media_decode import AudioDecoder, StreamingResampler, VideoDecoder  # noqa: E402
from streamplex.channels.pacing import Clock  # noqa: E402
from streamplex.channels.video import JpegEncoder  # noqa: E402
from streamplex.server.protocol import parse_server_binary  # noqa: E402
from tests.serverproc import start_server  # noqa: E402


def write_media(folder: Path, seconds: float) -> None:
    """long.wav: the speech sample repeated past `seconds`; long.mp4: `seconds` of 320x240 H.264 at 25 fps."""
    with av.open(str(ROOT / "samples/media/speech.wav")) as src:
        speech = [f.to_ndarray() for f in src.decode(audio=0)]
    with av.open(str(folder / "long.wav"), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=22050, layout="mono")
        written = 0
        while written < (seconds + 2) * 22050:
            for block in speech:
                frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
                frame.sample_rate, frame.pts = 22050, written
                written += frame.samples
                out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with av.open(str(folder / "long.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "crf": "30"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index in range(int((seconds + 1) * 25)):
            frame = av.VideoFrame.from_ndarray(frame_image(index % 128), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


async def client(url: str, key: str, channel: str, params: dict, seconds: float) -> list[float]:
    """Lags (s) of each binary frame of one stream, until `seconds` of media have arrived."""
    async with websockets.connect(url, additional_headers={"X-API-Key": key}, max_size=None) as ws:
        await ws.recv()
        await ws.send(orjson.dumps({"op": "subscribe", "id": "s", "channel": channel, "params": params}).decode())
        lags: list[float] = []
        first: float | None = None
        media = 0.0
        due = 0.0
        while media < seconds:
            message = await ws.recv()
            now = time.monotonic()
            if isinstance(message, bytes):
                _, _, payload = parse_server_binary(message)
                if first is None:
                    first = now
                if channel == "audio":
                    due, media = media, media + len(payload) / 2 / params["sample_rate"]
                lags.append(now - first - due)
            else:
                data = orjson.loads(message).get("data")
                if isinstance(data, dict) and "time_ms" in data:
                    due = media = data["time_ms"] / 1000
        await ws.send(orjson.dumps({"op": "unsubscribe", "id": "s"}).decode())
        return lags


async def in_process(path: Path, seconds: float, naive: bool) -> list[float]:
    """The same audio paced in this process: naive (sleep per chunk) or with the channel's Clock."""
    lags: list[float] = []
    clock = Clock()
    start = 0.0
    sent = 0
    async with AudioDecoder(path, path.name, sample_rate=44100, channels=1) as audio:
        async for block in audio.blocks(4410):
            due = sent / 44100
            if not sent:
                start = time.monotonic()
            if naive:
                if sent:
                    await asyncio.sleep(0.1)
            else:
                await clock.at(due)
            lags.append(time.monotonic() - start - due)
            sent += block.shape[1]
            if sent / 44100 >= seconds:
                break
    return lags


def resampling() -> None:
    """torch conv1d (intra-op thread pool) against numpy einsum (calling thread) for the same blocks and kernel."""
    resampler = StreamingResampler(44100, 16000)
    signal = np.random.default_rng(0).standard_normal((2, 44100 * 60)).astype(np.float32)
    kernel = torch.from_numpy(resampler.kernel)[:, None, :]
    t = time.perf_counter()
    for i in range(0, signal.shape[1], 4410):
        resampler.push(signal[:, i : i + 4410])
    numpy_s = time.perf_counter() - t
    buffer = torch.zeros((2, resampler.width))
    t = time.perf_counter()
    for i in range(0, signal.shape[1], 4410):
        buffer = torch.cat((buffer, torch.from_numpy(signal[:, i : i + 4410])), dim=1)
        blocks = (buffer.shape[1] - 2 * resampler.width) // resampler.orig
        torch.nn.functional.conv1d(buffer[:, None, : blocks * resampler.orig + 2 * resampler.width], kernel, stride=resampler.orig)
        buffer = buffer[:, blocks * resampler.orig :]
    torch_s = time.perf_counter() - t
    print(
        f"resampling 60 s stereo 44.1->16 kHz in 100 ms blocks: numpy einsum {numpy_s:.3f} s, torch conv1d ({torch.get_num_threads()} threads) {torch_s:.3f} s"
    )


async def throughput(folder: Path, seconds: float) -> None:
    """Unpaced cost of one audio stream (decode, resample to 44.1 kHz, s16) and one video stream (decode, scale, JPEG)."""
    t = time.perf_counter()
    samples = 0
    async with AudioDecoder(folder / "long.wav", "long.wav", sample_rate=44100, channels=1) as audio:
        async for block in audio.blocks(4410):
            encode_samples(block, "pcm_s16le")
            samples += block.shape[1]
    wall = time.perf_counter() - t
    print(f"audio unpaced: {samples / 44100:.1f} s of 22.05->44.1 kHz in {wall:.2f} s = {samples / 44100 / wall:.0f}x real time")
    t = time.perf_counter()
    frames = 0
    async with VideoDecoder(folder / "long.mp4", "long.mp4", fps=30, width=320) as video:
        encoder = JpegEncoder(video.width, video.height, 80)
        async for frame in video.frames():
            if not frame.repeat:
                await video.run(encoder.encode, frame.frame)
            frames += 1
    wall = time.perf_counter() - t
    print(f"video unpaced: {frames / 30:.1f} s of 25->30 fps 320x240 JPEG in {wall:.2f} s = {frames / 30 / wall:.1f}x real time")


def summary(lags: list[float]) -> str:
    ordered = sorted(lags)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"drift at end {lags[-1] * 1000:8.1f} ms | max lag {max(lags) * 1000:8.1f} ms | p95 lag {p95 * 1000:7.1f} ms | median {statistics.median(lags) * 1000:6.1f} ms | frames {len(lags)}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--audio", type=int, default=8)
    parser.add_argument("--video", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "media"
        folder.mkdir()
        t = time.perf_counter()
        write_media(folder, args.seconds)
        print(f"media written in {time.perf_counter() - t:.1f} s")
        resampling()
        await throughput(folder, args.seconds)
        server = start_server(Path(tmp), media_dir=folder)
        try:
            audio = {"source": "long.wav", "sample_rate": 44100, "channels": 1, "format": "pcm_s16le", "chunk_ms": 100, "realtime": True}
            video = {"source": "long.mp4", "fps": 30, "width": 320, "realtime": True}
            tasks = [client(server.url, server.key, "audio", audio, args.seconds) for _ in range(args.audio)]
            tasks += [client(server.url, server.key, "video", video, args.seconds) for _ in range(args.video)]
            tasks += [in_process(folder / "long.wav", args.seconds, naive=True), in_process(folder / "long.wav", args.seconds, naive=False)]
            t = time.perf_counter()
            results = await asyncio.gather(*tasks)
            print(f"ran {time.perf_counter() - t:.1f} s for {args.seconds:g} s of media")
        finally:
            server.stop()
    for i, lags in enumerate(results[: args.audio]):
        print(f"server audio {i:2d}: {summary(lags)}")
    for i, lags in enumerate(results[args.audio : args.audio + args.video]):
        print(f"server video {i:2d}: {summary(lags)}")
    print(f"in-process naive sleep per chunk: {summary(results[-2])}")
    print(f"in-process channel clock:         {summary(results[-1])}")


if __name__ == "__main__":
    asyncio.run(main())
