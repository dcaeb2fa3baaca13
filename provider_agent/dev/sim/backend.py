"""The backend simulator: one aiohttp server that answers like vLLM, llama.cpp, LM Studio, Ollama,
OpenRouter or Venice (`shared/reference/backend-apis.md`), for tests, benchmarks and the demo.

    async with SimBackend("ollama", models=["llama3.2:latest"], tokens=8) as sim:
        ...  # point a [[backends]] entry at sim.base_url
        sim.fault = Fault(kind="http", status=503, count=1)  # the next completion gets a 503
        await sim.wait_for(lambda s: s.served)  # wakes on every request event, never sleeps

What it speaks, per kind, in the shapes of the recorded fixtures (the tests compare them):
discovery (health, model listings with context windows, `/props`, `/slots`, `/api/tags`,
`/api/show`, `/api/ps`, `/api/version`, `/openapi.json`, `/metrics`, the BYOK listings with their
prices, OpenRouter's `/key`), `POST /v1/chat/completions` (OpenAI SSE in the kind's flavour: the
final usage chunk when `stream_options.include_usage` is set, always for OpenRouter and Venice,
llama.cpp's `timings`, OpenRouter's keepalive comment, `data: [DONE]`) and `POST /v1/messages`
(the Anthropic event stream, `message_start` … `message_stop`; not on Venice). The BYOK kinds
serve under `/api/v1`, so `base_url` (what a `[[backends]]` url is) is `url` + `/api/v1` there.

Knobs: models and their context windows, tokens per response (capped by the request's
`max_tokens`), tokens per second (0: as fast as possible), time to first token, a required API
key, list prices for the BYOK listings. Faults (`Fault`), settable at any time with `sim.fault`,
for every matching request or the next `count` ones:

- `refuse`: every new connection is reset before a byte is read (count: connections). A port
  that is really closed is `await sim.kill()` (closes the port and resets every connection, like
  a crash) and `await sim.restart()` (listens again on the same port).
- `http` (`status`: 5xx, 404, 429 with `Retry-After`, 401, …): the kind's error body.
- `hang`: read the request, never answer (until the client gives up, recorded, or the sim stops).
- `die` (`after_tokens`): cut the connection after N tokens, without the end marker.
- `error` (`after_tokens`): the kind's mid-stream error event after N tokens, then whatever that
  kind does next (`[DONE]`, or close without it; Ollama's `/v1` just ends the stream).
- `slow_health` (`delay_s`) and `loading`: the kind's health probe answers late, or "not ready":
  503 (llama.cpp's `Loading model` on every non-public path, with `meta: null` listings), LM
  Studio lists its models as not loaded; the other kinds answer 503 on their health probe.
- `usage` (`usage_figure`, any JSON value, `usage_side`): the completion runs as usual, but every
  token count it reports says `usage_figure` instead — output (`completion_tokens`,
  `output_tokens`, llama.cpp's `predicted_n`), input (`prompt_tokens`, `input_tokens`,
  `prompt_n`) or both, with `total_tokens` too, in the usage chunk, `message_start`,
  `message_delta`, `timings` and whole answers alike. A figure beyond 64 bits is written exactly
  (`2**64`, `10**30`); a non-finite float as `NaN`/`Infinity`, which is not JSON (a backend's bug).

`http` and `hang` apply to completions unless `scope="all"` (then to health and discovery
too); `die`, `error` and `usage` to completions only; `slow_health` and `loading` count health
probes. `sim.fault_queue` holds faults that follow, in order: each becomes `sim.fault` as soon as
the one before is spent (its `count` reached; a fault without one is never spent), so that no
request passes between them.

Records, for assertions and benchmarks: `requests` (each `SimRequest`: method, path, headers,
body, status, outcome, tokens sent, whether the client went away first, and the monotonic and
wall-clock times of receipt and of the stream's first write — OpenRouter's is its keepalive
comment), `served` and `completed` (`Counter`s of completions accepted, i.e. answered 200 even if
a fault cuts them later / finished with their end marker, by `job_key`: the
`X-Request-Id` header, else the body's `metadata.job`, `user`, `metadata.user_id`, else
`sha256:` of the raw body — so a chaos bench puts its job id in `metadata.job` or `user` and
asserts no key was served twice). An out-of-process sim shows the same through `GET /__sim/state`
and takes faults at `POST /__sim/fault` (a `Fault` as JSON, a list of them — the first is the
fault, the rest its queue — or `null`).

Cost: a stream's events are encoded once when it starts; each token is then one transport write,
issued for every paced stream from one timer callback (`_Pacer`), so 256 streams at 40 tokens/s
cost about 8 µs of CPU per event. `provider-agent sim-backend` serves one until SIGTERM/SIGINT
and prints one stdout line, `sim-backend: KIND serving MODELS at BASE_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import os
import signal
import socket
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, cast

import anyio
import orjson
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

KINDS: Final = ("vllm", "llamacpp", "lmstudio", "ollama", "openrouter", "venice")
BYOK_KINDS: Final = frozenset({"openrouter", "venice"})
#: The real servers' default ports (the CLI's default `--listen`); BYOK kinds default to any port.
DEFAULT_PORTS: Final = {"vllm": 8000, "llamacpp": 8080, "lmstudio": 1234, "ollama": 11434}
DEFAULT_MODELS: Final = {
    "vllm": "meta-llama/Llama-3.1-8B-Instruct",
    "llamacpp": "qwen2.5-7b-instruct",
    "lmstudio": "qwen2.5-7b-instruct",
    "ollama": "llama3.2:latest",
    "openrouter": "meta-llama/llama-3.3-70b-instruct",
    "venice": "llama-3.3-70b",
}
CONTROL_PREFIX: Final = "/__sim/"
#: The text of a response: these words, cycled, one per token.
WORDS: Final = ("Hello", " from", " the", " simulated", " backend", ".")
DONE: Final = b"data: [DONE]\n\n"
LLAMACPP_BUILD: Final = "b6500-1a2b3c4d"
OLLAMA_VERSION: Final = "0.14.2"
OLLAMA_VERSION_NO_ANTHROPIC: Final = "0.12.6"
VLLM_VERSION: Final = "0.11.0"
LLAMACPP_SLOTS: Final = 4
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
#: As fast as possible still lets other streams and the loop breathe this often.
_YIELD_EVERY: Final = 32

#: Each fault kind's command-line argument: (field, what it must be), or None.
_FAULT_ARGS: Final[dict[str, tuple[str, str] | None]] = {
    "refuse": None,
    "http": ("status", "STATUS needs a status of 400-599"),
    "hang": None,
    "die": ("after_tokens", "N needs a whole number of tokens ≥ 0"),
    "error": ("after_tokens", "N needs a whole number of tokens ≥ 0"),
    "slow_health": ("delay_s", "SECONDS needs 0-3600 seconds"),
    "loading": None,
    "usage": ("usage_figure", "JSON needs a JSON value"),
}
_FAULT_SPECS: Final = (
    "refuse, http:STATUS, hang, die:N, error:N, slow_health:SECONDS, loading, usage:JSON"
)
FaultKind = Literal["refuse", "http", "hang", "die", "error", "slow_health", "loading", "usage"]
#: The token counts a `usage` fault replaces: output, input (`total_tokens` goes with either).
_OUTPUT_FIGURES: Final = ("completion_tokens", "output_tokens", "predicted_n")
_INPUT_FIGURES: Final = ("prompt_tokens", "input_tokens", "prompt_n")
RouteClass = Literal["health", "discovery", "completion", "other"]
_T = TypeVar("_T")


class Fault(BaseModel):
    """A misbehaviour, for every matching request (`count=None`) or the next `count` ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    status: int = Field(500, ge=400, le=599, description="http: the status answered")
    after_tokens: int = Field(0, ge=0, description="die/error: tokens written first")
    delay_s: float = Field(2.0, ge=0, le=3600, description="slow_health: the delay")
    usage_figure: Any = Field(None, description="usage: reported instead of the token counts")
    usage_side: Literal["output", "input", "both"] = "output"
    count: int | None = Field(None, ge=1, description="matching requests it lasts; None: all")
    scope: Literal["completions", "all"] = "completions"

    @classmethod
    def from_spec(cls, spec: str, count: int | None = None, scope: str = "completions") -> Fault:
        """`KIND[:ARG]` from the command line: `http:503`, `die:5`, `error:3`, `slow_health:2.5`,
        `hang`, `loading`, `refuse`. ValueError with a one-line reason otherwise."""
        kind, _, arg = spec.partition(":")
        if kind not in _FAULT_ARGS:
            raise ValueError(f"--fault must be one of {_FAULT_SPECS}, not {spec!r}")
        fields: dict[str, Any] = {"kind": kind, "scope": scope}
        takes = _FAULT_ARGS[kind]
        if arg and takes is None:
            raise ValueError(f"--fault {kind} takes no argument, not {spec!r}")
        if arg and takes is not None:
            fields[takes[0]] = arg
        if kind == "usage":
            try:
                fields["usage_figure"] = json.loads(arg)
            except ValueError:
                raise ValueError(f"--fault usage:JSON needs a JSON value, not {spec!r}") from None
        try:
            fault = cls.model_validate(fields)
        except ValidationError:
            assert takes is not None  # kind and scope come from closed sets
            raise ValueError(f"--fault {kind}:{takes[1]}, not {spec!r}") from None
        if count is not None and count < 1:
            raise ValueError(f"--fault-count must be ≥ 1, not {count}")
        return fault.model_copy(update={"count": count})

    def applies_to(self, route: RouteClass) -> bool:
        if self.kind in ("slow_health", "loading"):
            return route == "health"
        if self.kind in ("die", "error", "usage"):
            return route == "completion"
        if self.kind in ("http", "hang"):
            return route == "completion" or (self.scope == "all" and route != "other")
        return False


@dataclass(frozen=True)
class SimModel:
    """One served model: its id and the context window the server reports for it."""

    name: str
    context: int = 8192


@dataclass
class SimRequest:
    """One request the simulator received, and what became of it."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    received_monotonic: float
    received_wall: float
    #: The completion's `job_key` (completions only).
    key: str | None = None
    fault: Fault | None = None
    status: int | None = None
    #: `open`, `ok`, `error_event`, `died`, `hung`, `disconnected`, `killed` (by `kill()`),
    #: `stopped` (the simulator stopped first).
    outcome: str = "open"
    tokens_sent: int = 0
    #: The client went away before the simulator was done (an aborted upstream request).
    disconnected: bool = False
    first_write_monotonic: float | None = None
    first_write_wall: float | None = None
    finished_monotonic: float | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)

    def summary(self) -> dict[str, Any]:
        """JSON-able, without headers or body (they may carry keys)."""
        return {
            name: getattr(self, name)
            for name in (
                "seq",
                "method",
                "path",
                "key",
                "status",
                "outcome",
                "tokens_sent",
                "disconnected",
                "received_monotonic",
                "received_wall",
                "first_write_monotonic",
                "first_write_wall",
                "finished_monotonic",
            )
        }


def job_key(headers: Mapping[str, str], body: Any, raw: bytes) -> str:
    """What `served`/`completed` count by (see the module docstring)."""
    request_id = headers.get("X-Request-Id")
    if request_id:
        return request_id
    if isinstance(body, dict):
        metadata = body.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        for value in (metadata.get("job"), body.get("user"), metadata.get("user_id")):
            if isinstance(value, str) and value:
                return value
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) → (host, port); ValueError for anything else."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT with a port of 0-65535, not {text!r}")
    if not host.isprintable() or any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(f"--listen must be HOST:PORT with a port of 0-65535, not {text!r}")
    return host, int(port)


# --- encoding helpers -----------------------------------------------------------------------------


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _dumps(obj: Any) -> bytes:
    """JSON; integers beyond 64 bits (a `usage` fault's) written exactly by the stdlib."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_dumps(obj), status=status, content_type="application/json", headers=headers
    )


def _figure_names(fault: Fault) -> tuple[str, ...]:
    side = fault.usage_side
    names = (_OUTPUT_FIGURES if side != "input" else ()) + (
        _INPUT_FIGURES if side != "output" else ()
    )
    return (*names, "total_tokens")


def absurd_usage(obj: Any, fault: Fault) -> Any:
    """`obj` (a chunk, an event or a whole answer) with the token counts it reports replaced by
    the `usage` fault's figure: in `usage`, `message.usage` (`message_start`) and `timings`."""
    if not isinstance(obj, dict):
        return obj
    names = _figure_names(fault)
    out = dict(obj)
    message = out.get("message")
    if isinstance(message, dict) and isinstance(message.get("usage"), dict):
        out["message"] = absurd_usage(message, fault)
    for part in ("usage", "timings"):
        report = out.get(part)
        if isinstance(report, dict):
            out[part] = {k: fault.usage_figure if k in names else v for k, v in report.items()}
    return out


def absurd_sse(data: bytes, fault: Fault) -> bytes:
    """SSE bytes with each `data:` line's token counts replaced (`absurd_usage`)."""
    lines = data.split(b"\n")
    for index, line in enumerate(lines):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            obj = orjson.loads(line[6:])
        except orjson.JSONDecodeError:
            continue
        changed = absurd_usage(obj, fault)
        if changed != obj:
            lines[index] = b"data: " + json.dumps(changed, separators=(",", ":")).encode()
    return b"\n".join(lines)


def _absurd_frames(frames: StreamFrames, fault: Fault) -> StreamFrames:
    closing = frames.closing

    def absurd_closing(n: int, truncated: bool, elapsed: float) -> bytes:
        return absurd_sse(closing(n, truncated, elapsed), fault)

    return dataclasses.replace(
        frames, first=absurd_sse(frames.first, fault), closing=absurd_closing
    )


def _response_text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


def _usd_per_token(usd_per_1m: Decimal) -> str:
    """OpenRouter's price strings: USD per token, plain decimal notation."""
    return format((usd_per_1m / 1_000_000).normalize(), "f")


@dataclass(frozen=True)
class StreamFrames:
    """A stream's bytes, encoded once when it starts: each token is then one write."""

    #: Written right after the headers (OpenRouter's keepalive comment), or empty.
    preamble: bytes
    #: Token 0 with whatever opens the stream before it (role chunk, `message_start` …).
    first: bytes
    #: Token i ≥ 1 is `tokens[i % len(WORDS)]`.
    tokens: tuple[bytes, ...]
    #: The mid-stream error and what the kind sends after it.
    error: bytes
    #: (tokens sent, truncated by max_tokens, elapsed seconds) → finish, usage, end marker.
    closing: Callable[[int, bool, float], bytes]


@dataclass(frozen=True)
class Job:
    """What a completion request asks for, as the simulator reads it."""

    model: str
    prompt_tokens: int
    n_tokens: int
    truncated: bool
    include_usage: bool
    stream: bool


def _llamacpp_timings(prompt: int, n: int, elapsed_s: float) -> dict[str, Any]:
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


def _finish_reason(truncated: bool) -> str:
    return "length" if truncated else "stop"


def _usage(job: Job, n: int) -> dict[str, int]:
    prompt = job.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


def _cost_usd(price: tuple[Decimal, Decimal], prompt: int, n: int) -> float:
    return float((price[0] * prompt + price[1] * n) / 1_000_000)


def _vllm_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
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
        out = sse(chunk({"content": ""}, _finish_reason(truncated)))
        if job.include_usage:
            u = _usage(job, n)
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


def _llamacpp_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
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
        timings = _llamacpp_timings(job.prompt_tokens, n, elapsed)
        finish = piece({}, _finish_reason(truncated))
        if not job.include_usage:  # timings ride on the last chunk
            return sse(chunk(finish, timings=timings)) + DONE
        usage = {**_usage(job, n), "prompt_tokens_details": {"cached_tokens": 0}}
        return sse(chunk(finish)) + sse(chunk([], usage=usage, timings=timings)) + DONE

    error = {"code": 500, "message": "failed to decode the batch", "type": "server_error"}
    return StreamFrames(b"", role + tokens[0], tokens, sse({"error": error}), closing)


def _local_stream(kind: str, job: Job, created: int) -> StreamFrames:
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
        out = sse(chunk({}, _finish_reason(truncated)))
        if job.include_usage:
            out += sse({**head, "choices": [], "usage": _usage(job, n)})
        return out + DONE

    if lmstudio:
        crashed = {"message": "Model crashed during generation.", "type": "server_error"}
        error = sse({"error": {**crashed, "param": None, "code": None}}) + DONE
    else:
        error = b""  # Ollama's /v1 drops the native error line and just ends the stream
    return StreamFrames(b"", first, tokens, error, closing)


def _lmstudio_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
    return _local_stream("lmstudio", job, created)


def _ollama_stream(job: Job, created: int, _: tuple[Decimal, Decimal]) -> StreamFrames:
    return _local_stream("ollama", job, created)


def _openrouter_stream(job: Job, created: int, price: tuple[Decimal, Decimal]) -> StreamFrames:
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
            **_usage(job, n),
            "cost": _cost_usd(price, job.prompt_tokens, n),
            "is_byok": False,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost_details": {"upstream_inference_cost": None},
        }
        tail = sse({**top, "choices": [], "usage": usage})
        return sse(chunk("", _finish_reason(truncated))) + tail + DONE

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


def _venice_stream(job: Job, created: int, price: tuple[Decimal, Decimal]) -> StreamFrames:
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
        cost = {"usd": _cost_usd(price, job.prompt_tokens, n), "diem": 0}
        tail = {**base, "choices": [], "usage": _usage(job, n), "cost": cost}
        return sse(chunk({}, _finish_reason(truncated))) + sse(tail) + DONE

    overloaded = {
        "message": "The model is currently overloaded. Please try again later.",
        "code": "model_overloaded",
        "retry_after": 30,
    }
    return StreamFrames(b"", role + tokens[0], tokens, sse({"error": overloaded}) + DONE, closing)


_OPENAI_STREAMS: Final[dict[str, Callable[[Job, int, tuple[Decimal, Decimal]], StreamFrames]]] = {
    "vllm": _vllm_stream,
    "llamacpp": _llamacpp_stream,
    "lmstudio": _lmstudio_stream,
    "ollama": _ollama_stream,
    "openrouter": _openrouter_stream,
    "venice": _venice_stream,
}


def openai_frames(kind: str, job: Job, price: tuple[Decimal, Decimal]) -> StreamFrames:
    """The `/v1/chat/completions` SSE stream of `kind` (see the reference's fixtures)."""
    return _OPENAI_STREAMS[kind](job, int(time.time()), price)


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


# --- error bodies ---------------------------------------------------------------------------------

_LLAMACPP_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
_VLLM_TYPES: Final = {400: "BadRequestError", 404: "NotFoundError", 401: "UnauthorizedError"}
_OPENAI_TYPES: Final = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(kind: str, status: int, message: str, *, anthropic_route: bool = False) -> Any:
    """The JSON body `kind` answers an HTTP error with (backend-apis.md §8.5)."""
    if anthropic_route and kind != "llamacpp":
        etype = _ANTHROPIC_TYPES.get(status, "api_error")
        if kind == "vllm":
            return {"type": "error", "error": {"type": etype, "message": message}}
        request_id = "req_" + uuid.uuid4().hex[:24]
        return {
            "type": "error",
            "error": {"type": etype, "message": message},
            "request_id": request_id,
        }
    if kind == "vllm":
        if status == 401:
            return {"error": "Unauthorized"}
        etype = _VLLM_TYPES.get(
            status, "InternalServerError" if status >= 500 else "BadRequestError"
        )
        return {"error": {"message": message, "type": etype, "param": None, "code": status}}
    if kind == "llamacpp":
        etype = _LLAMACPP_TYPES.get(status, "server_error")
        return {"error": {"code": status, "message": message, "type": etype}}
    if kind == "lmstudio":
        etype = _OPENAI_TYPES.get(status, "server_error")
        return {"error": {"message": message, "type": etype, "param": None, "code": None}}
    if kind == "ollama":
        etype = _OPENAI_TYPES.get(status, "api_error")
        return {"error": {"message": message, "type": etype, "param": None, "code": None}}
    if kind == "openrouter":
        if status == 502:
            metadata = {"provider_name": "SimProvider", "raw": "upstream connect error"}
            return {"error": {"code": status, "message": message, "metadata": metadata}}
        return {"error": {"code": status, "message": message}}
    return {"error": message}  # venice


_MESSAGES: Final = {
    401: "Invalid API Key",
    404: "The model does not exist.",
    429: "Rate limit exceeded, retry later.",
    500: "Internal server error (simulated).",
    502: "Bad gateway (simulated).",
    503: "Service unavailable (simulated).",
}


# --- the server -----------------------------------------------------------------------------------


class _Reset(asyncio.Protocol):
    """A connection refused the hard way: RST at once, before a byte is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cast(asyncio.Transport, transport).abort()  # uvloop's transports are not subclasses


Handler = Callable[[web.Request, SimRequest], Awaitable[web.StreamResponse]]
#: Tokens due this close together are written in the same tick.
_PACER_SLACK_S: Final = 0.0005


class _PacedStream:
    """A stream paced by `_Pacer`: its tokens pre-framed for the transport."""

    __slots__ = ("chunks", "done", "due", "first", "interval", "rec", "stop_at", "transport")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        rec: SimRequest,
        frames: StreamFrames,
        *,
        stop_at: int,
        interval: float,
        chunked: bool,
    ) -> None:
        transport = cast(asyncio.WriteTransport, transport)  # uvloop's are not subclasses

        def frame(data: bytes) -> bytes:  # what aiohttp's chunked writer would send
            return b"%x\r\n%b\r\n" % (len(data), data) if chunked else data

        self.transport = transport
        self.rec = rec
        self.first = frame(frames.first)
        self.chunks = tuple(frame(t) for t in frames.tokens)
        self.stop_at = stop_at
        self.interval = interval
        self.due = 0.0
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


class _Pacer:
    """Writes every paced stream's due token from one timer callback: a token costs one
    transport write, not a sleep, a task wake-up and a coroutine per stream (256 streams at
    40 tokens/s are 10,000 writes a second). The stream's task waits for the verdict: True when
    all its tokens are out, False when the connection went away."""

    def __init__(self, on_first_write: Callable[[SimRequest], None]) -> None:
        self._heap: list[tuple[float, int, _PacedStream]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._on_first = on_first_write

    def run(self, stream: _PacedStream) -> asyncio.Future[bool]:
        stream.due = asyncio.get_running_loop().time()
        heapq.heappush(self._heap, (stream.due, next(self._order), stream))
        self._arm()
        return stream.done

    def _arm(self) -> None:
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(due, self._tick)

    def _write_next(self, stream: _PacedStream) -> bool:
        """Write the stream's next token; True when it was its last."""
        rec = stream.rec
        sent = rec.tokens_sent
        if sent == 0:
            if rec.first_write_monotonic is None:
                self._on_first(rec)
            stream.transport.write(stream.first)
        else:
            stream.transport.write(stream.chunks[sent % len(WORDS)])
        rec.tokens_sent = sent + 1
        return sent + 1 >= stream.stop_at

    def _tick(self) -> None:
        self._timer = None
        heap = self._heap
        horizon = asyncio.get_running_loop().time() + _PACER_SLACK_S
        while heap and heap[0][0] <= horizon:
            stream = heapq.heappop(heap)[2]
            if stream.done.done():  # its task was cancelled: the client went away
                continue
            if stream.transport.is_closing():
                stream.done.set_result(False)
                continue
            try:
                finished = self._write_next(stream)
            except Exception as exc:  # that stream's handler raises it; the others go on
                stream.done.set_exception(exc)
                continue
            if finished:
                stream.done.set_result(True)
            else:
                stream.due += stream.interval
                heapq.heappush(heap, (stream.due, next(self._order), stream))
        self._arm()


@dataclass(frozen=True)
class _Route:
    cls: RouteClass
    handler: Handler
    #: No API key needed even when one is set.
    public: bool = False


class SimBackend:
    """A simulated backend of one kind on a real loopback port (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        models: Sequence[str | SimModel] | None = None,
        *,
        context_window: int = 8192,
        tokens: int = 16,
        tokens_per_s: float = 40.0,
        ttft_s: float = 0.0,
        api_key: str | None = None,
        anthropic: bool = True,
        price_in_usd_per_1m: Decimal | str = Decimal("0.5"),
        price_out_usd_per_1m: Decimal | str = Decimal("1.5"),
        fault: Fault | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        given = list(models) if models is not None else [DEFAULT_MODELS[kind]]
        self.models = [m if isinstance(m, SimModel) else SimModel(m, context_window) for m in given]
        if not self.models:
            raise ValueError("at least one model is needed")
        for model in self.models:
            if not model.name or not model.name.isprintable():
                raise ValueError(f"model name {model.name!r} is empty or not printable")
            if model.context < 1:
                raise ValueError(f"model {model.name!r}: context window must be ≥ 1")
        if len({m.name for m in self.models}) != len(self.models):
            raise ValueError("model names must be distinct")
        if tokens < 1:
            raise ValueError("tokens must be ≥ 1")
        if not (tokens_per_s >= 0 and math.isfinite(tokens_per_s)):
            raise ValueError("tokens_per_s must be ≥ 0 (0: as fast as possible)")
        if not (ttft_s >= 0 and math.isfinite(ttft_s)):
            raise ValueError("ttft_s must be ≥ 0")
        self.kind = kind
        self.tokens = tokens
        self.tokens_per_s = tokens_per_s
        self.ttft_s = ttft_s
        self.api_key = api_key
        self.anthropic = anthropic and kind != "venice"
        self.price = (Decimal(price_in_usd_per_1m), Decimal(price_out_usd_per_1m))
        self.host = host
        self.port = port
        self.requests: list[SimRequest] = []
        self.served: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        #: Connections reset by the `refuse` fault.
        self.refused = 0
        #: Streams being written now (reported by `/metrics`, `/slots`, `/load`).
        self.active = 0
        self._fault: Fault | None = None
        self._fault_left: int | None = None
        self.fault = fault
        #: Faults that follow the current one, each once the one before is spent.
        self.fault_queue: list[Fault] = []
        self.started_wall = int(time.time())
        self._models = {m.name: m for m in self.models}
        self._routes = self._build_routes()
        self._changed_event = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._closing = False
        self._cost_usd = 0.0
        self._pacer = _Pacer(self._first_write)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; `port` becomes the bound port when 0 was asked for."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a client that goes away cancels its handler (recorded).
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        self._runner = runner
        try:
            await self._listen()
        except BaseException:
            await runner.cleanup()
            self._runner = None
            raise

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> asyncio.BaseProtocol:
        if self._take_fault_where(lambda f: f.kind == "refuse") is not None:
            self.refused += 1
            self._changed()
            return _Reset()
        assert self._runner is not None and self._runner.server is not None
        return self._runner.server()

    async def aclose(self) -> None:
        """Stop: close the port, cut every stream and hung request, release everything."""
        self._closing = True
        self._stopping.set()
        self._close_port()
        self._abort_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def kill(self) -> None:
        """Like a crashed server: the port closes and every open connection is reset."""
        for rec in self.requests:
            if rec.outcome in ("open", "hung"):
                rec.outcome = "killed"
        self._close_port()
        self._abort_connections()
        await asyncio.sleep(0)  # let the aborted connections' handlers see it

    def _abort_connections(self) -> None:
        if self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    async def restart(self) -> None:
        """Listen again on the same port after `kill()`."""
        if self._server is None:
            await self._listen()

    def _close_port(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        """The server root, `http://HOST:PORT`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What a `[[backends]]` url is for this kind: the root, or the BYOK API base."""
        return self.url + "/api/v1" if self.kind in BYOK_KINDS else self.url

    # --- faults and waiting ------------------------------------------------------------------

    @property
    def fault(self) -> Fault | None:
        return self._fault

    @fault.setter
    def fault(self, fault: Fault | None) -> None:
        self._fault = fault
        self._fault_left = fault.count if fault is not None else None

    def _take_fault_where(self, matches: Callable[[Fault], bool]) -> Fault | None:
        """The active fault if it matches, counting it against `count`; a spent one gives way
        to the next in `fault_queue` at once."""
        if self._fault is None and self.fault_queue:
            self.fault = self.fault_queue.pop(0)
        fault = self._fault
        if fault is None or not matches(fault):
            return None
        if self._fault_left is not None:
            self._fault_left -= 1
            if self._fault_left <= 0:
                self.fault = self.fault_queue.pop(0) if self.fault_queue else None
        return fault

    def _loading(self) -> bool:
        return self._fault is not None and self._fault.kind == "loading"

    def _changed(self) -> None:
        event = self._changed_event
        self._changed_event = asyncio.Event()
        event.set()

    async def wait_for(
        self,
        predicate: Callable[[SimBackend], _T | Literal[False] | None],
        timeout: float = 5.0,  # noqa: ASYNC109 (reads best as `wait_for(pred, timeout=…)`)
    ) -> _T:
        """Wait until `predicate(self)` is truthy and return it; re-checked whenever a request
        arrives, starts streaming, ends or disconnects."""
        async with asyncio.timeout(timeout):
            while True:
                event = self._changed_event
                value = predicate(self)
                if value:
                    return value
                await event.wait()

    @property
    def completions(self) -> list[SimRequest]:
        return [r for r in self.requests if r.key is not None]

    @property
    def disconnects(self) -> list[SimRequest]:
        return [r for r in self.requests if r.disconnected]

    # --- dispatch ----------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._control(request)
        body = await request.read()
        rec = SimRequest(
            seq=len(self.requests),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDict(request.headers),
            body=body,
            received_monotonic=time.monotonic(),
            received_wall=time.time(),
        )
        self.requests.append(rec)
        self._changed()
        method = "GET" if request.method == "HEAD" else request.method
        route = self._routes.get((method, request.path))
        cls: RouteClass = route.cls if route is not None else "other"
        try:
            fault = self._take_fault_where(lambda f: f.applies_to(cls))
            rec.fault = fault
            response = await self._answer(request, rec, route, fault)
        except asyncio.CancelledError:
            if rec.outcome == "hung":
                rec.outcome = "open"
            self._gone(rec)
            raise
        finally:
            rec.finished_monotonic = time.monotonic()
            self._changed()
        rec.status = response.status
        if rec.outcome == "open":
            rec.outcome = "ok"
        return response

    async def _answer(
        self, request: web.Request, rec: SimRequest, route: _Route | None, fault: Fault | None
    ) -> web.StreamResponse:
        anthropic_route = request.path.endswith("/messages")
        if fault is not None:
            if fault.kind == "hang":
                rec.outcome = "hung"
                await self._stopping.wait()  # until the client gives up, or the sim stops
                rec.outcome = "stopped"
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=503)
            if fault.kind == "http":
                return self._error(
                    fault.status,
                    _MESSAGES.get(fault.status, "Simulated error."),
                    anthropic_route=anthropic_route,
                )
            if fault.kind == "slow_health":
                await asyncio.sleep(fault.delay_s)
        if route is None:
            return self._unknown_path(request)
        if self.api_key is not None and not route.public and not self._authorized(request):
            return self._error(401, _MESSAGES[401], anthropic_route=anthropic_route)
        return await route.handler(request, rec)

    def _authorized(self, request: web.Request) -> bool:
        bearer = request.headers.get("Authorization", "")
        if bearer == f"Bearer {self.api_key}":
            return True
        return (
            request.path.endswith("/messages") and request.headers.get("x-api-key") == self.api_key
        )

    def _error(self, status: int, message: str, *, anthropic_route: bool = False) -> web.Response:
        body = error_body(self.kind, status, message, anthropic_route=anthropic_route)
        headers = {"Retry-After": "1"} if status == 429 else None
        return _json(body, status, headers)

    def _unknown_path(self, request: web.Request) -> web.Response:
        if self.kind == "lmstudio":  # "Returning 200 anyway"
            return _json(
                {"error": f"Unexpected endpoint or method. ({request.method} {request.path})"}
            )
        if self.kind == "ollama":
            return web.Response(status=404, text="404 page not found")
        if self.kind == "vllm":
            return _json({"detail": "Not Found"}, 404)
        if self.kind == "llamacpp":
            return self._error(404, "File Not Found")
        return self._error(404, "Not Found")

    async def _control(self, request: web.Request) -> web.Response:
        """`GET /__sim/state`, `POST /__sim/fault` (a Fault's JSON, a list of them, or null)."""
        if request.method == "GET" and request.path == CONTROL_PREFIX + "state":
            return _json(
                {
                    "kind": self.kind,
                    "fault": self._fault.model_dump() if self._fault is not None else None,
                    "fault_queue": [f.model_dump() for f in self.fault_queue],
                    "served": dict(self.served),
                    "completed": dict(self.completed),
                    "refused": self.refused,
                    "active": self.active,
                    "requests": [r.summary() for r in self.requests],
                }
            )
        if request.method == "POST" and request.path == CONTROL_PREFIX + "fault":
            try:  # the stdlib's parser: a usage figure may be beyond 64 bits, or NaN
                payload = json.loads(await request.read())
                given = (
                    [] if payload is None else payload if isinstance(payload, list) else [payload]
                )
                faults = [Fault.model_validate(f) for f in given]
            except (ValueError, ValidationError) as exc:
                return _json({"error": f"not a fault: {exc}"}, 400)
            self.fault = faults[0] if faults else None
            self.fault_queue = faults[1:]
            return _json({"fault": payload})
        return _json({"error": "unknown control endpoint"}, 404)

    # --- routes per kind ---------------------------------------------------------------------

    def _build_routes(self) -> dict[tuple[str, str], _Route]:
        def json_route(
            cls: RouteClass, make: Callable[[web.Request], Any], public: bool = False
        ) -> _Route:
            async def handler(request: web.Request, _: SimRequest) -> web.StreamResponse:
                answer = make(request)
                return answer if isinstance(answer, web.StreamResponse) else _json(answer)

            return _Route(cls, handler, public)

        chat = _Route("completion", self._chat)
        messages = _Route("completion", self._messages)
        routes: dict[tuple[str, str], _Route]
        if self.kind == "vllm":
            routes = {
                ("GET", "/health"): _Route("health", self._vllm_health, public=True),
                ("GET", "/version"): json_route(
                    "discovery", lambda _: {"version": VLLM_VERSION}, True
                ),
                ("GET", "/load"): json_route(
                    "discovery", lambda _: {"server_load": self.active}, True
                ),
                ("GET", "/ping"): json_route("health", lambda _: {}, True),
                ("GET", "/v1/models"): json_route("discovery", lambda _: self.vllm_models()),
                ("GET", "/openapi.json"): json_route(
                    "discovery", lambda _: self.vllm_openapi(), True
                ),
                ("GET", "/metrics"): _Route("discovery", self._metrics, public=True),
                ("POST", "/v1/chat/completions"): chat,
            }
            if self.anthropic:
                routes[("POST", "/v1/messages")] = messages
        elif self.kind == "llamacpp":
            listing = _Route("discovery", self._llamacpp_models, public=True)
            health = _Route("health", self._llamacpp_health, public=True)
            routes = {
                ("GET", "/health"): health,
                ("GET", "/v1/health"): health,
                ("GET", "/v1/models"): listing,
                ("GET", "/models"): listing,
                ("GET", "/api/tags"): listing,
                ("GET", "/props"): _Route("discovery", self._llamacpp_props),
                ("GET", "/slots"): json_route("discovery", lambda _: self.llamacpp_slots()),
                ("GET", "/metrics"): _Route("discovery", self._metrics),
                ("POST", "/v1/chat/completions"): chat,
                ("POST", "/chat/completions"): chat,
            }
            if self.anthropic:
                routes[("POST", "/v1/messages")] = messages
        elif self.kind == "lmstudio":
            routes = {
                ("GET", "/v1/models"): json_route("health", lambda _: self.lmstudio_v1_models()),
                ("GET", "/api/v0/models"): json_route(
                    "discovery", lambda _: self.lmstudio_api_v0()
                ),
                ("GET", "/api/v1/models"): json_route(
                    "discovery", lambda _: self.lmstudio_api_v1()
                ),
                ("POST", "/v1/chat/completions"): chat,
            }
            if self.anthropic:
                routes[("POST", "/v1/messages")] = messages
        elif self.kind == "ollama":
            routes = {
                ("GET", "/"): _Route("health", self._ollama_root, public=True),
                ("GET", "/api/version"): _Route("health", self._ollama_version, public=True),
                ("GET", "/api/tags"): json_route("discovery", lambda _: self.ollama_tags()),
                ("GET", "/api/ps"): json_route("discovery", lambda _: self.ollama_ps()),
                ("POST", "/api/show"): _Route("discovery", self._ollama_show),
                ("GET", "/v1/models"): json_route("discovery", lambda _: self.ollama_v1_models()),
                ("POST", "/v1/chat/completions"): chat,
            }
            if self.anthropic:
                routes[("POST", "/v1/messages")] = messages
        elif self.kind == "openrouter":
            key = json_route("health", lambda _: self._byok_health(self.openrouter_key))
            routes = {
                ("GET", "/api/v1/models"): json_route(
                    "discovery", lambda _: self.openrouter_models(), True
                ),
                ("GET", "/api/v1/key"): key,
                ("GET", "/api/v1/auth/key"): key,
                ("POST", "/api/v1/chat/completions"): chat,
            }
            if self.anthropic:
                routes[("POST", "/api/v1/messages")] = messages
        else:
            routes = {
                ("GET", "/api/v1/models"): json_route(
                    "health",
                    lambda r: self._byok_health(lambda: self.venice_models(r.query.get("type"))),
                ),
                ("POST", "/api/v1/chat/completions"): chat,
            }
        if self.kind == "ollama":  # Ollama needs no key, whatever is sent
            routes = {k: _Route(r.cls, r.handler, public=True) for k, r in routes.items()}
        return routes

    def _byok_health(self, make: Callable[[], Any]) -> Any:
        if self._loading():
            return self._error(503, _MESSAGES[503])
        return make()

    # --- discovery answers (plain data, in the fixtures' shapes) -----------------------------

    def _trained(self, model: SimModel) -> int:
        return max(model.context, 32768)

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

    def _llamacpp_router(self) -> bool:
        return len(self.models) > 1

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
            "total_slots": LLAMACPP_SLOTS,
            "model_path": f"/models/{model.name}.gguf",
            "chat_template": "{%- for message in messages %}...",
            "chat_template_caps": {},
            "modalities": {"vision": False, "audio": False},
            "build_info": LLAMACPP_BUILD,
            "is_sleeping": False,
        }

    def llamacpp_slots(self) -> list[dict[str, Any]]:
        busy = min(self.active, LLAMACPP_SLOTS)
        return [self._llamacpp_slot(i, self.models[0], i < busy) for i in range(LLAMACPP_SLOTS)]

    def _llamacpp_unavailable(self) -> web.Response | None:
        if self._loading():
            return self._error(503, "Loading model")
        return None

    async def _llamacpp_health(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        return self._llamacpp_unavailable() or _json({"status": "ok"})

    async def _llamacpp_models(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        return _json(self.llamacpp_models())

    async def _llamacpp_props(self, request: web.Request, _: SimRequest) -> web.StreamResponse:
        if (refused := self._llamacpp_unavailable()) is not None:
            return refused
        wanted = request.query.get("model")
        if wanted is None:
            if self._llamacpp_router():
                return self._error(400, "model name is missing from the request")
            return _json(self.llamacpp_props(self.models[0]))
        model = self._models.get(wanted)
        if model is None:
            return self._error(404, f"model {wanted!r} not found")
        return _json(self.llamacpp_props(model))

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

    async def _ollama_root(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        if self._loading():
            return web.Response(status=503, text="Ollama is starting")
        return web.Response(text="Ollama is running")

    async def _ollama_version(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        if self._loading():
            return _json({"error": "Ollama is starting"}, 503)
        return _json({"version": OLLAMA_VERSION if self.anthropic else OLLAMA_VERSION_NO_ANTHROPIC})

    def _ollama_details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }

    def ollama_tags(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                    "size": 2019393189,
                    "digest": hashlib.sha256(m.name.encode()).hexdigest(),
                    "details": self._ollama_details(),
                }
                for m in self.models
            ]
        }

    def ollama_ps(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "size": 7331962880,
                    "digest": hashlib.sha256(m.name.encode()).hexdigest(),
                    "details": self._ollama_details(),
                    "expires_at": "2099-06-01T10:17:03.118273645Z",
                    "size_vram": 7331962880,
                    "context_length": m.context,
                }
                for m in self.models
            ]
        }

    def ollama_show(self, model: SimModel) -> dict[str, Any]:
        return {
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM /models/{model.name}\n'
            f"PARAMETER num_ctx {model.context}\n",
            "parameters": f"num_ctx                        {model.context}\n"
            'stop                           "<|eot_id|>"',
            "template": "{{ if .System }}<|start_header_id|>system<|end_header_id|>...",
            "details": self._ollama_details(),
            "model_info": {
                "general.architecture": "llama",
                "general.file_type": 15,
                "general.parameter_count": 3212749888,
                "llama.attention.head_count": 24,
                "llama.attention.head_count_kv": 8,
                "llama.block_count": 28,
                "llama.context_length": self._trained(model),
                "llama.embedding_length": 3072,
                "tokenizer.ggml.model": "gpt2",
            },
            "capabilities": ["completion", "tools"],
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
        }

    async def _ollama_show(self, _: web.Request, rec: SimRequest) -> web.StreamResponse:
        try:
            body = rec.json()
        except orjson.JSONDecodeError:
            return _json({"error": "invalid character in the request body"}, 400)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        model = self._models.get(name) if isinstance(name, str) else None
        if model is None:
            return _json({"error": f"model '{name}' not found"}, 404)
        return _json(self.ollama_show(model))

    def ollama_v1_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": self.started_wall,
                    "owned_by": "library",
                }
                for m in self.models
            ],
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

    async def _metrics(self, _: web.Request, __: SimRequest) -> web.StreamResponse:
        if self.kind == "llamacpp" and (refused := self._llamacpp_unavailable()) is not None:
            return refused
        served = sum(self.served.values())
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
            lines.extend(
                (f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}")
            )

        if self.kind == "vllm":
            for m in self.models:
                labels = f'{{engine="0",model_name="{m.name}"}}'
                family(
                    "vllm:num_requests_running",
                    "gauge",
                    "Requests running.",
                    float(self.active),
                    labels,
                )
                family("vllm:num_requests_waiting", "gauge", "Requests waiting.", 0.0, labels)
                family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage.", 0.0, labels)
                family("vllm:gpu_cache_usage_perc", "gauge", "Deprecated alias.", 0.0, labels)
                family(
                    "vllm:prompt_tokens_total", "counter", "Prefill tokens.", float(served), labels
                )
                family(
                    "vllm:generation_tokens_total",
                    "counter",
                    "Generated tokens.",
                    float(served),
                    labels,
                )
        else:
            family("llamacpp:prompt_tokens_total", "counter", "Prompt tokens.", served)
            family("llamacpp:prompt_seconds_total", "counter", "Prompt process time", 0.0)
            family("llamacpp:tokens_predicted_total", "counter", "Generated tokens.", served)
            family("llamacpp:tokens_predicted_seconds_total", "counter", "Predict time", 0.0)
            family("llamacpp:prompt_tokens_seconds", "gauge", "Prompt tokens/s.", 0.0)
            family("llamacpp:predicted_tokens_seconds", "gauge", "Generated tokens/s.", 0.0)
            family("llamacpp:requests_processing", "gauge", "Requests processing.", self.active)
            family("llamacpp:requests_deferred", "gauge", "Requests deferred.", 0)
            family("llamacpp:n_busy_slots_per_decode", "gauge", "Busy slots per decode.", 0.0)
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # --- completions -------------------------------------------------------------------------

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
            return _json(
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
            return _json(
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
        self.served[rec.key] += 1
        if self.kind == "openrouter":
            self._cost_usd += _cost_usd(self.price, job.prompt_tokens, job.n_tokens)
        fault = rec.fault
        if not job.stream:
            return await self._complete_whole(request, rec, job, fault, anthropic_route)
        if anthropic_route:
            frames = anthropic_frames(self.kind, job)
        else:
            frames = openai_frames(self.kind, job, self.price)
        if fault is not None and fault.kind == "usage":
            frames = _absurd_frames(frames, fault)
        return await self._stream(request, rec, job, frames, fault)

    async def _stream(
        self,
        request: web.Request,
        rec: SimRequest,
        job: Job,
        frames: StreamFrames,
        fault: Fault | None,
    ) -> web.StreamResponse:
        """Headers at once, then the first token after `ttft_s`, one write per token."""
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
            if self.ttft_s:
                await asyncio.sleep(self.ttft_s)
            started = loop.time()
            if stop_at and self.tokens_per_s and request.transport is not None:
                paced = _PacedStream(
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

    def _gone(self, rec: SimRequest) -> None:
        """The connection went away under a stream: the client's doing, unless the sim's."""
        if rec.outcome == "open":
            rec.outcome = "stopped" if self._closing else "disconnected"
            rec.disconnected = not self._closing

    def _first_write(self, rec: SimRequest) -> None:
        rec.first_write_monotonic = time.monotonic()
        rec.first_write_wall = time.time()
        self._changed()

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
        delay = self.ttft_s + (job.n_tokens / self.tokens_per_s if self.tokens_per_s else 0.0)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and fault.kind == "die":
            rec.outcome = "died"
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault is not None and fault.kind == "error":
            rec.outcome = "error_event"
            return self._error(500, _MESSAGES[500], anthropic_route=anthropic_route)
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
        return _json(answer)

    def anthropic_message(self, job: Job) -> dict[str, Any]:
        usage: dict[str, int] = {"input_tokens": job.prompt_tokens, "output_tokens": job.n_tokens}
        if self.kind == "llamacpp":
            usage = {"cache_read_input_tokens": 0, **usage}
        return {
            "id": ("chatcmpl-" if self.kind == "llamacpp" else "msg_") + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": _response_text(job.n_tokens)}],
            "model": job.model,
            "stop_reason": "max_tokens" if job.truncated else "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }

    def chat_completion(self, job: Job, elapsed_s: float) -> dict[str, Any]:
        text = _response_text(job.n_tokens)
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
                "timings": _llamacpp_timings(p, n, elapsed_s),
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


def _publisher(name: str) -> str:
    owner, sep, _ = name.partition("/")
    return owner if sep and owner else "lmstudio-community"


# --- the command ----------------------------------------------------------------------------------

EX_USAGE: Final = 2


def parse_model(spec: str, context_window: int) -> SimModel:
    """`NAME` or `NAME=CTX` from `--model`."""
    name, sep, context = spec.rpartition("=")
    if not sep:
        return SimModel(spec, context_window)
    if not name or not (context.isascii() and context.isdigit()):
        raise ValueError(f"--model must be NAME or NAME=CTX (CTX a whole number), not {spec!r}")
    return SimModel(name, int(context))


def sim_from_args(args: argparse.Namespace) -> SimBackend:
    """The simulator `sim-backend`'s options describe; ValueError with a one-line reason."""
    default_port = DEFAULT_PORTS.get(args.kind, 0)
    listen = args.listen if args.listen is not None else f"127.0.0.1:{default_port}"
    host, port = parse_listen(listen)
    models = [parse_model(spec, args.context) for spec in args.model] if args.model else None
    if args.fault_count is not None and args.fault is None:
        raise ValueError("--fault-count needs --fault")
    fault = Fault.from_spec(args.fault, args.fault_count, args.fault_scope) if args.fault else None
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env!r} is unset")
    try:
        prices = Decimal(args.price_in), Decimal(args.price_out)
    except InvalidOperation:
        raise ValueError("--price-in and --price-out must be decimal numbers") from None
    if not all(p.is_finite() and p >= 0 for p in prices):
        raise ValueError("--price-in and --price-out must be ≥ 0")
    if args.context < 1:
        raise ValueError("--context must be ≥ 1")
    return SimBackend(
        args.kind,
        models,
        context_window=args.context,
        tokens=args.tokens,
        tokens_per_s=args.tokens_per_s,
        ttft_s=args.ttft_ms / 1000,
        api_key=api_key,
        anthropic=not args.no_anthropic,
        price_in_usd_per_1m=prices[0],
        price_out_usd_per_1m=prices[1],
        fault=fault,
        host=host,
        port=port,
    )


async def serve_until_signalled(sim: SimBackend) -> None:
    """Serve until SIGTERM or SIGINT; the one stdout line says where (scripts read the URL)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with sim:
            names = ", ".join(m.name for m in sim.models)
            try:
                print(f"sim-backend: {sim.kind} serving {names} at {sim.base_url}", flush=True)
            except BrokenPipeError:
                return  # nobody reads stdout: end quietly
            async for _ in signals:
                return


def run_command(args: argparse.Namespace) -> int:
    """`provider-agent sim-backend`: 0 after SIGTERM/SIGINT; a bad option is one line and exit
    2; an address it cannot listen on, one line and exit 1."""
    try:
        sim = sim_from_args(args)
    except ValueError as exc:
        print(f"sim-backend: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        anyio.run(serve_until_signalled, sim)
    except KeyboardInterrupt:  # SIGINT before the receiver was installed
        pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"sim-backend: cannot listen on {sim.host}:{sim.port}: {reason}", file=sys.stderr)
        return 1
    return 0
