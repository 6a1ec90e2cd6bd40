"""The `reverse` channel: a text streamed backwards, a few characters per chunk, and lines pushed to it reversed too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from streamplex.server.channel import Channel, ChannelError, ParamsModel, StreamContext
from streamplex.server.protocol import ErrorCode


class ReverseParams(ParamsModel):
    text: str = Field("", max_length=10_000, description="The text to stream backwards.")
    chunk_size: int = Field(4, ge=1, le=1000, description="Characters per chunk.")
    push: bool = Field(False, description="After `text`, reverse each pushed string until the input ends.")


class ReverseChannel(Channel):
    name = "reverse"
    summary = "A text backwards, chunk_size characters per chunk; with push, each pushed string reversed."
    Params = ReverseParams
    accepts_push = True

    def check(self, params: ReverseParams) -> None:
        if not params.text and not params.push:
            raise ChannelError(ErrorCode.INVALID_PARAMS, "nothing to reverse: give `text` or `push: true`")

    async def stream(self, params: ReverseParams, ctx: StreamContext) -> AsyncIterator[Any]:
        backwards = params.text[::-1]
        for start in range(0, len(backwards), params.chunk_size):
            yield backwards[start : start + params.chunk_size]
        if params.push:
            async for item in ctx.pushed():
                if not isinstance(item, str):
                    raise ChannelError(ErrorCode.INVALID_PARAMS, "reverse takes strings")
                yield item[::-1]
