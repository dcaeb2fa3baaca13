"""Ollama adapter: liveness, installed models with context from /api/ps, /api/show and num_ctx,
embedding-only models, concurrent /api/show, formats by version."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import ClientSession, web

from provider_agent.backends.base import ModelInfo
from provider_agent.backends.ollama import (
    OllamaBackend,
    configured_num_ctx,
    model_info,
    parse_ps,
    parse_tags,
    parse_version,
    trained_context,
)
from provider_agent.config.schema import BackendConfig
from tests.conftest import FakeServer, fixture_bytes

LLAMA_SHOW = orjson.loads(fixture_bytes("ollama/show.json"))  # num_ctx 8192, trained 131072
QWEN_SHOW = {
    "parameters": 'stop                           "<|im_end|>"',
    "model_info": {"general.architecture": "qwen3", "qwen3.context_length": 40960},
    "capabilities": ["completion", "tools", "thinking"],
}
EMBED_SHOW = {
    "parameters": "",
    "model_info": {"general.architecture": "nomic-bert", "nomic-bert.context_length": 2048},
    "capabilities": ["embedding"],
}
SHOWS = {
    "llama3.2:latest": LLAMA_SHOW,
    "qwen3:8b": QWEN_SHOW,
    "nomic-embed-text:latest": EMBED_SHOW,
}


def tags_with_embedding() -> dict[str, object]:
    tags = orjson.loads(fixture_bytes("ollama/tags.json"))
    tags["models"].append({"name": "nomic-embed-text:latest", "model": "nomic-embed-text:latest"})
    return tags  # type: ignore[no-any-return]


def ollama(url: str, http: ClientSession) -> OllamaBackend:
    return OllamaBackend(BackendConfig(kind="ollama", url=url), http, timeout_s=2)


def serve_shows(server: FakeServer, *, barrier: int = 0) -> None:
    """`POST /api/show` by the body's `model`. With `barrier`, no answer goes out until that many
    requests are in flight at once (so a sequential client would time out)."""
    arrived = 0
    all_in = asyncio.Event()

    async def show(request: web.Request) -> web.Response:
        nonlocal arrived
        name = (await request.json())["model"]
        arrived += 1
        if arrived >= barrier:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 5)
        if name not in SHOWS:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response(SHOWS[name])

    server.reply("POST", "/api/show", show)


# --- pure parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.12.6", (0, 12, 6)),
        ("0.14.0", (0, 14, 0)),
        ("v0.14", (0, 14, 0)),
        ("0.14.1-rc0", (0, 14, 1)),
        ("garbage", None),
        (None, None),
    ],
)
def test_parse_version(text: object, expected: object) -> None:
    assert parse_version(text) == expected


def test_parse_tags_and_ps_fixtures() -> None:
    assert parse_tags(orjson.loads(fixture_bytes("ollama/tags.json"))) == {
        "llama3.2:latest": None,
        "qwen3:8b": None,
    }
    assert parse_tags({"models": [{"name": "x", "capabilities": ["embedding"]}]}) == {
        "x": ["embedding"]
    }
    assert parse_tags({"error": "nope"}) is None
    assert parse_ps(orjson.loads(fixture_bytes("ollama/ps.json"))) == {"qwen3:8b": 32768}
    assert parse_ps({"models": [{"name": "old", "size": 1}]}) == {}


def test_show_helpers() -> None:
    assert trained_context(LLAMA_SHOW) == 131072
    assert configured_num_ctx(LLAMA_SHOW) == 8192
    assert configured_num_ctx(QWEN_SHOW) is None
    assert trained_context({"model_info": {"llama.context_length": 4096}}) is None


@pytest.mark.parametrize(
    ("show", "running", "expected"),
    [
        (LLAMA_SHOW, None, 8192),  # num_ctx beats the trained context
        (LLAMA_SHOW, 2048, 8192),  # num_ctx wins over what happens to be resident
        (QWEN_SHOW, 32768, 32768),  # no num_ctx: the resident context
        (QWEN_SHOW, None, 40960),  # not resident: the trained context
        ({**LLAMA_SHOW, "parameters": "num_ctx 262144"}, None, 131072),  # capped at trained
        (None, None, None),
    ],
)
def test_model_info_context(
    show: dict[str, object] | None, running: int | None, expected: int | None
) -> None:
    assert model_info("m", show, running).context_window == expected


def test_model_info_embedding_only_is_not_chat() -> None:
    assert model_info("e", EMBED_SHOW, None) == ModelInfo("e", 2048, chat=False, loaded=True)
    assert model_info("e", None, None, ["embedding"]).chat is False
    assert model_info("c", None, None).chat is True  # capabilities unknown: assume chat


# --- health --------------------------------------------------------------------------------------


async def test_health_root(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.fixture("GET", "/", "ollama/root.txt")
    assert (await ollama(fake_server.url, http_session).health()).ok
    assert fake_server.seen("GET", "/api/version") == []


async def test_health_version_fallback(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/", "Welcome to nginx!")
    fake_server.fixture("GET", "/api/version", "ollama/version.json")
    assert (await ollama(fake_server.url, http_session).health()).ok


async def test_health_not_ollama(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.reply("GET", "/", "Welcome to nginx!")
    health = await ollama(fake_server.url, http_session).health()
    assert not health.ok
    assert health.error is not None and "GET /api/version: HTTP 404" in health.error


# --- models --------------------------------------------------------------------------------------


async def test_models_happy_path(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.reply("GET", "/api/tags", tags_with_embedding())
    fake_server.fixture("GET", "/api/ps", "ollama/ps.json")
    serve_shows(fake_server, barrier=3)  # answers only once all three are asked at once
    models = await ollama(fake_server.url, http_session).list_models()
    assert models == [
        ModelInfo("llama3.2:latest", context_window=8192, chat=True, loaded=True),
        ModelInfo("qwen3:8b", context_window=32768, chat=True, loaded=True),
        ModelInfo("nomic-embed-text:latest", context_window=2048, chat=False, loaded=True),
    ]
    asked = sorted(
        orjson.loads(seen.body)["model"] for seen in fake_server.seen("POST", "/api/show")
    )
    assert asked == sorted(SHOWS)


async def test_models_without_ps_and_failing_show(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply(
        "GET", "/api/tags", {"models": [{"name": "qwen3:8b"}, {"name": "gone:latest"}]}
    )
    serve_shows(fake_server)  # /api/ps is 404 (old server); gone:latest's show is 404
    models = await ollama(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen3:8b", context_window=40960), ModelInfo("gone:latest")]


async def test_models_fall_back_to_openai_listing(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "ollama/v1-models.json")
    fake_server.fixture("GET", "/api/ps", "ollama/ps.json")
    serve_shows(fake_server)
    models = await ollama(fake_server.url, http_session).list_models()
    assert [(m.native_id, m.context_window) for m in models] == [
        ("llama3.2:latest", 8192),
        ("qwen3:8b", 32768),
    ]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, {"version": "0.12.6"}, {"openai"}),
        (200, {"version": "0.14.0"}, {"openai", "anthropic"}),
        (200, {"version": "0.15.2"}, {"openai", "anthropic"}),
        (200, {"version": "dev"}, {"openai"}),
        (404, "404 page not found", {"openai"}),
    ],
)
async def test_formats_by_version(
    status: int,
    body: object,
    expected: set[str],
    fake_server: FakeServer,
    http_session: ClientSession,
) -> None:
    fake_server.reply("GET", "/api/version", body, status=status)
    assert await ollama(fake_server.url, http_session).formats() == frozenset(expected)
