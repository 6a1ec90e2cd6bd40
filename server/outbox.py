"""A connection's bounded send queue, drained by its one writer task.

Lossless frames wait for room; lossy streams get a `Lane` that keeps at most `depth` pending
frames once the outbox is full, dropping the oldest and counting them; control frames (replies,
`end`) always enter, up to a hard bound of twice the byte limit, past which the client is too slow.

While the writer is idle and nothing waits, a new frame skips the queue: the `direct` hook starts
sending it at once (see `Connection._send_now`), which saves waking the writer task for every frame.
A send that could not finish at once (the socket's buffer is full) comes back as a `Pending` that the
writer finishes before anything else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

Payload = str | bytes


class Pending:
    """A frame whose send has started but not finished: the writer awaits `rest`."""

    __slots__ = ("rest", "size")

    def __init__(self, rest: Awaitable[None], size: int) -> None:
        self.rest = rest
        self.size = size


Direct = Callable[[Payload], Awaitable[None] | None]


class Flag:
    """asyncio.Event without its per-instance deque: a future exists only while someone waits (thousands of idle outboxes)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is)."""
        if self._set:
            return
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if self._waiters is not None and fut in self._waiters:
                self._waiters.remove(fut)


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
        self._queue: deque[tuple[Payload, int] | Lane | Pending] = deque()
        self._bytes = 0
        self._idle = False
        self.direct: Direct | None = None
        self._nonempty = Flag()
        self._room = Flag(True)
        self._empty = Flag(True)

    @property
    def size(self) -> int:
        """Bytes of frames waiting (lossy lanes' pending frames not counted; they are bounded by depth)."""
        return self._bytes

    def _append(self, entry: tuple[Payload, int] | Lane) -> None:
        if self._idle and self.direct is not None and isinstance(entry, tuple):
            rest = self.direct(entry[0])
            if rest is None:
                return
            self._queue.append(Pending(rest, entry[1]))
            self._idle = False
            self._nonempty.set()
            self._empty.clear()
            return
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

    def clear(self) -> None:
        """Forget every queued frame and lossy lane (a resumed session replays what its client missed)."""
        for entry in self._queue:
            if isinstance(entry, Lane):
                entry.pending.clear()
                entry.scheduled = False
        self._queue.clear()
        self._bytes = 0
        self._room.set()
        self._nonempty.clear()
        self._empty.set()

    def extend(self, payloads: list[Payload]) -> None:
        """Queue frames already held elsewhere (a resume's replay), past the bound if need be: producers then wait."""
        for payload in payloads:
            self._append((payload, len(payload)))
        if self._bytes >= self.max_bytes:
            self._room.clear()

    def discard(self, lane: Lane) -> None:
        """Forget a lane's pending frames (its stream ended)."""
        lane.pending.clear()

    async def get(self) -> Payload | Pending:
        """The next frame to send (or a started send to finish), waiting for one."""
        while True:
            while not self._queue:
                self._nonempty.clear()
                self._empty.set()
                self._idle = True
                try:
                    await self._nonempty.wait()
                finally:
                    self._idle = False
            entry = self._queue.popleft()
            if isinstance(entry, Pending):
                return entry
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
