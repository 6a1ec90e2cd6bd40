"""Shared fixtures: one default server for the whole session (models off), and one with the models the clients' tests use."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.serverproc import ServerProc, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("server")
    docs, data = tmp / "documents", tmp / "data"
    docs.mkdir()
    data.mkdir()
    proc = start_server(tmp, documents_dir=docs, data_dir=data)
    proc.documents_dir, proc.data_dir = docs, data  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def models_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server with the chat model, Whisper tiny.en and MiniLM, every model loaded (for the clients' end-to-end tests)."""
    proc = start_server(tmp_path_factory.mktemp("models"), chat_model="smollm2-135m-instruct", asr_model="whisper-tiny.en", embedding_model="all-minilm-l6-v2")
    try:
        deadline = time.monotonic() + 300
        # the channels report their models' loading (analysis too: its topics and summaries need MiniLM)
        while "loading" in (states := orjson.loads(proc.get("/ready")[1])["channels"]).values():
            assert time.monotonic() < deadline, states
            time.sleep(0.5)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
