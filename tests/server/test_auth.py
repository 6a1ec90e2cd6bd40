"""API keys and failed-auth throttling, without sockets."""

from __future__ import annotations

import hashlib
from pathlib import Path

from streamplex.server.auth import AuthThrottle, KeyStore, address_key
from streamplex.server.config import Settings


def test_keys_from_settings_with_scopes_and_hashed_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nsha256:{hashlib.sha256(b'hashed-key').hexdigest()} chat,metrics\nplain-key\n")
    store, generated = KeyStore.from_settings(Settings(api_keys="a, b:logs|metrics", keys_file=keys_file))
    assert generated is None and len(store) == 4
    assert store.authenticate("a").scopes is None
    assert store.authenticate("b").scopes == {"logs", "metrics"}
    assert store.authenticate("hashed-key").may_use("chat") and not store.authenticate("hashed-key").may_use("text")
    assert store.authenticate("plain-key") is not None
    assert store.authenticate("b:logs|metrics") is None and store.authenticate("") is None


def test_admin_channels_need_an_explicit_grant() -> None:
    store, _ = KeyStore.from_settings(Settings(api_keys="plain, root:admin, reader:logs, dash:metrics|chat"))
    plain, root, reader, dash = (store.authenticate(k) for k in ("plain", "root", "reader", "dash"))
    assert plain.may_use("chat") and not plain.may_use("logs", admin=True), "unscoped: every channel but the admin ones"
    assert root.may_use("chat") and root.may_use("logs", admin=True), "admin: every channel"
    assert reader.may_use("logs", admin=True) and not reader.may_use("chat"), "naming an admin channel grants it"
    assert dash.may_use("metrics") and not dash.may_use("logs", admin=True)


def test_generates_a_key_when_none_configured() -> None:
    store, generated = KeyStore.from_settings(Settings(api_keys=""))
    assert generated and generated.startswith("sk-") and store.authenticate(generated) is not None
    assert store.authenticate(generated).may_use("logs", admin=True), "a development run's key is admin"
    assert generated not in repr(store._entries)


def test_ipv6_clients_count_by_their_64() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff:ffff:ffff:fffe") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("2001:db8:1:2::1", ipv6_prefix=128) == "2001:db8:1:2::1/128"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1" and address_key("10.0.0.1") == "10.0.0.1" and address_key("unknown") == "unknown"
    throttle = AuthThrottle(limit=3, window=60)
    for i in range(3):
        throttle.failed(f"2001:db8::{i + 1}")
    assert throttle.retry_after("2001:db8::99") > 0 and throttle.retry_after("2001:db8:0:1::1") == 0


def test_throttle_window() -> None:
    now = [0.0]
    throttle = AuthThrottle(limit=2, window=10, clock=lambda: now[0], max_addresses=2)
    throttle.failed("1.1.1.1")
    assert throttle.retry_after("1.1.1.1") == 0
    throttle.failed("1.1.1.1")
    assert throttle.retry_after("1.1.1.1") == 10
    now[0] = 10.5
    assert throttle.retry_after("1.1.1.1") == 0
    for addr in ("a", "b", "c"):
        throttle.failed(addr)
    assert len(throttle._failures) == 2  # bounded
