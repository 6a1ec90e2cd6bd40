"""Machine-readable API documents built from the channels' param models: OpenAPI 3.1 of the HTTP routes, AsyncAPI 3.0 of `/ws`."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from streamplex.server.channel import Channel
from streamplex.server.http_stream import NDJSON, PREFIX, SSE
from streamplex.server.protocol import CLIENT_OPS, PROTOCOL_VERSION, CloseCode, EndReason, ErrorCode

TITLE = "streamplex"
VERSION = "0.1.0"


def _param_schemas(channels: dict[str, Channel], ref_template: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each channel's params as a `$ref`, and the shared definitions they point to."""
    refs, defs = models_json_schema([(c.Params, "validation") for c in channels.values()], ref_template=ref_template)
    return {name: refs[(c.Params, "validation")] for name, c in channels.items()}, defs.get("$defs", {})


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": [*map(str, ErrorCode), "unauthorized"]},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}, "type": {"type": "string"}}},
                },
            },
        }
    },
}

_LINE = {
    "description": "One line per chunk, then one `end` line.",
    "oneOf": [
        {
            "type": "object",
            "required": ["seq"],
            "properties": {"seq": {"type": "integer"}, "data": {}, "binary": {"type": "string", "contentEncoding": "base64"}, "dropped": {"type": "integer"}},
        },
        {
            "type": "object",
            "required": ["end"],
            "properties": {
                "end": {"type": "string", "enum": ["complete", "error", "shutdown", "timeout"]},
                "error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
            },
        },
    ],
}


def _error_responses(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "Invalid params or body (`invalid_params`, `bad_request`)",
        401: "No API key (`X-API-Key` header)",
        403: "Wrong API key, or the key may not use this channel (an admin channel needs a key scoped `admin`)",
        404: "No such channel",
        413: "A JSON body over `max_frame_bytes`",
        415: "A raw body for a channel that takes no pushed input",
        422: "A media stream ended before any media (`bad_source`)",
        429: "Over the per-address request limit, too many failed authentications, or over the API key's limits (open HTTP streams, connections, op rate); see Retry-After",
        503: "The channel is loading or unavailable, or the server is starting or draining",
    }
    out = {}
    for code in codes:
        headers = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}} if code in (429, 503) else None
        out[str(code)] = {"description": meaning[code], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}} | (
            {"headers": headers} if headers else {}
        )
    return out


def openapi(channels: dict[str, Channel]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `POST /api/v1/stream/{channel}` (every channel) and `GET /api/v1/stream/metrics`."""
    refs, defs = _param_schemas(channels, "#/components/schemas/{model}")
    paths: dict[str, Any] = {}
    for name, channel in channels.items():
        content: dict[str, Any] = {
            NDJSON: {"schema": {"$ref": "#/components/schemas/StreamLine"}},
            SSE: {"schema": {"type": "string", "description": "`event: chunk` (with `id: <seq>`) and `event: end` events whose data are the NDJSON lines."}},
        }
        if channel.media:
            content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
            content["audio/wav"] = {"schema": {"type": "string", "format": "binary"}}
            content["multipart/x-mixed-replace"] = {"schema": {"type": "string", "format": "binary", "description": "JPEG frames (video)"}}
        body: dict[str, Any] = {"application/json": {"schema": refs[name]}}
        if channel.accepts_push:
            body["application/octet-stream"] = {
                "schema": {"type": "string", "format": "binary", "description": "Raw input pushed to the stream; the params then come as query parameters."}
            }
        operation = {
            "operationId": f"stream_{name}",
            "summary": channel.summary,
            "tags": ["streams"],
            "requestBody": {"required": False, "content": body},
            "responses": {
                "200": {
                    "description": f"The {name} stream ({'raw bytes by default; ' if channel.media else ''}NDJSON, or SSE with Accept: text/event-stream)",
                    "content": content,
                }
            }
            | _error_responses(400, 401, 403, 413, 415, 422, 429, 503),
        }
        paths[f"{PREFIX}/{name}"] = {"post": operation}
    if "metrics" in channels:
        schema = channels["metrics"].Params.model_json_schema()
        parameters = [
            {"name": key, "in": "query", "required": False, "style": "form", "explode": True, "schema": {k: v for k, v in prop.items() if k != "title"}}
            for key, prop in schema.get("properties", {}).items()
        ]
        paths[f"{PREFIX}/metrics"]["get"] = {
            "operationId": "stream_metrics_get",
            "summary": "The metrics stream, params as query parameters.",
            "tags": ["streams"],
            "parameters": parameters,
            "responses": {
                "200": {
                    "description": "The metrics stream",
                    "content": {NDJSON: {"schema": {"$ref": "#/components/schemas/StreamLine"}}, SSE: {"schema": {"type": "string"}}},
                }
            }
            | _error_responses(400, 401, 403, 429, 503),
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "HTTP streaming routes: each streams one channel, with the same code as the WebSocket protocol (see /asyncapi.json).",
        },
        "paths": paths,
        "components": {
            "schemas": defs | {"Error": _ERROR, "StreamLine": _LINE},
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"apiKey": []}],
    }


def _op_schema(model: Any) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    return schema


def _message(name: str, summary: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "summary": summary, "contentType": "application/json", "payload": payload}


def asyncapi(channels: dict[str, Channel]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the WebSocket protocol at `/ws`, with each channel's subscribe params."""
    refs, defs = _param_schemas(channels, "#/components/schemas/{model}")
    client_ops = {name: _message(name, f"client op `{name}`", _op_schema(model)) for name, model in CLIENT_OPS.items()}
    for name in channels:
        client_ops[f"subscribe_{name}"] = _message(
            f"subscribe_{name}",
            f"subscribe to `{name}`: {channels[name].summary}",
            {
                "type": "object",
                "required": ["op", "id", "channel"],
                "properties": {"op": {"const": "subscribe"}, "id": {"type": "string", "minLength": 1}, "channel": {"const": name}, "params": refs[name]},
                "additionalProperties": False,
            },
        )
    string = {"type": "string"}
    server_ops = {
        "ready": _message(
            "ready",
            "after authentication",
            {
                "type": "object",
                "properties": {"op": {"const": "ready"}, "session": string, "node": string, "channels": {"type": "array"}, "limits": {"type": "object"}},
            },
        ),
        "subscribed": _message(
            "subscribed",
            "the stream is open",
            {"type": "object", "properties": {"op": {"const": "subscribed"}, "id": string, "channel": string, "ack": {"type": "boolean"}}},
        ),
        "ack": _message(
            "ack",
            "the stream's pushed input before byte `input` is no longer needed: the client may drop it",
            {"type": "object", "properties": {"op": {"const": "ack"}, "id": string, "input": {"type": "integer", "minimum": 0}}},
        ),
        "chunk": _message(
            "chunk",
            "one piece of a stream",
            {"type": "object", "properties": {"op": {"const": "chunk"}, "id": string, "seq": {"type": "integer"}, "data": {}, "dropped": {"type": "integer"}}},
        ),
        "end": _message(
            "end",
            "the stream is over",
            {
                "type": "object",
                "properties": {
                    "op": {"const": "end"},
                    "id": string,
                    "reason": {"enum": list(map(str, EndReason))},
                    "error": {"type": "object", "properties": {"code": {"enum": list(map(str, ErrorCode))}, "message": string}},
                },
            },
        ),
        "error": _message(
            "error",
            "a client frame was refused; the connection lives on",
            {
                "type": "object",
                "properties": {
                    "op": {"const": "error"},
                    "id": {"type": ["string", "null"]},
                    "code": {"enum": list(map(str, ErrorCode))},
                    "message": string,
                    "details": {"type": "array"},
                    "retry_after": {"type": "number"},
                },
            },
        ),
        "pong": _message("pong", "reply to ping", {"type": "object", "properties": {"op": {"const": "pong"}}}),
        "binary": {
            "name": "binary",
            "summary": "server binary frame: u8 n, n bytes of stream id (UTF-8), u32 seq big-endian, payload",
            "contentType": "application/octet-stream",
            "payload": {"type": "string", "format": "binary"},
        },
    }
    client_ops["binary_push"] = {
        "name": "binary_push",
        "summary": "client binary frame: u8 n, n bytes of stream id (UTF-8), payload (pushed media)",
        "contentType": "application/octet-stream",
        "payload": {"type": "string", "format": "binary"},
    }
    messages = {f"client.{k}": v for k, v in client_ops.items()} | {f"server.{k}": v for k, v in server_ops.items()}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": f"Protocol v{PROTOCOL_VERSION}: one WebSocket per client, many streams multiplexed on it (docs/protocol.md). "
            f"Close codes: {', '.join(f'{int(c)} {c.name.lower()}' for c in CloseCode)}.",
        },
        "servers": {"local": {"host": "127.0.0.1:8000", "protocol": "ws", "security": [{"$ref": "#/components/securitySchemes/apiKey"}]}},
        "channels": {"ws": {"address": "/ws", "messages": {k: {"$ref": f"#/components/messages/{k}"} for k in messages}}},
        "operations": {
            "send": {"action": "send", "channel": {"$ref": "#/channels/ws"}, "messages": [{"$ref": f"#/channels/ws/messages/client.{k}"} for k in client_ops]},
            "receive": {
                "action": "receive",
                "channel": {"$ref": "#/channels/ws"},
                "messages": [{"$ref": f"#/channels/ws/messages/server.{k}"} for k in server_ops],
            },
        },
        "components": {
            "messages": messages,
            "schemas": defs,
            "securitySchemes": {
                "apiKey": {
                    "type": "httpApiKey",
                    "name": "X-API-Key",
                    "in": "header",
                    "description": 'Or `Authorization: Bearer KEY`, or a first frame {"op":"auth","api_key":KEY}.',
                }
            },
        },
    }
