"""Resolving client-named files inside a configured folder, and reading them off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from channels.base import ChannelError
from server.protocol import ErrorCode

BLOCK_CHARS = 65536


def resolve_inside(folder: Path, name: str, param: str) -> Path:
    """The file `name` inside `folder`; ChannelError if it escapes the folder or does not exist."""
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ChannelError(ErrorCode.FORBIDDEN, f"{param} {name!r} is outside the server's folder for it")
    if not path.is_file():
        raise ChannelError(ErrorCode.INVALID_PARAMS, f"{param} {name!r} not found", [{"field": param, "message": "no such file", "type": "not_found"}])
    return path


async def read_text_blocks(path: Path, block_chars: int = BLOCK_CHARS) -> AsyncIterator[str]:
    """Yield a UTF-8 text file in blocks, reading in a worker thread; ChannelError if it is not UTF-8."""
    handle: IO[str] = await asyncio.to_thread(open, path, encoding="utf-8", newline="")
    try:
        while True:
            try:
                block = await asyncio.to_thread(handle.read, block_chars)
            except UnicodeDecodeError as exc:
                raise ChannelError(ErrorCode.BAD_SOURCE, f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start} of a block)") from None
            except OSError as exc:
                raise ChannelError(ErrorCode.BAD_SOURCE, f"could not read {path.name}: {exc.strerror}") from None
            if not block:
                return
            yield block
    finally:
        await asyncio.to_thread(handle.close)
