"""logs: the server's own log records, the last N at or above a level, then live."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field

from streamplex.server.channel import Channel, Gap, ParamsModel, StreamContext

Level = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class LogsParams(ParamsModel):
    lines: int = Field(100, ge=0, le=100_000, description="How many recent records to send first.")
    level: Level = Field("INFO", description="Lowest level to send.")
    follow: bool = Field(True, description="Keep streaming new records after the recent ones.")


class LogsChannel(Channel):
    name = "logs"
    summary = "The server's own log records: the last `lines` at or above `level`, then live if `follow`. Admin keys only."
    Params = LogsParams
    lossy = True
    admin = True  # records name other clients' addresses, session ids and key labels

    async def stream(self, params: LogsParams, ctx: StreamContext) -> AsyncIterator[Any]:
        threshold = logging.getLevelNamesMapping()[params.level]
        source = self.services.logs
        async with self.services.feeds.subscribe(source.topic, depth=1024) as live:
            snapshot = source.recent()
            newest = snapshot[-1]["n"] if snapshot else 0
            recent = [r for r in snapshot if r["levelno"] >= threshold]
            for record in recent[len(recent) - params.lines :] if params.lines else []:
                yield _public(record)
            if not params.follow:
                return
            async for record in live:
                if isinstance(record, Gap):
                    yield record
                elif record["levelno"] >= threshold and (record["n"] > newest or record["node"] != source.node):
                    yield _public(record)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "levelno"}
