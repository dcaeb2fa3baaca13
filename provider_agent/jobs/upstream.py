"""What the agent sends upstream for a job, and what an upstream failure means (protocol.md §4).

Pure: plain data in, plain data out, no I/O. The adapters (`backends/`) do the HTTP and call
these to build the request body and to turn a refusal into a protocol error code.

Which failures leave a route for the next one (before the route's first byte only): connection
refused or reset, HTTP 401, 403, 404, 429 and 5xx, and a missing API key. Everything else ends
the job on that route: 400/422 (the request itself is wrong: another backend would refuse it
too), other statuses, and the deadline (slowness is never a reason to fall back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from provider_agent.config.schema import WireFormat
from provider_agent.errors import RouteFailure, UnencodableRequest
from provider_agent.link.protocol import ErrorCode
from provider_agent.safe_text import MESSAGE_LIMIT, printable

#: Longest `message` of a RouteFailure (and of any upstream text the agent passes on).
#: Where a reader may hand a body's first bytes the moment they are read (`backends.stream`);
#: what it returns is not used.
FirstBytes = Callable[[bytes], object]


def request_body(fmt: WireFormat, request: Mapping[str, Any], native_id: str) -> bytes:
    """The client's request as the serving backend gets it: `stream: true`, `model` = the
    backend's own id, and for `openai` `stream_options.include_usage: true` unless the client set
    `include_usage` itself. Every other field is passed through untouched, in order.

    A `stream_options` that is not an object (and not null) is left as the client sent it: the
    backend's 400 then says what is wrong. UnencodableRequest when the request cannot be encoded
    as JSON (an integer beyond 64 bits, nesting deeper than the encoder goes).
    """
    body = dict(request)
    body["stream"] = True
    body["model"] = native_id
    if fmt == "openai":
        options = body.get("stream_options")
        if options is None:
            body["stream_options"] = {"include_usage": True}
        elif isinstance(options, dict) and "include_usage" not in options:
            body["stream_options"] = {**options, "include_usage": True}
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise UnencodableRequest(f"the request cannot be encoded as JSON: {exc}") from None


def status_code(status: int, kind: str) -> ErrorCode:
    """The protocol code for an upstream HTTP status (protocol.md §4)."""
    if status == 403 and kind == "openrouter":
        return "bad_request"  # OpenRouter's 403 is its moderation refusal of the input
    if status in (401, 403):
        return "auth_rejected_by_backend"
    if status in (400, 422):
        return "bad_request"
    if status == 404:
        return "model_not_loaded"
    return "backend_error"


def status_falls_back(status: int) -> bool:
    """Whether a route answering `status` before its first byte is left for the next route."""
    return status in (401, 403, 404, 429) or 500 <= status <= 599


def error_for_status(
    status: int, kind: str, body: bytes, secrets: Iterable[str] = ()
) -> RouteFailure:
    """A non-2xx answer → RouteFailure. The message names the backend kind and the status and
    carries the upstream's own error text (the `message` of any of the error envelopes the
    backends use, else the body's start), trimmed and with `secrets` scrubbed."""
    detail = error_detail(body)
    message = f"{kind} answered HTTP {status}" + (f": {detail}" if detail else "")
    return RouteFailure(
        status_code(status, kind),
        printable(message, MESSAGE_LIMIT, secrets=secrets, message=True),
        status_falls_back(status),
        throttled=status == 429,
    )


def error_detail(body: bytes) -> str:
    """The human part of an error body: `error` (a string, or an object's `message`), a flat
    `message`, FastAPI's string `detail`; else the body itself as text; "" when empty."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        found = error_message(data)
        if found is None and isinstance(data.get("detail"), str):
            found = data["detail"]
        if found:
            return found
    return body[: MESSAGE_LIMIT * 4].decode("utf-8", "replace").strip()


def error_message(data: Mapping[str, Any]) -> str | None:
    """The message of an error object in any backend's envelope: `{"error": "…"}`,
    `{"error": {"message": "…"}}` (OpenAI, Anthropic, llama.cpp, OpenRouter — whose
    `metadata.raw` is appended), or a flat `{"message": "…"}`; None when there is none."""
    error = data.get("error", data)
    if isinstance(error, str):
        return error
    if not isinstance(error, dict):
        return None
    message = error.get("message")
    if not isinstance(message, str):
        return None
    metadata = error.get("metadata")
    raw = metadata.get("raw") if isinstance(metadata, dict) else None
    if isinstance(raw, str) and raw and raw not in message:
        return f"{message} ({raw})"
    return message
