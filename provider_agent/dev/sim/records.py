"""The simulator's vocabulary: the kinds it speaks, the models it serves, the record it keeps of
every request (what tests and benchmarks assert on), and what a completion asks for (`Job`) with
the figures every kind reports on one: finish reason, token usage, cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson
from multidict import CIMultiDict

from provider_agent.dev.sim.faults import Fault

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
    #: When a completion got its slot (`SimState.slots`): its wait in the queue ended, prefill
    #: began. None until then, and for one that left the queue.
    slot_monotonic: float | None = None
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
                "slot_monotonic",
                "first_write_monotonic",
                "first_write_wall",
                "finished_monotonic",
            )
        }


def job_key(headers: Mapping[str, str], body: Any, raw: bytes) -> str:
    """What `served`/`completed` count by (see the package docstring)."""
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


@dataclass(frozen=True)
class Job:
    """What a completion request asks for, as the simulator reads it."""

    model: str
    prompt_tokens: int
    n_tokens: int
    truncated: bool
    include_usage: bool
    stream: bool


# The figures every kind's answers report on a job (`n`: the tokens sent).
def finish_reason(truncated: bool) -> str:
    return "length" if truncated else "stop"


def token_usage(job: Job, n: int) -> dict[str, int]:
    prompt = job.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


def cost_usd(price: tuple[Decimal, Decimal], prompt: int, n: int) -> float:
    return float((price[0] * prompt + price[1] * n) / 1_000_000)
