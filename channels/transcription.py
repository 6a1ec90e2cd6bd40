"""The transcription channel: live speech-to-text with Whisper in the batching engine.

Input: a media file (`source` under the media folder, or `audio_url`) decoded with PyAV and resampled to
16 kHz mono, or, with neither, audio the client pushes as it records: binary frames of 16 kHz mono PCM
s16le (any whole number of samples per frame), ended by `{"op":"push","id":...,"end":true}`.

Every `step_ms` of new audio the stream's buffer (at most 30 s) is transcribed again in the engine, which
batches the windows of all live streams; the buffer's final words are forced as the start of the
transcript, so only the words after them are decoded again. LocalAgreement-2 (channels/agreement.py)
decides which words are final. With voice-activity detection (`vad`, on by default; Silero VAD, see
server/engine/vad.py), only utterances are transcribed: audio outside them is never decoded, and a pause
of `min_silence_ms` ends the utterance, whose remaining words are made final at once after one last decode
(not after two agreeing hypotheses). Chunks:
- `{"type":"language","language":"fr","detected":true}` once the language is known;
- `{"type":"partial","start":s,"end":s,"text":...}`: the words after the final ones (may still change);
- `{"type":"final","start":s,"end":s,"text":...}`: words that will not change (times in seconds of audio);
- last, `{"type":"transcript","text":...,"language":...,"duration_s":...,"segments":n}`: the whole text.

With voice-activity detection, audio is taken one 32 ms frame at a time, so that what is decoded when depends on the
audio only, never on how fast it arrives: a live stream goes on on another node (docs/protocol.md#resume-across-nodes)
(or a file's) from its last saved state (saved at least every second of audio and after every chunk), the client
sending its audio again from the start of the buffer that state holds (the file is read again); the server
acknowledges (`ack`) the pushed audio before that point.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from streamplex.channels.agreement import LocalAgreement, Word, text_of
from streamplex.channels.media import MediaRef, local_media, media_ref
from streamplex.channels.pacing import Clock
from streamplex.server.channel import CannotGoOn, Channel, ChannelError, ChannelStatus, ParamsModel, Skip, StreamContext, model_status
from streamplex.server.engine import Engine, EngineError
from streamplex.server.engine.asr import SAMPLE_RATE, WINDOW_SECONDS, Segment, TranscriptionRequest, repeated_tail
from streamplex.server.engine.vad import FRAME, Endpointer, VadUnavailable, silero
from streamplex.server.protocol import ErrorCode

if TYPE_CHECKING:
    from streamplex.server.engine.whisper import WhisperRunner

log = logging.getLogger(__name__)

TRIM_SECONDS = 3.0  # cut the buffer at a final segment's end once it is longer than this
FORCE_SECONDS = 24.0  # a buffer still this long after trimming has its pending words made final and is cut
MAX_COMPRESSION = 2.4  # Whisper's compression-ratio threshold for a looping transcript
MIN_SEGMENT_SECONDS = 0.05  # shorter segments are Whisper looping at the window's end
KEEP_SECONDS = 5.0  # audio kept after such a forced cut
MAX_PENDING_SECONDS = 30.0  # audio received but not yet transcribed; beyond it pushed input waits (the push queue fills)
FIRST_STEP_SECONDS = 1.0  # an utterance's first step waits for this much of it (a `step_ms` under it): two hypotheses of less agree on made-up words
TAIL_SECONDS = 0.3  # at the end of input, pending words starting this long after the last sound were made up, not heard
PROMPT_CHARS = 200  # final text before the buffer given to Whisper as context
BLOCK = SAMPLE_RATE // 10  # file audio is read in 100 ms blocks
ARRIVALS = 1024  # received blocks whose arrival times are kept (to time a final from its audio's arrival)
SAVE_SECONDS = 1.0  # a live stream saves its state at least this often (in audio), so that the acknowledged input advances in silence
KEEP_WORDS = 200  # final words a saved state keeps as words (the prompt, prefix and echo check look back less far); earlier ones as text


class TranscriptionParams(ParamsModel):
    source: str | None = Field(None, description="An audio or video file under the media folder; omit (with `audio_url`) to push live audio.")
    audio_url: str | None = Field(None, description="An http(s) media URL, when the server allows URLs.")
    language: str | None = Field(None, description="Spoken language code (`en`, `fr`, ...); omitted: detected from the first window.")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="`translate` gives English text from any language.")
    partials: bool = Field(True, description="Send partial segments (words not final yet) after each step.")
    model: str | None = Field(None, description="A configured transcription model (default: the first).")
    step_ms: int = Field(
        1000,
        ge=200,
        le=10_000,
        description="Audio between re-transcriptions of the buffer (with `vad`, an utterance's first after 1 s of it).",
    )
    realtime: bool = Field(False, description="Read a file source at its real pace (as if live); false reads it as fast as it is transcribed.")
    vad: bool | None = Field(
        None,
        description="Endpoint with voice-activity detection: a pause ends an utterance and makes its words final at once; silence is not decoded. Default: the `asr_vad` setting.",
    )
    vad_threshold: float | None = Field(None, gt=0.15, lt=1.0, description="Speech probability at which a 32 ms frame is speech. Default: `asr_vad_threshold`.")
    min_silence_ms: int | None = Field(None, ge=100, le=10_000, description="Silence that ends an utterance. Default: `asr_vad_min_silence_ms`.")
    speech_pad_ms: int | None = Field(None, ge=0, le=2_000, description="Audio kept before and after an utterance's voiced frames. Default: `asr_vad_pad_ms`.")

    @model_validator(mode="after")
    def _one_source(self) -> TranscriptionParams:
        if self.source is not None and self.audio_url is not None:
            raise ValueError("give at most one of `source` and `audio_url` (neither: push live audio)")
        return self


def pcm_s16le(item: Any) -> np.ndarray:
    """Float32 samples of one pushed binary frame of 16 kHz mono s16le PCM."""
    if not isinstance(item, bytes):
        raise ChannelError(ErrorCode.INVALID_PARAMS, "push live audio as binary frames of 16 kHz mono PCM s16le, not JSON")
    if len(item) % 2:
        raise ChannelError(ErrorCode.INVALID_PARAMS, f"a pushed audio frame of {len(item)} bytes is not whole 16-bit samples")
    return np.frombuffer(item, dtype="<i2").astype(np.float32) / 32768.0


class _Audio:
    """Audio received and not yet transcribed, filled by a feeder task; bounded (the feeder waits when full)."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.samples = 0
        self.ended = False
        self.error: BaseException | None = None
        self.changed = asyncio.Condition()
        self.received = 0  # samples put so far
        self.taken = 0  # samples taken so far
        self.arrivals: deque[tuple[int, float]] = deque(maxlen=ARRIVALS)  # (samples received, when) per block

    def arrival(self, sample: int) -> float | None:
        """When the `sample`-th sample put had arrived (perf_counter), or None if that is no longer known."""
        for received, at in self.arrivals:
            if received >= sample:
                return at
        return None

    async def put(self, block: np.ndarray) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.samples < MAX_PENDING_SECONDS * SAMPLE_RATE)
            self.blocks.append(block)
            self.samples += len(block)
            self.received += len(block)
            self.arrivals.append((self.received, time.perf_counter()))
            self.changed.notify_all()

    async def close(self, error: BaseException | None = None) -> None:
        async with self.changed:
            self.ended, self.error = True, error
            self.changed.notify_all()

    async def take(self, at_least: int, at_most: int) -> np.ndarray | None:
        """Wait for `at_least` samples (or the end); return up to `at_most`; None once ended and empty."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.samples >= at_least or self.ended)
            if self.error is not None:
                raise self.error
            if not self.samples:
                return None
            taken: list[np.ndarray] = []
            wanted = at_most
            while wanted and self.blocks:  # from the front, without joining what stays (taking a frame at a time from 30 s)
                block = self.blocks[0]
                if len(block) <= wanted:
                    taken.append(self.blocks.pop(0))
                    wanted -= len(block)
                else:
                    taken.append(block[:wanted])
                    self.blocks[0] = block[wanted:]
                    wanted = 0
            out = np.concatenate(taken) if len(taken) != 1 else taken[0]
            self.samples -= len(out)
            self.taken += len(out)
            self.changed.notify_all()
            return out


@dataclass(frozen=True, slots=True)
class DecodeTiming:
    """Where one transcription of the buffer spent its time: perf_counter instants, encoder seconds, token counts."""

    why: str  # what started it: a `step`, a `pause`, the `end` of an utterance
    audio_end: int  # stream sample its audio ended at
    submitted: float
    admitted: float  # its engine step began (the end of its wait in the queue)
    first: float  # the step that encoded the audio and ran the prompt and the draft ended
    finished: float
    encoder: float
    tokens: int
    draft: int  # draft tokens sent, of which `kept` were kept (each a decode step saved)
    kept: int


class TranscriptionChannel(Channel):
    name = "transcription"
    summary = "Live speech-to-text (Whisper, batched across streams): partial and final timed segments from pushed PCM or a media file."
    Params = TranscriptionParams
    accepts_push = True
    restartable = True
    saves_state = True
    engine_families = ("transcription",)

    @property
    def engine(self) -> Engine | None:
        return self.services.engine

    def status(self) -> ChannelStatus:
        return model_status(self.engine, "transcription")

    def check(self, params: TranscriptionParams) -> None:
        self._runner(params)
        self._endpointer(params)
        if params.source is not None or params.audio_url is not None:
            media_ref(self.settings, params.source, params.audio_url, "audio_url")

    def acks_input(self, params: TranscriptionParams) -> bool:
        return params.source is None and params.audio_url is None

    def restarts(self, params: TranscriptionParams) -> bool:
        # With voice-activity detection the audio is decoded by frames, the same whatever its pace: live audio (sent
        # again by the client) and a file (read again here) go on; a URL may answer other bytes, and without VAD the
        # decode points follow the audio's arrival.
        return params.audio_url is None and (self.settings.asr_vad if params.vad is None else params.vad)

    def _runner(self, params: TranscriptionParams) -> WhisperRunner:
        if self.engine is None:
            raise ChannelError(ErrorCode.UNAVAILABLE, "the model engine is not running")
        models = self.engine.models("transcription")
        if params.model is not None and params.model not in models:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"unknown model {params.model!r}; available: {', '.join(models) or 'none'}")
        try:
            runner = cast("WhisperRunner", self.engine.runner("transcription", params.model))
        except EngineError as exc:
            raise ChannelError(ErrorCode.INVALID_PARAMS if exc.code == "invalid" else ErrorCode.UNAVAILABLE, exc.message) from None
        assert runner.vocab is not None
        if params.language is not None and params.language not in runner.vocab.languages:
            known = ", ".join(sorted(runner.vocab.languages))
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"language {params.language!r} is not one {runner.model_name} knows: {known}")
        if params.task == "translate" and not runner.vocab.multilingual:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"{runner.model_name} is English-only and cannot translate")
        return runner

    def _endpointer(self, params: TranscriptionParams) -> Endpointer | None:
        """The stream's voice-activity endpointer, or None when `vad` is off."""
        s = self.settings
        if not (s.asr_vad if params.vad is None else params.vad):
            return None
        try:
            vad = silero()
        except VadUnavailable as exc:
            raise ChannelError(ErrorCode.UNAVAILABLE, f"{exc} (or subscribe with `vad` false)") from None
        return Endpointer(
            vad,
            s.asr_vad_threshold if params.vad_threshold is None else params.vad_threshold,
            s.asr_vad_min_silence_ms if params.min_silence_ms is None else params.min_silence_ms,
            s.asr_vad_pad_ms if params.speech_pad_ms is None else params.speech_pad_ms,
        )

    async def stream(self, params: TranscriptionParams, ctx: StreamContext) -> AsyncIterator[Any]:
        runner = self._runner(params)
        endpointer = self._endpointer(params)
        audio = _Audio()
        going_on = ctx.start > 0 or ctx.saved is not None
        if going_on and (endpointer is None or not self.restarts(params)):
            raise CannotGoOn("only live audio or a file, with voice-activity detection, goes on on another node")
        if params.source is None and params.audio_url is None:
            feeder = self._feed_pushed(ctx, audio)
        else:
            # going on elsewhere, the file is read from the start of the saved state's buffer
            start = _buffer_start(ctx.saved) if ctx.saved is not None else 0
            feeder = self._feed_file(media_ref(self.settings, params.source, params.audio_url, "audio_url"), params.realtime, audio, start)
        task = asyncio.create_task(feeder, name=f"transcription-feed-{ctx.stream_id}")
        try:
            transcriber = _Transcriber(self.engine, runner, params, ctx.stream_id)
            if endpointer is None:
                async for chunk in transcriber.run(audio):
                    yield chunk
            else:
                if going_on:
                    if ctx.saved_at > ctx.start:
                        raise CannotGoOn(f"its saved state is after chunk {ctx.saved_at}, the client has {ctx.start}")
                    try:
                        if ctx.saved is not None:
                            await transcriber.restore(ctx.saved, endpointer, audio)
                    except (KeyError, TypeError, ValueError) as exc:
                        raise CannotGoOn(f"its saved state is not one this node can read ({type(exc).__name__}: {exc})") from None
                transcriber.skip = Skip(ctx.start - ctx.saved_at)
                async for chunk in transcriber.run_vad(audio, endpointer, ctx, fresh=ctx.saved is None):
                    yield chunk
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _feed_pushed(self, ctx: StreamContext, audio: _Audio) -> None:
        try:
            async for item in ctx.pushed():
                samples = pcm_s16le(item)
                if len(samples):
                    await audio.put(samples)
        except Exception as exc:  # handed to the transcriber, which raises it in the stream
            await audio.close(exc)
        else:
            await audio.close()

    async def _feed_file(self, ref: MediaRef, realtime: bool, audio: _Audio, start: int = 0) -> None:
        """Decode the file into `audio` from sample `start` on (decoding what comes before it without keeping it)."""
        from streamplex.channels.media_decode import AudioDecoder, MediaLimits

        clock, sent = Clock(), 0
        try:
            async with (
                local_media(self.settings, ref) as path,
                AudioDecoder(path, ref.label, sample_rate=SAMPLE_RATE, channels=1, limits=MediaLimits.of(self.settings)) as decoder,
            ):
                async for block in decoder.blocks(BLOCK):
                    samples = block[0][max(0, start - sent) :]
                    sent += block.shape[1]
                    if not len(samples):
                        continue
                    if realtime:
                        await clock.at((sent - len(samples) - start) / SAMPLE_RATE)
                    await audio.put(samples)
        except Exception as exc:  # handed to the transcriber, which raises it in the stream
            await audio.close(exc)
        else:
            await audio.close()


class _Transcriber:
    """One stream's loop: take new audio, transcribe the buffer, apply LocalAgreement, cut the buffer."""

    def __init__(self, engine: Engine | None, runner: WhisperRunner, params: TranscriptionParams, stream_id: str) -> None:
        assert engine is not None and runner.vocab is not None
        self.engine, self.runner, self.vocab = engine, runner, runner.vocab
        self.params = params
        self.stream_id = stream_id
        self.language = params.language if runner.vocab.multilingual else "en"
        self.buffer = np.zeros(0, dtype=np.float32)
        self.offset = 0.0  # stream time of the buffer's first sample
        self.agreement = LocalAgreement()
        self.last_partial: str | None = None
        self.finals = 0
        self.windows = 0
        self.head = ""  # final text before the words `agreement.committed` holds (a stream going on from a saved state)
        self.received = 0  # samples of the stream so far: the buffer ends there
        self.speaking = False
        self.decoded_at = 0.0  # stream time of the buffer's end at its last transcription
        self.opened = 0.0  # stream time where the current (or last) utterance began
        self.skip = Skip(0)  # chunks made again that the client already has (going on from a saved state)
        self.last_decode: DecodeTiming | None = None
        self.audio: _Audio | None = None  # for the arrival times of its samples

    async def run(self, audio: _Audio) -> AsyncIterator[Any]:
        """Without voice-activity detection: every `step_ms` of audio the buffer is transcribed again."""
        step = self.params.step_ms * SAMPLE_RATE // 1000
        started = time.perf_counter()
        self.audio = audio
        if self.language is not None:
            yield {"type": "language", "language": self.language, "detected": False}
        while True:
            room = WINDOW_SECONDS * SAMPLE_RATE - len(self.buffer)
            new = await audio.take(min(step, room), room)
            if new is None:
                break
            self.buffer = np.concatenate([self.buffer, new])
            self.received += len(new)
            chunks, final = await self._advance("step")
            for chunk in chunks + self._settle(final):
                yield chunk
        final = self.agreement.finish(self.offset + speech_end(self.buffer) + TAIL_SECONDS)  # the last hypothesis was made with all the audio
        if final:
            yield self._final(final, "end")
        duration = self.offset + len(self.buffer) / SAMPLE_RATE
        log.info("transcription %s: %.1f s of audio in %d windows, %.1f s", self.stream_id, duration, self.windows, time.perf_counter() - started)
        yield self._transcript(duration)

    async def run_vad(self, audio: _Audio, endpointer: Endpointer, ctx: StreamContext, fresh: bool = True) -> AsyncIterator[Any]:
        """With voice-activity detection: only utterances are transcribed (every `step_ms` of one); a pause ends one with a final at once.

        Outside an utterance the buffer keeps only the padding an utterance may start with, and nothing is decoded.
        Audio is taken one frame at a time (and the state saved after each frame that made chunks, else every
        SAVE_SECONDS of audio), so that the chunks depend on the audio only.
        """
        step = self.params.step_ms * SAMPLE_RATE // 1000
        preroll = endpointer.pad + FRAME
        started = time.perf_counter()
        saved_at = self.received
        self.audio = audio
        if fresh and self.language is not None:
            for chunk in self._out([{"type": "language", "language": self.language, "detected": False}]):
                yield chunk
        while True:
            room = WINDOW_SECONDS * SAMPLE_RATE - len(self.buffer)
            new = await audio.take(min(FRAME, room), min(FRAME, room))
            if new is None:
                break
            chunks = await self._frame(new, endpointer, step, preroll)
            for chunk in self._out(chunks):
                yield chunk
            if not self.skip.left and (chunks or self.received - saved_at >= SAVE_SECONDS * SAMPLE_RATE):
                saved_at = self.received
                ctx.save(2 * (self.received - len(self.buffer)), functools.partial(self.state, endpointer))
        chunks = []
        for boundary in endpointer.finish():
            chunks += await self._end_utterance(boundary.at / SAMPLE_RATE, self.decoded_at)
        duration = self.received / SAMPLE_RATE
        stats = endpointer.stats()
        log.info(
            "transcription %s: %.1f s of audio (%.0f%% speech by VAD) in %d windows, %.1f s",
            self.stream_id,
            duration,
            100 * stats["speech_frames"] / max(1, stats["frames"]),
            self.windows,
            time.perf_counter() - started,
        )
        for chunk in self._out([*chunks, self._transcript(duration)]):
            yield chunk

    async def _frame(self, new: np.ndarray, endpointer: Endpointer, step: int, preroll: int) -> list[dict[str, Any]]:
        """Take one frame of audio: its utterance boundaries, and a transcription when `step` of an utterance came since the last."""
        self.buffer = np.concatenate([self.buffer, new])
        self.received += len(new)
        chunks: list[dict[str, Any]] = []
        for boundary in endpointer.feed(new):
            if boundary.kind == "start":
                self._cut(boundary.at / SAMPLE_RATE)
                self.speaking, self.decoded_at, self.opened = True, self.offset, self.offset
            elif boundary.kind == "pause" and self.decoded_at < boundary.at / SAMPLE_RATE:
                # transcribe the utterance up to the pause now: if the pause ends it, its final needs no decoding then
                chunks += await self._transcribe_until(boundary.at / SAMPLE_RATE)
                self.decoded_at = boundary.at / SAMPLE_RATE
            else:
                chunks += await self._end_utterance(boundary.at / SAMPLE_RATE, self.decoded_at)
                self.speaking = False
        if not self.speaking:
            self._cut((self.received - preroll) / SAMPLE_RATE)
        elif len(self.buffer) >= WINDOW_SECONDS * SAMPLE_RATE or (
            endpointer.silent_since is None
            and self.received / SAMPLE_RATE - self.decoded_at >= step / SAMPLE_RATE
            and self.received / SAMPLE_RATE - self.opened >= FIRST_STEP_SECONDS
        ):  # no step while the utterance's last frames are silent: the pause's transcription would follow within `pad`
            self.decoded_at = self.received / SAMPLE_RATE
            advanced, final = await self._advance("step")
            chunks += advanced + self._settle(final)
        return chunks

    def _out(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chunks to send: those the client does not have yet (going on from a saved state, it has the first few)."""
        return [chunk for chunk in chunks if not self.skip()]

    def state(self, endpointer: Endpointer) -> dict[str, Any]:
        """Everything the stream carries from frame to frame but its buffer's audio (which the client sends again), as JSON."""
        committed = self.agreement.committed
        head = " ".join(t for t in (self.head, text_of(committed[:-KEEP_WORDS])) if t)
        return {
            "received": self.received,
            "buffered": len(self.buffer),
            "offset": self.offset,
            "speaking": self.speaking,
            "decoded_at": self.decoded_at,
            "opened": self.opened,
            "language": self.language,
            "finals": self.finals,
            "windows": self.windows,
            "last_partial": self.last_partial,
            "head": head,
            "committed": [[w.start, w.end, w.text] for w in committed[-KEEP_WORDS:]],
            "pending": [[w.start, w.end, w.text] for w in self.agreement.pending],
            "cut_points": self.agreement.cut_points,
            "vad": endpointer.snapshot(),
        }

    async def restore(self, state: dict[str, Any], endpointer: Endpointer, audio: _Audio) -> None:
        """Carry on from another node's `state`: its buffer is the first audio the client sends again (raises
        ValueError, KeyError or TypeError when `state` is not one, CannotGoOn when the input ends before it)."""
        buffered, received = int(state["buffered"]), int(state["received"])
        if not 0 <= buffered <= min(received, WINDOW_SECONDS * SAMPLE_RATE):
            raise ValueError("its buffer is not within the stream")
        self.received, self.offset = received, float(state["offset"])
        self.speaking, self.decoded_at = bool(state["speaking"]), float(state["decoded_at"])
        self.opened = float(state.get("opened", self.offset))  # a state saved before `opened` was kept
        language = state["language"]
        self.language = language if isinstance(language, str) or language is None else str(language)
        self.finals, self.windows = int(state["finals"]), int(state["windows"])
        self.last_partial = state["last_partial"] if state["last_partial"] is None else str(state["last_partial"])
        self.head = str(state["head"])
        self.agreement.committed = [Word(float(a), float(b), str(t)) for a, b, t in state["committed"]]
        self.agreement.pending = [Word(float(a), float(b), str(t)) for a, b, t in state["pending"]]
        self.agreement.cut_points = [float(t) for t in state["cut_points"]]
        endpointer.restore(state["vad"])
        buffer = await audio.take(buffered, buffered) if buffered else np.zeros(0, dtype=np.float32)
        if buffer is None or len(buffer) < buffered:
            raise CannotGoOn("the client's audio ended before the point its saved state was at")
        self.buffer = buffer

    async def _transcribe_until(self, at: float) -> list[dict[str, Any]]:
        """Transcribe the buffer's audio before stream time `at` only (audio after it, already received when the loop lags, is kept for later)."""
        split = min(len(self.buffer), max(0, round((at - self.offset) * SAMPLE_RATE)))
        rest = self.buffer[split:]
        self.buffer = self.buffer[:split]
        chunks, final = await self._advance("pause")
        chunks += self._settle(final)
        self.buffer = np.concatenate([self.buffer, rest])
        return chunks

    async def _end_utterance(self, end: float, decoded_at: float) -> list[dict[str, Any]]:
        """An utterance ended at stream time `end`: transcribe it once more if audio came since, make all its words final; the buffer keeps the audio after it."""
        split = min(len(self.buffer), max(0, round((end - self.offset) * SAMPLE_RATE)))
        rest = self.buffer[split:]
        self.buffer = self.buffer[:split]
        chunks: list[dict[str, Any]] = []
        final: list[Word] = []
        if len(self.buffer) and decoded_at < end - 0.01:
            chunks, final = await self._advance("end")
        final += self.agreement.finish(end, self.opened)
        if final:
            chunks.append(self._final(final, "end"))
        self.buffer, self.offset = rest, end
        if self.params.partials and self.last_partial:
            self.last_partial = ""
            chunks.append(_segment("partial", []))
        return chunks

    async def _advance(self, why: str) -> tuple[list[dict[str, Any]], list[Word]]:
        """Transcribe the buffer (`why`: at a `step`, a `pause`, the `end` of an utterance): the language chunk if it was just detected, and the words the new hypothesis makes final."""
        segments, language = await self._transcribe(why)
        self.windows += 1
        chunks: list[dict[str, Any]] = []
        if self.language is None:
            self.language = language
            chunks.append({"type": "language", "language": language, "detected": True})
        return chunks, self.agreement.update(segments, self.offset)

    def _settle(self, final: list[Word]) -> list[dict[str, Any]]:
        """After a hypothesis: the final chunk, the buffer cut behind final segments (or forced short), and a changed partial."""
        chunks = [self._final(final)] if final else []
        cut = self.agreement.cut_point()
        if cut is not None and cut > self.offset and len(self.buffer) > TRIM_SECONDS * SAMPLE_RATE:
            self._cut(cut)
        if len(self.buffer) > FORCE_SECONDS * SAMPLE_RATE:
            forced = self.agreement.force()
            if forced:
                chunks.append(self._final(forced, "forced"))
            # still too long (silence, or one endless segment): keep the last few seconds only
            self._cut(max(self.agreement.committed_until, self.offset + len(self.buffer) / SAMPLE_RATE - KEEP_SECONDS))
        if self.params.partials:
            text = text_of(self.agreement.pending)
            if text != self.last_partial:
                self.last_partial = text
                chunks.append(_segment("partial", self.agreement.pending))
        return chunks

    def _transcript(self, duration: float) -> dict[str, Any]:
        return {
            "type": "transcript",
            "text": " ".join(t for t in (self.head, text_of(self.agreement.committed)) if t),
            "language": self.language,
            "duration_s": round(duration, 3),
            "segments": self.finals,
        }

    def _final(self, words: list[Word], kind: str = "agreed") -> dict[str, Any]:
        """A final chunk (`kind`: `agreed` by two hypotheses, the `end` of an utterance, `forced`), its timing logged."""
        self.finals += 1
        self._log_final(words[-1].end, kind)
        return _segment("final", words)

    def _log_final(self, word_end: float, kind: str) -> None:
        """Log (DEBUG) where a final spent its time, from the arrival of its last word's audio (stream time `word_end`) to now.

        `after_word`: from the word's arrival to the arrival of the end of the audio that the transcription making it
        final had (at a `step`, a `pause` or an utterance's `end`); `wait`: from then to that transcription's
        submission (the stream's loop was busy); then its `queue`, `prefill` (of which `encoder`) and decode
        `steps`; `hold`: from its end to the final (an utterance's end not yet reached). They add up to `total`.
        """
        d, audio = self.last_decode, self.audio
        if d is None or audio is None or not log.isEnabledFor(logging.DEBUG):
            return
        base = self.received - audio.taken  # stream sample of the audio's first sample (going on from a saved state, not 0)
        heard, decoded = audio.arrival(round(word_end * SAMPLE_RATE) - base), audio.arrival(d.audio_end - base)
        if heard is None or decoded is None:
            return
        now = time.perf_counter()
        log.debug(
            "transcription %s: final (%s, decoded at %s) at %.2f s: after_word=%.3f wait=%.3f queue=%.3f prefill=%.3f encoder=%.3f steps=%.3f hold=%.3f total=%.3f tokens=%d draft=%d kept=%d",
            self.stream_id,
            kind,
            d.why,
            word_end,
            decoded - heard,
            d.submitted - decoded,
            d.admitted - d.submitted,
            d.first - d.admitted,
            d.encoder,
            d.finished - d.first,
            now - d.finished,
            now - heard,
            d.tokens,
            d.draft,
            d.kept,
        )

    def _cut(self, at: float) -> None:
        """Drop the buffer's audio before stream time `at`."""
        drop = min(len(self.buffer), max(0, round((at - self.offset) * SAMPLE_RATE)))
        self.buffer = self.buffer[drop:]
        self.offset += drop / SAMPLE_RATE

    def _prompt(self) -> list[int]:
        before = [w for w in self.agreement.committed if w.end <= self.offset + 0.01]
        text = text_of(before)[-PROMPT_CHARS:]
        return self.vocab.encode(" " + text)[-64:] if text else []

    def _prefix(self) -> tuple[list[int], float]:
        """Final words inside the buffer, forced as the transcript's start (so they are not decoded again), and where they end."""
        inside = [w for w in self.agreement.committed if (w.start + w.end) / 2 >= self.offset]
        if not inside:
            return [], 0.0
        start = self.vocab.timestamp(inside[0].start - self.offset)
        return [start, *self.vocab.encode(" " + text_of(inside))], self.agreement.committed_until - self.offset

    async def _transcribe(self, why: str) -> tuple[list[Segment], str | None]:
        """Timed segments of the buffer after its final words, and the language; a looping hypothesis is retried without the prefix, then dropped."""
        segments, language = await self._hypothesis(True, why)
        if looping(segments):
            segments, language = await self._hypothesis(False, why)
        if looping(segments):
            log.info("transcription %s: a hypothesis that loops was dropped", self.stream_id)
            return [], language
        return segments, language

    async def _hypothesis(self, prefixed: bool, why: str) -> tuple[list[Segment], str | None]:
        """Timed segments of the buffer after its final words (unfinished text at the end runs to the buffer's end), and the language."""
        prefix, resume = self._prefix() if prefixed else ([], 0.0)
        pending = self.agreement.pending if prefixed else []
        draft = self.vocab.encode(" " + text_of(pending)) if pending else []
        if draft and not prefix:  # the transcript opens with a time token: the pending words' own start
            draft.insert(0, self.vocab.timestamp(max(0.0, pending[0].start - self.offset)))
        request = TranscriptionRequest(self.buffer, self.language, self.params.task, True, self._prompt(), prefix, draft)
        prompt = self.vocab.prompt(request)
        tokens: list[int] = []
        try:
            # an utterance's transcription at its pause or end (its final) goes ahead of any stream's step (a draft)
            stream = self.engine.submit(self.runner.name, len(prompt), self.runner.max_new_tokens(len(prompt)), request, priority=0 if why == "step" else 1)
        except EngineError as exc:
            raise ChannelError(ErrorCode.INVALID_PARAMS if exc.code == "invalid" else ErrorCode.UNAVAILABLE, exc.message) from None
        async with stream:
            while (update := await stream.next()) is not None:
                tokens += update.tokens
                if update.finish == "error":
                    raise ChannelError(ErrorCode.INTERNAL, "transcription failed; see the server log")
                if update.finish == "cancelled":
                    raise ChannelError(ErrorCode.UNAVAILABLE, "the model engine stopped")
        finished = stream.finished or time.perf_counter()
        self.last_decode = DecodeTiming(
            why,
            round(self.offset * SAMPLE_RATE) + len(request.audio),
            stream.submitted,
            stream.admitted or stream.submitted,
            stream.first_token or finished,
            finished,
            request.encoder_seconds,
            len(tokens),
            len(draft),
            request.draft_kept,
        )
        del tokens[len(tokens) - repeated_tail(tokens) :]  # the runner stopped a loop after its second round
        window = len(self.buffer) / SAMPLE_RATE
        segments, tail = self.vocab.segments([self.vocab.timestamp(resume), *tokens] if prefix else tokens, window)
        if tail is not None:
            segments.append(tail)
        return without_repeats(segments), request.detected_language


def _buffer_start(state: Any) -> int:
    """The sample a saved state's buffer starts at (0 for a state that is not one: `restore` refuses it)."""
    try:
        return max(0, int(state["received"]) - int(state["buffered"]))
    except (KeyError, TypeError, ValueError):
        return 0


def speech_end(audio: np.ndarray) -> float:
    """Seconds into `audio` where its last sound ends: the end of the last 20 ms frame louder than a tenth of its loud frames (and -60 dBFS)."""
    frame = SAMPLE_RATE // 50
    frames = len(audio) // frame
    if not frames:
        return len(audio) / SAMPLE_RATE
    rms = np.sqrt(np.mean(np.square(audio[: frames * frame].reshape(frames, frame), dtype=np.float64), axis=1))
    voiced = np.flatnonzero(rms > max(0.1 * float(np.percentile(rms, 95)), 1e-3))
    return float((voiced[-1] + 1) * frame / SAMPLE_RATE) if len(voiced) else 0.0


def looping(segments: list[Segment]) -> bool:
    """Whether a hypothesis repeats itself, by Whisper's own test: its text compresses more than 2.4 to 1 with zlib."""
    text = "".join(s.text for s in segments).encode()
    return len(text) > 40 and len(text) / len(zlib.compress(text)) > MAX_COMPRESSION


def without_repeats(segments: list[Segment]) -> list[Segment]:
    """Drop Whisper's looping: segments of no duration (time tokens pinned at the window's end) and a segment repeating the one before."""
    kept: list[Segment] = []
    for seg in segments:
        if seg.end - seg.start < MIN_SEGMENT_SECONDS or (kept and Word(0, 0, seg.text).key == Word(0, 0, kept[-1].text).key):
            continue
        kept.append(seg)
    return kept


def _segment(kind: str, words: list[Word]) -> dict[str, Any]:
    if not words:
        return {"type": kind, "start": None, "end": None, "text": ""}
    return {"type": kind, "start": round(words[0].start, 3), "end": round(words[-1].end, 3), "text": text_of(words)}
