"""Both SDKs know every error code of the server's table (server/protocol.py's ErrorCode)."""

from __future__ import annotations

import re

import streamplex
from streamplex.errors import ERRORS, protocol_error
from streamplex.server.protocol import ErrorCode
from tests.serverproc import ROOT


def test_python_sdk_has_a_class_per_code() -> None:
    assert set(ERRORS) == {str(code) for code in ErrorCode}
    for code, cls in ERRORS.items():
        error = protocol_error({"code": code, "message": "m", "id": "s", "retry_after": 1.5})
        assert type(error) is cls and error.code == code and error.retry_after == 1.5
        assert getattr(streamplex, cls.__name__) is cls, f"{cls.__name__} is not exported"


def test_streamplex_js_lists_every_code() -> None:
    source = (ROOT / "client_js" / "streamplex.js").read_text()
    listed = re.search(r"export const ERROR_CODES = Object\.freeze\((\[.*?\])\);", source, re.S)
    assert listed is not None
    assert set(re.findall(r'"([a-z_]+)"', listed.group(1))) == {str(code) for code in ErrorCode}
