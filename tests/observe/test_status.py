"""The pure pieces behind the endpoint: readiness, the Prometheus families fed by events and by
a snapshot, and `status` as a person reads it (foreign text escaped)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from provider_agent.observe.heartbeat import FinishedJob, JobStats
from provider_agent.observe.prometheus import LAST_ERRORS, AgentMetrics
from provider_agent.observe.status import (
    AgentStatus,
    BackendStatus,
    ErrorNote,
    GpuStatus,
    JobsStatus,
    ModelStatus,
    OutboxStatus,
    PauseStatus,
    RateWindowStatus,
    Readiness,
    RouteStatus,
    RunningJob,
    SessionStatus,
    WithdrawnRoute,
    readiness,
)
from provider_agent.ops.render import render_status

AT = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ((True, "authenticated", 3, 1, 2), "ready: authenticated, 1 of 2 backend(s) healthy"),
        (
            (False, "idle", 3, 2, 2),
            "not ready: not authenticated to the coordinator (session idle)",
        ),
        ((True, "authenticated", 0, 0, 2), "not ready: the first discovery pass has not finished"),
        ((True, "authenticated", 1, 0, 0), "not ready: no backends configured"),
        (
            (False, "connecting", 1, 0, 3),
            "not ready: not authenticated to the coordinator (session connecting); "
            "no healthy backend (0 of 3 in the last discovery pass)",
        ),
    ],
)
def test_readiness(facts: tuple[bool, str, int, int, int], expected: str) -> None:
    authenticated, state, passes, healthy, backends = facts
    ready = readiness(
        authenticated=authenticated,
        session_state=state,
        passes=passes,
        healthy=healthy,
        backends=backends,
    )
    assert ready.reason == expected
    assert ready.ready is expected.startswith("ready")


def samples(metrics: AgentMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def job(code: str | None = None, job_id: str = "j1") -> FinishedJob:
    return FinishedJob(
        1.0,
        40.0,
        5,
        1.0,
        code,
        backend="b",
        input_tokens=7,
        duration_s=1.5,
        relayed_bytes=100,
        job_id=job_id,
        message="" if code is None else "upstream said no",
    )


def test_job_events_move_the_counters_and_only_serving_failures_are_noted() -> None:
    metrics = AgentMetrics(process_collectors=False)
    stats = JobStats(metrics)
    for code in (None, None, "backend_error", "cancelled"):
        stats.job_started()
        stats.job_finished(job(code), wall_clock=AT)
    stats.job_refused(FinishedJob(2.0, None, 0, 0.0, "out_of_capacity"))
    seen = samples(metrics)

    def count(**labels: str) -> float:
        return seen.get(("provider_agent_jobs_total", frozenset(labels.items())), 0.0)

    assert count(backend="b", outcome="done", code="job_done") == 2
    assert count(backend="b", outcome="error", code="backend_error") == 1
    assert count(backend="b", outcome="error", code="cancelled") == 1
    assert count(backend="", outcome="refused", code="out_of_capacity") == 1
    by_backend = frozenset({("backend", "b")})
    assert seen[("provider_agent_tokens_total", by_backend | {("direction", "output")})] == 20
    assert seen[("provider_agent_tokens_total", by_backend | {("direction", "input")})] == 28
    assert seen[("provider_agent_relayed_bytes_total", by_backend)] == 400
    assert seen[("provider_agent_job_duration_seconds_count", by_backend)] == 4
    assert seen[("provider_agent_job_time_to_first_byte_seconds_sum", by_backend)] == 0.16
    (note,) = metrics.last_errors  # cancelled is the client's doing, not an error to look at
    assert note == ErrorNote(
        at="2026-11-23T12:00:00.000Z",
        source="job",
        code="backend_error",
        message="job j1 on b: upstream said no",
    )


def test_last_errors_are_bounded_newest_first_and_escaped() -> None:
    metrics = AgentMetrics(process_collectors=False)
    for index in range(LAST_ERRORS + 5):
        metrics.job_finished(job("backend_timeout", job_id=f"j{index}"), AT)
    metrics.session_ended("network", "cannot connect (refused)\x1b[2J", AT)
    metrics.session_ended("planned", "coordinator restarting (close code 1012)", AT)
    metrics.session_ended("requested", None, AT)
    notes = list(metrics.last_errors)
    assert len(notes) == LAST_ERRORS
    assert notes[0].source == "session" and notes[0].code == "network"
    assert "\x1b" not in notes[0].message and "\\x1b[2J" in notes[0].message
    assert notes[1].message.startswith(f"job j{LAST_ERRORS + 4} ")
    seen = samples(metrics)
    for cause in ("network", "planned", "requested"):
        key = ("provider_agent_session_reconnects_total", frozenset({("cause", cause)}))
        assert seen[key] == 1
    assert metrics.reconnect_count == 3


def status(**changes: object) -> AgentStatus:
    base = AgentStatus(
        agent_version="0.1.0",
        provider_id="prov_1",
        advertising="ready",
        models_advertised=1,
        uptime_s=3725.0,
        started_at="2026-11-23T11:00:00.000Z",
        readiness=Readiness(ready=True, reason="ready: authenticated, 1 of 2 backend(s) healthy"),
        session=SessionStatus(
            state="authenticated", authenticated=True, connected_for_s=65, attempts=2, reconnects=1
        ),
        backends=[
            BackendStatus(name="gpu", kind="vllm", healthy=True, latency_ms=2.4, models_listed=1),
            BackendStatus(
                name="evil\x1b[31m", kind="ollama", healthy=False, error="refused\r\nforged line"
            ),
        ],
        last_pass_at="2026-11-23T12:00:00.000Z",
        models=[
            ModelStatus(
                model_id="m\x07",
                context_window=4096,
                formats=["openai"],
                routes=[RouteStatus(backend="gpu", native_id="m", priority=0)],
            )
        ],
        jobs=JobsStatus(
            in_flight=1,
            max_concurrent=8,
            running=[
                RunningJob(job_id="j1", model_id="m", backend="gpu", age_s=2, bytes_relayed=9)
            ],
        ),
        outbox=OutboxStatus(depth=2, oldest_age_s=1.5),
        rate_window=RateWindowStatus(tokens_last_60s=500, limit=1000, fill=0.5),
        last_errors=[ErrorNote(at="t", source="job", code="backend_error", message="x\x1b[0m")],
    )
    return base.model_copy(update=changes)


def test_status_for_a_person_escapes_foreign_text() -> None:
    text = render_status(status())
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "evil\\x1b[31m" in text and "refused\\r\\nforged line" in text
    assert "session: authenticated for 1m 05s (2 connection attempt(s), 1 reconnect(s))" in text
    assert "up 1h 02m" in text and "outbox: 2 terminal frame(s) unconfirmed, oldest 1.5s" in text
    assert "rate window: 500 tokens in the last 60 s of 1000 (50%)" in text
    assert "jobs: 1 in flight of 8" in text and "j1" in text
    assert "last errors (newest first):" in text
    quiet = render_status(
        status(backends=[], models=[], last_errors=[], outbox=OutboxStatus(depth=None, error="x"))
    )
    assert "(no backends configured)" in quiet and "(no model to serve)" in quiet
    assert "last errors" not in quiet and "outbox: unknown (x)" in quiet


def test_observe_sets_gauges_and_forgets_removed_backends() -> None:
    metrics = AgentMetrics(process_collectors=False)
    metrics.observe(status())
    first = samples(metrics)
    metrics.observe(status(backends=[], session=SessionStatus(state="idle", authenticated=False)))
    second = samples(metrics)
    up = "provider_agent_backend_up"
    assert first[(up, frozenset({("backend", "gpu"), ("kind", "vllm")}))] == 1
    assert first[(up, frozenset({("backend", "evil\x1b[31m"), ("kind", "ollama")}))] == 0
    assert not any(name == up for name, _ in second)
    state = "provider_agent_session_state"
    assert first[(state, frozenset({("state", "authenticated")}))] == 1
    assert second[(state, frozenset({("state", "authenticated")}))] == 0
    assert second[(state, frozenset({("state", "idle")}))] == 1
    assert first[("provider_agent_outbox_depth", frozenset())] == 2
    assert first[("provider_agent_rate_window_fill_ratio", frozenset())] == 0.5


def test_observe_sets_the_pause_route_and_gpu_gauges_and_drops_what_went_away() -> None:
    metrics = AgentMetrics(process_collectors=False)
    gpus = [
        GpuStatus(index=0, healthy=True, uuid="GPU-a", memory_used_mb=2, utilization_pct=50),
        GpuStatus(index=1, healthy=False),  # not answering: identified, nothing else
    ]
    withdrawn = [
        WithdrawnRoute(backend="gpu", model="m", since="t"),
        WithdrawnRoute(backend="gpu", model="n", since="t"),
        WithdrawnRoute(backend="byok", model="x/y", since="t"),
    ]
    paused = PauseStatus(since="2026-12-07T01:00:00.000Z", until="2026-12-07T03:00:00.500Z")
    metrics.observe(status(paused=paused, gpus=gpus, withdrawn_routes=withdrawn))
    first = samples(metrics)
    metrics.observe(status(paused=PauseStatus(since="garbage")))
    open_ended = samples(metrics)
    metrics.observe(status())
    second = samples(metrics)
    assert first[("provider_agent_paused", frozenset())] == 1
    assert second[("provider_agent_paused", frozenset())] == 0
    started, ends = (
        "provider_agent_pause_started_timestamp_seconds",
        "provider_agent_pause_ends_timestamp_seconds",
    )
    assert (first[(started, frozenset())], first[(ends, frozenset())]) == (1796605200, 1796612400.5)
    assert (open_ended[(started, frozenset())], open_ended[(ends, frozenset())]) == (0, 0)
    assert (second[(started, frozenset())], second[(ends, frozenset())]) == (0, 0)
    routes = "provider_agent_routes_withdrawn"
    assert first[(routes, frozenset({("backend", "gpu")}))] == 2
    assert first[(routes, frozenset({("backend", "byok")}))] == 1
    gpu0, gpu1 = (
        frozenset({("index", "0"), ("uuid", "GPU-a")}),
        frozenset({("index", "1"), ("uuid", "")}),
    )
    assert first[("provider_agent_gpu_memory_used_bytes", gpu0)] == 2 * 2**20
    assert first[("provider_agent_gpu_utilization_ratio", gpu0)] == 0.5
    assert first[("provider_agent_gpu_healthy", gpu0)] == 1
    assert first[("provider_agent_gpu_healthy", gpu1)] == 0
    assert ("provider_agent_gpu_temperature_celsius", gpu1) not in first  # not reported
    for name, _ in second:
        assert name != routes and not name.startswith("provider_agent_gpu_")


def test_metrics_label_values_never_carry_a_model_id() -> None:
    metrics = AgentMetrics(process_collectors=False)
    withdrawn = [WithdrawnRoute(backend="gpu", model="secret-model-id", since="t")]
    metrics.observe(status(withdrawn_routes=withdrawn))
    metrics.route_withdrawn("gpu")
    metrics.route_probed("gpu", ok=True, restored=True)
    metrics.probe_skipped("gpu")
    body, _ = metrics.exposition()
    assert b"secret-model-id" not in body and b"m\x07" not in body
    seen = samples(metrics)
    assert seen[("provider_agent_route_withdrawals_total", frozenset({("backend", "gpu")}))] == 1
    assert seen[("provider_agent_route_restorations_total", frozenset({("backend", "gpu")}))] == 1
    probes = frozenset({("backend", "gpu"), ("result", "ok")})
    assert seen[("provider_agent_route_probes_total", probes)] == 1
    skipped = frozenset({("backend", "gpu")})
    assert seen[("provider_agent_discovery_probes_skipped_total", skipped)] == 1


def test_status_for_a_person_shows_the_pause_withdrawn_routes_and_gpus_escaped() -> None:
    text = render_status(
        status(
            paused=PauseStatus(since="2026-11-23T11:00:00Z", reason="new\x1b[2Jdriver"),
            withdrawn_routes=[
                WithdrawnRoute(
                    backend="gpu",
                    model="m\x07",
                    since="2026-11-23T11:30:00.000Z",
                    last_code="backend_error",
                    probes=4,
                    next_probe_in_s=12,
                )
            ],
            gpus=[
                GpuStatus(index=0, healthy=False, name="H\x1b[0m", faults=["XID 79\r\nforged"]),
            ],
            backends=[
                BackendStatus(name="gpu", kind="vllm", healthy=True, probe_skipped=True),
            ],
        )
    )
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert (
        "\npaused: since 2026-11-23T11:00:00Z, until `provider-agent resume`; "
        "reason: new\\x1b[2Jdriver\n"
    ) in text
    assert "m\\x07  2026-11-23T11:30:00.000Z  backend_error       4         12s" in text
    assert "  0  H\\x1b[0m       -     -     -      -  FAIL\n" in text
    assert "    unhealthy: XID 79\\r\\nforged" in text
    assert "gpu      vllm  ok (jobs)" in text
