"""The outbox's bounds without sockets: lossless waits, lossy drops the oldest and counts, control has a hard cap."""

from __future__ import annotations

import asyncio

import pytest

from server.outbox import Lane, Outbox, OutboxOverflow


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
    lane = Lane(depth=2, render=lambda item: f"{item}:{lane.take_dropped()}", on_drop=dropped.append)
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
