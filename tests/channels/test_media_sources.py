"""Media sources: files under the media folder, refused paths, and http(s) URLs with their address, size and time limits."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from streamplex.channels.media import local_media, media_ref
from streamplex.server.channel import ChannelError
from streamplex.server.config import Settings
from streamplex.server.protocol import ErrorCode
from tests.channels.mediafiles import MEDIA, SPEECH, broken_files, http_server, nesting_lists, write_video
from tests.channels.mediaws import read_stream
from tests.serverproc import ServerProc, connect, send, start_server

LOOPBACK = "127.0.0.0/8,::1/128"


def settings(**kw: Any) -> Settings:
    return Settings(api_keys="k", chat_model="", **kw)


def refused(code: ErrorCode, fn: Any, *args: Any) -> ChannelError:
    with pytest.raises(ChannelError) as info:
        fn(*args)
    assert info.value.code == code, info.value.message
    return info.value


async def fetch(s: Settings, url: str) -> bytes:
    async with local_media(s, media_ref(s, None, url, "audio_url")) as path:
        return path.read_bytes()


async def fetch_refused(code: ErrorCode, s: Settings, url: str) -> str:
    with pytest.raises(ChannelError) as info:
        await fetch(s, url)
    assert info.value.code == code, info.value.message
    return info.value.message


def test_a_file_in_the_media_folder_resolves() -> None:
    ref = media_ref(settings(), SPEECH, None, "audio_url")
    assert ref.path == (MEDIA / SPEECH).resolve() and ref.url is None and ref.label == SPEECH


@pytest.mark.parametrize("name", ["../README.md", "/etc/passwd", "../../../../etc/passwd", "sub/../../pyproject.toml"])
def test_paths_outside_the_media_folder_are_forbidden(name: str) -> None:
    refused(ErrorCode.FORBIDDEN, media_ref, settings(), name, None, "audio_url")


def test_a_symlink_leaving_the_folder_is_forbidden(tmp_path: Path) -> None:
    (tmp_path / "escape.wav").symlink_to("/etc/hostname")
    refused(ErrorCode.FORBIDDEN, media_ref, settings(media_dir=tmp_path), "escape.wav", None, "audio_url")


def test_a_missing_file_is_invalid_params() -> None:
    err = refused(ErrorCode.INVALID_PARAMS, media_ref, settings(), "nope.wav", None, "audio_url")
    assert "not found" in err.message


def test_neither_or_both_sources_are_invalid_params() -> None:
    refused(ErrorCode.INVALID_PARAMS, media_ref, settings(), None, None, "audio_url")
    refused(ErrorCode.INVALID_PARAMS, media_ref, settings(media_allow_urls=True), SPEECH, "http://example.com/a.wav", "audio_url")


def test_urls_are_refused_unless_the_setting_allows_them() -> None:
    err = refused(ErrorCode.FORBIDDEN, media_ref, settings(), None, "https://example.com/a.wav", "video_url")
    assert err.details and err.details[0]["field"] == "video_url"
    assert media_ref(settings(media_allow_urls=True), None, "https://example.com/a.wav", "video_url").url == "https://example.com/a.wav"
    ref = media_ref(settings(media_allow_urls=True), None, "https://user:pw@example.com/a.wav?token=secret#t", "video_url")
    assert ref.url == "https://user:pw@example.com/a.wav?token=secret#t" and ref.label == "https://example.com/a.wav"


@pytest.mark.parametrize("url", ["ftp://example.com/a.wav", "file:///etc/passwd", "http://", "not a url"])
def test_non_http_urls_are_invalid_params(url: str) -> None:
    refused(ErrorCode.INVALID_PARAMS, media_ref, settings(media_allow_urls=True), None, url, "audio_url")


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "[::1]",
        "[fe80::1]",
        "[fd00::1]",
        "[::ffff:127.0.0.1]",
        "224.0.0.1",
    ],
)
def test_addresses_that_are_not_public_are_forbidden(host: str) -> None:
    err = refused(ErrorCode.FORBIDDEN, media_ref, settings(media_allow_urls=True), None, f"http://{host}/a.wav", "audio_url")
    assert "not a public address" in err.message


def test_an_allow_listed_network_is_let_through() -> None:
    s = settings(media_allow_urls=True, media_url_allow="10.0.0.0/8")
    assert media_ref(s, None, "http://10.1.2.3/a.wav", "audio_url").url
    refused(ErrorCode.FORBIDDEN, media_ref, s, None, "http://192.168.1.1/a.wav", "audio_url")


def test_a_malformed_allow_list_stops_the_server_from_starting() -> None:
    with pytest.raises(ValidationError, match="media_url_allow"):
        settings(media_url_allow="127.0.0.1/32,not-a-network")


async def test_a_host_name_is_resolved_and_its_addresses_checked(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    with http_server(tmp_path) as base:
        port = base.rsplit(":", 1)[1]
        message = await fetch_refused(ErrorCode.FORBIDDEN, settings(media_allow_urls=True), f"http://localhost:{port}/a.wav")
        assert "'localhost' resolves to 127.0.0.1" in message
        assert await fetch(settings(media_allow_urls=True, media_url_allow=LOOPBACK), f"http://localhost:{port}/a.wav") == b"RIFF"


async def test_a_real_http_server_on_an_allow_listed_loopback(tmp_path: Path) -> None:
    original = (MEDIA / SPEECH).read_bytes()
    (tmp_path / SPEECH).write_bytes(original)
    s = settings(media_allow_urls=True, media_url_allow=LOOPBACK)
    with http_server(tmp_path) as base:
        async with local_media(s, media_ref(s, None, f"{base}/{SPEECH}", "audio_url")) as path:
            assert path.read_bytes() == original
            kept = path
        assert not kept.exists(), "the fetched copy is removed"
        assert await fetch(s, f"{base}/redirect/{SPEECH}") == original
        assert "HTTP 404" in await fetch_refused(ErrorCode.BAD_SOURCE, s, f"{base}/missing.wav")


async def test_a_redirect_to_a_private_address_is_forbidden(tmp_path: Path) -> None:
    s = settings(media_allow_urls=True, media_url_allow="127.0.0.1/32")
    with http_server(tmp_path) as base:
        message = await fetch_refused(ErrorCode.FORBIDDEN, s, f"{base}/redirect-to/http://10.255.255.1/a.wav")
    assert "10.255.255.1" in message


async def test_a_file_over_the_size_limit_is_bad_source(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    s = settings(media_allow_urls=True, media_url_allow=LOOPBACK, media_url_max_bytes=4096)
    with http_server(tmp_path) as base:
        assert "over the server's limit of 4096" in await fetch_refused(ErrorCode.BAD_SOURCE, s, f"{base}/big.bin")


async def test_a_server_that_never_answers_hits_the_time_limit() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts connections in the kernel, never answers
        s = settings(media_allow_urls=True, media_url_allow=LOOPBACK, media_url_timeout=0.5)
        message = await fetch_refused(ErrorCode.BAD_SOURCE, s, f"http://127.0.0.1:{silent.getsockname()[1]}/a.wav")
    assert "longer than 0.5 s" in message


async def test_an_unreachable_url_is_bad_source() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        s = settings(media_allow_urls=True, media_url_allow=LOOPBACK)
        assert "could not be fetched" in await fetch_refused(ErrorCode.BAD_SOURCE, s, f"http://127.0.0.1:{port}/a.wav")


@pytest.fixture(scope="module")
def media_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, Path]]:
    """A real server whose media folder holds broken files, lists naming other files and an oversize video, fetching URLs with loopback allow-listed."""
    tmp = tmp_path_factory.mktemp("media")
    folder = tmp / "media"
    folder.mkdir()
    broken_files(folder)
    nesting_lists(folder)
    write_video(folder / "huge.mp4", 640, 480, 3)
    srv = start_server(tmp, media_dir=folder, media_allow_urls="true", media_url_allow="127.0.0.1/32", media_max_pixels=320 * 240)
    try:
        yield srv, folder
    finally:
        srv.stop()


async def test_over_the_websocket_urls_and_broken_files_get_their_documented_errors(media_server: tuple[ServerProc, Path]) -> None:
    srv, folder = media_server
    ws = await connect(srv)
    try:
        with http_server(folder) as base:
            await send(ws, op="subscribe", id="u", channel="audio", params={"audio_url": f"{base}/{SPEECH}", "sample_rate": 8000, "realtime": False})
            got = await read_stream(ws, "u")
            assert got.end == {"op": "end", "id": "u", "reason": "complete"} and got.json[-1]["samples"] == sum(map(len, got.binary)) // 2 > 50000
            cases = {
                "private": ({"video_url": "http://10.0.0.1/v.mp4"}, "error", "forbidden"),
                "outside": ({"source": "../../../etc/passwd"}, "error", "forbidden"),
                "missing": ({"source": "nope.mp4"}, "error", "invalid_params"),
                "garbage": ({"source": "garbage.mp4"}, "end", "bad_source"),
                "codec": ({"source": "unknown-codec.wav"}, "end", "bad_source"),
                "http404": ({"video_url": f"{base}/missing.mp4"}, "end", "bad_source"),
                "huge": ({"source": "huge.mp4"}, "end", "bad_source"),
            }
            for sid, (params, kind, code) in cases.items():
                await send(ws, op="subscribe", id=sid, channel="video", params={**params, "realtime": False})
                result = await read_stream(ws, sid)
                if kind == "error":
                    assert result.error is not None and result.error["code"] == code, result
                else:
                    assert result.end is not None and result.end["reason"] == "error" and result.end["error"]["code"] == code, result
                    assert str(folder) not in result.end["error"]["message"]
            assert "media_max_pixels" in result.end["error"]["message"]  # huge.mp4, the last case
            # Lists that name a local file FFmpeg would open (the audio channel would stream it): refused.
            lists = {"hls": {"source": "playlist.m3u8"}, "concat": {"source": "list.ffconcat"}, "concat-url": {"audio_url": f"{base}/list.ffconcat"}}
            for sid, params in lists.items():
                await send(ws, op="subscribe", id=sid, channel="audio", params={**params, "sample_rate": 8000, "realtime": False})
                result = await read_stream(ws, sid)
                assert result.end is not None and result.end["error"]["code"] == "bad_source" and not result.binary, result
                assert "not a local file in a format this server opens" in result.end["error"]["message"], result
    finally:
        await ws.close()
