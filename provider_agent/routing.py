"""Pure: which route serves a job, and whether a job is admitted at all.

The executor asks these with plain data (the catalog's routes, jobs in flight per backend, which
backends failed lately, the clock) and does what they say. Rules (protocol.md §2, §4):

- Admission, in order: draining or paused → `shutting_down`; the global `max_concurrent` reached →
  `out_of_capacity` (at once, never queued); the token window full → `rate_limited`; no route for
  the model → `model_not_loaded`; no route speaking the job's format → `unsupported_format`.
- Route order: the catalog's priority order; among equal priority the route with the fewest jobs
  in flight; a route whose backend is at its own `max_concurrent` is left out; a backend that
  failed in the last `SKIP_AFTER_FAILURE_S` goes to the back (kept only while no other route can
  serve — "skipped unless it is the only route").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from provider_agent.catalog import Route
from provider_agent.protocol import ErrorCode, WireFormat

SKIP_AFTER_FAILURE_S = 10.0


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
    accepting: bool,
) -> Refusal | None:
    """None when the job may run; else the refusal to answer it with."""
    if not accepting:
        return Refusal("shutting_down", "this agent is not taking new jobs (draining or paused)")
    if in_flight >= max_concurrent:
        return Refusal("out_of_capacity", f"all {max_concurrent} job slots are busy")
    if not window_open:
        return Refusal("rate_limited", "the token budget of the last 60 s is spent")
    candidates = routes.get(model_id)
    if not candidates:
        return Refusal("model_not_loaded", "no backend of this agent serves this model")
    if not any(fmt in route.formats for route in candidates):
        return Refusal("unsupported_format", f"no backend serving this model speaks {fmt}")
    return None


@dataclass
class BackendLoad:
    """Jobs in flight per backend label, and when each backend last failed a job."""

    in_flight: dict[str, int] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)

    def started(self, backend: str) -> None:
        self.in_flight[backend] = self.in_flight.get(backend, 0) + 1

    def ended(self, backend: str) -> None:
        left = self.in_flight.get(backend, 0) - 1
        if left > 0:
            self.in_flight[backend] = left
        else:
            self.in_flight.pop(backend, None)

    def failed(self, backend: str, now: float) -> None:
        self.failed_at[backend] = now

    def succeeded(self, backend: str) -> None:
        self.failed_at.pop(backend, None)

    def recently_failed(self, backend: str, now: float) -> bool:
        at = self.failed_at.get(backend)
        return at is not None and now - at < SKIP_AFTER_FAILURE_S


def order_routes(
    routes: Sequence[Route], fmt: WireFormat, load: BackendLoad, now: float
) -> list[Route]:
    """The routes to try for one job, best first (see the module docstring)."""
    usable = [
        r
        for r in routes
        if fmt in r.formats
        and (r.max_concurrent is None or load.in_flight.get(r.backend, 0) < r.max_concurrent)
    ]
    return sorted(
        usable,
        key=lambda r: (
            load.recently_failed(r.backend, now),
            r.priority,
            load.in_flight.get(r.backend, 0),
            r.config_index,
        ),
    )
