"""Pure: traffic-aware route health (protocol.md §2).

A GPU in a bad state still answers `/health` and fails every job, so discovery cannot see it;
the jobs can. A route (one backend serving one model) whose last `FAILURES_TO_WITHDRAW` jobs in
a row failed on the serving side is withdrawn: left out of the routes the executor uses and of
the capabilities message until a one-token completion through it succeeds. Discovery passes do
not bring it back. Probes run at most every min(`discovery.interval_s`, `PROBE_EVERY_MAX_S`).

What a finished route attempt says about the route (protocol.md §8):
- a failure: `backend_unreachable`, `backend_error`, `auth_rejected_by_backend`, and
  `backend_timeout` before any byte — also when the job then succeeded through a fallback;
- a success (the streak restarts): a `job_done` on the route, and only that;
- nothing (the streak is left as it was): everything else — a `429` (the backend is busy, not
  broken: the route is skipped for 10 s but the streak does not grow), a `404` (the model is not
  loaded: discovery's business), `bad_request`, `cancelled`, `connection_lost`, refusals.

The shorter-term rule (a route that failed once is skipped for 10 s while another serves the
model) is `routing.RouteLoad`'s.

The other half: a backend whose jobs show it healthy is not probed by discovery
(`healthy_by_traffic`). llama-cpp-python's server ends a running stream whenever another request
needing the model arrives, so a probe of a busy backend would break its jobs; the jobs already
say what the probe would. No I/O and no clock here: the caller passes `now`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from provider_agent.discovery.catalog import Route, RouteKey
from provider_agent.link.protocol import ErrorCode

FAILURES_TO_WITHDRAW = 3
PROBE_EVERY_MAX_S = 30.0

#: Codes that count against a route (`backend_timeout` only before the route's first byte).
ROUTE_FAILURES: frozenset[str] = frozenset(
    {"backend_unreachable", "backend_error", "auth_rejected_by_backend", "backend_timeout"}
)
Verdict = Literal["failure", "success", "neutral"]


def route_key(route: Route) -> RouteKey:
    return route.key


def verdict(code: ErrorCode | None, relayed: int, *, throttled: bool = False) -> Verdict:
    """What one finished attempt on a route says about it (see the module docstring);
    `throttled`: the backend answered 429."""
    if code is None:
        return "success"
    if throttled or (code == "backend_timeout" and relayed > 0):
        return "neutral"
    return "failure" if code in ROUTE_FAILURES else "neutral"


def probe_every_s(interval_s: float) -> float:
    """How often a withdrawn route is tried: min(`discovery.interval_s`, 30 s)."""
    return min(interval_s, PROBE_EVERY_MAX_S)


@dataclass
class Withdrawn:
    """A withdrawn route, and when it may next be probed."""

    route: Route
    since: float
    next_probe_at: float
    probes: int = 0
    #: The code of the failure that withdrew it.
    last_code: str | None = None


@dataclass
class RouteHealth:
    """Failure streaks per route and the routes withdrawn for them."""

    streaks: dict[RouteKey, int] = field(default_factory=dict)
    withdrawn: dict[RouteKey, Withdrawn] = field(default_factory=dict)
    #: Counters for `/metrics`: routes withdrawn and restored since start, probes tried.
    withdrawals: int = 0
    restorations: int = 0
    probes: int = 0

    def record(
        self,
        route: Route,
        code: ErrorCode | None,
        relayed: int,
        now: float,
        probe_s: float,
        *,
        throttled: bool = False,
    ) -> bool:
        """One finished attempt on `route`; True when this one withdrew it."""
        key = route_key(route)
        found = verdict(code, relayed, throttled=throttled)
        if found == "neutral" or key in self.withdrawn:
            return False
        if found == "success":
            self.streaks.pop(key, None)
            return False
        streak = self.streaks.get(key, 0) + 1
        if streak < FAILURES_TO_WITHDRAW:
            self.streaks[key] = streak
            return False
        self.streaks.pop(key, None)
        self.withdrawn[key] = Withdrawn(
            route, since=now, next_probe_at=now + probe_s, last_code=code
        )
        self.withdrawals += 1
        return True

    def due(self, now: float) -> list[Withdrawn]:
        """The withdrawn routes whose next probe is due."""
        return [w for w in self.withdrawn.values() if w.next_probe_at <= now]

    def next_due_at(self) -> float | None:
        """When the earliest probe is due; None when nothing is withdrawn."""
        return min((w.next_probe_at for w in self.withdrawn.values()), default=None)

    def probed(self, route: Route, ok: bool, now: float, probe_s: float) -> bool:
        """A probe of a withdrawn route ended; True when it restored the route."""
        key = route_key(route)
        entry = self.withdrawn.get(key)
        if entry is None:
            return False
        self.probes += 1
        entry.probes += 1
        if not ok:
            entry.next_probe_at = now + probe_s
            return False
        del self.withdrawn[key]
        self.restorations += 1
        return True

    def forget_backends_not_in(self, backends: set[str]) -> list[Withdrawn]:
        """Drop what is known about backends no longer configured (after a reload)."""
        gone = [w for key, w in self.withdrawn.items() if key[0] not in backends]
        for entry in gone:
            del self.withdrawn[route_key(entry.route)]
        for key in [k for k in self.streaks if k[0] not in backends]:
            del self.streaks[key]
        return gone

    def serving(self, routes: Mapping[str, Sequence[Route]]) -> Mapping[str, Sequence[Route]]:
        """The route table without withdrawn routes (a model left with none is not served);
        the table itself, not a copy, while nothing is withdrawn (the common case, per job)."""
        if not self.withdrawn:
            return routes
        kept: dict[str, Sequence[Route]] = {}
        for model, found in routes.items():
            left = tuple(r for r in found if route_key(r) not in self.withdrawn)
            if left:
                kept[model] = left
        return kept


# --- backends healthy by their jobs' evidence ---------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What the jobs said about one backend lately (times on the caller's clock)."""

    #: When a job on it last ended well (the backend answered: `verdict` "success").
    succeeded_at: float | None = None
    #: When a job on it last failed on the serving side.
    failed_at: float | None = None
    #: Its jobs streaming now (past their first byte).
    streaming: int = 0


def healthy_by_traffic(
    traffic: Traffic, listed_at: float | None, now: float, interval_s: float
) -> bool:
    """Whether a discovery pass may skip probing a backend and reuse its last good listing,
    taken at `listed_at` (None: there is none).

    Yes while that listing is younger than `interval_s` (models are still listed at least that
    often) and, since the listing, a job on it succeeded or one is streaming now — unless a
    serving-side failure came after the last success: that is worth a probe.
    """
    if listed_at is None or now - listed_at >= interval_s:
        return False
    failed, succeeded = traffic.failed_at, traffic.succeeded_at
    if failed is not None and failed >= listed_at and (succeeded is None or failed >= succeeded):
        return False
    return traffic.streaming > 0 or (succeeded is not None and succeeded > listed_at)


@dataclass
class BackendTraffic:
    """The last success and the last serving-side failure of each backend's jobs."""

    succeeded_at: dict[str, float] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)

    def record(self, backend: str, found: Verdict, now: float) -> None:
        if found == "success":
            self.succeeded_at[backend] = now
        elif found == "failure":
            self.failed_at[backend] = now

    def of(self, backend: str, streaming: int = 0) -> Traffic:
        return Traffic(self.succeeded_at.get(backend), self.failed_at.get(backend), streaming)
