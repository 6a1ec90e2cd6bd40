"""text: a document in chunks of characters, words, sentences or UTF-8 bytes, as fast as read or paced."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from streamplex.channels.content import Text, shared_text
from streamplex.channels.files import read_text_blocks, resolve_inside
from streamplex.channels.pacing import Pacer
from streamplex.server.channel import Channel, ParamsModel, StreamContext

MAX_INLINE_CHARS = 1_000_000

# A word is a run of non-space with the whitespace that follows it; a sentence runs through its
# closing punctuation (and any closing quotes or brackets) and the whitespace after it.
_WORD = re.compile(r"\s*\S+\s*" r"|\s+")
_SENTENCE = re.compile(r".*?(?:[.!?\u2026\u3002\uff01\uff1f]+[\"'\u2019\u201d)\]]*(?:\s+|$)|\n\s*\n\s*)", re.DOTALL)


class TextParams(ParamsModel):
    text: str | None = Field(None, max_length=MAX_INLINE_CHARS, description="Inline text to stream.")
    document: str | None = Field(None, max_length=1024, description="A file under the server's documents folder (UTF-8).")
    unit: Literal["chars", "words", "sentences", "bytes"] = Field("chars", description="What `chunk_size` counts.")
    chunk_size: int = Field(10, ge=1, le=65536, description="Units per chunk.")
    interval_ms: int = Field(0, ge=0, le=60000, description="Pause between chunks; 0 streams as fast as the client reads.")
    _shared: Text | None = PrivateAttr(None)  # keeps the interned text alive while this stream holds it

    @model_validator(mode="after")
    def _one_source(self) -> TextParams:
        if (self.text is None) == (self.document is None):
            raise ValueError("give exactly one of `text` or `document`")
        if self.text is not None:  # identical inline texts are held once
            self._shared = shared_text(self.text)
            self.text = self._shared.value
        return self


class Units:
    """Splits text arriving in blocks into chars, words or sentences, one at a time (no list of the block's units)."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.rest = ""  # the unfinished unit at the end of the last block

    def feed(self, block: str, final: bool = False) -> Iterator[str]:
        """The complete units of `rest + block`; with `final`, the remainder too."""
        text, self.rest = self.rest + block, ""
        if self.unit == "chars":
            yield from text
            return
        pattern = _WORD if self.unit == "words" else _SENTENCE
        last: str | None = None
        consumed = 0
        for match in pattern.finditer(text):
            if match.end() > match.start():
                if last is not None:
                    yield last
                last, consumed = match.group(0), match.end()
        tail = text[consumed:]
        if last is not None:
            if final or tail:
                yield last
            else:  # the block ends where the unit does: it may go on in the next block
                self.rest = last
        if tail:
            if final:
                yield tail
            else:
                self.rest = tail


def utf8_pieces(text: str, size: int) -> Iterator[str]:
    """Pieces of at most `size` UTF-8 bytes that never split a character (a wider character stands alone)."""
    raw = text.encode("utf-8")
    start = 0
    while start < len(raw):
        end = min(start + size, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # never end inside a character
            end -= 1
        if end == start:  # one character wider than `size`
            end = start + 1
            while end < len(raw) and raw[end] & 0xC0 == 0x80:
                end += 1
        yield raw[start:end].decode("utf-8")
        start = end


class TextChannel(Channel):
    name = "text"
    summary = "A document in chunks of chars, words, sentences or bytes; the chunks concatenate to the exact text."
    Params = TextParams
    restartable = True

    def check(self, params: TextParams) -> None:
        if params.document is not None:
            resolve_inside(self.settings.documents_dir, params.document, "document")

    async def _blocks(self, params: TextParams) -> AsyncIterator[str]:
        if params.text is not None:
            yield params.text
            return
        async for block in read_text_blocks(resolve_inside(self.settings.documents_dir, params.document or "", "document")):
            yield block

    async def _chunks(self, params: TextParams) -> AsyncIterator[str]:
        if params.unit == "bytes":
            carry = ""
            async for block in self._blocks(params):
                last: str | None = None  # held back: it may end inside a character the next block completes
                for piece in utf8_pieces(carry + block, params.chunk_size):
                    if last is not None:
                        yield last
                    last = piece
                carry = last or ""
            if carry:
                yield carry
            return
        units = Units(params.unit)
        pending: list[str] = []
        async for block in self._blocks(params):
            for unit in units.feed(block):
                pending.append(unit)
                if len(pending) == params.chunk_size:
                    yield "".join(pending)
                    pending.clear()
        for unit in units.feed("", final=True):
            pending.append(unit)
            if len(pending) == params.chunk_size:
                yield "".join(pending)
                pending.clear()
        if pending:
            yield "".join(pending)

    async def stream(self, params: TextParams, ctx: StreamContext) -> AsyncIterator[str]:
        pace = Pacer(params.interval_ms)
        skip = ctx.start
        async for chunk in self._chunks(params):
            if skip:  # the client has it already (the stream goes on after its node died)
                skip -= 1
                continue
            await pace.wait()
            yield chunk
