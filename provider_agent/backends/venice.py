"""Venice.ai (BYOK): `https://api.venice.ai/api/v1`, Bearer key from `api_key_env`.

- Health and models: `GET {base}/models?type=text` (there is no health endpoint).
- Context window `model_spec.availableContextTokens` (else top-level `context_length`); list price
  `model_spec.pricing.input.usd` / `output.usd`, already USD per 1M tokens. They are JSON numbers:
  the listing is parsed with its numbers kept exactly as written (`listing.exact_json`), so a
  price beyond a double's range is that model's problem, not an unparseable listing. Models
  marked `model_spec.offline` are not loaded; only text models are chat models.
- Formats: openai only (Venice documents no Anthropic endpoint).
"""

from __future__ import annotations

from typing import Any, ClassVar

from provider_agent.backends.base import Backend, openai_entries, positive_int
from provider_agent.discovery.listing import ModelInfo, UpstreamPrice, exact_json, usd_decimal

TEXT_MODELS = {"type": "text"}


def parse_price(pricing: Any) -> UpstreamPrice | None:
    """`model_spec.pricing` → UpstreamPrice; None unless both input and output USD are known."""
    if not isinstance(pricing, dict):
        return None
    sides = [pricing.get(side) for side in ("input", "output")]
    amounts = [usd_decimal(s.get("usd")) if isinstance(s, dict) else None for s in sides]
    if amounts[0] is None or amounts[1] is None:
        return None
    return UpstreamPrice(amounts[0], amounts[1])


def parse_models(listing: Any) -> list[ModelInfo]:
    """`GET /models?type=text` → text models; offline ones are `loaded=False`."""
    models = []
    for entry in openai_entries(listing):
        if entry.get("type", "text") != "text":
            continue
        spec = entry.get("model_spec")
        spec = spec if isinstance(spec, dict) else {}
        window = positive_int(spec.get("availableContextTokens")) or positive_int(
            entry.get("context_length")
        )
        models.append(
            ModelInfo(
                native_id=entry["id"],
                context_window=window,
                loaded=spec.get("offline") is not True,
                upstream_price=parse_price(spec.get("pricing")),
            )
        )
    return models


class VeniceBackend(Backend):
    kind: ClassVar[str] = "venice"
    default_url: ClassVar[str | None] = "https://api.venice.ai/api/v1"
    api_prefix: ClassVar[str] = ""
    health_path: ClassVar[str | None] = "/models"

    async def check_health(self) -> None:
        openai_entries(await self._text_models())

    async def list_models(self) -> list[ModelInfo]:
        return parse_models(await self._text_models())

    async def _text_models(self) -> Any:
        status, body = await self.get_raw(self.api_url("/models"), params=TEXT_MODELS)
        return self.parse_json(status, body, "GET /models", loads=exact_json)
