"""Load: N connections over the real protocol with a realistic channel mix, churn and slow readers.

Each connection holds one profile, chosen in a fixed rotation by its index. With `--mix inline` (the
default, issue 15's mix):
- `text` (45%): 40 KB of inline text as words, 4 per chunk, one chunk every `--interval-ms`;
- `data` (20%): 3000 inline records as NDJSON, 5 per chunk, one chunk every `--interval-ms`;
- `metrics` (33%): the shared metrics sampler, one sample a second;
- `logs` (2%): the server's own log records, live.
`--variants` inline texts and record sets are spread over the connections (1: every stream sends the
same; `--conns`: each its own). With `--mix files` the streams read a document and a dataset from the
server's folders instead, 40% text, 25% data, 25% metrics, 10% logs. With `--mix metrics` every
connection holds a 1 Hz metrics stream (no slow readers, no churn unless asked).
- `chat` (with `--chat`, 2% of the connections instead of text): a short reply, asked again when it ends.
A share of the connections (`--slow-share`) are slow readers: a fast text stream (no pacing) plus
metrics, read one frame every 250 ms, so the server must pause their lossless producer and drop their
lossy chunks. Every second, `--churn` of the other connections leave (half abruptly, half with a close
frame) and as many new ones connect with the same profiles.

The clients run in `--workers` processes. All connect first; then every connection subscribes, and
after `--warmup` seconds a window of `--duration` seconds is measured:
- delivered frames/s: chunk frames received by all clients in the window;
- latency: a paced text/data stream's frame n is due at start + n * interval (the server's pacer does
  not drift), so arrival - n * interval, less its minimum over the stream, is that frame's delay; a
  metrics frame carries its sample time, so arrival - sample time is its delay (one clock, one machine);
- server RSS, asyncio tasks, connections, open streams and server frames/s over time (from /metrics
  and psutil), sampled every `--every` seconds; peak RSS and its growth per connection;
- `/health` latency: one GET every 250 ms from the start to the end of the window (10 s timeout), on the main port
  (answered by the event loop) and on `health_port` (answered by its own thread);
- in the window: the server's CPU (and its kernel share) and the load generator's, as % of one core, the
  server's CPU per frame it sent, its loop lag's percentiles and the machine's load average;
- subscriptions refused with `overloaded`: the client waits `retry_after` and subscribes again, as the
  SDKs do; the share refused at least once is reported.
Example: `python bench/load.py --conns 1000 --duration 20` (`--py-spy FILE` also samples the server with py-spy, if on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
ROTATION = ["text", "metrics", "data", "text", "metrics", "text", "data", "logs", "text", "metrics"]
DOCUMENT_FILE, DATASET_FILE = "load.txt", "load.jsonl"
INLINE_SHARES = {"text": 45, "data": 20, "metrics": 33, "logs": 2}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "while",
    "streams",
    "keep",
    "flowing",
    "past",
    "every",
    "node",
    "of",
    "this",
    "small",
    "cluster",
]


def spread(shares: dict[str, int]) -> list[str]:
    """A rotation of 100 profiles with each kind spread evenly through it (largest remainder first)."""
    out: list[str] = []
    given = dict.fromkeys(shares, 0)
    for i in range(1, 101):
        kind = max(shares, key=lambda k: shares[k] * i / 100 - given[k])
        given[kind] += 1
        out.append(kind)
    return out


INLINE_ROTATION = spread(INLINE_SHARES)


def inline_text(variant: int) -> str:
    """About 40 KB of words, different for each variant."""
    rng = random.Random(variant)
    words: list[str] = []
    size = 0
    while size < 40_000:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def inline_records(variant: int) -> list[dict[str, Any]]:
    """3000 small records, different for each variant."""
    return [{"i": i, "name": f"record {i}", "v": variant, "ok": i % 3 == 0} for i in range(3000)]


def write_sources(docs: Path, data: Path) -> None:
    """The document (~1.5 MB) and dataset (100k records) every text and data stream reads from the server's folders."""
    (docs / DOCUMENT_FILE).write_text("The quick brown fox jumps over the lazy dog while the streams keep flowing.\n" * 20_000)
    with (data / DATASET_FILE).open("wb") as f:
        f.writelines(orjson.dumps({"i": i, "name": f"record {i}", "ok": i % 3 == 0}) + b"\n" for i in range(100_000))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def profile(index: int, slow_share: float, chat: bool, mix: str = "files") -> str:
    """The profile of connection `index`: the rotation, with slow readers and chats spread through it."""
    if slow_share and index % max(1, round(1 / slow_share)) == 1:
        return "slow"
    if chat and index % 50 == 7:
        return "chat"
    if mix == "metrics":
        return "metrics"
    rotation = INLINE_ROTATION if mix == "inline" else ROTATION
    return rotation[index % len(rotation)]


def subscriptions(kind: str, interval_ms: int, mix: str = "files", variant: int = 0) -> list[dict[str, Any]]:
    """The subscribe ops a connection of `kind` sends (texts and records of inline `variant`)."""

    def sub(stream_id: str, channel: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"op": "subscribe", "id": stream_id, "channel": channel, "params": params}

    if mix == "inline" and kind == "text":
        return [sub("t", "text", {"text": inline_text(variant), "unit": "words", "chunk_size": 4, "interval_ms": interval_ms})]
    if mix == "inline" and kind == "data":
        return [sub("d", "data", {"records": inline_records(variant), "chunk_size": 5, "interval_ms": interval_ms})]
    return {
        "text": [sub("t", "text", {"document": DOCUMENT_FILE, "unit": "words", "chunk_size": 4, "interval_ms": interval_ms})],
        "data": [sub("d", "data", {"dataset": DATASET_FILE, "chunk_size": 5, "interval_ms": interval_ms})],
        "metrics": [sub("m", "metrics", {"interval_ms": 1000})],
        "logs": [sub("l", "logs", {"lines": 10, "level": "INFO"})],
        "chat": [sub("c", "chat", {"message": "Name three colours.", "max_tokens": 24})],
        "slow": [sub("t", "text", {"document": DOCUMENT_FILE, "unit": "bytes", "chunk_size": 256}), sub("m", "metrics", {"interval_ms": 200})],
    }[kind]


@dataclass
class Job:
    url: str
    key: str
    first: int
    conns: int
    interval_ms: int
    slow_share: float
    churn: float
    chat: bool
    seed: int
    mix: str = "files"
    variants: int = 1


class Client:
    """One connection's reading loop and its tallies."""

    def __init__(self, job: Job, index: int, result: dict[str, Any]) -> None:
        self.job = job
        self.index = index
        self.kind = profile(index, job.slow_share, job.chat, job.mix)
        self.result = result
        self.ws: websockets.ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.window = (float("inf"), float("inf"))
        self.arrivals: dict[str, list[tuple[int, float]]] = {}
        self.leaving = False

    async def open(self, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            self.ws = await websockets.connect(
                self.job.url, additional_headers={"X-API-Key": self.job.key}, max_size=None, open_timeout=120, ping_interval=None, compression=None
            )
            ready = orjson.loads(await self.ws.recv())
            if ready.get("op") != "ready":
                raise RuntimeError(f"expected ready, got {ready}")

    async def run(self) -> None:
        assert self.ws is not None
        ops = {op["id"]: orjson.dumps(op).decode() for op in subscriptions(self.kind, self.job.interval_ms, self.job.mix, self.index % self.job.variants)}
        for op in ops.values():
            await self.ws.send(op)
        self.result["subscriptions"] += len(ops)
        refused: set[str] = set()
        paced = self.kind in ("text", "data")
        interval = self.job.interval_ms / 1000
        try:
            async for message in self.ws:
                now = time.monotonic()
                frame = orjson.loads(message)
                op = frame.get("op")
                in_window = self.window[0] <= now <= self.window[1]
                if op == "chunk":
                    if in_window:
                        self.result["frames"][self.kind] += 1
                        self.result["dropped"] += frame.get("dropped", 0)
                        if frame["id"] == "m" and self.kind != "slow":
                            self.result["metrics_latency"].append(time.time() - frame["data"]["time"])
                    if paced:
                        self.arrivals.setdefault(frame["id"], []).append((frame["seq"], now))
                    if self.kind == "slow":
                        await asyncio.sleep(0.25)
                elif op == "error":
                    self.result["errors"][frame["code"]] += 1
                    if frame["code"] == "overloaded" and frame.get("id") in ops:  # wait as told, then again (as the SDKs do)
                        if frame["id"] not in refused:
                            refused.add(frame["id"])
                            self.result["refused_subscriptions"] += 1
                        asyncio.get_running_loop().call_later(frame.get("retry_after") or 1.0, self.resend, ops[frame["id"]])
                elif op == "end":
                    self.result["ends"][frame["reason"] if frame["reason"] != "error" else frame["error"]["code"]] += 1
                    if self.kind == "chat" and frame["reason"] == "complete":
                        await self.ws.send(orjson.dumps(subscriptions("chat", 0)[0]).decode())
        except websockets.ConnectionClosed as exc:
            if not self.leaving:
                self.result["closed_by_server"][str(exc.rcvd.code) if exc.rcvd else "no close frame"] += 1
        finally:
            self.flush_latencies(interval)

    def resend(self, op: str) -> None:
        if self.ws is not None and not self.leaving:
            task = asyncio.ensure_future(self.ws.send(op))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def flush_latencies(self, interval: float) -> None:
        """Schedule-based delays of the paced frames that arrived in the window."""
        for arrivals in self.arrivals.values():
            base = min(now - seq * interval for seq, now in arrivals)
            self.result["paced_latency"].extend(now - seq * interval - base for seq, now in arrivals if self.window[0] <= now <= self.window[1])
        self.arrivals.clear()

    async def leave(self, abrupt: bool) -> None:
        assert self.ws is not None
        self.leaving = True
        if not abrupt:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.ws.close()
        self.ws.transport.abort()
        if self.task is not None:
            if self.kind == "slow":
                self.task.cancel()  # it would read what it buffered, one frame per 250 ms
            await asyncio.gather(self.task, return_exceptions=True)


async def _worker(job: Job, pipe: Connection) -> None:
    rng = random.Random(job.seed)
    result: dict[str, Any] = {
        "frames": Counter(),
        "errors": Counter(),
        "ends": Counter(),
        "closed_by_server": Counter(),
        "dropped": 0,
        "paced_latency": [],
        "metrics_latency": [],
        "churned": 0,
        "failed_connects": 0,
        "subscriptions": 0,
        "refused_subscriptions": 0,
    }
    semaphore = asyncio.Semaphore(50)
    clients = [Client(job, job.first + i, result) for i in range(job.conns)]
    await asyncio.gather(*(c.open(semaphore) for c in clients))
    pipe.send(("connected", len(clients)))
    loop = asyncio.get_running_loop()
    _, t_start, t_end = await loop.run_in_executor(None, pipe.recv)
    # The generator's own collector stays out of the figures (its full passes over the clients' objects
    # would count as the server's lateness); what the clients drop makes no cycles worth a pass here.
    gc.freeze()
    gc.disable()
    for c in clients:
        c.window = (t_start, t_end)
        c.task = asyncio.create_task(c.run())

    async def replace(i: int) -> None:
        await clients[i].leave(abrupt=rng.random() < 0.5)
        new = Client(job, job.first + i, result)
        try:
            async with asyncio.timeout(max(1.0, t_end - time.monotonic())):  # a saturated server must not hold the run past its window
                await new.open(semaphore)
        except (OSError, websockets.WebSocketException, TimeoutError):
            result["failed_connects"] += 1
            return
        new.window = (t_start, t_end)
        new.task = asyncio.create_task(new.run())
        clients[i] = new
        result["churned"] += 1

    while time.monotonic() < t_end:
        await asyncio.sleep(1.0)
        movable = [i for i, c in enumerate(clients) if c.kind != "slow" and c.task is not None]
        await asyncio.gather(*(replace(i) for i in rng.sample(movable, min(len(movable), int(job.churn * len(clients) + rng.random())))))
    await asyncio.gather(*(c.leave(abrupt=True) for c in clients), return_exceptions=True)
    pipe.send(("result", {k: (dict(v) if isinstance(v, Counter) else v) for k, v in result.items()}))
    gc.enable()


def worker(job: Job, pipe: Connection) -> None:
    """Entry point of a load-generator process."""
    try:
        try:
            import uvloop

            uvloop.run(_worker(job, pipe))
        except ImportError:
            asyncio.run(_worker(job, pipe))
    except BaseException as exc:
        pipe.send(("failed", repr(exc)))
        raise


def _expect(pipe: Connection, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a worker did not answer {kind!r} within {timeout:g} s")
    message = pipe.recv()
    if message[0] != kind:
        raise RuntimeError(f"worker: expected {kind!r}, got {message!r}")
    return message[1]


def clients_cpu(procs: list[tuple[Any, Connection]]) -> float:
    """CPU seconds the client processes have used."""
    total = 0.0
    for proc, _ in procs:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(proc.pid).cpu_times()
            total += times.user + times.system
    return total


def server_sample(server: Any, ps: psutil.Process, t0: float, last: dict[str, float], client_cpu: float = 0.0) -> dict[str, float]:
    """RSS, tasks, connections, streams, server frames/s and CPU % of the server and of all clients since the last sample."""
    try:
        with urllib.request.urlopen(server.http + "/metrics", timeout=60) as resp:  # a saturated server answers late
            text = resp.read().decode()
    except (OSError, TimeoutError):  # or not at all: the row shows its gauges as nan
        text = "\n".join(f"streamplex_{name} nan" for name in ("tasks", "connections", "outbox_bytes", "streams{}", 'frames_total{direction="out"}'))
    values: dict[str, float] = Counter()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        if base == "streamplex_frames_total" and 'direction="out"' in name:
            values["frames_out"] = float(value)
        elif base in ("streamplex_tasks", "streamplex_connections", "streamplex_outbox_bytes"):
            values[base.removeprefix("streamplex_")] = float(value)
        elif base == "streamplex_streams":
            values["streams"] += float(value)
    now = time.monotonic()
    cpu = ps.cpu_times()
    rate = (values["frames_out"] - last.get("frames_out", values["frames_out"])) / max(1e-9, now - last.get("at", now)) if last else 0.0
    span = max(1e-9, now - last.get("at", now))
    cpu_pct = 100 * (cpu.user + cpu.system - last.get("cpu", 0.0)) / span if last else 0.0
    clients_pct = max(0.0, 100 * (client_cpu - last.get("clients", 0.0)) / span) if last else 0.0  # 0 once the clients exited
    last.update(frames_out=values["frames_out"], at=now, cpu=cpu.user + cpu.system, clients=client_cpu)
    return {
        "t": now - t0,
        "rss_mib": ps.memory_info().rss / MiB,
        "tasks": values["tasks"],
        "connections": values["connections"],
        "streams": values["streams"],
        "outbox_mib": values["outbox_bytes"] / MiB,
        "frames_out_per_s": rate,
        "cpu_pct": cpu_pct,
        "clients_cpu_pct": clients_pct,
    }


class HealthProbe(threading.Thread):
    """GETs a path every `every` seconds until stopped, keeping each answer's latency (the timeout when none came)."""

    def __init__(self, url: str, every: float = 0.25, timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.url, self.every, self.timeout = url, every, timeout
        self.latencies: list[float] = []
        self.failures = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=self.timeout) as resp:
                    resp.read()
            except (OSError, TimeoutError):
                self.failures += 1
            self.latencies.append(time.monotonic() - start)
            self.stopped.wait(max(0.0, self.every - (time.monotonic() - start)))


def loop_lag(server: Any) -> dict[str, float]:
    """The server's event-loop lag histogram (`streamplex_event_loop_lag_seconds`): upper bounds of its p50, p99 and max buckets, in ms."""
    try:
        with urllib.request.urlopen(server.http + "/metrics", timeout=60) as resp:
            text = resp.read().decode()
    except (OSError, TimeoutError):
        return {}
    buckets = []
    for line in text.splitlines():
        if line.startswith("streamplex_event_loop_lag_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0.0
    out: dict[str, float] = {"probes": total}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        out[name] = next((1000 * bound for bound, count in buckets if count >= q * total), float("nan"))
    return out


def window_mark(server: Any, ps: psutil.Process, procs: list[tuple[Any, Connection]]) -> dict[str, Any]:
    """What the window's figures are the difference of: CPU seconds of the server and the clients, the server's frames out
    and loop-lag histogram buckets, the machine's load average, at one moment."""
    try:
        with urllib.request.urlopen(server.http + "/metrics", timeout=60) as resp:
            text = resp.read().decode()
    except (OSError, TimeoutError):
        text = ""
    buckets: list[tuple[float, float]] = []
    frames_out = float("nan")
    for line in text.splitlines():
        if line.startswith("streamplex_event_loop_lag_seconds_bucket"):
            buckets.append((float(line.split('le="', 1)[1].split('"', 1)[0]), float(line.rsplit(" ", 1)[1])))
        elif line.startswith('streamplex_frames_total{direction="out"}'):
            frames_out = float(line.rsplit(" ", 1)[1])
    cpu = ps.cpu_times()
    return {
        "at": time.monotonic(),
        "server_cpu": cpu.user + cpu.system,
        "server_sys": cpu.system,
        "clients_cpu": clients_cpu(procs),
        "frames_out": frames_out,
        "lag_buckets": buckets,
        "load": os.getloadavg()[0],
    }


def window_figures(first: dict[str, Any], last: dict[str, Any], delivered: int) -> dict[str, Any]:
    """The measured window's CPU shares (% of one core), the server's CPU per frame it sent and per chunk the clients got,
    the loop lag's percentiles over the window (histogram bucket bounds) and the load average at both ends."""
    span = max(1e-9, last["at"] - first["at"])
    server_cpu = last["server_cpu"] - first["server_cpu"]
    sent = last["frames_out"] - first["frames_out"]
    counts = [(bound, b - a) for (bound, b), (_, a) in zip(last["lag_buckets"], first["lag_buckets"], strict=False)]
    total = counts[-1][1] if counts else 0.0
    lag = {
        name: next((round(1000 * bound, 1) for bound, n in counts if n >= q * total), float("nan")) for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
    }
    return {
        "span_s": round(span, 1),
        "server_cpu_pct": round(100 * server_cpu / span, 1),
        "server_sys_pct": round(100 * (last["server_sys"] - first["server_sys"]) / span, 1),
        "clients_cpu_pct": round(100 * (last["clients_cpu"] - first["clients_cpu"]) / span, 1),
        "server_frames_out_per_s": round(sent / span, 1),
        "server_cpu_us_per_frame_out": round(1e6 * server_cpu / sent, 1) if sent > 0 else float("nan"),
        "server_cpu_us_per_delivered_chunk": round(1e6 * server_cpu / delivered, 1) if delivered else float("nan"),
        "loop_lag_ms": {**lag, "probes": total},
        "load_average": (round(first["load"], 2), round(last["load"], 2)),
    }


def start_profiler(path: Path, pid: int, duration: float) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server for the window (collapsed stacks, `--format raw`); None when py-spy is not on PATH."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy is not on PATH: no profile", file=sys.stderr)
        return None
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(duration))),
        "--rate",
        "100",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(path),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.path.insert(0, str(ROOT))
    from tests.serverproc import start_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    (tmp / "docs").mkdir()
    (tmp / "data").mkdir()
    write_sources(tmp / "docs", tmp / "data")
    from streamplex.server.config import Settings

    # The server's own admission defaults (tests' start_server turns lag-based admission off).
    settings: dict[str, Any] = {
        "heartbeat_interval": 20,
        "documents_dir": tmp / "docs",
        "data_dir": tmp / "data",
        "overload_lag": Settings.model_fields["overload_lag"].default,
    }
    settings.update(dict(item.split("=", 1) for item in args.setting))
    if args.chat:
        settings["chat_model"] = "smollm2-135m-instruct"
    from tests.serverproc import free_port

    settings.setdefault("health_port", free_port())
    server = start_server(tmp, **settings)
    procs: list[tuple[Any, Connection]] = []
    health = HealthProbe(server.http + "/health")
    threaded = HealthProbe(f"http://127.0.0.1:{settings['health_port']}/health")
    try:
        if args.chat:
            while orjson.loads(server.get("/ready")[1])["channels"]["chat"] == "loading":
                time.sleep(0.5)
        ps = psutil.Process(server.proc.pid)
        t0 = time.monotonic()
        last: dict[str, float] = {}
        timeline = [server_sample(server, ps, t0, last)]
        health.start()
        threaded.start()
        ctx = mp.get_context("spawn")
        first = 0
        for i in range(args.workers):
            share = args.conns // args.workers + (i < args.conns % args.workers)
            parent, child = ctx.Pipe()
            job = Job(server.url, server.key, first, share, args.interval_ms, args.slow_share, args.churn, args.chat, args.seed + i, args.mix, args.variants)
            proc = ctx.Process(target=worker, args=(job, child), daemon=True)
            proc.start()
            procs.append((proc, parent))
            first += share
        connected = sum(_expect(pipe, "connected", 600) for _, pipe in procs)
        connect_s = time.monotonic() - t0
        timeline.append(server_sample(server, ps, t0, last, clients_cpu(procs)))
        t_start = time.monotonic() + args.warmup
        t_end = t_start + args.duration
        for _, pipe in procs:
            pipe.send(("go", t_start, t_end))
        marks: list[dict[str, Any]] = []
        profiler = None
        while time.monotonic() < t_end:
            due = t_start if not marks else t_end
            time.sleep(min(args.every, max(0.0, due - time.monotonic())))
            if not marks and time.monotonic() >= t_start:
                marks.append(window_mark(server, ps, procs))
                if args.py_spy:
                    profiler = start_profiler(args.py_spy, server.proc.pid, args.duration)
            timeline.append(server_sample(server, ps, t0, last, clients_cpu(procs)))
        marks.append(window_mark(server, ps, procs))
        results = [_expect(pipe, "result", 120 + args.conns / 20) for _, pipe in procs]
        if profiler is not None:
            profiler.wait(60)
        health.stopped.set()
        lag = loop_lag(server)
        left = time.monotonic()
        while True:  # every client is gone: how long until the server holds nothing?
            timeline.append(server_sample(server, ps, t0, last, clients_cpu(procs)))
            if (timeline[-1]["connections"] == 0 and timeline[-1]["streams"] == 0) or time.monotonic() - left > args.drain:
                break
            time.sleep(1.0)
        drained_s = time.monotonic() - left
        log = server.log()
    finally:
        health.stopped.set()
        threaded.stopped.set()
        for proc, _ in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        server.stop()
    frames: Counter[str] = Counter()
    totals: dict[str, Counter[str]] = {k: Counter() for k in ("errors", "ends", "closed_by_server")}
    paced: list[float] = []
    metric_lat: list[float] = []
    for r in results:
        frames.update(r["frames"])
        for k in totals:
            totals[k].update(r[k])
        paced += r["paced_latency"]
        metric_lat += r["metrics_latency"]
    peak = max(s["rss_mib"] for s in timeline)
    subscribed = sum(r["subscriptions"] for r in results)
    delivered = sum(frames.values())
    return {
        "window": window_figures(marks[0], marks[-1], delivered),
        "mix": args.mix,
        "variants": args.variants,
        "conns": args.conns,
        "rss_start_mib": round(timeline[0]["rss_mib"], 1),
        "rss_peak_mib": round(peak, 1),
        "rss_kib_per_conn": round((peak - timeline[0]["rss_mib"]) * 1024 / max(1, connected), 1),
        "health_ms": {q: round(1000 * pct(health.latencies, q), 1) for q in (50, 99, 100)},
        "health_probes": len(health.latencies),
        "health_port_ms": {q: round(1000 * pct(threaded.latencies, q), 1) for q in (50, 99, 100)},
        "health_port_probes": len(threaded.latencies),
        "health_port_failures": threaded.failures,
        "loop_lag_ms": lag,
        "health_failures": health.failures,
        "subscriptions": subscribed,
        "refused_subscriptions": sum(r["refused_subscriptions"] for r in results),
        "connected": connected,
        "connect_s": round(connect_s, 1),
        "workers": args.workers,
        "window_s": args.duration,
        "frames_per_s": round(sum(frames.values()) / args.duration, 1),
        "frames_per_s_by_profile": {k: round(v / args.duration, 1) for k, v in sorted(frames.items())},
        "paced_latency_ms": {q: round(1000 * pct(paced, q), 2) for q in (50, 90, 99, 99.9)},
        "paced_frames": len(paced),
        "metrics_latency_ms": {q: round(1000 * pct(metric_lat, q), 2) for q in (50, 90, 99)},
        "dropped": sum(r["dropped"] for r in results),
        "churned": sum(r["churned"] for r in results),
        "failed_connects": sum(r["failed_connects"] for r in results),
        **{k: dict(v) for k, v in totals.items()},
        "server_tracebacks": log.count("Traceback"),
        "drained_s": round(drained_s, 1),
        "drained": timeline[-1]["connections"] == 0 and timeline[-1]["streams"] == 0,
        "timeline": timeline,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "| t s | RSS MiB | tasks | connections | streams | outbox MiB | server frames/s | server CPU % | clients CPU % |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in result["timeline"]:
        lines.append(
            f"| {s['t']:.0f} | {s['rss_mib']:.0f} | {s['tasks']:.0f} | {s['connections']:.0f} | {s['streams']:.0f} | {s['outbox_mib']:.2f} | {s['frames_out_per_s']:.0f} | {s['cpu_pct']:.0f} | {s['clients_cpu_pct']:.0f} |"
        )
    lat, mlat = result["paced_latency_ms"], result["metrics_latency_ms"]
    health, hp, w = result["health_ms"], result["health_port_ms"], result["window"]
    lines += [
        "",
        f"mix {result['mix']} ({result['variants']} inline variant(s)); server RSS {result['rss_start_mib']} MiB at start, peak {result['rss_peak_mib']} MiB: "
        f"{result['rss_kib_per_conn']} KiB per connection",
        f"/health ms: p50 {health[50]}, p99 {health[99]}, max {health[100]} over {result['health_probes']} probes ({result['health_failures']} failed or timed out)",
        f"/health on health_port (its own thread) ms: p50 {hp[50]}, p99 {hp[99]}, max {hp[100]} over {result['health_port_probes']} probes "
        f"({result['health_port_failures']} failed or timed out)",
        f"server event-loop lag ms (histogram bucket bounds, whole run): {result['loop_lag_ms']}",
        f"in the window ({w['span_s']} s, load average {w['load_average'][0]} -> {w['load_average'][1]} on {os.cpu_count()} cores): "
        f"server CPU {w['server_cpu_pct']}% of a core ({w['server_sys_pct']}% in the kernel), load generator (all client processes) {w['clients_cpu_pct']}%; "
        f"loop lag ms p50 {w['loop_lag_ms']['p50']}, p99 {w['loop_lag_ms']['p99']}, max {w['loop_lag_ms']['max']} (bucket bounds); "
        f"server sent {w['server_frames_out_per_s']} frames/s at {w['server_cpu_us_per_frame_out']} us CPU each "
        f"({w['server_cpu_us_per_delivered_chunk']} us per chunk the clients got)",
        f"subscriptions refused with overloaded at least once: {result['refused_subscriptions']} of {result['subscriptions']}",
        f"{result['connected']} connections from {result['workers']} client processes (connected in {result['connect_s']} s); window {result['window_s']} s",
        f"delivered frames/s: {result['frames_per_s']} (by profile: {result['frames_per_s_by_profile']})",
        f"paced text/data latency ms: p50 {lat[50]}, p90 {lat[90]}, p99 {lat[99]}, p99.9 {lat[99.9]} over {result['paced_frames']} frames",
        f"metrics latency ms (sample time to arrival): p50 {mlat[50]}, p90 {mlat[90]}, p99 {mlat[99]}",
        f"lossy chunks dropped (reported to clients): {result['dropped']}; churned connections: {result['churned']} ({result['failed_connects']} failed to connect)",
        f"after the clients left: server {'empty' if result['drained'] else 'NOT empty'} after {result['drained_s']} s "
        f"(connections {result['timeline'][-1]['connections']:.0f}, streams {result['timeline'][-1]['streams']:.0f}, tasks {result['timeline'][-1]['tasks']:.0f})",
        f"errors: {result['errors']}; stream ends: {result['ends']}; closed by the server: {result['closed_by_server']}; tracebacks in the server log: {result['server_tracebacks']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=1000, help="connections (up to 5000 on the 2-core development machine)")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    parser.add_argument("--duration", type=float, default=20.0, help="measurement window, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds between subscribing and the window")
    parser.add_argument("--interval-ms", type=int, default=200, help="pace of the text and data streams")
    parser.add_argument("--slow-share", type=float, help="share of slow-reading connections (default 0.05 with mix files, else 0)")
    parser.add_argument("--churn", type=float, help="share of the other connections replaced every second (default 0.01 with mix files, else 0)")
    parser.add_argument("--chat", action="store_true", help="2%% of the connections chat (loads the bundled chat model)")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to wait, after the clients left, for the server to hold no connection or stream")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between server samples")
    parser.add_argument("--mix", choices=["inline", "files", "metrics"], default="inline", help="the streams' profiles (see above)")
    parser.add_argument("--variants", type=int, default=1, help="distinct inline texts and record sets (mix inline)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE", help="a server setting (repeatable), e.g. connection_memory=1048576")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--py-spy", type=Path, metavar="FILE", help="sample the server with py-spy (on PATH) during the window, collapsed stacks to FILE")
    args = parser.parse_args()
    if args.slow_share is None:
        args.slow_share = 0.05 if args.mix == "files" else 0.0
    if args.churn is None:
        args.churn = 0.01 if args.mix == "files" else 0.0
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
