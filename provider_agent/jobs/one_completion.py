"""One tiny completion through a route, by the same path a job takes (`request_body` →
`backend.stream` → `UsageMeter`), for what must know that a route really serves: restoring a
withdrawn route (`health.py`) and `doctor`.

It touches nothing a served job touches: no outbox, no ledger, no statistics, no `measured`,
no job slot (protocol.md §2: only served jobs count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from provider_agent.discovery.catalog import Route
from provider_agent.errors import StreamFailed
from provider_agent.jobs.executor import StreamOpener
from provider_agent.jobs.upstream import request_body
from provider_agent.jobs.usage import UsageMeter
from provider_agent.link.protocol import WireFormat

#: The prompt: one token asked for, so a probe costs next to nothing, also on a BYOK backend.
PROBE_REQUEST: dict[str, object] = {
    "messages": [{"role": "user", "content": "Say OK."}],
    "max_tokens": 1,
}
BACKSTOP_S = 1.0


@dataclass(frozen=True)
class ProbeResult:
    """How the completion went: `error` is None when it streamed to its end marker."""

    error: str | None
    ttft_ms: float | None = None
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def probe_format(route: Route) -> WireFormat:
    """openai when the route speaks it (it always does, unless configured otherwise)."""
    return "openai" if "openai" in route.formats or not route.formats else "anthropic"


async def tiny_completion(stream: StreamOpener, route: Route, timeout_s: float) -> ProbeResult:
    """A one-token completion through `stream` (a backend's `stream`), bounded by `timeout_s`.
    Never raises for the backend's failures: they are the result."""
    fmt = probe_format(route)
    body = request_body(fmt, PROBE_REQUEST, route.native_id)
    meter = UsageMeter(fmt, PROBE_REQUEST)
    started = time.perf_counter()
    first: float | None = None
    deadline = anyio.current_time() + timeout_s
    # The stream ends itself at the deadline; the scope is the backstop.
    with anyio.move_on_after(timeout_s + BACKSTOP_S) as scope:
        try:
            async with stream(fmt, body, deadline) as chunks:
                async for data in chunks:
                    if first is None:
                        first = time.perf_counter()
                    meter.feed(data)
                    if meter.ended:  # not waiting for a backend that keeps the connection open
                        break
        except StreamFailed as exc:
            return ProbeResult(f"{exc.failure.code}: {exc.failure.message}", _ms(started, first))
    if scope.cancelled_caught:
        return ProbeResult(f"backend_timeout: no complete answer within {timeout_s:g}s")
    ttft = _ms(started, first)
    if meter.error is not None:
        return ProbeResult(f"backend_error: error event mid-stream: {meter.error}", ttft)
    if not meter.ended:
        return ProbeResult("backend_error: the stream ended before its end marker", ttft)
    return ProbeResult(None, ttft, meter.result().output)


def _ms(started: float, first: float | None) -> float | None:
    return None if first is None else round((first - started) * 1000, 1)
