"""Resolving client-named files inside a configured folder, and reading them off the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from streamplex.server.channel import ChannelError
from streamplex.server.protocol import ErrorCode

BLOCK_CHARS = 16384  # per stream reading a document: small, yet one read in a worker thread per 16 Ki characters


def resolve_inside(folder: Path, name: str, param: str) -> Path:
    """The file `name` inside `folder`; ChannelError if it escapes the folder or does not exist."""
    root = folder.resolve()
    try:
        path = (root / name).resolve()
        is_file = path.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, or holding a NUL
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ChannelError(
            ErrorCode.INVALID_PARAMS,
            f"{param} is not a usable file name ({reason})",
            [{"field": param, "message": "not a usable file name", "type": "value_error"}],
        ) from None
    if not path.is_relative_to(root) or path == root:
        raise ChannelError(ErrorCode.FORBIDDEN, f"{param} {name!r} is outside the server's folder for it")
    if not is_file:
        raise ChannelError(ErrorCode.INVALID_PARAMS, f"{param} {name!r} not found", [{"field": param, "message": "no such file", "type": "not_found"}])
    return path


async def read_text_blocks(path: Path, block_chars: int = BLOCK_CHARS) -> AsyncIterator[str]:
    """Yield a UTF-8 text file in blocks, reading in a worker thread; ChannelError if it is not UTF-8."""
    handle: IO[str] = await asyncio.to_thread(open, path, encoding="utf-8", newline="")
    try:
        size = os.fstat(handle.fileno()).st_size
        while True:
            try:
                block = await asyncio.to_thread(handle.read, block_chars)
            except UnicodeDecodeError as exc:
                raise ChannelError(ErrorCode.BAD_SOURCE, f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start} of a block)") from None
            except OSError as exc:
                raise ChannelError(ErrorCode.BAD_SOURCE, f"could not read {path.name}: {exc.strerror}") from None
            if not block:
                check_whole(handle, size, path.name)
                return
            yield block
    finally:
        await asyncio.to_thread(handle.close)


def check_whole(handle: IO[str], size_at_open: int, name: str) -> None:
    """At the end of a file: ChannelError(bad_source) if it shrank while it was read (truncated or rewritten in place).

    A file that grew is read to its end as it was then; a file deleted while open is read whole (POSIX keeps its data).
    """
    position = handle.buffer.tell()  # type: ignore[attr-defined]
    now = os.fstat(handle.fileno()).st_size
    if position < size_at_open or now < position:
        raise ChannelError(ErrorCode.BAD_SOURCE, f"{name} was truncated while it was being read ({size_at_open} bytes when opened, {now} now)")
