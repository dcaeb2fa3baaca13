"""OpenRouter (BYOK): `https://openrouter.ai/api/v1`, Bearer key from `api_key_env`.

- Health: `GET {base}/key` — the key's own record, so a 200 also proves the key is accepted.
- Models: `GET {base}/models`; context window `context_length` (else
  `top_provider.context_length`); list price from `pricing.prompt` / `pricing.completion`, USD per
  token as decimal strings, converted exactly to USD per 1M tokens. A model that also charges per
  request (`pricing.request` other than 0) is left out, with one warning per listing: the wire
  has no per-request price, and selling it per token would sell below cost. A fee that cannot
  be read (not a number, negative) counts as a fee.
- Formats: openai only. OpenRouter's Anthropic-style endpoint lives under a different base
  (`/api/v1/messages` via `https://openrouter.ai/api`) and its details are unconfirmed.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any, ClassVar, NamedTuple

from provider_agent.backends.base import Backend, openai_entries, positive_int
from provider_agent.discovery.listing import ModelInfo, UpstreamPrice, scale_usd, usd_decimal
from provider_agent.errors import BackendError
from provider_agent.safe_text import printable

log = logging.getLogger(__name__)

TOKENS_PER_PRICE_UNIT = Decimal(1_000_000)
#: Model ids a warning about per-request fees names (then "and N more").
WARNING_NAMES = 5


def parse_price(pricing: Any) -> UpstreamPrice | None:
    """`pricing` (USD per token, strings) → USD per 1M tokens, exact; None unless both the prompt
    and the completion price are known, finite and not negative (`"-1"`: variable pricing).
    An absurd but finite price (`"1E+5000000"`) is kept: the catalog drops that model by name."""
    if not isinstance(pricing, dict):
        return None
    prompt = usd_decimal(pricing.get("prompt"))
    completion = usd_decimal(pricing.get("completion"))
    if prompt is None or completion is None:
        return None
    return UpstreamPrice(
        scale_usd(prompt, TOKENS_PER_PRICE_UNIT), scale_usd(completion, TOKENS_PER_PRICE_UNIT)
    )


def charges_per_request(pricing: Any) -> bool:
    """Whether `pricing.request` (USD per request, a decimal string) is a fee: anything but
    absent, null or zero — a value that cannot be read is an unknown fee, so it counts."""
    if not isinstance(pricing, dict) or pricing.get("request") is None:
        return False
    fee = usd_decimal(pricing["request"])
    return fee is None or fee != 0


class Listing(NamedTuple):
    """A parsed `GET /models`: the models, and the ids left out for a per-request fee."""

    models: list[ModelInfo]
    per_request: list[str]


def parse_models(listing: Any) -> list[ModelInfo]:
    """`GET /models` → models with context windows and list prices (see `parse_listing`)."""
    return parse_listing(listing).models


def parse_listing(listing: Any) -> Listing:
    """`GET /models` → models with context windows and list prices; models that charge per
    request are left out (named in `per_request`). Models that cannot output text (image
    generators) are not chat models."""
    models = []
    per_request = []
    for entry in openai_entries(listing):
        if charges_per_request(entry.get("pricing")):
            per_request.append(entry["id"])
            continue
        top = entry.get("top_provider")
        window = positive_int(entry.get("context_length"))
        if window is None and isinstance(top, dict):
            window = positive_int(top.get("context_length"))
        architecture = entry.get("architecture")
        outputs = architecture.get("output_modalities") if isinstance(architecture, dict) else None
        models.append(
            ModelInfo(
                native_id=entry["id"],
                context_window=window,
                chat=not isinstance(outputs, list) or "text" in outputs,
                upstream_price=parse_price(entry.get("pricing")),
            )
        )
    return Listing(models, per_request)


class OpenRouterBackend(Backend):
    kind: ClassVar[str] = "openrouter"
    default_url: ClassVar[str | None] = "https://openrouter.ai/api/v1"
    api_prefix: ClassVar[str] = ""
    health_path: ClassVar[str | None] = "/key"

    async def check_health(self) -> None:
        answer = await self.get_json(self.api_url("/key"))
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), dict):
            raise BackendError("GET /key: unexpected answer (no `data` object)")

    async def list_models(self) -> list[ModelInfo]:
        listing = parse_listing(await self.get_json(self.api_url("/models")))
        allowed = self.config.models
        named = [m for m in listing.per_request if allowed is None or m in allowed]
        if named:  # one line for all of them; models not allow-listed are not worth a word
            shown = ", ".join(printable(m, 80) for m in named[:WARNING_NAMES])
            more = f" and {len(named) - WARNING_NAMES} more" if len(named) > WARNING_NAMES else ""
            log.warning(
                "backend %s: %d model%s left out: %s charge%s a fee per request "
                "(pricing.request), which the wire cannot price: %s%s",
                printable(self.name),
                len(named),
                "s" if len(named) > 1 else "",
                "they" if len(named) > 1 else "it",
                "" if len(named) > 1 else "s",
                shown,
                more,
            )
        return listing.models
