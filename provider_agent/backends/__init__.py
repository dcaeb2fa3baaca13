"""Backend adapters: one module per kind, all on the OpenAI-compatible base in `base.py`.

`make_backend(config, http, timeout_s)` builds the adapter for a `[[backends]]` entry;
`ADAPTERS` maps each kind to its class.
"""

from __future__ import annotations

import aiohttp

from provider_agent.backends.base import Backend, Health, ModelInfo, UpstreamPrice
from provider_agent.backends.llamacpp import LlamaCppBackend
from provider_agent.backends.lmstudio import LmStudioBackend
from provider_agent.backends.ollama import OllamaBackend
from provider_agent.backends.openrouter import OpenRouterBackend
from provider_agent.backends.venice import VeniceBackend
from provider_agent.backends.vllm import VllmBackend
from provider_agent.config import BackendConfig

ADAPTERS: dict[str, type[Backend]] = {
    cls.kind: cls
    for cls in (
        VllmBackend,
        LlamaCppBackend,
        LmStudioBackend,
        OllamaBackend,
        OpenRouterBackend,
        VeniceBackend,
    )
}


def make_backend(config: BackendConfig, http: aiohttp.ClientSession, timeout_s: float) -> Backend:
    """The adapter for one configured backend, sharing the agent's session; every HTTP call it
    makes is bounded by `timeout_s`."""
    return ADAPTERS[config.kind](config, http, timeout_s)


__all__ = [
    "ADAPTERS",
    "Backend",
    "Health",
    "LlamaCppBackend",
    "LmStudioBackend",
    "ModelInfo",
    "OllamaBackend",
    "OpenRouterBackend",
    "UpstreamPrice",
    "VeniceBackend",
    "VllmBackend",
    "make_backend",
]
