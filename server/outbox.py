"""A connection's bounded send queue, drained by its one writer task.

Lossless frames wait for room; lossy streams get a `Lane` that keeps at most `depth` pending
frames once the outbox is full, dropping the oldest and counting them; control frames (replies,
`end`) always enter, up to a hard bound of twice the byte limit, past which the client is too slow.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

Payload = str | bytes


class OutboxOverflow(Exception):
    """Control frames piled past the hard bound: the client does not read."""


class Lane:
    """One lossy stream's place in the outbox."""

    def __init__(self, depth: int, render: Callable[[Any], Payload], on_drop: Callable[[int], None] = lambda n: None) -> None:
        self.depth = depth
        self.render = render
        self.on_drop = on_drop
        self.pending: deque[Any] = deque()
        self.dropped = 0
        self.scheduled = False

    def take_dropped(self) -> int:
        """Drops not yet reported to the client; resets the count."""
        n, self.dropped = self.dropped, 0
        return n


class Outbox:
    """Bounded FIFO of outgoing frames with per-stream lossy lanes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._queue: deque[tuple[Payload, int] | Lane] = deque()
        self._bytes = 0
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def size(self) -> int:
        """Bytes of frames waiting (lossy lanes' pending frames not counted; they are bounded by depth)."""
        return self._bytes

    def _append(self, entry: tuple[Payload, int] | Lane) -> None:
        self._queue.append(entry)
        if isinstance(entry, tuple):
            self._bytes += entry[1]
            if self._bytes >= self.max_bytes:
                self._room.clear()
        self._nonempty.set()
        self._empty.clear()

    async def put(self, payload: Payload) -> None:
        """Queue a lossless frame, waiting while the outbox is full."""
        while self._bytes >= self.max_bytes:
            await self._room.wait()
        self._append((payload, len(payload)))

    def put_control(self, payload: Payload) -> None:
        """Queue a control frame now; raise OutboxOverflow past twice the byte bound."""
        if self._bytes >= 2 * self.max_bytes:
            raise OutboxOverflow
        self._append((payload, len(payload)))

    def offer(self, lane: Lane, item: Any) -> None:
        """Queue a lossy item: straight in while there is room, else in its lane (dropping the oldest)."""
        if not lane.pending and self._bytes < self.max_bytes:
            payload = lane.render(item)
            self._append((payload, len(payload)))
            return
        if len(lane.pending) >= lane.depth:
            lane.pending.popleft()
            lane.dropped += 1
            lane.on_drop(1)
        lane.pending.append(item)
        if not lane.scheduled:
            lane.scheduled = True
            self._append(lane)

    def discard(self, lane: Lane) -> None:
        """Forget a lane's pending frames (its stream ended)."""
        lane.pending.clear()

    async def get(self) -> Payload:
        """The next frame to send, waiting for one."""
        while True:
            while not self._queue:
                self._nonempty.clear()
                self._empty.set()
                await self._nonempty.wait()
            entry = self._queue.popleft()
            if isinstance(entry, Lane):
                if not entry.pending:
                    entry.scheduled = False
                    continue
                item = entry.pending.popleft()
                if entry.pending:
                    self._queue.append(entry)
                else:
                    entry.scheduled = False
                return entry.render(item)
            payload, size = entry
            self._bytes -= size
            if self._bytes < self.max_bytes:
                self._room.set()
            return payload

    async def drained(self) -> None:
        """Wait until every queued frame has been sent (the writer is back asking for more)."""
        await self._empty.wait()
