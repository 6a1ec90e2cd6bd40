"""A blocking facade for scripts: the asyncio client runs on a private event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from streamplex.client import Chunk, Client

T = TypeVar("T")


class SyncClient:
    """`with connect_sync(url, api_key=...) as client: for chunk in client.subscribe("text", text="hi"): ...`."""

    def __init__(self, url: str, api_key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamplex-sync", daemon=True)
        self._thread.start()
        try:
            self._client: Client = self._run(self._make(url, api_key, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(url: str, api_key: str | None, options: dict[str, Any]) -> Client:
        return await Client(url, api_key, **options).connect()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def ready(self) -> dict[str, Any]:
        """The server's `ready` frame."""
        return self._client.ready

    def subscribe(self, channel: str, /, **params: Any) -> Iterator[Chunk]:
        """Yield the stream's chunks; leaving the loop (or closing the iterator) unsubscribes."""
        chunks = self._client.subscribe(channel, **params).__aiter__()
        try:
            while True:
                try:
                    yield self._run(chunks.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            self._run(chunks.aclose())  # type: ignore[attr-defined]

    def push(self, stream_id: str, data: Any = None, *, end: bool = False) -> None:
        """Push input to an open stream (bytes as a binary frame)."""
        self._run(self._client.push(stream_id, data, end=end))

    def ping(self, timeout: float = 10.0) -> float:
        """Round-trip seconds of a protocol ping."""
        return self._run(self._client.ping(timeout))

    def close(self) -> None:
        """Close the connection and stop the background loop."""
        if self._loop.is_running():
            try:
                self._run(self._client.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_sync(url: str, api_key: str | None = None, **options: Any) -> SyncClient:
    """A connected blocking client."""
    return SyncClient(url, api_key, **options)
