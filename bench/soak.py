"""Soak: churn of connects, subscribes, unsubscribes and abrupt disconnects over the real protocol, then a leak check.

`--clients` concurrent churners each loop until `--duration` is over: connect (header or first-frame
auth), open a few streams (text, data, metrics, logs; chat with `--chat`), read some of their frames,
unsubscribe some, ping, then leave: a clean close, an abrupt TCP abort with streams open, or a stall
(stop reading for a while, then abort). Once the idle server's RSS holds still (models load in the
background), a warm-up churn of `--warmup` seconds comes first, so that the baseline includes the
allocator's and the interpreter's one-off growth.

Passes only if, within `--settle` seconds after the churn, the server is back to its baseline:
connections 0, open streams 0, engine streams 0, asyncio tasks at the baseline count, and RSS within
`--rss-tolerance-mib` of the baseline; and if no reply fell outside the documented set, no stream ended
with an error and the server logged no traceback.
Figures over time are printed as a table. Example: `python bench/soak.py --duration 600`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import websockets

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SERVER_OPS = {"ready", "subscribed", "chunk", "end", "error", "pong"}
EXPECTED_ERRORS = {"unknown_id", "rate_limited", "unavailable"}


class Target(Protocol):
    """The server under test (tests.serverproc.ServerProc fits)."""

    url: str
    key: str

    @property
    def rss(self) -> int: ...

    def metric(self, name: str, labels: str = "") -> float: ...

    def get(self, path: str) -> tuple[int, bytes]: ...

    def log(self) -> str: ...


@dataclass
class Tally:
    """What the churners did and saw."""

    connections: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    frames: int = 0
    endings: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def streams_open(target: Target) -> float:
    """Open streams over every channel, from /metrics."""
    total = 0.0
    for line in target.get("/metrics")[1].decode().splitlines():
        if line.startswith("streamplex_streams{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sample(target: Target) -> dict[str, float]:
    """The figures the soak watches."""
    return {
        "rss_mib": target.rss / MiB,
        "tasks": target.metric("streamplex_tasks"),
        "connections": target.metric("streamplex_connections"),
        "streams": streams_open(target),
        "engine_streams": target.metric("streamplex_engine_streams"),
    }


def stream_params(rng: random.Random, chat: bool) -> tuple[str, dict[str, Any]]:
    """A channel and params for one subscribe, in a realistic mix."""
    roll = rng.random()
    if chat and roll < 0.1:
        return "chat", {"message": rng.choice(["Say hi.", "Name a fruit.", "Count to three."]), "max_tokens": rng.randint(4, 16)}
    if roll < 0.4:
        return "text", {
            "text": "lorem ipsum dolor sit amet " * rng.randint(10, 400),
            "unit": rng.choice(["chars", "words", "bytes"]),
            "chunk_size": rng.randint(1, 64),
            "interval_ms": rng.choice([0, 2, 10]),
        }
    if roll < 0.65:
        return "data", {
            "records": [{"i": i, "name": f"row {i}"} for i in range(rng.randint(1, 300))],
            "format": rng.choice(["ndjson", "json", "csv", "xml"]),
            "chunk_size": rng.randint(1, 50),
        }
    if roll < 0.85:
        return "metrics", {"interval_ms": rng.choice([100, 250, 500])}
    return "logs", {"lines": rng.randint(0, 20), "level": rng.choice(["DEBUG", "INFO", "WARNING"])}


def check(frame: dict[str, Any], tally: Tally) -> None:
    op = frame.get("op")
    if op not in SERVER_OPS:
        tally.problems.append(f"undocumented op: {frame}")
    elif op == "error":
        tally.errors[frame["code"]] += 1
        if frame["code"] not in EXPECTED_ERRORS:
            tally.problems.append(f"unexpected error: {frame}")
    elif op == "end":
        tally.endings[frame["reason"]] += 1
        if frame["reason"] == "error":
            tally.problems.append(f"stream failed: {frame}")


async def read_some(ws: websockets.ClientConnection, n: int, tally: Tally, open_ids: set[str]) -> None:
    """Read up to `n` frames (less if the server goes quiet for a moment)."""
    for _ in range(n):
        try:
            message = await asyncio.wait_for(ws.recv(), 0.2)
        except TimeoutError:
            return
        frame = orjson.loads(message)
        tally.frames += 1
        check(frame, tally)
        if frame["op"] == "end":
            open_ids.discard(frame["id"])


async def session(target: Target, rng: random.Random, tally: Tally, chat: bool, deadline: float) -> None:
    """One connection's life, ending clean, abrupt or stalled."""
    header = rng.random() < 0.5
    ws = await websockets.connect(target.url, additional_headers={"X-API-Key": target.key} if header else None, max_size=None, open_timeout=30)
    tally.connections += 1
    try:
        if not header:
            await ws.send(orjson.dumps({"op": "auth", "api_key": target.key}).decode())
        ready = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
        if ready["op"] != "ready":
            tally.problems.append(f"no ready: {ready}")
            return
        open_ids: set[str] = set()
        for n in range(rng.randint(1, 6)):
            if time.monotonic() > deadline:
                break
            action = rng.random()
            if action < 0.55 or not open_ids:
                channel, params = stream_params(rng, chat)
                stream_id = f"s{n}"
                await ws.send(orjson.dumps({"op": "subscribe", "id": stream_id, "channel": channel, "params": params}).decode())
                open_ids.add(stream_id)
                tally.subscribes += 1
            elif action < 0.8:
                stream_id = rng.choice(sorted(open_ids))
                await ws.send(orjson.dumps({"op": "unsubscribe", "id": stream_id}).decode())
                tally.unsubscribes += 1
            else:
                await ws.send('{"op":"ping"}')
            await read_some(ws, rng.randint(0, 40), tally, open_ids)
        ending = rng.random()
        if ending < 0.4:
            await ws.close()
        elif ending < 0.85:
            ws.transport.abort()  # vanish with streams open, no close frame
        else:
            await asyncio.sleep(rng.uniform(0.5, 2.0))  # a stalled reader, then gone
            ws.transport.abort()
    finally:
        if ws.transport is not None and not ws.transport.is_closing():
            ws.transport.abort()


async def churner(target: Target, seed: int, deadline: float, tally: Tally, chat: bool) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            await session(target, rng, tally, chat, deadline)
        except (OSError, websockets.ConnectionClosed, TimeoutError) as exc:
            tally.problems.append(f"connection failed: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)


async def churn(target: Target, seconds: float, clients: int, seed: int, chat: bool, tally: Tally, every: float, timeline: list[dict[str, float]]) -> None:
    """Run `clients` churners for `seconds`, sampling the server's figures every `every` seconds."""
    start = time.monotonic()
    deadline = start + seconds
    tasks = [asyncio.create_task(churner(target, seed * 1000 + i, deadline, tally, chat)) for i in range(clients)]
    while time.monotonic() < deadline:
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))
        timeline.append({"t": time.monotonic() - start, **await asyncio.to_thread(sample, target)})
    await asyncio.gather(*tasks)


async def settle(target: Target, baseline: dict[str, float], tolerance_mib: float, timeout: float) -> tuple[dict[str, float], list[str]]:
    """Wait for the server to return to its baseline; the last sample and what did not return."""
    deadline = time.monotonic() + timeout
    while True:
        now = await asyncio.to_thread(sample, target)
        failures = [
            f"{name} {now[name]:g} (baseline {baseline[name]:g})"
            for name in ("tasks", "connections", "streams", "engine_streams")
            if now[name] > baseline[name]
        ]
        if now["rss_mib"] > baseline["rss_mib"] + tolerance_mib:
            failures.append(f"rss {now['rss_mib']:.1f} MiB (baseline {baseline['rss_mib']:.1f} + {tolerance_mib:g} MiB tolerance)")
        if not failures or time.monotonic() > deadline:
            return now, failures
        await asyncio.sleep(0.5)


async def quiet(target: Target, window: int = 5, slack_mib: float = 2.0, timeout: float = 180.0) -> None:
    """Wait until the idle server's RSS holds still (models load in the background after /ready)."""
    readings: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readings = [*readings[-(window - 1) :], target.rss / MiB]
        if len(readings) == window and max(readings) - min(readings) <= slack_mib:
            return
        await asyncio.sleep(1.0)


async def soak(
    target: Target,
    duration: float,
    clients: int = 50,
    warmup: float = 10.0,
    settle_s: float = 30.0,
    rss_tolerance_mib: float = 30.0,
    seed: int = 1,
    chat: bool = False,
    every: float = 5.0,
) -> dict[str, Any]:
    """Warm up, take the baseline, churn for `duration` seconds, settle, and compare. `passed` says the verdict."""
    await quiet(target)
    tally = Tally()
    warm: list[dict[str, float]] = []
    await churn(target, warmup, clients, seed + 7919, chat, tally, every, warm)
    baseline, _ = await settle(target, {"tasks": 1e9, "connections": 0, "streams": 0, "engine_streams": 0, "rss_mib": 1e9}, 0, settle_s)
    tally = Tally()
    timeline: list[dict[str, float]] = []
    started = time.monotonic()
    await churn(target, duration, clients, seed, chat, tally, every, timeline)
    churned = time.monotonic() - started
    after, failures = await settle(target, baseline, rss_tolerance_mib, settle_s)
    failures += tally.problems[:20]
    if "Traceback" in target.log():
        failures.append("the server logged an unhandled exception")
    return {
        "passed": not failures and tally.connections > 0,
        "failures": failures,
        "duration_s": round(churned, 1),
        "clients": clients,
        "connections": tally.connections,
        "connections_per_s": round(tally.connections / churned, 1),
        "subscribes": tally.subscribes,
        "unsubscribes": tally.unsubscribes,
        "frames": tally.frames,
        "endings": dict(tally.endings),
        "errors": dict(tally.errors),
        "baseline": baseline,
        "after": after,
        "peak": {k: max(s[k] for s in timeline) for k in baseline} if timeline else {},
        "timeline": timeline,
    }


def report(result: dict[str, Any]) -> str:
    """The result as text: a timeline table, then the verdict."""
    lines = ["| t s | RSS MiB | tasks | connections | streams | engine streams |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in [{"t": 0.0, **result["baseline"]}, *result["timeline"]]:
        lines.append(
            f"| {row['t']:.0f} | {row['rss_mib']:.1f} | {row['tasks']:.0f} | {row['connections']:.0f} | {row['streams']:.0f} | {row['engine_streams']:.0f} |"
        )
    b, a = result["baseline"], result["after"]
    lines += [
        "",
        f"churn: {result['duration_s']} s, {result['clients']} concurrent clients, {result['connections']} connections ({result['connections_per_s']}/s), "
        f"{result['subscribes']} subscribes, {result['unsubscribes']} unsubscribes, {result['frames']} frames read",
        f"stream endings seen: {result['endings']}; errors seen: {result['errors']}",
        f"baseline -> after settling: RSS {b['rss_mib']:.1f} -> {a['rss_mib']:.1f} MiB, tasks {b['tasks']:.0f} -> {a['tasks']:.0f}, "
        f"connections {b['connections']:.0f} -> {a['connections']:.0f}, streams {b['streams']:.0f} -> {a['streams']:.0f}, engine streams {b['engine_streams']:.0f} -> {a['engine_streams']:.0f}",
        "PASS" if result["passed"] else "FAIL: " + "; ".join(result["failures"]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of churn after the warm-up (default 10 minutes)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent churning clients")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of churn before the baseline is taken")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds the server has to return to its baseline")
    parser.add_argument("--rss-tolerance-mib", type=float, default=30.0, help="RSS growth over the baseline still counted as returned")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples of the timeline")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chat", action="store_true", help="also churn chat streams (loads the bundled chat model)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.serverproc import start_server

    with tempfile.TemporaryDirectory() as tmp:
        # Abruptly dropped sessions stay resumable for the resume window: keep it inside --settle.
        settings: dict[str, Any] = {"resume_window": min(30.0, args.settle / 3), **({"chat_model": "smollm2-135m-instruct"} if args.chat else {})}
        server = start_server(Path(tmp), **settings)
        try:
            if args.chat:
                while orjson.loads(server.get("/ready")[1])["channels"]["chat"] == "loading":
                    time.sleep(0.5)
            result = asyncio.run(soak(server, args.duration, args.clients, args.warmup, args.settle, args.rss_tolerance_mib, args.seed, args.chat, args.every))
        finally:
            server.stop()
    print(report(result))
    if args.json:
        args.json.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
