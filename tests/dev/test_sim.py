"""The backend simulator: its answers have the recorded fixtures' shapes (so it cannot drift from
the real servers), the agent's own adapters discover it, its streams parse, its faults behave,
and `provider-agent sim-backend` is a well-behaved command."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from provider_agent import cli
from provider_agent.backends.base import new_http_session
from provider_agent.config.load import parse
from provider_agent.dev.sim.command import parse_listen
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.dev.sim.records import KINDS, SimModel, job_key
from provider_agent.dev.sim.sse import WORDS
from provider_agent.discovery.run_pass import BackendReport, run_pass

FIXTURES = Path(__file__).parent.parent / "fixtures"
COMMENT = ":comment"
#: As fast as possible (back-to-back writes), and paced (the shared timer's writes).
RATES = [0, 1000]
KEY = "sim-secret-key-123"
KEY_ENV = "SIM_BACKEND_TEST_KEY"
CHAT_PATH = {
    k: "/api/v1/chat/completions" if k in ("openrouter", "venice") else "/v1/chat/completions"
    for k in KINDS
}
MESSAGES_PATH = {k: "/api/v1/messages" if k == "openrouter" else "/v1/messages" for k in KINDS}


# --- helpers --------------------------------------------------------------------------------------


def fixture_json(relative: str) -> Any:
    return orjson.loads((FIXTURES / relative).read_bytes())


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list", dict: "object"}[type(value)]


def shape_mismatches(sim: Any, ref: Any, where: str = "$") -> list[str]:
    """How `sim` differs from `ref` in keys, JSON types and nesting (values are ignored). A list
    element must have the shape of at least one of the fixture's elements."""
    if json_type(sim) != json_type(ref):
        return [f"{where}: {json_type(ref)} expected, got {json_type(sim)}"]
    if isinstance(ref, dict):
        out = []
        if set(sim) != set(ref):
            out.append(
                f"{where}: keys differ: missing {sorted(set(ref) - set(sim))}, "
                f"extra {sorted(set(sim) - set(ref))}"
            )
        for key in set(ref) & set(sim):
            out += shape_mismatches(sim[key], ref[key], f"{where}.{key}")
        return out
    if isinstance(ref, list):
        if not ref:
            return [] if not sim else [f"{where}: the fixture's list is empty, got elements"]
        out = []
        for index, item in enumerate(sim):
            each = [shape_mismatches(item, candidate, f"{where}[{index}]") for candidate in ref]
            if all(each):
                out += each[0]
        return out
    return []


def assert_shape(sim: Any, relative: str) -> None:
    problems = shape_mismatches(sim, fixture_json(relative))
    assert not problems, f"{relative}: " + "; ".join(problems)


def parse_sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, data): data is the parsed JSON, "[DONE]", or COMMENT for a `:` line."""
    events: list[tuple[str | None, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name = None
        data: Any = None
        for line in block.split("\n"):
            if line.startswith(":"):
                data = COMMENT
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                text = line[len("data: ") :]
                data = text if text == "[DONE]" else orjson.loads(text)
        events.append((name, data))
    return events


def openai_class(index: int, data: Any) -> str:
    if data == COMMENT:
        return "comment"
    if data == "[DONE]":
        return "done"
    if "error" in data:
        return "error"
    if data.get("choices") == []:
        return "usage"
    if data["choices"][0].get("finish_reason") is not None:
        return "finish"
    return "first" if index == 0 else "token"


def classified(events: list[tuple[str | None, Any]]) -> list[tuple[str, Any]]:
    out = []
    chunks = 0
    for _, data in events:
        cls = openai_class(chunks, data)
        if cls not in ("comment", "done"):
            chunks += 1
        out.append((cls, data))
    return out


def compressed(classes: list[str]) -> list[str]:
    """Runs collapsed, `first`/`token` both read as `content`, comments (keepalives) left out."""
    out: list[str] = []
    for cls in classes:
        if cls == "comment":
            continue
        merged = "content" if cls in ("first", "token") else cls
        if not out or out[-1] != merged:
            out.append(merged)
    return out


def assert_openai_stream_like(raw: bytes, relative: str) -> None:
    sim = classified(parse_sse(raw))
    ref = classified(parse_sse((FIXTURES / relative).read_bytes()))
    assert compressed([c for c, _ in sim]) == compressed([c for c, _ in ref]), relative
    if any(c == "comment" for c, _ in ref):
        assert sim[0][0] == "comment"  # OpenRouter's keepalive while it waits
    for cls in ("first", "token", "finish", "usage", "error"):
        sim_of = [d for c, d in sim if c == cls]
        ref_of = [d for c, d in ref if c == cls]
        if sim_of and ref_of:
            problems = shape_mismatches(sim_of[0], ref_of[0])
            assert not problems, f"{relative} {cls}: {problems}"


def assert_anthropic_stream_like(raw: bytes, relative: str) -> None:
    sim = parse_sse(raw)
    ref = parse_sse((FIXTURES / relative).read_bytes())

    def names(events: list[tuple[str | None, Any]]) -> list[str | None]:
        out: list[str | None] = []
        for name, _ in events:
            if not out or out[-1] != name:
                out.append(name)
        return out

    assert names(sim) == names(ref), relative
    for name, data in ref:
        first = next(d for n, d in sim if n == name)
        assert data["type"] == first["type"]
        problems = shape_mismatches(first, data)
        assert not problems, f"{relative} {name}: {problems}"


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        **extra,
    }


def usage_options() -> dict[str, Any]:
    return {"stream_options": {"include_usage": True}}


def text_of(events: list[tuple[str | None, Any]]) -> str:
    out = []
    for _, data in events:
        if isinstance(data, dict) and data.get("choices"):
            out.append(data["choices"][0]["delta"].get("content") or "")
    return "".join(out)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.read(), response.headers


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, bytes, Any]:
    async with http.post(url, json=body, **kwargs) as response:
        return response.status, await response.read(), response.headers


# --- discovery answers have the fixtures' shapes --------------------------------------------------

#: (kind, method, path, request body, fixture, status)
DISCOVERY = [
    ("vllm", "GET", "/v1/models", None, "vllm/models.json", 200),
    ("vllm", "GET", "/version", None, "vllm/version.json", 200),
    ("vllm", "GET", "/load", None, "vllm/load.json", 200),
    ("llamacpp", "GET", "/health", None, "llamacpp/health-ok.json", 200),
    ("llamacpp", "GET", "/v1/models", None, "llamacpp/models.json", 200),
    ("llamacpp", "GET", "/models", None, "llamacpp/models.json", 200),
    ("llamacpp", "GET", "/api/tags", None, "llamacpp/models.json", 200),
    ("llamacpp", "GET", "/props", None, "llamacpp/props.json", 200),
    ("llamacpp", "GET", "/slots", None, "llamacpp/slots.json", 200),
    ("lmstudio", "GET", "/v1/models", None, "lmstudio/v1-models.json", 200),
    ("lmstudio", "GET", "/api/v0/models", None, "lmstudio/api-v0-models.json", 200),
    ("lmstudio", "GET", "/api/v1/models", None, "lmstudio/api-v1-models.json", 200),
    ("ollama", "GET", "/api/version", None, "ollama/version.json", 200),
    ("ollama", "GET", "/api/tags", None, "ollama/tags.json", 200),
    ("ollama", "GET", "/api/ps", None, "ollama/ps.json", 200),
    ("ollama", "POST", "/api/show", {"model": "llama3.2:latest"}, "ollama/show.json", 200),
    ("ollama", "POST", "/api/show", {"name": "llama3.2:latest"}, "ollama/show.json", 200),
    ("ollama", "GET", "/v1/models", None, "ollama/v1-models.json", 200),
    ("ollama", "POST", "/api/show", {"model": "llama9:70b"}, "ollama/error-404.json", 404),
    ("openrouter", "GET", "/api/v1/models", None, "openrouter/models.json", 200),
    ("openrouter", "GET", "/api/v1/key", None, "openrouter/key.json", 200),
    ("openrouter", "GET", "/api/v1/auth/key", None, "openrouter/key.json", 200),
    ("venice", "GET", "/api/v1/models?type=text", None, "venice/models-text.json", 200),
    ("venice", "GET", "/api/v1/models", None, "venice/models-text.json", 200),
]


@pytest.mark.parametrize("case", DISCOVERY, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
async def test_discovery_answers_have_the_fixture_shapes(
    http: aiohttp.ClientSession, case: tuple[str, str, str, Any, str, int]
) -> None:
    kind, method, path, body, relative, status = case
    async with SimBackend(kind) as sim, http.request(method, sim.url + path, json=body) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert_shape(orjson.loads(await response.read()), relative)


async def test_each_listing_carries_the_configured_models_and_windows(
    http: aiohttp.ClientSession,
) -> None:
    models = [SimModel("m-one", 4096), SimModel("m-two", 12288)]
    async with SimBackend("vllm", models) as sim:
        _, body, _ = await get(http, sim.url + "/v1/models")
        listed = {e["id"]: e["max_model_len"] for e in orjson.loads(body)["data"]}
    assert listed == {"m-one": 4096, "m-two": 12288}
    async with SimBackend("openrouter", models, price_in_usd_per_1m="0.13") as sim:
        _, body, _ = await get(http, sim.url + "/api/v1/models")
        entry = orjson.loads(body)["data"][0]
    assert entry["context_length"] == 4096
    assert entry["pricing"]["prompt"] == "0.00000013"  # USD per token, as a string
    async with SimBackend("venice", models, price_out_usd_per_1m="2.8") as sim:
        _, body, _ = await get(http, sim.url + "/api/v1/models?type=text")
        spec = orjson.loads(body)["data"][1]["model_spec"]
        _, images, _ = await get(http, sim.url + "/api/v1/models?type=image")
    assert spec["availableContextTokens"] == 12288
    assert spec["pricing"]["output"]["usd"] == 2.8  # USD per 1M tokens, a number
    assert orjson.loads(images)["data"] == []


async def test_health_and_fingerprints_per_kind(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm") as sim:
        assert (await get(http, sim.url + "/health"))[:2] == (200, b"")
        _, schema, _ = await get(http, sim.url + "/openapi.json")
        assert "/v1/messages" in orjson.loads(schema)["paths"]
    async with SimBackend("ollama") as sim:
        status, text, _ = await get(http, sim.url + "/")
        assert (status, text) == (200, (FIXTURES / "ollama/root.txt").read_bytes())
        async with http.head(sim.url + "/") as response:
            assert response.status == 200
        assert (await get(http, sim.url + "/health"))[0] == 404
    async with SimBackend("lmstudio") as sim:
        status, body, _ = await get(http, sim.url + "/health")  # LM Studio: 200 for anything
        assert status == 200
        assert "Unexpected endpoint" in orjson.loads(body)["error"]


async def test_llamacpp_with_several_models_is_in_router_mode(http: aiohttp.ClientSession) -> None:
    models = [SimModel("gemma", 8192), SimModel("qwen", 16384)]
    async with SimBackend("llamacpp", models) as sim:
        _, body, _ = await get(http, sim.url + "/v1/models")
        assert_shape(orjson.loads(body), "llamacpp/router-models.json")
        _, props, _ = await get(http, sim.url + "/props", params={"model": "qwen"})
        assert orjson.loads(props)["default_generation_settings"]["n_ctx"] == 16384
        status, _, _ = await get(http, sim.url + "/props")
        assert status == 400  # router mode's GET endpoints need ?model=


async def test_metrics_have_the_fixture_families(http: aiohttp.ClientSession) -> None:
    for kind in ("vllm", "llamacpp"):
        async with SimBackend(kind) as sim:
            _, body, _ = await get(http, sim.url + "/metrics")

        def families(text: str) -> set[tuple[str, str, frozenset[str]]]:
            return {
                (f.name, f.type, frozenset(label for s in f.samples for label in s.labels))
                for f in text_string_to_metric_families(text)
            }

        expected = families((FIXTURES / f"{kind}/metrics.txt").read_text())
        assert families(body.decode()) == expected


#: (kind, how to provoke it, fixture, status)
ERRORS: list[tuple[str, str, str, int]] = [
    ("vllm", "no-key", "vllm/error-401.json", 401),
    ("vllm", "unknown-model", "vllm/error-400-context-length.json", 404),
    ("vllm", "messages-without-max-tokens", "vllm/error-anthropic.json", 400),
    ("llamacpp", "no-key", "llamacpp/error-401.json", 401),
    ("llamacpp", "fault-500", "llamacpp/error-not-supported.json", 500),
    ("lmstudio", "unknown-model", "lmstudio/error-model-not-found.json", 404),
    ("lmstudio", "loading", "lmstudio/error-no-models-loaded.json", 400),
    ("lmstudio", "messages-without-max-tokens", "anthropic/error.json", 400),
    ("ollama", "unknown-model", "ollama/v1-error-404.json", 404),
    ("ollama", "messages-without-max-tokens", "ollama/error-anthropic.json", 400),
    ("openrouter", "no-key", "openrouter/error-401.json", 401),
    ("openrouter", "fault-502", "openrouter/error-502-metadata.json", 502),
    ("venice", "no-key", "venice/error-standard.json", 401),
    ("venice", "fault-429", "venice/error-overloaded.json", 429),
]


@pytest.mark.parametrize(("kind", "provoke", "relative", "status"), ERRORS)
async def test_error_bodies_have_the_fixture_shapes(
    http: aiohttp.ClientSession, kind: str, provoke: str, relative: str, status: int
) -> None:
    models = ["a", "b"] if provoke == "unknown-model" else None
    async with SimBackend(kind, models, api_key=KEY if provoke == "no-key" else None) as sim:
        body = chat_body(sim.models[0].name)
        path = CHAT_PATH[kind]
        if provoke == "unknown-model":
            body["model"] = "llama9:70b"
        elif provoke == "messages-without-max-tokens":
            path = MESSAGES_PATH[kind]
        elif provoke == "loading":
            sim.fault = Fault(kind="loading")
        elif provoke.startswith("fault-"):
            sim.fault = Fault(kind="http", status=int(provoke[len("fault-") :]))
        got, raw, headers = await post(http, sim.url + path, body)
    assert got == status
    assert_shape(orjson.loads(raw), relative)
    if status == 429:
        assert headers["Retry-After"].isdigit()


# --- the agent's own adapters discover every kind -------------------------------------------------

EXPECTED_FORMATS = {
    "vllm": {"openai", "anthropic"},
    "llamacpp": {"openai", "anthropic"},
    "lmstudio": {"openai"},
    "ollama": {"openai", "anthropic"},
    "openrouter": {"openai"},
    "venice": {"openai"},
}


async def discover(sim: SimBackend, timeout_s: int = 5) -> BackendReport:
    """One pass of the agent's discovery over `sim` (a BYOK kind reads its key from KEY_ENV)."""
    byok = sim.kind in ("openrouter", "venice")
    key = f'api_key_env = "{KEY_ENV}"\n' if byok or sim.api_key is not None else ""
    config = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f"[discovery]\ntimeout_s = {timeout_s}\n"
        f'[[backends]]\nkind = "{sim.kind}"\nurl = "{sim.base_url}"\n{key}'
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n",
        allow_insecure=True,  # the simulator speaks plain http on loopback
    )
    async with new_http_session(8) as http:
        result = await run_pass(config, http)
    (report,) = result.reports
    return report


@pytest.mark.parametrize("kind", KINDS)
async def test_the_agents_adapters_discover_the_simulated_models(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    byok = kind in ("openrouter", "venice")
    models = (
        [SimModel("sim-a", 4096)]
        if kind == "llamacpp"
        else [SimModel("sim-a", 4096), SimModel("sim-b:7b", 16384)]
    )
    async with SimBackend(
        kind, models, api_key=KEY if byok else None, price_in_usd_per_1m="0.25"
    ) as sim:
        report = await discover(sim)
    assert report.ok, report.error
    seen = {m.native_id: m for m in report.models}
    assert {name: m.context_window for name, m in seen.items()} == {
        m.name: m.context for m in models
    }
    assert all(m.loaded and m.chat for m in seen.values())
    assert report.formats == EXPECTED_FORMATS[kind]
    if byok:
        price = seen["sim-a"].upstream_price
        assert price is not None
        assert (price.input_usd_per_1m, price.output_usd_per_1m) == (
            Decimal("0.25"),
            Decimal("1.5"),
        )
        assert sim.requests[-1].headers["Authorization"] == f"Bearer {KEY}"


async def test_the_agent_reads_router_mode_and_an_old_ollama() -> None:
    models = [SimModel("gemma", 8192), SimModel("qwen", 16384)]
    async with SimBackend("llamacpp", models) as sim:
        report = await discover(sim)
    assert {m.native_id: m.context_window for m in report.models} == {"gemma": 8192, "qwen": 16384}
    async with SimBackend("ollama", anthropic=False) as sim:
        report = await discover(sim)
    assert report.formats == {"openai"}


@pytest.mark.parametrize("kind", KINDS)
async def test_loading_makes_the_agent_leave_the_backend_or_its_models_out(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    async with SimBackend(kind, fault=Fault(kind="loading")) as sim:
        report = await discover(sim)
    if kind == "lmstudio":  # LM Studio is up; its models are not loaded
        assert report.ok
        assert [m.loaded for m in report.models] == [False]
    else:
        assert not report.ok
        assert "503" in (report.error or "")


async def test_slow_health_trips_the_agents_budget(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", fault=Fault(kind="slow_health", delay_s=30)) as sim:
        report = await discover(sim, timeout_s=1)
        assert not report.ok
        assert "within 1s" in (report.error or "")
        sim.fault = Fault(kind="slow_health", delay_s=0.2, count=1)
        started = time.monotonic()
        status, _, _ = await get(http, sim.url + "/health")
        assert (status, time.monotonic() - started >= 0.2) == (200, True)
        assert sim.fault is None  # count 1: spent


# --- streams --------------------------------------------------------------------------------------

OPENAI_STREAMS = {
    "vllm": "vllm/chat-stream-usage.sse",
    "llamacpp": "llamacpp/chat-stream-usage.sse",
    "lmstudio": "lmstudio/chat-stream-usage.sse",
    "ollama": "ollama/v1-chat-stream-usage.sse",
    "openrouter": "openrouter/chat-stream.sse",
    "venice": "venice/chat-stream.sse",
}


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("kind", KINDS)
async def test_openai_streams_parse_like_the_fixtures(
    http: aiohttp.ClientSession, kind: str, rate: float
) -> None:
    async with SimBackend(kind, tokens=5, tokens_per_s=rate) as sim:
        status, raw, headers = await post(
            http, sim.url + CHAT_PATH[kind], chat_body(sim.models[0].name, **usage_options())
        )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert_openai_stream_like(raw, OPENAI_STREAMS[kind])
    events = parse_sse(raw)
    assert events[-1][1] == "[DONE]"
    assert text_of(events) == "".join(WORDS[i % len(WORDS)] for i in range(5))
    usage = next(d["usage"] for _, d in events if isinstance(d, dict) and d.get("choices") == [])
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    if kind == "llamacpp":
        timings = next(d["timings"] for _, d in events if isinstance(d, dict) and "timings" in d)
        assert timings["predicted_n"] == 5


@pytest.mark.parametrize("rate", RATES)
async def test_an_http_1_0_client_gets_an_unchunked_stream(rate: float) -> None:
    async with SimBackend("vllm", tokens=4, tokens_per_s=rate) as sim:
        reader, writer = await asyncio.open_connection(sim.host, sim.port)
        body = orjson.dumps(chat_body(sim.models[0].name))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        answer = await reader.read()  # the server closes when done
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"chunked" not in head.lower()
    events = parse_sse(payload)
    assert events[-1][1] == "[DONE]"
    assert text_of(events) == "".join(WORDS[:4])


@pytest.mark.parametrize("kind", KINDS)
async def test_usage_chunk_only_when_asked_except_byok(
    http: aiohttp.ClientSession, kind: str
) -> None:
    async with SimBackend(kind, tokens=3, tokens_per_s=0) as sim:
        _, raw, _ = await post(http, sim.url + CHAT_PATH[kind], chat_body(sim.models[0].name))
    events = [d for _, d in parse_sse(raw) if isinstance(d, dict)]
    has_usage = any(d.get("choices") == [] and "usage" in d for d in events)
    assert has_usage == (kind in ("openrouter", "venice"))
    if kind == "llamacpp":  # timings move to the finish chunk
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert "timings" in events[-1]


ANTHROPIC_STREAMS = {
    "vllm": "anthropic/messages-stream.sse",
    "llamacpp": "llamacpp/messages-stream.sse",
    "lmstudio": "anthropic/messages-stream.sse",
    "ollama": "ollama/messages-stream.sse",
    "openrouter": "anthropic/messages-stream.sse",
}


@pytest.mark.parametrize("kind", sorted(ANTHROPIC_STREAMS))
async def test_anthropic_streams_parse_like_the_fixtures(
    http: aiohttp.ClientSession, kind: str
) -> None:
    async with SimBackend(kind, tokens=4, tokens_per_s=0) as sim:
        body = chat_body(sim.models[0].name, max_tokens=64)
        status, raw, _ = await post(
            http, sim.url + MESSAGES_PATH[kind], body, headers={"x-api-key": "k"}
        )
    assert status == 200
    assert_anthropic_stream_like(raw, ANTHROPIC_STREAMS[kind])
    events = parse_sse(raw)
    assert all(data != "[DONE]" for _, data in events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "".join(WORDS[:4])
    delta = next(d for n, d in events if n == "message_delta")
    assert (delta["usage"]["output_tokens"], delta["delta"]["stop_reason"]) == (4, "end_turn")


async def test_venice_has_no_messages_route(http: aiohttp.ClientSession) -> None:
    async with SimBackend("venice") as sim:
        status, _, _ = await post(
            http, sim.url + "/api/v1/messages", chat_body("llama-3.3-70b", max_tokens=5)
        )
    assert status == 404


async def test_max_tokens_caps_the_answer(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", tokens=50, tokens_per_s=0) as sim:
        body = chat_body(sim.models[0].name, max_tokens=3, **usage_options())
        _, raw, _ = await post(http, sim.url + "/v1/chat/completions", body)
        events = classified(parse_sse(raw))
        finish = next(d for c, d in events if c == "finish")
        assert finish["choices"][0]["finish_reason"] == "length"
        body = chat_body(sim.models[0].name, max_tokens=2)
        _, raw, _ = await post(http, sim.url + "/v1/messages", body)
        delta = next(d for n, d in parse_sse(raw) if n == "message_delta")
        assert (delta["usage"]["output_tokens"], delta["delta"]["stop_reason"]) == (2, "max_tokens")


@pytest.mark.parametrize(
    ("kind", "route", "relative"),
    [
        ("vllm", "chat", "vllm/chat-completion.json"),
        ("llamacpp", "chat", "llamacpp/chat-completion.json"),
        ("llamacpp", "messages", "llamacpp/messages.json"),
    ],
)
async def test_unstreamed_answers_have_the_fixture_shapes(
    http: aiohttp.ClientSession, kind: str, route: str, relative: str
) -> None:
    async with SimBackend(kind, tokens=4, tokens_per_s=0) as sim:
        body = chat_body(sim.models[0].name, stream=False, max_tokens=10)
        path = "/v1/chat/completions" if route == "chat" else "/v1/messages"
        status, raw, _ = await post(http, sim.url + path, body)
    assert status == 200
    assert_shape(orjson.loads(raw), relative)
    assert sim.completed[sim.completions[0].key or ""] == 1


# --- faults ---------------------------------------------------------------------------------------

ERROR_STREAMS = {
    "vllm": "vllm/chat-stream-error.sse",
    "llamacpp": "llamacpp/chat-stream-error.sse",
    "openrouter": "openrouter/chat-stream-error.sse",
    "venice": "venice/chat-stream-error.sse",
}
#: Whether `[DONE]` follows the kind's mid-stream error.
DONE_AFTER_ERROR = {
    "vllm": True,
    "llamacpp": False,
    "lmstudio": True,
    "ollama": False,
    "openrouter": False,
    "venice": True,
}


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("kind", KINDS)
async def test_error_event_mid_stream_is_the_kinds_own(
    http: aiohttp.ClientSession, kind: str, rate: float
) -> None:
    async with SimBackend(
        kind, tokens=10, tokens_per_s=rate, fault=Fault(kind="error", after_tokens=1)
    ) as sim:
        status, raw, _ = await post(http, sim.url + CHAT_PATH[kind], chat_body(sim.models[0].name))
    assert status == 200
    if kind in ERROR_STREAMS:
        assert_openai_stream_like(raw, ERROR_STREAMS[kind])
    events = classified(parse_sse(raw))
    classes = [c for c, _ in events]
    assert "finish" not in classes and "usage" not in classes
    assert (classes[-1] == "done") == DONE_AFTER_ERROR[kind]
    assert ("error" in classes) == (kind != "ollama")  # Ollama's /v1 just ends the stream
    assert sim.requests[0].outcome == "error_event"
    assert sim.requests[0].tokens_sent == 1
    assert sum(sim.completed.values()) == 0


@pytest.mark.parametrize(
    ("kind", "relative"), [("vllm", "anthropic/messages-stream-error.sse"), ("llamacpp", None)]
)
async def test_error_event_in_an_anthropic_stream(
    http: aiohttp.ClientSession, kind: str, relative: str | None
) -> None:
    async with SimBackend(
        kind, tokens=10, tokens_per_s=0, fault=Fault(kind="error", after_tokens=2)
    ) as sim:
        _, raw, _ = await post(
            http, sim.url + "/v1/messages", chat_body(sim.models[0].name, max_tokens=20)
        )
    events = parse_sse(raw)
    assert events[0][0] == "message_start"
    assert events[-1][0] == "error"
    assert all(name != "message_stop" for name, _ in events)
    if relative is not None:
        problems = shape_mismatches(
            events[-1][1], parse_sse((FIXTURES / relative).read_bytes())[-1][1]
        )
        assert not problems
    else:  # llama.cpp's own {code, message, type}
        assert set(events[-1][1]) == {"code", "message", "type"}


async def read_until_broken(response: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    received = b""
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError as exc:
        return received, exc
    return received, None


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("kind", ["vllm", "ollama", "openrouter"])
async def test_die_cuts_the_connection_after_n_tokens(
    http: aiohttp.ClientSession, kind: str, rate: float
) -> None:
    fault = Fault(kind="die", after_tokens=3)
    async with (
        SimBackend(kind, tokens=10, tokens_per_s=rate, fault=fault) as sim,
        http.post(sim.url + CHAT_PATH[kind], json=chat_body(sim.models[0].name)) as response,
    ):
        assert response.status == 200
        received, error = await read_until_broken(response)
    assert error is not None  # the chunked body never ended
    events = parse_sse(received)
    assert text_of(events) == "".join(WORDS[:3])
    assert all(c not in ("finish", "done") for c, _ in classified(events))
    record = sim.completions[0]
    assert (record.outcome, record.tokens_sent, record.disconnected) == ("died", 3, False)
    assert sum(sim.served.values()) == 1
    assert sum(sim.completed.values()) == 0


@pytest.mark.parametrize("status", [500, 502, 503, 404, 429, 401])
async def test_http_faults_answer_the_status_then_clear_after_count(
    http: aiohttp.ClientSession, status: int
) -> None:
    async with SimBackend("vllm", tokens=2, tokens_per_s=0) as sim:
        sim.fault = Fault(kind="http", status=status, count=2)
        body = chat_body(sim.models[0].name)
        answers = [await post(http, sim.url + "/v1/chat/completions", body) for _ in range(3)]
        listing, _, _ = await get(http, sim.url + "/v1/models")  # completions only, by default
    assert [a[0] for a in answers] == [status, status, 200]
    assert "error" in orjson.loads(answers[0][1])
    assert listing == 200
    assert sim.fault is None
    assert sum(sim.served.values()) == 1


async def test_scope_all_reaches_discovery_too(http: aiohttp.ClientSession) -> None:
    async with SimBackend("llamacpp", fault=Fault(kind="http", status=500, scope="all")) as sim:
        statuses = [(await get(http, sim.url + p))[0] for p in ("/health", "/v1/models", "/props")]
        assert statuses == [500, 500, 500]
        report = await discover(sim)
    assert not report.ok


#: What a `usage` fault may report: beyond 64 bits, negative, huge floats, not a number at all.
ABSURD_FIGURES: list[Any] = [2**63, 2**64, 10**30, -1, 1e300, "12", None, math.nan]


def reported_counts(raw: bytes, names: tuple[str, ...]) -> list[Any]:
    """Every token count named `names` in an SSE body or a JSON answer, read with the stdlib's
    parser (exact integers beyond 64 bits; `NaN` too)."""
    found: list[Any] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key in names and not isinstance(value, dict | list):
                    found.append(value)
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    if raw.startswith(b"{"):
        walk(json.loads(raw))
        return found
    for line in raw.decode().split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            walk(json.loads(line[len("data: ") :]))
    return found


def same_figure(value: Any, figure: Any) -> bool:
    if isinstance(figure, float) and math.isnan(figure):
        return isinstance(value, float) and math.isnan(value)
    return type(value) is type(figure) and value == figure


@pytest.mark.parametrize("figure", ABSURD_FIGURES)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_usage_fault_reports_the_figure_in_every_count_and_the_stream_still_ends(
    http: aiohttp.ClientSession, kind: str, figure: Any
) -> None:
    outputs = ("completion_tokens", "output_tokens", "predicted_n")
    inputs = ("prompt_tokens", "input_tokens", "prompt_n")
    async with SimBackend(kind, tokens=3, tokens_per_s=0) as sim:
        name = sim.models[0].name
        bodies: list[tuple[str, dict[str, Any]]] = [
            (CHAT_PATH[kind], chat_body(name, **usage_options())),
            (CHAT_PATH[kind], chat_body(name, stream=False)),
        ]
        if sim.anthropic:
            bodies += [
                (MESSAGES_PATH[kind], chat_body(name, max_tokens=5)),
                (MESSAGES_PATH[kind], chat_body(name, max_tokens=5, stream=False)),
            ]
        for side in ("output", "input", "both"):
            for path, body in bodies:
                sim.fault = Fault(kind="usage", usage_figure=figure, usage_side=side, count=1)
                status, raw, _ = await post(http, sim.url + path, body)
                assert status == 200
                assert sim.fault is None  # count 1: spent
                changed = (outputs if side != "input" else ()) + (
                    inputs if side != "output" else ()
                )
                kept = outputs if side == "input" else inputs if side == "output" else ()
                counts = reported_counts(raw, changed)
                assert counts, (side, path, raw)
                assert all(same_figure(value, figure) for value in counts), (side, path, raw)
                assert all(isinstance(v, int) for v in reported_counts(raw, kept)), raw
                if body["stream"]:
                    end = b"message_stop" if path.endswith("/messages") else b"data: [DONE]"
                    assert end in raw
        _, plain, _ = await post(http, sim.url + CHAT_PATH[kind], bodies[0][1])
    assert all(isinstance(v, int) for v in reported_counts(plain, outputs + inputs))
    assert sum(sim.completed.values()) == 3 * len(bodies) + 1


async def test_a_usage_fault_beyond_64_bits_through_the_control_endpoint(
    http: aiohttp.ClientSession,
) -> None:
    async with SimBackend("vllm", tokens=2, tokens_per_s=0) as sim:
        fault = b'{"kind":"usage","usage_figure":100000000000000000000000000000,"count":1}'
        async with http.post(sim.url + "/__sim/fault", data=fault) as response:
            assert response.status == 200
        assert sim.fault is not None and sim.fault.usage_figure == 10**29
        status, raw, _ = await get(http, sim.url + "/__sim/state")
        assert status == 200 and b'"usage_figure":100000000000000000000000000000' in raw
        _, answer, _ = await post(
            http, sim.url + "/v1/chat/completions", chat_body(sim.models[0].name, stream=False)
        )
    assert b'"completion_tokens":100000000000000000000000000000' in answer
    assert Fault.from_spec("usage:1e300", 2) == Fault(kind="usage", usage_figure=1e300, count=2)
    assert Fault.from_spec('usage:"12"').usage_figure == "12"
    with pytest.raises(ValueError, match="--fault usage:JSON"):
        Fault.from_spec("usage:twelve")


async def test_the_fault_queue_follows_each_spent_fault_with_no_request_between(
    http: aiohttp.ClientSession,
) -> None:
    async with SimBackend("vllm", tokens=2, tokens_per_s=0) as sim:
        sim.fault_queue = [
            Fault(kind="http", status=503, count=2),
            Fault(kind="usage", usage_figure=-1, count=1),
            Fault(kind="http", status=429, count=1),
        ]
        body = chat_body(sim.models[0].name, **usage_options())
        answers = [await post(http, sim.url + "/v1/chat/completions", body) for _ in range(5)]
        assert [a[0] for a in answers] == [503, 503, 200, 429, 200]
        assert reported_counts(answers[2][1], ("completion_tokens",)) == [-1]
        assert reported_counts(answers[4][1], ("completion_tokens",)) == [2]
        assert sim.fault is None and sim.fault_queue == []
        listing = [
            {"kind": "http", "status": 502, "count": 1},
            {"kind": "usage", "usage_figure": 2**64, "usage_side": "both", "count": 1},
        ]
        async with http.post(sim.url + "/__sim/fault", json=listing) as response:
            assert response.status == 200
        _, raw, _ = await get(http, sim.url + "/__sim/state")
        assert orjson.loads(raw)["fault"]["status"] == 502
        assert b'"usage_figure":18446744073709551616' in raw
        statuses = [(await post(http, sim.url + "/v1/chat/completions", body))[0] for _ in range(2)]
        assert statuses == [502, 200]
        async with http.post(sim.url + "/__sim/fault", data=b"[null]") as response:
            assert response.status == 400
        async with http.post(sim.url + "/__sim/fault", data=b"null") as response:
            assert response.status == 200
        assert sim.fault is None and sim.fault_queue == []


async def test_hang_before_headers_records_the_client_giving_up(
    http: aiohttp.ClientSession,
) -> None:
    async with SimBackend("vllm", fault=Fault(kind="hang", count=1)) as sim:
        with pytest.raises(TimeoutError):
            await post(
                http,
                sim.url + "/v1/chat/completions",
                chat_body(sim.models[0].name),
                timeout=aiohttp.ClientTimeout(total=0.3),
            )
        gone = await sim.wait_for(lambda s: s.disconnects)
        status, _, _ = await post(
            http, sim.url + "/v1/chat/completions", chat_body(sim.models[0].name)
        )
    assert (gone[0].outcome, gone[0].status, gone[0].first_write_monotonic) == (
        "disconnected",
        None,
        None,
    )
    assert status == 200


async def test_a_hung_request_ends_when_the_sim_stops(http: aiohttp.ClientSession) -> None:
    sim = SimBackend("vllm", fault=Fault(kind="hang"))
    await sim.start()

    async def hung_client() -> None:
        with pytest.raises(aiohttp.ClientError):
            await post(http, sim.url + "/v1/chat/completions", chat_body("x"))

    async with asyncio.TaskGroup() as group:
        group.create_task(hung_client())
        await sim.wait_for(lambda s: s.requests)
        await sim.aclose()
    assert sim.requests[0].outcome == "stopped"
    assert not sim.requests[0].disconnected


async def test_stopping_the_sim_cuts_its_streams(http: aiohttp.ClientSession) -> None:
    sim = SimBackend("vllm", tokens=100_000, tokens_per_s=100)
    await sim.start()
    try:
        async with http.post(
            sim.url + "/v1/chat/completions", json=chat_body(sim.models[0].name)
        ) as response:
            await response.content.readuntil(b"\n\n")
            await sim.aclose()
            _, error = await read_until_broken(response)
    finally:
        await sim.aclose()
    assert error is not None
    assert (sim.requests[0].outcome, sim.requests[0].disconnected) == ("stopped", False)
    assert sim.active == 0


async def test_refuse_resets_connections_then_clears(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", tokens=1, fault=Fault(kind="refuse", count=2)) as sim:
        reader, writer = await asyncio.open_connection(sim.host, sim.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        with pytest.raises(aiohttp.ClientOSError):
            await post(http, sim.url + "/v1/chat/completions", chat_body(sim.models[0].name))
        status, _, _ = await post(
            http, sim.url + "/v1/chat/completions", chat_body(sim.models[0].name)
        )
    assert (sim.refused, status) == (2, 200)
    assert len(sim.requests) == 1  # the refused ones never got in


async def test_kill_closes_the_port_and_cuts_streams_restart_reopens_it(
    http: aiohttp.ClientSession,
) -> None:
    async with SimBackend("vllm", tokens=1000, tokens_per_s=200) as sim:
        port = sim.port
        async with http.post(
            sim.url + "/v1/chat/completions", json=chat_body(sim.models[0].name)
        ) as response:
            for _ in range(3):
                await response.content.readuntil(b"\n\n")
            await sim.kill()
            _, error = await read_until_broken(response)
        assert error is not None
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(http, sim.url + "/health")
        assert (sim.requests[0].outcome, sim.requests[0].disconnected) == ("killed", False)
        await sim.restart()
        assert sim.port == port
        assert (await get(http, sim.url + "/health"))[0] == 200


async def test_a_client_that_goes_away_mid_stream_is_recorded(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", tokens=1000, tokens_per_s=100) as sim:
        async with http.post(
            sim.url + "/v1/chat/completions", json=chat_body(sim.models[0].name)
        ) as response:
            await response.content.readuntil(b"\n\n")
            response.close()
        gone = await sim.wait_for(lambda s: s.disconnects)
        assert sim.active == 0
    assert gone[0].outcome == "disconnected"
    assert 0 < gone[0].tokens_sent < 1000
    assert sum(sim.completed.values()) == 0


@pytest.mark.parametrize("rate", RATES)
async def test_ttft_and_the_first_write_timestamps(
    http: aiohttp.ClientSession, rate: float
) -> None:
    async with SimBackend("llamacpp", tokens=2, tokens_per_s=rate, ttft_s=0.1) as sim:
        before_wall = time.time()
        await post(http, sim.url + "/v1/chat/completions", chat_body("x"))
    (record,) = sim.completions
    assert record.first_write_monotonic is not None and record.first_write_wall is not None
    assert record.first_write_monotonic - record.received_monotonic >= 0.1
    assert before_wall <= record.received_wall <= record.first_write_wall
    assert record.finished_monotonic is not None
    assert record.finished_monotonic >= record.first_write_monotonic


# --- records and counters -------------------------------------------------------------------------


def test_job_key_order() -> None:
    raw = b'{"model":"m"}'
    body: dict[str, Any] = {"user": "u", "metadata": {"job": "j", "user_id": "a"}}
    assert job_key({"X-Request-Id": "r"}, body, raw) == "r"
    assert job_key({}, body, raw) == "j"
    assert job_key({}, {"user": "u", "metadata": {"user_id": "a"}}, raw) == "u"
    assert job_key({}, {"metadata": {"user_id": "a"}}, raw) == "a"
    odd: Any
    for odd in ({}, {"user": 5}, {"metadata": "x"}, {"metadata": {"job": ""}}, [], None):
        assert job_key({}, odd, raw).startswith("sha256:")
    assert job_key({}, {}, raw) != job_key({}, {}, raw + b" ")


async def test_served_and_completed_count_by_job_key(http: aiohttp.ClientSession) -> None:
    async with SimBackend("ollama", tokens=2, tokens_per_s=0) as sim:
        name = sim.models[0].name
        for job in ("job-1", "job-2", "job-1"):
            await post(
                http, sim.url + "/v1/chat/completions", chat_body(name, metadata={"job": job})
            )
        await post(
            http,
            sim.url + "/v1/messages",
            chat_body(name, max_tokens=5, metadata={"user_id": "job-3"}),
        )
        await post(
            http,
            sim.url + "/v1/chat/completions",
            chat_body(name),
            headers={"X-Request-Id": "job-4"},
        )
        await get(http, sim.url + "/api/tags")
    assert sim.served == {"job-1": 2, "job-2": 1, "job-3": 1, "job-4": 1}
    assert sim.completed == sim.served
    assert len(sim.completions) == 5 and len(sim.requests) == 6
    assert sim.requests[0].json()["metadata"] == {"job": "job-1"}
    assert sim.requests[-2].headers["x-request-id"] == "job-4"  # case-insensitive


async def test_the_control_endpoints(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", tokens=2, tokens_per_s=0, api_key=KEY) as sim:
        auth = {"Authorization": f"Bearer {KEY}"}
        name = sim.models[0].name
        status, _, _ = await post(
            http, sim.url + "/__sim/fault", {"kind": "http", "status": 503, "count": 1}
        )
        assert status == 200
        assert sim.fault == Fault(kind="http", status=503, count=1)
        first = await post(
            http, sim.url + "/v1/chat/completions", chat_body(name, user="u"), headers=auth
        )
        second = await post(
            http, sim.url + "/v1/chat/completions", chat_body(name, user="u"), headers=auth
        )
        assert (first[0], second[0]) == (503, 200)
        for bad in (b"{", b'{"kind":"nope"}', b'{"kind":"http","status":200}'):
            async with http.post(sim.url + "/__sim/fault", data=bad) as response:
                assert response.status == 400
        status, raw, _ = await get(http, sim.url + "/__sim/state")
    state = orjson.loads(raw)
    assert state["served"] == {"u": 1}
    assert [r["status"] for r in state["requests"]] == [503, 200]
    assert state["requests"][1]["first_write_wall"] is not None
    assert KEY.encode() not in raw  # headers (and their keys) stay out of it


async def test_api_key_guards_what_the_real_server_guards(http: aiohttp.ClientSession) -> None:
    async with SimBackend("vllm", api_key=KEY, tokens=1, tokens_per_s=0) as sim:
        assert (await get(http, sim.url + "/health"))[0] == 200  # public
        assert (await get(http, sim.url + "/v1/models"))[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await get(http, sim.url + "/v1/models", headers=wrong))[0] == 401
        right = {"Authorization": f"Bearer {KEY}"}
        assert (await get(http, sim.url + "/v1/models", headers=right))[0] == 200
        body = chat_body(sim.models[0].name, max_tokens=5)
        assert (await post(http, sim.url + "/v1/messages", body, headers={"x-api-key": KEY}))[
            0
        ] == 200
    async with SimBackend("ollama", api_key=KEY) as sim:  # Ollama never checks
        assert (await get(http, sim.url + "/api/tags"))[0] == 200


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_request_bodies_get_the_kinds_400(http: aiohttp.ClientSession, kind: str) -> None:
    bodies = [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"text"', b'{"model": 5}']
    async with SimBackend(kind) as sim:
        for raw in bodies:
            async with http.post(sim.url + CHAT_PATH[kind], data=raw) as response:
                answer = orjson.loads(await response.read())
                if raw == b'{"model": 5}' and kind in ("llamacpp", "lmstudio"):
                    assert response.status == 200  # these serve their one model whatever is asked
                    continue
                assert response.status in (400, 404), raw
                assert "error" in answer
        weird = chat_body("a\x00b\u202e" + "x" * 10_000, max_tokens=2)
        status, _, _ = await post(http, sim.url + CHAT_PATH[kind], weird)
        assert status in (200, 404)
        big = chat_body(sim.models[0].name, max_tokens=2, stream=False)
        big["messages"][0]["content"] = "y" * 3_000_000
        status, raw, _ = await post(http, sim.url + CHAT_PATH[kind], big)
        assert status == 200


def test_bad_knobs_are_refused() -> None:
    for kwargs in (
        {"kind": "tgi"},
        {"kind": "vllm", "models": []},
        {"kind": "vllm", "models": ["a", "a"]},
        {"kind": "vllm", "models": [""]},
        {"kind": "vllm", "models": ["a\nb"]},
        {"kind": "vllm", "models": [SimModel("a", 0)]},
        {"kind": "vllm", "tokens": 0},
        {"kind": "vllm", "tokens_per_s": -1},
        {"kind": "vllm", "tokens_per_s": float("nan")},
        {"kind": "vllm", "ttft_s": float("inf")},
    ):
        with pytest.raises(ValueError):
            SimBackend(**kwargs)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8000") == ("::1", 8000)
    assert parse_listen("localhost:65535") == ("localhost", 65535)
    for bad in (
        "",
        "host",
        ":80",
        "host:",
        "host:65536",
        "host:-1",
        "ho st:80",
        "a\x00:80",
        "h:8O",
        "[::1]",
        "h:\uff18\uff10",  # fullwidth digits
        "h:\u00b2",
    ):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_fault_specs() -> None:
    assert Fault.from_spec("http:503", 2) == Fault(kind="http", status=503, count=2)
    assert Fault.from_spec("die:4") == Fault(kind="die", after_tokens=4)
    assert Fault.from_spec("slow_health:1.5", scope="all").delay_s == 1.5
    for bad in (
        "",
        "boom",
        "http",
        "http:200",
        "http:abc",
        "hang:1",
        "die:-2",
        "die:1.5",
        "slow_health:nan",
    ):
        if bad == "http":
            assert Fault.from_spec(bad).status == 500  # the default status
            continue
        with pytest.raises(ValueError, match="--fault"):
            Fault.from_spec(bad)
    with pytest.raises(ValueError, match="--fault-count"):
        Fault.from_spec("hang", 0)


# --- the command ----------------------------------------------------------------------------------


def test_the_cli_knows_every_kind() -> None:
    assert cli.SIM_KINDS == KINDS


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provider_agent", "sim-backend", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--kind", "vllm", "--listen", value]
        for value in (
            "",
            "nope",
            "127.0.0.1",
            ":8000",
            "127.0.0.1:99999",
            "127.0.0.1:-5",
            "a b:80",
            "h\x1b[31m:80",
        )
    ]
    + [
        ["--kind", "vllm", "--model", "m=big"],
        ["--kind", "vllm", "--fault", "explode"],
        ["--kind", "vllm", "--fault-count", "2"],
        ["--kind", "vllm", "--tokens", "0"],
        ["--kind", "vllm", "--price-in", "cheap"],
        ["--kind", "openrouter", "--api-key-env", "SIM_BACKEND_UNSET_VARIABLE"],
    ],
)
def test_bad_options_are_one_line_and_exit_2(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("sim-backend: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "\x1b" not in result.stderr


def test_an_address_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--kind", "vllm", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert (
        result.stderr == f"sim-backend: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_command_serves_until_a_signal_then_exits_0(
    signum: signal.Signals, http: aiohttp.ClientSession
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_agent",
        "sim-backend",
        "--kind",
        "openrouter",
        "--listen",
        "127.0.0.1:0",
        "--model",
        "sim/one=32768",
        "--api-key-env",
        KEY_ENV,
        "--fault",
        "http:503",
        "--fault-count",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, KEY_ENV: KEY},
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        base = line.split()[-1]
        assert line.startswith("sim-backend: openrouter serving sim/one at http://127.0.0.1:")
        assert base.endswith("/api/v1")
        _, raw, _ = await get(http, base + "/models")
        assert orjson.loads(raw)["data"][0]["context_length"] == 32768
        auth = {"Authorization": f"Bearer {KEY}"}
        assert (await get(http, base + "/key"))[0] == 401
        answers = [
            (await post(http, base + "/chat/completions", chat_body("sim/one"), headers=auth))[0]
            for _ in range(2)
        ]
        assert answers == [503, 200]
    finally:
        process.send_signal(signum)
        code = await asyncio.wait_for(process.wait(), 20)
    stderr = (await process.stderr.read()).decode()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert KEY not in stderr + line
