"""OpenRouter (BYOK): `https://openrouter.ai/api/v1`, Bearer key from `api_key_env`.

- Health: `GET {base}/key` — the key's own record, so a 200 also proves the key is accepted.
- Models: `GET {base}/models`; context window `context_length` (else
  `top_provider.context_length`); list price from `pricing.prompt` / `pricing.completion`, USD per
  token as decimal strings, converted exactly to USD per 1M tokens.
- Formats: openai only. OpenRouter's Anthropic-style endpoint lives under a different base
  (`/api/v1/messages` via `https://openrouter.ai/api`) and its details are unconfirmed.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

from provider_agent.backends.base import Backend, openai_entries, positive_int
from provider_agent.errors import BackendError
from provider_agent.listing import ModelInfo, UpstreamPrice, scale_usd, usd_decimal

TOKENS_PER_PRICE_UNIT = Decimal(1_000_000)


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


def parse_models(listing: Any) -> list[ModelInfo]:
    """`GET /models` → models with context windows and list prices. Models that cannot output
    text (image generators) are not chat models."""
    models = []
    for entry in openai_entries(listing):
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
    return models


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
        return parse_models(await self.get_json(self.api_url("/models")))
