"""The 15-minute window of served jobs per model, advertised as `measured` (protocol.md §2).

The marketplace ranks equal prices by speed; this is how a fast host shows it. Only jobs that
ended in `job_done` count (the job executor feeds them; selftest and doctor completions never
reach it). The medians are the heartbeat's (§3): time from the `job` frame's receipt to the first
upstream byte, and output tokens ÷ (terminal time − first byte). Pure apart from the clock, which
is passed in (monotonic seconds), so the window is tested without waiting.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from provider_agent.link.protocol import Measured
from provider_agent.observe.heartbeat import percentile

WINDOW_S = 900
#: Newest served jobs kept per model: bounds memory on a very busy host; the medians of the
#: latest ten thousand jobs are as honest as those of all of them.
MAX_SAMPLES_PER_MODEL = 10_000


@dataclass(frozen=True)
class Served:
    """One `job_done`: when it ended, its time to first byte, its output rate (None when the
    stream ended in the same instant as its first byte)."""

    at: float
    ttft_ms: float
    tokens_per_sec: float | None


class MeasuredSpeed:
    """Served jobs of the last `window_s` seconds, per advertised model id."""

    def __init__(self, window_s: int = WINDOW_S, max_samples: int = MAX_SAMPLES_PER_MODEL) -> None:
        self.window_s = window_s
        self.max_samples = max_samples
        self._served: dict[str, deque[Served]] = {}

    def add(
        self,
        model_id: str,
        at: float,
        *,
        ttft_ms: float,
        output_tokens: int,
        generation_s: float,
    ) -> None:
        """One job that ended in `job_done` at `at`."""
        rate = output_tokens / generation_s if generation_s > 0 else None
        served = self._served.setdefault(model_id, deque(maxlen=self.max_samples))
        served.append(Served(at, ttft_ms, rate))

    def of(self, model_id: str, now: float) -> Measured | None:
        """The model's medians over the window; None when nothing was served in it."""
        served = self._served.get(model_id)
        if served is None:
            return None
        while served and served[0].at < now - self.window_s:
            served.popleft()
        if not served:
            del self._served[model_id]
            return None
        return summarise(served, self.window_s)

    def snapshot(self, now: float) -> dict[str, Measured]:
        """Every model with served jobs in the window (models without any are dropped)."""
        found = {model_id: self.of(model_id, now) for model_id in list(self._served)}
        return {model_id: m for model_id, m in found.items() if m is not None}


def summarise(served: Iterable[Served], window_s: int) -> Measured:
    """Medians as the heartbeat computes them: nearest-rank p50 of the times to first byte,
    statistics.median of the rates (0 when no job had one)."""
    jobs = list(served)
    rates = [job.tokens_per_sec for job in jobs if job.tokens_per_sec is not None]
    return Measured(
        ttft_ms_p50=round(percentile([job.ttft_ms for job in jobs], 50), 1),
        tokens_per_sec_p50=round(statistics.median(rates), 2) if rates else 0.0,
        samples=len(jobs),
        window_s=window_s,
    )
