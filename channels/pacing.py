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
