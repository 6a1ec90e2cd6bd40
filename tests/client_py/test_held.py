"""The SDK's bookkeeping of pushed input the server has not acknowledged: what is held, sent, dropped and sent again."""

from __future__ import annotations

import asyncio

from streamplex.held import PIECE, HeldInput


def test_acks_drop_what_they_cover_and_never_move_back() -> None:
    held = HeldInput(limit=100)
    held.add(b"a" * 40)
    held.add(b"b" * 40)
    assert (held.base, held.end) == (0, 80)
    assert held.piece() == (80, b"a" * 40 + b"b" * 40)
    held.sent = 80
    held.ack(30)
    assert (held.base, held.end, bytes(held.data[:10])) == (30, 80, b"a" * 10)
    held.ack(10)  # an older ack changes nothing
    assert held.base == 30
    held.ack(500)  # past what was pushed: everything held goes, nothing more
    assert (held.base, held.end, held.sent) == (80, 80, 80)


def test_a_resume_sends_again_from_the_servers_position_in_pieces() -> None:
    held = HeldInput(limit=1 << 20)
    held.add(bytes(range(256)) * (PIECE // 128))  # two pieces' worth
    held.sent, held.end_sent, held.ended = held.end, True, True
    held.ack(1000)
    epoch = held.epoch
    assert not held.rewind(999), "input before the last ack is gone"
    assert held.rewind(1000) and held.epoch == epoch + 1 and not held.end_sent
    upto, first = held.piece()  # type: ignore[misc]
    assert upto == 1000 + PIECE and first == (bytes(range(256)) * (PIECE // 128))[1000 : 1000 + PIECE]
    held.sent = upto
    upto, second = held.piece()  # type: ignore[misc]
    assert upto == held.end and len(second) == 2 * PIECE - 1000 - PIECE
    held.sent = upto
    assert held.piece() is None


async def test_a_push_past_the_limit_waits_for_an_ack() -> None:
    held = HeldInput(limit=100)
    held.add(b"x" * 90)
    assert not held.fits(20) and held.fits(10)
    big = HeldInput(limit=100)
    assert big.fits(500), "one push larger than the limit is held alone"

    async def push() -> None:
        while not held.fits(20):
            held.room.clear()
            await held.room.wait()
        held.add(b"y" * 20)

    task = asyncio.create_task(push())
    await asyncio.sleep(0.05)
    assert not task.done() and held.end == 90
    held.ack(50)
    await asyncio.wait_for(task, 1)
    assert (held.base, held.end) == (50, 110)
