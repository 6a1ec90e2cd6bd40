"""deploy/nginx/streamplex.conf in real nginx on loopback, in front of two server instances (upstream ports rendered into a copy)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import websockets

from tests.forged import failed_auth, forged, http_statuses
from tests.nginxproc import CONF, NGINX, Nginx, running_nginx
from tests.serverproc import KEY, ServerProc, collect, recv, send, start_server

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/packages/apt-test.txt)")


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProc]]:
    tmp = tmp_path_factory.mktemp("instances")
    servers = [start_server(tmp, node="one", trusted_proxies="127.0.0.1")]
    try:
        servers.append(start_server(tmp, node="two", trusted_proxies="127.0.0.1"))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, instances: list[ServerProc]) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx"), [s.port for s in instances]) as server:
        yield server


async def _connect(url: str, **kwargs) -> websockets.ClientConnection:
    ws = await websockets.connect(url, **kwargs)
    await send(ws, op="auth", api_key=KEY)
    ready = await recv(ws)
    assert ready["op"] == "ready", ready
    ws.ready = ready  # type: ignore[attr-defined]
    return ws


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_full_session_through_nginx(nginx: Nginx, tls: bool) -> None:
    ws = await _connect(nginx.ws(tls), ssl=nginx.ssl_context() if tls else None)
    assert ws.ready["node"] in {"one", "two"}  # type: ignore[attr-defined]
    await send(ws, op="ping")
    assert (await recv(ws))["op"] == "pong"
    await send(ws, op="subscribe", id="t", channel="text", params={"text": "Hello there. Through the proxy! " * 20, "unit": "sentences", "chunk_size": 1})
    await send(ws, op="subscribe", id="d", channel="data", params={"records": [{"i": i} for i in range(50)], "chunk_size": 5})
    text_chunks, text_end = await collect(ws, "t")
    assert text_end["reason"] == "complete" and "".join(c["data"] for c in text_chunks) == "Hello there. Through the proxy! " * 20
    await send(ws, op="subscribe", id="d2", channel="data", params={"records": [{"i": i} for i in range(50)], "chunk_size": 5})
    data_chunks, data_end = await collect(ws, "d2")
    assert data_end["reason"] == "complete" and [orjson.loads(line)["i"] for c in data_chunks for line in c["data"].splitlines()] == list(range(50))
    await send(ws, op="unsubscribe", id="nope")
    assert (await recv(ws))["code"] == "unknown_id"
    await ws.close()


async def test_nginx_spreads_connections_over_both_instances(nginx: Nginx) -> None:
    sockets = [await _connect(nginx.ws()) for _ in range(4)]
    assert {ws.ready["node"] for ws in sockets} == {"one", "two"}  # type: ignore[attr-defined]
    for ws in sockets:
        await ws.close()


async def test_stream_keeps_flowing_when_the_other_instance_stops(nginx: Nginx, instances: list[ServerProc]) -> None:
    ws = await _connect(nginx.ws())
    mine = ws.ready["node"]  # type: ignore[attr-defined]
    other = next(s for s in instances if s.env["STREAMPLEX_NODE"] != mine)
    total = 200
    await send(ws, op="subscribe", id="s", channel="data", params={"records": [{"i": i} for i in range(total)], "chunk_size": 1, "interval_ms": 20})
    records: list[int] = []
    while len(records) < 20:
        frame = await recv(ws)
        if frame["op"] == "chunk":
            records.append(orjson.loads(frame["data"])["i"])
    assert other.stop() in (0, -15)
    chunks, end = await collect(ws, "s", timeout=30)
    records += [orjson.loads(c["data"])["i"] for c in chunks]
    assert end["reason"] == "complete" and records == list(range(total))
    # New connections land on the surviving instance.
    for _ in range(3):
        fresh = await _connect(nginx.ws())
        assert fresh.ready["node"] == mine  # type: ignore[attr-defined]
        await fresh.close()
    await ws.close()


async def test_one_address_is_limited_to_its_open_connections(nginx: Nginx) -> None:
    limit = int(re.search(r"limit_conn streamplex_conn (\d+);", CONF.read_text()).group(1))
    sockets = await asyncio.gather(*(_connect(nginx.ws()) for _ in range(limit)))
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(nginx.ws())
        assert refused.value.response.status_code == 429
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    again = await _connect(nginx.ws())
    await again.close()


LIMIT = 4  # auth_fail_limit of the server behind the proxy
PER_MINUTE = 5  # its http_rate_limit


@pytest.fixture
def fronted(tmp_path: Path) -> Iterator[tuple[Nginx, ServerProc]]:
    """One server trusting nginx (127.0.0.1, as the shipped configs name their proxy) behind its own nginx.

    The client connects from 127.0.0.1 too: an address inside the trusted set, so only nginx overwriting
    X-Forwarded-For (not appending to it) keeps a forged address from being believed.
    """
    srv = start_server(tmp_path, trusted_proxies="127.0.0.1", auth_fail_limit=LIMIT, http_rate_limit=PER_MINUTE)
    try:
        with running_nginx(tmp_path, [srv.port]) as proxy:
            yield proxy, srv
    finally:
        srv.stop()


async def test_a_client_forging_forwarded_headers_is_throttled_by_its_real_address(fronted: tuple[Nginx, ServerProc]) -> None:
    proxy, srv = fronted
    codes = [await failed_auth(proxy.ws(), forged(i)) for i in range(3 * LIMIT)]
    assert codes == [4001] * LIMIT + [4003] * (2 * LIMIT), "throttled by the address nginx saw, whatever the client wrote"
    assert srv.log().count("authentication failed from 127.0.0.1") == LIMIT
    assert "198.51.100." not in srv.log(), "a forged address reached the server"


async def test_a_client_forging_forwarded_headers_meets_the_per_address_http_limit(fronted: tuple[Nginx, ServerProc]) -> None:
    proxy, srv = fronted
    statuses = await http_statuses(f"http://127.0.0.1:{proxy.http_port}", 3 * PER_MINUTE)
    assert [s for s, _ in statuses] == [401] * PER_MINUTE + [429] * (2 * PER_MINUTE), statuses
    assert all("requests per minute" in m for _, m in statuses[PER_MINUTE:]), "the server's limiter (not nginx's) refused them"
    assert "198.51.100." not in srv.log()


async def test_killed_and_restarted_instances_fail_no_new_connection(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("killed")
    servers = {"left": start_server(tmp, node="left")}
    try:
        servers["right"] = start_server(tmp, node="right")
        with running_nginx(tmp_path_factory.mktemp("nginx-killed"), [s.port for s in servers.values()]) as proxy:

            async def nodes_reached(n: int) -> set[str]:
                sockets = [await _connect(proxy.ws()) for _ in range(n)]
                await asyncio.gather(*(ws.close() for ws in sockets))
                return {ws.ready["node"] for ws in sockets}  # type: ignore[attr-defined]

            # Each connect that nginx tries on the dead node is refused and retried on the other (proxy_next_upstream).
            assert servers["left"].stop(signal.SIGKILL) == -signal.SIGKILL
            assert await nodes_reached(6) == {"right"}
            assert "connect() failed (111: Connection refused)" in proxy.log()
            # Restarted on its port, the node that failed a moment ago takes clients at once: with the other node
            # gone too, every new connection reaches it (a failure mark would have left "no live upstreams": 502).
            servers["left"] = start_server(tmp, port=servers["left"].port, node="left")
            held = await _connect(proxy.ws())  # a long-lived socket, as nginx would have let through as its one probe
            assert servers["right"].stop(signal.SIGKILL) == -signal.SIGKILL
            assert await nodes_reached(6) == {"left"}
            await held.close()
    finally:
        for server in servers.values():
            server.stop()
