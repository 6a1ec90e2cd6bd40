"""Pacing on the loop's shared wheel (issue 15): one timer per 5 ms slot for all paced streams, never early, no drift."""

from __future__ import annotations

import asyncio
from typing import Any

from streamplex.channels.pacing import SLOT, Pacer, wheel


async def test_paced_streams_share_the_wheels_timers_and_are_never_early() -> None:
    loop = asyncio.get_running_loop()
    late: list[float] = []

    async def paced(offset: float) -> None:
        await asyncio.sleep(offset)
        pace = Pacer(50)
        for _ in range(6):
            await pace.wait()
            late.append(loop.time() - (pace.start + (pace.n - 1) * pace.interval))

    armed = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None) is wheel():
            armed.append(when)
        return call_at(when, callback, *args, **kw)

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(paced(i * 0.001) for i in range(40)))
    finally:
        del loop.call_at
    assert len(late) == 240 and min(late) >= -0.002, "a chunk went before its due time (beyond the clock's resolution)"
    assert max(late) < 0.2, "paced chunks should go close to their due time"
    # 40 streams x 5 waits (the first chunk goes at once), but streams due in the same 5 ms slot share its one timer.
    assert 0 < len(armed) <= 100, len(armed)
    assert wheel().slots == {}, "every slot fired and was forgotten"


async def test_a_cancelled_waiter_does_not_disturb_the_others_in_its_slot() -> None:
    loop = asyncio.get_running_loop()
    shared = wheel()
    due = loop.time() + 0.02
    first, second = shared.wait(due), shared.wait(due)
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert loop.time() >= due - 0.002 and second.done() and first.cancelled()
    assert SLOT <= 0.01
