"""Venice (BYOK): everything under `/api/v1`; its model listing (its health probe) with prices and
capabilities, filtered by `type`; its stream ends with usage and `cost`. No `/messages` route.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from provider_agent.dev.sim.records import Job, cost_usd, finish_reason, token_usage
from provider_agent.dev.sim.sse import DONE, WORDS, StreamFrames, sse
from provider_agent.dev.sim.state import Route, Routes, SimState, json_route


def venice_stream(job: Job, created: int, price: tuple[Decimal, Decimal]) -> StreamFrames:
    """A role chunk first; usage with `cost` always comes last."""
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    tokens = tuple(sse(chunk({"content": w})) for w in WORDS)
    role = sse(chunk({"role": "assistant", "content": ""}))

    def closing(n: int, truncated: bool, _: float) -> bytes:
        cost = {"usd": cost_usd(price, job.prompt_tokens, n), "diem": 0}
        tail = {**base, "choices": [], "usage": token_usage(job, n), "cost": cost}
        return sse(chunk({}, finish_reason(truncated))) + sse(tail) + DONE

    overloaded = {
        "message": "The model is currently overloaded. Please try again later.",
        "code": "model_overloaded",
        "retry_after": 30,
    }
    return StreamFrames(b"", role + tokens[0], tokens, sse({"error": overloaded}) + DONE, closing)


class VeniceEndpoints(SimState):
    """Venice's routes and discovery answers."""

    def _venice_routes(self, chat: Route, _: Route) -> Routes:
        routes = {
            ("GET", "/api/v1/models"): json_route(
                "health",
                lambda r: self._byok_health(lambda: self.venice_models(r.query.get("type"))),
            ),
            ("POST", "/api/v1/chat/completions"): chat,
        }
        return routes

    def venice_models(self, model_type: str | None) -> dict[str, Any]:
        wanted = model_type or "text"
        entries = [
            {
                "id": m.name,
                "object": "model",
                "owned_by": "venice.ai",
                "type": "text",
                "created": self.started_wall,
                "context_length": m.context,
                "model_spec": {
                    "name": m.name,
                    "description": "A simulated model.",
                    "availableContextTokens": m.context,
                    "maxCompletionTokens": 16384,
                    "privacy": "private",
                    "beta": False,
                    "betaModel": False,
                    "offline": False,
                    "modelSource": "https://example.invalid/sim",
                    "traits": ["function_calling_default"],
                    "capabilities": {
                        "optimizedForCode": False,
                        "quantization": "fp8",
                        "supportsAudioInput": False,
                        "supportsFunctionCalling": True,
                        "supportsLogProbs": True,
                        "supportsMultipleImages": False,
                        "supportsReasoning": False,
                        "supportsReasoningEffort": False,
                        "supportsResponseSchema": True,
                        "supportsTeeAttestation": False,
                        "supportsE2EE": False,
                        "supportsVision": False,
                        "supportsVideoInput": False,
                        "supportsWebSearch": True,
                        "supportsXSearch": False,
                    },
                    "constraints": {"temperature": {"default": 0.8}, "top_p": {"default": 0.9}},
                    "pricing": {
                        "input": {"usd": float(self.price[0]), "diem": float(self.price[0])},
                        "output": {"usd": float(self.price[1]), "diem": float(self.price[1])},
                    },
                },
            }
            for m in self.models
        ]
        data = entries if wanted in ("text", "all", "code") else []
        return {"object": "list", "type": wanted, "data": data}
