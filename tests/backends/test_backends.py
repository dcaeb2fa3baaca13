"""Behaviour every adapter shares: the registry, garbage, oversize bodies, silence, refusals."""

from __future__ import annotations

import time
import typing

import pytest
from aiohttp import ClientSession, web

from provider_agent.backends import ADAPTERS, make_backend
from provider_agent.backends.base import LISTING_CAP_BYTES, Backend
from provider_agent.backends.llamacpp import LlamaCppBackend
from provider_agent.backends.lmstudio import LmStudioBackend
from provider_agent.backends.ollama import OllamaBackend
from provider_agent.backends.openrouter import OpenRouterBackend
from provider_agent.backends.venice import VeniceBackend
from provider_agent.backends.vllm import VllmBackend
from provider_agent.config.schema import BackendConfig, BackendKind
from provider_agent.errors import BackendError
from tests.conftest import FakeServer

KINDS: tuple[str, ...] = typing.get_args(BackendKind)
KEY_ENV = "PA_TEST_BACKEND_KEY"
SECRET = "sk-test-DO-NOT-LEAK-4f1c9a"


def build(
    kind: str, url: str, http: ClientSession, timeout_s: float = 5, **extra: object
) -> Backend:
    """An adapter of `kind` pointed at `url` (BYOK kinds get their /api/v1 base and a key env)."""
    if kind in ("openrouter", "venice"):
        config = BackendConfig.model_validate(
            {"kind": kind, "url": f"{url}/api/v1", "api_key_env": KEY_ENV, **extra}
        )
    else:
        config = BackendConfig.model_validate({"kind": kind, "url": url, **extra})
    return make_backend(config, http, timeout_s)


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def test_registry_covers_every_kind_with_its_class() -> None:
    assert set(ADAPTERS) == set(KINDS)
    expected = {
        "vllm": VllmBackend,
        "llamacpp": LlamaCppBackend,
        "lmstudio": LmStudioBackend,
        "ollama": OllamaBackend,
        "openrouter": OpenRouterBackend,
        "venice": VeniceBackend,
    }
    assert expected == ADAPTERS
    for kind, cls in ADAPTERS.items():
        assert cls.kind == kind


@pytest.mark.parametrize("kind", KINDS)
async def test_make_backend_builds_the_kind_with_timeout(
    kind: str, http_session: ClientSession
) -> None:
    backend = build(kind, "http://127.0.0.1:9", http_session, timeout_s=2.5)
    assert type(backend) is ADAPTERS[kind]
    assert backend.timeout_s == 2.5
    assert backend.http is http_session


@pytest.mark.parametrize("kind", KINDS)
async def test_config_formats_override_detection(
    kind: str, fake_server: FakeServer, http_session: ClientSession
) -> None:
    backend = build(kind, fake_server.url, http_session, formats=["anthropic"])
    assert await backend.formats() == frozenset({"anthropic"})
    assert fake_server.requests == []


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_json_listing_is_backend_error(
    kind: str, fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("*", "*", b'{"data": [ {"id": "x",', content_type="application/json")
    backend = build(kind, fake_server.url, http_session)
    with pytest.raises(BackendError, match="not JSON"):
        await backend.list_models()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "chunked"])
async def test_oversize_body_is_backend_error(
    kind: str, chunked: bool, fake_server: FakeServer, http_session: ClientSession
) -> None:
    blob = b'{"data": [' + b" " * (LISTING_CAP_BYTES + 1024) + b"]}"

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(blob)
        await response.prepare(request)
        try:
            for start in range(0, len(blob), 1 << 20):
                await response.write(blob[start : start + (1 << 20)])
        except (ConnectionError, RuntimeError):
            pass  # the client hung up once it had seen enough: that is the point
        return response

    fake_server.reply("*", "*", huge)
    backend = build(kind, fake_server.url, http_session)
    with pytest.raises(BackendError, match="exceeds") as caught:
        await backend.list_models()
    message = str(caught.value)
    assert message.startswith("GET /")
    assert ("response body exceeds" in message) is chunked  # sized bodies are refused unread


@pytest.mark.parametrize("kind", KINDS)
async def test_silent_server_times_out_within_bounds(
    kind: str, silent_server: str, http_session: ClientSession
) -> None:
    backend = build(kind, silent_server, http_session, timeout_s=0.3)
    started = time.monotonic()
    health = await backend.health()
    assert not health.ok
    assert health.error is not None and "no answer within 0.3s" in health.error
    with pytest.raises(BackendError, match=r"no answer within 0\.3s"):
        await backend.list_models()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("kind", KINDS)
async def test_refused_connection_is_unhealthy_not_raised(
    kind: str, http_session: ClientSession
) -> None:
    # Port 9 (discard) on loopback: nothing listens there in a test environment.
    backend = build(kind, "http://127.0.0.1:9", http_session, timeout_s=2)
    health = await backend.health()
    assert not health.ok
    assert health.error is not None and "cannot connect" in health.error


@pytest.mark.parametrize("kind", KINDS)
async def test_rejected_credentials_never_echo_the_key(
    kind: str, fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("*", "*", {"error": f"bad key {SECRET}"}, status=401)
    backend = build(kind, fake_server.url, http_session, api_key_env=KEY_ENV)
    with pytest.raises(BackendError) as caught:
        await backend.list_models()
    assert "401" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert fake_server.requests[0].headers["Authorization"] == f"Bearer {SECRET}"


async def test_every_request_names_the_agent_and_its_version(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    from provider_agent.backends.base import USER_AGENT

    fake_server.reply("GET", "/health", b"")
    fake_server.reply("GET", "/v1/models", {"object": "list", "data": [{"id": "m"}]})
    backend = make_backend(
        BackendConfig(kind="vllm", url=fake_server.url), http_session, timeout_s=2
    )
    assert (await backend.health()).ok
    assert [m.native_id for m in await backend.list_models()] == ["m"]
    agents = {r.headers.get("User-Agent") for r in fake_server.requests}
    assert agents == {USER_AGENT} and USER_AGENT.startswith("provider-agent/")


HOSTILE_BODIES = [
    b"\x1b[2J\x1b[31mEVIL\x1b[0m\r\n12:00:00 INFO forged\x00\x07",
    b"\xff\xfe\x00\x1b garbage bytes \x9b31m",
    "bidi \u202e reversed \u2028 line".encode(),
    b"http://admin:s3cret@10.0.0.1:8000 refused",
    b"y" * 100_000,
]


def assert_one_safe_line(text: str) -> None:
    assert text.isprintable(), repr(text[:200])
    assert len(text) < 400
    assert "s3cret" not in text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=["ansi", "bytes", "bidi", "creds", "huge"])
async def test_error_bodies_are_escaped_and_cut(
    kind: str, body: bytes, fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("*", "*", body, status=500, content_type="text/plain")
    backend = build(kind, fake_server.url, http_session)
    health = await backend.health()
    assert not health.ok and health.error is not None
    assert "500" in health.error
    assert_one_safe_line(health.error)
    with pytest.raises(BackendError) as caught:
        await backend.list_models()
    assert_one_safe_line(str(caught.value))


@pytest.mark.parametrize("message", ["\x1b[31mLoading\r\nmodel\x00", "z" * 10_000])
async def test_llamacpp_loading_reason_is_escaped(
    message: str, fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/health", {"error": {"code": 503, "message": message}}, status=503)
    health = await build("llamacpp", fake_server.url, http_session).health()
    assert health.error is not None and health.error.startswith("GET /health: HTTP 503")
    assert_one_safe_line(health.error)
