"""Shared fixtures: one default server for the whole session (chat model off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
