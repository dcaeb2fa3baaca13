"""The `max_tokens_per_minute` window: input + output tokens over the last 60 s (sans-I/O).

Tokens are added as they stream (input when a job starts, output as it is counted) and put
right by the final usage report. Time comes in as `now` (any monotonic clock, seconds), so the
window is tested without sleeping. Tokens are kept in per-second buckets: memory is one entry
per second of the window however many events arrive, and the window slides one bucket at a
time (it may hold tokens up to a bucket older than `window_s`).
"""

from __future__ import annotations

import math
from collections import deque


class TokenWindow:
    """Tokens seen in the last `window_s` seconds against a `limit` (None: no limit)."""

    def __init__(self, limit: int | None, window_s: float = 60, bucket_s: float = 1) -> None:
        if window_s <= 0 or bucket_s <= 0:
            raise ValueError("window_s and bucket_s must be positive")
        self.limit = limit
        self.window_s = window_s
        self._bucket_s = bucket_s
        self._span = max(1, math.ceil(window_s / bucket_s))
        #: [bucket index, tokens], oldest first; at most `_span` entries.
        self._buckets: deque[list[int]] = deque()
        self._total = 0

    def admit(self, now: float) -> bool:
        """Whether a new job may start: false while the window's tokens reach the limit."""
        if self.limit is None:
            return True
        return self.total(now) < self.limit

    def add(self, now: float, tokens: int) -> None:
        """Count `tokens` at `now` (non-positive counts are ignored)."""
        if tokens <= 0:
            return
        index = self._expire(now)
        if self._buckets and self._buckets[-1][0] >= index:
            self._buckets[-1][1] += tokens  # same second (or a clock that stepped back)
        else:
            self._buckets.append([index, tokens])
        self._total += tokens

    def correct(self, now: float, counted: int, actual: int) -> None:
        """A job's final usage says `actual` where `counted` tokens were added while it ran:
        add the shortfall, or take the excess back from the newest buckets (never below 0)."""
        difference = actual - counted
        if difference > 0:
            self.add(now, difference)
            return
        self._expire(now)
        excess = -difference
        while excess > 0 and self._buckets:
            newest = self._buckets[-1]
            taken = min(excess, newest[1])
            newest[1] -= taken
            self._total -= taken
            excess -= taken
            if newest[1] == 0:
                self._buckets.pop()

    def total(self, now: float) -> int:
        """Tokens in the window at `now`."""
        self._expire(now)
        return self._total

    def fill(self, now: float) -> float:
        """How full the window is, 0..1 (0 without a limit), for metrics."""
        if not self.limit:
            return 0.0
        return min(1.0, self.total(now) / self.limit)

    def _expire(self, now: float) -> int:
        """Drop buckets that left the window; the bucket index of `now`."""
        index = math.floor(now / self._bucket_s)
        oldest = index - self._span + 1
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest:
            self._total -= buckets.popleft()[1]
        return index
