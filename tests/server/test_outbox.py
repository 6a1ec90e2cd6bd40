"""The outbox's bounds without sockets: lossless waits, lossy drops the oldest and counts, control has a hard cap."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from streamplex.server.outbox import Flag, Lane, Outbox, OutboxOverflow, Pending


async def test_lossless_put_waits_for_room() -> None:
    box = Outbox(max_bytes=10)
    await box.put("x" * 10)
    waiter = asyncio.create_task(box.put("y"))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    assert await box.get() == "x" * 10
    await asyncio.wait_for(waiter, 1)
    assert await box.get() == "y"


async def test_lossy_lane_drops_oldest_and_reports_count() -> None:
    box = Outbox(max_bytes=4)
    dropped: list[int] = []

    def render(item: int) -> str:
        n, lane.dropped = lane.dropped, 0
        return f"{item}:{n}"

    lane = Lane(depth=2, render=render, on_drop=dropped.append)
    await box.put("full")
    for i in range(5):
        box.offer(lane, i)
    assert sum(dropped) == 3
    assert await box.get() == "full"
    assert await box.get() == "3:3"
    assert await box.get() == "4:0"
    box.offer(lane, 5)
    assert await box.get() == "5:0"


async def test_control_frames_have_a_hard_cap() -> None:
    box = Outbox(max_bytes=4)
    box.put_control("1234")
    box.put_control("5678")
    with pytest.raises(OutboxOverflow):
        box.put_control("9")


async def test_drained_waits_for_the_writer() -> None:
    box = Outbox(max_bytes=100)
    box.put_control("a")
    drained = asyncio.create_task(box.drained())
    await asyncio.sleep(0.01)
    assert not drained.done()
    await box.get()
    getter = asyncio.create_task(box.get())
    await asyncio.wait_for(drained, 1)
    getter.cancel()


async def test_direct_path_sends_at_once_while_nothing_waits() -> None:
    box = Outbox(max_bytes=100)
    sent: list[str] = []
    wakes: list[bool] = []
    box.attach(lambda payload: sent.append(payload), lambda: wakes.append(True))  # type: ignore[func-returns-value]
    await box.put("a")
    box.put_control("b")
    assert sent == ["a", "b"] and not wakes and box.size == 0
    await asyncio.wait_for(box.drained(), 1)


async def test_a_send_that_suspends_wakes_one_writer_and_later_frames_queue_behind_it() -> None:
    box = Outbox(max_bytes=100)
    gate = asyncio.get_running_loop().create_future()
    sent: list[str] = []
    wakes: list[bool] = []

    async def rest() -> None:
        await gate
        sent.append("a")

    def direct(payload: str) -> Coroutine[Any, Any, None] | None:
        if payload == "a":
            return rest()  # the socket did not take it: the writer finishes it
        sent.append(payload)
        return None

    box.attach(direct, lambda: wakes.append(True))
    await box.put("a")
    await box.put("b")  # must queue behind it, not overtake it
    box.put_control("c")
    assert wakes == [True] and sent == [] and box.draining
    drained = asyncio.create_task(box.drained())
    pending = box.next()
    assert isinstance(pending, Pending) and pending.size == 1
    gate.set_result(None)
    await pending.rest
    sent += [box.next(), box.next()]  # type: ignore[list-item]
    assert sent == ["a", "b", "c"] and not drained.done()
    assert box.next() is None and not box.draining  # the writer ends here
    await asyncio.wait_for(drained, 1)
    await box.put("d")  # the direct path again
    assert sent[-1] == "d" and wakes == [True]


async def test_a_detached_outbox_queues_and_attaching_wakes_the_writer() -> None:
    box = Outbox(max_bytes=100)
    sent: list[str] = []
    wakes: list[bool] = []
    box.attach(lambda payload: sent.append(payload), lambda: wakes.append(True))  # type: ignore[func-returns-value]
    box.detach()
    await box.put("a")
    assert sent == [] and box.size == 1 and not wakes
    box.attach(lambda payload: sent.append(payload), lambda: wakes.append(True))  # type: ignore[func-returns-value]
    assert wakes == [True] and box.next() == "a" and box.next() is None


async def test_flag_wakes_every_waiter_and_forgets_cancelled_ones() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1)
    assert flag.is_set()
    flag.clear()
    assert not flag.is_set()
