"""Pure: what the backends reported → the route table and the `capabilities` message.

The steps, in order (config.md, protocol.md §2): allow-list (native ids; entries the backend
does not serve are named in a warning) → aliases (native → advertised id) → drop ids that are not
acceptable model ids (one warning per backend saying how many and why) → drop models that are not
chat-capable or not loaded → price (local: the pricing table; BYOK: the table, else upstream list
price × (1 + markup), rounded up; unpriced BYOK models, prices 0 on both sides (one side at 0
is sold at 0, config.md settled 2026-12-06) and prices above `MAX_PRICE_PER_1M` dropped by
name) → group by advertised id, routes ordered by (priority, config
order) → one capabilities entry per advertised id, sorted by model_id.

No I/O and no clock: everything comes in as plain data, so every rule has a table-driven test.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Literal

from provider_agent import __version__
from provider_agent.config.schema import MAX_PRICE, BackendConfig, Config, WireFormat
from provider_agent.discovery.listing import ModelInfo, UpstreamPrice, exact_context
from provider_agent.link.protocol import (
    Capabilities,
    CapabilityLimits,
    CapabilityMetadata,
    Measured,
    ModelOffer,
)
from provider_agent.safe_text import model_id_problem, printable

MICRO_PER_USD = Decimal(1_000_000)
#: config.md: every price, configured or resolved, is at most 10^15 micro-units per 1M tokens
#: (USD 10^9: far above any real price, well inside the wire's 64-bit integers).
MAX_PRICE_PER_1M = MAX_PRICE


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


RouteKey = tuple[str, str]
"""(backend label, the backend's own model id): one route."""


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
    #: How many jobs the server runs at once for this model (a llama.cpp server's
    #: `total_slots`, per model in router mode); beyond it, jobs would queue unseen inside it.
    slots: int | None = None

    @property
    def key(self) -> RouteKey:
        return (self.backend, self.native_id)

    @property
    def cap(self) -> int | None:
        """The most jobs this route takes at once: its backend's `max_concurrent` and its slots."""
        caps = [c for c in (self.max_concurrent, self.slots) if c is not None]
        return min(caps) if caps else None


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
        dropped += listing_problems(backend.config, backend.models)
        listed: set[str] = set()
        for model in backend.models:
            if model.native_id in listed:
                continue  # listed twice: one route, or its cap would count twice
            listed.add(model.native_id)
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


def listing_problems(backend: BackendConfig, models: Sequence[ModelInfo]) -> list[str]:
    """Warnings about one backend's listing as a whole: allow-list entries it does not serve
    (one each, with a hint when only the case differs), and the ids that cannot be advertised
    (one warning for all of them: how many, and why)."""
    problems: list[str] = []
    native_ids = {m.native_id for m in models}
    label = printable(backend.label)
    for entry in backend.models or ():
        if entry not in native_ids:
            near = sorted(n for n in native_ids if n.casefold() == entry.casefold())
            hint = f" (it lists {_quoted(near[0])}: ids are case-sensitive)" if near else ""
            problems.append(f"allow-listed model {_quoted(entry)} is not served by {label}{hint}")
    why: Counter[str] = Counter()
    example = ""
    for native_id in sorted(native_ids):
        if backend.models is not None and native_id not in backend.models:
            continue
        problem = model_id_problem(route_model_id(backend, native_id))
        if problem is not None:
            why[problem] += 1
            example = example or _quoted(native_id, 40)
    if why:
        count = sum(why.values())
        reasons = ", ".join(f"{n} {problem}" for problem, n in sorted(why.items()))
        problems.append(
            f"{count} model id{'s' if count > 1 else ''} listed by {label} cannot be advertised "
            f"(a model id is 1-256 printable characters): {reasons}; e.g. {example}"
        )
    return problems


def _route_for(
    config: Config, backend: BackendSeen, model: ModelInfo, dropped: list[str]
) -> Route | None:
    cfg = backend.config
    if cfg.models is not None and model.native_id not in cfg.models:
        return None
    model_id = route_model_id(cfg, model.native_id)
    if model_id_problem(model_id) is not None:
        return None  # counted in listing_problems' one warning for the backend
    if not model.chat or not model.loaded:
        if cfg.models is not None:  # asked for by name: say why it is not offered
            state = "not a chat model" if not model.chat else "not loaded"
            dropped.append(f"{model_id} via {printable(cfg.label)}: {state}")
        return None
    price = resolve_price(config, cfg, model_id, model)
    if isinstance(price, str):
        dropped.append(f"{model_id} via {printable(cfg.label)}: {price}")
        return None
    if price.input_per_1m == 0 and price.output_per_1m == 0:  # one side at 0 is sold at 0
        dropped.append(f"{model_id} via {printable(cfg.label)}: resolved price is 0 (both sides)")
        return None
    if max(price.input_per_1m, price.output_per_1m) > MAX_PRICE_PER_1M:
        dropped.append(
            f"{model_id} via {printable(cfg.label)}: price above {MAX_PRICE_PER_1M} "
            "micro-units per 1M tokens"
        )
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
        slots=model.slots,
    )


def resolve_price(
    config: Config, backend: BackendConfig, model_id: str, model: ModelInfo
) -> Price | str:
    """config.md's pricing rule for one model on one backend: the price, or why it has none."""
    explicit = config.pricing.models.get(model_id)
    if explicit is not None:
        return Price(explicit.input_per_1m, explicit.output_per_1m)
    if not backend.is_byok:
        return Price(config.pricing.default_input_per_1m, config.pricing.default_output_per_1m)
    upstream = model.upstream_price
    sides = (upstream.input_usd_per_1m, upstream.output_usd_per_1m) if upstream else ()
    if upstream is None or any(side.is_nan() for side in sides):
        return "upstream price unknown"
    if upstream.input_usd_per_1m < 0 or upstream.output_usd_per_1m < 0:
        return "upstream price is negative (variable pricing)"
    context = exact_context()
    factor = context.add(Decimal(1), backend.markup)
    micro_in = usd_to_micro(context.multiply(upstream.input_usd_per_1m, factor))
    micro_out = usd_to_micro(context.multiply(upstream.output_usd_per_1m, factor))
    if micro_in is None or micro_out is None:
        return (
            f"upstream price ({_usd_text(upstream)} USD per 1M tokens) is above "
            f"{MAX_PRICE_PER_1M} micro-units per 1M tokens"
        )
    return Price(micro_in, micro_out)


def usd_to_micro(usd_per_1m: Decimal) -> int | None:
    """USD per 1M tokens → integer USDC micro-units per 1M tokens, rounded up (never below cost);
    None when negative or above `MAX_PRICE_PER_1M`. Cannot raise or stall, whatever the exponent
    (the bound is checked before any conversion to int)."""
    context = exact_context()
    micro = context.multiply(usd_per_1m, MICRO_PER_USD).to_integral_value(
        rounding=ROUND_CEILING, context=context
    )
    if not micro.is_finite() or not 0 <= micro <= MAX_PRICE_PER_1M:
        return None
    return int(micro)


def _quoted(text: str, limit: int = 80) -> str:
    return f"'{printable(text, limit)}'"


def _usd_text(upstream: UpstreamPrice) -> str:
    return (
        f"input {printable(upstream.input_usd_per_1m, 24)}, "
        f"output {printable(upstream.output_usd_per_1m, 24)}"
    )


def _above(price: Price, ceiling: Price) -> bool:
    return price.input_per_1m > ceiling.input_per_1m or price.output_per_1m > ceiling.output_per_1m


def capabilities_message(
    config: Config,
    routes: Mapping[str, Sequence[Route]],
    *,
    draining: bool = False,
    measured: Mapping[str, Measured] | None = None,
    paused: bool = False,
    paused_until: str | None = None,
    model_limits: Mapping[str, int] | None = None,
) -> Capabilities:
    """protocol.md §2. Draining and paused agents advertise nothing so no new job is routed to
    them; draining wins (a paused agent that is stopping says so). `measured` (per advertised
    id) is attached to the offers it names; others go without. `model_limits` (§9: the sum of
    each model's route limits) is its `max_concurrent` where given."""
    status: Literal["ready", "draining", "paused"] = (
        "draining" if draining else "paused" if paused else "ready"
    )
    speeds = measured or {}
    offers = (
        []
        if status != "ready"
        else [
            _offer(config, mid, routes[mid], speeds.get(mid), (model_limits or {}).get(mid))
            for mid in sorted(routes)
        ]
    )
    return Capabilities(
        models=offers,
        limits=CapabilityLimits(
            max_concurrent_total=config.limits.max_concurrent,
            max_tokens_per_minute=config.limits.max_tokens_per_minute,
        ),
        metadata=CapabilityMetadata(
            agent_version=__version__,
            status=status,
            paused_until=paused_until if status == "paused" else None,
        ),
    )


def _offer(
    config: Config,
    model_id: str,
    routes: Sequence[Route],
    measured: Measured | None = None,
    limit: int | None = None,
) -> ModelOffer:
    first = routes[0]
    windows = [r.context_window for r in routes if r.context_window is not None]
    formats: set[WireFormat] = set().union(*(r.formats for r in routes))
    return ModelOffer(
        model_id=model_id,
        input_per_1m=first.price.input_per_1m,
        output_per_1m=first.price.output_per_1m,
        max_concurrent=(
            model_concurrency(config.limits.max_concurrent, routes) if limit is None else limit
        ),
        backend=first.kind,
        context_window=min(windows) if windows else None,
        formats=sorted(formats),
        measured=measured,
    )


def model_concurrency(global_cap: int, routes: Sequence[Route]) -> int:
    """The global cap when any route is uncapped, else min(global, sum of the routes' caps)."""
    caps = [r.cap for r in routes]
    if None in caps:
        return global_cap
    return min(global_cap, sum(cap or 0 for cap in caps))
