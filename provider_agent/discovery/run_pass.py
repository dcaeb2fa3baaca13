"""One discovery pass: probe every backend at once under a budget, then build the catalog.

The I/O half of discovery. Each backend gets `discovery.timeout_s` for health + listing +
formats; one slow or black-holed backend never delays the others beyond that. A backend that
fails is left out with one warning line naming it and why; the pass itself never fails.
`Discovery` adds the single-flight guard: concurrent requests share the pass in flight, and
spares backends whose jobs show them healthy (`health.healthy_by_traffic`): their last listing is
reused instead of probing them, so a pass never interrupts a busy backend's streams.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import anyio

from provider_agent.backends import Registry
from provider_agent.backends.base import Backend
from provider_agent.config.schema import BackendConfig, Config, WireFormat
from provider_agent.discovery.catalog import BackendSeen, Catalog, build
from provider_agent.discovery.listing import Health, ModelInfo
from provider_agent.errors import BackendError
from provider_agent.jobs.route_health import Traffic, healthy_by_traffic
from provider_agent.safe_text import printable

log = logging.getLogger(__name__)
#: A warning quotes at most this much of a reason (a 256-character model id and a name fit).
LOG_TEXT_LIMIT = 1000


@dataclass(frozen=True)
class BackendReport:
    """What one backend answered in a pass (for the `discover` table and `/status`)."""

    name: str
    kind: str
    health: Health
    models: tuple[ModelInfo, ...] = ()
    formats: frozenset[WireFormat] = frozenset()
    error: str | None = None
    #: When the pass that listed these models started (the pass's clock).
    listed_at: float | None = None
    #: Not probed in this pass: its jobs showed it healthy, and the last listing was reused.
    probe_skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PassResult:
    catalog: Catalog
    reports: tuple[BackendReport, ...]
    duration_ms: float


async def probe(backend: Backend, budget_s: float) -> BackendReport:
    """Health, then formats, then models, all within `budget_s`. Never raises. The listing comes
    last so that an adapter with optional per-model details (Ollama's `/api/show`) can spend
    what is left of the budget on them and still answer with the models it knows."""
    started = time.perf_counter()
    health = Health(False, 0.0, None)
    with anyio.move_on_after(budget_s) as scope:
        try:
            health = await backend.health()
            if not health.ok:
                return _failed(backend, health, health.error or "unhealthy")
            formats = await backend.formats()
            models = tuple(await backend.list_models())
        except BackendError as exc:
            return _failed(backend, health, str(exc))
        except Exception as exc:  # a backend's garbage must never kill the pass
            log.debug("probe of %s raised", printable(backend.name), exc_info=True)
            why = f"unexpected answer ({type(exc).__name__}: {printable(exc)})"
            return _failed(backend, health, why)
        return BackendReport(backend.name, backend.config.kind, health, models, formats)
    assert scope.cancelled_caught
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    return _failed(
        backend,
        Health(False, elapsed, "timeout"),
        f"no complete answer within {budget_s:g}s (discovery.timeout_s)",
    )


def _failed(backend: Backend, health: Health, why: str) -> BackendReport:
    return BackendReport(backend.name, backend.config.kind, health, error=why)


async def run_pass(
    config: Config,
    http: aiohttp.ClientSession,
    reuse: Mapping[str, BackendReport] | None = None,
    clock: Callable[[], float] = anyio.current_time,
) -> PassResult:
    """One pass over adapters built for it (the commands that run a single pass)."""
    return await pass_over(config, Registry.build(config, http), reuse, clock)


async def pass_over(
    config: Config,
    registry: Registry,
    reuse: Mapping[str, BackendReport] | None = None,
    clock: Callable[[], float] = anyio.current_time,
) -> PassResult:
    """Probe all configured backends concurrently through the registry's adapters (built once
    per config, the ones jobs use) and build the catalog from the healthy ones. A backend whose
    label is in `reuse` is not probed: that report stands for it."""
    started = time.perf_counter()
    listed_at = clock()
    budget = config.discovery.timeout_s
    backends = list(registry)
    reports: list[BackendReport | None] = [None] * len(backends)
    reuse = reuse or {}

    async def probe_into(index: int, backend: Backend) -> None:
        report = await probe(backend, budget)
        reports[index] = dataclasses.replace(report, listed_at=listed_at) if report.ok else report

    async with anyio.create_task_group() as group:
        for index, backend in enumerate(backends):
            kept = reuse.get(backend.name)
            if kept is not None:
                log.debug(
                    "backend not probed: its jobs show it healthy, listing of %.0fs ago reused "
                    "backend=%s",
                    listed_at - (kept.listed_at or listed_at),
                    printable(backend.name),
                )
                reports[index] = dataclasses.replace(kept, probe_skipped=True)
            else:
                group.start_soon(probe_into, index, backend)

    done = tuple(r for r in reports if r is not None)
    for report in done:
        if not report.ok:
            log.warning(
                "backend left out backend=%s reason=%s",
                printable(report.name),
                printable(report.error, LOG_TEXT_LIMIT),
            )
    seen = [
        BackendSeen(index, config.backends[index], report.models, report.formats)
        for index, report in enumerate(done)
        if report.ok
    ]
    catalog = build(config, seen)
    for reason in catalog.dropped:
        log.warning("model left out: %s", printable(reason, LOG_TEXT_LIMIT))
    duration = round((time.perf_counter() - started) * 1000, 1)
    log.info(
        "discovery pass done backends_ok=%d/%d models=%d duration_ms=%s%s",
        len(seen),
        len(done),
        len(catalog.routes),
        duration,
        f" not_probed={len(reuse)}" if reuse else "",
    )
    return PassResult(catalog, done, duration)


@dataclass
class _Flight:
    done: anyio.Event
    result: PassResult | None = None


class Discovery:
    """Single-flight passes: whoever asks while a pass runs gets that pass's result.

    The periodic loop, every `auth_ok`, SIGHUP and failing jobs all ask for passes; without the
    guard a reconnect storm would probe every backend once per request. `traffic`, when given,
    says what a backend's jobs showed (by label): a backend healthy by that evidence keeps its
    last listing for up to `discovery.interval_s` instead of being probed.
    """

    def __init__(
        self,
        registry: Callable[[], Registry],
        config: Callable[[], Config],
        *,
        traffic: Callable[[str], Traffic] | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._registry = registry
        self._config = config
        self._traffic = traffic
        self._clock = clock
        self._flight: _Flight | None = None
        #: The last good listing of each backend, with the config it was taken under.
        self._listings: dict[str, tuple[BackendConfig, BackendReport]] = {}
        self.latest: PassResult | None = None
        self.passes = 0

    async def run(self) -> PassResult:
        while (flight := self._flight) is not None:
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
            # The pass we waited on was cancelled with its caller: run one ourselves.
        flight = self._flight = _Flight(anyio.Event())
        try:
            config = self._config()
            registry = self._registry()
            result = await pass_over(config, registry, self._reusable(config), self._clock)
            self._keep(config, result)
            flight.result = self.latest = result
            self.passes += 1
            return flight.result
        finally:
            self._flight = None
            flight.done.set()

    def _reusable(self, config: Config) -> dict[str, BackendReport]:
        """The last listings that stand in for a probe in this pass (a backend whose config
        changed since is probed)."""
        if self._traffic is None:
            return {}
        now = self._clock()
        reuse: dict[str, BackendReport] = {}
        for backend in config.backends:
            kept = self._listings.get(backend.label)
            if kept is None or kept[0] != backend:
                continue
            report = kept[1]
            traffic = self._traffic(backend.label)
            if healthy_by_traffic(traffic, report.listed_at, now, config.discovery.interval_s):
                reuse[backend.label] = report
        return reuse

    def _keep(self, config: Config, result: PassResult) -> None:
        listings: dict[str, tuple[BackendConfig, BackendReport]] = {}
        for backend, report in zip(config.backends, result.reports, strict=True):
            if report.ok:
                listings[backend.label] = (
                    backend,
                    dataclasses.replace(report, probe_skipped=False),
                )
        self._listings = listings
