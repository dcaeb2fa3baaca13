"""PURE: the `/status` object (what `status --json` prints) and the readiness rule of `/readyz`.

The HTTP endpoint (`http_api`) gathers a snapshot of the running agent into `AgentStatus`; the
`status` command reads it back with the same model. Nothing here does I/O, and nothing here may
ever hold a secret: backends are named by their label, never by a key or its variable's value.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Part(BaseModel):
    # Unknown fields are ignored: a newer agent's `/status` still reads with an older `status`.
    model_config = ConfigDict(extra="ignore", frozen=True)


class SessionStatus(_Part):
    state: str
    authenticated: bool
    #: Seconds since the current session's `auth_ok` (None while not authenticated).
    connected_for_s: float | None = None
    #: Connection attempts since the agent started (the first dial counts).
    attempts: int = 0
    reconnects: int = 0


class BackendStatus(_Part):
    name: str
    kind: str
    healthy: bool
    latency_ms: float | None = None
    models_listed: int = 0
    error: str | None = None
    #: The last pass did not probe it: its jobs showed it healthy, its last listing was reused.
    probe_skipped: bool = False


class RouteStatus(_Part):
    backend: str
    native_id: str
    priority: int
    #: protocol.md §9: the route's concurrency limit now, its ceiling, its unloaded baseline.
    limit: int | None = None
    ceiling: int | None = None
    ttfb_baseline_ms: float | None = None


class ModelStatus(_Part):
    model_id: str
    context_window: int | None = None
    formats: list[str]
    routes: list[RouteStatus]


class RunningJob(_Part):
    job_id: str
    model_id: str
    backend: str | None = None
    age_s: float
    bytes_relayed: int


class JobsStatus(_Part):
    in_flight: int
    max_concurrent: int
    running: list[RunningJob] = []
    #: The heartbeat's window: medians and error rate over the last 60 s.
    tokens_per_sec_p50: float = 0.0
    p50_ttfb_ms: float = 0.0
    p95_ttfb_ms: float = 0.0
    error_rate_60s: float = 0.0


class OutboxStatus(_Part):
    #: Terminal frames the coordinator has not confirmed yet (None: the store could not say).
    depth: int | None
    oldest_age_s: float | None = None
    error: str | None = None


class RateWindowStatus(_Part):
    tokens_last_60s: int
    limit: int | None = None
    fill: float = 0.0


class ErrorNote(_Part):
    """One of the last errors an operator should see: a failed job or a dropped session."""

    at: str
    source: str
    code: str
    message: str


class PauseStatus(_Part):
    """The maintenance pause in force (`provider-agent pause`)."""

    since: str
    #: None: until `provider-agent resume`.
    until: str | None = None
    left_s: float | None = None
    reason: str | None = None


class GpuStatus(_Part):
    """One GPU in the last telemetry sample (the heartbeat's `gpus`); memory in MiB."""

    index: int
    healthy: bool
    uuid: str | None = None
    name: str | None = None
    memory_used_mb: int | None = None
    memory_total_mb: int | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    #: Why it is unhealthy (empty when healthy).
    faults: list[str] = []


class WithdrawnRoute(_Part):
    """A route withdrawn because its last jobs failed on the serving side."""

    backend: str
    #: The backend's own id of the model.
    model: str
    since: str
    #: The protocol code of the failure that withdrew it.
    last_code: str | None = None
    probes: int = 0
    next_probe_in_s: float | None = None


class Readiness(_Part):
    ready: bool
    reason: str


class AgentStatus(_Part):
    agent_version: str
    provider_id: str | None = None
    #: What the capabilities say: `ready`, `draining` (stopping), …
    advertising: str
    #: Models in the capabilities now (0 while draining, although `models` keeps the routes).
    models_advertised: int
    uptime_s: float
    started_at: str
    readiness: Readiness
    session: SessionStatus
    backends: list[BackendStatus]
    #: When the backends were last probed (ISO 8601, UTC); None before the first pass ended.
    last_pass_at: str | None = None
    models: list[ModelStatus]
    jobs: JobsStatus
    outbox: OutboxStatus
    rate_window: RateWindowStatus
    last_errors: list[ErrorNote] = []
    #: The maintenance pause in force; None when not paused.
    paused: PauseStatus | None = None
    #: The last GPU sample (empty without GPU telemetry).
    gpus: list[GpuStatus] = []
    withdrawn_routes: list[WithdrawnRoute] = []


def readiness(
    *,
    authenticated: bool,
    session_state: str,
    passes: int,
    healthy: int,
    backends: int,
    store_problem: str | None = None,
) -> Readiness:
    """`/readyz`: ready only when authenticated to the coordinator with at least one backend
    healthy in the last discovery pass, and the outbox storing terminal frames (protocol.md §8);
    otherwise every reason, for the 503's body."""
    reasons: list[str] = []
    if store_problem is not None:
        reasons.append(store_problem)
    if not authenticated:
        reasons.append(f"not authenticated to the coordinator (session {session_state})")
    if passes == 0:
        reasons.append("the first discovery pass has not finished")
    elif backends == 0:
        reasons.append("no backends configured")
    elif healthy == 0:
        reasons.append(f"no healthy backend (0 of {backends} in the last discovery pass)")
    if reasons:
        return Readiness(ready=False, reason="not ready: " + "; ".join(reasons))
    return Readiness(
        ready=True, reason=f"ready: authenticated, {healthy} of {backends} backend(s) healthy"
    )
