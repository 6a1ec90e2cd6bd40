"""The Whisper runner on the real bundled Whisper base: exact against transformers, batching changes nothing, speech is understood."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from streamplex.server.engine.asr import SAMPLE_RATE, Segment, TranscriptionRequest, WhisperVocab, repeated_tail
from streamplex.server.engine.whisper import padded_samples
from tests.asrmodel import ENGLISH, SPANISH, bundled_whisper, engine_with, speech, transcribe, wer


def test_padding_and_segments() -> None:
    assert padded_samples(SAMPLE_RATE * 3) == SAMPLE_RATE * 4
    assert padded_samples(SAMPLE_RATE * 3 + 1) == SAMPLE_RATE * 41 // 10
    assert padded_samples(SAMPLE_RATE * 40) == SAMPLE_RATE * 30
    vocab = bundled_whisper().vocab
    assert isinstance(vocab, WhisperVocab)
    ts = vocab.timestamp_begin
    hello, world = vocab.encode(" Hello"), vocab.encode(" world")
    segments, tail = vocab.segments([ts, *hello, ts + 50, ts + 50, *world, ts + 400, ts + 400, *hello, vocab.eot], window=5.0)
    assert [(s.start, s.end, s.text) for s in segments] == [(0.0, 1.0, " Hello"), (1.0, 5.0, " world")]
    assert tail == Segment(5.0, 5.0, " Hello")
    _, tail = vocab.segments([ts + 25, *hello, *world], window=5.0)
    assert tail == Segment(0.5, 5.0, " Hello world")


def test_repeated_tail() -> None:
    loop = [5, 6, 7, 8, 9, 10]
    assert repeated_tail([1, 2, *loop, *loop]) == 6
    assert repeated_tail([1, 2, *loop, *loop[:5]]) == 0  # not twice yet
    assert repeated_tail([3, 4, 3, 4, 3, 4, 3, 4]) == 0  # short repeats are speech ("no, no, no")
    assert repeated_tail(list(range(200))) == 0


async def test_full_window_equals_transformers_generate() -> None:
    runner = bundled_whisper()
    audio = speech(ENGLISH[0])
    window = np.pad(audio, (0, 30 * SAMPLE_RATE - len(audio)))
    async with engine_with(runner) as engine:
        tokens, finish = await transcribe(engine, runner, TranscriptionRequest(window, "en"))
    assert finish == "stop"
    features = runner.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.to(runner.device)
    with torch.inference_mode():
        expected = runner.model.generate(features, language="en", task="transcribe", return_timestamps=True)[0].tolist()
    assert tokens == [t for t in expected if t != runner.vocab.eot]


async def test_batched_windows_equal_alone_and_are_understood() -> None:
    runner = bundled_whisper()
    requests = {
        "en0": lambda: TranscriptionRequest(speech(ENGLISH[0]), "en"),
        "en1": lambda: TranscriptionRequest(speech(ENGLISH[1]), "en", timestamps=False),
        "es": lambda: TranscriptionRequest(speech(SPANISH, voice="es"), None),
        "en2": lambda: TranscriptionRequest(np.concatenate([speech(ENGLISH[2]), speech(ENGLISH[3])]), "en"),
    }
    async with engine_with(runner) as engine:
        alone = {k: await transcribe(engine, runner, make()) for k, make in requests.items()}
        made = {k: make() for k, make in requests.items()}
        victim = engine.submit(runner.name, 4, 100, TranscriptionRequest(speech(ENGLISH[3]), "en"))
        together = asyncio.gather(*(transcribe(engine, runner, r) for r in made.values()))
        await victim.next()
        victim.cancel()
        results = dict(zip(made, await together, strict=True))
        assert runner.stats()["rows"] == 0
    assert results == alone
    assert made["es"].detected_language == "es"
    text = {k: runner.vocab.decode(tokens) for k, (tokens, _) in results.items()}
    assert wer(ENGLISH[0], text["en0"]) <= 0.15, text
    assert wer(ENGLISH[1], text["en1"]) <= 0.15, text
    assert wer(ENGLISH[2] + " " + ENGLISH[3], text["en2"]) <= 0.15, text
    segments, _ = runner.vocab.segments(results["en2"][0], window=len(made["en2"].audio) / SAMPLE_RATE)
    assert len(segments) >= 2 and all(0 <= s.start < s.end <= len(made["en2"].audio) / SAMPLE_RATE for s in segments)


async def test_a_draft_changes_the_steps_not_the_tokens() -> None:
    runner = bundled_whisper()
    vocab = runner.vocab
    assert vocab is not None
    audio = np.concatenate([speech(ENGLISH[2]), speech(ENGLISH[3])])
    steps = kept = 0
    decode = runner._decode

    def counted() -> list:
        nonlocal steps
        steps += 1
        return decode()

    runner._decode = counted  # type: ignore[method-assign]
    try:
        async with engine_with(runner) as engine:

            async def run(language: str | None = "en", prefix: list[int] | None = None, draft: list[int] | None = None) -> tuple[list[int], int]:
                nonlocal steps, kept
                steps = 0
                request = TranscriptionRequest(audio, language, prefix=prefix or [], draft=draft or [])
                tokens, finish = await transcribe(engine, runner, request)
                assert finish == "stop" and request.encoder_seconds > 0
                kept = request.draft_kept
                return tokens, steps

            plain, plain_steps = await run()
            assert len(plain) > 12 and wer(ENGLISH[2] + " " + ENGLISH[3], vocab.decode(plain)) <= 0.15
            guessed, guessed_steps = await run(draft=plain[:10])
            assert guessed == plain and guessed_steps == plain_steps - 10 and kept == 10
            wrong = [*plain[:4], *vocab.encode(" purple elephants dance")]
            assert await run(draft=wrong) == (plain, plain_steps - 4) and kept == 4
            assert (await run(draft=[*plain, *plain]))[0] == plain  # a draft past the end of the transcript
            assert (await run(language=None, draft=plain[:6]))[0] == plain
            prefixed, prefixed_steps = await run(prefix=plain[:5])
            assert await run(prefix=plain[:5], draft=prefixed[:6]) == (prefixed, prefixed_steps - 6)
    finally:
        del runner._decode
    assert runner.stats()["rows"] == 0


async def test_words_encode_as_whisper_says_them_so_a_final_with_the_agreed_prefix_is_the_full_decode() -> None:
    """The channel forces the final words as re-encoded text (`prefix`) and sends the rest as a draft: both must be Whisper's own tokens.

    Re-encoding the transcript's text gives back its tokens (the bundled tokenizer.json lacked the first merge,
    `Ġ t`: " team" was 220 975 335). Decoding after the agreed words as a prefix gives, in words, the full decode;
    with the rest as a draft, every draft token is kept, so the final costs the steps of the rest's end only.
    """
    runner = bundled_whisper()
    vocab = runner.vocab
    assert vocab is not None
    assert vocab.encode(" Our team will meet in the library") == [2621, 1469, 486, 1677, 294, 264, 6405]
    audio = speech(ENGLISH[3])
    async with engine_with(runner) as engine:
        full, _ = await transcribe(engine, runner, TranscriptionRequest(audio, "en"))
        text = [t for t in full if t < vocab.eot]
        assert vocab.encode(vocab.decode(text)) == text and wer(ENGLISH[3], vocab.decode(text)) <= 0.1
        words = vocab.decode(text).split()
        agreed, rest = words[:5], words[5:]
        prefix = [full[0], *vocab.encode(" " + " ".join(agreed))]
        request = TranscriptionRequest(audio, "en", prefix=prefix, draft=vocab.encode(" " + " ".join(rest)))
        tokens, finish = await transcribe(engine, runner, request)
        assert finish == "stop" and request.draft_kept == len(request.draft)
        assert vocab.decode([*prefix, *tokens]).split() == words


@pytest.fixture(autouse=True)
def _espeak() -> None:
    import os
    import shutil

    if shutil.which("espeak-ng") is None and not os.environ.get("STREAMPLEX_SPEECH_CACHE"):
        pytest.fail("espeak-ng is missing: run scripts/setup --test")
