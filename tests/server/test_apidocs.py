"""The OpenAPI and AsyncAPI documents of the live server; schemathesis fuzzes the HTTP routes from the OpenAPI one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.serverproc import ROOT, ServerProc, start_server

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    # No per-address limit (the fuzzer sends hundreds of requests) and a 1 s cap, so endless streams (metrics, logs) end.
    srv = start_server(tmp_path_factory.mktemp("fuzz"), http_rate_limit=0, http_stream_timeout=1)
    yield srv
    srv.stop()


def test_documents_cover_every_channel(server: ServerProc) -> None:
    channels = [c["name"] for c in orjson.loads(server.get("/channels")[1])["channels"]]
    openapi = orjson.loads(server.get("/openapi.json")[1])
    assert openapi["openapi"].startswith("3.1") and {f"/api/v1/stream/{name}" for name in channels} == set(openapi["paths"])
    assert "get" in openapi["paths"]["/api/v1/stream/metrics"]
    assert openapi["paths"]["/api/v1/stream/text"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TextParams"
    }
    assert openapi["components"]["schemas"]["TextParams"]["properties"]["unit"]["enum"] == ["chars", "words", "sentences", "bytes"]
    asyncapi = orjson.loads(server.get("/asyncapi.json")[1])
    assert asyncapi["asyncapi"] == "3.0.0" and asyncapi["channels"]["ws"]["address"] == "/ws"
    messages = asyncapi["components"]["messages"]
    assert {f"client.subscribe_{name}" for name in channels} | {"client.auth", "client.push", "server.chunk", "server.end"} <= set(messages)
    assert messages["client.subscribe_data"]["payload"]["properties"]["params"] == {"$ref": "#/components/schemas/DataParams"}


def test_schemathesis_against_the_live_server(fuzz_server: ServerProc, tmp_path: Path) -> None:
    table = orjson.loads(fuzz_server.get("/channels")[1])["channels"]
    assert {"text", "data", "metrics", "logs"} <= {c["name"] for c in table if c["status"] == "available"}
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{fuzz_server.http}/openapi.json",
        "--header",
        f"X-API-Key: {fuzz_server.key}",
        # positive_data_acceptance: channels validate beyond what a JSON Schema says (exactly one source, files that
        # exist, server minimums), so schema-valid data may be refused with 400.
        # negative_data_rejection: params are validated in pydantic's lax mode (`"follow": 0` is taken as false).
        # not_a_server_error: replaced by the hook's no_server_failure, which accepts 503 (a channel without its model).
        "--exclude-checks",
        "positive_data_acceptance,negative_data_rejection,not_a_server_error",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "8",
        "--seed",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--generation-database",
        "none",
        "--report-junit-path",
        str(tmp_path / "junit.xml"),
    ]
    env = os.environ | {"SCHEMATHESIS_HOOKS": "tests.server.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
