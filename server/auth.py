"""API keys (kept as SHA-256 hashes, compared in constant time, optionally scoped) and failed-auth throttling."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamplex.server.config import Settings

ADMIN = "admin"
"""The scope that grants every channel, the admin ones (those showing other clients' data, like `logs`) included."""


@dataclass(frozen=True)
class Principal:
    """An authenticated key: the channels its scope names (None: unscoped) and a short, non-secret label."""

    label: str
    scopes: frozenset[str] | None

    def may_use(self, channel: str, admin: bool = False) -> bool:
        """Whether this key may use `channel`: an `admin` key every channel; an unscoped key every one but the admin
        ones; a scoped key those its scope names (naming an admin channel grants it)."""
        if self.scopes is None:
            return not admin
        return ADMIN in self.scopes or channel in self.scopes


def refusal(channel: str, admin: bool) -> str:
    """Why a key may not use `channel`, for the `forbidden` error."""
    if admin:
        return f"channel {channel!r} shows other clients' data: it needs a key scoped `admin` (or naming {channel!r})"
    return f"this API key may not use channel {channel!r}"


def address_key(address: str, ipv6_prefix: int = 64) -> str:
    """What per-address limits count: an IPv4 address as it is, an IPv6 one by its /`ipv6_prefix` network (one host
    usually holds a whole /64, and could otherwise take a new address for every try)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip.exploded}/{ipv6_prefix}", strict=False))
    return address


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def generate_key() -> str:
    """A new random API key, as generated when none is configured."""
    return "sk-" + secrets.token_urlsafe(24)


class KeyStore:
    """The configured API keys, hashed."""

    def __init__(self) -> None:
        self._entries: list[tuple[bytes, Principal]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, scopes: frozenset[str] | None = None) -> None:
        """Register a key given in clear."""
        self.add_hash(_digest(key), scopes)

    def add_hash(self, digest: bytes, scopes: frozenset[str] | None = None) -> None:
        """Register a key by its SHA-256 digest."""
        self._entries.append((digest, Principal(label=f"key#{digest.hex()[:8]}", scopes=scopes)))

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None. Compares against every entry so timing does not reveal which matched."""
        presented = _digest(key)
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, presented):
                found = principal
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> tuple[KeyStore, str | None]:
        """Keys from STREAMPLEX_API_KEYS and the keys file; with none, a generated `admin` key (returned once): a development run's operator."""
        store = cls()
        for item in filter(None, (part.strip() for part in settings.api_keys.split(","))):
            key, _, scope = item.rpartition(":") if ":" in item else (item, "", "")
            store.add(key, _scopes(scope.split("|")) if scope else None)
        if settings.keys_file is not None:
            store._load_file(settings.keys_file)
        if len(store):
            return store, None
        generated = generate_key()
        store.add(generated, frozenset({ADMIN}))
        return store, generated

    def _load_file(self, path: Path) -> None:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{path}:{lineno}: expected `KEY [channel,...]`")
            scopes = _scopes(fields[1].split(",")) if len(fields) == 2 else None
            if fields[0].startswith("sha256:"):
                self.add_hash(bytes.fromhex(fields[0].removeprefix("sha256:")), scopes)
            else:
                self.add(fields[0], scopes)


def _scopes(names: list[str]) -> frozenset[str]:
    return frozenset(n.strip() for n in names if n.strip())


class AuthThrottle:
    """Counts failed authentications per client address in a sliding window; bounded in addresses tracked."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic, max_addresses: int = 10_000, ipv6_prefix: int = 64) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_addresses
        self._ipv6_prefix = ipv6_prefix
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """0.0 if `address` may try to authenticate now, else seconds until it may."""
        address = address_key(address, self._ipv6_prefix)
        stamps = self._prune(address)
        if stamps is None or len(stamps) < self.limit:
            return 0.0
        return max(0.0, stamps[0] + self.window - self._clock())

    def failed(self, address: str) -> None:
        """Record a failed authentication from `address`."""
        address = address_key(address, self._ipv6_prefix)
        stamps = self._prune(address)
        if stamps is None:
            stamps = self._failures[address] = deque(maxlen=self.limit)
            while len(self._failures) > self._max:
                self._failures.popitem(last=False)
        stamps.append(self._clock())
        self._failures.move_to_end(address)

    def _prune(self, address: str) -> deque[float] | None:
        stamps = self._failures.get(address)
        if stamps is None:
            return None
        horizon = self._clock() - self.window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        if not stamps:
            del self._failures[address]
            return None
        return stamps
