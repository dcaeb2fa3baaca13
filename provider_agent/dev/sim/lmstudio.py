"""LM Studio: the OpenAI `/v1/models` (its health probe), its own `/api/v0` and `/api/v1` listings
with what is loaded, and the `/v1` stream it shares with Ollama (`local_stream`).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from provider_agent.dev.sim.records import Job, SimModel, finish_reason, token_usage
from provider_agent.dev.sim.sse import DONE, WORDS, StreamFrames, sse
from provider_agent.dev.sim.state import Route, Routes, SimState, json_route


def local_stream(kind: str, job: Job, created: int) -> StreamFrames:
    """LM Studio's and Ollama's `/v1`: the first token carries the role, a separate finish."""
    lmstudio = kind == "lmstudio"
    head = {
        "id": "chatcmpl-" + (uuid.uuid4().hex[:21] if lmstudio else str(created % 999)),
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "system_fingerprint": job.model if lmstudio else "fp_ollama",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        if lmstudio:
            choice["logprobs"] = None
        choice["finish_reason"] = finish
        return {**head, "choices": [choice]}

    tokens = tuple(sse(chunk({"content": w})) for w in WORDS)
    first = sse(chunk({"role": "assistant", "content": WORDS[0]}))

    def closing(n: int, truncated: bool, _: float) -> bytes:
        out = sse(chunk({}, finish_reason(truncated)))
        if job.include_usage:
            out += sse({**head, "choices": [], "usage": token_usage(job, n)})
        return out + DONE

    if lmstudio:
        crashed = {"message": "Model crashed during generation.", "type": "server_error"}
        error = sse({"error": {**crashed, "param": None, "code": None}}) + DONE
    else:
        error = b""  # Ollama's /v1 drops the native error line and just ends the stream
    return StreamFrames(b"", first, tokens, error, closing)


def lmstudio_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
    return local_stream("lmstudio", job, created)


class LmstudioEndpoints(SimState):
    """LM Studio's routes and discovery answers."""

    def _lmstudio_routes(self, chat: Route, messages: Route) -> Routes:
        return {
            ("GET", "/v1/models"): json_route("health", lambda _: self.lmstudio_v1_models()),
            ("GET", "/api/v0/models"): json_route("discovery", lambda _: self.lmstudio_api_v0()),
            ("GET", "/api/v1/models"): json_route("discovery", lambda _: self.lmstudio_api_v1()),
            ("POST", "/v1/chat/completions"): chat,
            ("POST", "/v1/messages"): messages,
        }

    def lmstudio_v1_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "owned_by": "organization_owner"}
                for m in self.models
            ],
        }

    def lmstudio_api_v0(self) -> dict[str, Any]:
        state = "not-loaded" if self._loading() else "loaded"
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "type": "llm",
                    "publisher": _publisher(m.name),
                    "arch": "qwen2",
                    "compatibility_type": "gguf",
                    "quantization": "Q4_K_M",
                    "state": state,
                    "max_context_length": self._trained(m),
                }
                for m in self.models
            ],
        }

    def lmstudio_api_v1(self) -> dict[str, Any]:
        def instances(m: SimModel) -> list[dict[str, Any]]:
            if self._loading():
                return []
            config = {
                "context_length": m.context,
                "eval_batch_size": 512,
                "parallel": 4,
                "flash_attention": True,
                "offload_kv_cache_to_gpu": True,
            }
            return [{"id": m.name, "config": config}]

        return {
            "models": [
                {
                    "type": "llm",
                    "publisher": _publisher(m.name),
                    "key": m.name,
                    "display_name": m.name,
                    "architecture": "qwen2",
                    "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
                    "size_bytes": 4683073952,
                    "params_string": "7B",
                    "loaded_instances": instances(m),
                    "max_context_length": self._trained(m),
                    "format": "gguf",
                    "capabilities": {"vision": False, "trained_for_tool_use": True},
                    "description": None,
                }
                for m in self.models
            ]
        }


def _publisher(name: str) -> str:
    owner, sep, _ = name.partition("/")
    return owner if sep and owner else "lmstudio-community"
