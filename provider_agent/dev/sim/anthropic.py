"""The Anthropic `/v1/messages` event stream, in each kind's flavour. Unlike the OpenAI streams
(one per kind, in each kind's module), the kinds that speak it differ in a few details only, so
it is one function.
"""

from __future__ import annotations

import uuid
from typing import Any

from provider_agent.dev.sim.records import Job
from provider_agent.dev.sim.sse import WORDS, StreamFrames, sse_event


def anthropic_frames(kind: str, job: Job) -> StreamFrames:
    """The `/v1/messages` event stream of `kind`: llama.cpp's (no ping, its own error object),
    Ollama's (usage in `message_delta` has `input_tokens`), else Anthropic's own."""
    prompt = job.prompt_tokens
    message: dict[str, Any]
    if kind == "llamacpp":
        message = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": job.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"cache_read_input_tokens": 0, "input_tokens": prompt, "output_tokens": 0},
        }
    elif kind == "ollama":
        message = {
            "id": "msg_" + uuid.uuid4().hex[:20],
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": [],
            "usage": {"input_tokens": prompt, "output_tokens": 0},
        }
    else:
        message = {
            "id": "msg_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": job.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 1},
        }
    opening = sse_event("message_start", {"type": "message_start", "message": message})
    opening += sse_event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    if kind != "llamacpp":
        opening += sse_event("ping", {"type": "ping"})
    tokens = tuple(
        sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
        )
        for w in WORDS
    )

    def closing(n: int, truncated: bool, _: float) -> bytes:
        delta: dict[str, Any] = {"stop_reason": "max_tokens" if truncated else "end_turn"}
        usage: dict[str, int] = {"output_tokens": n}
        if kind == "ollama":
            usage = {"input_tokens": prompt, "output_tokens": n}
        else:
            delta["stop_sequence"] = None
        return (
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + sse_event("message_stop", {"type": "message_stop"})
        )

    if kind == "llamacpp":
        error_data: dict[str, Any] = {
            "code": 500,
            "message": "failed to decode the batch",
            "type": "server_error",
        }
    else:
        error_data = {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
    return StreamFrames(b"", opening + tokens[0], tokens, sse_event("error", error_data), closing)
