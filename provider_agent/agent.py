"""Wiring: every part of a running agent, built once with its dependencies.

`async with Agent.open(config, identity) as agent` opens the HTTP pool and the outbox, builds the
parts and hands each the others it talks to; nothing is late-bound, no field is None. The parts
decide (the executor, the session's core, route health, the catalog); the agent only carries
news between them: a route withdrawn or the pause changed → a fresh capabilities message; a
discovery pass → the new catalog. The daemon (`daemon.py`) runs the parts' loops and stops them.

A job's path: `link/` (the session reads a `job` frame and hands it to its `InboundSink`, the
executor) → `jobs/` (admission, routing, the relay) → `backends/` (the upstream stream) →
`store/` (the terminal frame and the ledger row), and back out through `link/lanes.py`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import anyio

from provider_agent import __version__
from provider_agent.backends import Registry
from provider_agent.backends.base import new_http_session
from provider_agent.clock import DEFAULT_TIMINGS, Clock, Timings, utc_ms
from provider_agent.config.schema import Config
from provider_agent.discovery.catalog import Catalog, Route, capabilities_message
from provider_agent.discovery.catalog import build as build_catalog
from provider_agent.discovery.run_pass import Discovery
from provider_agent.discovery.schedule import PassSchedule
from provider_agent.errors import Fault, OutboxError
from provider_agent.jobs.executor import Executor, ExecutorHooks
from provider_agent.jobs.measured import MeasuredSpeed
from provider_agent.jobs.ratelimit import TokenWindow
from provider_agent.jobs.route_limits import RouteLimits, offer_moved
from provider_agent.jobs.route_prober import RouteProber
from provider_agent.jobs.routing import AgentStatus as Advertising
from provider_agent.link.identity import Identity
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import Capabilities, Heartbeat, RouteBeat
from provider_agent.link.session import Session, SessionHooks
from provider_agent.link.state import ReconnectPolicy
from provider_agent.observe.heartbeat import JobStats
from provider_agent.observe.prometheus import AgentMetrics
from provider_agent.observe.status import (
    AgentStatus,
    BackendStatus,
    GpuStatus,
    JobsStatus,
    ModelStatus,
    OutboxStatus,
    PauseStatus,
    RateWindowStatus,
    RouteStatus,
    RunningJob,
    SessionStatus,
    WithdrawnRoute,
    readiness,
)
from provider_agent.observe.systemd import Notifier
from provider_agent.observe.telemetry import GpuTelemetry
from provider_agent.ops.pause import Pause
from provider_agent.safe_text import printable
from provider_agent.store.outbox import Outbox, keep_days_of

log = logging.getLogger(__name__)

#: The largest `limits.max_concurrent` allowed: the pool admits it even after a reload raises it.
POOL_STREAMS = 256
#: `/status` lists at most this many running jobs (the oldest first); `in_flight` counts all.
RUNNING_LISTED = 100


def state_dir_of(config: Config) -> Path:
    """The state dir: `$STATE_DIRECTORY` wins (as under systemd), else `[state] dir`."""
    state = os.environ.get("STATE_DIRECTORY", "")
    return Path(state.split(":")[0]) if state else config.state.dir


class Agent:
    """The running agent's parts. Build with `Agent.open`."""

    def __init__(
        self,
        config: Config,
        identity: Identity,
        *,
        http: aiohttp.ClientSession,
        outbox: Outbox,
        policy: ReconnectPolicy,
        timings: Timings,
        clock: Clock,
        notifier: Notifier,
        telemetry: GpuTelemetry,
    ) -> None:
        self.config = config
        self.identity = identity
        self.timings = timings
        self.clock = clock
        self.notifier = notifier
        self.outbox = outbox
        self.draining = False
        self.metrics = AgentMetrics()
        self.stats = JobStats(self.metrics)
        self.measured = MeasuredSpeed()
        self.telemetry = telemetry
        self.outbound = Outbound()
        self.window = TokenWindow(config.limits.max_tokens_per_minute)
        self.registry = Registry.build(config, http)
        #: Each route's concurrency limit (protocol.md §9), learned from its time to first byte.
        self._limits_moved = anyio.Event()
        self.limits = RouteLimits(lambda: self.config.limits, on_change=self._limit_moved)
        #: What the last capabilities message advertised per model (`max_concurrent`).
        self._advertised: dict[str, int] = {}
        #: What the last discovery pass found (empty until the first pass).
        self.catalog: Catalog = build_catalog(config, ())
        #: The maintenance pause and its socket (`provider-agent pause`).
        self.pause = Pause(outbox.path.parent, self.push_capabilities)
        self.passes = PassSchedule(
            self.refresh,
            lambda: self.config.discovery.interval_s,
            timings.out_of_cycle_pass_s,
            clock,
        )
        self.routes = RouteProber(
            registry=lambda: self.registry,
            backend_labels=lambda: (b.label for b in self.config.backends),
            discovery_interval_s=lambda: self.config.discovery.interval_s,
            streaming=self._streaming,
            metrics=self.metrics,
            on_change=self.push_capabilities,
            on_backend_failed=self._backend_failed,
            timings=timings,
            clock=clock,
        )
        self.jobs = Executor(
            self.outbound,
            self.stats,
            outbox,
            ExecutorHooks(
                routes=self.serving_routes,
                registry=lambda: self.registry,
                max_concurrent=lambda: self.config.limits.max_concurrent,
                status=self.advertising,
                backend_failed=self.routes.backend_failed,
                route_ended=self.routes.route_ended,
            ),
            self.window,
            measured=self.measured,
            timings=timings,
            limits=self.limits,
        )
        self.discovery = Discovery(
            lambda: self.registry,
            lambda: self.config,
            traffic=self.routes.backend_traffic,
            clock=clock.now,
        )
        self.session = Session(
            SessionHooks(
                url=lambda: self.config.coordinator.url,
                enrollment_code=lambda: self.config.enrollment_code,
                heartbeat_interval_s=lambda: self.config.coordinator.heartbeat_interval_s,
                capabilities=lambda: self.capabilities(sent=True),
                heartbeat=self.heartbeat,
                on_authenticated=self.passes.request,
                undelivered=outbox.undelivered,
                on_reconnect=self._session_ended,
            ),
            identity,
            self.jobs,
            self.outbound,
            policy=policy,
            timings=timings,
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: Config,
        identity: Identity,
        *,
        policy: ReconnectPolicy | None = None,
        timings: Timings = DEFAULT_TIMINGS,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        telemetry: GpuTelemetry | None = None,
    ) -> AsyncIterator[Agent]:
        """The parts over an open HTTP pool and outbox; orphaned jobs of an earlier run are
        reported and the pause state loaded before the caller sees the agent."""
        directory = state_dir_of(config)
        async with (
            new_http_session(POOL_STREAMS) as http,
            await Outbox.open(directory, keep_days=keep_days_of(config)) as outbox,
        ):
            agent = cls(
                config,
                identity,
                http=http,
                outbox=outbox,
                policy=policy or ReconnectPolicy(),
                timings=timings,
                clock=clock or Clock(),
                notifier=notifier or Notifier.from_env(),
                telemetry=telemetry or GpuTelemetry(),
            )
            await agent.jobs.report_orphans()
            agent.pause.load()
            yield agent

    # --- what the coordinator is told ------------------------------------------------------------

    def capabilities(self, *, sent: bool = False) -> Capabilities:
        """protocol.md §2 and §9: each model's `max_concurrent` is the sum of its routes' limits.
        What is `sent` is remembered, so that a limit that moves is pushed (`keep_offer`)."""
        pause = self.pause.paused
        now = self.clock.now()
        routes = self.serving_routes()
        message = capabilities_message(
            self.config,
            routes,
            draining=self.draining,
            measured=self.measured.snapshot(now),
            paused=pause is not None,
            paused_until=utc_ms(pause.until) if pause and pause.until is not None else None,
            model_limits=self.limits.model_limits(routes, now),
        )
        if sent:
            self._advertised = {offer.model_id: offer.max_concurrent for offer in message.models}
        return message

    def heartbeat(self) -> Heartbeat:
        """The job window's figures, the last GPU sample (never waits for NVML) and each served
        route's limit (§9)."""
        now = self.clock.now()
        beat = self.stats.heartbeat(now)
        in_flight = self.jobs.load.routes
        routes = [route for found in self.serving_routes().values() for route in found]
        backends = [
            RouteBeat(
                backend=shown.backend,
                model=shown.native_id,
                limit=shown.advertised,
                in_flight=in_flight.get((shown.backend, shown.native_id), 0),
                ttfb_baseline_ms=None
                if shown.baseline_s is None
                else round(shown.baseline_s * 1000, 1),
            )
            for shown in self.limits.shown(routes, now)
        ]
        return beat.model_copy(update={"gpus": self.telemetry.latest, "backends": backends or None})

    async def keep_offer(self) -> None:
        """A model's learned `max_concurrent` that moved by more than one since it was
        advertised is pushed out of cycle, at most once per `out_of_cycle_pass_s` (§9)."""
        spacing_s = self.timings.out_of_cycle_pass_s
        last_push = -spacing_s
        while True:
            await self._limits_moved.wait()
            self._limits_moved = anyio.Event()
            await self.clock.sleep(max(0.0, last_push + spacing_s - self.clock.now()))
            now = self.clock.now()
            current = self.limits.model_limits(self.serving_routes(), now)
            if offer_moved(self._advertised, current):
                last_push = now
                log.info("route limits moved: capabilities pushed")
                self.push_capabilities()

    def serving_routes(self) -> Mapping[str, Sequence[Route]]:
        """The catalog's routes less those withdrawn for failing jobs."""
        return self.routes.health.serving(self.catalog.routes)

    def advertising(self) -> Advertising:
        """Stopping wins over paused: a paused agent that is stopping refuses `shutting_down`."""
        if self.draining:
            return "draining"
        return "paused" if self.pause.paused is not None else "ready"

    def push_capabilities(self) -> None:
        """What is advertised changed: tell the coordinator now, and systemd's status line."""
        self.session.push(self.capabilities(sent=True))
        self.notify_status()

    def notify_status(self) -> None:
        """systemd's one-line STATUS=: session state and what is advertised."""
        self.notifier.status(
            f"session {self.session.state.value}; {len(self.catalog.routes)} model(s) "
            f"advertised; {self.jobs.in_flight} in flight"
        )

    # --- news between the parts ------------------------------------------------------------------

    async def refresh(self) -> None:
        """One discovery pass; swap the catalog in; tell the coordinator (also when unchanged:
        it may have lost state)."""
        result = await self.discovery.run()
        self.metrics.discovery_pass(result.duration_ms / 1000, datetime.now(UTC))
        for report in result.reports:
            if report.probe_skipped:
                self.metrics.probe_skipped(report.name)
        self.catalog = result.catalog
        self.limits.forget_all_but(r.key for found in result.catalog.routes.values() for r in found)
        self.push_capabilities()

    def apply(self, config: Config, identity: Identity) -> None:
        """A reloaded config (and identity): new limits, backends and prices count now; a new
        coordinator url or identity reconnects."""
        must_reconnect = config.coordinator.url != self.config.coordinator.url or (
            identity is not self.identity
        )
        self.config, self.identity = config, identity
        self.window.limit = config.limits.max_tokens_per_minute
        self.registry = Registry.build(config, self.registry.http)
        self.session.identity = identity
        if must_reconnect:
            log.info("coordinator url or identity changed: reconnecting")
            self.session.reconnect()
        else:
            self.session.push(self.capabilities(sent=True))
        self.passes.request()  # new or changed backends: with the next out-of-cycle pass

    def _limit_moved(self) -> None:
        self._limits_moved.set()  # the event of now: `keep_offer` replaces it after each wake

    def _backend_failed(self, backend: str) -> None:
        if self.passes.request_for_failure():
            log.info("backend failed a job, discovery pass requested backend=%s", backend)

    def _streaming(self, backend: str) -> int:
        return sum(
            1
            for r in self.jobs.running.values()
            if r.route is not None
            and r.route.backend == backend
            and r.first_byte_at is not None
            and not r.route_left
        )

    def _session_ended(self, fault: Fault | None) -> None:
        cause = fault.kind.value if fault is not None else "requested"
        self.metrics.session_ended(cause, fault.detail if fault else None, datetime.now(UTC))
        self.notify_status()  # `systemctl status` shows the lost link now, not at the next tick

    # --- what the operator sees ------------------------------------------------------------------

    async def snapshot(self) -> AgentStatus:
        """The running agent as `/status` shows it (and as `/metrics`' gauges are set)."""
        metrics = self.metrics
        now = self.clock.now()
        session = self.session
        state = session.state.value
        authenticated = session.authenticated
        connected_at = session.core.authenticated_at
        capabilities = self.capabilities()
        latest = self.discovery.latest
        if latest is not None:
            backends = [
                BackendStatus(
                    name=report.name,
                    kind=report.kind,
                    healthy=report.ok,
                    latency_ms=report.health.latency_ms,
                    models_listed=len(report.models),
                    error=printable(report.error, 300) if report.error else None,
                    probe_skipped=report.probe_skipped,
                )
                for report in latest.reports
            ]
        else:
            backends = [
                BackendStatus(name=b.label, kind=b.kind, healthy=False, error="not probed yet")
                for b in self.config.backends
            ]
        models = [
            ModelStatus(
                model_id=model_id,
                context_window=found[0].context_window if found else None,
                formats=sorted({fmt for route in found for fmt in route.formats}),
                routes=[
                    RouteStatus(
                        backend=r.backend,
                        native_id=r.native_id,
                        priority=r.priority,
                        limit=shown.advertised,
                        ceiling=shown.ceiling,
                        ttfb_baseline_ms=None
                        if shown.baseline_s is None
                        else round(shown.baseline_s * 1000, 1),
                    )
                    for r, shown in zip(found, self.limits.shown(found, now), strict=True)
                ],
            )
            for model_id, found in sorted(self.catalog.routes.items())
        ]
        executor = self.jobs
        running = sorted(executor.running.values(), key=lambda r: r.received_at)
        beat = self.heartbeat()
        jobs = JobsStatus(
            in_flight=len(running),
            max_concurrent=self.config.limits.max_concurrent,
            running=[
                RunningJob(
                    job_id=r.job.job_id,
                    model_id=r.job.model_id,
                    backend=r.route.backend if r.route is not None else None,
                    age_s=round(max(0.0, executor.clock() - r.received_at), 3),
                    bytes_relayed=r.relayed,
                )
                for r in running[:RUNNING_LISTED]
            ],
            tokens_per_sec_p50=beat.tokens_per_sec_p50,
            p50_ttfb_ms=beat.p50_latency_ms,
            p95_ttfb_ms=beat.p95_latency_ms,
            error_rate_60s=beat.error_rate_60s,
        )
        try:
            depth, oldest = await self.outbox.depth()
            outbox = OutboxStatus(depth=depth, oldest_age_s=oldest)
        except OutboxError as exc:
            outbox = OutboxStatus(depth=None, error=str(exc))
        window = self.window
        pause = self.pause.view()
        return AgentStatus(
            agent_version=__version__,
            provider_id=session.core.provider_id or self.identity.provider_id,
            advertising=capabilities.metadata.status,
            models_advertised=len(capabilities.models),
            uptime_s=round(time.monotonic() - metrics.started_monotonic, 3),
            started_at=utc_ms(metrics.started_at),
            readiness=readiness(
                authenticated=authenticated,
                session_state=state,
                passes=0 if latest is None else 1,
                healthy=sum(1 for b in backends if b.healthy),
                backends=len(backends),
                store_problem=executor.store_problem,
            ),
            session=SessionStatus(
                state=state,
                authenticated=authenticated,
                connected_for_s=round(session.clock() - connected_at, 3)
                if connected_at is not None and authenticated
                else None,
                attempts=session.attempts,
                reconnects=metrics.reconnect_count,
            ),
            backends=backends,
            last_pass_at=utc_ms(metrics.last_pass_at) if metrics.last_pass_at else None,
            models=models,
            jobs=jobs,
            outbox=outbox,
            rate_window=RateWindowStatus(
                tokens_last_60s=window.total(now),
                limit=window.limit,
                fill=round(window.fill(now), 4),
            ),
            last_errors=list(metrics.last_errors),
            paused=PauseStatus(**pause.model_dump()) if pause is not None else None,
            gpus=self._gpus(),
            withdrawn_routes=self._withdrawn_routes(now),
        )

    def _gpus(self) -> list[GpuStatus]:
        """The last GPU sample (never waits for NVML), with why each unhealthy one is."""
        telemetry = self.telemetry
        return [
            GpuStatus(
                **gpu.model_dump(),
                faults=[printable(fault, 300) for fault in telemetry.faults.get(gpu.index, ())],
            )
            for gpu in telemetry.latest or ()
        ]

    def _withdrawn_routes(self, now: float) -> list[WithdrawnRoute]:
        """Routes withdrawn for failing jobs, the longest withdrawn first (times on the agent's
        clock, shown as wall-clock time)."""
        wall = datetime.now(UTC)
        return [
            WithdrawnRoute(
                backend=entry.route.backend,
                model=printable(entry.route.native_id, 300),
                since=utc_ms(wall - timedelta(seconds=max(0.0, now - entry.since))),
                last_code=entry.last_code,
                probes=entry.probes,
                next_probe_in_s=round(max(0.0, entry.next_probe_at - now), 1),
            )
            for entry in sorted(self.routes.health.withdrawn.values(), key=lambda w: w.since)
        ]
