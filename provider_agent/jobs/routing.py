"""Pure: which route serves a job, and whether a job is admitted at all.

The executor asks these with plain data (the catalog's routes, jobs in flight per backend and per
route, which routes failed lately, the clock) and does what they say. Rules (protocol.md §2, §4,
§8):

- Admission, in order: stopping → `shutting_down`; paused → `out_of_capacity` ("paused for
  maintenance"); the outbox cannot store terminal frames → `out_of_capacity` (naming the state
  dir); the global `max_concurrent` reached → `out_of_capacity` (at once, never queued); the token
  window full → `rate_limited`; no route for the model → `model_not_loaded`; no route speaking
  the job's format → `unsupported_format`; every such route at its limit → `out_of_capacity`
  (§9: at once, so the coordinator can send the job where it is fast).
- Route order: the catalog's priority order; among equal priority the route with the most
  headroom under its limit (§9; without learned limits: the fewest jobs in flight on its
  backend); a route whose backend is at its own `max_concurrent`, or that is at its limit (its
  slot count, a llama.cpp server's `total_slots`, or what §9 learned), is left out; a ROUTE
  (backend × model) that failed in the last `SKIP_AFTER_FAILURE_S` goes to the back (kept only
  while no other route can serve — "skipped unless it is the only route"). A 429 puts a route
  there too; a 404 does not (§8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from provider_agent.discovery.catalog import Route, RouteKey
from provider_agent.link.protocol import ErrorCode, WireFormat

SKIP_AFTER_FAILURE_S = 10.0
K = TypeVar("K")

AgentStatus = Literal["ready", "draining", "paused"]
"""What the agent is doing, as `capabilities.metadata.status` says it."""


@dataclass(frozen=True)
class Refusal:
    code: ErrorCode
    message: str


def admit(
    *,
    model_id: str,
    fmt: WireFormat,
    routes: Mapping[str, Sequence[Route]],
    in_flight: int,
    max_concurrent: int,
    window_open: bool,
    status: AgentStatus,
    store_problem: str | None = None,
    has_room: Callable[[Route], bool] | None = None,
) -> Refusal | None:
    """None when the job may run; else the refusal to answer it with."""
    if status == "draining":
        return Refusal("shutting_down", "this agent is stopping and takes no new jobs")
    if status == "paused":
        return Refusal("out_of_capacity", "paused for maintenance")
    if store_problem is not None:
        return Refusal("out_of_capacity", store_problem)
    if in_flight >= max_concurrent:
        return Refusal("out_of_capacity", f"all {max_concurrent} job slots are busy")
    if not window_open:
        return Refusal("rate_limited", "the token budget of the last 60 s is spent")
    candidates = routes.get(model_id)
    if not candidates:
        return Refusal("model_not_loaded", "no backend of this agent serves this model")
    speaking = [route for route in candidates if fmt in route.formats]
    if not speaking:
        return Refusal("unsupported_format", f"no backend serving this model speaks {fmt}")
    if has_room is not None and not any(has_room(route) for route in speaking):
        return Refusal(
            "out_of_capacity",
            "every backend serving this model is at its concurrency limit (it would queue)",
        )
    return None


@dataclass
class RouteLoad:
    """Jobs in flight per backend and per route, and when each route last failed a job."""

    backends: dict[str, int] = field(default_factory=dict)
    routes: dict[RouteKey, int] = field(default_factory=dict)
    failed_at: dict[RouteKey, float] = field(default_factory=dict)

    def started(self, route: Route) -> None:
        self.backends[route.backend] = self.backends.get(route.backend, 0) + 1
        self.routes[route.key] = self.routes.get(route.key, 0) + 1

    def ended(self, route: Route) -> None:
        _decrement(self.backends, route.backend)
        _decrement(self.routes, route.key)

    def failed(self, route: Route, now: float) -> None:
        self.failed_at[route.key] = now

    def succeeded(self, route: Route) -> None:
        self.failed_at.pop(route.key, None)

    def recently_failed(self, route: Route, now: float) -> bool:
        at = self.failed_at.get(route.key)
        return at is not None and now - at < SKIP_AFTER_FAILURE_S

    def has_room(self, route: Route, limit: int | None = None) -> bool:
        """Below the backend's configured `max_concurrent` and the route's limit (its own slot
        count when no limit is given)."""
        cap = route.max_concurrent
        if cap is not None and self.backends.get(route.backend, 0) >= cap:
            return False
        limit = route.slots if limit is None else limit
        return limit is None or self.routes.get(route.key, 0) < limit


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def order_routes(
    routes: Sequence[Route],
    fmt: WireFormat,
    load: RouteLoad,
    now: float,
    limit_of: Callable[[Route], int] | None = None,
) -> list[Route]:
    """The routes to try for one job, best first (see the module docstring). `limit_of`: each
    route's learned limit (§9); without it, slot counts and the backend's load decide."""
    if limit_of is None:
        usable = [r for r in routes if fmt in r.formats and load.has_room(r)]
        return sorted(
            usable,
            key=lambda r: (
                load.recently_failed(r, now),
                r.priority,
                load.backends.get(r.backend, 0),
                r.config_index,
            ),
        )
    limits = {r.key: limit_of(r) for r in routes if fmt in r.formats}
    usable = [r for r in routes if r.key in limits and load.has_room(r, limits[r.key])]
    return sorted(
        usable,
        key=lambda r: (
            load.recently_failed(r, now),
            r.priority,
            load.routes.get(r.key, 0) - limits[r.key],  # the most headroom first
            r.config_index,
        ),
    )
