"""Whole (not streamed) answers: JSON, each kind's HTTP error body, and Prometheus text. JSON goes
through `dumps` because a `usage` fault's figures may be beyond what orjson writes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web


def dumps(obj: Any) -> bytes:
    """JSON; integers beyond 64 bits (a `usage` fault's) written exactly by the stdlib."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(obj), status=status, content_type="application/json", headers=headers
    )


_LLAMACPP_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
_VLLM_TYPES: Final = {400: "BadRequestError", 404: "NotFoundError", 401: "UnauthorizedError"}
_OPENAI_TYPES: Final = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(kind: str, status: int, message: str, *, anthropic_route: bool = False) -> Any:
    """The JSON body `kind` answers an HTTP error with (backend-apis.md §8.5)."""
    if anthropic_route and kind != "llamacpp":
        etype = _ANTHROPIC_TYPES.get(status, "api_error")
        if kind == "vllm":
            return {"type": "error", "error": {"type": etype, "message": message}}
        request_id = "req_" + uuid.uuid4().hex[:24]
        return {
            "type": "error",
            "error": {"type": etype, "message": message},
            "request_id": request_id,
        }
    if kind == "vllm":
        if status == 401:
            return {"error": "Unauthorized"}
        etype = _VLLM_TYPES.get(
            status, "InternalServerError" if status >= 500 else "BadRequestError"
        )
        return {"error": {"message": message, "type": etype, "param": None, "code": status}}
    if kind == "llamacpp":
        etype = _LLAMACPP_TYPES.get(status, "server_error")
        return {"error": {"code": status, "message": message, "type": etype}}
    if kind == "lmstudio":
        etype = _OPENAI_TYPES.get(status, "server_error")
        return {"error": {"message": message, "type": etype, "param": None, "code": None}}
    if kind == "ollama":
        etype = _OPENAI_TYPES.get(status, "api_error")
        return {"error": {"message": message, "type": etype, "param": None, "code": None}}
    if kind == "openrouter":
        if status == 502:
            metadata = {"provider_name": "SimProvider", "raw": "upstream connect error"}
            return {"error": {"code": status, "message": message, "metadata": metadata}}
        return {"error": {"code": status, "message": message}}
    return {"error": message}  # venice


#: What an `http` fault, or a request without the API key, is told.
MESSAGES: Final = {
    401: "Invalid API Key",
    404: "The model does not exist.",
    429: "Rate limit exceeded, retry later.",
    500: "Internal server error (simulated).",
    502: "Bad gateway (simulated).",
    503: "Service unavailable (simulated).",
}


def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> list[str]:
    """One Prometheus family with one sample, as the text exposition's lines."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]


def metrics_response(lines: list[str]) -> web.Response:
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
