"""The pure catalog: allow-lists, aliases, chat filter, pricing, priority, dedupe, the message."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.backends.base import ModelInfo, UpstreamPrice
from provider_agent.config.load import parse
from provider_agent.config.schema import Config
from provider_agent.discovery.catalog import BackendSeen, build, model_concurrency, usd_to_micro
from provider_agent.link.protocol import Capabilities, decode, encode

BASE = """
[coordinator]
url = "wss://coord.example/provider/connect"
[pricing]
default_input_per_1m = 300000
default_output_per_1m = 600000
"""


def config(extra: str = "") -> Config:
    return parse(BASE + extra)


def seen(cfg: Config, index: int, *models: ModelInfo, formats: str = "openai") -> BackendSeen:
    return BackendSeen(
        index=index,
        config=cfg.backends[index],
        models=models,
        formats=frozenset(formats.split(",")),  # type: ignore[arg-type]
    )


def usd(inp: str, out: str) -> UpstreamPrice:
    return UpstreamPrice(Decimal(inp), Decimal(out))


TWO_LOCAL = """
[[backends]]
kind = "ollama"
url = "http://127.0.0.1:11434"
[[backends]]
kind = "vllm"
url = "http://127.0.0.1:8000"
"""


def test_local_model_gets_default_price_and_its_backend_kind() -> None:
    cfg = config(TWO_LOCAL)
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("llama3.1:8b", context_window=8192))])
    [offer] = catalog.capabilities.models
    assert offer.model_dump(exclude_none=True) == {
        "model_id": "llama3.1:8b",
        "input_per_1m": 300000,
        "output_per_1m": 600000,
        "max_concurrent": 8,
        "backend": "ollama",
        "context_window": 8192,
        "formats": ["openai"],
    }
    assert [r.native_id for r in catalog.routes["llama3.1:8b"]] == ["llama3.1:8b"]


def test_pricing_table_is_keyed_by_advertised_id() -> None:
    cfg = config(
        TWO_LOCAL.replace(
            'url = "http://127.0.0.1:11434"',
            'url = "http://127.0.0.1:11434"\naliases = { "llama3.1:8b" = "meta/llama-8b" }',
        )
        + '[pricing.models."meta/llama-8b"]\ninput_per_1m = 1\noutput_per_1m = 2\n'
    )
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("llama3.1:8b"))])
    [offer] = catalog.capabilities.models
    assert (offer.model_id, offer.input_per_1m, offer.output_per_1m) == ("meta/llama-8b", 1, 2)
    assert catalog.routes["meta/llama-8b"][0].native_id == "llama3.1:8b"


@pytest.mark.parametrize(
    ("allow", "models", "advertised"),
    [
        (None, ["a", "b"], ["a", "b"]),
        (["b"], ["a", "b"], ["b"]),
        ([], ["a"], []),
        (["zzz"], ["a"], []),
    ],
)
def test_allow_list_filters_native_ids(
    allow: list[str] | None, models: list[str], advertised: list[str]
) -> None:
    line = f"models = {allow!r}\n".replace("'", '"') if allow is not None else ""
    cfg = config(f'[[backends]]\nkind = "vllm"\nurl = "http://h:1"\n{line}')
    catalog = build(cfg, [seen(cfg, 0, *(ModelInfo(m) for m in models))])
    assert [o.model_id for o in catalog.capabilities.models] == advertised


def test_non_chat_and_unloaded_models_are_not_advertised() -> None:
    cfg = config(TWO_LOCAL)
    catalog = build(
        cfg,
        [
            seen(
                cfg,
                0,
                ModelInfo("chat"),
                ModelInfo("embed", chat=False),
                ModelInfo("cold", loaded=False),
            )
        ],
    )
    assert list(catalog.routes) == ["chat"]


def test_same_model_on_two_backends_is_one_offer_ordered_by_priority() -> None:
    cfg = config(TWO_LOCAL)  # ollama (priority 3) is listed first, vllm (priority 0) second
    catalog = build(
        cfg,
        [
            seen(cfg, 0, ModelInfo("m", context_window=8192)),
            seen(cfg, 1, ModelInfo("m", context_window=32768), formats="openai,anthropic"),
        ],
    )
    [offer] = catalog.capabilities.models
    assert offer.backend == "vllm"
    assert offer.context_window == 8192  # the smallest known among routes
    assert offer.formats == ["anthropic", "openai"]
    assert [r.kind for r in catalog.routes["m"]] == ["vllm", "ollama"]


def test_equal_priority_keeps_config_order() -> None:
    cfg = config(
        '[[backends]]\nkind = "vllm"\nurl = "http://a:1"\nname = "first"\n'
        '[[backends]]\nkind = "vllm"\nurl = "http://b:1"\nname = "second"\n'
    )
    catalog = build(cfg, [seen(cfg, 1, ModelInfo("m")), seen(cfg, 0, ModelInfo("m"))])
    assert [r.backend for r in catalog.routes["m"]] == ["first", "second"]


def test_explicit_priority_overrides_kind_default() -> None:
    cfg = config(
        '[[backends]]\nkind = "vllm"\nurl = "http://a:1"\npriority = 9\n'
        '[[backends]]\nkind = "ollama"\nurl = "http://b:1"\n'
    )
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("m")), seen(cfg, 1, ModelInfo("m"))])
    assert catalog.capabilities.models[0].backend == "ollama"


OPENROUTER = """
[[backends]]
kind = "openrouter"
api_key_env = "OPENROUTER_API_KEY"
markup = 0.10
"""


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        # OpenRouter lists USD per token: 0.00000013 $/token = 0.13 $/1M → ×1.1 = 0.143 $/1M
        (usd("0.13", "0.4"), (143000, 440000)),
        # rounding is UP to the next micro-unit: never sell below cost
        (usd("0.0000001", "0.0000001"), (1, 1)),
        (usd("0.1234567", "1"), (135803, 1100000)),
    ],
)
def test_byok_price_is_upstream_times_markup_rounded_up(
    upstream: UpstreamPrice, expected: tuple[int, int]
) -> None:
    cfg = config(OPENROUTER)
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("x/y", upstream_price=upstream))])
    [offer] = catalog.capabilities.models
    assert (offer.input_per_1m, offer.output_per_1m) == expected


def test_byok_explicit_price_wins_over_upstream() -> None:
    cfg = config(OPENROUTER + '[pricing.models."x/y"]\ninput_per_1m = 7\noutput_per_1m = 9\n')
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("x/y", upstream_price=usd("5", "5")))])
    assert catalog.capabilities.models[0].input_per_1m == 7


@pytest.mark.parametrize(
    "upstream",
    [None, usd("-1", "-1"), usd("0", "0"), usd("NaN", "1"), usd("1", "sNaN"), usd("1", "-Inf")],
)
def test_byok_models_without_a_usable_price_are_dropped(upstream: UpstreamPrice | None) -> None:
    cfg = config(OPENROUTER)
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("x/y", upstream_price=upstream))])
    assert catalog.capabilities.models == []
    assert len(catalog.dropped) == 1 and "x/y" in catalog.dropped[0]


def test_zero_price_from_table_is_dropped_with_reason() -> None:
    cfg = config(TWO_LOCAL + '[pricing.models."m"]\ninput_per_1m = 0\noutput_per_1m = 0\n')
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("m"))])
    assert catalog.routes == {}
    assert "price is 0" in catalog.dropped[0]


@pytest.mark.parametrize(("given", "sold"), [((0, 5), (0, 5)), ((7, 0), (7, 0))])
def test_one_side_at_zero_is_advertised_at_zero(
    given: tuple[int, int], sold: tuple[int, int]
) -> None:
    """config.md, settled 2026-12-06: only both sides at 0 drop a model."""
    table = f'[pricing.models."m"]\ninput_per_1m = {given[0]}\noutput_per_1m = {given[1]}\n'
    cfg = config(TWO_LOCAL + table)
    [offer] = build(cfg, [seen(cfg, 0, ModelInfo("m"))]).capabilities.models
    assert (offer.input_per_1m, offer.output_per_1m) == sold


def test_local_and_byok_serving_one_model_advertise_once_local_first() -> None:
    cfg = config(
        OPENROUTER
        + '[[backends]]\nkind = "ollama"\nurl = "http://o:1"\n'
        + 'aliases = { "llama3.3:70b" = "meta-llama/llama-3.3-70b-instruct" }\n'
    )
    cheap = usd("0.01", "0.01")  # 11000 micro < default 300000: kept behind the local route
    catalog = build(
        cfg,
        [
            seen(cfg, 0, ModelInfo("meta-llama/llama-3.3-70b-instruct", upstream_price=cheap)),
            seen(cfg, 1, ModelInfo("llama3.3:70b")),
        ],
    )
    [offer] = catalog.capabilities.models
    assert offer.backend == "ollama" and offer.input_per_1m == 300000
    assert [r.kind for r in catalog.routes[offer.model_id]] == ["ollama", "openrouter"]


def test_byok_route_costing_more_than_the_advertised_price_is_left_out() -> None:
    cfg = config(OPENROUTER + '[[backends]]\nkind = "ollama"\nurl = "http://o:1"\n')
    dear = usd("1", "1")  # 1.1 USD/1M → 1100000 micro > 300000
    catalog = build(
        cfg, [seen(cfg, 0, ModelInfo("m", upstream_price=dear)), seen(cfg, 1, ModelInfo("m"))]
    )
    assert [r.kind for r in catalog.routes["m"]] == ["ollama"]
    assert any("above the advertised price" in d for d in catalog.dropped)


@pytest.mark.parametrize(
    ("global_cap", "caps", "expected"),
    [(8, [None], 8), (8, [2, None], 8), (8, [2, 3], 5), (4, [3, 3], 4), (8, [1], 1)],
)
def test_max_concurrent_per_model(global_cap: int, caps: list[int | None], expected: int) -> None:
    lines = "".join(
        f'[[backends]]\nkind = "vllm"\nurl = "http://h{i}:1"\n'
        + (f"max_concurrent = {cap}\n" if cap is not None else "")
        for i, cap in enumerate(caps)
    )
    cfg = config(lines + f"[limits]\nmax_concurrent = {global_cap}\n")
    catalog = build(cfg, [seen(cfg, i, ModelInfo("m")) for i in range(len(caps))])
    assert catalog.capabilities.models[0].max_concurrent == expected
    assert model_concurrency(global_cap, catalog.routes["m"]) == expected


def test_models_sorted_and_unknown_context_omitted_on_the_wire() -> None:
    cfg = config(TWO_LOCAL + "[limits]\nmax_tokens_per_minute = 200000\n")
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("zeta"), ModelInfo("alpha"))])
    wire = decode(encode(catalog.capabilities))
    assert isinstance(wire, Capabilities)
    assert [m.model_id for m in wire.models] == ["alpha", "zeta"]
    text = encode(catalog.capabilities)
    assert "context_window" not in text
    assert '"max_tokens_per_minute":200000' in text
    assert wire.metadata.status == "ready"


def test_unlimited_tokens_per_minute_is_null_and_draining_advertises_nothing() -> None:
    from provider_agent.discovery.catalog import capabilities_message

    cfg = config(TWO_LOCAL)
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("m"))])
    draining = capabilities_message(cfg, catalog.routes, draining=True)
    text = encode(draining)
    assert '"max_tokens_per_minute":null' in text
    assert draining.models == [] and draining.metadata.status == "draining"


def test_usd_to_micro_rounds_up_exactly() -> None:
    assert usd_to_micro(Decimal("0.0000001")) == 1
    assert usd_to_micro(Decimal("0.143")) == 143000
    assert usd_to_micro(Decimal("0.1430000001")) == 143001


# --- property: whatever the backends report, the message validates ------------------------------

model_infos = st.builds(
    ModelInfo,
    native_id=st.text(min_size=1, max_size=20),
    context_window=st.one_of(st.none(), st.integers(1, 2_000_000)),
    chat=st.booleans(),
    loaded=st.booleans(),
    upstream_price=st.one_of(
        st.none(),
        st.builds(
            UpstreamPrice,
            st.decimals(-1, 100, places=9, allow_nan=False),
            st.decimals(-1, 100, places=9, allow_nan=False),
        ),
    ),
)
MIXED = TWO_LOCAL + OPENROUTER + "max_concurrent = 3\n"


@given(st.lists(st.tuples(st.integers(0, 2), model_infos), max_size=30))
def test_capabilities_always_validate(reported: list[tuple[int, ModelInfo]]) -> None:
    cfg = config(MIXED)
    by_backend: dict[int, list[ModelInfo]] = {0: [], 1: [], 2: []}
    for index, model in reported:
        by_backend[index].append(model)
    catalog = build(cfg, [seen(cfg, i, *ms) for i, ms in by_backend.items()])
    again = Capabilities.model_validate_json(encode(catalog.capabilities))
    ids = [m.model_id for m in again.models]
    assert ids == sorted(set(ids))
    for offer in again.models:
        assert offer.input_per_1m > 0 and offer.output_per_1m > 0
        assert 1 <= offer.max_concurrent <= cfg.limits.max_concurrent
        routes = catalog.routes[offer.model_id]
        assert all(r.price.input_per_1m <= offer.input_per_1m for r in routes)


# --- hostile model ids ---------------------------------------------------------------------------

HOSTILE = ["", " ", "a\nb", "nul\x00", "\x1b[2J\x1b[31mred", "x" * 100_000, "rtl\u202e"]
VALID_UNICODE = ["模型-7b", "mistral-é", "emoji-🦙", "qwen 7b"]


def test_hostile_ids_are_dropped_with_one_warning_per_backend() -> None:
    cfg = config(TWO_LOCAL)
    catalog = build(
        cfg,
        [
            seen(cfg, 0, *(ModelInfo(m) for m in [*HOSTILE, *VALID_UNICODE])),
            seen(cfg, 1, ModelInfo("ok"), ModelInfo("bad\r")),
        ],
    )
    assert [o.model_id for o in catalog.capabilities.models] == sorted([*VALID_UNICODE, "ok"])
    ollama = [d for d in catalog.dropped if "ollama:" in d]
    vllm = [d for d in catalog.dropped if "vllm:" in d]
    assert len(ollama) == 1 and len(vllm) == 1
    assert ollama[0].startswith("7 model ids listed by ollama:http://127.0.0.1:11434")
    for why in ("1 empty", "1 only whitespace", "3 with control characters", "1 over 256"):
        assert why in ollama[0]
    assert "1 with unprintable characters" in ollama[0]
    assert vllm[0].startswith("1 model id listed by vllm:")
    for line in catalog.dropped:
        assert line.isprintable() and len(line) < 600
    encode(catalog.capabilities)  # the message still encodes


def test_a_hostile_alias_target_is_not_advertised_either() -> None:
    # config validation refuses such aliases; the catalog holds the line on its own too
    cfg = config(TWO_LOCAL)
    backend = cfg.backends[0].model_copy(update={"aliases": {"m": "evil\x1b[0m"}})
    catalog = build(cfg, [BackendSeen(0, backend, [ModelInfo("m")], frozenset({"openai"}))])
    assert catalog.routes == {}
    assert len(catalog.dropped) == 1 and "with control characters" in catalog.dropped[0]


@given(st.lists(st.text(max_size=300), max_size=20))
def test_only_acceptable_ids_are_ever_advertised(ids: list[str]) -> None:
    from provider_agent.safe_text import model_id_problem

    cfg = config(TWO_LOCAL)
    catalog = build(cfg, [seen(cfg, 0, *(ModelInfo(i) for i in ids))])
    advertised = [o.model_id for o in catalog.capabilities.models]
    assert advertised == sorted({i for i in ids if model_id_problem(i) is None})
    assert len(catalog.dropped) == (1 if len(set(ids)) > len(advertised) else 0)


# --- allow-list entries the backend does not serve -----------------------------------------------


@pytest.mark.parametrize(
    ("allow", "listed", "advertised", "warnings"),
    [
        (["Llama3:8b"], ["llama3:8b"], [], ["'Llama3:8b' is not served", "it lists 'llama3:8b'"]),
        (["gone", "here"], ["here"], ["here"], ["'gone' is not served by vllm:http://h:1"]),
        (["a", "b"], [], [], ["'a' is not served", "'b' is not served"]),
        (["a"], ["a", "b"], ["a"], []),
        (["emb"], [ModelInfo("emb", chat=False)], [], ["emb via vllm:http://h:1: not a chat"]),
        (["cold"], [ModelInfo("cold", loaded=False)], [], ["cold via vllm:http://h:1: not loaded"]),
    ],
)
def test_allow_list_entries_not_served_are_named(
    allow: list[str],
    listed: list[str | ModelInfo],
    advertised: list[str],
    warnings: list[str],
) -> None:
    entries = ", ".join(f'"{a}"' for a in allow)
    cfg = config(f'[[backends]]\nkind = "vllm"\nurl = "http://h:1"\nmodels = [{entries}]\n')
    models = [m if isinstance(m, ModelInfo) else ModelInfo(m) for m in listed]
    catalog = build(cfg, [seen(cfg, 0, *models)])
    assert [o.model_id for o in catalog.capabilities.models] == advertised
    text = "\n".join(catalog.dropped)
    for part in warnings:
        assert part in text
    if not warnings:
        assert catalog.dropped == ()


def test_a_model_listed_twice_is_one_route() -> None:
    cfg = config('[[backends]]\nkind = "vllm"\nurl = "http://h:1"\nmax_concurrent = 2\n')
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("m"), ModelInfo("m"))])
    assert len(catalog.routes["m"]) == 1
    assert catalog.capabilities.models[0].max_concurrent == 2


# --- absurd upstream prices are one model's problem ----------------------------------------------

ABSURD_USD_PER_1M = [
    "1E+30",
    "1E+5000000",
    "1E+999999999999999999",
    "Infinity",
    "1000000001",
    "9" * 5000,
]


@pytest.mark.parametrize("absurd", ABSURD_USD_PER_1M, ids=lambda v: v[:24])
def test_absurd_upstream_price_drops_that_model_only(absurd: str) -> None:
    cfg = config(OPENROUTER)
    catalog = build(
        cfg,
        [
            seen(
                cfg,
                0,
                ModelInfo("dear/model", upstream_price=usd(absurd, "1")),
                ModelInfo("fair/model", upstream_price=usd("0.13", "0.4")),
            )
        ],
    )
    assert [o.model_id for o in catalog.capabilities.models] == ["fair/model"]
    [reason] = catalog.dropped
    assert reason.startswith("dear/model via openrouter") and ": upstream price (input " in reason
    assert "above 1000000000000000 micro-units" in reason and len(reason) < 200
    encode(catalog.capabilities)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        # exactly at the bound after markup ×1.1: 909090909.0909… USD → ceil → 10^15 micro
        ("909090909.0909090909", 1_000_000_000_000_000),
        ("909090909.090909091", None),  # just above
        ("1E-5000000", 1),  # absurdly small rounds up to one micro-unit, never to 0
    ],
)
def test_price_bound_is_exact(upstream: str, expected: int | None) -> None:
    cfg = config(OPENROUTER)
    catalog = build(cfg, [seen(cfg, 0, ModelInfo("m", upstream_price=usd(upstream, "1")))])
    offers = catalog.capabilities.models
    assert [o.input_per_1m for o in offers] == ([] if expected is None else [expected])


@pytest.mark.parametrize(
    "value", ["1E+30", "1E+5000000", "Infinity", "-Infinity", "NaN", "sNaN", "-1E+9999999", "-1"]
)
def test_usd_to_micro_refuses_what_cannot_be_a_price_without_raising(value: str) -> None:
    assert usd_to_micro(Decimal(value)) is None


def test_configured_price_above_the_bound_is_dropped_not_encoded() -> None:
    cfg = config(TWO_LOCAL)
    pricing = cfg.pricing.model_copy(update={"default_input_per_1m": 99999999999999999999999})
    huge = cfg.model_copy(update={"pricing": pricing})
    catalog = build(huge, [seen(huge, 0, ModelInfo("m"))])
    assert catalog.routes == {}
    assert "price above 1000000000000000" in catalog.dropped[0]
    encode(catalog.capabilities)
