"""Media sources of the audio, video and transcription channels: a file under the media folder or an http(s) URL.

`media_ref` checks what the client named (at subscribe time, no I/O beyond a stat); `local_media`
gives a local path to decode, fetching a URL first into a temporary file with its address, size and
time limits enforced, and its bytes counted in the process's disk budget for downloads (`DISK`) until
the file is removed. Decoding is in channels/media_decode.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from streamplex.channels.files import resolve_inside
from streamplex.server.channel import ChannelError
from streamplex.server.config import Settings
from streamplex.server.protocol import ErrorCode

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_START_MS = 86_400_000  # the largest `start_ms` a media channel accepts: one day
_REDIRECTS = {301, 302, 303, 307, 308}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A checked media source: a file inside the media folder (`path`) or an http(s) URL (`url`).

    `label` names it in messages and logs: the file name as the client gave it, or the URL without its
    credentials, query and fragment (which may hold secrets).
    """

    label: str
    path: Path | None = None
    url: str | None = None


class DiskBudget:
    """Bytes the temporary media downloads of this process hold on disk, against `media_url_disk_budget`."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, settings: Settings, held: int, more: int, label: str) -> None:
        """Count `more` bytes for a download already holding `held`; raise ChannelError when they do not fit.

        A download that could never fit is `bad_source`; one that does not fit beside the others is `unavailable`.
        """
        limit = settings.media_url_disk_budget
        if held + more > limit:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL {label} is over the server's disk budget for downloads ({limit} bytes)")
        if self.used + more > limit:
            raise ChannelError(
                ErrorCode.UNAVAILABLE, f"the server's disk budget for media downloads ({limit} bytes) is in use by other streams; try again later"
            )
        self.used += more

    def give_back(self, n: int) -> None:
        self.used -= n


DISK = DiskBudget()


@dataclass(slots=True)
class _Download:
    """One temporary file being written: where, and the bytes counted for it in DISK."""

    sink: IO[bytes]
    held: int = 0


def media_ref(settings: Settings, source: str | None, url: str | None, url_param: str) -> MediaRef:
    """Check the client's `source` or URL param; raise ChannelError (forbidden, invalid_params) when refused.

    Exactly one of `source` and `url` must be given (the channels' params models enforce it too).
    A URL's host name is resolved and checked later, when it is fetched (`local_media`).
    """
    if (source is None) == (url is None):
        raise ChannelError(ErrorCode.INVALID_PARAMS, f"give exactly one of `source` or `{url_param}`")
    if source is not None:
        path = resolve_inside(settings.media_dir, source, "source")
        return MediaRef(label=source, path=path)
    assert url is not None
    if not settings.media_allow_urls:
        raise ChannelError(
            ErrorCode.FORBIDDEN,
            "this server does not fetch media URLs (STREAMPLEX_MEDIA_ALLOW_URLS is off); use `source`",
            [_detail(url_param, "URLs are not allowed", "url_not_allowed")],
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ChannelError(ErrorCode.INVALID_PARAMS, f"`{url_param}` is not a valid URL: {exc}", [_detail(url_param, str(exc), "url_parsing")]) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ChannelError(
            ErrorCode.INVALID_PARAMS, f"`{url_param}` must be an http or https URL with a host", [_detail(url_param, "not an http(s) URL", "url_scheme")]
        )
    with contextlib.suppress(ValueError):
        _check_address(settings, ipaddress.ip_address(parsed.host), parsed.host)
    return MediaRef(label=str(parsed.copy_with(userinfo=b"", query=None, fragment=None)), url=str(parsed))


def _detail(field: str, message: str, kind: str) -> dict[str, str]:
    return {"field": field, "message": message, "type": kind}


@functools.lru_cache(maxsize=8)
def _allowed_networks(spec: str) -> tuple[IPNetwork, ...]:
    """The networks of `media_url_allow` (already validated by Settings)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _check_address(settings: Settings, address: IPAddress, host: str) -> None:
    """Refuse an address that is not public unless a configured network allows it."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_global and not address.is_multicast:
        return
    if any(address in network for network in _allowed_networks(settings.media_url_allow)):
        return
    raise ChannelError(
        ErrorCode.FORBIDDEN, f"media URL host {host!r} resolves to {address}, which is not a public address (allow it with STREAMPLEX_MEDIA_URL_ALLOW)"
    )


async def _resolve(settings: Settings, url: httpx.URL) -> IPAddress:
    """Resolve the URL's host and check every address it has; the first is the one to connect to."""
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL host {host!r} does not resolve: {exc.strerror}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL host {host!r} has no address")
    for address in addresses:
        _check_address(settings, address, host)
    return addresses[0]


async def _fetch(settings: Settings, url: str, label: str, download: _Download) -> None:
    """Download `url` into `download`, following redirects; each hop connects to the address that was checked.

    Its bytes are counted in DISK before they are written: the declared length at once, the rest as it comes.
    """
    current = httpx.URL(url)
    limit = settings.media_url_max_bytes
    async with httpx.AsyncClient(follow_redirects=False, timeout=settings.media_url_timeout, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https"):
                raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL redirected to a non-http(s) URL ({current.scheme})")
            address = await _resolve(settings, current)
            # Connect to the checked address, so a second DNS answer cannot lead elsewhere; Host and SNI keep the name.
            pinned = current.copy_with(host=str(address))
            headers = {"Host": current.netloc.decode("ascii"), "Accept-Encoding": "identity"}
            extensions = {"sni_hostname": current.host} if current.scheme == "https" else {}
            async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    current = current.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit():
                    if int(declared) > limit:
                        raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL is {declared} bytes, over the server's limit of {limit}")
                    _count(settings, download, int(declared), label)
                size = 0
                async for block in response.aiter_raw():
                    size += len(block)
                    if size > limit:
                        raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL is over the server's limit of {limit} bytes")
                    _count(settings, download, size, label)
                    await asyncio.to_thread(download.sink.write, block)
                await asyncio.to_thread(download.sink.flush)
                log.info("fetched media URL %s (%d bytes)", label, size)
                return
    raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL redirected more than {MAX_REDIRECTS} times")


def _count(settings: Settings, download: _Download, size: int, label: str) -> None:
    """Have DISK count at least `size` bytes for `download`."""
    if size > download.held:
        DISK.take(settings, download.held, size - download.held, label)
        download.held = size


@contextlib.asynccontextmanager
async def local_media(settings: Settings, ref: MediaRef) -> AsyncIterator[Path]:
    """A local file holding the source: the file itself, or a URL fetched into a temporary file removed on exit.

    Fetch failures raise ChannelError: forbidden for a refused address, unavailable when the disk budget
    is in use by other downloads, bad_source for anything else (unreachable, HTTP error, over
    `media_url_max_bytes` or the whole `media_url_disk_budget`, slower than `media_url_timeout`).
    The file is removed, and its bytes leave the budget, when the context exits, cancelled or not.
    """
    if ref.path is not None:
        yield ref.path
        return
    assert ref.url is not None
    fd, name = tempfile.mkstemp(prefix="streamplex-media-")
    download = _Download(os.fdopen(fd, "wb"))
    try:
        try:
            async with asyncio.timeout(settings.media_url_timeout):
                await _fetch(settings, ref.url, ref.label, download)
        except TimeoutError:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL took longer than {settings.media_url_timeout:g} s to fetch") from None
        except httpx.HTTPError as exc:
            raise ChannelError(ErrorCode.BAD_SOURCE, f"media URL could not be fetched: {type(exc).__name__}: {exc}") from None
        finally:
            await asyncio.to_thread(download.sink.close)
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        DISK.give_back(download.held)
