"""The data channel: each format's concatenated chunks parse back to the records."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from streamplex.channels.data import DataChannel
from streamplex.server.channel import ChannelError
from streamplex.server.protocol import ErrorCode
from tests.channels.helpers import make, run, write

RECORDS = [{"id": i, "name": f'n "{i}", <x> & y\nz', "tags": ["a", i], "ok": i % 2 == 0, "none": None} for i in range(25)]


async def whole(params: dict, **settings) -> str:
    return "".join(await run(make(DataChannel, **settings), params))


async def test_json_and_ndjson_roundtrip() -> None:
    assert json.loads(await whole({"records": RECORDS, "format": "json", "chunk_size": 4})) == RECORDS
    assert [json.loads(line) for line in (await whole({"records": RECORDS, "chunk_size": 7})).splitlines()] == RECORDS
    assert json.loads(await whole({"records": [], "format": "json"})) == []
    assert json.loads(await whole({"data": {"a": 1}, "format": "json"})) == [{"a": 1}]


async def test_csv_is_rfc4180() -> None:
    text = await whole({"records": RECORDS, "format": "csv", "chunk_size": 3})
    assert text.count("\r\n") >= 26
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["name"] for r in rows] == [r["name"] for r in RECORDS]
    assert rows[1]["tags"] == '["a",1]' and rows[0]["ok"] == "true" and rows[0]["none"] == ""


async def test_xml_is_well_formed_and_escaped() -> None:
    text = await whole({"records": [*RECORDS, {"bad key": "v", "xmlns": 1}], "format": "xml", "chunk_size": 5})
    root = ET.fromstring(text)
    assert len(root) == 26 and root[3].find("name").text == RECORDS[3]["name"]
    assert root[25][0].get("name") == "bad key"
    with pytest.raises(ChannelError) as info:
        await whole({"records": [{"a": "\x00"}], "format": "xml"})
    assert info.value.code == ErrorCode.BAD_SOURCE


async def test_datasets_csv_and_jsonl(tmp_path: Path) -> None:
    write(tmp_path, "people.csv", 'name,city\r\nAda,"London, UK"\r\nLin,Paris\r\n')
    write(tmp_path, "rows.jsonl", '{"a": 1}\n\n{"a": 2, "b": 3}\n')
    write(tmp_path, "broken.jsonl", '{"a": 1}\n{oops\n')
    assert json.loads(await whole({"dataset": "people.csv", "format": "json"}, data_dir=tmp_path)) == [
        {"name": "Ada", "city": "London, UK"},
        {"name": "Lin", "city": "Paris"},
    ]
    with pytest.raises(ChannelError, match="not among the CSV columns"):
        await whole({"dataset": "rows.jsonl", "format": "csv"}, data_dir=tmp_path)
    assert await whole({"dataset": "rows.jsonl", "format": "csv", "columns": ["a", "b"]}, data_dir=tmp_path) == "a,b\r\n1,\r\n2,3\r\n"
    with pytest.raises(ChannelError, match="line 2"):
        await whole({"dataset": "broken.jsonl"}, data_dir=tmp_path)


async def test_param_errors() -> None:
    channel = make(DataChannel)
    for params in ({}, {"records": [1], "data": {}}, {"records": [1], "format": "csv"}, {"records": [], "format": "yaml"}, {"dataset": "../x.csv"}):
        with pytest.raises(ChannelError) as info:
            channel.parse(params)
        assert info.value.code in (ErrorCode.INVALID_PARAMS, ErrorCode.FORBIDDEN)
