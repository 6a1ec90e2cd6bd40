"""Endpointing in the transcription channel with the real Whisper base and Silero VAD: a pause brings the utterance's final at once, silence costs no decoding."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from typing import Any

import numpy as np
import pytest

from streamplex.channels import transcription
from streamplex.channels.transcription import TranscriptionChannel
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import END_OF_INPUT, Services, StreamContext
from streamplex.server.config import Settings
from streamplex.server.engine import Engine
from streamplex.server.engine.asr import SAMPLE_RATE
from streamplex.server.engine.engine import Stream
from streamplex.server.engine.vad import FRAME
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from tests.asrmodel import ENGLISH, bundled_whisper, engine_with, speech, wer


def pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def steps(engine: Engine) -> int:
    return engine.stats[bundled_whisper().name].steps


class Live:
    """One pushed transcription stream on the channel, its chunks collected as they come."""

    def __init__(self, engine: Engine, **params: Any) -> None:
        settings = Settings(api_keys="k", chat_model="")
        channel = TranscriptionChannel(Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict, engine=engine))
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.chunks: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._collect(channel, channel.parse({"language": "en", **params})))

    async def _collect(self, channel: TranscriptionChannel, params: Any) -> None:
        async for chunk in channel.stream(params, StreamContext("s", self.queue)):
            self.chunks.append(chunk)
            self.arrived.set()

    def push(self, audio: np.ndarray) -> None:
        data = pcm(audio)
        for i in range(0, len(data), SAMPLE_RATE // 5):  # 100 ms frames
            self.queue.put_nowait(data[i : i + SAMPLE_RATE // 5])

    def finals(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c["type"] == "final"]

    async def final_text(self, reference: str, after: int = 0) -> str:
        """The text of the finals after the first `after`, once it holds `reference` (at most 2 words of 12 wrong); fails if it never does."""
        async with asyncio.timeout(180):
            while wer(reference, text := " ".join(c["text"] for c in self.finals()[after:])) > 0.2:
                self.arrived.clear()
                await self.arrived.wait()
        return text

    async def end(self) -> dict[str, Any]:
        self.queue.put_nowait(END_OF_INPUT)
        await asyncio.wait_for(self.task, 180)
        return self.chunks[-1]


async def test_a_pause_brings_the_final_of_the_whole_utterance() -> None:
    """The stream holds the sentence and 0.8 s of pause, nothing more: the final of every word comes (no second agreeing hypothesis, no end of input)."""
    async with engine_with(bundled_whisper()) as engine:
        live = Live(engine, min_silence_ms=500)
        live.push(np.concatenate([silence(0.6), speech(ENGLISH[0]), silence(0.8)]))
        first = await live.final_text(ENGLISH[0])
        finals = live.finals()
        assert finals[0]["start"] >= 0.3 and finals[-1]["end"] <= 0.6 + len(speech(ENGLISH[0])) / SAMPLE_RATE + 0.4, finals
        live.push(np.concatenate([speech(ENGLISH[1]), silence(0.8)]))
        second = await live.final_text(ENGLISH[1], after=len(finals))
        assert live.finals()[len(finals)]["start"] >= finals[-1]["end"]
        transcript = await live.end()
        assert transcript["text"] == f"{first} {second}", live.chunks


async def test_silence_costs_no_decoding() -> None:
    async with engine_with(bundled_whisper()) as engine:
        before = steps(engine)
        live = Live(engine)
        live.push(silence(12.0))
        transcript = await live.end()
        assert transcript == {"type": "transcript", "text": "", "language": "en", "duration_s": 12.0, "segments": 0}
        assert steps(engine) == before, "silence was decoded"

        # after an utterance's final, a long pause decodes nothing either
        live = Live(engine)
        live.push(np.concatenate([speech(ENGLISH[2]), silence(0.8)]))
        await live.final_text(ENGLISH[2])
        after_final = steps(engine)
        live.push(silence(10.0))
        transcript = await live.end()
        assert steps(engine) == after_final, "the pause after the utterance was decoded"
        assert wer(ENGLISH[2], transcript["text"]) <= 0.2, transcript


async def test_without_vad_the_pause_is_decoded() -> None:
    """The contrast: `vad` false decodes every step of silence as before."""
    async with engine_with(bundled_whisper()) as engine:
        before = steps(engine)
        live = Live(engine, vad=False)
        live.push(silence(3.0))
        await live.end()
        assert steps(engine) > before


async def test_audio_faster_than_it_is_transcribed_keeps_its_words() -> None:
    """Pushed all at once, the loop takes a second at a time: a pause, the end and the next start come in one piece, and each utterance is transcribed on its own audio."""
    async with engine_with(bundled_whisper()) as engine:
        live = Live(engine)
        live.push(np.concatenate([part for text in ENGLISH for part in (speech(text), silence(0.6))]))
        transcript = await live.end()
        assert wer(" ".join(ENGLISH), transcript["text"]) <= 0.15, live.chunks
        assert transcript["segments"] >= len(ENGLISH), live.chunks


async def test_the_utterances_final_goes_first_and_its_log_adds_up(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Steps of an utterance are drafts (priority 0), none on its trailing silence; its transcription at the pause makes the final with priority 1; each final's timing is logged, its phases adding up."""
    async with engine_with(bundled_whisper()) as engine:
        submitted: list[tuple[int, int]] = []  # (priority, samples of audio)
        submit = engine.submit

        def watched(runner: str, prompt_len: int, max_new: int, payload: Any, priority: int = 0) -> Stream:
            submitted.append((priority, len(payload.audio)))
            return submit(runner, prompt_len, max_new, payload, priority)

        monkeypatch.setattr(engine, "submit", watched)
        live = Live(engine, step_ms=1000)  # at a 1 s step, the sentence's last words are left to the pause's transcription
        sentence = speech(ENGLISH[3])
        with caplog.at_level(logging.DEBUG, logger=transcription.log.name):
            live.push(np.concatenate([silence(0.3), sentence, silence(0.8)]))
            text = await live.final_text(ENGLISH[3])
        assert wer(ENGLISH[3], text) <= 0.2
        assert [p for p, _ in submitted] == [0] * (len(submitted) - 1) + [1], submitted
        assert all(n <= (0.3 + 0.1) * SAMPLE_RATE + len(sentence) for p, n in submitted if p == 0), "a step decoded the trailing silence"
        logged = [r.getMessage() for r in caplog.records if ": final (" in r.getMessage()]
        assert logged and "final (end, decoded at pause)" in logged[-1], logged
        for line in logged:
            phases = {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", line)}
            assert min(phases[k] for k in ("after_word", "wait", "queue", "prefill", "encoder", "steps", "hold")) >= 0, line
            assert phases["encoder"] <= phases["prefill"] and phases["kept"] <= phases["draft"], line
            assert abs(sum(phases[k] for k in ("after_word", "wait", "queue", "prefill", "steps", "hold")) - phases["total"]) < 0.01, line
        transcript = await live.end()
        assert transcript["text"] == text, live.chunks


async def test_steps_come_every_half_second_after_an_utterances_first_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `vad` and a `step_ms` of 500, an utterance is not transcribed before 1 s of it (shorter audio makes hypotheses up)."""
    async with engine_with(bundled_whisper()) as engine:
        sizes: list[int] = []
        submit = engine.submit

        def watched(runner: str, prompt_len: int, max_new: int, payload: Any, priority: int = 0) -> Stream:
            if priority == 0:
                sizes.append(len(payload.audio))
            return submit(runner, prompt_len, max_new, payload, priority)

        monkeypatch.setattr(engine, "submit", watched)
        live = Live(engine, step_ms=500)
        live.push(np.concatenate([silence(0.3), speech(ENGLISH[3]), silence(0.8)]))
        text = await live.final_text(ENGLISH[3])
        assert wer(ENGLISH[3], text) <= 0.2
        assert sizes and sizes[0] >= transcription.FIRST_STEP_SECONDS * SAMPLE_RATE - FRAME, sizes
        assert len(sizes) >= 3 and any(abs(b - a - SAMPLE_RATE // 2) <= FRAME for a, b in itertools.pairwise(sizes)), sizes
        await live.end()
