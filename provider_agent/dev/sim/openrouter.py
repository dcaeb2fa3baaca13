"""OpenRouter (BYOK): everything under `/api/v1`; a priced model listing, `/key` (its health probe,
with what the simulator's completions cost so far), and its stream: keepalive comments, the role
in every chunk, usage with `cost` always last.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from provider_agent.dev.sim.records import Job, cost_usd, finish_reason, token_usage
from provider_agent.dev.sim.sse import DONE, WORDS, StreamFrames, sse
from provider_agent.dev.sim.state import Route, Routes, SimState, json_route


def _usd_per_token(usd_per_1m: Decimal) -> str:
    """OpenRouter's price strings: USD per token, plain decimal notation."""
    return format((usd_per_1m / 1_000_000).normalize(), "f")


def openrouter_stream(job: Job, created: int, price: tuple[Decimal, Decimal]) -> StreamFrames:
    """Every chunk repeats the role; usage (with cost) always comes last; keepalive comments."""
    top = {
        "id": f"gen-{created}-{uuid.uuid4().hex[:20]}",
        "provider": "SimProvider",
        "model": job.model,
        "object": "chat.completion.chunk",
        "created": created,
    }

    def chunk(content: str, finish: str | None = None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": content},
            "finish_reason": finish,
            "native_finish_reason": finish,
            "logprobs": None,
        }
        return {**top, "choices": [choice]}

    tokens = tuple(sse(chunk(w)) for w in WORDS)

    def closing(n: int, truncated: bool, _: float) -> bytes:
        usage = {
            **token_usage(job, n),
            "cost": cost_usd(price, job.prompt_tokens, n),
            "is_byok": False,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost_details": {"upstream_inference_cost": None},
        }
        tail = sse({**top, "choices": [], "usage": usage})
        return sse(chunk("", finish_reason(truncated))) + tail + DONE

    error = {
        "id": top["id"],
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "provider": "SimProvider",
        "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    preamble = b": OPENROUTER PROCESSING\n\n"
    return StreamFrames(preamble, tokens[0], tokens, sse(error), closing)


class OpenrouterEndpoints(SimState):
    """OpenRouter's routes and discovery answers."""

    def _openrouter_routes(self, chat: Route, messages: Route) -> Routes:
        key = json_route("health", lambda _: self._byok_health(self.openrouter_key))
        return {
            ("GET", "/api/v1/models"): json_route(
                "discovery", lambda _: self.openrouter_models(), True
            ),
            ("GET", "/api/v1/key"): key,
            ("GET", "/api/v1/auth/key"): key,
            ("POST", "/api/v1/chat/completions"): chat,
            ("POST", "/api/v1/messages"): messages,
        }

    def openrouter_models(self) -> dict[str, Any]:
        prompt, completion = (_usd_per_token(p) for p in self.price)
        return {
            "data": [
                {
                    "id": m.name,
                    "canonical_slug": m.name,
                    "hugging_face_id": "",
                    "name": f"Sim: {m.name}",
                    "created": self.started_wall,
                    "description": "A simulated model.",
                    "context_length": m.context,
                    "architecture": {
                        "modality": "text->text",
                        "input_modalities": ["text"],
                        "output_modalities": ["text"],
                        "tokenizer": "Llama3",
                        "instruct_type": "llama3",
                    },
                    "pricing": {
                        "prompt": prompt,
                        "completion": completion,
                        "request": "0",
                        "image": "0",
                        "web_search": "0",
                        "internal_reasoning": "0",
                    },
                    "top_provider": {
                        "context_length": m.context,
                        "max_completion_tokens": 16384,
                        "is_moderated": False,
                    },
                    "per_request_limits": None,
                    "supported_parameters": ["max_tokens", "stop", "temperature", "tools", "top_p"],
                }
                for m in self.models
            ]
        }

    def openrouter_key(self) -> dict[str, Any]:
        usage = round(self._cost_usd, 6)
        return {
            "data": {
                "label": "sk-or-v1-sim...000",
                "limit": 100,
                "usage": usage,
                "usage_daily": usage,
                "usage_weekly": usage,
                "usage_monthly": usage,
                "byok_usage": 0,
                "byok_usage_daily": 0,
                "byok_usage_weekly": 0,
                "byok_usage_monthly": 0,
                "is_free_tier": False,
                "is_provisioning_key": False,
                "limit_remaining": round(100 - usage, 6),
                "limit_reset": "monthly",
                "include_byok_in_limit": False,
                "expires_at": None,
                "rate_limit": {
                    "requests": 1000,
                    "interval": "1h",
                    "note": "This field is deprecated and safe to ignore.",
                },
            }
        }
