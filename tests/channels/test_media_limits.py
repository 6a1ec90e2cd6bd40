"""What FFmpeg may open and how much of it: local files only, allowed demuxers only, caps on frame size,
duration and frame count (declared and decoded), and a disk budget for downloaded media."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import pytest

from streamplex.channels.media import DISK, local_media, media_ref
from streamplex.channels.media_decode import AudioDecoder, MediaLimits, VideoDecoder, open_media
from streamplex.server.channel import ChannelError
from streamplex.server.config import Settings
from streamplex.server.protocol import ErrorCode
from tests.channels.mediafiles import MEDIA, SPEECH, http_server, nesting_lists, write_undeclared_audio, write_video

LOOPBACK = "127.0.0.0/8"


def settings(**kw: Any) -> Settings:
    return Settings(api_keys="k", chat_model="", media_allow_urls=True, media_url_allow=LOOPBACK, **kw)


async def refused(decoder: AudioDecoder | VideoDecoder) -> tuple[ChannelError, int]:
    """The error a decoder ends with, and how many items it gave before."""
    got = 0
    with pytest.raises(ChannelError) as info:
        async with decoder:
            async for _ in decoder.blocks(1600) if isinstance(decoder, AudioDecoder) else decoder.frames():
                got += 1
    return info.value, got


@pytest.mark.parametrize("kind", ["hls", "concat"])
async def test_playlists_and_lists_naming_a_local_file_are_refused(tmp_path: Path, kind: str) -> None:
    lists = nesting_lists(tmp_path)
    with av.open(str(lists[kind])) as unguarded:  # what FFmpeg does by default: it opens the file the list names
        assert unguarded.format.name == kind and sum(1 for _ in unguarded.decode(audio=0)) > 50
    error, got = await refused(AudioDecoder(lists[kind], lists[kind].name, sample_rate=16000))
    assert error.code == ErrorCode.BAD_SOURCE and got == 0
    assert "not a local file in a format this server opens" in error.message and str(tmp_path) not in error.message
    # The same list fetched from a URL (the server downloads it first) is refused as well.
    s = settings()
    with http_server(tmp_path) as base:
        ref = media_ref(s, None, f"{base}/{lists[kind].name}", "audio_url")
        async with local_media(s, ref) as path:
            error, got = await refused(AudioDecoder(path, ref.label, sample_rate=16000, limits=MediaLimits.of(s)))
    assert error.code == ErrorCode.BAD_SOURCE and got == 0
    if kind == "concat":  # FFmpeg itself probes HLS only by a playlist's extension, which a download does not keep
        assert "format this server opens" in error.message


def test_ffmpeg_reads_nothing_but_local_files(tmp_path: Path) -> None:
    (tmp_path / SPEECH).write_bytes((MEDIA / SPEECH).read_bytes())
    requests: list[str] = []

    class Recording(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Recording(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{SPEECH}"
    try:
        with av.open(url) as unguarded:  # FFmpeg's own http protocol, when nothing stops it
            assert unguarded.streams.audio
        assert requests == [f"/{SPEECH}"]
        with pytest.raises(ChannelError) as info:
            open_media(url, "u", MediaLimits())
        assert info.value.code == ErrorCode.BAD_SOURCE and requests == [f"/{SPEECH}"], "no request may leave FFmpeg"
        assert open_media(tmp_path / SPEECH, SPEECH, MediaLimits()).format.name == "wav"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_demuxers_that_open_further_files_cannot_be_allowed() -> None:
    for formats in ("wav,hls", "concat", "mov,image2", "dash"):
        with pytest.raises(ValueError, match="open further files or URLs"):
            Settings(api_keys="k", media_formats=formats)
    assert Settings(api_keys="k", media_formats=" wav , mp3 ").media_formats == "wav,mp3"


async def test_a_format_outside_the_allowed_list_is_refused() -> None:
    error, _ = await refused(AudioDecoder(MEDIA / SPEECH, SPEECH, sample_rate=16000, limits=MediaLimits(formats="mp3,flac")))
    assert error.code == ErrorCode.BAD_SOURCE and "mp3, flac" in error.message


async def test_an_oversize_frame_is_refused_before_decoding(tmp_path: Path) -> None:
    path = write_video(tmp_path / "big.mp4", 640, 480, 3)
    error, got = await refused(VideoDecoder(path, "big.mp4", fps=10, limits=MediaLimits(max_pixels=320 * 240)))
    assert error.code == ErrorCode.BAD_SOURCE and got == 0
    assert error.message == "big.mp4: has 640x480 frames, over this server's limit of 76800 pixels (media_max_pixels)"
    async with VideoDecoder(path, "big.mp4", fps=10, limits=MediaLimits(max_pixels=640 * 480)) as video:
        assert len([f async for f in video.frames()]) > 0


async def test_a_declared_duration_or_frame_count_over_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    error, got = await refused(AudioDecoder(MEDIA / SPEECH, SPEECH, sample_rate=16000, limits=MediaLimits(max_duration_s=5)))
    assert error.code == ErrorCode.BAD_SOURCE and got == 0 and "lasts 7.2 s, over this server's limit of 5 s (media_max_duration)" in error.message
    path = write_video(tmp_path / "v.mp4", 64, 48, 50)
    error, got = await refused(VideoDecoder(path, "v.mp4", fps=25, limits=MediaLimits(max_frames=20)))
    assert got == 0 and "holds 50 frames, over this server's limit of 20 (media_max_frames)" in error.message


async def test_undeclared_length_is_capped_while_decoding(tmp_path: Path) -> None:
    video = write_video(tmp_path / "live.mkv", 64, 48, 100, declared=False)  # 4 s at 25 fps, neither declared
    error, got = await refused(VideoDecoder(video, "live.mkv", fps=25, limits=MediaLimits(max_frames=30)))
    assert error.code == ErrorCode.BAD_SOURCE and "decodes to more than 30 frames" in error.message and 20 <= got <= 30
    error, got = await refused(VideoDecoder(video, "live.mkv", fps=25, limits=MediaLimits(max_duration_s=2)))
    assert "decodes past 2 s" in error.message and 40 <= got <= 51
    audio = write_undeclared_audio(tmp_path / "live-audio.mkv", 7.0)
    error, got = await refused(AudioDecoder(audio, "live-audio.mkv", sample_rate=16000, limits=MediaLimits(max_duration_s=3)))
    assert "decodes past 3 s" in error.message and 20 <= got <= 30  # blocks of 0.1 s
    async with AudioDecoder(audio, "live-audio.mkv", sample_rate=16000) as whole:
        assert sum([b.shape[1] async for b in whole.blocks(1600)]) == 112_000


@pytest.mark.parametrize("name", ["capture.mp4", "capture.ts"])
async def test_a_source_starting_far_from_zero_is_timed_from_its_first_frame(tmp_path: Path, name: str) -> None:
    """A capture whose first frame is at 20 000 s (over the 4 h cap) lasts 2 s: it streams whole, from its first frame."""
    path = write_video(tmp_path / name, 64, 48, 50, start_s=20_000)
    async with VideoDecoder(path, name, fps=25) as video:
        frames = [f async for f in video.frames()]
    assert len(frames) == 50 and frames[0].time_s == 0.0 and not any(f.repeat for f in frames)
    async with VideoDecoder(path, name, fps=25, start_ms=1000) as video:
        later = [f async for f in video.frames()]
    assert len(later) == 25 and later[0].time_s == 1.0
    audio = write_undeclared_audio(tmp_path / "capture.mkv", 2.0, start_s=20_000)
    async with AudioDecoder(audio, "capture.mkv", sample_rate=16000, start_ms=500) as decoder:
        assert sum([b.shape[1] async for b in decoder.blocks(1600)]) == 24_000


def _downloads() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("streamplex-media-*")}


async def test_downloads_share_one_disk_budget(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a" * 6000)
    (tmp_path / "b.bin").write_bytes(b"b" * 6000)
    s = settings(media_url_disk_budget=10_000)
    before = _downloads()
    with http_server(tmp_path) as base:
        ref_a, ref_b = (media_ref(s, None, f"{base}/{name}", "audio_url") for name in ("a.bin", "b.bin"))
        async with local_media(s, ref_a) as held:
            assert held.stat().st_size == 6000 and DISK.used == 6000
            with pytest.raises(ChannelError) as info:
                async with local_media(s, ref_b):
                    pass
            assert info.value.code == ErrorCode.UNAVAILABLE and "disk budget for media downloads (10000 bytes) is in use" in info.value.message
        assert DISK.used == 0
        async with local_media(s, ref_b) as path:  # room again once the first is removed
            assert path.read_bytes() == b"b" * 6000
        small = settings(media_url_disk_budget=5000)
        with pytest.raises(ChannelError) as info:
            async with local_media(small, media_ref(small, None, f"{base}/a.bin", "audio_url")):
                pass
        assert info.value.code == ErrorCode.BAD_SOURCE and "over the server's disk budget for downloads (5000 bytes)" in info.value.message
    assert DISK.used == 0 and _downloads() == before


@contextmanager
def stalling_server(sent: int, declared: int) -> Iterator[tuple[str, threading.Event]]:
    """An HTTP server that sends `sent` of `declared` bytes of body, then waits without closing; yields its URL and a stop event."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n".encode() + b"x" * sent)
            stop.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.wav", stop
    finally:
        stop.set()
        thread.join()
        listener.close()


async def test_a_cancelled_download_leaves_no_file_and_gives_its_budget_back() -> None:
    s = settings(media_url_disk_budget=1_000_000, media_url_timeout=60)
    before = _downloads()
    with stalling_server(sent=3000, declared=200_000) as (url, _):
        task = asyncio.create_task(_hold(s, url))
        for _ in range(500):
            if DISK.used:
                break
            await asyncio.sleep(0.01)
        assert DISK.used == 200_000, "the declared length is counted before the body is written"
        assert len(_downloads() - before) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert DISK.used == 0 and _downloads() == before


async def _hold(s: Settings, url: str) -> None:
    async with local_media(s, media_ref(s, None, url, "audio_url")):
        await asyncio.sleep(60)
