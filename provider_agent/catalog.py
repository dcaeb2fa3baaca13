"""Pure: what the backends reported → the route table and the `capabilities` message.

The steps, in order (config.md, protocol.md §2): allow-list (native ids) → aliases (native →
advertised id) → drop models that are not chat-capable or not loaded → price (local: the pricing
table; BYOK: the table, else upstream list price × (1 + markup), rounded up; unpriced BYOK models
and zero prices dropped) → group by advertised id, routes ordered by (priority, config order) →
one capabilities entry per advertised id, sorted by model_id.

No I/O and no clock: everything comes in as plain data, so every rule has a table-driven test.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

from provider_agent import __version__
from provider_agent.backends.base import ModelInfo
from provider_agent.config import BackendConfig, Config, WireFormat
from provider_agent.protocol import (
    Capabilities,
    CapabilityLimits,
    CapabilityMetadata,
    ModelOffer,
)

MICRO_PER_USD = Decimal(1_000_000)


@dataclass(frozen=True)
class BackendSeen:
    """One healthy backend's answer in a discovery pass, with its place in the config."""

    index: int
    config: BackendConfig
    models: Sequence[ModelInfo]
    formats: frozenset[WireFormat]


@dataclass(frozen=True)
class Price:
    """USDC micro-units per 1M tokens."""

    input_per_1m: int
    output_per_1m: int


@dataclass(frozen=True)
class Route:
    """One way to serve an advertised model: which backend, under which native id."""

    backend: str
    kind: str
    native_id: str
    price: Price
    formats: frozenset[WireFormat]
    context_window: int | None
    max_concurrent: int | None
    priority: int
    config_index: int


@dataclass(frozen=True)
class Catalog:
    """The outcome of one pass: the routes the job executor uses and the offer we advertise."""

    routes: Mapping[str, tuple[Route, ...]]
    capabilities: Capabilities
    #: Human-readable reasons for models left out (logged once per pass as warnings).
    dropped: tuple[str, ...] = field(default=())


def build(config: Config, seen: Sequence[BackendSeen]) -> Catalog:
    """The route table and capabilities for what the healthy backends reported."""
    dropped: list[str] = []
    candidates: dict[str, list[Route]] = defaultdict(list)
    for backend in seen:
        for model in backend.models:
            route = _route_for(config, backend, model, dropped)
            if route is not None:
                candidates[route_model_id(backend.config, model.native_id)].append(route)

    routes: dict[str, tuple[Route, ...]] = {}
    for model_id, found in candidates.items():
        ordered = sorted(found, key=lambda r: (r.priority, r.config_index))
        first_price = ordered[0].price
        kept = tuple(r for r in ordered if not _above(r.price, first_price))
        routes[model_id] = kept
        for route in ordered:
            if route not in kept:
                dropped.append(
                    f"{model_id} via {route.backend}: upstream price is above the advertised "
                    "price (never sell below cost)"
                )
    return Catalog(
        routes=routes,
        capabilities=capabilities_message(config, routes),
        dropped=tuple(dropped),
    )


def route_model_id(backend: BackendConfig, native_id: str) -> str:
    """The advertised id of a backend's native model id (aliases map native → advertised)."""
    return backend.aliases.get(native_id, native_id)


def _route_for(
    config: Config, backend: BackendSeen, model: ModelInfo, dropped: list[str]
) -> Route | None:
    cfg = backend.config
    if cfg.models is not None and model.native_id not in cfg.models:
        return None
    if not model.chat or not model.loaded:
        return None
    model_id = route_model_id(cfg, model.native_id)
    price = resolve_price(config, cfg, model_id, model)
    if price is None:
        dropped.append(f"{model_id} via {cfg.label}: upstream price unknown")
        return None
    if price.input_per_1m == 0 or price.output_per_1m == 0:
        dropped.append(f"{model_id} via {cfg.label}: resolved price is 0")
        return None
    return Route(
        backend=cfg.label,
        kind=cfg.kind,
        native_id=model.native_id,
        price=price,
        formats=backend.formats,
        context_window=model.context_window,
        max_concurrent=cfg.max_concurrent,
        priority=cfg.effective_priority,
        config_index=backend.index,
    )


def resolve_price(
    config: Config, backend: BackendConfig, model_id: str, model: ModelInfo
) -> Price | None:
    """config.md's pricing rule for one model on one backend; None when it cannot be priced."""
    explicit = config.pricing.models.get(model_id)
    if explicit is not None:
        return Price(explicit.input_per_1m, explicit.output_per_1m)
    if not backend.is_byok:
        return Price(config.pricing.default_input_per_1m, config.pricing.default_output_per_1m)
    upstream = model.upstream_price
    if upstream is None or upstream.input_usd_per_1m < 0 or upstream.output_usd_per_1m < 0:
        return None
    factor = 1 + backend.markup
    return Price(
        usd_to_micro(upstream.input_usd_per_1m * factor),
        usd_to_micro(upstream.output_usd_per_1m * factor),
    )


def usd_to_micro(usd_per_1m: Decimal) -> int:
    """USD per 1M tokens → integer USDC micro-units per 1M tokens, rounded up (never below cost)."""
    return int((usd_per_1m * MICRO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def _above(price: Price, ceiling: Price) -> bool:
    return price.input_per_1m > ceiling.input_per_1m or price.output_per_1m > ceiling.output_per_1m


def capabilities_message(
    config: Config, routes: Mapping[str, Sequence[Route]], *, draining: bool = False
) -> Capabilities:
    """protocol.md §2. Draining agents advertise nothing so no new job is routed to them."""
    offers = [] if draining else [_offer(config, mid, routes[mid]) for mid in sorted(routes)]
    return Capabilities(
        models=offers,
        limits=CapabilityLimits(
            max_concurrent_total=config.limits.max_concurrent,
            max_tokens_per_minute=config.limits.max_tokens_per_minute,
        ),
        metadata=CapabilityMetadata(
            agent_version=__version__, status="draining" if draining else "ready"
        ),
    )


def _offer(config: Config, model_id: str, routes: Sequence[Route]) -> ModelOffer:
    first = routes[0]
    windows = [r.context_window for r in routes if r.context_window is not None]
    formats: set[WireFormat] = set().union(*(r.formats for r in routes))
    return ModelOffer(
        model_id=model_id,
        input_per_1m=first.price.input_per_1m,
        output_per_1m=first.price.output_per_1m,
        max_concurrent=model_concurrency(config.limits.max_concurrent, routes),
        backend=first.kind,
        context_window=min(windows) if windows else None,
        formats=sorted(formats),
    )


def model_concurrency(global_cap: int, routes: Sequence[Route]) -> int:
    """The global cap when any route is uncapped, else min(global, sum of the routes' caps)."""
    caps = [r.max_concurrent for r in routes]
    if None in caps:
        return global_cap
    return min(global_cap, sum(cap or 0 for cap in caps))
