"""Forwarded headers are believed only from `trusted_proxies`: a client writing them directly changes nothing."""

from __future__ import annotations

from pathlib import Path

from tests.forged import failed_auth, forged, http_statuses
from tests.serverproc import start_server

LIMIT = 4  # auth_fail_limit
PER_MINUTE = 5  # http_rate_limit


async def test_a_forged_forwarded_header_changes_nothing_by_default(tmp: Path) -> None:
    srv = start_server(tmp, auth_fail_limit=LIMIT, http_rate_limit=PER_MINUTE)
    try:
        codes = [await failed_auth(srv.url, forged(i)) for i in range(3 * LIMIT)]
        assert codes == [4001] * LIMIT + [4003] * (2 * LIMIT), "throttled by the real address, whatever the headers say"
        statuses = await http_statuses(srv.http, 3 * PER_MINUTE)
        assert [s for s, _ in statuses] == [401] * PER_MINUTE + [429] * (2 * PER_MINUTE), statuses
        assert all("requests per minute" in m for _, m in statuses[PER_MINUTE:])
        log = srv.log()
        assert log.count("authentication failed from 127.0.0.1") == LIMIT
        assert "198.51.100." not in log, "a forged address reached the log"
    finally:
        srv.stop()


async def test_only_a_named_proxy_is_believed(tmp: Path) -> None:
    srv = start_server(tmp, auth_fail_limit=LIMIT, http_rate_limit=PER_MINUTE, trusted_proxies="127.0.0.1")
    try:
        # 127.0.0.2 is not the proxy: its headers are ignored, it is throttled as itself.
        codes = [await failed_auth(srv.url, forged(i), local="127.0.0.2") for i in range(3 * LIMIT)]
        assert codes == [4001] * LIMIT + [4003] * (2 * LIMIT)
        statuses = await http_statuses(srv.http, 3 * PER_MINUTE, local="127.0.0.2")
        assert [s for s, _ in statuses] == [401] * PER_MINUTE + [429] * (2 * PER_MINUTE), statuses
        assert srv.log().count("authentication failed from 127.0.0.2") == LIMIT
        assert "198.51.100." not in srv.log()
        # The proxy (127.0.0.1) is believed: the client is the address it forwards, and only through X-Forwarded-For.
        assert await failed_auth(srv.url, {"X-Forwarded-For": "203.0.113.9"}) == 4001
        assert await failed_auth(srv.url, {"Forwarded": "for=203.0.113.50"}) == 4001
        log = srv.log()
        assert "authentication failed from 203.0.113.9" in log
        assert "203.0.113.50" not in log and "authentication failed from 127.0.0.1" in log, "RFC 7239 Forwarded is never read"
        # An IPv6 client counts by its /64: a new address in it for every try changes nothing.
        codes = [await failed_auth(srv.url, {"X-Forwarded-For": f"2001:db8:1:2::{i + 1:x}"}) for i in range(LIMIT + 2)]
        assert codes == [4001] * LIMIT + [4003] * 2
        assert await failed_auth(srv.url, {"X-Forwarded-For": "2001:db8:1:3::1"}) == 4001, "another /64 is another client"
    finally:
        srv.stop()
