"""Speech and the real bundled Whisper base for transcription tests: espeak-ng sentences, a WER, one model load per session."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import subprocess
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torchaudio

from streamplex.server.config import Settings
from streamplex.server.engine import Engine, Limits
from streamplex.server.engine.asr import SAMPLE_RATE, TranscriptionRequest
from streamplex.server.engine.device import cpu_threads
from streamplex.server.engine.runner import RunnerSpec
from streamplex.server.engine.whisper import WhisperRunner
from tests.device import TEST_DEVICE

ENGLISH = [
    "The weather today is sunny with a light breeze from the west.",
    "Please send the report to my office before noon on Friday.",
    "She bought three apples and a loaf of bread at the market.",
    "Our team will meet in the library after lunch to plan the project.",
]
SPANISH = "Buenos días, me gustaría reservar una mesa para cuatro personas esta noche."


def speech_wav(text: str, voice: str = "en-us", rate: int = 160) -> bytes:
    """A WAV file (22.05 kHz mono s16le) of espeak-ng reading `text`.

    With STREAMPLEX_SPEECH_CACHE set to a folder, each rendering is kept there and read back, so that a
    machine without espeak-ng (the GPU machine of bench/cuda.sh) runs on speech rendered elsewhere.
    """
    cache_dir = os.environ.get("STREAMPLEX_SPEECH_CACHE")
    cached = Path(cache_dir) / f"{hashlib.sha256(f'{voice}|{rate}|{text}'.encode()).hexdigest()[:24]}.wav" if cache_dir else None
    if cached is not None and cached.is_file():
        return cached.read_bytes()
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text], capture_output=True, check=True).stdout
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(wav)
    return wav


def speech(text: str, voice: str = "en-us", rate: int = 160) -> np.ndarray:
    """espeak-ng reading `text`, as 16 kHz mono float32."""
    with wave.open(io.BytesIO(speech_wav(text, voice, rate))) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        rate_in = w.getframerate()
    return torchaudio.functional.resample(torch.from_numpy(pcm), rate_in, SAMPLE_RATE).numpy()


def words(text: str) -> list[str]:
    return re.sub(r"[^\w' ]", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's length (case and punctuation ignored)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        diagonal, row[0] = row[0], i
        for j in range(1, len(hyp) + 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)] / max(1, len(ref))


@cache
def bundled_whisper() -> WhisperRunner:
    """The loaded Whisper base runner (on TEST_DEVICE, CPU by default, as the server runs it), shared by every test module."""
    runner = WhisperRunner("whisper-base", Settings().cache_dir, TEST_DEVICE, torch.float32, cpu_threads(0), quantize=Settings().asr_cpu_quantize)
    runner.load()
    return runner


@asynccontextmanager
async def engine_with(runner: WhisperRunner, **limits: int) -> AsyncIterator[Engine]:
    """An engine around `runner`, started and ready, stopped afterwards."""
    engine = Engine([RunnerSpec("transcription", runner.model_name, lambda: runner)], Limits(**limits))
    await engine.start()
    try:
        while not engine.ready("transcription"):
            await asyncio.sleep(0.01)
        yield engine
    finally:
        await engine.stop()


async def transcribe(engine: Engine, runner: WhisperRunner, request: TranscriptionRequest) -> tuple[list[int], str | None]:
    """Every token of one window through the engine, and its finish reason."""
    assert runner.vocab is not None
    prompt = runner.vocab.prompt(request)
    tokens: list[int] = []
    async with engine.submit(runner.name, len(prompt), runner.max_new_tokens(len(prompt)), request) as stream:
        while (update := await stream.next()) is not None:
            tokens += update.tokens
            finish = update.finish
    return tokens, finish
