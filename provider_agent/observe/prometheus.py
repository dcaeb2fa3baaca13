"""The Prometheus families of the HTTP endpoint's `/metrics` (`AgentMetrics`): counters and
histograms fed with each finished job (`heartbeat.JobStats` hands them on), and gauges (session
state, backends, outbox, …) set from a `/status` snapshot just before each scrape.
"""

from __future__ import annotations

import collections
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from provider_agent.clock import utc_ms
from provider_agent.link.protocol import SERVING_FAILURES
from provider_agent.observe.heartbeat import FinishedJob
from provider_agent.observe.status import ErrorNote
from provider_agent.safe_text import printable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from provider_agent.observe.status import AgentStatus

#: How many of the last errors `/status` keeps (newest first).
LAST_ERRORS = 20
#: Seconds; a local model's first byte is often under 100 ms, a cold BYOK route several seconds.
TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MIB = 2**20


class AgentMetrics:
    """The agent's own Prometheus families, in a registry of their own (beside the library's
    process, platform and GC collectors), plus the last errors `/status` shows.

    Counters and histograms move as things happen; gauges are set from a snapshot (`observe`)
    right before each scrape, so they never go stale between discovery passes. Labels are
    bounded by the config and the hardware: a backend's label, a protocol error code, a fault
    kind, a GPU's index and uuid; never a model id (a BYOK backend lists hundreds) and never a
    job id.
    """

    def __init__(self, *, process_collectors: bool = True) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            GCCollector,
            Histogram,
            Info,
            PlatformCollector,
            ProcessCollector,
            disable_created_metrics,
        )

        from provider_agent import __version__
        from provider_agent.link.state import State

        # No `*_created` series: they would double every family's size. (Untyped upstream.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry: CollectorRegistry = CollectorRegistry()
        registry = self.registry
        if process_collectors:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self._states = [state.value for state in State]
        self.started_at = datetime.now(UTC)
        self.started_monotonic = time.monotonic()
        self.last_errors: deque[ErrorNote] = deque(maxlen=LAST_ERRORS)
        self.last_pass_at: datetime | None = None
        self.passes = 0
        self.reconnect_count = 0
        prefix = "provider_agent_"
        info = Info(f"{prefix}build", "The running agent's version.", registry=registry)
        info.info({"version": __version__})
        self.session_state = Gauge(
            f"{prefix}session_state",
            "1 for the coordinator session's current state, 0 for the others.",
            ["state"],
            registry=registry,
        )
        self.reconnects = Counter(
            f"{prefix}session_reconnects",
            "Coordinator sessions that ended and were dialled again, by whose fault "
            "(network, coordinator, planned restart, local, requested by a reload).",
            ["cause"],
            registry=registry,
        )
        self.ready = Gauge(
            f"{prefix}ready",
            "1 when authenticated with at least one healthy backend (/readyz answers 200).",
            registry=registry,
        )
        self.pass_duration = Histogram(
            f"{prefix}discovery_pass_duration_seconds",
            "How long a discovery pass over every backend took.",
            buckets=PASS_BUCKETS,
            registry=registry,
        )
        self.backend_up = Gauge(
            f"{prefix}backend_up",
            "1 when the backend answered the last discovery pass in full, else 0.",
            ["backend", "kind"],
            registry=registry,
        )
        self.backend_latency = Gauge(
            f"{prefix}backend_latency_seconds",
            "The backend's health-probe latency in the last discovery pass.",
            ["backend", "kind"],
            registry=registry,
        )
        self.route_limit = Gauge(
            f"{prefix}route_concurrency_limit",
            "The concurrency limits of the backend's routes, summed (protocol.md §9: learned from"
            " each route's time to first byte, or its ceiling).",
            ["backend"],
            registry=registry,
        )
        self.route_baseline = Gauge(
            f"{prefix}route_ttfb_baseline_seconds",
            "The smallest unloaded time to first byte among the backend's routes (§9).",
            ["backend"],
            registry=registry,
        )
        self.models_advertised = Gauge(
            f"{prefix}models_advertised",
            "Models offered to the coordinator now (0 while draining).",
            registry=registry,
        )
        self.jobs = Counter(
            f"{prefix}jobs",
            "Jobs ended, by backend, outcome (done, error, refused) and protocol code "
            "(job_done for a success).",
            ["backend", "outcome", "code"],
            registry=registry,
        )
        self.in_flight = Gauge(f"{prefix}jobs_in_flight", "Jobs running now.", registry=registry)
        self.max_concurrent = Gauge(
            f"{prefix}jobs_max_concurrent",
            "limits.max_concurrent: jobs beyond it are refused.",
            registry=registry,
        )
        self.ttfb = Histogram(
            f"{prefix}job_time_to_first_byte_seconds",
            "From a job's arrival to the backend's first byte.",
            ["backend"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            f"{prefix}job_duration_seconds",
            "From a job's arrival to its terminal frame.",
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            f"{prefix}tokens",
            "Tokens of finished jobs as billed (reported by the backend, else estimated), "
            "by direction (input, output).",
            ["backend", "direction"],
            registry=registry,
        )
        self.relayed = Counter(
            f"{prefix}relayed_bytes",
            "Upstream bytes relayed to the coordinator, counted when each job ends.",
            ["backend"],
            registry=registry,
        )
        self.outbox_depth = Gauge(
            f"{prefix}outbox_depth",
            "Terminal frames written but not yet confirmed by the coordinator.",
            registry=registry,
        )
        self.outbox_oldest = Gauge(
            f"{prefix}outbox_oldest_age_seconds",
            "Age of the oldest unconfirmed terminal frame (0 when none waits).",
            registry=registry,
        )
        self.window_tokens = Gauge(
            f"{prefix}rate_window_tokens",
            "Tokens (input + output) in the last 60 s, as limits.max_tokens_per_minute counts.",
            registry=registry,
        )
        self.window_fill = Gauge(
            f"{prefix}rate_window_fill_ratio",
            "The 60 s token window against max_tokens_per_minute, 0..1 (0 without a limit); "
            "at 1 new jobs are refused with rate_limited.",
            registry=registry,
        )
        self._operations_families(registry, prefix)

    def _operations_families(self, registry: CollectorRegistry, prefix: str) -> None:
        """The pause, route health, discovery probes skipped and the GPUs."""
        from prometheus_client import Counter, Gauge

        self.paused = Gauge(
            f"{prefix}paused",
            "1 while paused for maintenance (`provider-agent pause`): no model is advertised.",
            registry=registry,
        )
        self.pause_started = Gauge(
            f"{prefix}pause_started_timestamp_seconds",
            "When the current pause began (Unix time; 0 when not paused).",
            registry=registry,
        )
        self.pause_ends = Gauge(
            f"{prefix}pause_ends_timestamp_seconds",
            "When the current pause ends by itself (Unix time; 0 when not paused or paused "
            "until `resume`).",
            registry=registry,
        )
        self.probes_skipped = Counter(
            f"{prefix}discovery_probes_skipped",
            "Discovery probes not made because the backend's jobs showed it healthy (its last "
            "listing was reused).",
            ["backend"],
            registry=registry,
        )
        self.withdrawals = Counter(
            f"{prefix}route_withdrawals",
            "Routes withdrawn from the capabilities because their last jobs failed on the "
            "serving side.",
            ["backend"],
            registry=registry,
        )
        self.restorations = Counter(
            f"{prefix}route_restorations",
            "Withdrawn routes brought back by a successful one-token completion.",
            ["backend"],
            registry=registry,
        )
        self.route_probes = Counter(
            f"{prefix}route_probes",
            "One-token completions through withdrawn routes, by result (ok, failed).",
            ["backend", "result"],
            registry=registry,
        )
        self.routes_withdrawn = Gauge(
            f"{prefix}routes_withdrawn",
            "Routes withdrawn now, by backend.",
            ["backend"],
            registry=registry,
        )
        gpu = ["index", "uuid"]
        self.gpu_memory_used = Gauge(
            f"{prefix}gpu_memory_used_bytes", "GPU memory in use.", gpu, registry=registry
        )
        self.gpu_memory_total = Gauge(
            f"{prefix}gpu_memory_total_bytes", "GPU memory in all.", gpu, registry=registry
        )
        self.gpu_utilization = Gauge(
            f"{prefix}gpu_utilization_ratio",
            "Share of the last sample period the GPU was busy, 0..1.",
            gpu,
            registry=registry,
        )
        self.gpu_temperature = Gauge(
            f"{prefix}gpu_temperature_celsius", "GPU core temperature.", gpu, registry=registry
        )
        self.gpu_power = Gauge(
            f"{prefix}gpu_power_watts", "GPU power draw.", gpu, registry=registry
        )
        self.gpu_healthy = Gauge(
            f"{prefix}gpu_healthy",
            "0 when the GPU had XID or new uncorrected ECC errors since the last sample, is at "
            "or above its slowdown temperature, or did not answer; else 1.",
            gpu,
            registry=registry,
        )
        self._gpu_gauges = (
            self.gpu_memory_used,
            self.gpu_memory_total,
            self.gpu_utilization,
            self.gpu_temperature,
            self.gpu_power,
            self.gpu_healthy,
        )

    # --- events ----------------------------------------------------------------------------------

    def job_finished(self, job: FinishedJob, at: datetime) -> None:
        backend = job.backend
        code = job.error_code
        self.jobs.labels(backend, "error" if code else "done", code or "job_done").inc()
        if job.time_to_first_byte_ms is not None:
            self.ttfb.labels(backend).observe(job.time_to_first_byte_ms / 1000)
        if job.duration_s is not None:
            self.duration.labels(backend).observe(job.duration_s)
        self.tokens.labels(backend, "input").inc(job.input_tokens)
        self.tokens.labels(backend, "output").inc(job.output_tokens)
        self.relayed.labels(backend).inc(job.relayed_bytes)
        if code in SERVING_FAILURES:
            where = f" on {backend}" if backend else ""
            message = f"job {printable(job.job_id, 128)}{where}: {printable(job.message, 300)}"
            self.last_errors.appendleft(
                ErrorNote(at=utc_ms(at), source="job", code=code or "", message=message)
            )

    def job_refused(self, job: FinishedJob) -> None:
        self.jobs.labels("", "refused", job.error_code or "").inc()

    def session_ended(self, cause: str, detail: str | None, at: datetime) -> None:
        """A coordinator session ended and will be dialled again; `cause` is the fault's kind
        (`requested` when a reload asked for it), `detail` its one line."""
        self.reconnect_count += 1
        self.reconnects.labels(cause).inc()
        if cause not in ("planned", "requested") and detail:
            note = ErrorNote(
                at=utc_ms(at), source="session", code=cause, message=printable(detail, 300)
            )
            self.last_errors.appendleft(note)

    def discovery_pass(self, duration_s: float, at: datetime) -> None:
        self.passes += 1
        self.last_pass_at = at
        self.pass_duration.observe(duration_s)

    def probe_skipped(self, backend: str) -> None:
        self.probes_skipped.labels(backend).inc()

    def route_withdrawn(self, backend: str) -> None:
        self.withdrawals.labels(backend).inc()

    def route_probed(self, backend: str, *, ok: bool, restored: bool) -> None:
        self.route_probes.labels(backend, "ok" if ok else "failed").inc()
        if restored:
            self.restorations.labels(backend).inc()

    # --- gauges, from a snapshot -----------------------------------------------------------------

    def observe(self, status: AgentStatus) -> None:
        """Set every gauge from the snapshot `/status` also serves."""
        for state in self._states:
            self.session_state.labels(state).set(1 if state == status.session.state else 0)
        self.ready.set(1 if status.readiness.ready else 0)
        self.backend_up.clear()
        self.backend_latency.clear()
        for backend in status.backends:
            self.backend_up.labels(backend.name, backend.kind).set(1 if backend.healthy else 0)
            if backend.latency_ms is not None:
                self.backend_latency.labels(backend.name, backend.kind).set(
                    backend.latency_ms / 1000
                )
        self._observe_limits(status)
        self.models_advertised.set(status.models_advertised)
        self.in_flight.set(status.jobs.in_flight)
        self.max_concurrent.set(status.jobs.max_concurrent)
        self.outbox_depth.set(status.outbox.depth or 0)
        self.outbox_oldest.set(status.outbox.oldest_age_s or 0.0)
        self.window_tokens.set(status.rate_window.tokens_last_60s)
        self.window_fill.set(status.rate_window.fill)
        self.paused.set(1 if status.paused is not None else 0)
        self.pause_started.set(_unix(status.paused.since) if status.paused else 0)
        self.pause_ends.set(_unix(status.paused.until) if status.paused else 0)
        self.routes_withdrawn.clear()
        withdrawn = collections.Counter(route.backend for route in status.withdrawn_routes)
        for name, count in withdrawn.items():
            self.routes_withdrawn.labels(name).set(count)
        for gauge in self._gpu_gauges:
            gauge.clear()
        for gpu in status.gpus:
            labels = (str(gpu.index), gpu.uuid or "")
            self.gpu_healthy.labels(*labels).set(1 if gpu.healthy else 0)
            if gpu.memory_used_mb is not None:
                self.gpu_memory_used.labels(*labels).set(gpu.memory_used_mb * MIB)
            if gpu.memory_total_mb is not None:
                self.gpu_memory_total.labels(*labels).set(gpu.memory_total_mb * MIB)
            if gpu.utilization_pct is not None:
                self.gpu_utilization.labels(*labels).set(gpu.utilization_pct / 100)
            if gpu.temperature_c is not None:
                self.gpu_temperature.labels(*labels).set(gpu.temperature_c)
            if gpu.power_w is not None:
                self.gpu_power.labels(*labels).set(gpu.power_w)

    def _observe_limits(self, status: AgentStatus) -> None:
        limits: collections.Counter[str] = collections.Counter()
        baselines: dict[str, float] = {}
        for model in status.models:
            for route in model.routes:
                if route.limit is not None:
                    limits[route.backend] += route.limit
                if route.ttfb_baseline_ms is not None:
                    seconds = route.ttfb_baseline_ms / 1000
                    baselines[route.backend] = min(baselines.get(route.backend, seconds), seconds)
        self.route_limit.clear()
        self.route_baseline.clear()
        for name, total in limits.items():
            self.route_limit.labels(name).set(total)
        for name, seconds in baselines.items():
            self.route_baseline.labels(name).set(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of the registry, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _unix(stamp: str | None) -> float:
    """An ISO 8601 UTC stamp as `utc_ms` writes it, as Unix seconds (0 for none or garbage)."""
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0
    except ValueError:
        return 0.0
