"""The connection's direct send path without sockets: eager start of a coroutine, and the rest driven later."""

from __future__ import annotations

import asyncio

import pytest

from streamplex.server.connection import start_eagerly


async def test_a_coroutine_that_never_suspends_finishes_in_the_callers_stack() -> None:
    done: list[int] = []

    async def send() -> None:
        done.append(1)

    assert start_eagerly(send()) is None
    assert done == [1]


async def test_a_coroutine_that_suspends_is_driven_to_the_end_by_the_returned_awaitable() -> None:
    gate = asyncio.Event()
    steps: list[str] = []

    async def send() -> None:
        steps.append("start")
        await gate.wait()
        steps.append("wrote")
        await asyncio.sleep(0)
        steps.append("end")

    rest = start_eagerly(send())
    assert rest is not None and steps == ["start"]
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert steps == ["start"]
    gate.set()
    await asyncio.wait_for(task, 1)
    assert steps == ["start", "wrote", "end"]


async def test_errors_before_and_after_the_first_suspension_reach_the_caller() -> None:
    async def fails_at_once() -> None:
        raise ConnectionError("gone")

    with pytest.raises(ConnectionError):
        start_eagerly(fails_at_once())

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("gone later")

    rest = start_eagerly(fails_later())
    assert rest is not None
    with pytest.raises(ConnectionError):
        await rest


async def test_cancelling_the_rest_closes_the_coroutine() -> None:
    closed: list[bool] = []

    async def send() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            closed.append(True)

    rest = start_eagerly(send())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]
