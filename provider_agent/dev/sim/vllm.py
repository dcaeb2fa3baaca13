"""vLLM: its probes (`/health`, `/version`, `/load`, `/ping`, `/openapi.json`), `/v1/models` with
`max_model_len`, its Prometheus `/metrics`, and its flavour of the OpenAI stream.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, Final

from aiohttp import web

from provider_agent.dev.sim.answers import metric, metrics_response
from provider_agent.dev.sim.records import Job, SimRequest, finish_reason, token_usage
from provider_agent.dev.sim.sse import DONE, WORDS, StreamFrames, sse
from provider_agent.dev.sim.state import Route, Routes, SimState, json_route

VLLM_VERSION: Final = "0.11.0"


def vllm_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
    """A role chunk first; the usage chunk (when asked for) lists `total_tokens` before
    `completion_tokens`."""
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        return {**base, "choices": [choice]}

    tokens = tuple(sse(chunk({"content": w})) for w in WORDS)
    role = sse(chunk({"role": "assistant", "content": ""}))

    def closing(n: int, truncated: bool, _: float) -> bytes:
        out = sse(chunk({"content": ""}, finish_reason(truncated)))
        if job.include_usage:
            u = token_usage(job, n)
            ordered = {k: u[k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")}
            out += sse({**base, "choices": [], "usage": ordered})
        return out + DONE

    error = {
        "message": "The engine encountered an internal error.",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    return StreamFrames(b"", role + tokens[0], tokens, sse({"error": error}) + DONE, closing)


class VllmEndpoints(SimState):
    """vLLM's routes and discovery answers."""

    def _vllm_routes(self, chat: Route, messages: Route) -> Routes:
        return {
            ("GET", "/health"): Route("health", self._vllm_health, public=True),
            ("GET", "/version"): json_route("discovery", lambda _: {"version": VLLM_VERSION}, True),
            ("GET", "/load"): json_route("discovery", lambda _: {"server_load": self.active}, True),
            ("GET", "/ping"): json_route("health", lambda _: {}, True),
            ("GET", "/v1/models"): json_route("discovery", lambda _: self.vllm_models()),
            ("GET", "/openapi.json"): json_route("discovery", lambda _: self.vllm_openapi(), True),
            ("GET", "/metrics"): Route("discovery", self._vllm_metrics, public=True),
            ("POST", "/v1/chat/completions"): chat,
            ("POST", "/v1/messages"): messages,
        }

    def vllm_models(self) -> dict[str, Any]:
        def permission() -> dict[str, Any]:
            return {
                "id": "modelperm-" + uuid.uuid4().hex,
                "object": "model_permission",
                "created": self.started_wall,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }

        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": self.started_wall,
                    "owned_by": "vllm",
                    "root": m.name,
                    "parent": None,
                    "max_model_len": m.context,
                    "permission": [permission()],
                }
                for m in self.models
            ],
        }

    def vllm_openapi(self) -> dict[str, Any]:
        paths = ["/health", "/version", "/load", "/ping", "/metrics", "/v1/models"]
        posts = ["/v1/chat/completions", "/v1/completions"]
        if self.anthropic:
            posts += ["/v1/messages", "/v1/messages/count_tokens"]
        spec: dict[str, Any] = {p: {"get": {"summary": p.strip("/")}} for p in paths}
        spec.update({p: {"post": {"summary": p.strip("/")}} for p in posts})
        return {"openapi": "3.1.0", "info": {"title": "FastAPI", "version": "0.1.0"}, "paths": spec}

    async def _vllm_health(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        return web.Response(status=503 if self._loading() else 200)

    async def _vllm_metrics(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        served = sum(self.served.values())
        lines: list[str] = []
        for m in self.models:
            labels = f'{{engine="0",model_name="{m.name}"}}'
            lines += metric(
                "vllm:num_requests_running",
                "gauge",
                "Requests running.",
                float(self.active),
                labels,
            )
            waiting = float(self.queued)  # waiting for a slot (`SimState.slots`)
            lines += metric(
                "vllm:num_requests_waiting", "gauge", "Requests waiting.", waiting, labels
            )
            lines += metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage.", 0.0, labels)
            lines += metric("vllm:gpu_cache_usage_perc", "gauge", "Deprecated alias.", 0.0, labels)
            lines += metric(
                "vllm:prompt_tokens_total", "counter", "Prefill tokens.", float(served), labels
            )
            lines += metric(
                "vllm:generation_tokens_total",
                "counter",
                "Generated tokens.",
                float(served),
                labels,
            )
        return metrics_response(lines)
