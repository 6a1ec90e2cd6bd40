"""Reading a WAV file as the transcription channel's input: 16 kHz mono PCM s16le (standard library only)."""

from __future__ import annotations

import array
import sys
import wave
from pathlib import Path

TARGET_RATE = 16000


def _mono(samples: array.array, channels: int) -> list[float]:
    if channels == 1:
        return [float(s) for s in samples]
    return [sum(samples[i : i + channels]) / channels for i in range(0, len(samples), channels)]


def resample(samples: list[float], rate: int, target: int = TARGET_RATE) -> list[float]:
    """Linear interpolation to `target` Hz, after a box filter as wide as the step when downsampling."""
    if rate == target or not samples:
        return samples
    step = rate / target
    width = int(step)
    if width > 1:  # average each run of `width` samples first, so that decimation does not alias as badly
        cumulative = [0.0]
        for s in samples:
            cumulative.append(cumulative[-1] + s)
        samples = [(cumulative[min(i + width, len(samples))] - cumulative[i]) / (min(i + width, len(samples)) - i) for i in range(len(samples))]
    out = []
    position = 0.0
    last = len(samples) - 1
    while position <= last:
        i = int(position)
        frac = position - i
        out.append(samples[i] if i == last else samples[i] * (1 - frac) + samples[i + 1] * frac)
        position += step
    return out


def read_wav_s16le(path: Path) -> bytes:
    """The file's audio as 16 kHz mono 16-bit little-endian PCM; ValueError for a WAV that is not 8/16-bit PCM."""
    with wave.open(str(path), "rb") as wav:
        width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    if width == 2:
        samples = array.array("h", frames)
        if sys.byteorder == "big":
            samples.byteswap()
    elif width == 1:  # unsigned 8-bit
        samples = array.array("h", ((b - 128) << 8 for b in frames))
    else:
        raise ValueError(f"{path}: {8 * width}-bit WAV; use 8- or 16-bit PCM (e.g. `ffmpeg -i in.wav -ac 1 -ar 16000 -sample_fmt s16 out.wav`)")
    mono = resample(_mono(samples, channels), rate)
    out = array.array("h", (max(-32768, min(32767, round(s))) for s in mono))
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()
