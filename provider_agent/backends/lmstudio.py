"""LM Studio's server (`lms server start`, default port 1234).

LM Studio has no health endpoint and answers unknown paths with HTTP 200 ("Unexpected endpoint
or method"), so a 200 proves nothing by itself: liveness is a `GET /v1/models` that parses as a
model listing, and every REST answer is checked for the shape it should have.

Models come from the richest listing that answers:
1. `GET /api/v1/models` (≥ 0.4.0): `key`, `type` (`llm` | `embedding`), loaded ⇔
   `loaded_instances` non-empty, context = the loaded instance's `config.context_length`.
2. `GET /api/v0/models` (≥ 0.3.6): `id`, `type` (`llm` | `vlm` | `embeddings`), `state`,
   `max_context_length` (the model's maximum: the best this API tells).
3. `GET /v1/models`: ids only; every listed model counts as loaded (with JIT loading LM Studio
   loads it on first request) and ids naming an embedding model are not chat models.

Only `llm`/`vlm` models are chat models; the rest are reported with `chat=False`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from provider_agent.backends.base import Backend, ModelInfo, openai_entries, positive_int

CHAT_TYPES = frozenset({"llm", "vlm"})


def parse_api_v1_models(listing: Any) -> list[ModelInfo] | None:
    """`GET /api/v1/models` → models; None when the body is not that listing (older LM Studio
    answers unknown paths with a 200 error object)."""
    if not isinstance(listing, dict) or not isinstance(listing.get("models"), list):
        return None
    models = []
    for entry in listing["models"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        instances = [i for i in entry.get("loaded_instances") or [] if isinstance(i, dict)]
        configs = [i.get("config") for i in instances]
        loaded_windows = [
            positive_int(c.get("context_length")) for c in configs if isinstance(c, dict)
        ]
        window = next((w for w in loaded_windows if w is not None), None)
        models.append(
            ModelInfo(
                native_id=entry["key"],
                context_window=window or positive_int(entry.get("max_context_length")),
                chat=entry.get("type") in CHAT_TYPES,
                loaded=bool(instances),
            )
        )
    return models


def parse_api_v0_models(listing: Any) -> list[ModelInfo] | None:
    """`GET /api/v0/models` → models; None when the body is not that listing."""
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return None
    entries = openai_entries(listing)
    if entries and not any("state" in e or "type" in e for e in entries):
        return None  # an OpenAI-style listing without LM Studio's fields: not the REST API
    return [
        ModelInfo(
            native_id=entry["id"],
            context_window=positive_int(entry.get("max_context_length")),
            chat=entry.get("type") in CHAT_TYPES,
            loaded=entry.get("state") == "loaded",
        )
        for entry in entries
    ]


def parse_openai_models(listing: Any) -> list[ModelInfo]:
    """`GET /v1/models` → ids only; ids that name an embedding model are not chat models."""
    return [
        ModelInfo(native_id=entry["id"], chat="embed" not in entry["id"].lower())
        for entry in openai_entries(listing)
    ]


class LmStudioBackend(Backend):
    """Formats: openai only. LM Studio serves `/v1/messages` from 0.4.1, but none of its HTTP
    answers states the app version (`runtime.version` in `/api/v0` completions is the inference
    engine's, and `/api/v1` only proves ≥ 0.4.0), so there is no reliable source; an operator
    who knows sets `formats = ["openai", "anthropic"]` in the config."""

    kind: ClassVar[str] = "lmstudio"
    health_path: ClassVar[str | None] = None

    async def check_health(self) -> None:
        openai_entries(await self.get_json(self.api_url("/models")))

    async def list_models(self) -> list[ModelInfo]:
        for path, parse in (
            ("/api/v1/models", parse_api_v1_models),
            ("/api/v0/models", parse_api_v0_models),
        ):
            models = parse(await self._rest_listing(path))
            if models is not None:
                return models
        return parse_openai_models(await self.get_json(self.api_url("/models")))

    async def _rest_listing(self, path: str) -> Any:
        """A REST listing's JSON, or None when the endpoint is missing (404, or LM Studio's
        200-for-anything answer that is not JSON). Credentials refused and transport failures
        still raise: the next endpoint would fail the same way."""
        status, body = await self.get_raw(f"{self.base_url}{path}")
        if status in (401, 403):
            self.parse_json(status, body, f"GET {path}")  # raises BackendAuthError
        if not 200 <= status < 300:
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
