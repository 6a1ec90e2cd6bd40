"""LocalAgreement-2 on hand-made hypotheses: what becomes final, repeated text, cut points, forcing."""

from __future__ import annotations

import numpy as np
import pytest

from streamplex.channels.agreement import LocalAgreement, text_of, timed_words
from streamplex.server.engine.asr import Segment


def test_words_are_timed_by_length() -> None:
    words = timed_words([Segment(1.0, 2.0, " ab cd."), Segment(2.0, 2.5, " e")], offset=10.0)
    assert [(w.text, round(w.start, 3), round(w.end, 3)) for w in words] == [("ab", 11.0, 11.4), ("cd.", 11.4, 12.0), ("e", 12.0, 12.5)]


def test_two_agreeing_hypotheses_make_words_final() -> None:
    la = LocalAgreement()
    assert la.update([Segment(0, 1, " The quick")], 0.0) == []
    assert text_of(la.pending) == "The quick"
    final = la.update([Segment(0, 2, " the quick, brown")], 0.0)
    assert text_of(final) == "the quick," and text_of(la.pending) == "brown"
    assert la.cut_point() is None  # the segment's last word is not final yet
    final = la.update([Segment(0, 2, " The quick brown."), Segment(2, 3, " Fox")], 0.0)
    assert text_of(final) == "brown." and text_of(la.pending) == "Fox"
    assert la.cut_point() == 2
    # after a cut, a hypothesis repeating committed words at its start does not repeat them
    final = la.update([Segment(0, 1.5, " brown. Fox jumps")], 1.9)
    assert text_of(final) == "Fox" and text_of(la.pending) == "jumps"
    assert text_of(la.force()) == "jumps" and la.pending == []
    assert text_of(la.committed) == "the quick, brown. Fox jumps"


def test_an_echo_at_the_end_is_not_final_and_made_up_words_are_dropped_at_the_end() -> None:
    said = [Segment(0, 3, " The train to the city leaves every hour.")]

    def after(*segments: Segment) -> LocalAgreement:
        la = LocalAgreement()
        la.update(said, 0.0)
        la.update(said, 0.0)
        la.update([*said, *segments], 0.0)
        return la

    echo = Segment(3, 4, " The train to the")
    la = after(echo)
    assert la.pending == [] and text_of(la.update([*said, echo], 0.0)) == ""  # agreed twice, still an echo
    assert text_of(after(Segment(3, 5, " The train to the city, and then home")).pending) == "The train to the city, and then home"  # more words follow
    assert text_of(after(Segment(3, 5, " the city, at last")).pending) == "the city, at last"
    assert text_of(after(Segment(3, 5, " at last, the city")).pending) == "at last, the city"  # two words are too few to call an echo
    la = after(Segment(3, 4, " Goodbye."), Segment(4.5, 6, " Thanks for watching."))
    assert text_of(la.finish(speech_end=4.2)) == "Goodbye."  # said after the last sound: made up


def test_speech_end() -> None:
    from streamplex.channels.transcription import speech_end

    t = np.arange(16_000) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    noise = 0.002 * np.random.default_rng(0).standard_normal(8_000).astype(np.float32)
    assert speech_end(np.concatenate([noise, tone, noise])) == pytest.approx(1.5, abs=0.02)
    assert speech_end(np.zeros(16_000, dtype=np.float32)) == 0.0


def test_looping_segments_are_dropped() -> None:
    from streamplex.channels.transcription import without_repeats

    looped = [Segment(0, 2, " The train leaves."), Segment(2, 4, " The train leaves!"), Segment(4, 5, " At noon."), Segment(5, 5, " At noon again.")]
    assert [s.text for s in without_repeats(looped)] == [" The train leaves.", " At noon."]


def test_a_looping_hypothesis_is_recognised() -> None:
    from streamplex.channels.transcription import looping

    assert looping([Segment(0, 9, " He for train to the city" + " for train to the city" * 20)])
    assert not looping([Segment(0, 9, " The weather today is sunny with a light breeze from the west. Please send the report to my office.")])


def test_an_utterance_started_over_at_its_end_is_not_final() -> None:
    la = LocalAgreement()
    said = [Segment(0, 2, " Please send the report before noon on Friday.")]
    la.update(said, 10.0)
    la.update(said, 10.0)
    la.update([*said, Segment(2, 2.6, " Please send")], 10.0)
    assert text_of(la.pending) == "Please send"
    assert text_of(la.finish(speech_end=13.0, opened=10.0)) == ""  # Whisper began the utterance again in its trailing silence
    assert text_of(la.committed) == "Please send the report before noon on Friday."


def test_only_a_restart_of_this_utterance_is_dropped_at_its_end() -> None:
    def ended(before: str, utterance: str, tail: str, opened: float | None = 10.0) -> str:
        la = LocalAgreement()
        first = [Segment(0, 2, before)]
        la.update(first, 0.0)
        la.update(first, 0.0)
        said = [Segment(0, 2, utterance)]
        la.update(said, 10.0)
        la.update(said, 10.0)
        la.update([*said, Segment(2, 2.6, tail)], 10.0)
        return text_of(la.finish(speech_end=13.0, opened=opened))

    assert ended(" We walked to the market.", " She bought bread at the market", " today") == "today"
    assert ended(" Please send it.", " She bought bread.", " Please send") == "Please send"  # the earlier utterance's words are not this one's start
    assert ended(" Hello.", " Please send the report.", " Please") == "Please"  # one word is too few to call a restart
    assert ended(" Hello.", " Please send the report.", " Please send", opened=None) == "Please send"  # the end of input, not of an utterance
