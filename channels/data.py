"""data: records as NDJSON, JSON, CSV or XML; the chunks concatenate to one valid document. Constant memory."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, PrivateAttr, model_validator

from streamplex.channels.content import Records, shared_records
from streamplex.channels.files import check_whole, resolve_inside
from streamplex.channels.pacing import Pacer
from streamplex.server.channel import Channel, ChannelError, ParamsModel, StreamContext
from streamplex.server.protocol import ErrorCode

READ_BATCH = 200  # records a dataset stream holds parsed at a time
_XML_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class DataParams(ParamsModel):
    records: list[Any] | None = Field(None, max_length=100_000, description="Inline records (objects for csv and xml).")
    data: dict[str, Any] | None = Field(None, description="One inline record.")
    dataset: str | None = Field(None, max_length=1024, description="A .csv or .jsonl file under the server's data folder.")
    format: Literal["ndjson", "json", "csv", "xml"] = Field("ndjson", description="Output format.")
    chunk_size: int = Field(100, ge=1, le=10000, description="Records per chunk.")
    columns: list[str] | None = Field(None, min_length=1, description="CSV columns (default: the CSV header, or the keys of the records).")
    interval_ms: int = Field(0, ge=0, le=60000, description="Pause between chunks; 0 streams as fast as the client reads.")
    _inline: Records | None = PrivateAttr(None)  # the inline records, encoded once and shared (`records` and `data` are then None)
    _not_object: int | None = PrivateAttr(None)  # the index of the first inline record that is not an object

    @model_validator(mode="after")
    def _one_source(self) -> DataParams:
        if sum(x is not None for x in (self.records, self.data, self.dataset)) != 1:
            raise ValueError("give exactly one of `records`, `data` or `dataset`")
        if self.dataset is None:
            records = self.records if self.records is not None else [self.data]
            self._not_object = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
            self._inline = shared_records(records)
            self.records = self.data = None
        return self


class RecordError(ChannelError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_SOURCE, message)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value).decode()


def _xml_text(value: str, where: str) -> str:
    if _XML_ILLEGAL.search(value):
        raise RecordError(f"{where} holds a character XML 1.0 cannot represent; use another format")
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _xml_value(tag: str, value: Any, where: str) -> str:
    if _XML_NAME.match(tag) and not tag.lower().startswith("xml"):
        open_tag, close_tag = f"<{tag}", f"</{tag}>"
    else:
        attr = _xml_text(tag, where).replace('"', "&quot;")
        open_tag, close_tag = f'<field name="{attr}"', "</field>"
    if value is None:
        return open_tag + "/>"
    if isinstance(value, dict):
        inner = "".join(_xml_value(str(k), v, f"{where}.{k}") for k, v in value.items())
    elif isinstance(value, list):
        inner = "".join(_xml_value("item", v, f"{where}[{i}]") for i, v in enumerate(value))
    else:
        inner = _xml_text(_cell(value), where)
    return f"{open_tag}>{inner}{close_tag}"


class Writer:
    """Turns records into pieces of one document: `head`, one piece per record, `tail`."""

    def __init__(self, fmt: str, columns: list[str] | None) -> None:
        self.fmt = fmt
        self.columns = columns
        self.count = 0

    def head(self) -> str:
        if self.fmt == "json":
            return "["
        if self.fmt == "xml":
            return '<?xml version="1.0" encoding="UTF-8"?>\n<records>'
        if self.fmt == "csv" and self.columns:
            return self._csv_row(self.columns)
        return ""

    def tail(self) -> str:
        return {"json": "]", "xml": "</records>\n"}.get(self.fmt, "")

    def record(self, record: Any) -> str:
        n = self.count
        self.count += 1
        if self.fmt == "ndjson":
            return orjson.dumps(record).decode() + "\n"
        if self.fmt == "json":
            return ("," if n else "") + orjson.dumps(record).decode()
        if not isinstance(record, dict):
            raise RecordError(f"record {n} is not an object; {self.fmt} needs objects")
        if self.fmt == "xml":
            return "<record>" + "".join(_xml_value(str(k), v, f"record {n} field {k!r}") for k, v in record.items()) + "</record>"
        assert self.columns is not None
        extra = record.keys() - set(self.columns)
        if extra:
            raise RecordError(f"record {n} has fields not among the CSV columns: {sorted(extra)[:5]}; pass `columns`")
        return self._csv_row([_cell(record.get(c)) for c in self.columns])

    @staticmethod
    def _csv_row(cells: list[str]) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerow(cells)
        return out.getvalue()


def _read_batch(rows: Iterator[Any], n: int) -> list[Any]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == n:
            break
    return batch


def _csv_rows(reader: csv.DictReader[str], name: str) -> Iterator[dict[str, Any]]:
    for row in reader:
        if None in row:
            raise RecordError(f"{name} line {reader.line_num} has more cells than the header")
        yield row


def _jsonl_rows(handle: io.TextIOBase, name: str) -> Iterator[Any]:
    for lineno, line in enumerate(handle, 1):
        if line.strip():
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise RecordError(f"{name} line {lineno} is not valid JSON: {exc}") from None


class DataChannel(Channel):
    name = "data"
    summary = "Records as NDJSON, JSON, CSV or XML from inline records or a CSV/JSONL dataset, in constant memory."
    Params = DataParams
    restartable = True

    def check(self, params: DataParams) -> None:
        if params.dataset is not None:
            path = resolve_inside(self.settings.data_dir, params.dataset, "dataset")
            if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
                raise ChannelError(
                    ErrorCode.INVALID_PARAMS,
                    "dataset must be a .csv or .jsonl file",
                    [{"field": "dataset", "message": "unsupported file type", "type": "value_error"}],
                )
        elif params.format in ("csv", "xml") and (i := params._not_object) is not None:
            raise ChannelError(
                ErrorCode.INVALID_PARAMS,
                f"{params.format} needs objects as records",
                [{"field": f"records.{i}", "message": "not an object", "type": "dict_type"}],
            )

    async def stream(self, params: DataParams, ctx: StreamContext) -> AsyncIterator[str]:
        pace = Pacer(params.interval_ms)
        skip = ctx.start  # chunks the client has already (the stream goes on after its node died): made, not sent
        if params._inline is not None:
            async for chunk in _inline_chunks(params._inline, params, skip):
                await pace.wait()
                yield chunk
            return
        async with _records(params, self.settings.data_dir) as (columns, batches):
            writer = Writer(params.format, columns)
            pieces = [writer.head()]
            async for batch in batches:
                for record in batch:
                    pieces.append(writer.record(record))
                    if writer.count % params.chunk_size == 0:
                        if skip:
                            skip -= 1
                        else:
                            await pace.wait()
                            yield "".join(pieces)
                        pieces.clear()
            pieces.append(writer.tail())
            if any(pieces) and not skip:
                await pace.wait()
                yield "".join(pieces)


async def _inline_chunks(records: Records, params: DataParams, skip: int = 0) -> AsyncIterator[str]:
    """Inline records in chunks from the `skip`-th, cut from their shared encoding (NDJSON and JSON) or decoded one by one (CSV, XML)."""
    writer = Writer(params.format, params.columns or list(records.columns))
    head, count, size = writer.head(), len(records), params.chunk_size
    writer.count = min(count, skip * size)  # record numbers in CSV and XML errors
    for start in range(skip * size, count, size):
        stop = min(count, start + size)
        if params.format == "ndjson":
            body = records.ndjson(start, stop)
        elif params.format == "json":
            body = ("," if start else "") + records.json_items(start, stop)
        else:
            body = "".join(writer.record(records.record(i)) for i in range(start, stop))
        last = stop == count and stop % size != 0  # a full last chunk leaves the tail to a chunk of its own
        yield (head if start == 0 else "") + body + (writer.tail() if last else "")
    rest = (head if count == 0 else "") + writer.tail()
    if count % size == 0 and rest and skip <= count // size:
        yield rest


@contextlib.asynccontextmanager
async def _records(params: DataParams, data_dir: Path) -> AsyncIterator[tuple[list[str], AsyncIterator[list[Any]]]]:
    """The CSV columns to use and the records in batches, from a dataset file."""
    assert params.dataset is not None, "params without inline records name a dataset (DataParams' validator)"
    path = resolve_inside(data_dir, params.dataset, "dataset")
    try:
        handle = await asyncio.to_thread(open, path, encoding="utf-8", newline="")
    except OSError as exc:
        raise ChannelError(ErrorCode.BAD_SOURCE, f"could not open {path.name}: {exc.strerror}") from None
    try:
        size = os.fstat(handle.fileno()).st_size
        first: list[Any] = []
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            header = await asyncio.to_thread(lambda: reader.fieldnames)
            rows: Iterator[Any] = _csv_rows(reader, path.name)
            columns = params.columns or list(header or [])
        else:
            rows = _jsonl_rows(handle, path.name)
            first = await _read(rows, path.name)
            columns = params.columns or (list(first[0]) if first and isinstance(first[0], dict) else [])
        yield columns, _dataset_batches(first, rows, path.name, lambda: check_whole(handle, size, path.name))
    finally:
        await asyncio.to_thread(handle.close)


async def _read(rows: Iterator[Any], name: str) -> list[Any]:
    try:
        return await asyncio.to_thread(_read_batch, rows, READ_BATCH)
    except UnicodeDecodeError:
        raise ChannelError(ErrorCode.BAD_SOURCE, f"{name} is not UTF-8") from None
    except csv.Error as exc:
        raise ChannelError(ErrorCode.BAD_SOURCE, f"{name}: {exc}") from None


async def _dataset_batches(first: list[Any], rows: Iterator[Any], name: str, check_whole: Callable[[], None]) -> AsyncIterator[list[Any]]:
    batch = first or await _read(rows, name)
    while batch:
        yield batch
        batch = await _read(rows, name)
    check_whole()
