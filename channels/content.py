"""Stream content held compactly and once: inline texts and record sets, shared by every stream that sends the same.

A text is one `str`; a record set is one `bytes` of the records as NDJSON (as they are sent) with an
array of offsets, instead of a dict per record. Each is interned in a weak table keyed by its content,
so identical texts or record sets sent by many clients are held once, for as long as a stream uses them.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from array import array
from collections.abc import Iterable
from typing import Any

import orjson


class Text:
    """One text, shared by the streams that send it."""

    __slots__ = ("__weakref__", "value")

    def __init__(self, value: str) -> None:
        self.value = value


class Records:
    """Records encoded once as NDJSON in one bytes object, with the offset where each starts (and the end)."""

    __slots__ = ("__weakref__", "blob", "columns", "offsets")

    def __init__(self, blob: bytes, offsets: array[int], columns: tuple[str, ...]) -> None:
        self.blob = blob
        self.offsets = offsets
        self.columns = columns  # the keys of the object records, in first-seen order

    @classmethod
    def encode(cls, records: Iterable[Any]) -> Records:
        """Encode records (JSON values) compactly; the keys of those that are objects become `columns`."""
        records = records if isinstance(records, list) else list(records)
        # Comprehensions and C-level passes, not a loop of statements: a large inline set is encoded per subscribe.
        parts = [orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE) for record in records]
        offsets = array("Q", [0])
        offsets.extend(itertools.accumulate(map(len, parts)))
        columns = dict.fromkeys(itertools.chain.from_iterable(record for record in records if isinstance(record, dict)))
        return cls(b"".join(parts), offsets, tuple(columns))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ndjson(self, start: int, stop: int) -> str:
        """Records `start` to `stop` (exclusive) as NDJSON lines."""
        return self.blob[self.offsets[start] : self.offsets[stop]].decode()

    def json_items(self, start: int, stop: int) -> str:
        """Records `start` to `stop` as comma-separated JSON values (a JSON array's items, without the brackets)."""
        # orjson never writes a raw newline inside a value: the only ones are the line ends.
        return self.blob[self.offsets[start] : self.offsets[stop] - 1].replace(b"\n", b",").decode()

    def record(self, index: int) -> Any:
        """Record `index`, decoded."""
        return orjson.loads(self.blob[self.offsets[index] : self.offsets[index + 1]])


_texts: weakref.WeakValueDictionary[str, Text] = weakref.WeakValueDictionary()
_records: weakref.WeakValueDictionary[bytes, Records] = weakref.WeakValueDictionary()
_lock = threading.Lock()  # params may be parsed in a worker thread (large subscribes)


def shared_text(value: str) -> Text:
    """The one `Text` holding `value` (made now if no stream holds it)."""
    with _lock:
        text = _texts.get(value)
        if text is None:
            text = _texts[value] = Text(value)
        return text


def shared_records(records: Iterable[Any]) -> Records:
    """The one `Records` holding these records (encoded now; the encoding is dropped for the held one if some stream holds it)."""
    fresh = Records.encode(records)
    with _lock:
        held = _records.get(fresh.blob)
        if held is None:
            held = _records[fresh.blob] = fresh
        return held


def held() -> tuple[int, int]:
    """How many distinct texts and record sets are held now."""
    return len(_texts), len(_records)
