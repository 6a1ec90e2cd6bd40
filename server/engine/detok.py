"""Incremental detokenization: text deltas that never end inside a multi-byte character."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each push decodes a small window (the tokens of the previous delta plus the new ones) and emits the
    text past the previous delta, holding it back while it ends in U+FFFD, i.e. while the last token
    stops inside a UTF-8 sequence that the next tokens complete.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def state(self) -> tuple[int, int]:
        """Where it stands in `ids` (the window start, and how far text was given out): with the ids, enough to `restore` it."""
        return self._prefix, self._read

    def text(self, n: int) -> str:
        """The text of the first `n` ids."""
        return self._decode(self.ids[:n])

    def restore(self, ids: list[int], prefix: int, read: int) -> None:
        """Pick up where another detokenizer over `ids` stood (a stream going on on another node)."""
        self.ids = list(ids)
        self._prefix, self._read = prefix, read

    def push(self, tokens: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self.ids.extend(tokens)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]
