"""metrics end to end: field groups, streams with different intervals on one socket, bad params."""

from __future__ import annotations

from collections import defaultdict

from tests.serverproc import ServerProc, connect, recv, send

ALL = {"cpu", "memory", "swap", "disk", "network", "process", "gpu", "engine", "server"}
ALWAYS = {"node", "time", "interval_s"}


async def test_field_groups_and_intervals_share_one_socket(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="cpu", channel="metrics", params={"interval_ms": 100, "fields": ["cpu", "memory"]})
    await send(ws, op="subscribe", id="all", channel="metrics", params={"interval_ms": 300})
    chunks: dict[str, list[dict]] = defaultdict(list)
    while len(chunks["all"]) < 3:
        frame = await recv(ws)
        if frame["op"] == "chunk":
            chunks[frame["id"]].append(frame)
    await ws.close()
    for frame in chunks["cpu"]:
        assert set(frame["data"]) == ALWAYS | {"cpu", "memory"}, frame
        assert 0 <= frame["data"]["cpu"]["percent"] <= 100
        assert frame["data"]["memory"]["total_bytes"] > 0
    assert [f["seq"] for f in chunks["cpu"]] == list(range(len(chunks["cpu"])))
    assert len(chunks["cpu"]) >= 2 * len(chunks["all"])  # three times the rate, give or take the edges
    for frame in chunks["all"]:
        assert set(frame["data"]) == ALWAYS | ALL, frame
        assert 0.25 <= frame["data"]["interval_s"] <= 0.6
        assert frame["data"]["server"]["connections"] >= 1


async def test_unknown_field_group_is_invalid_params(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="m", channel="metrics", params={"fields": ["cpu", "temperature"]})
    frame = await recv(ws)
    await ws.close()
    assert frame["op"] == "error" and frame["code"] == "invalid_params", frame
    assert any("fields" in str(d.get("field")) for d in frame["details"]), frame
