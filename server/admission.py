"""Admission control: the event loop's lag and the process's memory watched, new subscriptions paced and refused past a threshold.

Streams already admitted are never touched here: under overload the server stops taking on more work
(`overloaded`, with `retry_after`) instead of making every stream late.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import psutil

from streamplex.server.config import Settings
from streamplex.server.protocol import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

TICK = 0.05  # seconds between lag probes
WINDOW = 1.0  # the lag that counts is the mean of the probes over this span (one pause, e.g. a GC pass, does not refuse a second of subscribes)
TRIM_GROWTH = 32 << 20  # RSS grown by this much since the last trim ...
TRIM_EVERY = 5.0  # ... and this long after it: give freed heap memory back to the OS
COST_BYTES = 16384  # a subscribe costs one admission per started 16 KiB of its message (its parsing costs about that much more)


def memory_limit() -> int:
    """The memory this process may use: its cgroup's limit (v2 or v1), else the machine's RAM."""
    ram = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(int(text), ram)
    return ram


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class LoopMonitor:
    """Measures how late the event loop runs a timer (its lag) and reads the process's RSS, from one task."""

    def __init__(self, observe: Callable[[float], None] = lambda lag: None, memory_every: float = 0.25) -> None:
        self.observe = observe
        self.memory_every = memory_every
        self.recent: deque[tuple[float, float]] = deque()  # (when, lag) over the last WINDOW seconds
        self.rss = 0
        self.ticked = time.monotonic()  # when the last probe ran (read by the health thread: the loop is alive)
        self._process = psutil.Process()
        self._trim = _malloc_trim()
        self._trimmed_at = (0, 0.0)  # RSS and time after the last trim

    @property
    def lag(self) -> float:
        """The mean lag of the last second's probes, in seconds."""
        recent = self.recent
        return sum(lag for _, lag in recent) / len(recent) if recent else 0.0

    async def run(self) -> None:
        """Probe until cancelled."""
        loop = asyncio.get_running_loop()
        next_memory = 0.0
        while True:
            start = loop.time()
            await asyncio.sleep(TICK)
            now = loop.time()
            self.ticked = time.monotonic()
            lag = max(0.0, now - start - TICK)
            self.observe(lag)
            self.recent.append((now, lag))
            while self.recent[0][0] < now - WINDOW:
                self.recent.popleft()
            if now >= next_memory:
                self.rss = self._process.memory_info().rss
                next_memory = now + self.memory_every
                self._give_back(now)

    def _give_back(self, now: float) -> None:
        """Return freed heap memory to the OS after RSS grew (a burst of large subscribes leaves the heap fragmented:
        their decoded params are freed, but the pages stay in the process); a few ms, at most every TRIM_EVERY s."""
        rss, when = self._trimmed_at
        if self._trim is None or self.rss < rss + TRIM_GROWTH or now < when + TRIM_EVERY:
            return
        self._trim(0)
        self.rss = self._process.memory_info().rss
        self._trimmed_at = (self.rss, now)


class Admission:
    """The gate every new subscription passes: paced server-wide, refused while the loop lags or memory runs high.

    Subscriptions take tokens from a bucket of `subscribe_burst`, refilled at `subscribe_rate` scaled down
    as the loop's lag nears `overload_lag` (to 5% of it at the threshold), so a burst is admitted as fast
    as the loop keeps up; those beyond wait in one FIFO queue. A text message over `OFFLOAD_BYTES` takes
    its turn before it is even decoded (whatever its op), so that a burst of large subscribes never holds
    its decoded params at once.
    """

    def __init__(self, settings: Settings, monitor: LoopMonitor) -> None:
        self.settings = settings
        self.monitor = monitor
        self.memory_threshold = settings.overload_memory or int(0.8 * memory_limit())
        self.tokens = float(settings.subscribe_burst)
        self.refilled = 0.0
        self.queue: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.queued = 0  # tokens the queue needs
        self.admitter: asyncio.Task[None] | None = None
        self.refused = 0

    def close(self) -> None:
        """Stop handing out turns (the server stops)."""
        if self.admitter is not None:
            self.admitter.cancel()

    def rate(self) -> float:
        """Subscriptions per second admitted now: `subscribe_rate`, less as the loop's lag nears `overload_lag`."""
        threshold = self.settings.overload_lag
        slack = 1.0 - self.monitor.lag / threshold if threshold else 1.0
        return self.settings.subscribe_rate * min(1.0, max(0.05, slack))

    def _refill(self, now: float) -> float:
        rate = self.rate()
        self.tokens = min(float(self.settings.subscribe_burst), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        return rate

    def take(self, size: int) -> asyncio.Future[None] | float | None:
        """Ask for the turn of a message of `size` bytes without waiting: None when it is now; the seconds it would wait
        when that is past `subscribe_max_wait` (it is not queued); else a future done when it comes (cancel it to give it up)."""
        loop = asyncio.get_running_loop()
        cost = min(self.settings.subscribe_burst, 1 + max(0, size - 1) // COST_BYTES)  # never more than the bucket holds
        self._refill(loop.time())
        if not self.queue and self.tokens >= cost:
            self.tokens -= cost
            return None
        # At the full rate: the lag that slows it now is mostly the burst itself, and passes. A subscribe refused on
        # the slowed rate's estimate was told to come back a minute later, when the server had long been idle; while
        # the lag lasts, `check` refuses it at its turn with the short `overload_retry_after` instead.
        wait = (self.queued + cost - self.tokens) / self.settings.subscribe_rate
        if wait > self.settings.subscribe_max_wait:
            return wait
        turn = loop.create_future()
        self.queue.append((cost, turn))
        self.queued += cost
        if self.admitter is None or self.admitter.done():
            self.admitter = asyncio.create_task(self._admit(), name="admission")
        return turn

    async def wait_turn(self, size: int) -> float | None:
        """Wait for the turn of a message of `size` bytes; None when it came, else (at once) the seconds it would wait past `subscribe_max_wait`."""
        turn = self.take(size)
        if isinstance(turn, asyncio.Future):
            await turn
            return None
        return turn

    async def _admit(self) -> None:
        """Hand out turns in order as tokens come back, until the queue is empty."""
        loop = asyncio.get_running_loop()
        while self.queue:
            cost, turn = self.queue[0]
            if turn.cancelled():  # its connection went away while it waited
                self.queue.popleft()
                self.queued -= cost
                continue
            rate = self._refill(loop.time())
            if self.tokens >= cost:
                self.tokens -= cost
                self.queue.popleft()
                self.queued -= cost
                turn.set_result(None)
                continue
            await asyncio.sleep(min(0.1, (cost - self.tokens) / rate))  # at most 0.1 s, so a change of lag takes effect

    def refuse_late(self, stream_id: str, late: float) -> NoReturn:
        """Refuse the subscription `stream_id` with ProtocolError(overloaded): its turn would come in `late` seconds, past `subscribe_max_wait`."""
        self._refuse(stream_id, f"{late:.1f} s of subscriptions are queued (subscribe_rate {self.settings.subscribe_rate:g}/s)", late)

    def check(self, stream_id: str) -> None:
        """Refuse the subscription `stream_id` with ProtocolError(overloaded) if the loop lags or memory runs high."""
        lag, rss = self.monitor.lag, self.monitor.rss
        if self.settings.overload_lag and lag > self.settings.overload_lag:
            self._refuse(stream_id, f"the event loop runs {lag * 1000:.0f} ms late on average (overload_lag {self.settings.overload_lag * 1000:.0f} ms)")
        if rss > self.memory_threshold:
            self._refuse(stream_id, f"the server holds {rss >> 20} MiB (overload_memory {self.memory_threshold >> 20} MiB)")

    def _refuse(self, stream_id: str, why: str, at_least: float = 0.0) -> NoReturn:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("refusing new subscriptions: %s (%d refused so far)", why, self.refused)
        retry_after = max(at_least, self.settings.overload_retry_after * random.uniform(0.5, 1.5))
        raise ProtocolError(ErrorCode.OVERLOADED, f"the server is overloaded: {why}; try again later", id=stream_id, retry_after=round(retry_after, 3))
