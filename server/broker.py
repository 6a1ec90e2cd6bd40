"""Topic pub/sub between producers and subscribers. In memory by default (one node)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from streamplex.server.channel import Gap

log = logging.getLogger(__name__)


class Subscription:
    """A bounded queue of one subscriber's messages; when full, the oldest is dropped and counted.

    With a `sink`, messages are not queued: the sink is called with each one at once, in the
    publisher's stack (no task switch per message); it must not block, and what it raises is logged.
    """

    __slots__ = ("_depth", "_dropped", "_items", "_ready", "_sink")

    def __init__(self, depth: int, sink: Callable[[Any], None] | None = None) -> None:
        self._items: deque[Any] = deque()
        self._depth = depth
        self._dropped = 0
        self._ready = asyncio.Event()
        self._sink = sink

    def deliver(self, message: Any) -> None:
        """Add a message (called by the broker on the event-loop thread)."""
        if self._sink is not None:
            try:
                self._sink(message)
            except Exception:
                log.exception("a subscriber's sink failed")
            return
        if len(self._items) >= self._depth:
            self._items.popleft()
            self._dropped += 1
        self._items.append(message)
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            await self._ready.wait()
            if self._dropped:
                yield Gap(self._dropped)
                self._dropped = 0
            while self._items:
                yield self._items.popleft()
            self._ready.clear()


class MemoryBroker:
    """Pub/sub within this process."""

    def __init__(self) -> None:
        self._topics: defaultdict[str, set[Subscription]] = defaultdict(set)

    def publish(self, topic: str, message: Any) -> None:
        """Deliver `message` to every subscriber of `topic` (event-loop thread only)."""
        for sub in self._topics.get(topic, ()):
            sub.deliver(message)

    def subscribe(self, topic: str, depth: int, sink: Callable[[Any], None] | None = None) -> Subscription:
        """A new subscription to `topic` (queued, or handed to `sink` at once)."""
        sub = Subscription(depth, sink)
        self._topics[topic].add(sub)
        return sub

    def unsubscribe(self, topic: str, sub: Subscription) -> None:
        """Stop delivering `topic` to `sub`."""
        subs = self._topics.get(topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._topics[topic]
