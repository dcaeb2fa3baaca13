"""The heartbeat's windowed statistics: real values, 0 for an empty window, never null."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from provider_agent.link.protocol import Heartbeat, encode
from provider_agent.observe.heartbeat import FinishedJob, JobStats, percentile


def done(at: float, ttfb: float, tokens: int = 100, seconds: float = 2.0) -> FinishedJob:
    return FinishedJob(at, ttfb, tokens, seconds, None)


def failed(at: float, code: str) -> FinishedJob:
    return FinishedJob(at, None, 0, 0.0, code)


def test_idle_heartbeat_is_all_zero_numbers() -> None:
    beat = JobStats().heartbeat(now=1000.0)
    assert beat.queue_depth == 0
    assert beat.tokens_per_sec_p50 == 0 and beat.p50_latency_ms == 0 and beat.p95_latency_ms == 0
    assert beat.error_rate_60s == 0
    text = encode(beat)
    assert '"last_error_at":null' in text and '"last_error_code":null' in text
    assert Heartbeat.model_validate_json(text) == beat


def test_window_statistics_and_expiry() -> None:
    stats = JobStats()
    for _ in range(3):
        stats.job_started()
    stats.job_finished(done(100.0, 100, tokens=100, seconds=2))  # 50 tok/s
    stats.job_finished(done(101.0, 300, tokens=40, seconds=1))  # 40 tok/s
    stats.job_finished(failed(102.0, "rate_limited"))  # a refusal: not counted
    beat = stats.heartbeat(now=110.0)
    assert beat.queue_depth == 0
    assert beat.tokens_per_sec_p50 == 45.0
    assert beat.p50_latency_ms == 100 and beat.p95_latency_ms == 300
    assert beat.error_rate_60s == 0 and beat.last_error_code is None
    assert stats.heartbeat(now=170.5).p50_latency_ms == 0  # all older than 60 s


def test_serving_failures_count_and_set_last_error() -> None:
    stats = JobStats()
    stats.job_started()
    stats.job_started()
    when = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    stats.job_finished(failed(10.0, "backend_error"), wall_clock=when)
    beat = stats.heartbeat(now=11.0)
    assert beat.queue_depth == 1
    assert beat.error_rate_60s == 1.0
    assert beat.last_error_code == "backend_error"
    assert beat.last_error_at == "2026-11-23T12:00:00.000Z"


@pytest.mark.parametrize(
    ("microsecond", "expected"),
    [(0, "12:00:00.000Z"), (999_999, "12:00:00.999Z"), (412_987, "12:00:00.412Z")],
)
def test_last_error_at_has_exactly_three_fraction_digits(microsecond: int, expected: str) -> None:
    """protocol.md §8: RFC 3339 UTC, three digits and Z; truncated, never into the next second."""
    stats = JobStats()
    stats.job_started()
    when = datetime(2026, 11, 23, 12, 0, 0, microsecond, tzinfo=UTC)
    stats.job_finished(failed(10.0, "backend_timeout"), wall_clock=when)
    assert stats.heartbeat(now=11.0).last_error_at == f"2026-11-23T{expected}"


def test_refusals_count_in_the_window_but_never_in_flight() -> None:
    stats = JobStats()
    stats.job_started()
    stats.job_refused(FinishedJob(1.0, None, 0, 0.0, "out_of_capacity"))
    beat = stats.heartbeat(now=2.0)
    assert beat.queue_depth == 1
    assert beat.error_rate_60s == 0.0  # a refusal is no serving failure


def test_percentile_nearest_rank() -> None:
    assert percentile([], 95) == 0.0
    assert percentile([5.0], 50) == 5.0
    assert percentile([float(v) for v in range(1, 101)], 95) == 95.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_heartbeat_figures_as_protocol_section_8_settles_them() -> None:
    """Latencies over job_dones only; the error rate is job_errors other than `cancelled` over
    terminal frames that are not refusals; a job the drain cut off counts as an error."""
    stats = JobStats()
    stats.job_finished(done(100.0, 100))
    stats.job_finished(FinishedJob(100.0, 5000.0, 3, 1.0, "backend_error"))  # slow, then broke
    stats.job_finished(FinishedJob(100.0, 20.0, 1, 1.0, "cancelled"))
    stats.job_finished(failed(100.0, "shutting_down"))  # cut off by the drain's deadline
    stats.job_finished(failed(100.0, "bad_request"))  # the backend's 400, after it started
    stats.job_refused(failed(100.0, "shutting_down"))  # refused while stopping: not counted
    stats.job_refused(failed(100.0, "model_not_loaded"))
    beat = stats.heartbeat(now=101.0)
    assert beat.p50_latency_ms == 100 and beat.p95_latency_ms == 100
    assert beat.error_rate_60s == 0.6  # 3 errors of 5 frames that are not refusals
