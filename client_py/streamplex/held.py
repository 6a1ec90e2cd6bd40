"""A stream's pushed input that the server has not acknowledged yet: kept to be sent again after a resume.

Pure bookkeeping over byte positions (counted from the first byte pushed to the stream), no I/O: the client
appends what the user pushes, sends from `sent`, drops what an `ack` covers, and after a resume sends again
from the position the server names (docs/protocol.md#pushed-input-across-a-resume).
"""

from __future__ import annotations

import asyncio

PIECE = 32 * 1024  # at most this much input per binary frame when held input is sent (again)


class HeldInput:
    """The input bytes after the last `ack`, at most `limit` of them (a push waits for room), and how far they were sent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.base = 0  # position of data[0]: the last acknowledged byte position
        self.sent = 0  # position up to which input went out on the current connection
        self.ended = False  # the user ended the input
        self.end_sent = False
        self.epoch = 0  # bumped by every rewind: a send begun before it does not count
        self.room = asyncio.Event()
        self.room.set()

    @property
    def end(self) -> int:
        """The position after the last byte pushed."""
        return self.base + len(self.data)

    def fits(self, n: int) -> bool:
        """Whether `n` more bytes may be held now (one push larger than the limit is held alone)."""
        return not self.data or len(self.data) + n <= self.limit

    def add(self, payload: bytes) -> None:
        """Hold a pushed payload (call when it `fits`)."""
        self.data += payload

    def ack(self, position: int) -> None:
        """The server no longer needs the input before `position`: drop it (an ack never moves backwards)."""
        drop = min(max(0, position - self.base), len(self.data))
        if drop:
            del self.data[:drop]
            self.base += drop
            self.sent = max(self.sent, self.base)
        self.room.set()

    def rewind(self, position: int) -> bool:
        """After a resume, send again from `position`; False when that input is no longer held (dropped after an ack)."""
        if position < self.base:
            return False
        self.sent = min(position, self.end)
        self.end_sent = False
        self.epoch += 1
        return True

    def piece(self) -> tuple[int, bytes] | None:
        """The next bytes to send (from `sent`, at most PIECE) with the position after them, or None when all were sent."""
        if self.sent >= self.end:
            return None
        start = self.sent - self.base
        chunk = bytes(self.data[start : start + PIECE])
        return self.sent + len(chunk), chunk
