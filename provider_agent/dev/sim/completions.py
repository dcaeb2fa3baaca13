"""A completion, from the request's body to the last byte: the body read as a `Job`, the kind's
answer streamed (paced by `pacer`, or as fast as possible) or whole, and what the `die`, `error`
and `usage` faults do to it. What it counts (`served`, `completed`) is what benchmarks assert on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Final

import orjson
from aiohttp import HttpVersion11, web

from provider_agent.dev.sim.answers import MESSAGES, json_response
from provider_agent.dev.sim.anthropic import anthropic_frames
from provider_agent.dev.sim.faults import Fault, absurd_usage
from provider_agent.dev.sim.llamacpp import LLAMACPP_BUILD, llamacpp_stream, llamacpp_timings
from provider_agent.dev.sim.lmstudio import lmstudio_stream
from provider_agent.dev.sim.ollama import ollama_stream
from provider_agent.dev.sim.openrouter import openrouter_stream
from provider_agent.dev.sim.pacer import PacedStream
from provider_agent.dev.sim.records import Job, SimRequest, cost_usd, job_key
from provider_agent.dev.sim.sse import WORDS, StreamFrames, absurd_frames, response_text
from provider_agent.dev.sim.state import SimState
from provider_agent.dev.sim.venice import venice_stream
from provider_agent.dev.sim.vllm import vllm_stream

#: As fast as possible still lets other streams and the loop breathe this often.
_YIELD_EVERY: Final = 32


_OPENAI_STREAMS: Final[dict[str, Callable[[Job, int, tuple[Decimal, Decimal]], StreamFrames]]] = {
    "vllm": vllm_stream,
    "llamacpp": llamacpp_stream,
    "lmstudio": lmstudio_stream,
    "ollama": ollama_stream,
    "openrouter": openrouter_stream,
    "venice": venice_stream,
}


def openai_frames(kind: str, job: Job, price: tuple[Decimal, Decimal]) -> StreamFrames:
    """The `/v1/chat/completions` SSE stream of `kind` (see the reference's fixtures)."""
    return _OPENAI_STREAMS[kind](job, int(time.time()), price)


class Completions(SimState):
    """`POST /v1/chat/completions` and `/v1/messages`, for every kind."""

    def _read_job(
        self, rec: SimRequest, *, anthropic_route: bool
    ) -> tuple[Job, Any] | web.Response:
        """The request as a Job, or the error response the kind gives for it."""
        try:
            body = rec.json()
        except orjson.JSONDecodeError:
            return self._error(
                400, "The request body is not valid JSON.", anthropic_route=anthropic_route
            )
        if not isinstance(body, dict):
            return self._error(
                400, "The request body must be a JSON object.", anthropic_route=anthropic_route
            )
        if self.kind == "lmstudio" and self._loading():
            return json_response(
                {
                    "error": {
                        "message": "No models loaded. Please load a model in the developer page "
                        "or use the `lms load` command.",
                        "type": "invalid_request_error",
                        "param": "model",
                    }
                },
                400,
            )
        name = body.get("model")
        model = self._models.get(name) if isinstance(name, str) else None
        serves_any = (self.kind == "llamacpp" and not self._llamacpp_router()) or (
            self.kind == "lmstudio" and len(self.models) == 1
        )
        if model is None and serves_any:
            model = self.models[0]  # these serve their one model whatever the name says
        if model is None:
            return self._model_not_found(name, anthropic_route=anthropic_route)
        limit = body.get("max_tokens")
        if limit is None and not anthropic_route:
            limit = body.get("max_completion_tokens")
        if anthropic_route and not (isinstance(limit, int) and limit > 0):
            return self._error(
                400, "max_tokens is required and must be positive", anthropic_route=True
            )
        n = self.tokens
        truncated = False
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < n:
            n, truncated = limit, True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        job = Job(
            model=model.name,
            prompt_tokens=max(1, len(rec.body) // 4),
            n_tokens=n,
            truncated=truncated,
            include_usage=include_usage,
            stream=body.get("stream") is True,
        )
        return job, body

    def _model_not_found(self, name: Any, *, anthropic_route: bool) -> web.Response:
        shown = name if isinstance(name, str) else ""
        if anthropic_route:
            return self._error(404, f"model '{shown}' not found", anthropic_route=True)
        if self.kind == "lmstudio":
            listed = "\n".join(m.name for m in self.models)
            return json_response(
                {
                    "error": {
                        "message": f'Model "{shown}" not found. Please specify a valid model.'
                        f"\n\nYour models:\n\n{listed}",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "model_not_found",
                    }
                },
                404,
            )
        messages = {
            "vllm": f"The model `{shown}` does not exist.",
            "ollama": f"model '{shown}' not found",
        }
        return self._error(404, messages.get(self.kind, f"model {shown!r} not found"))

    async def _chat(self, request: web.Request, rec: SimRequest) -> web.StreamResponse:
        return await self._complete(request, rec, anthropic_route=False)

    async def _messages(self, request: web.Request, rec: SimRequest) -> web.StreamResponse:
        return await self._complete(request, rec, anthropic_route=True)

    async def _complete(
        self, request: web.Request, rec: SimRequest, *, anthropic_route: bool
    ) -> web.StreamResponse:
        read = self._read_job(rec, anthropic_route=anthropic_route)
        if isinstance(read, web.Response):
            return read
        job, body = read
        rec.key = job_key(request.headers, body, rec.body)
        # Its turn first, before any byte of the answer (llama.cpp defers a task so): the wait
        # is in the client's time to first byte. The slot is held to the answer's last byte.
        async with self._slots.held():
            rec.slot_monotonic = time.monotonic()
            self.served[rec.key] += 1
            if self.kind == "openrouter":
                self._cost_usd += cost_usd(self.price, job.prompt_tokens, job.n_tokens)
            fault = rec.fault
            if not job.stream:
                return await self._complete_whole(request, rec, job, fault, anthropic_route)
            if anthropic_route:
                frames = anthropic_frames(self.kind, job)
            else:
                frames = openai_frames(self.kind, job, self.price)
            if fault is not None and fault.kind == "usage":
                frames = absurd_frames(frames, fault)
            return await self._stream(request, rec, job, frames, fault)

    async def _stream(
        self,
        request: web.Request,
        rec: SimRequest,
        job: Job,
        frames: StreamFrames,
        fault: Fault | None,
    ) -> web.StreamResponse:
        """Headers at once, then the first token after `ttft_s` and prefill, one write a token."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        if self.kind == "openrouter":
            response.headers["X-Generation-Id"] = "gen-" + uuid.uuid4().hex[:20]
        chunked = request.version >= HttpVersion11
        if chunked:
            response.enable_chunked_encoding()
        cut = fault is not None and fault.kind in ("die", "error")
        stop_at = min(fault.after_tokens, job.n_tokens) if cut and fault else job.n_tokens
        loop = asyncio.get_running_loop()
        self.active += 1
        try:
            await response.prepare(request)
            if frames.preamble:
                self._first_write(rec)
                await response.write(frames.preamble)
            if delay := self._first_token_delay(job):
                await asyncio.sleep(delay)
            started = loop.time()
            if stop_at and self.tokens_per_s and request.transport is not None:
                paced = PacedStream(
                    request.transport,
                    rec,
                    frames,
                    stop_at=stop_at,
                    interval=1 / self.tokens_per_s,
                    chunked=chunked,
                )
                if not await self._pacer.run(paced):
                    self._gone(rec)
                    return response
            else:
                await self._write_all(response, rec, frames, stop_at)
            if cut:
                return await self._cut(request, response, rec, frames, fault)
            await response.write(frames.closing(stop_at, job.truncated, loop.time() - started))
            await response.write_eof()
        except ConnectionResetError:
            self._gone(rec)
            return response
        finally:
            self.active -= 1
        assert rec.key is not None
        self.completed[rec.key] += 1
        return response

    async def _write_all(
        self, response: web.StreamResponse, rec: SimRequest, frames: StreamFrames, count: int
    ) -> None:
        """As fast as possible: back-to-back writes, yielding now and then."""
        tokens = frames.tokens
        for i in range(count):
            if i == 0:
                if rec.first_write_monotonic is None:
                    self._first_write(rec)
                await response.write(frames.first)
            else:
                await response.write(tokens[i % len(WORDS)])
            rec.tokens_sent = i + 1
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)

    async def _cut(
        self,
        request: web.Request,
        response: web.StreamResponse,
        rec: SimRequest,
        frames: StreamFrames,
        fault: Fault | None,
    ) -> web.StreamResponse:
        """The `die` or `error` fault, where the stream has got to."""
        assert fault is not None
        if rec.first_write_monotonic is None:
            self._first_write(rec)
        if fault.kind == "die":
            rec.outcome = "died"
            if request.transport is not None:
                request.transport.abort()
            return response
        rec.outcome = "error_event"
        head = frames.first.rpartition(frames.tokens[0])[0] if rec.tokens_sent == 0 else b""
        await response.write(head + frames.error)
        await response.write_eof()
        return response

    async def _complete_whole(
        self,
        request: web.Request,
        rec: SimRequest,
        job: Job,
        fault: Fault | None,
        anthropic_route: bool,
    ) -> web.StreamResponse:
        """A non-streamed answer, after the time the stream would have taken."""
        delay = self._first_token_delay(job)
        delay += job.n_tokens / self.tokens_per_s if self.tokens_per_s else 0.0
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and fault.kind == "die":
            rec.outcome = "died"
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault is not None and fault.kind == "error":
            rec.outcome = "error_event"
            return self._error(500, MESSAGES[500], anthropic_route=anthropic_route)
        rec.tokens_sent = job.n_tokens
        assert rec.key is not None
        self.completed[rec.key] += 1
        self._first_write(rec)
        if anthropic_route:
            answer = self.anthropic_message(job)
        else:
            answer = self.chat_completion(job, delay)
        if fault is not None and fault.kind == "usage":
            body = json.dumps(absurd_usage(answer, fault), separators=(",", ":"))
            return web.Response(text=body, content_type="application/json")
        return json_response(answer)

    def anthropic_message(self, job: Job) -> dict[str, Any]:
        usage: dict[str, int] = {"input_tokens": job.prompt_tokens, "output_tokens": job.n_tokens}
        if self.kind == "llamacpp":
            usage = {"cache_read_input_tokens": 0, **usage}
        return {
            "id": ("chatcmpl-" if self.kind == "llamacpp" else "msg_") + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": response_text(job.n_tokens)}],
            "model": job.model,
            "stop_reason": "max_tokens" if job.truncated else "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }

    def chat_completion(self, job: Job, elapsed_s: float) -> dict[str, Any]:
        text = response_text(job.n_tokens)
        finish = "length" if job.truncated else "stop"
        p, n = job.prompt_tokens, job.n_tokens
        created = int(time.time())
        if self.kind == "llamacpp":
            return {
                "choices": [
                    {
                        "finish_reason": finish,
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                    }
                ],
                "created": created,
                "model": job.model,
                "system_fingerprint": LLAMACPP_BUILD,
                "object": "chat.completion",
                "usage": {
                    "completion_tokens": n,
                    "prompt_tokens": p,
                    "total_tokens": p + n,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
                "id": "chatcmpl-" + uuid.uuid4().hex[:24],
                "timings": llamacpp_timings(p, n, elapsed_s),
            }
        message: dict[str, Any] = {"role": "assistant", "content": text}
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
        }
        answer: dict[str, Any] = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "choices": [choice],
            "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n},
        }
        if self.kind == "vllm":
            message.update(refusal=None, annotations=None, audio=None, function_call=None)
            message.update(tool_calls=[], reasoning_content=None)
            choice["stop_reason"] = None
            answer.update(service_tier=None, system_fingerprint=None)
            answer["usage"] = {
                "prompt_tokens": p,
                "total_tokens": p + n,
                "completion_tokens": n,
                "prompt_tokens_details": None,
            }
            answer.update(prompt_logprobs=None, kv_transfer_params=None)
        return answer
