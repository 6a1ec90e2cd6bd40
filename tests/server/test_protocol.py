"""The protocol codec without sockets, including hypothesis-generated garbage."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplex.server.protocol import (
    Auth,
    ErrorCode,
    ProtocolError,
    Push,
    Subscribe,
    decode_binary,
    decode_text,
    encode_binary,
    frame_id,
    parse_server_binary,
    subscribe_id,
)


def test_decodes_each_op() -> None:
    assert decode_text('{"op":"auth","api_key":"k"}') == Auth(op="auth", api_key="k")
    sub = decode_text('{"op":"subscribe","id":"s1","channel":"text","params":{"text":"x"}}')
    assert isinstance(sub, Subscribe) and sub.params == {"text": "x"}
    push = decode_text('{"op":"push","id":"s1","end":true}')
    assert isinstance(push, Push) and push.end and push.data is None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", ErrorCode.BAD_REQUEST),
        ("3", ErrorCode.BAD_REQUEST),
        ('{"op":"nope","id":"x"}', ErrorCode.UNKNOWN_OP),
        ('{"op":"subscribe","id":"x"}', ErrorCode.BAD_REQUEST),
        ('{"op":"subscribe","id":"x","channel":"t","extra":1}', ErrorCode.BAD_REQUEST),
        ('{"op":"ping","id":5}', ErrorCode.BAD_REQUEST),
    ],
)
def test_rejects_with_documented_codes(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_text(text)
    assert info.value.code == code
    frame = info.value.frame()
    assert frame["op"] == "error" and frame["code"] == str(code)


def test_error_keeps_the_frames_id_and_field_details() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_text('{"op":"subscribe","id":"s9","channel":7}')
    assert info.value.id == "s9" and info.value.details[0]["field"] == "channel"


def test_binary_headers_roundtrip() -> None:
    frame = encode_binary("ströme", 2**32 + 5, b"\x00\x01")
    assert frame[0] == len("ströme".encode())
    assert parse_server_binary(frame) == ("ströme", 5, b"\x00\x01")
    assert decode_binary(b"\x02s1payload") == ("s1", b"payload")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    max_leaves=20,
)


@given(
    st.one_of(
        st.text(),
        json_values.map(lambda v: orjson.dumps(v).decode()),
        st.dictionaries(st.sampled_from(["op", "id", "channel", "params", "data", "end", "api_key"]), json_values).map(lambda d: orjson.dumps(d).decode()),
    )
)
def test_any_text_decodes_or_raises_protocol_error(text: str) -> None:
    try:
        decode_text(text)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


@given(st.binary(max_size=300))
def test_any_binary_decodes_or_raises_protocol_error(data: bytes) -> None:
    try:
        stream_id, payload = decode_binary(data)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
    else:
        assert 1 + len(stream_id.encode()) + len(payload) == len(data)


def test_frame_id_names_the_stream_of_a_refused_frame() -> None:
    assert frame_id('{"op":"subscribe","id":"t1","channel":"text"}') == "t1"
    assert frame_id(b"\x02s1payload") == "s1"
    for unreadable in ('{"op":"ping"}', '{"id": 5}', "[1]", "not json", b"", b"\x09s1", b"\x02\xff\xfe!"):
        assert frame_id(unreadable) is None, unreadable


def test_subscribe_id_reads_the_id_before_the_params_only() -> None:
    big = orjson.dumps({"op": "subscribe", "id": "d", "channel": "data", "params": {"records": [{"id": "inner"}] * 3}}).decode()
    assert subscribe_id(big) == "d"
    assert subscribe_id('{"params":{"id":"x"},"op":"subscribe","id":"late"}') is None  # id after params: decode it whole
    assert subscribe_id('{"op":"push","id":"p","params":{}}') is None
    assert subscribe_id('{"op":"subscribe","id":"a\\"params\\"","channel":"c","params":{}}') == 'a"params"'
    assert subscribe_id('{"op":"subscribe","id":7,"params":{}}') is None
