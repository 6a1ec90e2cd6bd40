"""Hypothesis fuzzing of the protocol codec: valid, near-valid and garbage frames, text and binary.

Every input either decodes to the op it describes or raises ProtocolError with a documented code,
whose `error` frame serialises; nothing else escapes the codec.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplex.server.protocol import (
    CLIENT_OPS,
    MAX_ID_BYTES,
    Auth,
    ErrorCode,
    Ping,
    ProtocolError,
    Push,
    Subscribe,
    Unsubscribe,
    decode_binary,
    decode_text,
    encode,
    encode_binary,
    parse_server_binary,
)

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)
STREAM_IDS = st.text(min_size=1, max_size=MAX_ID_BYTES).filter(lambda s: len(s.encode("utf-8")) <= MAX_ID_BYTES)
CHANNELS = st.sampled_from(["text", "data", "logs", "metrics", "chat"]) | st.text(max_size=64)


def valid_frames() -> st.SearchStrategy[dict[str, Any]]:
    """Frames protocol v1 accepts, one strategy per op."""
    return st.one_of(
        st.builds(lambda k: {"op": "auth", "api_key": k}, st.text(max_size=1024)),
        st.builds(
            lambda i, c, p: {"op": "subscribe", "id": i, "channel": c, "params": p},
            STREAM_IDS,
            CHANNELS,
            st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5),
        ),
        st.builds(lambda i, c: {"op": "subscribe", "id": i, "channel": c}, STREAM_IDS, CHANNELS),
        st.builds(lambda i, d, e: {"op": "push", "id": i, "data": d, "end": e}, STREAM_IDS, JSON_VALUES, st.booleans()),
        st.builds(lambda i: {"op": "unsubscribe", "id": i}, STREAM_IDS),
        st.just({"op": "ping"}),
    )


def truncations(text: str) -> st.SearchStrategy[str]:
    """Every prefix of `text` (near-valid frames cut short)."""
    return st.integers(0, len(text)).map(lambda n: text[:n])


def expect_error(text: str) -> ProtocolError:
    """Decode `text`, which must fail; check the error against the documented set and return it."""
    try:
        decode_text(text)
    except ProtocolError as exc:
        check_error(exc)
        return exc
    raise AssertionError(f"accepted {text!r}")


def check_error(exc: ProtocolError) -> None:
    assert exc.code in set(ErrorCode)
    frame = orjson.loads(encode(exc.frame()))
    assert frame["op"] == "error" and frame["code"] == str(exc.code) and isinstance(frame["message"], str) and frame["message"]
    assert frame["id"] is None or isinstance(frame["id"], str)
    for detail in frame.get("details") or []:
        assert set(detail) == {"field", "message", "type"}


@given(valid_frames())
def test_valid_frames_decode_to_their_op(frame: dict[str, Any]) -> None:
    op = decode_text(orjson.dumps(frame).decode())
    assert isinstance(op, CLIENT_OPS[frame["op"]])
    match op:
        case Subscribe():
            assert (op.id, op.channel, op.params) == (frame["id"], frame["channel"], frame.get("params", {}))
        case Push():
            assert (op.id, op.data, op.end) == (frame["id"], frame["data"], frame["end"])
        case Auth():
            assert op.api_key == frame["api_key"]
        case Unsubscribe():
            assert op.id == frame["id"]
        case _:
            assert isinstance(op, Ping)


@given(valid_frames(), st.text(min_size=1, max_size=10).filter(lambda k: k not in {"op", "id", "channel", "params", "data", "end", "api_key"}), JSON_VALUES)
def test_unknown_field_is_bad_request(frame: dict[str, Any], key: str, value: Any) -> None:
    exc = expect_error(orjson.dumps(frame | {key: value}).decode())
    assert exc.code == ErrorCode.BAD_REQUEST and exc.details


@given(valid_frames().filter(lambda f: len(f) > 1), st.data())
def test_missing_required_field_is_bad_request(frame: dict[str, Any], data: st.DataObject) -> None:
    required = {"auth": ["api_key"], "subscribe": ["id", "channel"], "unsubscribe": ["id"], "push": ["id"]}[frame["op"]]
    drop = data.draw(st.sampled_from(required))
    exc = expect_error(orjson.dumps({k: v for k, v in frame.items() if k != drop}).decode())
    assert exc.code == ErrorCode.BAD_REQUEST and any(d["field"] == drop for d in exc.details or [])


WRONG_TYPES = {
    "api_key": st.integers(-(2**63), 2**63 - 1) | st.none() | st.lists(st.text(), max_size=2),
    "id": st.integers(-(2**63), 2**63 - 1) | st.none() | st.just("") | st.booleans(),
    "channel": st.integers(-(2**63), 2**63 - 1) | st.none() | st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2),
    "params": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3) | st.text(max_size=5) | st.integers(-(2**63), 2**63 - 1),
    "end": st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | st.none(),
}


@given(valid_frames().filter(lambda f: len(f) > 1), st.data())
def test_mistyped_field_is_bad_request_naming_it(frame: dict[str, Any], data: st.DataObject) -> None:
    field = data.draw(st.sampled_from([k for k in frame if k in WRONG_TYPES]))
    exc = expect_error(orjson.dumps(frame | {field: data.draw(WRONG_TYPES[field])}).decode())
    assert exc.code == ErrorCode.BAD_REQUEST and any(d["field"].split(".")[0] == field for d in exc.details or [])


@given(st.text(max_size=80).filter(lambda op: op not in CLIENT_OPS), st.dictionaries(st.sampled_from(["id", "channel", "data"]), JSON_VALUES, max_size=3))
def test_unknown_op_is_unknown_op_and_keeps_a_string_id(op: str, rest: dict[str, Any]) -> None:
    exc = expect_error(orjson.dumps({"op": op, **rest}).decode())
    assert exc.code == ErrorCode.UNKNOWN_OP
    assert exc.id == (rest["id"] if isinstance(rest.get("id"), str) else None)


@given(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object_is_bad_request(value: Any) -> None:
    assert expect_error(orjson.dumps(value).decode()).code == ErrorCode.BAD_REQUEST


@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).filter(lambda d: not isinstance(d.get("op"), str)))
def test_object_without_string_op_is_bad_request(obj: dict[str, Any]) -> None:
    assert expect_error(orjson.dumps(obj).decode()).code == ErrorCode.BAD_REQUEST


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        valid_frames().map(lambda f: orjson.dumps(f).decode()).flatmap(truncations),
    )
)
def test_garbage_and_truncated_text_decodes_or_raises_a_documented_error(text: str) -> None:
    try:
        op = decode_text(text)
    except ProtocolError as exc:
        check_error(exc)
    else:
        assert type(op) in CLIENT_OPS.values()


@given(STREAM_IDS.filter(lambda s: len(s.encode()) <= 255), st.binary(max_size=300))
def test_valid_binary_frames_split_into_id_and_payload(stream_id: str, payload: bytes) -> None:
    raw = stream_id.encode("utf-8")
    assert decode_binary(bytes((len(raw),)) + raw + payload) == (stream_id, payload)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_binary_decodes_or_raises_bad_request(data: bytes) -> None:
    try:
        stream_id, payload = decode_binary(data)
    except ProtocolError as exc:
        check_error(exc)
        assert exc.code == ErrorCode.BAD_REQUEST
    else:
        assert data[0] == len(stream_id.encode("utf-8")) >= 1 and data.endswith(payload)


@given(STREAM_IDS.filter(lambda s: len(s.encode()) <= 255), st.integers(0, 2**40), st.binary(max_size=200))
def test_server_binary_frames_roundtrip(stream_id: str, seq: int, payload: bytes) -> None:
    assert parse_server_binary(encode_binary(stream_id, seq, payload)) == (stream_id, seq % 2**32, payload)
