"""The measured concurrency limit (protocol.md §9): the pure controller against a virtual-time
queueing model of a server (tests/jobs/queue_model.py), then its rules one by one with a fake
clock. Benchmark targets the real system must meet are asserted here: the knee within a minute,
p95 time to first byte ≤ 2.5 × unloaded, at least 85 % of the server's capacity used."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from provider_agent.jobs import capacity
from provider_agent.jobs.capacity import RouteCapacity, unloaded_line
from provider_agent.observe.heartbeat import percentile
from tests.jobs import queue_model
from tests.jobs.queue_model import LONG, MIXED, NOISY, SHORT, Mix, Server

#: Benchmark targets (protocol.md §9 and the brief of the real-system benchmark).
SETTLE_S = 60.0
P95_RATIO = 2.5
THROUGHPUT = 0.85


def knee(slots: int) -> tuple[int, int]:
    return max(1, slots - 1), slots + 1


# --- convergence, steadiness and the benchmark targets -------------------------------------------


@pytest.mark.parametrize("mix", [SHORT, MIXED], ids=["short", "mixed"])
@pytest.mark.parametrize(
    ("slots", "initial"),
    [
        pytest.param(slots, initial, id=f"S={slots}-from-{initial}")
        for slots in (1, 2, 4, 8, 16)
        for initial in (32, 1)
    ],
)
def test_the_limit_finds_the_knee_and_holds_it(slots: int, initial: int, mix: Mix) -> None:
    """From the ceiling or from 1, within a minute, then five minutes at S−1…S+1 (the
    re-measure holds aside) while meeting the latency and throughput targets."""
    control = RouteCapacity(32, initial=initial)
    run = queue_model.run(control, slots, 360.0, mix=mix)
    low, high = knee(slots)
    assert run.settled_at(low, high) <= SETTLE_S
    held = run.limits(SETTLE_S, 360.0)
    assert low <= min(held) and max(held) <= high
    assert max(held) - min(held) <= 2
    assert run.p95_ratio(SETTLE_S, 360.0) <= P95_RATIO
    assert run.throughput(SETTLE_S, 360.0) >= THROUGHPUT


@pytest.mark.parametrize(
    ("slots", "change", "within_s", "band"),
    [
        pytest.param(4, 8, 60.0, (7, 9), id="grows-4-to-8"),
        pytest.param(8, 4, 10.0, (3, 5), id="shrinks-8-to-4"),
        pytest.param(16, 2, 20.0, (1, 3), id="collapses-16-to-2"),
    ],
)
def test_the_limit_follows_the_capacity(
    slots: int, change: int, within_s: float, band: tuple[int, int]
) -> None:
    """Capacity that grows is found step by step; capacity that shrinks is followed fast."""
    control = RouteCapacity(32)
    run = queue_model.run(control, slots, 300.0, capacity=[(120.0, change)])
    low, high = band
    assert run.settled_at(low, high) - 120.0 <= within_s
    held = run.limits(120.0 + within_s, 300.0)
    assert low <= min(held) and max(held) <= high
    assert run.p95_ratio(120.0 + within_s, 300.0) <= P95_RATIO


@pytest.mark.parametrize(
    ("backend", "unloaded_s"),
    [
        pytest.param(
            Server(base_s=0.06, prefill_tokens_per_s=7_000), 0.06 + 100 / 7_000, id="3x-slower"
        ),
        pytest.param(
            Server(base_s=0.007, prefill_tokens_per_s=60_000), 0.007 + 100 / 60_000, id="3x-faster"
        ),
    ],
)
def test_a_backend_that_changed_speed_gets_a_new_baseline(
    backend: Server, unloaded_s: float
) -> None:
    """The baseline taken before does not stick. A slower backend reads as overload until two
    decreases that saw no queue start a re-measure at once; a faster one waits for the next."""
    control = RouteCapacity(32)
    run = queue_model.run(control, 8, 300.0, server=Server(), backends=[(120.0, backend)])
    baseline = control.baseline_s
    assert baseline is not None
    assert unloaded_s * 0.8 <= baseline <= unloaded_s * 1.3  # the smallest prompt is ~100 tokens
    assert run.settled_at(7, 9) - 120.0 <= 20.0
    assert min(run.limits(150.0, 300.0)) >= 7


# --- like with like ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mix", "server", "slots", "floor"),
    [
        pytest.param(MIXED, Server(), 8, 8, id="20%-long-clean"),
        pytest.param(MIXED, NOISY, 8, 7, id="20%-long-noisy"),
        pytest.param(LONG, Server(), 8, 8, id="all-long-clean"),
        pytest.param(LONG, NOISY, 8, 7, id="all-long-noisy"),
    ],
)
def test_long_prompts_do_not_shrink_the_limit(
    mix: Mix, server: Server, slots: int, floor: int
) -> None:
    """A steady mix of long prompts is compared with their own prefill, not with the short
    ones' baseline: the limit stays at the knee (or above it, where a long prompt's tolerance
    allows a short wait)."""
    control = RouteCapacity(32)
    run = queue_model.run(control, slots, 240.0, mix=mix, server=server)
    assert min(run.limits(SETTLE_S, 240.0)) >= floor
    assert run.p95_ratio(SETTLE_S, 240.0) <= P95_RATIO


@pytest.mark.parametrize(
    ("prompt_tokens", "stretch", "times"),
    [
        pytest.param(8_000, 2.0, 6, id="long-prompts-of-a-size-never-seen"),
        pytest.param(250, 10.0, 1, id="one-very-slow-short"),
        pytest.param(250, 3.0, 3, id="three-slow-shorts"),
    ],
)
def test_odd_prompts_do_not_shrink_the_limit(
    prompt_tokens: int, stretch: float, times: int
) -> None:
    """A size without an unloaded reference is not judged (after short prompts only, a long
    one is not compared with them), and fewer slow samples than a majority are outvoted."""
    control = RouteCapacity(32)
    run = queue_model.run(control, 4, 120.0, mix=SHORT, server=Server())
    before = control.limit
    assert before == 4
    ttfb = stretch * Server().unloaded_s(prompt_tokens)
    for index in range(times):
        control.observe(run.end + index * 0.01, ttfb, prompt_tokens, in_flight=before)
    assert control.limit == before


@pytest.mark.parametrize(
    ("points", "a", "b"),
    [
        pytest.param(
            [(100, 0.025), (200, 0.03), (4000, 0.22), (8000, 0.42)], 0.02, 5e-5, id="exact"
        ),
        pytest.param(
            [(100, 0.025), (150, 0.0275), (4000, 0.22), (6000, 0.32), (8000, 0.42), (120, 0.08)],
            0.02,
            5e-5,
            id="with-a-stall",
        ),
        pytest.param([(5000, 0.25), (6000, 0.3), (7000, 0.35)], 0.0, 5e-5, id="long-only"),
        pytest.param([(200, 0.03), (200, 0.031), (200, 0.04)], 0.03, 0.0, id="one-size"),
    ],
)
def test_the_unloaded_line(points: list[tuple[int, float]], a: float, b: float) -> None:
    """The line under the calm samples: base + prefill per token, a stall left out, a flat line
    where the prompts are all alike."""
    fitted_a, fitted_b = unloaded_line(points)
    assert fitted_a == pytest.approx(a, abs=0.003)
    assert fitted_b == pytest.approx(b, rel=0.1, abs=1e-7)


class BandBaselines(capacity.UnloadedTime):
    """The alternative that was not kept: the p10 of each band of log2(prompt tokens)."""

    def __init__(self, per_octave: int) -> None:
        super().__init__()
        self.per_octave = per_octave
        self.epochs: dict[int, list[float]] = {}
        self.values: dict[int, float] = {}

    def band(self, tokens: int) -> int:
        return int(math.log2(max(tokens, 1)) * self.per_octave)

    def add(self, tokens: int, ttfb_s: float) -> None:
        band = self.band(tokens)
        epoch = self.epochs.setdefault(band, [])
        epoch.append(ttfb_s)
        if len(epoch) >= capacity.EPOCH_MIN or band not in self.values:
            self.values[band] = percentile(epoch[-capacity.EPOCH_SAMPLES :], 10)

    def new_epoch(self) -> None:
        self.epochs.clear()

    def close_epoch(self) -> None:
        """Nothing to add: each band's value follows its own samples."""

    def judged(self, tokens: int) -> float | None:
        return self.values.get(self.band(tokens))

    def guess(self, tokens: int) -> float | None:
        band = self.band(tokens)
        nearest = min(self.values, key=lambda known: abs(known - band), default=None)
        return None if nearest is None else self.values[nearest]

    def baseline(self) -> float | None:
        return self.values[min(self.values)] if self.values else None


@pytest.mark.parametrize(
    ("per_octave", "meets_targets"),
    [
        pytest.param(None, True, id="prefill-line"),
        pytest.param(1, False, id="octave-bands"),
    ],
)
def test_why_the_line_and_not_bands(per_octave: int | None, meets_targets: bool) -> None:
    """The comparison behind the choice (module docstring): with all prompts long (4,000–8,000
    tokens), an octave band spans a 2× prefill, the band's top reads as queueing and the limit
    collapses; the line compares each prompt with its own prefill."""
    control = RouteCapacity(32)
    if per_octave is not None:
        control._unloaded = BandBaselines(per_octave)
    run = queue_model.run(control, 8, 240.0, mix=LONG)
    met = min(run.limits(SETTLE_S, 240.0)) >= 7 and run.throughput(SETTLE_S, 240.0) >= THROUGHPUT
    assert met is meets_targets


# --- refusals, the floor, the ceiling ------------------------------------------------------------


@pytest.mark.parametrize(
    ("refusals", "over_s", "expected"),
    [
        pytest.param(50, 1.0, 8, id="50-in-a-second-halve-once"),
        pytest.param(300, 30.0, 1, id="every-attempt-for-30s"),
        pytest.param(3, 3.0, 2, id="one-a-second-three-times"),
    ],
)
def test_refusals_halve_but_never_to_zero(refusals: int, over_s: float, expected: int) -> None:
    """Busy answers halve the limit at most once a second, down to 1; when successes come back
    the limit climbs to the knee again."""
    control = RouteCapacity(32)
    queue_model.run(control, 16, 80.0)
    assert (control.limit, control.phase) in ((16, "steady"), (17, "probing"))
    for index in range(refusals):
        control.failed(80.0 + index * over_s / refusals)
    assert control.limit == expected
    run = queue_model.run(control, 16, 90.0, start=80.0 + over_s)
    assert run.settled_at(15, 17) - run.trace[0][0] <= SETTLE_S


@pytest.mark.parametrize(
    ("ceiling", "initial", "new_ceiling", "expected"),
    [
        pytest.param(32, 32, 8, 8, id="lowered-clamps"),
        pytest.param(8, 8, 32, 8, id="raised-does-not-jump"),
        pytest.param(8, 3, 4, 3, id="above-the-limit-changes-nothing"),
        pytest.param(8, 8, 0, 1, id="never-zero"),
    ],
)
def test_a_new_ceiling(ceiling: int, initial: int, new_ceiling: int, expected: int) -> None:
    control = RouteCapacity(ceiling, initial=initial)
    control.set_ceiling(new_ceiling)
    assert control.limit == expected
    assert control.describe()["ceiling"] == max(1, new_ceiling)


@pytest.mark.parametrize(
    "calls",
    [
        pytest.param([("observe", 1.0, 0.5, 100, 1)] * 20, id="slow-samples"),
        pytest.param([("failed", float(t)) for t in range(20)], id="refusals"),
        pytest.param([("tick", float(t)) for t in range(0, 600, 5)], id="time"),
    ],
)
def test_not_adaptive_keeps_the_ceiling(calls: list[tuple[object, ...]]) -> None:
    """With `adaptive = false` the limit is the ceiling, whatever happens."""
    control = RouteCapacity(6, adaptive=False)
    for name, *args in calls:
        getattr(control, str(name))(*args)
    assert control.limit == 6
    control.set_ceiling(9)
    assert control.limit == 9
    assert control.describe()["phase"] == "steady"


def test_not_adaptive_still_shows_a_baseline() -> None:
    """The display keeps the low percentile of recent times to first byte."""
    control = RouteCapacity(4, adaptive=False)
    for index, ttfb in enumerate([0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.6, 0.7, 0.8, 1.0]):
        control.observe(float(index), ttfb, 100, in_flight=4)
    assert control.baseline_s == pytest.approx(0.1)
    assert control.limit == 4


# --- the re-measure schedule ---------------------------------------------------------------------


def calm_traffic(control: RouteCapacity, until: float, every: float = 0.1) -> list[float]:
    """One job at a time every `every` s (0.03 s each); the times the phase became
    "remeasuring"."""
    starts: list[float] = []
    now = 0.0
    while now < until:
        control.tick(now)
        if control.phase == "remeasuring" and (not starts or starts[-1] < now - 5.0):
            starts.append(now)
        control.observe(now + 0.03, 0.03, 200, in_flight=1)
        now += every
    return starts


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        pytest.param(None, [10.0, 55.4, 100.7, 146.1], id="fixed"),
        pytest.param(1, None, id="seeded"),
    ],
)
def test_re_measures_come_on_schedule(seed: int | None, expected: list[float] | None) -> None:
    """The first re-measure 10 s in, then 45 s after the last one ended (after its 8 calm
    samples, 0.8 s here), ±15 s with a seeded rng, the same every time for the same seed."""
    rng = None if seed is None else random.Random(seed)
    control = RouteCapacity(8, rng=rng)
    starts = calm_traffic(control, 180.0)
    if expected is not None:
        assert starts == pytest.approx(expected, abs=0.25)
    else:
        again = calm_traffic(RouteCapacity(8, rng=random.Random(seed)), 180.0)
        assert starts == again
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert all(30.0 <= gap <= 60.0 + 1.0 for gap in gaps)
        assert len(set(round(gap) for gap in gaps)) > 1


def test_an_idle_route_is_not_held_down() -> None:
    """No traffic, no re-measure: a route that is not used keeps its limit for the next burst."""
    control = RouteCapacity(8)
    for second in range(600):
        control.tick(float(second))
        assert (control.limit, control.phase) == (8, "starting")


@pytest.mark.parametrize(
    ("steps", "phase", "limit"),
    [
        pytest.param([], "starting", 8, id="new"),
        pytest.param([("observe", 0.03, 0.03, 200, 1)], "steady", 8, id="one-calm-job"),
        pytest.param(
            [("observe", 0.03, 0.03, 200, 1), ("tick", 11.0)], "remeasuring", 1, id="held"
        ),
        pytest.param(
            [("observe", 0.03, 0.03, 200, 1), ("tick", 11.0), ("tick", 16.0)],
            "steady",
            8,
            id="released",
        ),
    ],
)
def test_describe(steps: list[tuple[object, ...]], phase: str, limit: int) -> None:
    """Plain data for /status and logs."""
    control = RouteCapacity(8, initial=8)
    for name, *args in steps:
        getattr(control, str(name))(*args)
    described = control.describe()
    assert (described["phase"], described["limit"], described["ceiling"]) == (phase, limit, 8)
    assert set(described) == {
        "limit",
        "ceiling",
        "adaptive",
        "phase",
        "baseline_s",
        "prefill_s_per_1k_tokens",
        "samples",
    }


# --- cheap ---------------------------------------------------------------------------------------


def test_observe_stays_cheap_under_overload() -> None:
    """Every sample slow (the costliest path: counting the queue ahead) and hundreds a second:
    the per-call work is bounded by the windows, not by the history."""
    control = RouteCapacity(256)
    control.observe(0.0, 0.03, 200, in_flight=1)
    began = time.perf_counter()
    for index in range(5_000):
        now = 1.0 + index / 500
        control.tick(now)
        control.observe(now, 2.0, 200, in_flight=200)
    assert time.perf_counter() - began < 2.0
    assert control.limit >= 1
    assert len(control._recent) <= capacity.RECENT_FIRST_BYTES
