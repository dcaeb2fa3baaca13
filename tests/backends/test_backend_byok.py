"""OpenRouter and Venice adapters: default bases, Bearer keys, health, list prices as exact
Decimals, context windows, offline and non-text models."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession

from provider_agent.backends import make_backend
from provider_agent.backends.base import ModelInfo, UpstreamPrice
from provider_agent.backends.openrouter import OpenRouterBackend
from provider_agent.backends.openrouter import parse_listing as parse_openrouter_listing
from provider_agent.backends.openrouter import parse_models as parse_openrouter
from provider_agent.backends.openrouter import parse_price as openrouter_price
from provider_agent.backends.venice import VeniceBackend
from provider_agent.backends.venice import parse_models as parse_venice
from provider_agent.backends.venice import parse_price as venice_price
from provider_agent.config.schema import BackendConfig
from provider_agent.errors import BackendAuthError
from tests.conftest import FakeServer, fixture_bytes

KEY_ENV = "PA_TEST_BYOK_KEY"
SECRET = "sk-or-v1-0123456789abcdef-SECRET"


@pytest.fixture(autouse=True)
def _no_credentials_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def with_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def byok(kind: str, url: str | None, http: ClientSession) -> OpenRouterBackend | VeniceBackend:
    config = BackendConfig(kind=kind, url=url, api_key_env=KEY_ENV)
    backend = make_backend(config, http, 2)
    assert isinstance(backend, OpenRouterBackend | VeniceBackend)
    return backend


def venice_listing() -> dict[str, object]:
    """The fixture plus an offline model, one without pricing or availableContextTokens, and an
    image model that a `type=text` listing should not contain but might."""
    listing = orjson.loads(fixture_bytes("venice/models-text.json"))
    listing["data"] += [
        {
            "id": "offline-model",
            "type": "text",
            "model_spec": {
                "availableContextTokens": 32768,
                "offline": True,
                "pricing": {"input": {"usd": 0.15}, "output": {"usd": 0.6}},
            },
        },
        {"id": "unpriced", "type": "text", "context_length": 65536, "model_spec": {}},
        {"id": "flux-dev", "type": "image", "model_spec": {"pricing": {"generation": 0.01}}},
    ]
    return listing  # type: ignore[no-any-return]


# --- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "base"),
    [("openrouter", "https://openrouter.ai/api/v1"), ("venice", "https://api.venice.ai/api/v1")],
)
async def test_default_base_url(kind: str, base: str, http_session: ClientSession) -> None:
    backend = byok(kind, None, http_session)
    assert backend.base_url == base
    assert backend.stream_url("openai") == f"{base}/chat/completions"


@pytest.mark.parametrize("kind", ["openrouter", "venice"])
async def test_formats_openai_only(
    kind: str, fake_server: FakeServer, http_session: ClientSession
) -> None:
    backend = byok(kind, f"{fake_server.url}/api/v1", http_session)
    assert await backend.formats() == frozenset({"openai"})


# --- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openrouter", "venice"])
async def test_missing_key_names_the_variable(
    kind: str,
    fake_server: FakeServer,
    http_session: ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # exists, holds no key
    backend = byok(kind, f"{fake_server.url}/api/v1", http_session)
    health = await backend.health()
    assert not health.ok
    assert health.error is not None and KEY_ENV in health.error
    with pytest.raises(BackendAuthError, match=KEY_ENV):
        await backend.list_models()
    assert fake_server.requests == []


@pytest.mark.parametrize("kind", ["openrouter", "venice"])
async def test_key_from_credentials_directory(
    kind: str,
    fake_server: FakeServer,
    http_session: ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / KEY_ENV).write_text(SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    fake_server.fixture(
        "GET",
        "/api/v1/models",
        f"{kind}/{'models' if kind == 'openrouter' else 'models-text'}.json",
    )
    await byok(kind, f"{fake_server.url}/api/v1", http_session).list_models()
    assert fake_server.requests[0].headers["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.usefixtures("with_key")
async def test_openrouter_rejected_key_is_unhealthy_without_the_key(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.fixture("GET", "/api/v1/key", "openrouter/error-401.json", status=401)
    health = await byok("openrouter", f"{fake_server.url}/api/v1", http_session).health()
    assert not health.ok
    assert health.error == "GET /api/v1/key: HTTP 401 (credentials rejected)"
    assert SECRET not in health.error


# --- OpenRouter ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("with_key")
async def test_openrouter_happy_path(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.fixture("GET", "/api/v1/key", "openrouter/key.json")
    fake_server.fixture("GET", "/api/v1/models", "openrouter/models.json")
    backend = byok("openrouter", f"{fake_server.url}/api/v1", http_session)

    health = await backend.health()
    assert health.ok, health.error
    assert fake_server.seen("GET", "/api/v1/key")[0].headers["Authorization"] == f"Bearer {SECRET}"
    models = await backend.list_models()
    assert models == [
        ModelInfo(
            "meta-llama/llama-3.3-70b-instruct",
            context_window=131072,
            upstream_price=UpstreamPrice(Decimal("0.13"), Decimal("0.4")),
        ),
        ModelInfo(
            "anthropic/claude-sonnet-4",
            context_window=200000,
            upstream_price=UpstreamPrice(Decimal("3"), Decimal("15")),
        ),
    ]
    price = models[0].upstream_price
    assert price is not None
    assert isinstance(price.input_usd_per_1m, Decimal)
    assert str(price.input_usd_per_1m) == "0.13000000"  # exact: no float ever involved


@pytest.mark.usefixtures("with_key")
async def test_openrouter_health_needs_key_record(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    fake_server.reply("GET", "/api/v1/key", {"error": "nope"})
    health = await byok("openrouter", f"{fake_server.url}/api/v1", http_session).health()
    assert not health.ok
    assert health.error is not None and "GET /key" in health.error


@pytest.mark.parametrize(
    ("pricing", "expected"),
    [
        ({"prompt": "0.000003", "completion": "0.000015"}, (Decimal(3), Decimal(15))),
        ({"prompt": "0", "completion": "0"}, (Decimal(0), Decimal(0))),
        ({"prompt": "1e-7", "completion": " 0.0000002 "}, (Decimal("0.1"), Decimal("0.2"))),
        (
            {"prompt": "0.0000001234567", "completion": "0.00000000000001"},
            (Decimal("0.1234567"), Decimal("0.00000001")),
        ),
        ({"prompt": "-1", "completion": "-1"}, None),
        ({"prompt": "0.000001"}, None),
        ({"prompt": "abc", "completion": "0.000001"}, None),
        ({"prompt": "NaN", "completion": "0.000001"}, None),
        ({"prompt": "Infinity", "completion": "0.000001"}, None),
        ({"prompt": True, "completion": "0.000001"}, None),
        (None, None),
    ],
)
def test_openrouter_price(pricing: object, expected: tuple[Decimal, Decimal] | None) -> None:
    price = openrouter_price(pricing)
    if expected is None:
        assert price is None
    else:
        assert price == UpstreamPrice(*expected)


def test_openrouter_context_fallback_and_non_text_output() -> None:
    listing = {
        "data": [
            {"id": "a", "context_length": None, "top_provider": {"context_length": 8192}},
            {
                "id": "img",
                "context_length": 4096,
                "architecture": {"output_modalities": ["image"]},
                "pricing": {"prompt": "0", "completion": "0"},
            },
        ]
    }
    assert parse_openrouter(listing) == [
        ModelInfo("a", context_window=8192),
        ModelInfo(
            "img",
            context_window=4096,
            chat=False,
            upstream_price=UpstreamPrice(Decimal(0), Decimal(0)),
        ),
    ]


PER_REQUEST_FREE: list[object] = ["0", 0, "0.0", " 0 ", "0E-9", 0.0, None]
PER_REQUEST_FEES: list[object] = ["0.0002", 0.005, "1e-9", "abc", "-1", "NaN", "Infinity", True, {}]


def per_request_listing(fees: list[object]) -> dict[str, object]:
    """One model per `pricing.request` value (`free/<i>` or `fee/<i>`), plus one without the
    field at all."""
    data: list[dict[str, object]] = [
        {"id": "no-field", "pricing": {"prompt": "0.000001", "completion": "0.000002"}}
    ]
    for index, fee in enumerate(fees):
        name = "free" if fee in PER_REQUEST_FREE and not isinstance(fee, bool) else "fee"
        pricing = {"prompt": "0.000001", "completion": "0.000002", "request": fee}
        data.append({"id": f"{name}/{index}", "pricing": pricing})
    return {"data": data}


def test_openrouter_per_request_fees_leave_the_model_out() -> None:
    listing = parse_openrouter_listing(per_request_listing(PER_REQUEST_FREE + PER_REQUEST_FEES))
    kept = [m.native_id for m in listing.models]
    assert kept == ["no-field"] + [f"free/{i}" for i in range(len(PER_REQUEST_FREE))]
    assert listing.per_request == [
        f"fee/{i}" for i in range(len(PER_REQUEST_FREE), len(PER_REQUEST_FREE + PER_REQUEST_FEES))
    ]
    assert parse_openrouter(per_request_listing(PER_REQUEST_FEES)) == listing.models[:1]


@pytest.mark.usefixtures("with_key")
async def test_openrouter_models_with_a_per_request_fee_are_dropped_with_one_warning(
    fake_server: FakeServer, http_session: ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    from provider_agent.config.load import parse
    from provider_agent.discovery.catalog import BackendSeen, build

    fake_server.reply("GET", "/api/v1/models", per_request_listing(PER_REQUEST_FEES))
    backend = byok("openrouter", f"{fake_server.url}/api/v1", http_session)
    with caplog.at_level(logging.WARNING, logger="provider_agent.backends.openrouter"):
        models = await backend.list_models()
    assert [m.native_id for m in models] == ["no-field"]
    [warning] = caplog.records
    message = warning.getMessage()
    assert f"{len(PER_REQUEST_FEES)} models left out" in message
    assert "per request (pricing.request)" in message
    assert "fee/0, fee/1, fee/2, fee/3, fee/4 and 4 more" in message

    config = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f'[[backends]]\nkind = "openrouter"\napi_key_env = "{KEY_ENV}"\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n"
    )
    catalog = build(config, [BackendSeen(0, config.backends[0], models, frozenset({"openai"}))])
    assert [offer.model_id for offer in catalog.capabilities.models] == ["no-field"]


@pytest.mark.usefixtures("with_key")
async def test_openrouter_per_request_warning_names_only_allow_listed_models(
    fake_server: FakeServer, http_session: ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    fake_server.reply("GET", "/api/v1/models", per_request_listing(["0.0002", "0.0003"]))
    url = f"{fake_server.url}/api/v1"
    for allowed, expected in (
        (["no-field"], None),
        (["no-field", "fee/1"], "1 model left out: it charges a fee per request"),
    ):
        caplog.clear()
        config = BackendConfig(kind="openrouter", url=url, api_key_env=KEY_ENV, models=allowed)
        with caplog.at_level(logging.WARNING, logger="provider_agent.backends.openrouter"):
            models = await make_backend(config, http_session, 2).list_models()
        assert [m.native_id for m in models] == ["no-field"]
        messages = [r.getMessage() for r in caplog.records]
        if expected is None:
            assert messages == []
        else:
            [message] = messages
            assert expected in message and message.endswith(": fee/1")


# --- Venice --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("with_key")
async def test_venice_happy_path(fake_server: FakeServer, http_session: ClientSession) -> None:
    fake_server.reply("GET", "/api/v1/models", venice_listing())
    backend = byok("venice", f"{fake_server.url}/api/v1", http_session)

    assert (await backend.health()).ok
    models = await backend.list_models()
    assert models == [
        ModelInfo(
            "llama-3.3-70b", 131072, upstream_price=UpstreamPrice(Decimal("0.7"), Decimal("2.8"))
        ),
        ModelInfo(
            "zai-org-glm-5-1", 200000, upstream_price=UpstreamPrice(Decimal("1.1"), Decimal("3.5"))
        ),
        ModelInfo(
            "offline-model",
            32768,
            loaded=False,
            upstream_price=UpstreamPrice(Decimal("0.15"), Decimal("0.6")),
        ),
        ModelInfo("unpriced", 65536, upstream_price=None),
    ]
    for seen in fake_server.seen("GET", "/api/v1/models"):
        assert seen.query == {"type": "text"}
        assert seen.headers["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    ("pricing", "expected"),
    [
        ({"input": {"usd": 0.7}, "output": {"usd": 2.8}}, (Decimal("0.7"), Decimal("2.8"))),
        ({"input": {"usd": 3}, "output": {"usd": 15}}, (Decimal(3), Decimal(15))),
        (
            {"input": {"usd": 0.1}, "output": {"usd": 0.30000000000000004}},
            (Decimal("0.1"), Decimal("0.30000000000000004")),
        ),
        ({"input": {"usd": -1}, "output": {"usd": 1}}, None),
        ({"input": {"diem": 1}, "output": {"usd": 1}}, None),
        ({"input": 0.7, "output": 2.8}, None),
        ({}, None),
        (None, None),
    ],
)
def test_venice_price(pricing: object, expected: tuple[Decimal, Decimal] | None) -> None:
    price = venice_price(pricing)
    if expected is None:
        assert price is None
    else:
        assert price == UpstreamPrice(*expected)
        assert str(price.input_usd_per_1m) == str(expected[0])


def test_venice_parse_skips_non_text() -> None:
    ids = [m.native_id for m in parse_venice(venice_listing())]
    assert "flux-dev" not in ids
    assert len(ids) == 4


# --- absurd upstream prices: that one model's problem --------------------------------------------

OPENROUTER_ABSURD = {
    "huge/1e30": "1e30",
    "huge/exponent": "1E+5000000",
    "huge/max-exponent": "1E+999999999999999999",
    "nan/price": "NaN",
    "inf/price": "Infinity",
    "variable/router": "-1",
    "garbage/price": "12abc",
    "long/digits": "9" * 5000,
}


@pytest.mark.parametrize("value", OPENROUTER_ABSURD.values(), ids=lambda v: v[:20])
def test_openrouter_price_parser_never_raises(value: str) -> None:
    price = openrouter_price({"prompt": value, "completion": "0.000001"})
    assert price is None or price.input_usd_per_1m > 10**6


@pytest.mark.usefixtures("with_key")
async def test_openrouter_absurd_prices_drop_only_their_models(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    from provider_agent.config.load import parse
    from provider_agent.discovery.catalog import BackendSeen, build
    from provider_agent.link.protocol import encode

    data = [
        {"id": model_id, "pricing": {"prompt": value, "completion": "0.000001"}}
        for model_id, value in OPENROUTER_ABSURD.items()
    ]
    data.append({"id": "fair/model", "pricing": {"prompt": "0.00000013", "completion": "4e-7"}})
    fake_server.reply("GET", "/api/v1/models", {"data": data})
    backend = byok("openrouter", f"{fake_server.url}/api/v1", http_session)
    models = await backend.list_models()
    assert len(models) == len(data)

    config = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f'[[backends]]\nkind = "openrouter"\napi_key_env = "{KEY_ENV}"\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n"
    )
    catalog = build(config, [BackendSeen(0, config.backends[0], models, frozenset({"openai"}))])
    [offer] = catalog.capabilities.models
    assert offer.model_id == "fair/model"
    assert (offer.input_per_1m, offer.output_per_1m) == (130000, 400000)
    assert len(catalog.dropped) == len(OPENROUTER_ABSURD)
    for model_id in OPENROUTER_ABSURD:
        [reason] = [d for d in catalog.dropped if d.startswith(f"{model_id} via ")]
        assert len(reason) < 200
    encode(catalog.capabilities)


VENICE_ABSURD_BODY = b"""{"object": "list", "data": [
 {"id": "huge-exponent", "type": "text",
  "model_spec": {"pricing": {"input": {"usd": 1E+5000000}, "output": {"usd": 1}}}},
 {"id": "huge-1e30", "type": "text",
  "model_spec": {"pricing": {"input": {"usd": 1e30}, "output": {"usd": 1}}}},
 {"id": "long-integer", "type": "text", "model_spec": {"availableContextTokens": 4096,
  "pricing": {"input": {"usd": 99999999999999999999999999999999999999}, "output": {"usd": 1}}}},
 {"id": "negative", "type": "text",
  "model_spec": {"pricing": {"input": {"usd": -1}, "output": {"usd": 1}}}},
 {"id": "not-a-number", "type": "text",
  "model_spec": {"pricing": {"input": {"usd": NaN}, "output": {"usd": Infinity}}}},
 {"id": "fair", "type": "text", "model_spec": {"availableContextTokens": 131072,
  "pricing": {"input": {"usd": 0.7}, "output": {"usd": 2.8}}}}
]}"""


@pytest.mark.usefixtures("with_key")
async def test_venice_absurd_json_numbers_drop_only_their_models(
    fake_server: FakeServer, http_session: ClientSession
) -> None:
    from provider_agent.config.load import parse
    from provider_agent.discovery.catalog import BackendSeen, build
    from provider_agent.link.protocol import encode

    fake_server.reply("GET", "/api/v1/models", VENICE_ABSURD_BODY)
    backend = byok("venice", f"{fake_server.url}/api/v1", http_session)
    assert (await backend.health()).ok
    models = await backend.list_models()
    assert [m.native_id for m in models][-1] == "fair" and len(models) == 6
    fair = models[-1]
    assert fair.upstream_price == UpstreamPrice(Decimal("0.7"), Decimal("2.8"))
    assert models[2].context_window == 4096
    config = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f'[[backends]]\nkind = "venice"\napi_key_env = "{KEY_ENV}"\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n"
    )
    catalog = build(config, [BackendSeen(0, config.backends[0], models, frozenset({"openai"}))])
    assert [o.model_id for o in catalog.capabilities.models] == ["fair"]
    for model_id in ("huge-exponent", "huge-1e30", "long-integer"):
        assert any(d.startswith(f"{model_id} via ") and "is above" in d for d in catalog.dropped)
    for model_id in ("negative", "not-a-number"):
        assert any(d.startswith(f"{model_id} via ") and "unknown" in d for d in catalog.dropped)
    encode(catalog.capabilities)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b"{not json", b"\xff\xfe", b"", b'{"data": [1E+]}'],
    ids=["deep", "broken", "bad-utf8", "empty", "bad-number"],
)
@pytest.mark.usefixtures("with_key")
async def test_venice_garbage_is_a_backend_error_not_a_crash(
    body: bytes, fake_server: FakeServer, http_session: ClientSession
) -> None:
    from provider_agent.errors import BackendError

    fake_server.reply("GET", "/api/v1/models", body)
    backend = byok("venice", f"{fake_server.url}/api/v1", http_session)
    with pytest.raises(BackendError, match="not JSON"):
        await backend.list_models()
