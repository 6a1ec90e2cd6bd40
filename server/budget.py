"""One connection's memory budget: its streams' params, pushed input, outgoing frames and replay buffers, counted together.

The outbox keeps its own bound (`outbox_bytes`); params and pushed input are refused past
`limit - outbox_bytes`, so the outbox always has its room; replay buffers get what is left and are
trimmed, oldest frames first, whenever the rest grows. Whatever holds a per-connection buffer
(the session, a replay store) charges and releases it here, so the one figure stays exact.
"""

from __future__ import annotations

from streamplex.server.outbox import Outbox


class Budget:
    """Bytes one connection holds, by kind, against one limit (`connection_memory`)."""

    __slots__ = ("inbox", "limit", "outbox", "params", "replay", "reserve")

    def __init__(self, limit: int, outbox: Outbox) -> None:
        self.limit = limit
        self.outbox = outbox
        self.reserve = outbox.max_bytes  # kept for the outbox: params and pushed input never take it
        self.params = 0  # the subscribe messages of open streams (their size on the wire)
        self.inbox = 0  # pushed input not yet taken by its stream
        self.replay = 0  # frames kept for a resume

    def used(self) -> int:
        """Bytes held now."""
        return self.params + self.inbox + self.replay + self.outbox.size

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes of params or pushed input fit beside the others and the outbox's reserve."""
        return self.params + self.inbox + size <= self.limit - self.reserve

    def replay_room(self) -> int:
        """Bytes replay buffers may still take (negative: they must give that much back)."""
        return self.limit - self.params - self.inbox - self.outbox.size - self.replay
