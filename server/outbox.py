"""A connection's bounded send queue, drained by a writer task that exists only while frames wait.

Lossless frames wait for room; lossy streams get a `Lane` that keeps at most `depth` pending
frames once the outbox is full, dropping the oldest and counting them; control frames (replies,
`end`) always enter, up to a hard bound of twice the byte limit, past which the client is too slow.

While nothing is queued, a new frame skips the queue: the `direct` hook sends it at once (see
`Connection._send_now`), in the producer's stack. A send that could not finish at once (the socket's
buffer is full) comes back as a `Pending`; from then on frames queue, and the `wake` hook starts a
writer that finishes the `Pending` first, drains the queue with `next()` and ends when it is empty.
Without hooks (a detached session, or a consumer of its own) frames queue and `get()` waits for them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

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

    __slots__ = ("depth", "dropped", "on_drop", "pending", "render", "scheduled")

    def __init__(self, depth: int, render: Callable[[Any], Payload], on_drop: Callable[[int], None] = lambda n: None) -> None:
        self.depth = depth
        self.render = render
        self.on_drop = on_drop
        self.pending: deque[tuple[float, Any]] | None = None  # (monotonic time queued, item), made when the outbox is full
        self.dropped = 0  # not yet reported to the client (its next chunk says so and resets it)
        self.scheduled = False  # in the outbox's queue


Entry = tuple[Payload, int, float] | Lane | Pending  # a queued frame: (payload, size, monotonic time queued)


class DelaySink(Protocol):
    def observe(self, seconds: float) -> None: ...


class Outbox:
    """Bounded FIFO of outgoing frames with per-stream lossy lanes."""

    __slots__ = ("_bytes", "_empty", "_nonempty", "_queue", "_room", "delays", "direct", "draining", "max_bytes", "wake")

    def __init__(self, max_bytes: int, delays: DelaySink | None = None) -> None:
        self.max_bytes = max_bytes
        self.delays = delays  # told how long each queued frame waited (frames sent at once are not reported)
        self._queue: deque[Entry] | None = None  # made when a frame first has to wait
        self._bytes = 0
        self.direct: Direct | None = None
        self.wake: Callable[[], None] | None = None
        self.draining = False  # `wake` was called and the writer has not yet found the queue empty
        self._nonempty = Flag()
        self._room = Flag(True)
        self._empty = Flag(True)

    @property
    def size(self) -> int:
        """Bytes of frames waiting (lossy lanes' pending frames not counted; they are bounded by depth)."""
        return self._bytes

    def attach(self, direct: Direct, wake: Callable[[], None]) -> None:
        """Send through `direct` while nothing waits; call `wake` when frames start waiting (now, if some do)."""
        self.direct, self.wake = direct, wake
        if self._queue and not self.draining:
            self.draining = True
            wake()

    def detach(self) -> None:
        """Stop sending: frames queue until the next `attach` (the connection is gone; its writer is stopped)."""
        self.direct = self.wake = None
        self.draining = False

    def _push(self, payload: Payload) -> None:
        if not self.draining and (direct := self.direct) is not None:
            rest = direct(payload)
            if rest is not None:
                self._enqueue(Pending(rest, len(payload)))
            return
        self._hold(payload)

    def _hold(self, payload: Payload) -> None:
        """Queue a frame for the writer, counting its bytes against the bound."""
        size = len(payload)
        self._bytes += size
        if self._bytes >= self.max_bytes:
            self._room.clear()
        self._enqueue((payload, size, time.monotonic()))

    def _enqueue(self, entry: Entry) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(entry)
        self._nonempty.set()
        self._empty.clear()
        if not self.draining and self.wake is not None:
            self.draining = True
            self.wake()

    async def put(self, payload: Payload) -> None:
        """Queue a lossless frame, waiting while the outbox is full."""
        while self._bytes >= self.max_bytes:
            await self._room.wait()
        self._push(payload)

    def put_control(self, payload: Payload) -> None:
        """Queue a control frame now; raise OutboxOverflow past twice the byte bound."""
        if self._bytes >= 2 * self.max_bytes:
            raise OutboxOverflow
        self._push(payload)

    def offer(self, lane: Lane, item: Any) -> None:
        """Queue a lossy item: straight in while there is room, else in its lane (dropping the oldest)."""
        pending = lane.pending
        if not pending and self._bytes < self.max_bytes:
            self._push(lane.render(item))
            return
        if pending is None:
            pending = lane.pending = deque()
        elif len(pending) >= lane.depth:
            pending.popleft()
            lane.dropped += 1
            lane.on_drop(1)
        pending.append((time.monotonic(), item))
        if not lane.scheduled:
            lane.scheduled = True
            self._enqueue(lane)

    def clear(self) -> None:
        """Forget every queued frame and lossy lane (a resumed session replays what its client missed)."""
        for entry in self._queue or ():
            if isinstance(entry, Lane):
                entry.pending = None
                entry.scheduled = False
        self._queue = None
        self._bytes = 0
        self._room.set()
        self._nonempty.clear()
        self._empty.set()

    def extend(self, payloads: list[Payload]) -> None:
        """Queue frames already held elsewhere (a resume's replay), past the bound if need be: producers then wait."""
        for payload in payloads:
            self._hold(payload)

    def discard(self, lane: Lane) -> None:
        """Forget a lane's pending frames (its stream ended)."""
        lane.pending = None

    def next(self) -> Payload | Pending | None:
        """The next frame to send (or a started send to finish); None, and no longer draining, once the queue is empty."""
        queue = self._queue
        while queue:
            entry = queue.popleft()
            if isinstance(entry, Pending):
                return entry
            if isinstance(entry, Lane):
                pending = entry.pending
                if not pending:
                    entry.scheduled = False
                    continue
                queued, item = pending.popleft()
                if pending:
                    queue.append(entry)
                else:
                    entry.pending = None
                    entry.scheduled = False
                if self.delays is not None:
                    self.delays.observe(time.monotonic() - queued)
                return entry.render(item)
            payload, size, queued = entry
            if self.delays is not None:
                self.delays.observe(time.monotonic() - queued)
            self._bytes -= size
            if self._bytes < self.max_bytes:
                self._room.set()
            return payload
        self._queue = None
        self.draining = False
        self._nonempty.clear()
        self._empty.set()
        return None

    async def get(self) -> Payload | Pending:
        """The next frame, waiting for one (for a consumer that drains the outbox itself instead of attaching hooks)."""
        while (item := self.next()) is None:
            await self._nonempty.wait()
        return item

    async def drained(self) -> None:
        """Wait until every queued frame has been sent (the writer found the queue empty)."""
        await self._empty.wait()
