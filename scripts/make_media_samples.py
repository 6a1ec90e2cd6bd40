"""Write the media samples shipped in samples/media (run from the repo root with the venv's Python).

- speech.wav: an English sentence spoken by espeak-ng (22 050 Hz mono, 16-bit).
- counter.mp4: 4 s of 320x240 H.264 video at 25 fps with that speech as its AAC audio track. Each
  frame shows its index as 7 binary cells (white = 1, most significant bit left) in the top band,
  over a moving colour gradient, so a test can tell which source frame it got after scaling and JPEG.
"""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

OUT = Path("samples/media")
SENTENCE = "The quick brown fox jumps over the lazy dog. Streaming media from the server, one chunk at a time."
WIDTH, HEIGHT, FPS, SECONDS, BITS = 320, 240, 25, 4, 7


def frame_image(index: int) -> np.ndarray:
    """The RGB picture of frame `index`: binary cells of the index above a gradient that moves each frame."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([(x * 255 // WIDTH + index * 4) % 256, y * 255 // HEIGHT, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    cell = WIDTH // BITS
    image[:60] = 0
    for bit in range(BITS):
        if index >> (BITS - 1 - bit) & 1:
            image[8:52, bit * cell + 4 : (bit + 1) * cell - 4] = 255
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    speech = OUT / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(speech), SENTENCE], check=True)

    with av.open(str(speech)) as source, av.open(str(OUT / "counter.mp4"), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"crf": "30", "preset": "veryslow"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = out.add_stream("aac", rate=22050, layout="mono")
        audio.bit_rate = 32000
        for index in range(FPS * SECONDS):
            frame = av.VideoFrame.from_ndarray(frame_image(index), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        resample = av.AudioResampler(format="fltp", layout="mono", rate=22050)
        limit = SECONDS * 22050
        written = 0
        for frame in source.decode(audio=0):
            for converted in resample.resample(frame):
                if written >= limit:
                    break
                converted.pts = written
                written += converted.samples
                out.mux(audio.encode(converted))
        out.mux(audio.encode(None))


if __name__ == "__main__":
    main()
