"""llama.cpp's `llama-server`: one model, or several in router mode; `/props` and `/slots`; its
Prometheus `/metrics`; `Loading model` (503) on every non-public path while it loads; `timings` in
its stream.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, Final

from aiohttp import web

from provider_agent.dev.sim.answers import json_response, metric, metrics_response
from provider_agent.dev.sim.records import Job, SimModel, SimRequest, finish_reason, token_usage
from provider_agent.dev.sim.sse import DONE, WORDS, StreamFrames, sse
from provider_agent.dev.sim.state import Route, Routes, SimState, json_route

LLAMACPP_BUILD: Final = "b6500-1a2b3c4d"
LLAMACPP_SLOTS: Final = 4


def llamacpp_timings(prompt: int, n: int, elapsed_s: float) -> dict[str, Any]:
    predicted_ms = max(elapsed_s * 1000, 0.001)
    prompt_ms = 0.05 * prompt + 0.001
    return {
        "cache_n": 0,
        "prompt_n": prompt,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / prompt, 3),
        "prompt_per_second": round(prompt * 1000 / prompt_ms, 3),
        "predicted_n": n,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / n, 3),
        "predicted_per_second": round(n * 1000 / predicted_ms, 3),
    }


def llamacpp_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
    """A role chunk first; `timings` ride on the last chunk, or on the usage chunk if asked for."""
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]

    def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "choices": choices,
            "created": created,
            "id": cid,
            "model": job.model,
            "system_fingerprint": LLAMACPP_BUILD,
            "object": "chat.completion.chunk",
            **extra,
        }

    def piece(delta: dict[str, Any], finish: str | None = None) -> list[Any]:
        return [{"finish_reason": finish, "index": 0, "delta": delta}]

    tokens = tuple(sse(chunk(piece({"content": w}))) for w in WORDS)
    role = sse(chunk(piece({"role": "assistant", "content": None})))

    def closing(n: int, truncated: bool, elapsed: float) -> bytes:
        timings = llamacpp_timings(job.prompt_tokens, n, elapsed)
        finish = piece({}, finish_reason(truncated))
        if not job.include_usage:  # timings ride on the last chunk
            return sse(chunk(finish, timings=timings)) + DONE
        usage = {**token_usage(job, n), "prompt_tokens_details": {"cached_tokens": 0}}
        return sse(chunk(finish)) + sse(chunk([], usage=usage, timings=timings)) + DONE

    error = {"code": 500, "message": "failed to decode the batch", "type": "server_error"}
    return StreamFrames(b"", role + tokens[0], tokens, sse({"error": error}), closing)


class LlamacppEndpoints(SimState):
    """llama.cpp's routes and discovery answers."""

    def _llamacpp_routes(self, chat: Route, messages: Route) -> Routes:
        listing = Route("discovery", self._llamacpp_models, public=True)
        health = Route("health", self._llamacpp_health, public=True)
        return {
            ("GET", "/health"): health,
            ("GET", "/v1/health"): health,
            ("GET", "/v1/models"): listing,
            ("GET", "/models"): listing,
            ("GET", "/api/tags"): listing,
            ("GET", "/props"): Route("discovery", self._llamacpp_props),
            ("GET", "/slots"): json_route("discovery", lambda _: self.llamacpp_slots()),
            ("GET", "/metrics"): Route("discovery", self._llamacpp_metrics),
            ("POST", "/v1/chat/completions"): chat,
            ("POST", "/chat/completions"): chat,
            ("POST", "/v1/messages"): messages,
        }

    def llamacpp_models(self) -> dict[str, Any]:
        if self._llamacpp_router():
            status = "loading" if self._loading() else "loaded"
            return {
                "data": [
                    {
                        "id": m.name,
                        "object": "model",
                        "owned_by": "llamacpp",
                        "created": self.started_wall,
                        "in_cache": True,
                        "path": f"/models/{m.name}.gguf",
                        "status": {"value": status, "args": ["llama-server", "-c", str(m.context)]},
                    }
                    for m in self.models
                ],
                "object": "list",
            }
        model = self.models[0]
        entry: dict[str, Any] = {
            "id": model.name,
            "object": "model",
            "created": self.started_wall,
            "owned_by": "llamacpp",
            "meta": None,
        }
        if self._loading():
            return {"object": "list", "data": [entry]}
        entry["meta"] = {
            "vocab_type": 2,
            "n_vocab": 152064,
            "n_ctx": model.context,
            "n_ctx_train": self._trained(model),
            "n_embd": 3584,
            "n_params": 7615616512,
            "size": 4677120000,
        }
        listed = {
            "name": model.name,
            "model": model.name,
            "modified_at": "",
            "size": "",
            "digest": "",
            "type": "model",
            "description": "",
            "tags": [""],
            "capabilities": ["completion"],
            "parameters": "",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "",
                "families": [""],
                "parameter_size": "",
                "quantization_level": "",
            },
        }
        return {"models": [listed], "object": "list", "data": [entry]}

    def _llamacpp_slot(self, index: int, model: SimModel, processing: bool) -> dict[str, Any]:
        return {
            "id": index,
            "id_task": 100 + index if processing else -1,
            "n_ctx": model.context,
            "speculative": False,
            "is_processing": processing,
            "params": {
                "n_predict": -1,
                "seed": 4294967295,
                "temperature": 0.800000011920929,
                "top_k": 40,
                "top_p": 0.949999988079071,
                "min_p": 0.05000000074505806,
                "max_tokens": -1,
                "n_keep": 0,
                "stream": True,
                "samplers": [
                    "penalties",
                    "dry",
                    "top_k",
                    "typ_p",
                    "top_p",
                    "min_p",
                    "xtc",
                    "temperature",
                ],
            },
            "next_token": {
                "has_next_token": True,
                "has_new_line": False,
                "n_remain": -1,
                "n_decoded": 0,
            },
        }

    def llamacpp_props(self, model: SimModel) -> dict[str, Any]:
        settings = self._llamacpp_slot(0, model, False)
        settings.pop("id_task")
        settings["id_task"] = -1
        settings["prompt"] = ""
        settings["next_token"]["stopping_word"] = ""
        ordered = {
            k: settings[k] for k in ("id", "id_task", "n_ctx", "speculative", "is_processing")
        }
        ordered.update(params=settings["params"], prompt="", next_token=settings["next_token"])
        return {
            "default_generation_settings": ordered,
            "total_slots": self._llamacpp_total_slots(),
            "model_path": f"/models/{model.name}.gguf",
            "chat_template": "{%- for message in messages %}...",
            "chat_template_caps": {},
            "modalities": {"vision": False, "audio": False},
            "build_info": LLAMACPP_BUILD,
            "is_sleeping": False,
        }

    def _llamacpp_total_slots(self) -> int:
        """`--parallel`: the simulator's `slots` where set."""
        return LLAMACPP_SLOTS if self.slots is None else self.slots

    def llamacpp_slots(self) -> list[dict[str, Any]]:
        total = self._llamacpp_total_slots()
        busy = min(self.active if self.slots is None else self.busy, total)
        return [self._llamacpp_slot(i, self.models[0], i < busy) for i in range(total)]

    def _llamacpp_unavailable(self) -> web.Response | None:
        if self._loading():
            return self._error(503, "Loading model")
        return None

    async def _llamacpp_health(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        return self._llamacpp_unavailable() or json_response({"status": "ok"})

    async def _llamacpp_models(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        return json_response(self.llamacpp_models())

    async def _llamacpp_props(self, request: web.Request, _: SimRequest) -> web.StreamResponse:
        if (refused := self._llamacpp_unavailable()) is not None:
            return refused
        wanted = request.query.get("model")
        if wanted is None:
            if self._llamacpp_router():
                return self._error(400, "model name is missing from the request")
            return json_response(self.llamacpp_props(self.models[0]))
        model = self._models.get(wanted)
        if model is None:
            return self._error(404, f"model {wanted!r} not found")
        return json_response(self.llamacpp_props(model))

    async def _llamacpp_metrics(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        if (refused := self._llamacpp_unavailable()) is not None:
            return refused
        served = sum(self.served.values())
        lines = [
            *metric("llamacpp:prompt_tokens_total", "counter", "Prompt tokens.", served),
            *metric("llamacpp:prompt_seconds_total", "counter", "Prompt process time", 0.0),
            *metric("llamacpp:tokens_predicted_total", "counter", "Generated tokens.", served),
            *metric("llamacpp:tokens_predicted_seconds_total", "counter", "Predict time", 0.0),
            *metric("llamacpp:prompt_tokens_seconds", "gauge", "Prompt tokens/s.", 0.0),
            *metric("llamacpp:predicted_tokens_seconds", "gauge", "Generated tokens/s.", 0.0),
            *metric("llamacpp:requests_processing", "gauge", "Requests processing.", self.active),
            *metric("llamacpp:requests_deferred", "gauge", "Requests deferred.", self.queued),
            *metric("llamacpp:n_busy_slots_per_decode", "gauge", "Busy slots per decode.", 0.0),
        ]
        return metrics_response(lines)
