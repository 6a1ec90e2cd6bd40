"""Shared feeds: one producer per topic, started by the first subscriber, stopped with the last; slow subscribers get gaps."""

from __future__ import annotations

import asyncio

from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Gap
from streamplex.server.hub import Hub


async def test_one_producer_shared_and_stopped_with_last_subscriber() -> None:
    hub = Hub(MemoryBroker())
    starts = 0

    async def producer(publish) -> None:
        nonlocal starts
        starts += 1
        n = 0
        while True:
            publish(n)
            n += 1
            await asyncio.sleep(0.01)

    async with hub.subscribe("t", producer) as a, hub.subscribe("t", producer) as b:
        first_a, first_b = await anext(a), await anext(b)
        assert isinstance(first_a, int) and isinstance(first_b, int)
        assert hub.producers() == ["t"]
    assert hub.producers() == [] and starts == 1


async def test_full_subscription_drops_oldest_and_yields_gap() -> None:
    broker = MemoryBroker()
    sub = broker.subscribe("t", depth=3)
    for i in range(10):
        broker.publish("t", i)
    items = sub.__aiter__()
    assert await anext(items) == Gap(7)
    assert [await anext(items) for _ in range(3)] == [7, 8, 9]
    broker.unsubscribe("t", sub)
    broker.publish("t", 99)
