"""The translation channel: a text translated sentence by sentence (Apertium) or token by token (a neural model).

Backends:
- `apertium` (default): Debian's rule-based engine. The pairs installed under `STREAMPLEX_APERTIUM_DIR` are
  discovered at start and listed in the params schema (`GET /channels`, `x-apertium-pairs`); each pair keeps
  one pipeline process running (channels/apertium.py).
- `neural`: the seq2seq model in `STREAMPLEX_TRANSLATION_MODEL`, in the batching engine. Every sentence is one
  engine request; a stream keeps a few sentences in flight, so its sentences and other streams' decode together.

Chunks: `{"delta": "...", "sentence": i}` (the deltas of all chunks concatenate to the translation, the
original whitespace between sentences kept), then `{"text": "...", "finish_reason": "complete", "backend": ...,
"pair": ..., "sentences": n, "duration_ms": ...}`.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import ConfigDict, Field

from streamplex.channels.apertium import Apertium, ApertiumError, code3
from streamplex.server.channel import AVAILABLE, Channel, ChannelError, ChannelStatus, ParamsModel, StreamContext, model_status, skip_first
from streamplex.server.engine import EngineError, Stream
from streamplex.server.engine.detok import IncrementalDetokenizer
from streamplex.server.protocol import ErrorCode

if TYPE_CHECKING:
    from streamplex.server.engine.seq2seq import Seq2SeqRunner

IN_FLIGHT = 4  # sentences a neural stream keeps submitted ahead of the one it is streaming
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(\s+)")


class TranslationParams(ParamsModel):
    text: str = Field(min_length=1, description="The text to translate (at most `STREAMPLEX_TRANSLATION_MAX_CHARS` characters).")
    source_lang: str = Field("en", min_length=2, max_length=32, description="Source language: ISO 639-1 (`en`) or 639-3 (`eng`) code.")
    target_lang: str = Field("es", min_length=2, max_length=32, description="Target language, optionally with an Apertium variant (`ca_valencia`).")
    backend: Literal["apertium", "neural"] = Field("apertium", description="`apertium` (rule-based, default) or `neural` (the configured seq2seq model).")


def sentences(text: str) -> list[tuple[str, str]]:
    """(sentence, whitespace after it) pieces: lines, split after sentence-ending punctuation; blank pieces dropped."""
    pieces: list[tuple[str, str]] = []
    for line in re.finditer(r"[^\n]*\n*", text):
        body = line[0].rstrip("\n")
        newlines = line[0][len(body) :]
        start = 0
        for cut in SENTENCE_END.finditer(body):
            pieces.append((body[start : cut.start(1)], cut[1] if cut.end() < len(body) else cut[1] + newlines))
            start = cut.end()
        if start < len(body):
            pieces.append((body[start:], newlines))
        elif pieces and newlines and not pieces[-1][1].endswith(newlines):
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + newlines)
    return [(s.strip(), s[len(s.rstrip()) :] + sep) for s, sep in pieces if s.strip()]


class TranslationChannel(Channel):
    name = "translation"
    summary = "Machine translation streamed as it is produced: Apertium (rule-based) sentence by sentence, or a neural seq2seq model token by token."
    Params = TranslationParams
    restartable = True
    remote = True
    engine_families = ("translation",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.apertium = Apertium(self.settings.apertium_dir)

    async def start(self) -> None:
        pairs = sorted(self.apertium.pairs)
        engine = self.services.engine
        models = engine.models("translation") if engine is not None else []
        extra = {"x-apertium-pairs": pairs, "x-neural-model": models[0] if models else None}
        self.Params = type("TranslationParams", (TranslationParams,), {"model_config": ConfigDict(extra="forbid", json_schema_extra=extra)})  # type: ignore[misc,assignment,typeddict-item]  # a subclass made at run time

    async def stop(self) -> None:
        await self.apertium.close()

    def _neural(self) -> Seq2SeqRunner:
        engine = self.services.engine
        if engine is None or not engine.models("translation"):
            raise ChannelError(ErrorCode.INVALID_PARAMS, "no neural translation model is configured (STREAMPLEX_TRANSLATION_MODEL)")
        try:
            return cast("Seq2SeqRunner", engine.runner("translation"))
        except EngineError as exc:
            raise ChannelError(ErrorCode.UNAVAILABLE, exc.message) from None

    def status(self) -> ChannelStatus:
        if self.apertium.pairs:
            return AVAILABLE
        engine = self.services.engine
        if engine is not None and engine.models("translation"):
            return model_status(engine, "translation")
        return ChannelStatus("unavailable", f"no Apertium pairs under {self.settings.apertium_dir} and no neural model configured")

    def check(self, params: TranslationParams) -> None:
        if len(params.text) > self.settings.translation_max_chars:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"text has {len(params.text)} characters; the limit is {self.settings.translation_max_chars}")
        if params.backend == "apertium" and self.apertium.find(params.source_lang, params.target_lang) is None:
            supported = ", ".join(sorted(self.apertium.pairs)) or "none"
            raise ChannelError(
                ErrorCode.INVALID_PARAMS, f"no Apertium pair {code3(params.source_lang)}-{code3(params.target_lang)}; supported pairs: {supported}"
            )
        if params.backend == "neural":
            runner = self._neural()
            pair = runner.single_pair
            if pair is not None and (code3(pair[0]), code3(pair[1])) != (code3(params.source_lang), code3(params.target_lang)):
                raise ChannelError(ErrorCode.INVALID_PARAMS, f"the neural model {runner.model_name} translates {pair[0]} -> {pair[1]} only")
            if (
                pair is None
                and runner.kind != "marian"
                and (runner.target_token(params.target_lang) is None or runner.target_token(params.source_lang) is None)
            ):
                raise ChannelError(
                    ErrorCode.INVALID_PARAMS, f"the neural model {runner.model_name} has no language code for this pair; it takes {runner.languages()}"
                )

    def restarts(self, params: TranslationParams) -> bool:
        return params.backend == "apertium"  # a neural delta holds the tokens that decoded by the time it was read: timing cuts them

    def stream(self, params: TranslationParams, ctx: StreamContext) -> AsyncIterator[Any]:
        return skip_first(self._translate(params), ctx.start)  # going on elsewhere: translate from the start, send from chunk `start`

    async def _translate(self, params: TranslationParams) -> AsyncIterator[Any]:
        started = time.perf_counter()
        pieces = sentences(params.text)
        text: list[str] = []
        if params.backend == "apertium":
            pair = self.apertium.find(params.source_lang, params.target_lang)
            assert pair is not None
            pipeline = self.apertium.pipeline(pair)
            for i, (sentence, separator) in enumerate(pieces):
                try:
                    translated = await pipeline.translate(sentence)
                except ApertiumError as exc:
                    raise ChannelError(ErrorCode.INTERNAL, str(exc)) from None
                text.append(translated + separator)
                yield {"delta": translated + separator, "sentence": i}
            name = pair.name
        else:
            runner = self._neural()
            async for chunk in self._neural_stream(runner, params, pieces, text):
                yield chunk
            name = f"{code3(params.source_lang)}-{code3(params.target_lang)}"
        yield {
            "text": "".join(text),
            "finish_reason": "complete",
            "backend": params.backend,
            "pair": name,
            "sentences": len(pieces),
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }

    async def _neural_stream(self, runner: Seq2SeqRunner, params: TranslationParams, pieces: list[tuple[str, str]], text: list[str]) -> AsyncIterator[Any]:
        """Sentences in order, token deltas as they decode; up to IN_FLIGHT sentences submitted ahead."""
        engine = self.services.engine
        assert engine is not None
        max_new = self.settings.translation_max_tokens
        streams: list[Stream] = []

        def submit(i: int) -> None:
            try:
                request = runner.request(pieces[i][0], params.source_lang, params.target_lang)
                streams.append(engine.submit(runner.name, len(request.source), min(max_new, runner.max_target - len(request.prefix)), request))
            except ValueError as exc:
                raise ChannelError(ErrorCode.INVALID_PARAMS, f"sentence {i}: {exc}") from None
            except EngineError as exc:
                raise ChannelError(ErrorCode.INVALID_PARAMS if exc.code == "invalid" else ErrorCode.UNAVAILABLE, exc.message) from None

        try:
            for i in range(min(IN_FLIGHT, len(pieces))):
                submit(i)
            for i, (_, separator) in enumerate(pieces):
                if i + IN_FLIGHT < len(pieces):
                    submit(i + IN_FLIGHT)
                detok = IncrementalDetokenizer(runner.tokenizer)
                stream = streams[i]
                while (update := await stream.next()) is not None:
                    delta = detok.push(update.tokens)
                    if update.finish is not None:
                        if update.finish not in ("stop", "length"):
                            raise ChannelError(ErrorCode.INTERNAL, f"translating sentence {i} ended with {update.finish}; see the server log")
                        delta = (delta + detok.flush()).rstrip() + separator
                    if delta:
                        text.append(delta)
                        yield {"delta": delta, "sentence": i}
        finally:
            for stream in streams:
                stream.cancel()
