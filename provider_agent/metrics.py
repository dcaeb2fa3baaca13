"""The windowed job statistics the heartbeat reports (protocol.md §3).

The job executor feeds it (`job_started`, `job_finished`); the heartbeat reads it. Pure apart
from the clock, which is passed in, so the window arithmetic is tested without waiting.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from provider_agent.protocol import SERVING_FAILURES, Heartbeat

WINDOW_S = 60.0


@dataclass(frozen=True)
class FinishedJob:
    at: float
    time_to_first_byte_ms: float | None
    output_tokens: int
    generation_s: float
    error_code: str | None


class JobStats:
    """Jobs in flight, and the jobs finished in the last 60 s (monotonic seconds)."""

    def __init__(self) -> None:
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

    def job_refused(self, job: FinishedJob) -> None:
        """A job answered with a refusal at once: counted in the window, never in flight."""
        self._finished.append(job)

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
        latencies = [j.time_to_first_byte_ms for j in recent if j.time_to_first_byte_ms is not None]
        counted = [j for j in recent if j.error_code is None or j.error_code in SERVING_FAILURES]
        failures = sum(1 for j in counted if j.error_code is not None)
        return Heartbeat(
            queue_depth=self.in_flight,
            tokens_per_sec_p50=round(statistics.median(rates), 2) if rates else 0.0,
            p50_latency_ms=round(percentile(latencies, 50), 1),
            p95_latency_ms=round(percentile(latencies, 95), 1),
            error_rate_60s=round(failures / len(counted), 4) if counted else 0.0,
            last_error_at=self.last_error_at.isoformat().replace("+00:00", "Z")
            if self.last_error_at
            else None,
            last_error_code=self.last_error_code,
        )


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no values (the protocol wants numbers, never null)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]
