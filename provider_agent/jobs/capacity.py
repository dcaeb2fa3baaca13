"""Pure: one route's concurrency limit, learned from its times to first byte (protocol.md §9).

A backend at saturation does not refuse, it queues, and every job's time to first byte (TTFB)
grows. `RouteCapacity` finds how many jobs one route (backend × model) serves at once without
queueing, so that the agent refuses the rest at once. No I/O, no clock, no randomness of its own:
the caller passes `now` (monotonic seconds) and, for jittered re-measures, a seeded rng.

The algorithm, in plain words:

1. Unloaded time, like with like. A prompt's unloaded TTFB is a line, `level × (a + b·tokens)`:
   a base plus a prefill that grows with the prompt. Only *calm* samples teach it: sent with
   nothing else of the route in flight, or, during a re-measure, with at most the hold in flight.
   The shape (a, b) is a least-squares fit weighted by 1/TTFB² (relative errors count alike),
   refitted once without the stalls (over `STALL_CUT` × the median ratio to the first fit) and
   scaled to pass under all but the lowest tenth of the points: the low percentile §9 asks for.
   `level` is the p10 of TTFB ÷ line over the current epoch (the calm samples since the last
   re-measure began, replacing the last epoch's level once there are `EPOCH_MIN` of them). Older
   epochs' samples enter the shape, divided by their own level, so a backend that became slower or
   faster moves the level at the next epoch without bending the shape. A prompt is judged only
   within [½ × the smallest, 2 × the largest] calm prompt seen: the model is not extrapolated to
   a size it has no reference for, so one long prompt is never taken for queueing.
2. One sample's verdict: bad when TTFB > `tolerance` × unloaded(prompt). A bad sample also
   estimates the knee: among the first bytes seen meanwhile, the jobs sent no later than it that
   started after it was sent were queued ahead of it, so `in_flight − 1 − ahead` slots were busy
   when it was sent (Little's law, counted rather than rate × wait, so bursts and rate changes do
   not fool it). A bad sample sent above the current limit whose estimate is not below that limit
   is old news: the last decrease already answered it.
3. Down: when `VERDICTS_BAD` of the last `VERDICTS` verdicts are bad, the limit drops to the
   median knee estimate of the bad ones — by 1 at least, and to no less than half the concurrency
   they were sent at (Gradient2's and Envoy's floor on one step). A decrease that saw no job queued
   ahead is the first in line at the knee, or a slower backend or a stale baseline; two in a row
   start a re-measure at once (at most `EARLY_GAP_S` after the last one), so a stale baseline costs
   seconds, not a re-measure period. `failed()` (429/503, or no first byte) halves the limit, at
   most once per `FAIL_COOLDOWN_S` (AIMD: one decrease per round trip), never below 1.
4. Up: after `need` good samples sent at the limit (a limit that is not reached teaches nothing),
   with no bad verdict among the last `VERDICTS`, the limit goes one above on trial ("probing").
   `PROBE_FAILS` bad samples sent above the old limit end the trial and double `need`, from
   `NEED_AFTER_FAIL` up to `NEED_MAX`; `PROBE_CONFIRM` good ones keep it and reset `need` to
   `NEED_MIN`, so a backend that grew is climbed step by step quickly. This hysteresis keeps the
   limit at the knee or one above it, at the price of a couple of queued jobs per trial, rarely.
5. Re-measure (Envoy's minRTT window): `FIRST_WINDOW_S` after construction and then
   `REMEASURE_EVERY_S` after the last one ended (± `REMEASURE_JITTER_S` from a seeded rng), if the
   route had traffic since, the limit is held at max(1, limit // `HOLD_DIVISOR`) — or at 1 when
   the limit has not been reached with good times since it was last lowered, so that the hold is
   surely below the knee — until `WINDOW_SAMPLES` calm samples or `WINDOW_MAX_S`. They start a new
   epoch of the level, then the limit returns to where it was.

6. Before the first calm sample (a route saturated from its first job), `PROVISIONAL_MARGIN` ×
   the fastest first byte so far stands in for the line, so the queue of a cold start is seen at
   once rather than at the first re-measure.

Tuned against `bench/capacity.py` (the real agent, a simulated server of 4 slots raised to 8): one
queued job ends a trial (with two, a trial of S+1 could be kept when its first jobs happened to
wait little, and then one job in S+1 waits a whole service time: p95 4.5–6.9× unloaded); eight
good ones keep a trial (with four, a trial of 9 at S=8 was still kept in 2 runs of 5 and one
such run missed the p95 at 4.1×; with eight, 8 of 8 held 8, p95 1.6–2.0× and once 2.6×, at
88–91 % of the capacity instead of 90–92 %, and in the queue model a climb from 1 to 16 slots takes
42–47 s instead of 22–24); the wait after failed trials is capped at 48 good samples (with 128 the
limit stayed at 4 for 15–19 s after the server grew: 73–77 % of capacity); a re-measure holds half
the limit (a quarter, or 1, cost ~8 % of the capacity); the provisional line above (without it
the cold start's queue lasted 4 s).
And from `bench/relay.py` (256 streams started at once on a backend whose first bytes take 1 ms):
a first byte is late only when it is also later than unloaded by more than `LATE_SHARE` of the
route's median job duration, since a job that waits for a slot waits for much of another job;
without that, ~85 ms of scheduling in the burst read as a queue and 1,106 of 1,280 streams were
refused. The share (3 %) still finds the knee of 16 slots, whose queue waits are shortest.

With `adaptive = False` (§2's rule) the limit is the ceiling and every sample, loaded or not,
feeds the baseline on display.

Taken from the references: Envoy's adaptive-concurrency filter — the periodic minRTT window that
holds concurrency down to re-measure the unloaded latency, optionally jittered, and the comparison
of samples with that baseline times a buffer (here `tolerance`); Netflix's concurrency-limits —
Gradient2's tolerance ratio and its floor of half the limit on a decrease, Vegas's queue estimate
from the latency above the unloaded one (here counted exactly, by Little's law), and the rule
that a limit only grows when it is used; TCP's AIMD for refusals.

Like with like, measured: per-band baselines (the p10 of each band of log2(prompt tokens), with
1, 2 and 4 bands per octave) against the prefill line, in the virtual-time queue model of
tests/jobs/queue_model.py (S slots, FIFO, a closed loop offering 3×S jobs; each job's base and
prefill stretched by up to 30 %, 2 % of them stalled 3×; 360 s from a limit of 1 and of 32, for
S in 1, 2, 4, 8, 16). With 80 % prompts of 100–300 tokens and 20 % of 4,000–8,000, the line
settles at S−1…S+1 within 24 s everywhere, then holds S…S+1 with p95 TTFB ÷ unloaded 1.00 and
≥ 93.8 % of the slots busy; bands held too but settled later: within 35 s (1 per octave), 31 s
(2) and 45 s (4). With all prompts long, an octave band spans a 2× prefill, so the top of the
band reads as queueing: the limit of S=8 fell to 1 (18–30 % of the slots busy) and S=16's to 1
(37–80 %) — test_why_the_line_and_not_bands keeps that case; quarter-octave bands see too few
calm samples each (S=1 from 32 settled in 58 s). The line is kept: it converges fastest, has no
band edges to fall on, and reports the prefill rate.

Cost: every call touches bounded windows only (`RECENT_FIRST_BYTES`, `FIT_SAMPLES`,
`EPOCH_SAMPLES`, `VERDICTS`); the line is refitted every `EPOCH_MIN` calm samples.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from typing import Literal

from provider_agent.observe.heartbeat import percentile

Phase = Literal["starting", "steady", "probing", "remeasuring"]

#: Seconds between re-measures, and the spread a seeded rng may add or take away.
REMEASURE_EVERY_S = 45.0
REMEASURE_JITTER_S = 15.0
#: The first re-measure, sooner: the calm samples before it may be few.
FIRST_WINDOW_S = 10.0
#: A re-measure ends after this many calm samples, or after this many seconds.
WINDOW_SAMPLES = 4
WINDOW_MAX_S = 4.0
#: During a re-measure the limit is held at max(1, limit // HOLD_DIVISOR).
HOLD_DIVISOR = 2
#: This many decreases in a row that saw no queue re-measure at once, unless a re-measure
#: ended less than EARLY_GAP_S ago.
BLIND_DECREASES = 2
EARLY_GAP_S = 10.0
#: The baseline is this low percentile of the calm samples.
BASELINE_PCT = 10
#: Calm samples of the current epoch (since the last re-measure began) that set the level.
EPOCH_SAMPLES = 32
#: An epoch replaces the level once it has this many samples (or at the end of its window).
EPOCH_MIN = 3
#: Calm samples of earlier epochs (divided by their epoch's level) that fit the line's shape.
FIT_SAMPLES = 64
#: A sample over this × the median ratio to the first fit is a stall, left out of the refit.
STALL_CUT = 1.5
#: The limit drops when VERDICTS_BAD of the last VERDICTS judged samples are bad.
VERDICTS = 6
VERDICTS_BAD = 4
#: Good samples at the limit before trying one more; after a failed trial from NEED_AFTER_FAIL,
#: doubling up to NEED_MAX; good samples above the old limit that confirm a trial.
NEED_MIN = 2
NEED_AFTER_FAIL = 16
NEED_MAX = 48
PROBE_CONFIRM = 8
PROBE_FAILS = 1
#: Before the first calm sample, a first byte is judged against this × the fastest one so far.
PROVISIONAL_MARGIN = 2.0
#: A first byte is late only when it is later than unloaded by more than this share of the
#: median duration of the route's recent jobs (DURATIONS of them).
LATE_SHARE = 0.03
DURATIONS = 31
#: Refusals halve the limit at most once per this many seconds.
FAIL_COOLDOWN_S = 1.0
#: Recent first bytes kept to count the jobs queued ahead of a slow one.
RECENT_FIRST_BYTES = 256


def _p10(values: Sequence[float]) -> float:
    return percentile(list(values), BASELINE_PCT)


def _weighted_fit(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """a + b·x by least squares weighted by 1/y², with a, b >= 0 (a through the origin, or a
    flat line, when the free fit would make one negative)."""
    weights = [1.0 / (y * y) for _, y in points]
    total = sum(weights)
    pairs = list(zip(weights, points, strict=True))
    mean_x = sum(w * x for w, (x, _) in pairs) / total
    mean_y = sum(w * y for w, (_, y) in pairs) / total
    sxx = sum(w * (x - mean_x) ** 2 for w, (x, _) in pairs)
    sxy = sum(w * (x - mean_x) * (y - mean_y) for w, (x, y) in pairs)
    b = sxy / sxx if sxx > 0 else 0.0
    a = mean_y - b * mean_x
    if b < 0:
        return mean_y, 0.0
    if a < 0:
        return 0.0, sum(w * x * y for w, (x, y) in pairs) / sum(w * x * x for w, (x, _) in pairs)
    return a, b


def unloaded_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of the unloaded line through (prompt tokens, TTFB) points: fitted, refitted without
    the stalls, and scaled so that a tenth of the points lie under it."""
    a, b = _weighted_fit(points)
    ratios = sorted(y / (a + b * x) for x, y in points)
    cut = STALL_CUT * ratios[len(ratios) // 2]
    kept = [(x, y) for x, y in points if y / (a + b * x) <= cut]
    if len(kept) >= 2:
        a, b = _weighted_fit(kept)
    scale = _p10([y / (a + b * x) for x, y in points])
    return a * scale, b * scale


class UnloadedTime:
    """The unloaded TTFB by prompt size, from calm samples (see the module docstring, 1)."""

    def __init__(self) -> None:
        self._past: deque[tuple[int, float]] = deque(maxlen=FIT_SAMPLES)
        self._epoch: deque[tuple[int, float]] = deque(maxlen=EPOCH_SAMPLES)
        self._a = 0.0
        self._b = 0.0
        self._level: float | None = None
        self._low = 0
        self._high = 0
        self._smallest: int | None = None
        self._unfitted = 0  # samples added since the last fit: it runs every EPOCH_MIN of them

    @property
    def seconds_per_token(self) -> float | None:
        """The prefill cost the line has learned (None before any sample)."""
        return None if self._level is None else self._level * self._b

    def add(self, tokens: int, ttfb_s: float) -> None:
        """One calm sample."""
        tokens = max(tokens, 1)
        self._epoch.append((tokens, max(ttfb_s, 1e-6)))
        self._smallest = tokens if self._smallest is None else min(self._smallest, tokens)
        self._unfitted += 1
        if self._level is None or (self._unfitted >= EPOCH_MIN <= len(self._epoch)):
            self._refit()

    def new_epoch(self) -> None:
        """A re-measure begins: the current epoch's samples join the shape's history."""
        if self._epoch and self._level is not None:
            level = self._level
            self._past.extend((x, y / level) for x, y in self._epoch)
        self._epoch.clear()

    def close_epoch(self) -> None:
        """A re-measure ends: what it gathered sets the level if it is enough."""
        if self._unfitted and len(self._epoch) >= EPOCH_MIN:
            self._refit()

    def judged(self, tokens: int) -> float | None:
        """The unloaded TTFB of a prompt this size, or None where there is no reference."""
        if self._level is None or not self._low / 2 <= tokens <= 2 * self._high:
            return None
        return self.guess(tokens)

    def guess(self, tokens: int) -> float | None:
        """The line anywhere (extrapolated), to place a sample's start in time."""
        if self._level is None:
            return None
        return self._level * (self._a + self._b * max(tokens, 1))

    def baseline(self) -> float | None:
        """The unloaded TTFB of the smallest prompt seen calm."""
        return None if self._smallest is None else self.guess(self._smallest)

    def _refit(self) -> None:
        self._unfitted = 0
        epoch = list(self._epoch)
        if self._level is None:
            self._a, self._b = unloaded_line(epoch)
        else:
            known = [(x, y) for x, y in epoch if self._low / 2 <= x <= 2 * self._high]
            level = self._level
            if len(known) >= EPOCH_MIN:
                level = _p10([y / (self._a + self._b * x) for x, y in known])
            self._a, self._b = unloaded_line([*self._past, *((x, y / level) for x, y in epoch)])
        self._level = _p10([y / (self._a + self._b * x) for x, y in epoch])
        sizes = [x for x, _ in self._past] + [x for x, _ in epoch]
        self._low, self._high = min(sizes), max(sizes)


class RouteCapacity:
    """The concurrency limit of one route (backend × model), between 1 and its ceiling."""

    def __init__(
        self,
        ceiling: int,
        *,
        tolerance: float = 1.5,
        adaptive: bool = True,
        now: float = 0.0,
        initial: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`initial` is where the limit starts (the ceiling when None: refuse nothing before
        there is evidence); `rng`, when given, jitters the re-measure schedule."""
        self._ceiling = max(1, ceiling)
        self.tolerance = tolerance
        self.adaptive = adaptive
        self._rng = rng
        self._unloaded = UnloadedTime()
        start = self._ceiling if initial is None else initial
        self._good_limit = min(self._ceiling, max(1, start))  # the last limit known good
        self._limit = self._good_limit  # what is enforced: held down, or one above on trial
        self._phase: Phase = "steady"
        self._samples = 0
        self._since_window = 0
        self._next_window = now + FIRST_WINDOW_S
        self._window_start = now
        self._window_end = -math.inf
        self._window_count = 0
        self._hold = 1
        self._good = 0
        self._need = NEED_MIN
        self._probe_good = 0
        self._probe_bad = 0
        self._shown = False  # the limit was reached with good times since it was last lowered
        self._blind = 0  # decreases in a row that saw no job queued ahead
        self._verdicts: deque[tuple[bool, int, int]] = deque(maxlen=VERDICTS)
        #: (first byte at, estimated start of service, sent at) of recent samples.
        self._recent: deque[tuple[float, float, float]] = deque(maxlen=RECENT_FIRST_BYTES)
        self._last_fail = -math.inf
        #: Recent jobs' durations (request to last byte): the scale of a queue's wait.
        self._durations: deque[float] = deque(maxlen=DURATIONS)
        #: The fastest first byte seen while there is no unloaded line yet.
        self._provisional = math.inf

    @property
    def limit(self) -> int:
        return self._limit if self.adaptive else self._ceiling

    @property
    def advertised(self) -> int:
        """The limit to advertise: the last one known good, not a re-measure's hold or a trial
        one above it (those last seconds; telling the coordinator of them would be noise)."""
        return min(self._good_limit, self._ceiling) if self.adaptive else self._ceiling

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def phase(self) -> Phase:
        """`starting` until there is a baseline, `probing` while one more is on trial,
        `remeasuring` while held down, `steady` otherwise (always, when not adaptive)."""
        if self._phase == "steady" and self.adaptive and self.baseline_s is None:
            return "starting"
        return self._phase

    @property
    def baseline_s(self) -> float | None:
        return self._unloaded.baseline()

    def set_ceiling(self, ceiling: int) -> None:
        """The configured caps, the slot count or the global maximum changed: the limit is
        clamped, never raised (it climbs by trials)."""
        self._ceiling = max(1, ceiling)
        self._good_limit = min(self._good_limit, self._ceiling)
        self._limit = min(self._limit, self._ceiling)

    def tick(self, now: float) -> None:
        """Time passes: ends a re-measure that ran out of time, starts one that is due."""
        if not self.adaptive:
            return
        if self._phase == "remeasuring":
            if now - self._window_start >= WINDOW_MAX_S:
                self._end_window(now)
        elif now >= self._next_window and self._since_window > 0:
            self._start_window(now)

    def observe(self, now: float, ttfb_s: float, prompt_tokens: int, in_flight: int) -> None:
        """One job's time to first byte, its prompt's size (estimated tokens), and how many jobs
        were in flight on the route when it was sent, itself included."""
        self._samples += 1
        self._since_window += 1
        if not self.adaptive:
            self._unloaded.add(prompt_tokens, ttfb_s)  # the baseline on display only
            return
        self.tick(now)
        measuring = self._phase == "remeasuring"
        calm = in_flight <= (self._hold if measuring else 1)
        if calm:
            self._unloaded.add(prompt_tokens, ttfb_s)
        sent = now - ttfb_s
        guess = self._unloaded.guess(prompt_tokens)
        started = sent if guess is None else now - min(ttfb_s, guess)
        unloaded = self._unloaded.judged(prompt_tokens)
        if unloaded is None and self._unloaded.baseline() is None:
            # No calm sample yet (a route saturated from its first job): the fastest first byte
            # so far stands in, so that queueing is seen at once, not at the first re-measure.
            self._provisional = min(self._provisional, ttfb_s)
            if self._samples > 1:  # twice it: a rough reference, only plain queueing is bad
                unloaded = PROVISIONAL_MARGIN * self._provisional
        ahead = 0
        late = unloaded is not None and self._late(ttfb_s, unloaded)
        if not measuring and unloaded is not None and late:
            ahead = self._queued_ahead(sent, started, unloaded)
        self._recent.append((now, started, sent))
        if measuring:
            if calm:
                self._window_count += 1
                if self._window_count >= WINDOW_SAMPLES:
                    self._end_window(now)
        elif unloaded is not None:
            self._judge(now, late, in_flight - 1 - ahead, in_flight)

    def failed(self, now: float) -> None:
        """A refusal: the attempt failed before its first byte, or the backend said 429/503."""
        if not self.adaptive or now - self._last_fail < FAIL_COOLDOWN_S:
            return
        self._last_fail = now
        self._good_limit = max(1, self._good_limit // 2)
        self._shown = False
        self._need = NEED_MIN
        self._good = 0
        self._verdicts.clear()
        if self._phase != "remeasuring":
            self._limit = self._good_limit
            self._phase = "steady"

    def describe(self) -> dict[str, object]:
        """For /status and logs."""
        per_token = self._unloaded.seconds_per_token
        return {
            "limit": self.limit,
            "ceiling": self._ceiling,
            "adaptive": self.adaptive,
            "phase": self.phase,
            "baseline_s": self.baseline_s,
            "prefill_s_per_1k_tokens": None if per_token is None else per_token * 1000,
            "samples": self._samples,
        }

    def _queued_ahead(self, sent: float, started: float, unloaded: float) -> int:
        """Jobs sent no later than this one that started after it was sent (give or take the
        spread of the unloaded time): the queue it found."""
        after = sent + (self.tolerance - 1.0) * unloaded
        ahead = 0
        for first_byte, other_start, other_sent in reversed(self._recent):
            if first_byte <= sent:
                break
            if other_sent <= sent and after < other_start <= started:
                ahead += 1
        return ahead

    def finished(self, duration_s: float) -> None:
        """A job on this route ended after `duration_s` from its request (first byte to last):
        what a job queued behind it would have waited for."""
        if duration_s > 0:
            self._durations.append(duration_s)

    def _late(self, ttfb_s: float, unloaded: float) -> bool:
        """Over `tolerance` × the unloaded time — and later by more than `LATE_SHARE` of a job's
        typical duration: a job that waits for a slot waits for most of another job, while a
        backend whose first bytes take milliseconds jitters by as much on a busy host without
        any queue (256 streams started at once, a saturated CPU)."""
        if ttfb_s <= self.tolerance * unloaded or not self._durations:
            return False  # no job has ended: none can have waited for a slot
        typical = sorted(self._durations)[len(self._durations) // 2]
        return ttfb_s - unloaded > LATE_SHARE * typical

    def _judge(self, now: float, bad: bool, knee: int, in_flight: int) -> None:
        good_limit = self._good_limit
        if self._phase == "probing" and in_flight > good_limit:
            if bad:
                self._probe_bad += 1
                if self._probe_bad >= PROBE_FAILS:
                    self._limit = good_limit
                    self._phase = "steady"
                    self._need = min(NEED_MAX, max(NEED_AFTER_FAIL, 2 * self._need))
                    self._good = 0
            else:
                self._probe_good += 1
                if self._probe_good >= PROBE_CONFIRM:
                    self._good_limit = self._limit
                    self._shown = True
                    self._phase = "steady"
                    self._need = NEED_MIN
                    self._good = 0
            return
        if bad and in_flight > good_limit and knee >= good_limit:
            return  # sent before the last decrease, which already answered it
        self._verdicts.append((bad, knee, in_flight))
        if bad:
            if sum(1 for verdict, _, _ in self._verdicts if verdict) >= VERDICTS_BAD:
                self._decrease(now)
        elif in_flight >= good_limit:
            self._shown = True
            self._blind = 0
            self._good += 1
            clean = not any(verdict for verdict, _, _ in self._verdicts)  # a level that holds
            ready = self._phase == "steady" and self._good >= self._need and clean
            if ready and good_limit < self._ceiling:
                self._phase = "probing"
                self._probe_good = 0
                self._probe_bad = 0
                self._limit = good_limit + 1

    def _decrease(self, now: float) -> None:
        bad = [(knee, in_flight) for verdict, knee, in_flight in self._verdicts if verdict]
        knee = sorted(knee for knee, _ in bad)[len(bad) // 2]
        sent_at = sorted(in_flight for _, in_flight in bad)[len(bad) // 2]
        good_limit = self._good_limit
        # No job was seen queued ahead: the first in line, or no queue at all (a slower backend,
        # a stale baseline). A second such decrease in a row, without good times between, is
        # not the first in line any more.
        self._blind = self._blind + 1 if knee >= sent_at - 1 else 0
        self._good_limit = max(1, min(good_limit - 1, max(knee, sent_at // 2)))
        self._shown = False
        self._limit = self._good_limit
        self._phase = "steady"
        self._need = NEED_MIN
        self._good = 0
        self._verdicts.clear()
        if self._blind >= BLIND_DECREASES and now - self._window_end >= EARLY_GAP_S:
            self._blind = 0
            self._start_window(now)

    def _start_window(self, now: float) -> None:
        self._phase = "remeasuring"
        self._window_start = now
        self._window_count = 0
        self._since_window = 0
        self._hold = max(1, self._good_limit // HOLD_DIVISOR) if self._shown else 1
        self._limit = min(self._hold, self._limit)
        self._unloaded.new_epoch()

    def _end_window(self, now: float) -> None:
        self._window_end = now
        self._unloaded.close_epoch()
        self._phase = "steady"
        self._limit = self._good_limit
        self._verdicts.clear()
        jitter = 0.0
        if self._rng is not None:
            jitter = self._rng.uniform(-REMEASURE_JITTER_S, REMEASURE_JITTER_S)
        self._next_window = now + REMEASURE_EVERY_S + jitter
