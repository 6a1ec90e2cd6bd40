"""Live transcription capacity: K concurrent streams pushing speech at real-time pace, streamplex against a naive reference.

Each stream pushes its own espeak-ng speech as 100 ms frames of 16 kHz PCM, paced in real time, streams
starting 1/K s apart. `--speech paused` (the default) is like real speech: a pause of 0.7 to 2.3 s (drawn
per stream) after each sentence, about 40% of the audio silent with the renderings' own silence;
`--speech continuous`: 0.5 s pauses only. Latency of a final segment = when the client receives it minus
when the end of its speech was pushed. A K is kept when the p95 of that latency over all
final segments of all streams is under `--target` (3 s); the largest kept K is the capacity.

Parts (`--parts`, run one after the other, never sharing the CPU):
- `naive`: what a user would write with transformers: Whisper's standard 30 s window (`generate`, the
  feature extractor padding every buffer to 30 s), one stream at a time in turn, the same LocalAgreement-2
  policy, buffer and step; simulated in real time in this process.
- `windows` (not in the default): the cost of one window of speech, interleaved rounds so that a
  changing machine load hits all three alike: transformers' `generate` on the standard 30 s window, the
  runner on the truncated window alone, and per window when 8 windows are decoded together.
- `costs` (not in the default): where one live step's time goes in the runner for a window of `--window`
  seconds with a 64-token previous-text prompt and a forced prefix: the encoder, the whole prefill, and a
  decode step for 1 and for 8 rows.
- `server`: K WebSocket clients against `python -m streamplex.server` (started here) with the transcription channel:
  truncated encoder input, all streams' windows decoded together in the batching engine, voice-activity
  endpointing unless `--no-vad`.
- `whisperlive` (`--peer whisperlive` adds it): K clients against WhisperLive (faster-whisper backend, one
  shared model, its own VAD on, int8 on CPU, OMP_NUM_THREADS one per core) on the same Whisper base
  weights, set up in its own venv by bench/peers/setup_whisperlive.sh; started here. Its finals are its `completed` segments; its transcript
  is those plus the last segment not completed when the stream ends (what its own client shows).

Also reported: word error rate against the spoken text, and the real-time factor (model compute seconds
per second of audio per stream). Example: `python bench/transcription.py --ks 1,2,4,6,8 --naive-ks 1,2,3`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamplex.channels.agreement import LocalAgreement, text_of  # noqa: E402
from streamplex.channels.transcription import TRIM_SECONDS, TranscriptionParams  # noqa: E402
from streamplex.server.config import Settings  # noqa: E402
from streamplex.server.engine.asr import SAMPLE_RATE  # noqa: E402
from tests.asrmodel import speech, wer  # noqa: E402

SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please send the report to my office before noon on Friday.",
    "She bought three apples and a loaf of bread at the market.",
    "Our team will meet in the library after lunch to plan the project.",
    "The train to the city leaves every hour from the main station.",
    "He forgot his umbrella and walked home in the heavy rain.",
    "We need more paper for the printer in the second room.",
    "The children played football in the park until it got dark.",
]
FRAME_MS = 100
PEERS = ROOT / "bench" / ".peers"


def stream_audio(i: int, sentences: int, paused: bool = True) -> tuple[np.ndarray, str]:
    """Stream i's speech (its own order of the sentences) and its text: pauses of 0.7-2.3 s after each sentence (`paused`), else 0.5 s."""
    order = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(sentences)]
    rng = np.random.default_rng(i)
    parts = []
    for text in order:
        seconds = rng.uniform(0.7, 2.3) if paused else 0.5
        parts += [speech(text), np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)]
    return np.concatenate(parts), " ".join(order)


def silent_share(audio: np.ndarray) -> float:
    """Share of 20 ms frames under -50 dBFS."""
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    return float(np.mean(np.sqrt(np.mean(np.square(frames), axis=1)) < 10 ** (-50 / 20)))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Run:
    part: str
    k: int
    latencies: list[float] = field(default_factory=list)
    wers: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    compute_s: float = 0.0
    audio_s: float = 0.0
    wall_s: float = 0.0
    phases: list[dict[str, Any]] = field(default_factory=list)  # per final, from the server's log (`_Transcriber._log_final`)

    def breakdown(self) -> str:
        """Per kind of final (how it was made final, by which decode): the median and p95 of each phase in seconds, and mean token counts."""
        lines = []
        for kind in sorted({p["kind"] for p in self.phases}):
            rows = [p for p in self.phases if p["kind"] == kind]
            keys = [k for k in rows[0] if k not in ("kind", "tokens", "draft", "kept")]
            cells = ", ".join(f"{k} {pct([p[k] for p in rows], 50):.2f}/{pct([p[k] for p in rows], 95):.2f}" for k in keys)
            counts = ", ".join(f"{k} {np.mean([p[k] for p in rows]):.1f}" for k in ("tokens", "draft", "kept"))
            lines.append(f"  {len(rows)} finals {kind}, s p50/p95: {cells}; mean {counts}")
        return "\n".join(lines)

    def row(self, target: float) -> dict[str, Any]:
        p95 = pct(self.latencies, 95)
        return {
            "part": self.part,
            "K": self.k,
            "finals": len(self.latencies),
            "latency p50 s": round(pct(self.latencies, 50), 2),
            "latency p95 s": round(p95, 2),
            "max s": round(max(self.latencies, default=float("nan")), 2),
            "WER": round(float(np.mean(self.wers)), 3),
            "RTF": round(self.compute_s / self.audio_s, 3) if self.audio_s and self.compute_s else None,  # not measured for a peer
            "ok": bool(p95 < target),
        }


# the naive reference


def naive_run(k: int, audios: list[tuple[np.ndarray, str]], folder: Path, threads: int, step_ms: int) -> Run:
    """K live streams served one at a time by transformers' `generate` on 30 s windows, simulated in real time."""
    import torch

    from streamplex.server.engine.device import cpu_threads

    torch.set_num_threads(cpu_threads(threads))
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from streamplex.server.engine.asr import WhisperVocab

    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    features = WhisperFeatureExtractor.from_pretrained(folder)
    vocab = WhisperVocab(folder / "tokenizer.json", multilingual=model.config.vocab_size >= 51865)
    run = Run("naive: transformers, 30 s window, one at a time", k)
    starts = [i / k for i in range(k)]
    state = [{"buf": np.zeros(0, np.float32), "offset": 0.0, "taken": 0, "la": LocalAgreement(), "done": False} for _ in range(k)]
    step = step_ms * SAMPLE_RATE // 1000
    t0 = time.monotonic()

    def finals(i: int, words: list[Any]) -> None:
        now = time.monotonic() - t0
        if words:
            run.latencies.append(now - (starts[i] + words[-1].end))

    while not all(s["done"] for s in state):
        progressed = False
        for i, s in enumerate(state):
            if s["done"]:
                continue
            audio = audios[i][0]
            available = min(len(audio), max(0, int((time.monotonic() - t0 - starts[i]) * SAMPLE_RATE)))
            ended = available == len(audio)
            if available - s["taken"] < step and not ended:
                continue
            progressed = True
            s["buf"] = np.concatenate([s["buf"], audio[s["taken"] : available]])
            s["taken"] = available
            started = time.perf_counter()
            feats = features(s["buf"], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            with torch.inference_mode():
                tokens = model.generate(feats, language="en", task="transcribe", return_timestamps=True)[0].tolist()
            run.compute_s += time.perf_counter() - started
            window = len(s["buf"]) / SAMPLE_RATE
            segments, tail = vocab.segments(tokens, window)
            if tail is not None:
                segments.append(tail)
            la: LocalAgreement = s["la"]
            finals(i, la.update(segments, s["offset"]))
            cut = la.cut_point()
            if len(s["buf"]) > TRIM_SECONDS * SAMPLE_RATE and cut is not None:
                drop = max(0, round((cut - s["offset"]) * SAMPLE_RATE))
                s["buf"], s["offset"] = s["buf"][drop:], s["offset"] + drop / SAMPLE_RATE
            if ended:
                finals(i, la.force())
                s["done"] = True
                run.wers.append(wer(audios[i][1], text_of(la.committed)))
                run.texts.append(text_of(la.committed))
        if not progressed:
            time.sleep(0.01)
    run.wall_s = time.monotonic() - t0
    run.audio_s = sum(len(a) for a, _ in audios[:k]) / SAMPLE_RATE
    return run


# streamplex over WebSockets


async def server_run(k: int, audios: list[tuple[np.ndarray, str]], server: Any, step_ms: int, vad: bool) -> Run:
    """K WebSocket clients, one stream each, pushing in real time; latency measured per final segment."""
    from tests.serverproc import connect, send

    run = Run(f"streamplex: truncated windows, batched decoding, VAD {'on' if vad else 'off'}", k)
    before = step_seconds(server)
    logged = len(server.log())
    t0 = time.monotonic() + 0.5

    async def client(i: int) -> None:
        audio, text = audios[i]
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        frame = SAMPLE_RATE * FRAME_MS // 1000 * 2
        ws = await connect(server, max_size=None)
        sid = f"s{i}".encode()
        start = t0 + i / k
        await send(ws, op="subscribe", id=f"s{i}", channel="transcription", params={"language": "en", "step_ms": step_ms, "vad": vad})

        async def push() -> None:
            for at in range(0, len(pcm), frame):
                await asyncio.sleep(max(0.0, start + at / 2 / SAMPLE_RATE - time.monotonic()))
                await ws.send(bytes([len(sid)]) + sid + pcm[at : at + frame])
            await send(ws, op="push", id=f"s{i}", end=True)

        pusher = asyncio.create_task(push())
        async for message in ws:
            frame_data = json.loads(message)
            if frame_data["op"] == "chunk":
                data = frame_data["data"]
                if data["type"] == "final":
                    run.latencies.append(time.monotonic() - (start + data["end"]))
                elif data["type"] == "transcript":
                    run.wers.append(wer(text, data["text"]))
                    run.texts.append(data["text"])
            elif frame_data["op"] == "end":
                break
            elif frame_data["op"] == "error":
                raise RuntimeError(frame_data)
        await pusher
        await ws.close()

    await asyncio.gather(*(client(i) for i in range(k)))
    run.wall_s = time.monotonic() - t0
    run.compute_s = step_seconds(server) - before
    run.audio_s = sum(len(a) for a, _ in audios[:k]) / SAMPLE_RATE
    for line in server.log()[logged:].splitlines():
        if (found := re.search(r": final \((\w+), decoded at (\w+)\)", line)) is not None:
            run.phases.append({"kind": f"{found[1]} at {found[2]}", **{key: float(value) for key, value in re.findall(r"(\w+)=([-\d.]+)", line)}})
    return run


# the WhisperLive peer


class WhisperLive:
    """WhisperLive's server from its venv under bench/.peers (bench/peers/setup_whisperlive.sh), on a free port; stopped on exit."""

    def __init__(self, max_clients: int) -> None:
        import socket
        import subprocess

        python, model = PEERS / "whisperlive" / "venv" / "bin" / "python", PEERS / "whisperlive" / "whisper-base-ct2"
        if not python.exists() or not (model / "model.bin").exists():
            raise RuntimeError("WhisperLive is not set up: run bench/peers/setup_whisperlive.sh")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = (PEERS / "whisperlive" / "server.log").open("w")
        cmd = [
            str(python),
            str(ROOT / "bench" / "peers" / "whisperlive_server.py"),
            "--port",
            str(self.port),
            "--model",
            str(model),
            "--max-clients",
            str(max_clients),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(PEERS / "whisperlive"), "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"WhisperLive exited: see {self.log.name}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("WhisperLive did not listen within 120 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
        self.log.close()


async def whisperlive_run(k: int, audios: list[tuple[np.ndarray, str]], peer: WhisperLive) -> Run:
    """K clients of WhisperLive's protocol (JSON options, float32 frames, END_OF_AUDIO), pushing in real time; a final is a `completed` segment, first seen."""
    import websockets

    run = Run("WhisperLive 0.10: faster-whisper int8, one shared model, its VAD on", k)
    t0 = time.monotonic() + 1.0

    async def client(i: int) -> None:
        audio, text = audios[i]
        frame = SAMPLE_RATE * FRAME_MS // 1000
        start = t0 + i / k
        async with websockets.connect(f"ws://127.0.0.1:{peer.port}", max_size=None, open_timeout=60) as ws:
            await ws.send(json.dumps({"uid": f"s{i}", "language": "en", "task": "transcribe", "model": "base", "use_vad": True, "send_last_n_segments": 10}))
            while json.loads(await ws.recv()).get("message") != "SERVER_READY":
                pass

            async def push() -> None:
                for at in range(0, len(audio), frame):
                    await asyncio.sleep(max(0.0, start + at / SAMPLE_RATE - time.monotonic()))
                    await ws.send(audio[at : at + frame].astype(np.float32).tobytes())
                await ws.send(b"END_OF_AUDIO")

            pusher = asyncio.create_task(push())
            done: dict[float, str] = {}
            last: dict[str, Any] | None = None
            try:
                async for message in ws:
                    data = json.loads(message)
                    for seg in data.get("segments", []):
                        begin = round(float(seg["start"]), 2)
                        if seg.get("completed"):
                            if begin not in done:
                                done[begin] = seg["text"].strip()
                                run.latencies.append(time.monotonic() - (start + float(seg["end"])))
                        else:
                            last = seg
                    if data.get("message") == "DISCONNECT":
                        break
            except websockets.ConnectionClosed:
                pass
            await pusher
        texts = [done[b] for b in sorted(done)]
        if last is not None and round(float(last["start"]), 2) not in done:
            texts.append(last["text"].strip())
        run.texts.append(" ".join(texts))
        run.wers.append(wer(text, run.texts[-1]))

    await asyncio.gather(*(client(i) for i in range(k)))
    run.wall_s = time.monotonic() - t0
    run.audio_s = sum(len(a) for a, _ in audios[:k]) / SAMPLE_RATE
    return run


def run_windows(runner: Any, audios: list[np.ndarray]) -> float:
    """Seconds to transcribe `audios` as windows decoded together by the runner (no engine loop, no server)."""
    from streamplex.server.engine.asr import TranscriptionRequest
    from streamplex.server.engine.scheduler import Chunk, StepPlan

    requests = {i: TranscriptionRequest(a, "en") for i, a in enumerate(audios)}
    started = time.perf_counter()
    plan = StepPlan(admit=dict(requests), prefill=[Chunk(i, 0, len(runner.vocab.prompt(r)), True) for i, r in requests.items()])
    live, generated = set(requests), dict.fromkeys(requests, 0)
    while live:
        for out in runner.execute(plan):
            generated[out.seq_id] += out.token is not None
            if out.done:
                live.discard(out.seq_id)
        limit = {i for i in live if generated[i] >= runner.max_new_tokens(len(runner.vocab.prompt(requests[i])))}  # as the scheduler does
        live -= limit
        plan = StepPlan(release=sorted(limit), decode=sorted(live))
    runner.execute(StepPlan(release=plan.release))
    return time.perf_counter() - started


def windows(folder: Path, model: str, threads: int, rounds: int, seconds: float) -> list[dict[str, Any]]:
    """Cost of one window of `seconds` of speech: transformers on 30 s against the runner alone and in a batch of 8 (interleaved rounds)."""
    import torch

    from streamplex.server.engine.device import cpu_threads
    from streamplex.server.engine.whisper import WhisperRunner

    runner = WhisperRunner(model, Settings().cache_dir, *server_device(), cpu_threads(threads), Settings().asr_cpu_quantize)
    runner.load()
    torch.set_num_threads(cpu_threads(threads))
    clips = [stream_audio(i, 4)[0][: int(seconds * SAMPLE_RATE)] for i in range(8)]
    times: dict[str, list[float]] = {"naive": [], "alone": [], "batch": []}
    for _ in range(rounds):
        started = time.perf_counter()
        features = runner.features(clips[0], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            runner.model.generate(features, language="en", task="transcribe", return_timestamps=True)
        times["naive"].append(time.perf_counter() - started)
        times["alone"].append(run_windows(runner, clips[:1]))
        times["batch"].append(run_windows(runner, clips) / len(clips))
    naive = float(np.median(times["naive"]))
    names = {"naive": "transformers generate, 30 s window", "alone": "runner, truncated, alone", "batch": "runner, truncated, per window in a batch of 8"}
    return [
        {"window": f"{seconds:g} s", "run": names[k], "s per window (median)": round(float(np.median(v)), 3), "x naive": round(naive / float(np.median(v)), 2)}
        for k, v in times.items()
    ]


def server_device() -> tuple[Any, Any]:
    """The device and dtype the server would run Whisper on (STREAMPLEX_DEVICE, STREAMPLEX_DTYPE)."""
    from streamplex.server.engine.device import resolve_device, resolve_dtype

    device = resolve_device(Settings().device)
    return device, resolve_dtype(Settings().dtype, device)


def costs(model: str, threads: int, rounds: int, seconds: float) -> list[dict[str, Any]]:
    """Where one live step's time goes in the runner: a window of `seconds` of speech with a 64-token previous-text prompt and a forced prefix."""
    import torch

    from streamplex.server.engine.asr import TranscriptionRequest
    from streamplex.server.engine.device import cpu_threads
    from streamplex.server.engine.scheduler import Chunk, StepPlan
    from streamplex.server.engine.whisper import WhisperRunner, padded_samples

    runner = WhisperRunner(model, Settings().cache_dir, *server_device(), cpu_threads(threads), Settings().asr_cpu_quantize)
    runner.load()
    vocab = runner.vocab
    assert vocab is not None
    clips = [stream_audio(i, 4)[0][: int(seconds * SAMPLE_RATE)] for i in range(8)]
    context = vocab.encode(" " + " ".join(SENTENCES))[:64]
    prefix = [vocab.timestamp(0.0), *vocab.encode(" " + SENTENCES[0].split(",")[0].rsplit(" ", 4)[0])]
    times: dict[str, list[float]] = {"encoder": [], "prefill (encoder, cross keys and values, prompt)": [], "decode step, 1 row": [], "decode step, 8 rows": []}
    padded = np.pad(clips[0], (0, padded_samples(len(clips[0])) - len(clips[0]))).astype(np.float32)
    for _ in range(rounds):
        with torch.inference_mode():
            started = time.perf_counter()
            runner.encode([padded])
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            times["encoder"].append(time.perf_counter() - started)
        for rows in (1, 8):
            requests = {i: TranscriptionRequest(clips[i], "en", prompt=context, prefix=prefix) for i in range(rows)}
            for i, request in requests.items():
                started = time.perf_counter()
                runner.execute(StepPlan(admit={i: request}, prefill=[Chunk(i, 0, len(vocab.prompt(request)), True)]))
                if rows == 1:
                    times["prefill (encoder, cross keys and values, prompt)"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(5):
                runner.execute(StepPlan(decode=sorted(requests)))
            times[f"decode step, {rows} row{'s' if rows > 1 else ''}"].append((time.perf_counter() - started) / 5)
            runner.execute(StepPlan(release=sorted(requests)))
    return [{"window": f"{seconds:g} s", "phase": k, "ms (median)": round(1000 * float(np.median(v)), 1)} for k, v in times.items()]


def step_seconds(server: Any) -> float:
    """The transcription runner's total step seconds, from /metrics."""
    for line in server.get("/metrics")[1].decode().splitlines():
        if line.startswith("streamplex_engine_step_seconds_sum{") and 'runner="transcription"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sweep(name: str, ks: list[int], once: Any, target: float, keep_going: bool) -> list[dict[str, Any]]:
    """Run K ascending until p95 misses the target twice in a row (or every K with `keep_going`)."""
    rows, misses = [], 0
    for k in ks:
        run = once(k)
        row = run.row(target)
        rows.append(row)
        print(json.dumps(row), flush=True)
        worst = int(np.argmax(run.wers))
        print(f"  worst transcript (WER {run.wers[worst]:.2f}): {run.texts[worst]}", flush=True)
        if run.phases:
            print(run.breakdown(), flush=True)
        misses = 0 if row["ok"] else misses + 1
        if misses == 2 and not keep_going:
            break
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return "\n".join([*lines, *("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,6,8,10,12", help="stream counts for streamplex")
    parser.add_argument("--naive-ks", default="1,2,3,4", help="stream counts for the naive reference")
    parser.add_argument("--sentences", type=int, default=6, help="sentences per stream (about 3.5 s each)")
    parser.add_argument("--target", type=float, default=3.0, help="p95 latency bound in seconds")
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: one per core, the server's default)")
    parser.add_argument("--parts", default="naive,server")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the `windows` and `costs` parts")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of speech per window in the `windows` and `costs` parts")
    parser.add_argument(
        "--step-ms",
        type=int,
        default=TranscriptionParams.model_fields["step_ms"].default,
        help="the streams' `step_ms` (least new audio between two transcriptions of a buffer; default: the channel's)",
    )
    parser.add_argument(
        "--speech",
        choices=["paused", "continuous"],
        default="paused",
        help="pauses of 0.7-2.3 s after each sentence (about 40%% silence with the renderings' own), or 0.5 s",
    )
    parser.add_argument("--no-vad", action="store_true", help="streamplex streams with `vad` false (every step decoded, silence included)")
    parser.add_argument("--peer", choices=["whisperlive"], help="also run this peer, after streamplex, on the same audio and Ks")
    parser.add_argument("--keep-going", action="store_true", help="run every K even after two misses")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    ks, naive_ks = [int(x) for x in args.ks.split(",")], [int(x) for x in args.naive_ks.split(",")]
    audios = [stream_audio(i, args.sentences, args.speech == "paused") for i in range(max(ks + naive_ks))]
    share = np.mean([silent_share(a) for a, _ in audios])
    print(f"audio per stream: {np.mean([len(a) for a, _ in audios]) / SAMPLE_RATE:.1f} s, {100 * share:.0f}% silent ({args.speech})", flush=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    parts = args.parts.split(",") + ([args.peer] if args.peer and args.peer not in args.parts.split(",") else [])
    rows: list[dict[str, Any]] = []
    for part in parts:
        if part == "costs":
            print(table(costs(args.model, args.threads, args.rounds, args.window)), flush=True)
        elif part == "windows":
            from streamplex.server.engine.whisper_loading import model_folder

            window_rows = windows(model_folder(args.model, Settings().cache_dir), args.model, args.threads, args.rounds, args.window)
            print(table(window_rows), flush=True)
        elif part == "naive":
            from streamplex.server.engine.whisper_loading import model_folder

            folder = model_folder(args.model, Settings().cache_dir)
            rows += sweep(part, naive_ks, lambda k, folder=folder: naive_run(k, audios, folder, args.threads, args.step_ms), args.target, args.keep_going)
        elif part == "server":
            import tempfile

            from tests.serverproc import start_server

            with tempfile.TemporaryDirectory() as tmp:
                server = start_server(
                    Path(tmp), asr_model=args.model, engine_threads=args.threads, max_streams=256, rate=1000, burst=2000, log_level="DEBUG"
                )  # DEBUG: the channel's timing of each final
                try:
                    while json.loads(server.get("/ready")[1])["channels"]["transcription"] == "loading":
                        time.sleep(0.2)
                    once = lambda k, server=server: asyncio.run(server_run(k, audios, server, args.step_ms, not args.no_vad))  # noqa: E731
                    rows += sweep(part, ks, once, args.target, args.keep_going)
                finally:
                    server.stop()
        elif part == "whisperlive":
            try:
                peer = WhisperLive(max(ks) + 1)
            except RuntimeError as exc:
                print(f"peer whisperlive: not run: {exc}", flush=True)
                continue
            try:
                rows += sweep(part, ks, lambda k, peer=peer: asyncio.run(whisperlive_run(k, audios, peer)), args.target, args.keep_going)
            finally:
                peer.stop()
        else:
            parser.error(f"unknown part {part!r}")
    if not rows:
        return
    print(table(rows))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    best = {part: max((r["K"] for r in rows if r["part"].startswith(part) and r["ok"]), default=0) for part in ("naive", "streamplex", "WhisperLive")}
    print(f"largest K with p95 < {args.target:g} s: {best}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "best": best}, indent=1))


if __name__ == "__main__":
    main()
