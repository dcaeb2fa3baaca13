"""Every route's concurrency limit (protocol.md §9): one `RouteCapacity` controller per route
(backend × model), its ceiling, and what the rest of the agent reads of them.

The ceiling of a route is the smallest of its backend's configured `max_concurrent`, its slot
count (a llama.cpp server's) and the global `limits.max_concurrent`. With `[limits] adaptive`
the controller learns the limit below it from the route's time to first byte; without, the limit
is the ceiling. Pure: no I/O and no clock reads (`now` comes in); the executor feeds it and the
agent reads it for the capabilities (the sum of a model's route limits), the heartbeat, `/status`
and `/metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from provider_agent.config.schema import LimitsConfig
from provider_agent.discovery.catalog import Route, RouteKey
from provider_agent.jobs.capacity import RouteCapacity


@dataclass(frozen=True)
class RouteLimit:
    """One route's limit as the heartbeat, `/status` and `/metrics` show it."""

    backend: str
    native_id: str
    limit: int
    #: The limit the capabilities advertise (not a re-measure's brief hold or a trial).
    advertised: int
    ceiling: int
    baseline_s: float | None


def ceiling_of(route: Route, global_max: int) -> int:
    """The most jobs the route may ever have at once (protocol.md §9)."""
    caps = [c for c in (route.max_concurrent, route.slots, global_max) if c is not None]
    return max(1, min(caps))


class RouteLimits:
    """The controllers by route key, created when a route is first used or shown."""

    def __init__(
        self, limits: Callable[[], LimitsConfig], on_change: Callable[[], None] | None = None
    ) -> None:
        self._limits = limits
        self._on_change = on_change
        #: The controller of each route, and the ceiling it was last given.
        self._routes: dict[RouteKey, tuple[RouteCapacity, int]] = {}
        #: The settings the controllers were built under: a reload that changes them rebuilds.
        self._settings: tuple[bool, float] | None = None

    def of(self, route: Route, now: float) -> RouteCapacity:
        """The route's controller, its ceiling brought up to date."""
        config = self._limits()
        settings = (config.adaptive, config.ttfb_tolerance)
        if settings != self._settings:
            self._settings = settings
            self._routes.clear()
        entry = self._routes.get(route.key)
        ceiling = ceiling_of(route, config.max_concurrent)
        if entry is None:
            capacity = RouteCapacity(
                ceiling, tolerance=config.ttfb_tolerance, adaptive=config.adaptive, now=now
            )
            self._routes[route.key] = (capacity, ceiling)
            return capacity
        capacity, known = entry
        if known != ceiling:  # a reload, or a pass that saw other slots
            capacity.set_ceiling(ceiling)
            self._routes[route.key] = (capacity, ceiling)
        return capacity

    def limit(self, route: Route, now: float) -> int:
        capacity = self.of(route, now)
        capacity.tick(now)
        return capacity.limit

    def observe(
        self, route: Route, now: float, ttfb_s: float, prompt_tokens: int, in_flight: int
    ) -> None:
        """A job's first byte came `ttfb_s` after its request to this route was sent."""
        capacity = self.of(route, now)
        before = capacity.limit
        capacity.observe(now, ttfb_s, prompt_tokens, in_flight)
        capacity.tick(now)
        self._changed(before, capacity)

    def finished(self, route: Route, duration_s: float) -> None:
        """A job on this route ended `duration_s` after its request was sent."""
        entry = self._routes.get(route.key)
        if entry is not None:
            entry[0].finished(duration_s)

    def failed(self, route: Route, now: float) -> None:
        """The route refused a job (429/503, busy) or timed out before its first byte."""
        capacity = self.of(route, now)
        before = capacity.limit
        capacity.failed(now)
        self._changed(before, capacity)

    def model_limits(self, routes: Mapping[str, Sequence[Route]], now: float) -> dict[str, int]:
        """Each model's `max_concurrent` to advertise: the sum of its routes' limits (as last
        known good), at most the global ceiling."""
        global_max = self._limits().max_concurrent
        return {
            model_id: min(global_max, sum(self.of(route, now).advertised for route in found))
            for model_id, found in routes.items()
        }

    def shown(self, routes: Iterable[Route], now: float) -> list[RouteLimit]:
        """The limits of these routes, in their order."""
        shown: list[RouteLimit] = []
        for route in routes:
            capacity = self.of(route, now)
            capacity.tick(now)
            shown.append(
                RouteLimit(
                    route.backend,
                    route.native_id,
                    capacity.limit,
                    capacity.advertised,
                    capacity.ceiling,
                    capacity.baseline_s,
                )
            )
        return shown

    def forget_all_but(self, keep: Iterable[RouteKey]) -> None:
        """Drop the controllers of routes no longer served (after a pass)."""
        wanted = set(keep)
        for key in [k for k in self._routes if k not in wanted]:
            del self._routes[key]

    def _changed(self, before: int, capacity: RouteCapacity) -> None:
        if capacity.limit != before and self._on_change is not None:
            self._on_change()


def offer_moved(advertised: Mapping[str, int], current: Mapping[str, int]) -> bool:
    """True when a model advertised has a `max_concurrent` now more than one away from what was
    advertised (protocol.md §9: smaller moves wait for the next capabilities message)."""
    return any(
        abs(current[model_id] - limit) > 1
        for model_id, limit in advertised.items()
        if model_id in current
    )
