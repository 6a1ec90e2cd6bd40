"""End to end over /ws with the real Whisper base (and tiny.en as a local folder): a file, a live push and a file at real-time pace, language detection, translation, errors."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from streamplex.server.config import Settings
from streamplex.server.engine.asr import SAMPLE_RATE
from streamplex.server.engine.whisper_loading import model_folder
from tests.asrmodel import ENGLISH, SPANISH, speech, speech_wav, wer, words
from tests.serverproc import ServerProc, collect, connect, recv, send, start_server

PUSH_MS = 100


@pytest.fixture(scope="module")
def asr_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("asr")
    media = tmp / "media"
    media.mkdir()
    (media / "english.wav").write_bytes(speech_wav(" ".join(ENGLISH[:2])))
    (media / "spanish.wav").write_bytes(speech_wav(SPANISH, voice="es"))
    (media / "notes.txt").write_text("not audio")
    # a local Hugging Face folder as a second model: the bundled tiny.en, converted, under a name of its own
    custom = tmp / "custom-tiny"
    custom.symlink_to(model_folder("whisper-tiny.en", Settings().cache_dir), target_is_directory=True)
    srv = start_server(tmp, asr_model=f"whisper-base,{custom}", media_dir=media)
    try:
        for _ in range(1800):  # the first run converts the bundled model once
            status = orjson.loads(srv.get("/ready")[1])["channels"]["transcription"]
            if status != "loading":
                break
            time.sleep(0.1)
        assert status == "available", srv.log()[-3000:]
        yield srv
    finally:
        srv.stop()


def check_segments(chunks: list[dict[str, Any]], duration: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The final segments (in order, timed within the audio) and the closing transcript chunk."""
    data = [c["data"] for c in chunks]
    assert data[-1]["type"] == "transcript"
    finals = [d for d in data if d["type"] == "final"]
    assert finals, data
    for a, b in itertools.pairwise(finals):
        assert a["end"] <= b["start"] + 0.05, finals
    assert all(0 <= f["start"] < f["end"] <= duration + 0.1 for f in finals), finals
    assert data[-1]["text"] == " ".join(f["text"] for f in finals)
    assert data[-1]["segments"] == len(finals)
    return finals, data[-1]


async def test_file_source(asr_server: ServerProc) -> None:
    """Without voice-activity detection (`vad` false): every step of the file is transcribed."""
    duration = len(speech(" ".join(ENGLISH[:2]))) / SAMPLE_RATE
    ws = await connect(asr_server)
    await send(ws, op="subscribe", id="f", channel="transcription", params={"source": "english.wav", "language": "en", "vad": False})
    chunks, end = await collect(ws, "f", timeout=120)
    assert end["reason"] == "complete", end
    _, transcript = check_segments(chunks, duration)
    assert chunks[0]["data"] == {"type": "language", "language": "en", "detected": False}
    assert wer(" ".join(ENGLISH[:2]), transcript["text"]) <= 0.15, transcript
    assert abs(transcript["duration_s"] - duration) < 0.1
    await ws.close()


async def test_live_push_at_real_time(asr_server: ServerProc) -> None:
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    audio = np.concatenate([part for text in ENGLISH for part in (speech(text), pause)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    frame = SAMPLE_RATE * PUSH_MS // 1000 * 2
    ws = await connect(asr_server)
    await send(ws, op="subscribe", id="live", channel="transcription", params={"language": "en"})
    assert (await recv(ws))["op"] == "subscribed"

    async def push() -> None:
        started = time.monotonic()
        for i in range(0, len(pcm), frame):
            await asyncio.sleep(max(0.0, started + i / 2 / SAMPLE_RATE - time.monotonic()))
            await ws.send(bytes([4]) + b"live" + pcm[i : i + frame])
        await send(ws, op="push", id="live", end=True)

    pusher = asyncio.create_task(push())
    chunks, end = await collect(ws, "live", timeout=120)
    await pusher
    assert end["reason"] == "complete", end
    finals, transcript = check_segments(chunks, len(audio) / SAMPLE_RATE)
    partials = [c["data"] for c in chunks if c["data"]["type"] == "partial"]
    assert partials, "partial segments come while the speech goes on"
    assert len(finals) >= 2, "final segments come while the speech goes on, not only at the end"
    assert wer(" ".join(ENGLISH), transcript["text"]) <= 0.15, transcript
    await ws.close()


async def test_language_detected(asr_server: ServerProc) -> None:
    ws = await connect(asr_server)
    await send(ws, op="subscribe", id="es", channel="transcription", params={"source": "spanish.wav", "partials": False})
    chunks, end = await collect(ws, "es", timeout=120)
    assert end["reason"] == "complete", end
    data = [c["data"] for c in chunks]
    assert data[0] == {"type": "language", "language": "es", "detected": True}
    assert not [d for d in data if d["type"] == "partial"]
    assert data[-1]["language"] == "es" and wer(SPANISH, data[-1]["text"]) <= 0.5, data[-1]
    await ws.close()


async def test_translate_to_english(asr_server: ServerProc) -> None:
    ws = await connect(asr_server)
    await send(ws, op="subscribe", id="tr", channel="transcription", params={"source": "spanish.wav", "task": "translate"})
    chunks, end = await collect(ws, "tr", timeout=120)
    assert end["reason"] == "complete", end
    transcript = chunks[-1]["data"]
    assert transcript["language"] == "es", transcript
    english = {"good", "morning", "would", "like", "table", "four", "people", "night", "tonight", "reserve", "book"}
    assert len(english & set(words(transcript["text"]))) >= 3, transcript
    assert not {"personas", "noche", "mesa"} & set(words(transcript["text"])), transcript
    await ws.close()


async def test_local_folder_model_english_only(asr_server: ServerProc) -> None:
    """`STREAMPLEX_ASR_MODEL` also takes a local folder (here tiny.en), chosen per stream with `model`; English-only refuses other languages."""
    ws = await connect(asr_server)
    await send(ws, op="subscribe", id="tiny", channel="transcription", params={"source": "english.wav", "model": "custom-tiny"})
    chunks, end = await collect(ws, "tiny", timeout=120)
    assert end["reason"] == "complete", end
    assert chunks[0]["data"] == {"type": "language", "language": "en", "detected": False}
    assert wer(" ".join(ENGLISH[:2]), chunks[-1]["data"]["text"]) <= 0.15, chunks[-1]
    for sid, params in {"fr": {"language": "fr"}, "translate": {"task": "translate"}}.items():
        await send(ws, op="subscribe", id=sid, channel="transcription", params={"model": "custom-tiny", **params})
        frame = await recv(ws, timeout=30)
        assert (frame["op"], frame["id"], frame["code"]) == ("error", sid, "invalid_params"), frame
    await ws.close()


async def test_file_at_real_pace(asr_server: ServerProc) -> None:
    """`realtime`: a file is read as if live, so its transcript comes no sooner than its length, with finals on the way."""
    duration = len(speech(" ".join(ENGLISH[:2]))) / SAMPLE_RATE
    ws = await connect(asr_server)
    started = time.monotonic()
    await send(ws, op="subscribe", id="rt", channel="transcription", params={"source": "english.wav", "language": "en", "realtime": True})
    arrivals: list[tuple[float, str]] = []
    while True:
        frame = await recv(ws, timeout=60)
        if frame["op"] == "end":
            break
        if frame["op"] == "chunk":
            arrivals.append((time.monotonic() - started, frame["data"]["type"]))
    assert frame["reason"] == "complete", frame
    assert arrivals[-1][1] == "transcript" and arrivals[-1][0] >= duration - 0.2, (duration, arrivals)
    assert any(kind == "final" and at < duration for at, kind in arrivals), (duration, arrivals)
    await ws.close()


async def test_refusals(asr_server: ServerProc, tmp_path: Path) -> None:
    ws = await connect(asr_server)
    cases = {
        "lang": ({"language": "xx"}, "invalid_params"),
        "model": ({"model": "whisper-huge"}, "invalid_params"),
        "both": ({"source": "english.wav", "audio_url": "http://example.com/a.wav"}, "invalid_params"),
        "outside": ({"source": "../asr/notes.txt"}, "forbidden"),
        "missing": ({"source": "nope.wav"}, "invalid_params"),
        "url": ({"audio_url": "http://127.0.0.1/a.wav"}, "forbidden"),
        "threshold": ({"vad_threshold": 1.5}, "invalid_params"),
        "silence": ({"min_silence_ms": 50}, "invalid_params"),
    }
    for sid, (params, _) in cases.items():
        await send(ws, op="subscribe", id=sid, channel="transcription", params=params)
    codes = {}
    while len(codes) < len(cases):
        frame = await recv(ws, timeout=30)
        assert frame["op"] == "error", frame
        codes[frame["id"]] = frame["code"]
    assert codes == {sid: code for sid, (_, code) in cases.items()}
    await send(ws, op="subscribe", id="txt", channel="transcription", params={"source": "notes.txt"})
    _, end = await collect(ws, "txt", timeout=30)
    assert end["reason"] == "error" and end["error"]["code"] == "bad_source", end
    await send(ws, op="subscribe", id="json", channel="transcription", params={})
    await send(ws, op="push", id="json", data="hello")
    _, end = await collect(ws, "json", timeout=30)
    assert end["reason"] == "error" and end["error"]["code"] == "invalid_params", end
    await ws.close()
