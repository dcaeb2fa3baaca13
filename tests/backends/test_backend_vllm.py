"""vLLM adapter: /health, /v1/models with max_model_len and LoRA parents, /openapi.json formats."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import ClientSession

from provider_agent.backends.base import ModelInfo
from provider_agent.backends.vllm import VllmBackend, openapi_has_messages, parse_models
from provider_agent.config.schema import BackendConfig
from provider_agent.errors import BackendError
from tests.conftest import FakeServer, fixture_bytes


def vllm(url: str, http: ClientSession, **extra: object) -> VllmBackend:
    config = BackendConfig.model_validate({"kind": "vllm", "url": url, **extra})
    return VllmBackend(config, http, timeout_s=2)


def test_parse_models_fixture_lora_takes_parent_window() -> None:
    models = parse_models(orjson.loads(fixture_bytes("vllm/models.json")))
    assert models == [
        ModelInfo("meta-llama/Llama-3.1-8B-Instruct", context_window=32768),
        ModelInfo("sql-lora", context_window=32768),
    ]


def test_parse_models_lora_keeps_its_own_window_and_unknown_parent_is_none() -> None:
    listing = {
        "data": [
            {"id": "base", "max_model_len": 8192},
            {"id": "own", "parent": "base", "max_model_len": 4096},
            {"id": "orphan", "parent": "missing", "max_model_len": None},
            {"id": "zero", "max_model_len": 0},
            {"object": "model"},
        ]
    }
    assert [(m.native_id, m.context_window) for m in parse_models(listing)] == [
        ("base", 8192),
        ("own", 4096),
        ("orphan", None),
        ("zero", None),
    ]


def test_parse_models_without_data_is_backend_error() -> None:
    with pytest.raises(BackendError, match="no `data` list"):
        parse_models({"object": "error", "message": "nope"})


def test_openapi_has_messages() -> None:
    assert openapi_has_messages({"paths": {"/v1/messages": {}, "/v1/models": {}}})
    assert not openapi_has_messages({"paths": {"/v1/chat/completions": {}}})
    assert not openapi_has_messages({"paths": ["/v1/messages"]})
    assert not openapi_has_messages(["/v1/messages"])


async def test_happy_path(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.reply("GET", "/health", b"")
    fake_server.fixture("GET", "/v1/models", "vllm/models.json")
    backend = vllm(fake_server.url, http_session)

    health = await backend.health()
    assert health.ok and health.error is None and health.latency_ms >= 0
    models = await backend.list_models()
    assert [(m.native_id, m.context_window, m.chat, m.loaded) for m in models] == [
        ("meta-llama/Llama-3.1-8B-Instruct", 32768, True, True),
        ("sql-lora", 32768, True, True),
    ]
    assert backend.stream_url("openai") == f"{fake_server.url}/v1/chat/completions"
    assert backend.stream_url("anthropic") == f"{fake_server.url}/v1/messages"


async def test_dead_engine_is_unhealthy(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/health", b"", status=503)
    health = await vllm(fake_server.url, http_session).health()
    assert not health.ok
    assert health.error == "GET /health: HTTP 503"


async def test_bearer_key_sent_when_configured(
    fake_server: FakeServer, http_session: ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PA_TEST_VLLM_KEY", "vllm-key-1")
    fake_server.fixture("GET", "/v1/models", "vllm/models.json")
    await vllm(fake_server.url, http_session, api_key_env="PA_TEST_VLLM_KEY").list_models()
    assert fake_server.seen("GET", "/v1/models")[0].headers["Authorization"] == "Bearer vllm-key-1"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, {"paths": {"/v1/chat/completions": {}, "/v1/messages": {}}}, {"openai", "anthropic"}),
        (200, {"paths": {"/v1/chat/completions": {}}}, {"openai"}),
        (404, {"detail": "Not Found"}, {"openai"}),
        (200, b"<html>not json", {"openai"}),
    ],
    ids=["messages-listed", "no-messages", "no-openapi", "garbage"],
)
async def test_formats_from_openapi(
    status: int,
    body: object,
    expected: set[str],
    fake_server: FakeServer,
    http_session: ClientSession,
) -> None:
    fake_server.reply("GET", "/openapi.json", body, status=status)
    assert await vllm(fake_server.url, http_session).formats() == frozenset(expected)
    assert len(fake_server.seen("GET", "/openapi.json")) == 1


async def test_formats_openai_only_when_unreachable(http_session: ClientSession) -> None:
    assert await vllm("http://127.0.0.1:9", http_session).formats() == frozenset({"openai"})
