"""Shared fixtures: one default server for the whole session (models off), and one with the models the clients' tests use.

Every test gets one tier marker (pyproject.toml registers them), decided here rather than by hand:
`models` when it loads a real model (the models fixture, or a module that uses the model helpers of
tests/), else `e2e` when it starts processes (a server fixture, tests/serverproc, Redis, nginx, node,
chromium, the deploy tools), else `unit`. `scripts/test -m unit` is the quick tier.
"""

from __future__ import annotations

import inspect
import re
import time
import types
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


MODEL_HELPERS = {"tests.chatmodel", "tests.embedmodel", "tests.asrmodel", "tests.tinymarian"}
PROCESS_HELPERS = {"tests.serverproc", "tests.redisproc", "subprocess"}
PROCESS_FOLDERS = {"deploy", "client_js", "scripts"}  # every test there runs a tool, node or chromium
TIERS = ("unit", "e2e", "models")


def _uses(module: types.ModuleType, helpers: set[str]) -> bool:
    """Whether the test module imported one of `helpers` (itself, or names from it)."""
    for value in vars(module).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if name in helpers:
            return True
    return False


def tier(item: pytest.Item) -> str:
    explicit = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
    if explicit:
        return explicit[0]
    module = item.module  # type: ignore[attr-defined]
    fixtures = set(getattr(item, "fixturenames", ()))
    if "models_server" in fixtures or _uses(module, MODEL_HELPERS):
        return "models"
    folder = item.path.parent.name
    if fixtures & {"server", "models_server"} or folder in PROCESS_FOLDERS or _uses(module, PROCESS_HELPERS):
        return "e2e"
    return "unit"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With `-m unit` alone, do not even import the modules that cannot hold a unit test (they import torch,
    the model helpers or the process helpers): collecting them would cost more than running the unit tier."""
    if config.getoption("markexpr", "") != "unit" or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if collection_path.parent.name in PROCESS_FOLDERS:
        return True
    source = collection_path.read_text(encoding="utf-8")
    return True if re.search(r"^from (tests\.(chatmodel|embedmodel|asrmodel|tinymarian|redisproc)) import|^import subprocess", source, re.M) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item)))
