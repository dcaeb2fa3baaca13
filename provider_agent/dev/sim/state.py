"""What every part of a simulator shares: its knobs, its records, the fault it shows, and waiting on
them. Each kind's endpoints and the completions are mixins over `SimState`, so that each reads as
its own module; `core.SimBackend` puts them together and serves them.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Self, TypeVar

from aiohttp import web

from provider_agent.dev.sim.answers import MESSAGES, error_body, json_response
from provider_agent.dev.sim.faults import Fault, RouteClass
from provider_agent.dev.sim.pacer import Pacer
from provider_agent.dev.sim.records import DEFAULT_MODELS, KINDS, Job, SimModel, SimRequest
from provider_agent.dev.sim.slots import SlotGate, valid_seconds

_T = TypeVar("_T")
#: What answers a route: the request, and the simulator's record of it.
Handler = Callable[[web.Request, SimRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    """What answers a (METHOD, path), and what class of route it is (which faults apply)."""

    cls: RouteClass
    handler: Handler
    #: No API key needed even when one is set.
    public: bool = False


Routes = dict[tuple[str, str], Route]


def json_route(cls: RouteClass, make: Callable[[web.Request], Any], public: bool = False) -> Route:
    """A route that answers `make(request)`: JSON, or the response it made itself."""

    async def handler(request: web.Request, _: SimRequest) -> web.StreamResponse:
        answer = make(request)
        return answer if isinstance(answer, web.StreamResponse) else json_response(answer)

    return Route(cls, handler, public)


class SimState(ABC):
    """A simulated backend's knobs, records and fault (the package docstring says what each is)."""

    def __init__(
        self,
        kind: str,
        models: Sequence[str | SimModel] | None = None,
        *,
        context_window: int = 8192,
        tokens: int = 16,
        tokens_per_s: float = 40.0,
        ttft_s: float = 0.0,
        slots: int | None = None,
        prefill_s_per_1k: float = 0.0,
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
        #: Prefill: seconds per 1,000 prompt tokens, after `ttft_s`, while holding a slot.
        self.prefill_s_per_1k = valid_seconds("prefill_s_per_1k", prefill_s_per_1k)
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
        #: Completions holding a slot now (in prefill or generating), and waiting for one.
        self.busy = 0
        self.queued = 0
        self._slots = SlotGate(slots, self._slots_changed)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._closing = False
        self._cost_usd = 0.0
        self._pacer = Pacer(self._first_write)

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
        predicate: Callable[[Self], _T | Literal[False] | None],
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

    # --- saturation --------------------------------------------------------------------------

    @property
    def slots(self) -> int | None:
        """How many completions generate at once, across all models (None: no limit); the rest
        wait in arrival order before any byte of their answer. Settable at any time."""
        return self._slots.capacity

    @slots.setter
    def slots(self, value: int | None) -> None:
        self._slots.capacity = value

    def _slots_changed(self) -> None:
        self.busy, self.queued = self._slots.busy, self._slots.queued
        self._changed()

    def saturation(self) -> dict[str, Any]:
        """The saturation knobs, and how many completions hold a slot and wait for one."""
        names = ("slots", "busy", "queued", "prefill_s_per_1k", "ttft_s")
        return {name: getattr(self, name) for name in names}

    def _first_token_delay(self, job: Job) -> float:
        """The time to the first token once a slot is held: `ttft_s`, plus prefill."""
        return self.ttft_s + self.prefill_s_per_1k * job.prompt_tokens / 1000

    # --- records ---------------------------------------------------------------------------

    @property
    def completions(self) -> list[SimRequest]:
        return [r for r in self.requests if r.key is not None]

    @property
    def disconnects(self) -> list[SimRequest]:
        return [r for r in self.requests if r.disconnected]

    def _first_write(self, rec: SimRequest) -> None:
        rec.first_write_monotonic = time.monotonic()
        rec.first_write_wall = time.time()
        self._changed()

    def _gone(self, rec: SimRequest) -> None:
        """The connection went away under a stream: the client's doing, unless the sim's."""
        if rec.outcome == "open":
            rec.outcome = "stopped" if self._closing else "disconnected"
            rec.disconnected = not self._closing

    # --- answers every kind gives ------------------------------------------------------------

    def _error(self, status: int, message: str, *, anthropic_route: bool = False) -> web.Response:
        body = error_body(self.kind, status, message, anthropic_route=anthropic_route)
        headers = {"Retry-After": "1"} if status == 429 else None
        return json_response(body, status, headers)

    def _byok_health(self, make: Callable[[], Any]) -> Any:
        """A BYOK kind's health probe (its key, or its listing): 503 while `loading`."""
        if self._loading():
            return self._error(503, MESSAGES[503])
        return make()

    def _trained(self, model: SimModel) -> int:
        """The context the model was trained for, as listings report it: at least its window."""
        return max(model.context, 32768)

    def _llamacpp_router(self) -> bool:
        """llama.cpp serves several models as a router, which needs each asked for by name."""
        return len(self.models) > 1

    @abstractmethod
    def _build_routes(self) -> Routes:
        """(METHOD, path) → the route that answers it, for this kind: `core.SimBackend`'s."""
