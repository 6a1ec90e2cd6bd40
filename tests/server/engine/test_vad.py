"""Silero VAD endpointing on real espeak-ng speech with pauses: utterance boundaries where the speech is, the same for any feeding."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from streamplex.server.engine.asr import SAMPLE_RATE
from streamplex.server.engine.vad import Boundary, Endpointer, silero
from tests.asrmodel import ENGLISH, speech


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def feed(endpointer: Endpointer, audio: np.ndarray, piece: int, pauses: bool = False) -> list[Boundary]:
    """The boundaries of `audio` fed in pieces; the pauses only with `pauses`."""
    out: list[Boundary] = []
    for i in range(0, len(audio), piece):
        out += endpointer.feed(audio[i : i + piece])
    return [b for b in out + endpointer.finish() if pauses or b.kind != "pause"]


def test_utterances_start_and_end_at_the_speech() -> None:
    first, second = speech(ENGLISH[0]), speech(ENGLISH[1])
    audio = np.concatenate([silence(1.0), first, silence(1.2), second, silence(1.0)])
    boundaries = feed(Endpointer(silero(), min_silence_ms=500, pad_ms=200), audio, SAMPLE_RATE // 10)
    assert [b.kind for b in boundaries] == ["start", "end", "start", "end"], boundaries
    start1, end1, start2, end2 = (b.at / SAMPLE_RATE for b in boundaries)
    second_at = 1.0 + len(first) / SAMPLE_RATE + 1.2
    # espeak-ng's renderings carry a little silence of their own at both ends
    assert 0.7 <= start1 <= 1.2 and 1.0 + len(first) / SAMPLE_RATE - 0.5 <= end1 <= second_at - 0.5
    assert second_at - 0.3 <= start2 <= second_at + 0.2 and end1 <= start2
    assert second_at + len(second) / SAMPLE_RATE - 0.5 <= end2 <= len(audio) / SAMPLE_RATE
    # a pause shorter than min_silence_ms does not end the utterance
    assert [b.kind for b in feed(Endpointer(silero(), min_silence_ms=2000), audio, SAMPLE_RATE)] == ["start", "end"]


def test_a_pause_comes_before_the_end_it_may_become_at_the_same_point() -> None:
    audio = np.concatenate([silence(0.5), speech(ENGLISH[0]), silence(1.2), speech(ENGLISH[1]), silence(1.0)])
    boundaries = feed(Endpointer(silero(), min_silence_ms=500, pad_ms=200), audio, 1600, pauses=True)
    kinds = [b.kind for b in boundaries]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 2, kinds
    for i, b in enumerate(boundaries):
        if b.kind == "end":  # the pause right before it marks the same point, a frame or more earlier in the feed
            assert boundaries[i - 1] == Boundary("pause", b.at), boundaries
    # espeak-ng's pauses between words are shorter than the padding: no pause inside a sentence
    assert kinds.count("pause") == 2, kinds


def test_any_feeding_gives_the_same_boundaries() -> None:
    audio = np.concatenate([silence(0.5), speech(ENGLISH[2]), silence(0.8)])
    whole = feed(Endpointer(silero()), audio, len(audio), pauses=True)
    assert whole and whole == feed(Endpointer(silero()), audio, 333, pauses=True) == feed(Endpointer(silero()), audio, 1600, pauses=True)


def test_silence_and_noise_floor_have_no_utterance() -> None:
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(5 * SAMPLE_RATE) * 0.003).astype(np.float32)
    endpointer = Endpointer(silero())
    assert feed(endpointer, np.concatenate([silence(3.0), quiet]), 1600) == []
    assert endpointer.stats() == {"frames": 8 * SAMPLE_RATE // 512, "speech_frames": 0}


def test_an_utterance_open_at_the_end_of_input_ends_there() -> None:
    audio = np.concatenate([silence(0.3), speech(ENGLISH[3])])
    boundaries = feed(Endpointer(silero(), pad_ms=200), audio, 1600)
    assert [b.kind for b in boundaries] == ["start", "end"] and boundaries[-1].at <= len(audio)


def test_a_snapshot_goes_on_elsewhere_exactly() -> None:
    """An endpointer restored from a snapshot (through JSON, as another node reads it) scores on bit for bit as the original."""
    audio = np.concatenate([silence(0.5), speech(ENGLISH[0]), silence(0.7), speech(ENGLISH[1]), silence(1.0)])
    cut = round(len(audio) * 0.4) // 512 * 512 + 100  # mid-utterance, with samples after the last whole frame
    original = Endpointer(silero(), min_silence_ms=500, pad_ms=200)
    before = feed_open(original, audio[:cut])
    copy = Endpointer(silero(), min_silence_ms=500, pad_ms=200)
    copy.restore(orjson.loads(orjson.dumps(original.snapshot())))
    assert copy.speaking and before, "the cut falls inside an utterance"
    rest_original, rest_copy = feed(original, audio[cut:], 512, pauses=True), feed(copy, audio[cut:], 512, pauses=True)
    assert rest_original and rest_copy == rest_original
    assert np.array_equal(copy.state[0], original.state[0]) and copy.snapshot() == original.snapshot()
    with pytest.raises(ValueError):
        Endpointer(silero()).restore({**original.snapshot(), "rest": base64.b64encode(bytes(4 * 512)).decode()})


def feed_open(endpointer: Endpointer, audio: np.ndarray) -> list[Boundary]:
    """The boundaries of `audio` fed in 100 ms pieces, the input left open."""
    return [b for i in range(0, len(audio), 1600) for b in endpointer.feed(audio[i : i + 1600])]
