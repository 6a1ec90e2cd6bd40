"""The hub of a node that shares its feeds with other nodes through a RedisBroker."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from streamplex.server.channel import Producer
from streamplex.server.hub import Hub
from streamplex.server.redis_broker import DEMAND_LEASE, RedisBroker


class ClusterHub(Hub):
    """A Hub that also runs a provided producer while another node wants its topic.

    Only this node's own subscribers count as its demand; a producer kept running for another
    node does not, so two nodes never keep each other's producers alive.
    """

    broker: RedisBroker

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(broker)
        self._wanted: Counter[str] = Counter()
        self._leases: dict[str, float] = {}
        self._holders: dict[str, asyncio.Task[None]] = {}
        broker.wanted = lambda: list(self._wanted)
        broker.on_demand = self._demanded

    @contextlib.asynccontextmanager
    async def subscribe(
        self, topic: str, producer: Producer | None = None, depth: int = 64, sink: Callable[[Any], None] | None = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """As Hub.subscribe; the topic counts as wanted by this node while subscribed."""
        self._wanted[topic] += 1
        try:
            async with super().subscribe(topic, producer, depth, sink) as items:
                yield items
        finally:
            self._wanted[topic] -= 1
            if not self._wanted[topic]:
                del self._wanted[topic]

    def accept(self, topic: str, check: Callable[[Any], Any]) -> None:
        """Deliver `topic`'s messages from other nodes as `check` returns them; what it raises drops them (RedisBroker.accept)."""
        self.broker.accept(topic, check)

    def _demanded(self, topic: str) -> None:
        producer = self._provided.get(topic)
        if producer is None:
            return
        self._leases[topic] = asyncio.get_running_loop().time() + DEMAND_LEASE
        if topic not in self._holders:
            self._holders[topic] = asyncio.create_task(self._hold(topic, producer), name=f"remote-demand:{topic}")

    async def _hold(self, topic: str, producer: Producer) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with super().subscribe(topic, producer, depth=1):
                while (left := self._leases[topic] - loop.time()) > 0:
                    await asyncio.sleep(left)
        finally:
            self._holders.pop(topic, None)
            self._leases.pop(topic, None)

    async def close(self) -> None:
        """Stop the producers held for other nodes, then every producer."""
        holders = list(self._holders.values())
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await super().close()
