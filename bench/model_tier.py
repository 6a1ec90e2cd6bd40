"""The model tier's cost and its failover pause: chat through an edge node and a model worker against a local node.

Everything runs on this machine on loopback: a redis-server, a node with the bundled chat model (`local`), an edge
node with chat remote and one or two model workers (`python -m streamplex.server --role model`), all on the CPU.
The load generator is this process, and every process shares the machine's cores.

Phase `overhead`: `--streams` concurrent greedy chat streams of `--tokens` tokens each, first on the local node,
then through the edge node (one worker), `--rounds` times alternately: per stream, the time from the subscribe to
the first delta and to the end; the ratio of remote to local (medians of the rounds).
Phase `failover` (with `--failover`): a second worker joins; one stream through the edge, the worker running it
SIGKILLed after 8 deltas: the pause the client sees (from the last delta before the kill to the first after it),
with `model_claim_idle` `--claim-idle`, and whether the text equals the uninterrupted run's.

Example (the figures in docs/benchmarks.md): `python bench/model_tier.py --streams 4 --tokens 64 --rounds 3 --failover`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.redisproc import running_redis  # noqa: E402
from tests.serverproc import ServerProc, connect, recv, send, start_model_worker, start_server  # noqa: E402

PROMPT = "Tell me about the history of Rome."


def wait_available(node: ServerProc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while orjson.loads(node.get("/ready")[1])["channels"]["chat"] != "available":
        if time.monotonic() > deadline:
            raise RuntimeError("the chat model did not load")
        time.sleep(0.5)


async def one_stream(node: ServerProc, tokens: int, index: int) -> tuple[float, float, str]:
    """(seconds to the first delta, seconds to the end, the text) of one greedy chat stream."""
    ws = await connect(node)
    started = time.perf_counter()
    await send(ws, op="subscribe", id="c", channel="chat", params={"message": f"{PROMPT} ({index})", "max_tokens": tokens})
    first, parts = None, []
    while True:
        frame = await recv(ws, 600)
        if frame.get("op") == "chunk" and "delta" in frame["data"]:
            first = first or time.perf_counter() - started
            parts.append(frame["data"]["delta"])
        elif frame.get("op") == "end":
            assert frame["reason"] == "complete", frame
            break
    await ws.close()
    return first or 0.0, time.perf_counter() - started, "".join(parts)


async def round_of(node: ServerProc, streams: int, tokens: int) -> tuple[float, float, list[str]]:
    results = await asyncio.gather(*(one_stream(node, tokens, i) for i in range(streams)))
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), [r[2] for r in results]


async def failover(edge: ServerProc, workers: list[ServerProc], tokens: int) -> dict[str, Any]:
    _, _, expected = await one_stream(edge, tokens, 0)
    ws = await connect(edge)
    await send(ws, op="subscribe", id="c", channel="chat", params={"message": f"{PROMPT} (0)", "max_tokens": tokens})
    parts: list[str] = []
    last = pause = 0.0
    killed = False
    while True:
        frame = await recv(ws, 600)
        if frame.get("op") == "chunk" and "delta" in frame["data"]:
            now = time.perf_counter()
            if killed and not pause:
                pause = now - last
            parts.append(frame["data"]["delta"])
            last = now
            if len(parts) == 8 and not killed:
                busy = next(w for w in workers if w.metric("streamplex_model_worker_jobs"))
                busy.stop(signal.SIGKILL)
                killed = True
        elif frame.get("op") == "end":
            break
    await ws.close()
    return {"pause_s": round(pause, 3), "identical": "".join(parts) == expected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--claim-idle", type=float, default=2.0)
    parser.add_argument("--failover", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, running_redis(Path(folder)) as redis_server:
        tmp = Path(folder)
        common = {"redis_url": redis_server.url, "redis_prefix": "bench-tier", "model_claim_idle": args.claim_idle}
        model = {"chat_model": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32"}
        procs: list[ServerProc] = []
        try:
            local = start_server(tmp, node="local", **model)
            procs.append(local)
            workers = [start_model_worker(tmp, node="worker-1", remote_channels="chat", **model, **common)]
            procs += workers
            edge = start_server(tmp, node="edge", remote_channels="chat", **common)
            procs.append(edge)
            wait_available(local)
            wait_available(edge)
            asyncio.run(round_of(local, 1, 8))  # warm-up of both
            asyncio.run(round_of(edge, 1, 8))
            rows: dict[str, list[tuple[float, float]]] = {"local": [], "remote": []}
            texts: dict[str, list[list[str]]] = {"local": [], "remote": []}
            for _ in range(args.rounds):
                for name, node in (("local", local), ("remote", edge)):
                    first, total, made = asyncio.run(round_of(node, args.streams, args.tokens))
                    rows[name].append((first, total))
                    texts[name].append(made)
            same = texts["local"] == texts["remote"]
            print(f"{args.streams} concurrent greedy chat streams of {args.tokens} tokens, {args.rounds} rounds (medians over streams, then rounds)")
            for name in ("local", "remote"):
                first = statistics.median(r[0] for r in rows[name])
                total = statistics.median(r[1] for r in rows[name])
                print(f"  {name:<6}  first delta {first * 1000:8.1f} ms   whole stream {total:7.2f} s")
            ratio_first = statistics.median(r[0] for r in rows["remote"]) / statistics.median(r[0] for r in rows["local"])
            ratio_total = statistics.median(r[1] for r in rows["remote"]) / statistics.median(r[1] for r in rows["local"])
            print(f"  remote/local: first delta x{ratio_first:.2f}, whole stream x{ratio_total:.2f}; texts identical: {same}")
            if args.failover:
                workers.append(start_model_worker(tmp, node="worker-2", remote_channels="chat", **model, **common))
                procs.append(workers[-1])
                while edge.metric("streamplex_model_workers", 'channel="chat"') < 2:
                    time.sleep(0.5)
                result = asyncio.run(failover(edge, workers, args.tokens))
                print(f"failover (model_claim_idle {args.claim_idle:g} s): pause {result['pause_s']} s, text identical: {result['identical']}")
        finally:
            for proc in procs:
                proc.stop()


if __name__ == "__main__":
    main()
