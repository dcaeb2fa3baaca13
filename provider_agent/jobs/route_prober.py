"""Route health at work: what each job's end says about its route and backend, withdrawing a
route that keeps failing (protocol.md §2), and the one-token completions that bring it back.

The decisions are `route_health`'s (pure); this module feeds it, runs the probes when due, and
tells the agent when what it advertises changed (`on_change`) or a backend looks dead
(`on_backend_failed`: a discovery pass soon).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import anyio

from provider_agent.backends import Registry
from provider_agent.clock import Clock, Timings
from provider_agent.discovery.catalog import Route
from provider_agent.jobs.route_health import (
    BackendTraffic,
    RouteHealth,
    Traffic,
    Withdrawn,
    probe_every_s,
    verdict,
)
from provider_agent.link.protocol import ErrorCode
from provider_agent.observe.prometheus import AgentMetrics
from provider_agent.safe_text import printable

log = logging.getLogger(__name__)


class RouteProber:
    """Withdraws failing routes, probes them when due, restores those that answer."""

    def __init__(
        self,
        *,
        registry: Callable[[], Registry],
        backend_labels: Callable[[], Iterable[str]],
        discovery_interval_s: Callable[[], float],
        streaming: Callable[[str], int],
        metrics: AgentMetrics,
        on_change: Callable[[], None],
        on_backend_failed: Callable[[str], None],
        timings: Timings,
        clock: Clock,
    ) -> None:
        self._registry = registry
        self._backend_labels = backend_labels
        self._discovery_interval_s = discovery_interval_s
        self._streaming = streaming
        self.metrics = metrics
        self._on_change = on_change
        self._on_backend_failed = on_backend_failed
        self.timings = timings
        self.clock = clock
        #: Routes withdrawn for failing jobs (protocol.md §2) and their probes.
        self.health = RouteHealth()
        #: What each backend's jobs showed lately: a backend healthy by it is not probed.
        self.traffic = BackendTraffic()
        self._changed = anyio.Event()

    def probe_every_s(self) -> float:
        """Seconds between probes of a withdrawn route: the timings', else min(interval, 30 s)."""
        if self.timings.route_probe_s is not None:
            return self.timings.route_probe_s
        return probe_every_s(self._discovery_interval_s())

    def backend_failed(self, backend: str) -> None:
        """A backend failed a job before its first byte: it counts against its traffic at once,
        and the agent hears of it (a pass soon, so a dead backend is withdrawn within seconds)."""
        self.traffic.record(backend, "failure", self.clock.now())
        self._on_backend_failed(backend)

    def route_ended(
        self, route: Route, code: ErrorCode | None, relayed: int, throttled: bool = False
    ) -> None:
        """A job's attempt on a route ended: a route that failed its last jobs is withdrawn at
        once (an out-of-cycle capabilities message) until a probe through it succeeds."""
        now = self.clock.now()
        self.traffic.record(route.backend, verdict(code, relayed, throttled=throttled), now)
        every_s = self.probe_every_s()
        if not self.health.record(route, code, relayed, now, every_s, throttled=throttled):
            return
        self.metrics.route_withdrawn(route.backend)
        log.warning(
            "route withdrawn: its last jobs failed on the serving side; a one-token completion "
            "every %gs brings it back backend=%s model=%s",
            every_s,
            route.backend,
            printable(route.native_id),
        )
        self._changed.set()
        self._on_change()

    def backend_traffic(self, backend: str) -> Traffic:
        """What `backend`'s jobs showed lately, with its jobs streaming now (for discovery)."""
        return self.traffic.of(backend, self._streaming(backend))

    async def run(self) -> None:
        """Withdrawn routes get a one-token completion when due; a success restores one."""
        while True:
            due_at = self.health.next_due_at()
            wait = due_at - self.clock.now() if due_at is not None else math.inf
            with anyio.move_on_after(wait):
                await self._changed.wait()
            self._changed = anyio.Event()
            due = self.health.due(self.clock.now())
            async with anyio.create_task_group() as probes:
                for withdrawn in due:
                    probes.start_soon(self._probe, withdrawn)

    async def _probe(self, withdrawn: Withdrawn) -> None:
        route = withdrawn.route
        try:
            backend = self._registry().get(route.backend)
        except KeyError:
            self.health.forget_backends_not_in(set(self._backend_labels()))
            log.info("withdrawn route forgotten: its backend is no longer configured")
            self._on_change()
            return
        from provider_agent.jobs.one_completion import tiny_completion  # the job path: lazily

        result = await tiny_completion(backend.stream, route, self.timings.route_probe_timeout_s)
        restored = self.health.probed(route, result.ok, self.clock.now(), self.probe_every_s())
        self.metrics.route_probed(route.backend, ok=result.ok, restored=restored)
        if restored:
            log.warning(
                "route restored: a one-token completion through it succeeded backend=%s model=%s",
                route.backend,
                printable(route.native_id),
            )
            self._on_change()
        else:
            log.info(
                "withdrawn route still failing backend=%s model=%s probes=%d error=%s",
                route.backend,
                printable(route.native_id),
                withdrawn.probes,
                printable(result.error or ""),
            )
