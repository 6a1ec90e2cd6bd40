"""Per-key limits without Redis: the in-memory GCRA and connection counts (the same limits hold when Redis is down)."""

from __future__ import annotations

import pytest

from streamplex.server.keylimits import Gcra, KeyLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gcra_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    gcra = Gcra(rate=10, burst=5, clock=clock)
    assert [gcra.take("k") for _ in range(5)] == [0.0] * 5
    wait = gcra.take("k")
    assert wait == pytest.approx(0.1)
    assert gcra.take("other") == 0.0, "keys are independent"
    clock.now += 0.1
    assert gcra.take("k") == 0.0
    assert gcra.take("k") == pytest.approx(0.1)
    clock.now += 10
    assert [gcra.take("k") for _ in range(5)] == [0.0] * 5, "a full burst is back after a pause"


async def test_connection_cap_and_release_in_memory() -> None:
    limits = KeyLimits("n", max_connections=2, rate=0, burst=1)
    assert await limits.admit("k", "a") and await limits.admit("k", "b")
    assert not await limits.admit("k", "c")
    assert await limits.admit("other", "c"), "per key"
    await limits.release("k", "a")
    await limits.release("k", "a")  # twice is harmless
    assert await limits.admit("k", "c")
    assert not await limits.admit("k", "d")


async def test_limits_off_by_default() -> None:
    limits = KeyLimits("n", max_connections=0, rate=0, burst=1)
    assert all([await limits.admit("k", str(i)) for i in range(100)])
    assert await limits.take("k") == 0.0
