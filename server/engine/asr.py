"""What a client asks the Whisper runner for, and Whisper's vocabulary (special tokens, timestamps). No torch.

One `TranscriptionRequest` transcribes one audio window (at most 30 s of 16 kHz mono). Its token stream
holds text tokens and, with `timestamps`, Whisper's time tokens (one every 20 ms of the window), which
`WhisperVocab.segments` turns into timed segments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30
TIME_PRECISION = 0.02  # seconds per timestamp token
LOOP_MIN_TOKENS = 6  # a span of at least this many tokens said twice in a row is Whisper looping
LOOP_MAX_TOKENS = 64
FIRST_MERGE = "Ġ t"  # rank 0 of the byte-level BPE merges that Whisper shares with GPT-2


def repeated_tail(tokens: list[int]) -> int:
    """The length p of a span the tokens end with twice over (`... X X`, LOOP_MIN_TOKENS <= p <= LOOP_MAX_TOKENS), or 0.

    Speech seldom repeats six tokens verbatim at once; a decoder stuck in a loop always does. The repeat is
    dropped and decoding stops, instead of running to the token limit (a loop costs a step per token).
    """
    n = len(tokens)
    for p in range(LOOP_MIN_TOKENS, min(LOOP_MAX_TOKENS, n // 2) + 1):
        if tokens[n - p :] == tokens[n - 2 * p : n - p]:
            return p
    return 0


@dataclass(eq=False)
class TranscriptionRequest:
    """One window: `audio` (float32, 16 kHz mono, at most 30 s), `language` (None: detected), `task`, `prompt` (previous text's token ids).

    `prefix`: tokens the transcript is forced to begin with (with timestamps, starting with a time token);
    decoding continues after them, they are not returned. `draft`: tokens the transcript likely continues with
    after the prefix (the previous window's words not final yet); the runner checks them all in the prompt's
    pass and keeps those greedy decoding would pick, so the result is the same as without them, in fewer steps.
    The runner sets `detected_language` during the prefill when `language` is None, and, for the caller's
    timing, `encoder_seconds` (its encoder call) and `draft_kept` (draft tokens kept, each a decode step saved).
    """

    audio: np.ndarray
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    timestamps: bool = True
    prompt: list[int] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)
    detected_language: str | None = None
    encoder_seconds: float = 0.0
    draft_kept: int = 0


@dataclass(frozen=True, slots=True)
class Segment:
    """Text between two time tokens, in seconds from the window's start."""

    start: float
    end: float
    text: str


def with_first_merge(spec: dict[str, Any]) -> dict[str, Any]:
    """A `tokenizer.json` with its BPE merges starting with `Ġ t`, put back where a conversion dropped it.

    The bundled whisper-base's file has 49 999 merges: the first line of Whisper's merges.txt (`Ġ t`) went
    missing, so " the", " to", " team" encoded as a space and pieces (" team": 220 975 335, not 1469). Whisper
    never says those, so a forced prefix or a draft in them threw the decoder off its own tokens.
    """
    model = spec.get("model", {})
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or "Ġt" not in model.get("vocab", {}):
        return spec
    first = merges[0] if isinstance(merges[0], str) else " ".join(merges[0])
    if first == FIRST_MERGE or any((m if isinstance(m, str) else " ".join(m)) == FIRST_MERGE for m in merges):
        return spec
    merged = FIRST_MERGE if isinstance(merges[0], str) else FIRST_MERGE.split(" ")
    return {**spec, "model": {**model, "merges": [merged, *merges]}}


class WhisperVocab:
    """Special token ids and text decoding from a Whisper `tokenizer.json` (with the `tokenizers` library)."""

    def __init__(self, tokenizer_json: Path, multilingual: bool) -> None:
        from tokenizers import Tokenizer

        self.multilingual = multilingual
        spec = json.loads(tokenizer_json.read_text())
        self.tokenizer = Tokenizer.from_str(json.dumps(with_first_merge(spec)))
        added = {t["content"]: t["id"] for t in spec["added_tokens"]}
        self.eot = added["<|endoftext|>"]
        self.sot = added["<|startoftranscript|>"]
        self.sot_prev = added["<|startofprev|>"]
        self.transcribe = added["<|transcribe|>"]
        self.translate = added["<|translate|>"]
        self.no_timestamps = added["<|notimestamps|>"]
        self.timestamp_begin = self.no_timestamps + 1
        found = {tok[2:-2]: i for tok, i in added.items() if self.sot < i < min(self.translate, self.transcribe)}
        self.languages = found if multilingual else {"en": found["en"]}
        self.language_of = {i: code for code, i in self.languages.items()}

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of the text tokens among `ids` (special and time tokens dropped)."""
        return self.tokenizer.decode([i for i in ids if i < self.eot])

    def prompt(self, request: TranscriptionRequest) -> list[int]:
        """Decoder prompt: previous text, start, language (a slot the runner fills when detecting), task, no-timestamps, prefix."""
        prev = [self.sot_prev, *request.prompt] if request.prompt else []
        language = [self.languages[request.language or "en"]] if self.multilingual else []
        task = [self.translate if request.task == "translate" else self.transcribe] if self.multilingual else []
        return [*prev, self.sot, *language, *task, *([] if request.timestamps else [self.no_timestamps]), *request.prefix]

    def timestamp(self, seconds: float) -> int:
        """The time token nearest to `seconds` (from the window's start)."""
        return self.timestamp_begin + max(0, round(seconds / TIME_PRECISION))

    def is_timestamp(self, token: int) -> bool:
        return token >= self.timestamp_begin

    def segments(self, tokens: list[int], window: float) -> tuple[list[Segment], Segment | None]:
        """Closed segments from a timestamped token stream, and the unfinished text after the last closed one.

        A segment is `<|t0|> text <|t1|>`. Unfinished text at the end (no closing time yet) is returned apart,
        as a segment from its opening time (else the last closed end) to the window's end; None when there is
        none. `window` is the audio's length: a time past it is clipped to it.
        """
        done: list[Segment] = []
        start: float | None = None
        text: list[int] = []
        for token in tokens:
            if token == self.eot:
                break
            if not self.is_timestamp(token):
                text.append(token)
                continue
            t = min((token - self.timestamp_begin) * TIME_PRECISION, window)
            if start is None:
                start = t
            elif text:
                done.append(Segment(start, t, self.decode(text)))
                start, text = None, []
            else:
                start = t
        if not text:
            return done, None
        begin = start if start is not None else (done[-1].end if done else 0.0)
        return done, Segment(begin, window, self.decode(text))
