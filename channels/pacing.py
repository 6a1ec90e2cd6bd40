"""Pacing of chunks in real time without drift."""

from __future__ import annotations

import asyncio
import math
import weakref

SLOT = 0.005  # the wheel's granularity: a paced chunk goes at most this much after its due time


class Wheel:
    """One timer per 5 ms slot for every paced stream of a loop, instead of one timer per chunk per stream.

    Thousands of streams paced at 200 ms each armed a timer (and freed it) for every chunk; waiters due
    in the same slot now share one, and are woken together when it fires (never before their due time).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, list[asyncio.Future[None]]] = {}

    def wait(self, when: float) -> asyncio.Future[None]:
        """A future done at the end of the slot holding `when` (loop time); cancel it to stop waiting."""
        slot = math.ceil(when / SLOT)
        future = self.loop.create_future()
        waiters = self.slots.get(slot)
        if waiters is None:
            waiters = self.slots[slot] = []
            self.loop.call_at(slot * SLOT, self._fire, slot)
        waiters.append(future)
        return future

    def _fire(self, slot: int) -> None:
        for future in self.slots.pop(slot):
            if not future.done():  # (a cancelled waiter: its stream ended)
                future.set_result(None)


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wheel] = weakref.WeakKeyDictionary()


def wheel() -> Wheel:
    """The running loop's wheel."""
    loop = asyncio.get_running_loop()
    found = _wheels.get(loop)
    if found is None:
        found = _wheels[loop] = Wheel(loop)
    return found


class Pacer:
    """Spaces successive `wait()` returns `interval_ms` apart, measured from the first, so delays do not accumulate."""

    def __init__(self, interval_ms: float) -> None:
        self.interval = interval_ms / 1000
        self.n = 0
        self.start = 0.0

    async def wait(self) -> None:
        """Return when the next chunk is due (at once for the first, and always when the interval is 0), on the loop's `Wheel`."""
        loop = asyncio.get_running_loop()
        if self.n == 0:
            self.start = loop.time()
        elif self.interval:
            due = self.start + self.n * self.interval
            if due > loop.time():
                await wheel().wait(due)
        self.n += 1


class Clock:
    """Waits for media time: `at(t)` returns `t` seconds after the first call, on the loop's monotonic clock.

    Every deadline is measured from the one start, so per-chunk delays never add up to drift; after a
    stall (a slow client) the next chunks go at once until the stream is back on time.
    """

    def __init__(self) -> None:
        self.start: float | None = None

    async def at(self, offset_s: float) -> None:
        """Return at start + `offset_s` (at once on the first call, which sets the start)."""
        loop = asyncio.get_running_loop()
        if self.start is None:
            self.start = loop.time() - offset_s
        delay = self.start + offset_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
