"""A node with every model channel off never loads torch or a model library, and starts small (issue 15, part 4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.serverproc import collect, connect, recv, send, start_server

MODEL_LIBRARIES = ("libtorch", "torchaudio", "transformers", "sentence_transformers", "safetensors")
MiB = 1 << 20


def loaded(pid: int) -> set[str]:
    """The shared objects and Python extension modules mapped into a process (read from /proc)."""
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if line.count(" ") >= 5 and "/" in line}


def test_no_model_library_is_loaded_with_model_channels_off(tmp_path: Path) -> None:
    server = start_server(tmp_path)  # chat, transcription and embedding models off
    try:

        async def use() -> None:
            ws = await connect(server)
            await send(ws, op="subscribe", id="t", channel="text", params={"text": "one two three", "unit": "words", "chunk_size": 1})
            await collect(ws, "t")
            await send(ws, op="subscribe", id="m", channel="metrics", params={"interval_ms": 100})
            while (await recv(ws)).get("op") != "chunk":
                pass
            await ws.close()

        asyncio.run(use())
        libraries = [path for path in loaded(server.proc.pid) if any(name in path for name in MODEL_LIBRARIES)]
        assert libraries == [], libraries
        assert server.rss <= 150 * MiB, f"{server.rss / MiB:.0f} MiB at start"
    finally:
        server.stop()
