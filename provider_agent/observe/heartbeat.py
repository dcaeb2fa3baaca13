"""The jobs of the last 60 s and the heartbeat they make (protocol.md §3): pure over the window,
with the clock passed in, so the arithmetic is tested without waiting. The executor feeds
`JobStats` (`job_started`, `job_finished`, `job_refused`) and hands each finished job on to a
`JobSink` (the Prometheus families, when the agent has them).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from provider_agent.clock import utc_ms
from provider_agent.link.protocol import SERVING_FAILURES, Heartbeat

WINDOW_S = 60.0


#: Codes a job only ends with when it never started upstream: refusals, whichever path said so.
_NEVER_STARTED = frozenset({"out_of_capacity", "rate_limited", "unsupported_format"})


@dataclass(frozen=True)
class FinishedJob:
    at: float
    time_to_first_byte_ms: float | None
    output_tokens: int
    generation_s: float
    error_code: str | None
    #: For `/metrics` and `/status` (the heartbeat needs only the fields above).
    backend: str = ""
    input_tokens: int = 0
    duration_s: float | None = None
    relayed_bytes: int = 0
    job_id: str = ""
    message: str = ""
    #: Answered with a refusal at once (never started): outside the error rate.
    refused: bool = False


class JobSink(Protocol):
    """Where finished and refused jobs go besides the window (`/metrics`)."""

    def job_finished(self, job: FinishedJob, at: datetime) -> None: ...

    def job_refused(self, job: FinishedJob) -> None: ...


class JobStats:
    """Jobs in flight, and the jobs finished in the last 60 s (monotonic seconds)."""

    def __init__(self, metrics: JobSink | None = None) -> None:
        self.metrics = metrics
        self.in_flight = 0
        self._finished: deque[FinishedJob] = deque()
        self.last_error_at: datetime | None = None
        self.last_error_code: str | None = None

    def job_started(self) -> None:
        self.in_flight += 1

    def job_finished(self, job: FinishedJob, wall_clock: datetime | None = None) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._finished.append(job)
        if job.error_code in SERVING_FAILURES:
            self.last_error_at = wall_clock or datetime.now(UTC)
            self.last_error_code = job.error_code
        if self.metrics is not None:
            self.metrics.job_finished(job, wall_clock or datetime.now(UTC))

    def job_refused(self, job: FinishedJob) -> None:
        """A job answered with a refusal at once: in the window, never in flight, and outside
        the error rate."""
        self._finished.append(dataclasses.replace(job, refused=True))
        if self.metrics is not None:
            self.metrics.job_refused(job)

    def window(self, now: float) -> list[FinishedJob]:
        while self._finished and self._finished[0].at < now - WINDOW_S:
            self._finished.popleft()
        return list(self._finished)

    def heartbeat(self, now: float) -> Heartbeat:
        """Real values: medians/percentiles over the window, 0 when no job finished in it."""
        recent = self.window(now)
        rates = [
            j.output_tokens / j.generation_s
            for j in recent
            if j.error_code is None and j.generation_s > 0
        ]
        # protocol.md §8: latencies over job_dones only; the error rate is the job_errors other
        # than `cancelled` over the terminal frames that are not refusals (a job the drain cut
        # off, `shutting_down`, had started: it counts).
        latencies = [
            j.time_to_first_byte_ms
            for j in recent
            if j.error_code is None and j.time_to_first_byte_ms is not None
        ]
        counted = [j for j in recent if not (j.refused or j.error_code in _NEVER_STARTED)]
        failures = sum(1 for j in counted if j.error_code not in (None, "cancelled"))
        return Heartbeat(
            queue_depth=self.in_flight,
            tokens_per_sec_p50=round(statistics.median(rates), 2) if rates else 0.0,
            p50_latency_ms=round(percentile(latencies, 50), 1),
            p95_latency_ms=round(percentile(latencies, 95), 1),
            error_rate_60s=round(failures / len(counted), 4) if counted else 0.0,
            last_error_at=utc_ms(self.last_error_at) if self.last_error_at else None,
            last_error_code=self.last_error_code,
        )


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no values (the protocol wants numbers, never null)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]
