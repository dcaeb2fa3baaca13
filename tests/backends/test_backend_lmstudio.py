"""LM Studio adapter: no health endpoint (200 for anything), REST listings with load state and
type, fallbacks to the OpenAI listing, openai-only formats."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import ClientSession

from provider_agent.backends.base import ModelInfo
from provider_agent.backends.lmstudio import (
    LmStudioBackend,
    parse_api_v0_models,
    parse_api_v1_models,
    parse_openai_models,
)
from provider_agent.config.schema import BackendConfig
from tests.conftest import FakeServer, fixture_bytes

UNEXPECTED = {"error": "Unexpected endpoint or method. (GET /)"}


def fixture_json(name: str) -> object:
    return orjson.loads(fixture_bytes(f"lmstudio/{name}"))


@pytest.fixture
def lm_server(fake_server: FakeServer) -> FakeServer:
    """LM Studio answers every unknown path with HTTP 200."""
    fake_server.reply("*", "*", UNEXPECTED)
    return fake_server


def lmstudio(url: str, http: ClientSession) -> LmStudioBackend:
    return LmStudioBackend(BackendConfig(kind="lmstudio", url=url), http, timeout_s=2)


def advertisable(models: list[ModelInfo]) -> list[str]:
    return [m.native_id for m in models if m.chat and m.loaded]


# --- pure parsing --------------------------------------------------------------------------------


def test_parse_api_v1_models() -> None:
    assert parse_api_v1_models(fixture_json("api-v1-models.json")) == [
        ModelInfo("qwen/qwen2.5-7b-instruct", context_window=8192, chat=True, loaded=True),
        ModelInfo(
            "text-embedding-nomic-embed-text-v1.5", context_window=2048, chat=False, loaded=False
        ),
    ]
    assert parse_api_v1_models(UNEXPECTED) is None


def test_parse_api_v0_models_only_loaded_llm_is_advertisable() -> None:
    models = parse_api_v0_models(fixture_json("api-v0-models.json"))
    assert models == [
        ModelInfo("qwen2.5-7b-instruct", context_window=32768, chat=True, loaded=True),
        ModelInfo("qwen2-vl-7b-instruct", context_window=32768, chat=True, loaded=False),
        ModelInfo(
            "text-embedding-nomic-embed-text-v1.5", context_window=2048, chat=False, loaded=False
        ),
    ]
    assert advertisable(models) == ["qwen2.5-7b-instruct"]
    assert parse_api_v0_models(UNEXPECTED) is None
    assert parse_api_v0_models(fixture_json("v1-models.json")) is None  # OpenAI shape: not REST


def test_parse_openai_models_marks_embeddings() -> None:
    assert parse_openai_models(fixture_json("v1-models.json")) == [
        ModelInfo("qwen2.5-7b-instruct"),
        ModelInfo("text-embedding-nomic-embed-text-v1.5", chat=False),
    ]


# --- health --------------------------------------------------------------------------------------


async def test_health_is_the_openai_listing(
    lm_server: FakeServer, http_session: ClientSession
) -> None:
    lm_server.fixture("GET", "/v1/models", "lmstudio/v1-models.json")
    health = await lmstudio(lm_server.url, http_session).health()
    assert health.ok, health.error
    assert [seen.path for seen in lm_server.requests] == ["/v1/models"]


async def test_health_200_for_anything_is_not_proof(
    lm_server: FakeServer, http_session: ClientSession
) -> None:
    health = await lmstudio(lm_server.url, http_session).health()
    assert not health.ok
    assert health.error is not None and "no `data` list" in health.error


# --- models --------------------------------------------------------------------------------------


async def test_models_from_api_v1(lm_server: FakeServer, http_session: ClientSession) -> None:
    lm_server.fixture("GET", "/api/v1/models", "lmstudio/api-v1-models.json")
    lm_server.fixture("GET", "/api/v0/models", "lmstudio/api-v0-models.json")
    models = await lmstudio(lm_server.url, http_session).list_models()
    assert advertisable(models) == ["qwen/qwen2.5-7b-instruct"]
    assert models[0].context_window == 8192  # the loaded instance's, not max_context_length
    assert lm_server.seen("GET", "/api/v0/models") == []


async def test_models_from_api_v0_when_v1_unknown(
    lm_server: FakeServer, http_session: ClientSession
) -> None:
    lm_server.fixture("GET", "/api/v0/models", "lmstudio/api-v0-models.json")
    models = await lmstudio(lm_server.url, http_session).list_models()
    assert [(m.native_id, m.chat, m.loaded, m.context_window) for m in models] == [
        ("qwen2.5-7b-instruct", True, True, 32768),
        ("qwen2-vl-7b-instruct", True, False, 32768),
        ("text-embedding-nomic-embed-text-v1.5", False, False, 2048),
    ]
    assert len(lm_server.seen("GET", "/api/v1/models")) == 1


async def test_models_from_openai_listing_when_rest_missing(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "lmstudio/v1-models.json")  # REST paths: 404
    models = await lmstudio(fake_server.url, http_session).list_models()
    assert models == [
        ModelInfo("qwen2.5-7b-instruct"),
        ModelInfo("text-embedding-nomic-embed-text-v1.5", chat=False),
    ]
    assert [seen.path for seen in fake_server.requests] == [
        "/api/v1/models",
        "/api/v0/models",
        "/v1/models",
    ]


async def test_formats_openai_only(lm_server: FakeServer, http_session: ClientSession) -> None:
    lm_server.fixture("GET", "/api/v1/models", "lmstudio/api-v1-models.json")
    assert await lmstudio(lm_server.url, http_session).formats() == frozenset({"openai"})
