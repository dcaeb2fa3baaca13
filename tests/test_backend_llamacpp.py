"""llama.cpp adapter: /health states and fallback, served context (never n_ctx_train), router
mode, `/props` fingerprinting for Anthropic."""

from __future__ import annotations

import anyio
import orjson
import pytest
from aiohttp import ClientSession, web

from provider_agent.backends.base import ModelInfo
from provider_agent.backends.llamacpp import (
    LlamaCppBackend,
    is_cpp_server_props,
    is_router_listing,
    parse_models,
    props_context,
    unavailable_reason,
)
from provider_agent.config import BackendConfig
from tests.conftest import FakeServer, fixture_bytes

#: What llama-cpp-python's `python -m llama_cpp.server` lists: no meta, no /health, no /props.
LLAMA_CPP_PYTHON_MODELS = {
    "object": "list",
    "data": [{"id": "models/llama-2-7b.Q4_K_M.gguf", "object": "model", "owned_by": "me"}],
}


def fixture_json(name: str) -> dict[str, object]:
    data = orjson.loads(fixture_bytes(f"llamacpp/{name}"))
    assert isinstance(data, dict)
    return data


def without_n_ctx() -> dict[str, object]:
    """The models fixture as an older build answers it: `n_ctx_train` only."""
    listing = fixture_json("models.json")
    del listing["data"][0]["meta"]["n_ctx"]  # type: ignore[index]
    return listing


def llamacpp(url: str, http: ClientSession) -> LlamaCppBackend:
    return LlamaCppBackend(BackendConfig(kind="llamacpp", url=url), http, timeout_s=2)


# --- pure parsing --------------------------------------------------------------------------------


def test_parse_models_uses_n_ctx_never_n_ctx_train() -> None:
    assert parse_models(fixture_json("models.json")) == [
        ModelInfo("qwen2.5-7b-instruct", context_window=16384)
    ]
    assert parse_models(without_n_ctx()) == [ModelInfo("qwen2.5-7b-instruct", context_window=None)]
    assert parse_models(fixture_json("models-loading.json")) == [
        ModelInfo("qwen2.5-7b-instruct", context_window=None)
    ]


def test_parse_router_listing_marks_unloaded() -> None:
    listing = fixture_json("router-models.json")
    assert is_router_listing(listing)
    assert not is_router_listing(fixture_json("models.json"))
    assert parse_models(listing) == [
        ModelInfo("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", loaded=True),
        ModelInfo("Qwen3-8B-Q4_K_M", loaded=False),
    ]


def test_props_helpers() -> None:
    props = fixture_json("props.json")
    assert props_context(props) == 16384
    assert is_cpp_server_props(props)
    assert is_cpp_server_props({"build_info": "b1-abc"})
    assert not is_cpp_server_props({"detail": "Not Found"})
    assert not is_cpp_server_props(None)
    assert props_context({"default_generation_settings": {"n_ctx": 0}}) is None
    assert props_context({"n_ctx_train": 32768}) is None


def test_unavailable_reason() -> None:
    assert unavailable_reason(fixture_bytes("llamacpp/health-loading.json")) == "Loading model"
    assert unavailable_reason(b'{"status": "loading model"}') == "loading model"
    assert unavailable_reason(b"<html>Loading</html>") == "unavailable"


# --- health --------------------------------------------------------------------------------------


async def test_health_ok(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.fixture("GET", "/health", "llamacpp/health-ok.json")
    health = await llamacpp(fake_server.url, http_session).health()
    assert health.ok and health.error is None


async def test_health_loading_is_not_ok(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/health", "llamacpp/health-loading.json", status=503)
    fake_server.fixture("GET", "/v1/models", "llamacpp/models-loading.json")
    health = await llamacpp(fake_server.url, http_session).health()
    assert not health.ok
    assert health.error == "GET /health: HTTP 503, not ready (Loading model)"
    assert fake_server.seen("GET", "/v1/models") == []  # a listing while loading proves nothing


async def test_health_404_falls_back_to_models(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/health", {"detail": "Not Found"}, status=404)
    fake_server.reply("GET", "/v1/models", LLAMA_CPP_PYTHON_MODELS)
    health = await llamacpp(fake_server.url, http_session).health()
    assert health.ok, health.error
    assert len(fake_server.seen("GET", "/v1/models")) == 1


async def test_health_404_and_no_listing_is_not_ok(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    health = await llamacpp(fake_server.url, http_session).health()
    assert not health.ok
    assert health.error is not None and "GET /v1/models: HTTP 404" in health.error


async def test_health_other_status_is_not_ok(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/health", {"error": "boom"}, status=500)
    health = await llamacpp(fake_server.url, http_session).health()
    assert not health.ok
    assert health.error is not None and "HTTP 500" in health.error


# --- models --------------------------------------------------------------------------------------


async def test_models_with_meta_n_ctx_skip_props(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "llamacpp/models.json")
    fake_server.reply("GET", "/props", {"default_generation_settings": {"n_ctx": 4096}})
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=16384)]
    assert fake_server.seen("GET", "/props") == []


async def test_models_context_from_props_when_meta_lacks_n_ctx(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/v1/models", without_n_ctx())
    fake_server.reply(
        "GET", "/props", {"default_generation_settings": {"n_ctx": 4096}, "build_info": "b1"}
    )
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=4096)]


async def test_models_context_unknown_never_n_ctx_train(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/v1/models", without_n_ctx())  # n_ctx_train 32768 only; no /props
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=None)]
    assert len(fake_server.seen("GET", "/props")) == 1


async def test_router_mode_props_per_loaded_model(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "llamacpp/router-models.json")

    async def props(request: web.Request) -> web.Response:
        if request.query.get("model") == "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M":
            return web.json_response({"default_generation_settings": {"n_ctx": 8192}})
        return web.json_response(
            {"error": {"code": 400, "message": "model not loaded"}}, status=400
        )

    fake_server.reply("GET", "/props", props)
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [
        ModelInfo("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", context_window=8192, loaded=True),
        ModelInfo("Qwen3-8B-Q4_K_M", context_window=None, loaded=False),
    ]
    asked = [seen.query for seen in fake_server.seen("GET", "/props")]
    assert asked == [{"model": "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M"}]


async def test_router_mode_props_that_hang_leave_the_models_listed(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "llamacpp/router-models.json")
    never = anyio.Event()

    async def props(_: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    fake_server.reply("GET", "/props", props)
    backend = llamacpp(fake_server.url, http_session)
    with anyio.fail_after(1):  # the caller's deadline, shorter than the request timeout
        models = await backend.list_models()
    assert [(m.native_id, m.context_window) for m in models] == [
        ("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", None),
        ("Qwen3-8B-Q4_K_M", None),
    ]
    never.set()


async def test_llama_cpp_python_server(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/v1/models", LLAMA_CPP_PYTHON_MODELS)
    backend = llamacpp(fake_server.url, http_session)
    assert (await backend.health()).ok
    assert await backend.list_models() == [ModelInfo("models/llama-2-7b.Q4_K_M.gguf")]
    assert await backend.formats() == frozenset({"openai"})


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, fixture_bytes("llamacpp/props.json"), {"openai", "anthropic"}),
        (404, {"detail": "Not Found"}, {"openai"}),
        (503, fixture_bytes("llamacpp/health-loading.json"), {"openai"}),
        (200, {"something": "else"}, {"openai"}),
    ],
    ids=["cpp-server", "no-props", "loading", "foreign-props"],
)
async def test_formats_from_props(
    status: int,
    body: object,
    expected: set[str],
    fake_server: FakeServer,
    http_session: ClientSession,
) -> None:
    fake_server.reply("GET", "/props", body, status=status)
    assert await llamacpp(fake_server.url, http_session).formats() == frozenset(expected)
