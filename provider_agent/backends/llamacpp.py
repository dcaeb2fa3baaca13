"""llama.cpp's `llama-server`, and OpenAI-compatible look-alikes (llama-cpp-python's server).

- Health: `GET /health` → 200 `{"status":"ok"}` is ready; 503 `Loading model` is not. Servers
  without `/health` (llama-cpp-python answers 404) are probed with `GET /v1/models` instead.
- Models: `GET /v1/models`. The served context is `meta.n_ctx`, else `/props`
  `default_generation_settings.n_ctx` — never `n_ctx_train`, which is what the model was trained
  on, not what this server allocates. Router mode (no `-m`) lists models with `status.value`;
  only `loaded` ones can take a job now.
- Slots: `/props` `total_slots` (`--parallel`/`-np`), per model in router mode
  (`/props?model=<id>`): how many jobs the server runs at once; beyond it they queue inside it,
  unseen. llama-cpp-python has no `/props`: its models go without.
- Formats: `anthropic` too when `POST /v1/messages` with `{}` answers anything but 404 (its
  validation error proves the route): older C++ builds have `/props` but not the route.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import anyio
import orjson

from provider_agent.backends.base import Backend, ModelInfo, openai_entries, positive_int
from provider_agent.config.schema import WireFormat
from provider_agent.errors import BackendError
from provider_agent.safe_text import printable

#: `/props` requests in flight at once in router mode (one per loaded model).
_PROPS_CONCURRENCY = 4
#: The most slots believed from `/props` `total_slots`; beyond it (or below 1) it is not a count.
MAX_SLOTS = 4096
#: Statuses of `POST /v1/messages {}` that say the route is not there (any other answer, a
#: validation error above all, proves it is).
_NO_MESSAGES_ROUTE = frozenset({404, 405, 501})
#: Most bytes of the answer to that probe that are read.
_PROBE_CAP = 64 * 1024
#: Most seconds that probe may take (at most a quarter of the discovery timeout): a server
#: refuses `{}` at once; one that queues it instead must not eat the pass's budget for the
#: listing, which comes after it. The probe is dropped then, and the route not counted on.
_PROBE_MAX_S = 2.0


def served_context(entry: dict[str, Any]) -> int | None:
    """The context the server allocated, from a `/v1/models` entry's `meta.n_ctx` (recent builds);
    None when absent (older builds, loading, llama-cpp-python). `n_ctx_train` is not it."""
    meta = entry.get("meta")
    return positive_int(meta.get("n_ctx")) if isinstance(meta, dict) else None


def router_status(entry: dict[str, Any]) -> str | None:
    """Router mode's `status.value` (`loaded`, `unloaded`, `loading`, …); None outside it."""
    status = entry.get("status")
    if isinstance(status, dict) and isinstance(status.get("value"), str):
        return str(status["value"])
    return None


def is_router_listing(listing: Any) -> bool:
    """Whether a model listing comes from router mode (its entries carry `status.value`)."""
    return any(router_status(entry) is not None for entry in openai_entries(listing))


def parse_models(listing: Any) -> list[ModelInfo]:
    """`GET /v1/models` → models with the context known from the listing alone."""
    models = []
    for entry in openai_entries(listing):
        status = router_status(entry)
        models.append(
            ModelInfo(
                native_id=entry["id"],
                context_window=served_context(entry),
                loaded=status is None or status == "loaded",
            )
        )
    return models


def props_context(props: Any) -> int | None:
    """`/props` → `default_generation_settings.n_ctx` (the per-slot context), else None."""
    if not isinstance(props, dict):
        return None
    settings = props.get("default_generation_settings")
    return positive_int(settings.get("n_ctx")) if isinstance(settings, dict) else None


def props_slots(props: Any) -> int | None:
    """`/props` `total_slots` (the server's `--parallel`): how many jobs it runs at once; None
    when absent or not a believable count (an int from 1 to MAX_SLOTS)."""
    if not isinstance(props, dict):
        return None
    slots = props.get("total_slots")
    if isinstance(slots, int) and not isinstance(slots, bool) and 1 <= slots <= MAX_SLOTS:
        return slots
    return None


def messages_route_served(status: int) -> bool:
    """Whether the answer to `POST /v1/messages {}` proves the route is there: anything but
    "not found" (404), "method not allowed" (405) or "not implemented" (501)."""
    return status not in _NO_MESSAGES_ROUTE


class LlamaCppBackend(Backend):
    kind: ClassVar[str] = "llamacpp"

    async def check_health(self) -> None:
        status, body = await self.get_raw(f"{self.base_url}/health")
        if 200 <= status < 300:
            return
        if status == 404:
            # No /health (llama-cpp-python): a model listing that parses proves it is serving.
            openai_entries(await self.get_json(self.api_url("/models")))
            return
        if status == 503:
            raise BackendError(f"GET /health: HTTP 503, not ready ({unavailable_reason(body)})")
        self.parse_json(status, body, "GET /health")  # 401/403 → auth error, else status error

    async def list_models(self) -> list[ModelInfo]:
        listing = await self.get_json(self.api_url("/models"))
        models = parse_models(listing)
        loaded = [i for i, m in enumerate(models) if m.loaded]
        if not loaded:
            return models
        if not is_router_listing(listing):
            props = None
            with anyio.move_on_after(self.detail_budget_s()):  # as below: details come second
                props = await self._props(None)
            return [_with_props(m, props) for m in models]
        # Router mode: each loaded model has its own /props (`?model=`), and its own slots.
        answers: dict[int, Any] = {}
        limiter = anyio.CapacityLimiter(_PROPS_CONCURRENCY)

        async def fetch(index: int) -> None:
            async with limiter:
                answers[index] = await self._props(models[index].native_id)

        with anyio.move_on_after(self.detail_budget_s()):  # the models matter more than details
            async with anyio.create_task_group() as group:
                for index in loaded:
                    group.start_soon(fetch, index)
        return [_with_props(m, answers.get(i)) for i, m in enumerate(models)]

    async def detect_formats(self) -> frozenset[WireFormat]:
        if await self._serves_messages():
            return frozenset({"openai", "anthropic"})
        return frozenset({"openai"})

    async def _serves_messages(self) -> bool:
        """`POST /v1/messages` with `{}`: a build that serves the route refuses the empty
        request (a validation error); one that does not answers 404. No answer (in time): not
        known, so not counted on."""
        with anyio.move_on_after(min(_PROBE_MAX_S, self.timeout_s / 4)):
            try:
                status, _ = await self.request_raw(
                    "POST", self.api_url("/messages"), json_body={}, cap=_PROBE_CAP
                )
            except BackendError:
                return False
            return messages_route_served(status)
        return False

    async def _props(self, model: str | None) -> Any:
        """`GET /props` (for one model in router mode); None when it fails: llama-cpp-python has
        no /props, and a loading or sleeping server may refuse it."""
        params = {"model": model} if model is not None else None
        try:
            return await self.get_json(f"{self.base_url}/props", params=params)
        except BackendError:
            return None


def _with_props(model: ModelInfo, props: Any) -> ModelInfo:
    """A loaded model with what its `/props` adds: the served context (when the listing had
    none) and the slot count."""
    if not model.loaded or props is None:
        return model
    window = model.context_window if model.context_window is not None else props_context(props)
    return dataclasses.replace(model, context_window=window, slots=props_slots(props))


def unavailable_reason(body: bytes) -> str:
    """`error.message` of llama.cpp's 503 body (`Loading model`), escaped and cut, else a
    generic reason."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "unavailable"
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) and isinstance(data, dict):
        message = data.get("status")  # legacy builds: {"status": "loading model"}
    return printable(message, 100) if isinstance(message, str) and message else "unavailable"
