"""Backend adapters: one module per kind, all on the OpenAI-compatible base in `base.py`.

`make_backend(config, http, timeout_s)` builds the adapter for a `[[backends]]` entry;
`ADAPTERS` maps each kind to its class; `Registry` holds one adapter per configured backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp

from provider_agent.backends.base import Backend, Health, ModelInfo, UpstreamPrice
from provider_agent.backends.llamacpp import LlamaCppBackend
from provider_agent.backends.lmstudio import LmStudioBackend
from provider_agent.backends.ollama import OllamaBackend
from provider_agent.backends.openrouter import OpenRouterBackend
from provider_agent.backends.venice import VeniceBackend
from provider_agent.backends.vllm import VllmBackend
from provider_agent.config.schema import BackendConfig, Config

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


class Registry:
    """The adapters of one configuration, by backend label (`config.label`), in config order.

    Built once per configuration (`Registry.build` on start and on every reload), not per
    discovery pass: routes name a backend by label and jobs find its adapter here. The
    discovery timeout bounds the adapters' discovery calls only; job streams run under their
    job's deadline.
    """

    def __init__(self, config: Config, http: aiohttp.ClientSession) -> None:
        self.http = http
        timeout_s = config.discovery.timeout_s
        self._adapters = {
            backend.label: make_backend(backend, http, timeout_s) for backend in config.backends
        }

    @classmethod
    def build(cls, config: Config, http: aiohttp.ClientSession) -> Registry:
        return cls(config, http)

    def get(self, label: str) -> Backend:
        """The adapter of the backend named `label`; KeyError when no backend has that name."""
        try:
            return self._adapters[label]
        except KeyError:
            raise KeyError(f"no configured backend is named {label!r}") from None

    def __contains__(self, label: object) -> bool:
        return label in self._adapters

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)


__all__ = [
    "ADAPTERS",
    "Backend",
    "Health",
    "LlamaCppBackend",
    "LmStudioBackend",
    "ModelInfo",
    "OllamaBackend",
    "OpenRouterBackend",
    "Registry",
    "UpstreamPrice",
    "VeniceBackend",
    "VllmBackend",
    "make_backend",
]
