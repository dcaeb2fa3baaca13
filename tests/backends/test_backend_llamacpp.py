"""llama.cpp adapter: /health states and fallback, served context (never n_ctx_train), router
mode, slot counts from `/props`, the Anthropic route probed with `POST /v1/messages {}`."""

from __future__ import annotations

import socket

import anyio
import orjson
import pytest
from aiohttp import ClientSession, web

from provider_agent.backends.base import ModelInfo
from provider_agent.backends.llamacpp import (
    MAX_SLOTS,
    LlamaCppBackend,
    is_router_listing,
    messages_route_served,
    parse_models,
    props_context,
    props_slots,
    unavailable_reason,
)
from provider_agent.config.schema import BackendConfig
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
    assert props_slots(props) == 4
    assert props_context({"default_generation_settings": {"n_ctx": 0}}) is None
    assert props_context({"n_ctx_train": 32768}) is None
    assert props_slots({"detail": "Not Found"}) is None
    assert props_slots(None) is None
    assert props_slots({"total_slots": 1}) == 1
    assert props_slots({"total_slots": MAX_SLOTS}) == MAX_SLOTS


@pytest.mark.parametrize(
    "value", [0, -4, MAX_SLOTS + 1, 2**63, 4.0, "4", True, None, [4], {"n": 4}]
)
def test_slot_counts_that_are_not_believed(value: object) -> None:
    assert props_slots({"total_slots": value}) is None


def test_messages_route_statuses() -> None:
    for status in (400, 422, 401, 500, 200):
        assert messages_route_served(status), status
    for status in (404, 405, 501):
        assert not messages_route_served(status), status


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


async def test_models_with_meta_n_ctx_keep_it_over_props(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "llamacpp/models.json")
    fake_server.reply("GET", "/props", {"default_generation_settings": {"n_ctx": 4096}})
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=16384)]
    assert [seen.query for seen in fake_server.seen("GET", "/props")] == [{}]


async def test_slots_from_props_total_slots(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    """llama-server started with `-np 4`: `/props` says `total_slots: 4`, and the model says so
    (the route is capped there, not at the configured or global limit)."""
    fake_server.fixture("GET", "/v1/models", "llamacpp/models.json")
    fake_server.fixture("GET", "/props", "llamacpp/props.json")
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=16384, slots=4)]


@pytest.mark.parametrize(
    "total_slots",
    [b"0", b"-1", b"4097", b"4.5", b'"4"', b"true", b"null", b"{}"],
)
async def test_slot_counts_that_are_not_believed_leave_the_model_uncapped(
    total_slots: bytes, fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/v1/models", without_n_ctx())
    props = b'{"default_generation_settings": {"n_ctx": 4096}, "total_slots": %s}' % total_slots
    fake_server.reply("GET", "/props", props)
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=4096, slots=None)]


@pytest.mark.parametrize("total_slots", [b"%d" % 2**80, b"1e400", b"-%d" % 2**64])
async def test_a_slot_count_beyond_what_json_parsers_take_is_no_crash(
    total_slots: bytes, fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/v1/models", "llamacpp/models.json")
    fake_server.reply("GET", "/props", b'{"total_slots": %s}' % total_slots)
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=16384, slots=None)]


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


async def test_router_mode_slots_per_model(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    """Router mode: each loaded model runs in its own server with its own `-np`; `/props
    ?model=<id>` says each one's `total_slots`, asked even when the listing has the context."""
    listing = fixture_json("router-models.json")
    listing["data"].append(  # type: ignore[attr-defined]
        {
            "id": "phi-4-mini",
            "object": "model",
            "owned_by": "llamacpp",
            "meta": {"n_ctx": 4096, "n_ctx_train": 131072},
            "status": {"value": "loaded"},
        }
    )
    fake_server.reply("GET", "/v1/models", listing)
    per_model = {
        "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M": (8192, 2),
        "phi-4-mini": (4096, 6),
    }

    async def props(request: web.Request) -> web.Response:
        model = request.query.get("model")
        if model not in per_model:
            message = "model name is missing from the request" if model is None else "unloaded"
            return web.json_response({"error": {"code": 400, "message": message}}, status=400)
        n_ctx, slots = per_model[model]
        props = fixture_json("props.json")
        props["default_generation_settings"]["n_ctx"] = n_ctx  # type: ignore[index]
        props["total_slots"] = slots
        return web.json_response(props)

    fake_server.reply("GET", "/props", props)
    models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [
        ModelInfo("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", context_window=8192, slots=2),
        ModelInfo("Qwen3-8B-Q4_K_M", loaded=False),
        ModelInfo("phi-4-mini", context_window=4096, slots=6),
    ]
    asked = sorted(seen.query["model"] for seen in fake_server.seen("GET", "/props"))
    assert asked == ["ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", "phi-4-mini"]


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


async def test_props_that_hang_leave_the_model_listed_without_slots(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    """`/props` is asked on every pass now (for the slots): a server whose `/props` hangs still
    gets its model listed within the caller's deadline."""
    fake_server.fixture("GET", "/v1/models", "llamacpp/models.json")
    never = anyio.Event()

    async def props(_: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    fake_server.reply("GET", "/props", props)
    with anyio.fail_after(1):  # the caller's deadline, shorter than the request timeout
        models = await llamacpp(fake_server.url, http_session).list_models()
    assert models == [ModelInfo("qwen2.5-7b-instruct", context_window=16384, slots=None)]
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


LLAMACPP_400 = {"error": {"code": 400, "message": "'messages' is required", "type": "x"}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, LLAMACPP_400, {"openai", "anthropic"}),
        (500, {"error": {"code": 500, "message": "[json.exception]"}}, {"openai", "anthropic"}),
        (404, {"error": {"code": 404, "message": "File Not Found"}}, {"openai"}),
        (405, b"", {"openai"}),
        (501, b"", {"openai"}),
    ],
    ids=["validation-error", "server-error", "no-route", "method-not-allowed", "not-implemented"],
)
async def test_formats_from_posting_an_empty_message(
    status: int,
    body: object,
    expected: set[str],
    fake_server: FakeServer,
    http_session: ClientSession,
) -> None:
    fake_server.fixture("GET", "/props", "llamacpp/props.json")  # present on every C++ build
    fake_server.reply("POST", "/v1/messages", body, status=status)
    assert await llamacpp(fake_server.url, http_session).formats() == frozenset(expected)
    [probe] = fake_server.seen("POST", "/v1/messages")
    assert probe.body == b"{}"
    assert probe.headers["Content-Type"] == "application/json"


async def test_a_cpp_build_without_the_messages_route_is_openai_only(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    """An older llama-server: a C++ `/props` (build_info and all), but `POST /v1/messages`
    answers 404; advertising `anthropic` would send jobs that all fail."""
    fake_server.fixture("GET", "/props", "llamacpp/props.json")
    fake_server.reply(
        "POST", "/v1/messages", {"error": {"code": 404, "message": "File Not Found"}}, status=404
    )
    assert await llamacpp(fake_server.url, http_session).formats() == frozenset({"openai"})


async def test_a_probe_that_hangs_is_dropped_without_eating_the_pass(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    """A server that queues `{}` instead of refusing it: the probe gives up within a quarter
    of the discovery timeout (2 s here → 0.5 s), so the listing still has its time."""
    never = anyio.Event()

    async def queued(_: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    fake_server.reply("POST", "/v1/messages", queued)
    backend = llamacpp(fake_server.url, http_session)
    with anyio.fail_after(1.5):  # the request timeout (2 s) would fail this
        assert await backend.formats() == frozenset({"openai"})
    never.set()


async def test_formats_when_the_probe_gets_no_answer(http_session: ClientSession) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = llamacpp(f"http://127.0.0.1:{port}", http_session)
    assert await backend.formats() == frozenset({"openai"})
