"""Channels from other distributions: tiny real distributions (tests/server/plugins/) built and installed with pip into a
folder on the server's PYTHONPATH, then served by a real server process over a real WebSocket."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.serverproc import ROOT, ServerProc, connect, recv, send, start_server

PLUGINS = Path(__file__).resolve().parent / "plugins"


def pip_install(dist: Path, target: Path, tmp: Path) -> None:
    """Build and install the distribution at `dist` into `target`, offline: no dependencies, this environment's setuptools."""
    source = tmp / "src" / dist.name
    shutil.copytree(dist, source)  # the build writes build/ and *.egg-info beside the sources: not into the repository
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(source)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("plugins")
    site = tmp / "site"
    for dist in ("reverse", "clashing"):
        pip_install(PLUGINS / dist, site, tmp)
    assert sorted(p.name for p in site.glob("*.dist-info")) == ["streamplex_clashing-0.1.0.dist-info", "streamplex_reverse-0.1.0.dist-info"]
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), before]))
    try:
        proc = start_server(tmp)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    yield proc
    proc.stop()


async def test_a_channel_of_another_distribution_is_served(plugin_server: ServerProc) -> None:
    ws = await connect(plugin_server)
    try:
        entry = next(c for c in ws.ready["channels"] if c["name"] == "reverse")  # type: ignore[attr-defined]
        assert entry["status"] == "available" and entry["push"] is True
        await send(ws, op="subscribe", id="r1", channel="reverse", params={"text": "Hello, world", "chunk_size": 5})
        assert await recv(ws) == {"op": "subscribed", "id": "r1", "channel": "reverse"}
        chunks = [await recv(ws) for _ in range(3)]
        assert [c["data"] for c in chunks] == ["dlrow", " ,oll", "eH"] and [c["seq"] for c in chunks] == [0, 1, 2]
        assert await recv(ws) == {"op": "end", "id": "r1", "reason": "complete"}

        await send(ws, op="subscribe", id="r2", channel="reverse", params={"push": True})
        assert (await recv(ws))["op"] == "subscribed"
        await send(ws, op="push", id="r2", data="stressed")
        assert (await recv(ws))["data"] == "desserts"
        await send(ws, op="push", id="r2", end=True)
        assert await recv(ws) == {"op": "end", "id": "r2", "reason": "complete"}

        await send(ws, op="subscribe", id="r3", channel="reverse", params={"text": "x", "chunk_size": 0})
        refused = await recv(ws)
        assert refused["op"] == "error" and refused["code"] == "invalid_params" and refused["id"] == "r3"
    finally:
        await ws.close()
    status, body = plugin_server.get("/channels")
    assert status == 200
    schema = {c["name"]: c for c in orjson.loads(body)["channels"]}["reverse"]["params"]
    assert set(schema["properties"]) == {"text", "chunk_size", "push"}
    assert orjson.loads(plugin_server.get("/ready")[1])["channels"]["reverse"] == "available"


async def test_broken_and_clashing_channels_are_left_out_and_the_others_served(plugin_server: ServerProc) -> None:
    ready = orjson.loads(plugin_server.get("/ready")[1])["channels"]
    assert "missing" not in ready and "fails" not in ready
    assert {"text", "data", "logs", "metrics", "reverse"} <= set(ready)
    ws = await connect(plugin_server)
    try:
        await send(ws, op="subscribe", id="t1", channel="text", params={"text": "still the built-in one", "unit": "words", "chunk_size": 10})
        assert (await recv(ws))["op"] == "subscribed"
        assert (await recv(ws))["data"] == "still the built-in one"  # not the clashing distribution's "impostor"
        assert (await recv(ws))["reason"] == "complete"
        await send(ws, op="subscribe", id="f1", channel="fails", params={})
        assert (await recv(ws))["code"] == "unknown_channel"
    finally:
        await ws.close()
    log = plugin_server.log()
    assert "channel entry point 'missing' = 'streamplex_clashing:Missing' (distribution streamplex-clashing) is left out: loading it failed" in log
    assert "channel 'fails' is left out: its start() failed" in log and "the device this channel needs is missing" in log
    assert "channel 'text' is registered by more than one distribution" in log and "the built-in one is served" in log


def test_importing_the_whole_server_loads_no_channel() -> None:
    code = """
import importlib, pkgutil, sys
import streamplex.server
names = [m.name for m in pkgutil.walk_packages(streamplex.server.__path__, "streamplex.server.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
print(" ".join(sorted(m for m in sys.modules if m == "streamplex.channels" or m.startswith("streamplex.channels."))))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    count, loaded = [*run.stdout.splitlines(), ""][:2]
    assert int(count) > 40
    assert loaded == "", f"importing streamplex.server loaded {loaded}"
