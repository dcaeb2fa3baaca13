"""vLLM (`vllm serve`): `/health`, `/v1/models` with `max_model_len`, Anthropic via `/openapi.json`.

Health is the base's `GET /health` (200 with an empty body when the engine is alive, 503 when it
is dead; while a model loads the server is not listening at all).
"""

from __future__ import annotations

from typing import Any, ClassVar

from provider_agent.backends.base import Backend, ModelInfo, openai_entries, positive_int
from provider_agent.config.schema import WireFormat
from provider_agent.errors import BackendError


def parse_models(listing: Any) -> list[ModelInfo]:
    """`GET /v1/models` → models. Context window = `max_model_len`; a LoRA adapter (an entry with
    a `parent`) whose own `max_model_len` is missing or null takes its parent's."""
    entries = openai_entries(listing)
    windows = {entry["id"]: positive_int(entry.get("max_model_len")) for entry in entries}
    models = []
    for entry in entries:
        window = windows[entry["id"]]
        parent = entry.get("parent")
        if window is None and isinstance(parent, str):
            window = windows.get(parent)
        models.append(ModelInfo(native_id=entry["id"], context_window=window))
    return models


def openapi_has_messages(schema: Any) -> bool:
    """Whether an OpenAPI document lists the Anthropic `/v1/messages` route."""
    paths = schema.get("paths") if isinstance(schema, dict) else None
    return isinstance(paths, dict) and "/v1/messages" in paths


class VllmBackend(Backend):
    kind: ClassVar[str] = "vllm"

    async def list_models(self) -> list[ModelInfo]:
        return parse_models(await self.get_json(self.api_url("/models")))

    async def detect_formats(self) -> frozenset[WireFormat]:
        """`openai`, plus `anthropic` when `/openapi.json` lists `/v1/messages`; any failure to
        read it (disabled docs, old build, garbage) means openai only."""
        try:
            schema = await self.get_json(f"{self.base_url}/openapi.json")
        except BackendError:
            return frozenset({"openai"})
        if openapi_has_messages(schema):
            return frozenset({"openai", "anthropic"})
        return frozenset({"openai"})
