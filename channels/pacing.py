"""Pacing of chunks in real time without drift."""

from __future__ import annotations

import asyncio


class Pacer:
    """Spaces successive `wait()` returns `interval_ms` apart, measured from the first, so delays do not accumulate."""

    def __init__(self, interval_ms: float) -> None:
        self.interval = interval_ms / 1000
        self.n = 0
        self.start = 0.0

    async def wait(self) -> None:
        """Return when the next chunk is due (at once for the first, and always when the interval is 0)."""
        loop = asyncio.get_running_loop()
        if self.n == 0:
            self.start = loop.time()
        elif self.interval:
            await asyncio.sleep(max(0.0, self.start + self.n * self.interval - loop.time()))
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
