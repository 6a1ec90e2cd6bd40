"""Transport throughput, latency, CPU and memory: streamplex against a bare websockets broadcast server.

Load phases (`--conns`, default 100 and 1000): every client subscribes one shared stream of small
chunk frames, one every `--interval-ms`. On streamplex that is the `metrics` channel, which one
sampler serves to every subscriber, once per `--fields` choice of groups: by default `server` (the
server's own counters: ~280-byte frames whose sampling costs next to nothing, so the figure is the
transport's) and then `cpu,memory` (the same size, plus the procfs reads psutil makes every sample).
The reference is a minimal `websockets.asyncio.server` (`--reference-server`, below) that broadcasts
one frame of the same shape and `--frame-bytes` size to every subscriber at the same rate.

A subscribe refused with `overloaded` (the server's admission control) is sent again after its
`retry_after`, as the SDKs do; the refusals are counted (`refused`).

Reported per phase, over a window of `--duration` seconds after `--warmup`:
- delivered frames/s (chunk frames received by all clients inside the window);
- delivery latency p50/p99: arrival time minus the time stamped in the frame by the server, both
  read from the same clock (CLOCK_REALTIME, one machine): `data.time`, taken when the metrics sample
  is read, on streamplex; the time the broadcast starts on the reference;
- server CPU per delivered frame: psutil user+system time of the server process over the window,
  divided by the frames delivered in it.
Idle phase (`--idle-conns`, default 2000): server RSS growth per authenticated idle connection, with
the client asking for permessage-deflate and without (both servers offer it, 12-bit windows).

The clients run in `--workers` processes (uvloop where installed). Loopback only.
Example: `python bench/transport.py` (about 4 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import psutil
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-transport-key"
STREAM_ID = "s1"
# {"op":"chunk","id":"s1","seq":123,"data":""} as the server encodes it (compact JSON).
FRAME_OVERHEAD = len(orjson.dumps({"op": "chunk", "id": STREAM_ID, "seq": 123, "data": ""}))
FILLER = "the quick brown fox jumps over the lazy dog "


def run_loop(main: Any) -> Any:
    """Run a coroutine on uvloop when installed (both servers and the clients use it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# --- the reference: a bare websockets broadcast server ---------------------------------------


async def reference_server(port: int, interval: float, data_len: int) -> None:
    """Speak just enough of protocol v1 (auth, ready, subscribe, subscribed, chunk) and broadcast one frame per tick."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    subscribers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        key = ws.request.headers.get("X-API-Key") if ws.request else None
        if key is None:
            key = orjson.loads(await ws.recv()).get("api_key")
        if key != KEY:
            await ws.close(4001, "invalid API key")
            return
        await ws.send(orjson.dumps({"op": "ready", "session": "ref", "channels": [], "limits": {}}).decode())
        try:
            async for message in ws:
                op = orjson.loads(message)
                if op.get("op") == "subscribe":
                    await ws.send(orjson.dumps({"op": "subscribed", "id": op["id"], "channel": op.get("channel")}).decode())
                    subscribers.add(ws)
        finally:
            subscribers.discard(ws)

    async with serve(handler, "127.0.0.1", port, max_size=1_048_576):
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        filler = (FILLER * (data_len // len(FILLER) + 1))[:data_len]
        while True:
            await asyncio.sleep(max(0.0, start + n * interval - loop.time()))
            stamp = f"{time.time():.6f} "
            data = stamp + filler[len(stamp) :]
            broadcast(subscribers, orjson.dumps({"op": "chunk", "id": STREAM_ID, "seq": n, "data": data}).decode())
            n += 1


# --- the load generator (one per worker process) ----------------------------------------------


@dataclass
class Job:
    url: str
    conns: int
    compression: str | None
    subscribe: dict[str, Any] | None  # None: idle connections only
    interval: float
    stamped: bool


async def _open(job: Job, semaphore: asyncio.Semaphore) -> ClientConnection:
    async with semaphore:
        ws = await connect(job.url, additional_headers={"X-API-Key": KEY}, compression=job.compression, max_size=None, open_timeout=60, ping_interval=None)
        hello = orjson.loads(await ws.recv())
        if hello.get("op") != "ready":
            raise RuntimeError(f"expected ready, got {hello}")
        return ws


async def _client(job: Job, pipe: Connection) -> None:
    semaphore = asyncio.Semaphore(64)
    sockets = await asyncio.gather(*(_open(job, semaphore) for _ in range(job.conns)))
    pipe.send(("connected", len(sockets)))
    loop = asyncio.get_running_loop()
    command = await loop.run_in_executor(None, pipe.recv)  # ("go", t_start, t_end) or ("close",)
    result: dict[str, Any] = {"frames": 0, "latencies": [], "bytes": 0, "errors": 0, "refused": 0}
    if command[0] == "go" and job.subscribe is not None:
        t_start, t_end = command[1], command[2]
        # The generator's own collector stays out of the figures: its full passes over the connections'
        # objects took 0.2-0.3 s inside the window, counted as the server's lateness. Frames make no cycles.
        gc.freeze()
        gc.disable()
        subscribe = orjson.dumps(job.subscribe).decode()

        async def consume(ws: ClientConnection) -> None:
            await ws.send(subscribe)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(t_end - time.monotonic() + 0.2):
                    async for message in ws:
                        now, arrival = time.monotonic(), time.time()
                        frame = orjson.loads(message)
                        if frame.get("op") == "error" and frame.get("code") == "overloaded":  # wait as told, then again (as the SDKs do)
                            result["refused"] += 1
                            await asyncio.sleep(frame.get("retry_after") or 1.0)
                            await ws.send(subscribe)
                            continue
                        if frame.get("op") != "chunk":
                            if frame.get("op") in ("error", "end"):
                                result["errors"] += frame.get("op") == "error"
                                break
                            continue
                        data = frame["data"]
                        stamp = float(data.split(" ", 1)[0]) if job.stamped else data["time"]
                        if t_start <= now <= t_end:
                            result["frames"] += 1
                            result["bytes"] += len(message)
                            result["latencies"].append(arrival - stamp)

        await asyncio.gather(*(consume(ws) for ws in sockets), return_exceptions=False)
        pipe.send(("result", result))
        gc.enable()
        await loop.run_in_executor(None, pipe.recv)  # ("close",)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    pipe.send(("closed", result if job.subscribe is None else None))


def worker(job: Job, pipe: Connection) -> None:
    """Entry point of a load-generator process."""
    try:
        run_loop(_client(job, pipe))
    except BaseException as exc:
        pipe.send(("failed", repr(exc)))
        raise


# --- the coordinator -----------------------------------------------------------------------------


class Server:
    """A server under test, started as a subprocess."""

    def __init__(self, target: str, args: argparse.Namespace, deflate: bool = True) -> None:
        self.target = target
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{target}-", suffix=".log", delete=False)  # noqa: SIM115
        no_models = {f"STREAMPLEX_{name}": "" for name in ("CHAT_MODEL", "ASR_MODEL", "EMBEDDING_MODEL", "TRANSLATION_MODEL")}
        env = {
            **os.environ,
            **no_models,
            "STREAMPLEX_API_KEYS": KEY,
            "STREAMPLEX_LOG_LEVEL": "WARNING",
            "STREAMPLEX_PER_MESSAGE_DEFLATE": "true" if deflate else "false",
        }
        if target == "streamplex":
            command = [sys.executable, "-m", "streamplex.server", "--port", str(self.port)]
        else:
            command = [
                sys.executable,
                __file__,
                "--reference-server",
                str(self.port),
                "--interval-ms",
                str(args.interval_ms),
                "--frame-bytes",
                str(args.frame_bytes),
            ]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self._wait_listening(60.0)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} server exited; see {self.log.name}")
            if self.target == "streamplex":
                with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            else:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.target} server did not start; see {self.log.name}")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _expect(pipe: Connection, kind: str, timeout: float = 300.0) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"worker did not answer {kind!r} within {timeout:g} s")
    message = pipe.recv()
    if message[0] != kind:
        raise RuntimeError(f"worker: expected {kind!r}, got {message!r}")
    return message[1]


def _spawn(job: Job, workers: int) -> list[tuple[Any, Connection]]:
    ctx = mp.get_context("spawn")
    procs = []
    for i in range(workers):
        share = job.conns // workers + (i < job.conns % workers)
        if not share:
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(Job(job.url, share, job.compression, job.subscribe, job.interval, job.stamped), child), daemon=True)
        proc.start()
        procs.append((proc, parent))
    for _, pipe in procs:
        _expect(pipe, "connected")
    return procs


def _join(procs: list[tuple[Any, Connection]]) -> None:
    for proc, _ in procs:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def load_phase(server: Server, conns: int, args: argparse.Namespace, fields: str = "") -> dict[str, Any]:
    """N connections, each one stream (on streamplex, of the metrics groups `fields`); figures over the measurement window."""
    interval = args.interval_ms / 1000
    params = {"interval_ms": args.interval_ms, "fields": fields.split(",")} if server.target == "streamplex" else {}
    job = Job(server.url, conns, None, {"op": "subscribe", "id": STREAM_ID, "channel": "metrics", "params": params}, interval, server.target == "reference")
    procs = _spawn(job, args.workers)
    t_start = time.monotonic() + 0.5 + args.warmup
    t_end = t_start + args.duration
    wall_start = time.time() + (t_start - time.monotonic())
    for _, pipe in procs:
        pipe.send(("go", t_start, t_end))
    time.sleep(max(0.0, t_start - time.monotonic()))
    cpu0 = server.cpu()
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu1 = server.cpu()
    results = [_expect(pipe, "result", args.duration + 120) for _, pipe in procs]
    for _, pipe in procs:
        pipe.send(("close",))
    for _, pipe in procs:
        _expect(pipe, "closed")
    _join(procs)
    frames = sum(r["frames"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "target": server.target,
        "fields": fields,
        "conns": conns,
        "frames_per_s": frames / args.duration,
        "expected_per_s": conns / interval,
        "frame_bytes": sum(r["bytes"] for r in results) / frames if frames else float("nan"),
        "p50_ms": 1000 * pct(latencies, 50),
        "p99_ms": 1000 * pct(latencies, 99),
        "cpu_us_per_frame": 1e6 * (cpu1 - cpu0) / frames if frames else float("nan"),
        "server_cpu_percent": 100 * (cpu1 - cpu0) / args.duration,
        "errors": sum(r["errors"] for r in results),
        "refused": sum(r["refused"] for r in results),
        "window_unix": (round(wall_start, 3), round(wall_start + args.duration, 3)),
    }


def idle_phase(server: Server, conns: int, compression: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """RSS growth of the server per authenticated idle connection."""
    time.sleep(1.0)
    rss0 = server.rss()
    procs = _spawn(Job(server.url, conns, compression, None, 0.0, False), args.workers)
    time.sleep(args.settle)
    rss1 = server.rss()
    for _, pipe in procs:
        pipe.send(("close",))
    for _, pipe in procs:
        _expect(pipe, "closed")
    _join(procs)
    return {
        "target": server.target,
        "conns": conns,
        "deflate": compression is not None,
        "rss_before_mib": rss0 / 2**20,
        "rss_after_mib": rss1 / 2**20,
        "kib_per_conn": (rss1 - rss0) / conns / 1024,
    }


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(loads: list[dict[str, Any]], idles: list[dict[str, Any]]) -> str:
    """The figures as Markdown tables, streamplex quoted as a ratio to the reference of the same run."""
    ref_load = {r["conns"]: r for r in loads if r["target"] == "reference"}
    lines = [
        "| server | metrics groups | conns | frame bytes | frames/s (expected) | p50 ms | p99 ms | server CPU us/frame | CPU vs ref | server CPU % |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in loads:
        ref = ref_load.get(r["conns"])
        ratio = f"{r['cpu_us_per_frame'] / ref['cpu_us_per_frame']:.2f}x" if ref and r["target"] != "reference" else "1.00x" if ref else "-"
        lines.append(
            f"| {r['target']} | {r['fields'] or '-'} | {r['conns']} | {r['frame_bytes']:.0f} | {r['frames_per_s']:.0f} ({r['expected_per_s']:.0f}) | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us_per_frame']:.1f} | {ratio} | {r['server_cpu_percent']:.0f} |"
        )
    ref_idle = {r["deflate"]: r for r in idles if r["target"] == "reference"}
    lines += ["", "| server | idle conns | permessage-deflate | RSS before -> after MiB | KiB per conn | vs ref |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in idles:
        ref = ref_idle.get(r["deflate"])
        ratio = f"{r['kib_per_conn'] / ref['kib_per_conn']:.2f}x" if ref and ref["kib_per_conn"] > 0 else "-"
        lines.append(
            f"| {r['target']} | {r['conns']} | {'on' if r['deflate'] else 'off'} | {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} | {r['kib_per_conn']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", default="100,1000", help="comma-separated connection counts for the load phases")
    parser.add_argument("--idle-conns", type=int, default=2000, help="connections for the idle-memory phases (0 skips them)")
    parser.add_argument("--interval-ms", type=int, default=100, help="milliseconds between a stream's frames")
    parser.add_argument(
        "--frame-bytes",
        type=int,
        default=250,
        help="size of the reference's chunk frames (before WebSocket framing); match streamplex's, which the report shows",
    )
    parser.add_argument(
        "--fields",
        action="append",
        help="the metrics groups streamplex's stream carries, comma-separated; repeat for one set of load phases each (default: server, then cpu,memory)",
    )
    parser.add_argument("--duration", type=float, default=12.0, help="measurement window of each load phase, seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds between subscribing and the window")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the idle connections opened before reading RSS")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2), help="load-generator processes")
    parser.add_argument("--targets", default="reference,streamplex", help="which servers, in order")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--reference-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.fields = args.fields or ["server", "cpu,memory"]
    if args.reference_server is not None:
        run_loop(reference_server(args.reference_server, args.interval_ms / 1000, args.frame_bytes - FRAME_OVERHEAD))
        return
    limit = raise_fd_limit()
    need = args.idle_conns + 64
    if limit < need:
        sys.exit(f"open-files limit {limit} is below {need}; raise the hard limit (ulimit -Hn)")
    print(
        f"open-files limit {limit}; {os.cpu_count()} CPUs; {args.workers} client processes; frame {args.frame_bytes} B every {args.interval_ms} ms per stream",
        file=sys.stderr,
    )
    loads: list[dict[str, Any]] = []
    idles: list[dict[str, Any]] = []
    for target in args.targets.split(","):
        server = Server(target, args)
        try:
            for fields in args.fields if target == "streamplex" else [""]:
                for n in (int(x) for x in args.conns.split(",") if x):
                    print(f"{target}: load, {n} connections {fields}", file=sys.stderr)
                    loads.append(load_phase(server, n, args, fields))
                    print(f"  {loads[-1]}", file=sys.stderr)
        finally:
            server.stop()
        for compression in (None, "deflate") if args.idle_conns else ():
            server = Server(target, args)  # a fresh process each time, so freed memory from earlier phases is not reused
            try:
                print(f"{target}: idle, {args.idle_conns} connections, deflate {'on' if compression else 'off'}", file=sys.stderr)
                idles.append(idle_phase(server, args.idle_conns, compression, args))
                print(f"  {idles[-1]}", file=sys.stderr)
            finally:
                server.stop()
    print(report(loads, idles))
    if args.json:
        args.json.write_text(json.dumps({"loads": loads, "idles": idles, "args": {k: v for k, v in vars(args).items() if k != "json"}}, indent=2, default=str))


if __name__ == "__main__":
    main()
