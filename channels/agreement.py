"""LocalAgreement-2 for live transcription: which words of successive Whisper hypotheses are final.

The audio buffer is re-transcribed as it grows; a word becomes final once two consecutive hypotheses
agree on it and on every word before it (the policy of whisper_streaming, Macháček et al. 2023). Words
are timed by spreading each Whisper segment's time over its words by their length. The buffer is cut
at the end of a segment whose words are all final, so it stays short (the encoder's cost grows with it).
Pure bookkeeping: no audio, no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import takewhile

from streamplex.server.engine.asr import Segment

TAIL_OVERLAP = 5  # words of committed text a new hypothesis may repeat at its start
ECHO_WORDS = 3  # a hypothesis ending with at least this many words said just before, in order, ends with an echo
ECHO_WINDOW = 40  # final words searched for such an echo


@dataclass(frozen=True, slots=True)
class Word:
    """A word with its times in seconds from the start of the stream."""

    start: float
    end: float
    text: str

    @property
    def key(self) -> str:
        """The word as compared between hypotheses (case and punctuation ignored)."""
        return re.sub(r"[^\w']", "", self.text.lower())


def timed_words(segments: list[Segment], offset: float) -> list[Word]:
    """Words of timed segments, each segment's span shared among its words by their length."""
    words: list[Word] = []
    for seg in segments:
        parts = seg.text.split()
        total = sum(len(p) for p in parts)
        if not total:
            continue
        t, per_char = seg.start, (seg.end - seg.start) / total
        for part in parts:
            words.append(Word(offset + t, offset + t + per_char * len(part), part))
            t += per_char * len(part)
    return words


def text_of(words: list[Word]) -> str:
    return " ".join(w.text for w in words)


class LocalAgreement:
    """Commits the longest prefix two consecutive hypotheses share; tracks where the buffer may be cut."""

    def __init__(self) -> None:
        self.committed: list[Word] = []
        self.pending: list[Word] = []  # the latest hypothesis' words after the committed ones
        self.cut_points: list[float] = []  # ends of hypothesis segments, where the buffer may be cut once committed

    @property
    def committed_until(self) -> float:
        return self.committed[-1].end if self.committed else 0.0

    def _new_words(self, words: list[Word]) -> list[Word]:
        """The hypothesis' words after what is committed: by time (word middles, as word times are estimates), then minus a repeated tail of committed text."""
        fresh = [w for w in words if (w.start + w.end) / 2 >= self.committed_until]
        for n in range(min(TAIL_OVERLAP, len(fresh), len(self.committed)), 0, -1):
            if [w.key for w in self.committed[-n:]] == [w.key for w in fresh[:n]]:
                return fresh[n:]
        return fresh

    def _without_echo(self, words: list[Word]) -> list[Word]:
        """The words less an echo at their end: ECHO_WORDS or more that repeat, in order, words said just before.

        Whisper fills silence at the end of the audio by saying recent words again ("...the main station. The
        train to the city"), the same way each time, so two hypotheses would agree on it. Speech that truly
        repeats itself is kept once more words follow it.
        """
        keys = [w.key for w in self.committed[-ECHO_WINDOW:]] + [w.key for w in words]
        for n in range(len(words), ECHO_WORDS - 1, -1):
            tail, before = keys[-n:], keys[:-n]
            if any(before[i : i + n] == tail for i in range(len(before) - n + 1)):
                return words[:-n]
        return words

    def update(self, segments: list[Segment], offset: float) -> list[Word]:
        """Take a new hypothesis of the buffer starting at `offset` s; return the words it makes final."""
        words = self._without_echo(self._new_words(timed_words(segments, offset)))
        agreed = 0
        while agreed < min(len(words), len(self.pending)) and words[agreed].key == self.pending[agreed].key:
            agreed += 1
        final = words[:agreed]
        self.committed += final
        self.pending = words[agreed:]
        self.cut_points = [offset + s.end for s in segments]
        return final

    def finish(self, speech_end: float, opened: float | None = None) -> list[Word]:
        """At the end of input: the pending words become final, less those starting past `speech_end` (stream time, where the audio's last sound ends).

        The last hypothesis is seen once, with no later one to disagree with it, and Whisper often makes up a
        sentence in the silence after the last word. At the end of an utterance that began at stream time
        `opened`, it also often starts the utterance over ("... before noon on Friday. Please send"): pending
        words at the end that repeat the utterance's first two or more words are dropped too.
        """
        self.pending = [w for w in self.pending if w.start < speech_end]
        if opened is not None:  # the utterance's final words are the last ones: read back from the end, not the whole stream
            said = list(takewhile(lambda w: (w.start + w.end) / 2 >= opened, reversed(self.committed)))[::-1]
            self.pending = self._without_restart(said)
        return self.force()

    def _without_restart(self, said: list[Word]) -> list[Word]:
        """The pending words less a tail that repeats, from its first word, the utterance whose final words so far are `said`."""
        keys = [w.key for w in said + self.pending]
        for n in range(min(len(self.pending), len(keys) // 2), 1, -1):
            if keys[-n:] == keys[:n]:
                return self.pending[:-n]
        return self.pending

    def force(self) -> list[Word]:
        """Make every pending word final (the buffer is full and must be cut)."""
        final, self.pending = self.pending, []
        self.committed += final
        return final

    def cut_point(self) -> float | None:
        """The latest segment end that lies within the committed words, or None."""
        done = [t for t in self.cut_points if t <= self.committed_until + 0.01]
        return max(done) if done else None
