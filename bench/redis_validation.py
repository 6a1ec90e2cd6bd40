"""What checking every message from Redis costs: a node's receive path for a log record and for a metrics
sample pair, with the checks (server/redis_broker.py, server/logbuffer.py, channels/metrics.py), against
parsing the same bytes with orjson alone (the floor any receive path pays).

The messages are real: a record from RingLogHandler and two samples of every group from the metrics
Sampler. No Redis is needed: the broker's receive path is called directly, with one subscriber per topic.

Example: `python bench/redis_validation.py --messages 20000`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable

import orjson

from streamplex.channels.metrics import GROUPS, Sampler, check_samples
from streamplex.server.logbuffer import RingLogHandler, check_record
from streamplex.server.redis_broker import RedisBroker


def _timed(fn: Callable[[bytes], object], payload: bytes, n: int) -> float:
    """Seconds per call of fn(payload), best of three rounds of n."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn(payload)
        best = min(best, (time.perf_counter() - start) / n)
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000, help="messages per round (three rounds, best kept)")
    args = parser.parse_args()

    handler = RingLogHandler(10, "node-x")
    handler.emit(
        logging.LogRecord(
            "streamplex.server.connection", logging.INFO, __file__, 1, "connection %s from %s authenticated as %s", ("c-1f2e", "10.0.0.7", "key-3"), None
        )
    )
    record = handler.recent()[0]
    sampler = Sampler(
        lambda: {"connections": 3, "streams": {"logs": 1}, "frames_out": 10, "bytes_out": 1000, "frames_in": 5, "dropped": 0, "errors": 0}, node="node-x"
    )
    first = sampler.sample(GROUPS)
    await asyncio.sleep(0.05)
    pair = (first, sampler.sample(GROUPS))

    broker = RedisBroker("redis://127.0.0.1:1/0", "node-y", "bench")
    broker.accept("logs", check_record)
    broker.accept("metrics", check_samples)
    for topic in ("logs", "metrics"):
        broker.subscribe(topic, depth=1, sink=lambda message: None)
    print(f"{'message':<20} {'bytes':>6} {'orjson only µs':>15} {'checked µs':>11} {'ratio':>6}")
    for name, message in (("log record", record), ("metrics pair", pair)):
        topic = "logs" if name == "log record" else "metrics"
        payload = orjson.dumps({"node": "node-x", "m": message})
        floor = _timed(orjson.loads, payload, args.messages)
        checked = _timed(lambda p, t=topic: broker._receive(broker.channel(t), p), payload, args.messages)
        print(f"{name:<20} {len(payload):>6} {floor * 1e6:>15.2f} {checked * 1e6:>11.2f} {checked / floor:>6.1f}")
    assert broker.malformed_dropped == 0, "the real messages must pass their checks"
    await broker.redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
