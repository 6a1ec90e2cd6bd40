"""Fan-out of shared streams: one producer per topic, started with its first subscriber, stopped with its last."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Producer

log = logging.getLogger(__name__)


class Hub:
    """Implements streamplex.server.channel.Feeds over a broker."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self._producers: dict[str, asyncio.Task[None]] = {}
        self._refs: dict[str, int] = {}
        self._provided: dict[str, Producer] = {}

    @contextlib.asynccontextmanager
    async def subscribe(
        self, topic: str, producer: Producer | None = None, depth: int = 64, sink: Callable[[Any], None] | None = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Subscribe to `topic`, starting `producer` if this is its first subscriber; with `sink`, messages go to it at once."""
        sub = self.broker.subscribe(topic, depth, sink)
        self._refs[topic] = self._refs.get(topic, 0) + 1
        if producer is not None and topic not in self._producers:
            self._producers[topic] = asyncio.create_task(self._run(topic, producer), name=f"producer:{topic}")
        try:
            yield sub.__aiter__()
        finally:
            self.broker.unsubscribe(topic, sub)
            self._refs[topic] -= 1
            if not self._refs[topic]:
                del self._refs[topic]
                task = self._producers.pop(topic, None)
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _run(self, topic: str, producer: Producer) -> None:
        try:
            await producer(lambda message: self.broker.publish(topic, message))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("producer for %s failed", topic)

    def provide(self, topic: str, producer: Producer) -> None:
        """Register `topic`'s producer for starts without a local subscriber (streamplex.server.cluster.ClusterHub)."""
        self._provided[topic] = producer

    def accept(self, topic: str, check: Callable[[Any], Any]) -> None:
        """How `topic`'s messages from other nodes are checked; one node alone has none (streamplex.server.cluster.ClusterHub)."""

    def producers(self) -> list[str]:
        """Topics whose producer is running."""
        return sorted(self._producers)

    async def close(self) -> None:
        """Stop every producer."""
        tasks = list(self._producers.values())
        self._producers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
