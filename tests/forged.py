"""Clients that forge the forwarded headers, for the proxy-trust tests (direct and through nginx)."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import websockets
from websockets.exceptions import ConnectionClosed


def forged(i: int) -> list[tuple[str, str]]:
    """Every header a client could use to claim another address, a new documentation address (198.51.100.0/24) each
    time: `X-Forwarded-For` twice (a list, then a line of its own, the way several proxies would write it), in
    lower case too, `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto`."""
    fake = f"198.51.100.{i % 250 + 1}"
    return [
        ("X-Forwarded-For", f"{fake}, 198.51.100.254"),
        ("x-forwarded-for", fake),
        ("Forwarded", f"for={fake};proto=https"),
        ("X-Real-IP", fake),
        ("X-Forwarded-Proto", "https"),
    ]


async def failed_auth(url: str, headers: dict[str, str] | list[tuple[str, str]], local: str = "127.0.0.1") -> int:
    """Authenticate with a wrong key from `local` with `headers` on the upgrade; the close code the server answers with."""
    async with websockets.connect(url, additional_headers=headers, local_addr=(local, 0)) as ws:
        try:
            await ws.send(orjson.dumps({"op": "auth", "api_key": "sk-wrong"}).decode())
            message = await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return exc.rcvd.code
        raise AssertionError(f"a wrong key got {message!r}")


async def http_statuses(base: str, count: int, local: str = "127.0.0.1") -> list[tuple[int, str]]:
    """`count` keyless HTTP stream requests from `local`, each with a new forged address: (status, error code or message)."""
    out = []
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=local), timeout=10) as client:
        for i in range(count):
            resp = await client.post(f"{base}/api/v1/stream/text", json={"text": "hi"}, headers=forged(i))
            error = resp.json().get("error", {}) if resp.headers.get("content-type", "").startswith("application/json") else {}
            out.append((resp.status_code, error.get("message", resp.text[:80])))
    return out
