"""Ollama (default `http://127.0.0.1:11434`), served through its `/v1` OpenAI-compatible API.

- Health: `GET /` answers `Ollama is running`; `GET /api/version` is the fallback probe. There is
  no loading state: models load on first request, so every installed model counts as loaded.
- Models: `GET /api/tags` (installed; fallback `GET /v1/models`), then, concurrently, `GET /api/ps`
  (resident models with their allocated `context_length`) and one `POST /api/show` per model
  (capabilities, trained context, the Modelfile's `num_ctx`), at most `SHOW_CONCURRENCY` at once.
  The details are optional: when the discovery budget runs out before they all answer, the models
  known from `/api/tags` are still listed, those without details with no context window.
- Context window: the Modelfile's `num_ctx` when set (what a `/v1` request runs with; Ollama caps
  it at the trained context), else the resident context from `/api/ps`, else the trained context
  `model_info["<general.architecture>.context_length"]`.
- Formats: `anthropic` too from Ollama 0.14.0 (`/v1/messages`), read from `/api/version`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import anyio
import orjson

from provider_agent.backends.base import Backend, ModelInfo, openai_entries, positive_int
from provider_agent.config.schema import WireFormat
from provider_agent.errors import BackendError
from provider_agent.safe_text import printable

log = logging.getLogger(__name__)

ANTHROPIC_SINCE = (0, 14, 0)
#: `/api/show` requests in flight at once (each one reads a model's metadata from disk).
SHOW_CONCURRENCY = 8
_NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(value: Any) -> tuple[int, int, int] | None:
    """`"0.14.2"` → (0, 14, 2); pre-release suffixes are ignored; None when unparseable."""
    match = _VERSION.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def parse_tags(listing: Any) -> dict[str, list[str] | None] | None:
    """`GET /api/tags` → {name: capabilities (newer builds list them here) or None}, in order;
    None when the body is not that listing."""
    if not isinstance(listing, dict) or not isinstance(listing.get("models"), list):
        return None
    names: dict[str, list[str] | None] = {}
    for entry in listing["models"]:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if isinstance(name, str) and name:
            names[name] = _capabilities(entry)
    return names


def parse_ps(listing: Any) -> dict[str, int]:
    """`GET /api/ps` → {name: allocated context} for resident models that report one (≥ 0.9.7)."""
    running: dict[str, int] = {}
    models = listing.get("models") if isinstance(listing, dict) else None
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict):
            continue
        window = positive_int(entry.get("context_length"))
        if window is None:
            continue
        for key in ("name", "model"):
            if isinstance(entry.get(key), str):
                running[entry[key]] = window
    return running


def trained_context(show: Mapping[str, Any]) -> int | None:
    """`/api/show` → `model_info["<general.architecture>.context_length"]`."""
    info = show.get("model_info")
    if not isinstance(info, dict):
        return None
    arch = info.get("general.architecture")
    return positive_int(info.get(f"{arch}.context_length")) if isinstance(arch, str) else None


def configured_num_ctx(show: Mapping[str, Any]) -> int | None:
    """The `num_ctx` line of `/api/show`'s `parameters` text, when the Modelfile sets one."""
    parameters = show.get("parameters")
    match = _NUM_CTX.search(parameters) if isinstance(parameters, str) else None
    return positive_int(int(match[1])) if match else None


def model_info(
    name: str,
    show: Mapping[str, Any] | None,
    running_context: int | None,
    listed_capabilities: list[str] | None = None,
) -> ModelInfo:
    """One installed model from what `/api/show` and `/api/ps` said (either may be missing).
    Not a chat model when its capabilities are known and lack `completion` (embedding models)."""
    show = show or {}
    capabilities = _capabilities(show) or listed_capabilities
    trained = trained_context(show)
    num_ctx = configured_num_ctx(show)
    if num_ctx is not None:
        window: int | None = min(num_ctx, trained) if trained is not None else num_ctx
    else:
        window = running_context or trained
    return ModelInfo(
        native_id=name,
        context_window=window,
        chat=capabilities is None or "completion" in capabilities,
        loaded=True,
    )


def _capabilities(entry: Mapping[str, Any]) -> list[str] | None:
    value = entry.get("capabilities")
    if isinstance(value, list):
        return [c for c in value if isinstance(c, str)]
    return None


class OllamaBackend(Backend):
    kind: ClassVar[str] = "ollama"
    health_path: ClassVar[str | None] = "/"

    async def check_health(self) -> None:
        status, body = await self.get_raw(f"{self.base_url}/")
        if 200 <= status < 300 and body.startswith(b"Ollama is running"):
            return
        # Something in front of Ollama may own `/`: the version endpoint is the other probe.
        if parse_version(await self._version_json()) is None:
            raise BackendError("GET /api/version: no version in the answer")

    async def list_models(self) -> list[ModelInfo]:
        installed = await self._installed()
        shows: dict[str, dict[str, Any] | None] = {}
        running: dict[str, int] = {}
        limiter = anyio.CapacityLimiter(SHOW_CONCURRENCY)

        async def show(name: str) -> None:
            async with limiter:
                shows[name] = await self._show(name)

        async def ps() -> None:
            # Older servers have no runtime context; the other sources still apply.
            with contextlib.suppress(BackendError):
                running.update(parse_ps(await self.get_json(f"{self.base_url}/api/ps")))

        with anyio.move_on_after(self.detail_budget_s()):
            async with anyio.create_task_group() as group:
                group.start_soon(ps)
                for name in installed:
                    group.start_soon(show, name)
        if len(shows) < len(installed):
            log.warning(
                "backend %s: /api/show answered for %d of %d models within the discovery budget;"
                " the rest are listed without a context window",
                printable(self.name),
                len(shows),
                len(installed),
            )
        return [
            model_info(name, shows.get(name), running.get(name), capabilities)
            for name, capabilities in installed.items()
        ]

    async def detect_formats(self) -> frozenset[WireFormat]:
        try:
            version = parse_version(await self._version_json())
        except BackendError:
            version = None
        if version is not None and version >= ANTHROPIC_SINCE:
            return frozenset({"openai", "anthropic"})
        return frozenset({"openai"})

    async def _version_json(self) -> Any:
        answer = await self.get_json(f"{self.base_url}/api/version")
        return answer.get("version") if isinstance(answer, dict) else None

    async def _installed(self) -> dict[str, list[str] | None]:
        """Installed models from `/api/tags`; from `/v1/models` when that endpoint is missing or
        answers something else (a proxy exposing only `/v1`)."""
        status, body = await self.get_raw(f"{self.base_url}/api/tags")
        if status in (401, 403):
            self.parse_json(status, body, "GET /api/tags")  # raises BackendAuthError
        if 200 <= status < 300:
            try:
                tags = parse_tags(orjson.loads(body))
            except orjson.JSONDecodeError:
                tags = None
            if tags is not None:
                return tags
        listing = await self.get_json(self.api_url("/models"))
        return {entry["id"]: None for entry in openai_entries(listing)}

    async def _show(self, name: str) -> dict[str, Any] | None:
        """`POST /api/show` for one model; None when it fails (the model is still listed)."""
        try:
            answer = await self.post_json(f"{self.base_url}/api/show", {"model": name})
        except BackendError:
            return None
        return answer if isinstance(answer, dict) else None
