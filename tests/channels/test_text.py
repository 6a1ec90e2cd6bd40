"""The text channel: chunks concatenate to the exact text for every unit, including across file blocks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplex.channels.text import TextChannel
from streamplex.server.channel import ChannelError
from streamplex.server.protocol import ErrorCode
from tests.channels.helpers import make, run, write

UNITS = ["chars", "words", "sentences", "bytes"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab é😀.!? \n\t"')), st.sampled_from(UNITS), st.integers(1, 7))
def test_inline_chunks_concatenate_exactly(text: str, unit: str, size: int) -> None:
    if not text:
        return
    chunks = asyncio.run(run(make(TextChannel), {"text": text, "unit": unit, "chunk_size": size}))
    assert "".join(chunks) == text
    if unit == "bytes":
        assert all(len(c.encode()) <= size or len(c) == 1 for c in chunks)


@pytest.mark.parametrize("unit", UNITS)
async def test_document_larger_than_a_block(tmp_path: Path, unit: str) -> None:
    text = "Ünïcode words here. And more! " * 5000  # > 64 KiB: crosses read blocks
    write(tmp_path, "doc.txt", text)
    chunks = await run(make(TextChannel, documents_dir=tmp_path), {"document": "doc.txt", "unit": unit, "chunk_size": 3})
    assert "".join(chunks) == text
    if unit == "sentences":
        assert chunks[0] == "Ünïcode words here. And more! Ünïcode words here. "
    if unit == "words":
        assert chunks[0] == "Ünïcode words here. "


async def test_refuses_paths_outside_and_bad_encodings(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    write(tmp_path, "secret.txt", "no")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    channel = make(TextChannel, documents_dir=docs)
    for name in ("../secret.txt", "/etc/passwd", "."):
        with pytest.raises(ChannelError) as info:
            channel.parse({"document": name})
        assert info.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(ChannelError) as info:
        await run(channel, {"document": "latin1.txt"})
    assert info.value.code == ErrorCode.BAD_SOURCE
    with pytest.raises(ChannelError) as info:
        channel.parse({"text": "a", "document": "latin1.txt"})
    assert info.value.code == ErrorCode.INVALID_PARAMS


async def test_pacing_spaces_chunks() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks = await run(make(TextChannel), {"text": "abcdef", "chunk_size": 1, "interval_ms": 40})
    assert len(chunks) == 6 and loop.time() - start >= 0.2
