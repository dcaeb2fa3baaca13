"""What a backend reports in a discovery pass, as plain data, and the exact arithmetic on prices.

No I/O here (no aiohttp): the pure catalog and its tests import this without loading the HTTP
stack. The adapters in `backends/` produce these values; `catalog` turns them into the offer.
"""

from __future__ import annotations

import decimal
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class UpstreamPrice:
    """A BYOK provider's list price, in USD per 1M tokens (exact decimals)."""

    input_usd_per_1m: Decimal
    output_usd_per_1m: Decimal


@dataclass(frozen=True)
class ModelInfo:
    """One model as a backend reports it, in the backend's own terms."""

    native_id: str
    context_window: int | None = None
    chat: bool = True
    #: A job for it can be served now: resident, or loaded on first request by the server itself
    #: (Ollama). LM Studio's "not-loaded" and llama.cpp router's "unloaded" models are not.
    loaded: bool = True
    upstream_price: UpstreamPrice | None = None
    #: How many jobs the server runs at once for this model (a llama.cpp server's `/props`
    #: `total_slots`, per model in router mode); None when it does not say. Beyond it, jobs
    #: would queue unseen inside the server.
    slots: int | None = None


@dataclass(frozen=True)
class Health:
    ok: bool
    latency_ms: float
    error: str | None = None


def exact_context() -> decimal.Context:
    """A decimal context for upstream prices that can neither trap nor overflow into an
    exception: whatever a listing says (`1E+5000000`), the arithmetic yields a value (at worst
    Infinity) that the bound check then refuses. Inexact results round up: never below cost."""
    return decimal.Context(
        prec=60,
        rounding=decimal.ROUND_CEILING,
        Emax=decimal.MAX_EMAX,
        Emin=decimal.MIN_EMIN,
        traps=[],
    )


def usd_decimal(value: Any) -> Decimal | None:
    """A non-negative, finite USD amount from a JSON string or number, exactly as written; None
    for missing, unparseable, negative (OpenRouter's `"-1"` marks variable pricing), NaN or
    infinite values. Huge but finite amounts are kept: the catalog's bound drops them by name."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        return None
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else str(value))
    except (decimal.InvalidOperation, ValueError):
        return None
    if not amount.is_finite() or amount < 0:
        return None
    return amount


def scale_usd(amount: Decimal, factor: int | Decimal) -> Decimal:
    """`amount × factor` in the exact context (no decimal.Overflow, whatever the exponent)."""
    return exact_context().multiply(amount, Decimal(factor))


def exact_json(body: bytes) -> Any:
    """JSON with its numbers exactly as written: fractions (and integers longer than 18 digits)
    as Decimal. For listings whose prices are JSON numbers: one model's `1E+5000000`, beyond a
    double's range, is then that model's problem instead of an unparseable listing. ValueError
    for anything that is not JSON (including nesting too deep to parse)."""
    try:
        return json.loads(body, parse_float=Decimal, parse_int=_exact_int, parse_constant=Decimal)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _exact_int(text: str) -> int | Decimal:
    return int(text) if len(text.lstrip("-")) <= 18 else Decimal(text)
