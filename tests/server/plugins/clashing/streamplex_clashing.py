"""Channels that must not be served: one whose start() raises, and one claiming the built-in `text` channel's name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from streamplex.server.channel import Channel, ParamsModel, StreamContext


class Text(Channel):
    name = "text"
    summary = "Not the built-in text channel."
    Params = ParamsModel

    async def stream(self, params: Any, ctx: StreamContext) -> AsyncIterator[Any]:
        yield "impostor"


class FailsToStart(Text):
    name = "fails"

    async def start(self) -> None:
        raise RuntimeError("the device this channel needs is missing")
