"""The tokens-per-minute window with an injected clock: admit, slide, correct, fill."""

from __future__ import annotations

import pytest

from provider_agent.jobs.ratelimit import TokenWindow


def test_no_limit_always_admits_and_reads_empty() -> None:
    window = TokenWindow(None)
    window.add(0, 10**9)
    assert window.admit(0)
    assert window.fill(0) == 0.0
    assert window.total(0) == 10**9


def test_admits_until_the_window_reaches_the_limit() -> None:
    window = TokenWindow(100)
    assert window.admit(0)
    window.add(0.5, 60)
    assert window.admit(1)
    window.add(1.2, 39)
    assert window.admit(2)  # 99 < 100
    window.add(2, 1)
    assert not window.admit(2)  # exactly at the limit is full
    window.add(3, 500)  # a job already running may go past it
    assert window.total(3) == 600
    assert window.fill(3) == 1.0


def test_tokens_leave_the_window_after_window_s() -> None:
    window = TokenWindow(100, window_s=60)
    window.add(10.0, 100)
    window.add(40.0, 50)
    assert not window.admit(69.9)
    assert window.total(69.9) == 150
    assert window.total(70.0) == 50  # the second-10 bucket is a window old
    assert window.admit(70.0)
    assert window.total(100.0) == 0
    assert window.fill(100.0) == 0.0


def test_fill_is_the_fraction_of_the_limit() -> None:
    window = TokenWindow(200)
    window.add(0, 50)
    assert window.fill(0) == 0.25


def test_correction_adds_a_shortfall() -> None:
    window = TokenWindow(1000)
    window.add(0, 10)
    window.correct(5, counted=10, actual=40)
    assert window.total(5) == 40


def test_correction_takes_back_an_excess_from_the_newest_buckets() -> None:
    window = TokenWindow(1000)
    window.add(0, 100)
    window.add(1, 5)
    window.add(2, 5)
    window.correct(3, counted=110, actual=30)
    assert window.total(3) == 30
    # What remains sits in the oldest bucket and leaves with it: the window never goes negative.
    assert window.total(60.5) == 0


def test_correction_never_takes_more_than_the_window_holds() -> None:
    window = TokenWindow(1000)
    window.add(0, 10)
    window.correct(1, counted=500, actual=0)
    assert window.total(1) == 0
    window.add(2, 7)
    assert window.total(2) == 7


def test_ignores_non_positive_additions_and_a_clock_that_steps_back() -> None:
    window = TokenWindow(100)
    window.add(0, 0)
    window.add(0, -5)
    assert window.total(0) == 0
    window.add(10, 3)
    window.add(9.5, 4)  # earlier than the newest bucket: counted in it
    assert window.total(10) == 7
    assert window.total(69.9) == 7
    assert window.total(70) == 0


def test_memory_stays_one_bucket_per_second_under_a_flood() -> None:
    window = TokenWindow(10**12, window_s=60)
    for event in range(200_000):  # 10,000 events/s for 20 s, then 10 s more
        window.add(event / 10_000, 1)
    assert window.total(19.99999) == 200_000
    assert len(window._buckets) <= 60
    for second in range(20, 200):
        window.add(second, 1)
    assert len(window._buckets) <= 60
    assert window.total(199.5) == 60


@pytest.mark.parametrize(("window_s", "bucket_s"), [(0, 1), (-1, 1), (60, 0)])
def test_a_window_needs_positive_spans(window_s: float, bucket_s: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenWindow(10, window_s=window_s, bucket_s=bucket_s)


def test_a_short_window_with_fine_buckets() -> None:
    window = TokenWindow(10, window_s=1, bucket_s=0.1)
    window.add(0.05, 10)
    assert not window.admit(0.95)
    assert window.admit(1.0)
