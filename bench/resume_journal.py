"""What recording sessions in Redis costs per chunk: the same lossless streams on a node without Redis and on one
with it (each chunk then also goes to a Redis Stream, see server/session_store.py).

Everything runs on this machine on loopback: a redis-server and two server nodes (`python -m streamplex.server`); the load
generator is this process and shares the cores with them. Each round opens `--streams` data streams (one record
per chunk, unpaced) on one connection per node in turn and reads them to their end; it prints, per node, the
server's CPU time (user + system, from /proc) per delivered chunk, the chunks per second, and the ratio with
Redis to without. Redis's own CPU per chunk is shown apart.

Example (the figures in docs/benchmarks.md): `python bench/resume_journal.py --streams 4 --records 20000 --rounds 3`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.redisproc import RedisProc  # noqa: E402
from tests.serverproc import KEY, ServerProc, free_port, start_server  # noqa: E402


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def run(node: ServerProc, streams: int, records: int) -> int:
    """Open `streams` data streams on one connection and read every chunk; the chunks received."""
    async with websockets.connect(node.url, additional_headers={"X-API-Key": KEY}, max_size=None, compression=None) as ws:
        await ws.recv()
        params = {"records": [{"i": i} for i in range(records)], "chunk_size": 1}
        for s in range(streams):
            await ws.send(orjson.dumps({"op": "subscribe", "id": f"d{s}", "channel": "data", "params": params}).decode())
        chunks, ended = 0, 0
        while ended < streams:
            frame = orjson.loads(await ws.recv())
            if frame["op"] == "chunk":
                chunks += 1
            elif frame["op"] == "end":
                assert frame["reason"] == "complete", frame
                ended += 1
        return chunks


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4, help="data streams per round")
    parser.add_argument("--records", type=int, default=20000, help="records (= chunks) per stream")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per node, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis = RedisProc(free_port(), tmp / "redis.log")
        redis.start()
        assert redis.proc is not None
        plain = start_server(tmp, node="plain", overload_lag=0)
        shared = start_server(tmp, node="shared", redis_url=redis.url, overload_lag=0)
        try:
            totals = {"plain": [0.0, 0.0, 0], "shared": [0.0, 0.0, 0]}  # cpu s, wall s, chunks
            redis_cpu = 0.0
            for _ in range(args.rounds):
                for name, node in (("plain", plain), ("shared", shared)):
                    before, redis_before, start = cpu(node.proc.pid), cpu(redis.proc.pid), time.perf_counter()
                    chunks = await run(node, args.streams, args.records)
                    await asyncio.sleep(0.5)  # the journal's last batches
                    wall = time.perf_counter() - start
                    totals[name][0] += cpu(node.proc.pid) - before
                    totals[name][1] += wall
                    totals[name][2] += chunks
                    if name == "shared":
                        redis_cpu += cpu(redis.proc.pid) - redis_before
            per = {name: (c / n * 1e6, n / w) for name, (c, w, n) in totals.items()}
            for name, (us, rate) in per.items():
                print(f"{name:7} server CPU {us:6.1f} µs/chunk   {rate:8.0f} chunks/s (wall, incl. 0.5 s settle per round)")
            print(f"with Redis / without: CPU per chunk x{per['shared'][0] / per['plain'][0]:.2f}")
            print(f"redis-server CPU {redis_cpu / totals['shared'][2] * 1e6:.1f} µs/chunk")
            dropped = shared.metric("streamplex_redis_session_writes_dropped")
            print(f"session writes dropped (queue full or Redis down): {dropped:.0f}")
            print(f"{totals['shared'][2]} chunks per node; the load generator shares the machine's {psutil.cpu_count()} cores with the servers")
        finally:
            plain.stop()
            shared.stop()
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
