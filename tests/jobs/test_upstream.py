"""The job's request body and the meaning of an upstream refusal (protocol.md §4), pure."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from provider_agent import safe_text
from provider_agent.errors import BackendError, RouteFailure, StreamFailed
from provider_agent.jobs.upstream import error_for_status, request_body
from provider_agent.safe_text import MESSAGE_LIMIT
from tests.conftest import fixture_bytes

SECRET = "sk-live-0123456789abcdef0123456789abcdef"


# --- request_body ------------------------------------------------------------------------------


def body_of(fmt: Any, request: dict[str, Any], native_id: str = "native/id") -> dict[str, Any]:
    result = orjson.loads(request_body(fmt, request, native_id))
    assert isinstance(result, dict)
    return result


def test_openai_body_streams_names_the_native_model_and_asks_for_usage() -> None:
    request = {
        "model": "llama3.1:8b",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "temperature": 0.2,
        "venice_parameters": {"include_venice_system_prompt": False},
        "user": "u-1",
        "x_unknown": [1, {"nested": None}],
    }
    body = body_of("openai", request)
    assert body == {
        **request,
        "model": "native/id",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert list(body)[:5] == list(request)[:5]  # fields keep their order
    assert request["stream"] is False  # the caller's dict is not changed


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ({"include_usage": False}, {"include_usage": False}),
        ({"include_usage": True}, {"include_usage": True}),
        (
            {"continuous_usage_stats": True},
            {"continuous_usage_stats": True, "include_usage": True},
        ),
        (None, {"include_usage": True}),
        ("garbage", "garbage"),  # left for the backend's 400
    ],
)
def test_openai_stream_options_are_completed_never_overridden(given: Any, sent: Any) -> None:
    body = body_of("openai", {"messages": [], "stream_options": given})
    assert body["stream_options"] == sent


def test_anthropic_body_gets_no_stream_options() -> None:
    request = {"model": "claude", "max_tokens": 16, "system": "be brief", "messages": []}
    body = body_of("anthropic", request)
    assert body == {**request, "model": "native/id", "stream": True}
    assert "stream_options" not in body


def test_body_keeps_unicode_and_big_numbers_exactly() -> None:
    request = {"messages": [{"role": "user", "content": "żółw 🐢 \u202e\x00"}], "seed": 2**63 - 1}
    body = body_of("openai", request)
    assert body["messages"] == request["messages"]
    assert body["seed"] == 2**63 - 1


def test_unencodable_request_is_a_value_error_in_words() -> None:
    with pytest.raises(ValueError, match="cannot be encoded as JSON"):
        request_body("openai", {"messages": [], "seed": 2**70}, "m")


# --- error_for_status --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "code", "fallback"),
    [
        (401, "vllm", "auth_rejected_by_backend", True),
        (403, "llamacpp", "auth_rejected_by_backend", True),
        (403, "venice", "auth_rejected_by_backend", True),
        (403, "openrouter", "bad_request", True),  # moderation refusal
        (401, "openrouter", "auth_rejected_by_backend", True),
        (400, "vllm", "bad_request", False),
        (422, "venice", "bad_request", False),
        (404, "ollama", "model_not_loaded", True),
        (429, "venice", "backend_error", True),
        (500, "vllm", "backend_error", True),
        (502, "openrouter", "backend_error", True),
        (503, "llamacpp", "backend_error", True),
        (599, "lmstudio", "backend_error", True),
        (402, "openrouter", "backend_error", False),
        (408, "openrouter", "backend_error", False),
        (413, "vllm", "backend_error", False),
        (307, "vllm", "backend_error", False),
    ],
)
def test_status_mapping(status: int, kind: str, code: str, fallback: bool) -> None:
    failure = error_for_status(status, kind, b"")
    assert (failure.code, failure.fallback) == (code, fallback)
    assert failure.message == f"{kind} answered HTTP {status}"


@pytest.mark.parametrize(
    ("fixture", "status", "kind", "expected"),
    [
        ("vllm/error-400-context-length.json", 400, "vllm", "maximum context length is 32768"),
        ("vllm/error-400-legacy.json", 404, "vllm", "The model `gpt-4` does not exist."),
        ("vllm/error-401.json", 401, "vllm", "Unauthorized"),
        ("vllm/error-anthropic.json", 400, "vllm", "max_tokens is required"),
        ("llamacpp/error-401.json", 401, "llamacpp", "Invalid API Key"),
        ("llamacpp/error-exceed-context.json", 400, "llamacpp", "exceeds the available context"),
        ("ollama/error-404.json", 404, "ollama", "model 'llama9:70b' not found"),
        ("ollama/v1-error-404.json", 404, "ollama", "not found"),
        ("ollama/error-anthropic.json", 400, "ollama", "max_tokens is required"),
        ("lmstudio/error-model-not-found.json", 404, "lmstudio", 'Model "default" not found.'),
        ("lmstudio/error-no-models-loaded.json", 400, "lmstudio", "No models loaded."),
        ("openrouter/error-401.json", 401, "openrouter", "No auth credentials found"),
        ("openrouter/error-402.json", 402, "openrouter", "Insufficient credits."),
        ("openrouter/error-502-metadata.json", 502, "openrouter", "(upstream connect error)"),
        ("venice/error-standard.json", 401, "venice", "Authentication failed"),
        ("venice/error-context-length.json", 400, "venice", "exceeds the model's maximum"),
        ("venice/error-validation.json", 400, "venice", "Invalid request parameters"),
        ("venice/error-overloaded.json", 429, "venice", "currently overloaded"),
        ("anthropic/error.json", 400, "anthropic", "max_tokens: Field required"),
    ],
)
def test_recorded_error_bodies_give_their_message(
    fixture: str, status: int, kind: str, expected: str
) -> None:
    failure = error_for_status(status, kind, fixture_bytes(fixture))
    assert failure.message.startswith(f"{kind} answered HTTP {status}: ")
    assert expected in failure.message
    assert "\n" not in failure.message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "vllm answered HTTP 500"),
        (b"   \n", "vllm answered HTTP 500"),
        (b"Internal Server Error", "vllm answered HTTP 500: Internal Server Error"),
        (b'{"detail":"Not Found"}', "vllm answered HTTP 500: Not Found"),
        (b'{"error":null,"foo":1}', 'vllm answered HTTP 500: {"error":null,"foo":1}'),
        (b"[1,2]", "vllm answered HTTP 500: [1,2]"),
        (b'{"error": {"message": 5}}', 'vllm answered HTTP 500: {"error": {"message": 5}}'),
        (b"<html>\r\n<body>Bad gateway</body>\r\n</html>", "<html> <body>Bad gateway</body>"),
    ],
)
def test_odd_bodies_still_give_one_readable_line(body: bytes, expected: str) -> None:
    assert expected in error_for_status(500, "vllm", body).message


def test_error_messages_are_printable_trimmed_and_never_hold_the_key() -> None:
    cases = [
        b'{"error":{"message":"Invalid key ' + SECRET.encode() + b'"}}',
        b"Authorization: Bearer " + SECRET.encode(),
        b"bearer\t" + SECRET.encode() + b" rejected",
        b"x" * 100_000 + SECRET.encode(),
        SECRET.encode() + b"\x1b[31m\x00\x07\xff\xfe" + "\u202e\u2028".encode(),
        b'{"error":"' + b"\\u0000" * 500 + b'"}',
    ]
    for body in cases:
        message = error_for_status(401, "openrouter", body, secrets=[SECRET]).message
        assert SECRET not in message
        assert len(message) <= MESSAGE_LIMIT
        assert message.isprintable(), message


def test_printable_escapes_controls_and_folds_line_breaks() -> None:
    def printable(text: str, secrets: tuple[str, ...] = ()) -> str:
        return safe_text.printable(text, MESSAGE_LIMIT, secrets=secrets, message=True)

    assert printable("a\r\n\tb") == "a b"
    assert printable("red\x1b[31m") == "red\\x1b[31m"
    assert printable("bidi\u202eend") == "bidi\\u202eend"
    cut = printable("x" * 400)
    assert len(cut) <= MESSAGE_LIMIT and cut.endswith(f"…(+{400 - cut.count('x')} chars)")
    assert printable("key=abc", secrets=("", "abc")) == "key=[redacted]"


def test_stream_failed_carries_its_route_failure() -> None:
    failure = RouteFailure("backend_unreachable", "vllm: cannot connect", True)
    error = StreamFailed(failure)
    assert isinstance(error, BackendError)
    assert error.failure is failure
    assert str(error) == "vllm: cannot connect"
