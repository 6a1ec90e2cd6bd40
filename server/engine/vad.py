"""Voice-activity detection for live transcription: Silero VAD (v6, the ONNX file that ships in the `faster-whisper` package) on onnxruntime.

`SileroVad` is the process' one inference session; `Endpointer` follows one stream. It scores each 32 ms
frame (512 samples at 16 kHz, with the 64 samples before it as context, the recurrent state carried from
frame to frame) and turns the scores into utterance boundaries: an utterance starts at the first frame
scoring at least `threshold` (moved back by `pad_ms`, never before the previous utterance's end), and ends
once frames have scored below `threshold - 0.15` for `min_silence_ms` (the hysteresis of Silero's own
iterator), at the last voiced frame's end plus `pad_ms`. Before that, once the silence has lasted `pad_ms`,
a `pause` marks the same point: the caller may transcribe the utterance then, so that its words are ready
when (and if) the pause turns out to end it. Pure bookkeeping over sample counts: the caller keeps the audio. Importing this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import base64
import importlib.util
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamplex.server.engine.asr import SAMPLE_RATE

FRAME = 512  # samples Silero scores at a time at 16 kHz (32 ms)
CONTEXT = 64  # samples of the frame before, prepended to each frame
STATE = (1, 1, 128)
HYSTERESIS = 0.15  # a frame is silence below threshold minus this
PACKAGE = "faster_whisper"
ASSET = "assets/silero_vad_v6.onnx"


class VadUnavailable(Exception):
    """The Silero model or onnxruntime is not installed."""


def silero_path() -> Path:
    """The Silero VAD ONNX file inside the `faster-whisper` package, found without importing it (its imports need ctranslate2)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("voice-activity detection needs `pip install --no-deps faster-whisper` (it carries the Silero VAD model)")
    path = Path(next(iter(spec.submodule_search_locations))) / ASSET
    if not path.is_file():
        raise VadUnavailable(f"no Silero VAD model at {path}")
    return path


class SileroVad:
    """One onnxruntime session of Silero VAD, shared by all streams (each keeps its own recurrent state)."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise VadUnavailable("voice-activity detection needs `pip install onnxruntime`") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # a few frames per call: threads cost more than they save
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def scores(self, frames: np.ndarray, state: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Speech probabilities of consecutive frames (rows of CONTEXT + FRAME samples), and the state after them."""
        with self._lock:
            probs, h, c = self.session.run(None, {"input": frames.astype(np.float32, copy=False), "h": state[0], "c": state[1]})
        return np.asarray(probs, dtype=np.float32).reshape(-1), (h, c)


@cache
def silero() -> SileroVad:
    """The process' Silero VAD session, loaded on first use (about 1 MB, well under a second)."""
    return SileroVad(silero_path())


@dataclass(frozen=True, slots=True)
class Boundary:
    """An utterance's start or end, or a pause in it that may end it (at the end it would have), in samples from the start of the stream."""

    kind: Literal["start", "pause", "end"]
    at: int


class Endpointer:
    """One stream's utterance boundaries from its audio, fed in pieces of any length (whole frames are scored as they fill)."""

    def __init__(self, vad: SileroVad, threshold: float = 0.5, min_silence_ms: int = 500, pad_ms: int = 200) -> None:
        self.vad = vad
        self.threshold = threshold
        self.min_silence = min_silence_ms * SAMPLE_RATE // 1000
        self.pad = pad_ms * SAMPLE_RATE // 1000
        self.state: tuple[np.ndarray, np.ndarray] = (np.zeros(STATE, np.float32), np.zeros(STATE, np.float32))
        self.context = np.zeros(CONTEXT, np.float32)
        self.rest = np.zeros(0, np.float32)  # samples after the last whole frame
        self.scored = 0  # samples scored so far (stream position of `rest`)
        self.speaking = False
        self.voiced_end = 0  # end of the last frame scoring at least `threshold`
        self.silent_since: int | None = None  # start of the current run of silent frames in an utterance
        self.paused = False  # the current silence was announced as a pause
        self.floor = 0  # the previous utterance's end: the next one starts no earlier
        self.frames = 0
        self.speech_frames = 0

    def feed(self, samples: np.ndarray) -> list[Boundary]:
        """Score the whole frames `samples` completes; the boundaries they reveal, in order."""
        joined = np.concatenate([self.rest, samples]) if len(self.rest) else samples
        n = len(joined) // FRAME
        self.rest = joined[n * FRAME :].copy()
        if not n:
            return []
        frames = joined[: n * FRAME].reshape(n, FRAME)
        contexts = np.concatenate([self.context[None, :], frames[:-1, -CONTEXT:]])
        self.context = frames[-1, -CONTEXT:].copy()
        probs, self.state = self.vad.scores(np.concatenate([contexts, frames], axis=1), self.state)
        out: list[Boundary] = []
        for p in probs:
            start, end = self.scored, self.scored + FRAME
            self.scored = end
            self.frames += 1
            if p >= self.threshold:
                self.speech_frames += 1
                if not self.speaking:
                    self.speaking = True
                    out.append(Boundary("start", max(self.floor, start - self.pad)))
                self.voiced_end, self.silent_since, self.paused = end, None, False
            elif self.speaking and p < self.threshold - HYSTERESIS:
                if self.silent_since is None:
                    self.silent_since = start
                if not self.paused and end - self.voiced_end >= self.pad:
                    self.paused = True
                    out.append(Boundary("pause", self.voiced_end + self.pad))
                if end - self.silent_since >= self.min_silence:
                    out.append(self._close(end))
        return out

    def finish(self) -> list[Boundary]:
        """At the end of input: the end of an utterance still open."""
        return [self._close(self.scored + len(self.rest))] if self.speaking else []

    def _close(self, now: int) -> Boundary:
        self.speaking, self.silent_since, self.paused = False, None, False
        self.floor = min(self.voiced_end + self.pad, now)
        return Boundary("end", self.floor)

    def stats(self) -> dict[str, Any]:
        return {"frames": self.frames, "speech_frames": self.speech_frames}

    def snapshot(self) -> dict[str, Any]:
        """Everything the endpointer carries from frame to frame, as JSON (arrays as base64 of their float32 bytes), for `restore`."""
        arrays = {"h": self.state[0], "c": self.state[1], "context": self.context, "rest": self.rest}
        fields = ("scored", "speaking", "voiced_end", "silent_since", "paused", "floor", "frames", "speech_frames")
        return {
            **{k: base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() for k, v in arrays.items()},
            **{k: getattr(self, k) for k in fields},
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Carry on from a `snapshot` (another node's); raise ValueError (KeyError, TypeError) when it is not one."""

        def array(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
            values = np.frombuffer(base64.b64decode(snap[name], validate=True), dtype="<f4").astype(np.float32)
            return values.reshape(shape) if shape is not None else values

        self.state = (array("h", STATE), array("c", STATE))
        self.context, self.rest = array("context", (CONTEXT,)), array("rest")
        if len(self.rest) >= FRAME:
            raise ValueError("a snapshot's rest holds a whole frame")
        for name in ("scored", "voiced_end", "floor", "frames", "speech_frames"):
            setattr(self, name, int(snap[name]))
        self.speaking, self.paused = bool(snap["speaking"]), bool(snap["paused"])
        self.silent_since = None if snap["silent_since"] is None else int(snap["silent_since"])
