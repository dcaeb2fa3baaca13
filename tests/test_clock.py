"""Every timestamp the agent writes for others: RFC 3339 UTC, exactly three fraction digits, `Z`
(protocol.md §8), truncated to the millisecond at the extremes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from provider_agent.clock import human_duration, parse_duration, utc_ms

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (datetime(2026, 12, 6, 17, 23, 15, 0, tzinfo=UTC), "2026-12-06T17:23:15.000Z"),
        (datetime(2026, 12, 6, 17, 23, 15, 412_000, tzinfo=UTC), "2026-12-06T17:23:15.412Z"),
        # 999999 µs: truncated, never rounded up into the next second (or year).
        (datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "2026-12-31T23:59:59.999Z"),
        (datetime(2026, 12, 6, 17, 23, 15, 999, tzinfo=UTC), "2026-12-06T17:23:15.000Z"),
        # Another zone is converted; a naive time is taken as UTC.
        (
            datetime(2026, 12, 7, 1, 0, 0, 5_000, tzinfo=timezone(timedelta(hours=2))),
            "2026-12-06T23:00:00.005Z",
        ),
        (datetime(2026, 12, 6, 17, 23, 15, 412_345), "2026-12-06T17:23:15.412Z"),
        # The year keeps four digits at both ends of what a datetime holds.
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
        (datetime.max.replace(tzinfo=UTC), "9999-12-31T23:59:59.999Z"),
        # Seconds since the epoch.
        (0, "1970-01-01T00:00:00.000Z"),
        (0.0009, "1970-01-01T00:00:00.000Z"),
        (1_796_577_795.412, "2026-12-06T17:23:15.412Z"),
        (1_796_577_795.9999, "2026-12-06T17:23:15.999Z"),
        (1_796_577_795, "2026-12-06T17:23:15.000Z"),
    ],
)
def test_three_digits_and_z_truncated(when: datetime | float, expected: str) -> None:
    text = utc_ms(when)
    assert text == expected
    assert RFC3339_MS.fullmatch(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.25, "250ms"),
        (0.9996, "1s"),
        (1.0, "1s"),
        (1.25, "1.2s"),
        (9.96, "10s"),
        (42, "42s"),
        (59.6, "1m"),
        (61, "1m 01s"),
        (65, "1m 05s"),
        (90.0, "1m 30s"),
        (120, "2m"),
        (3599, "59m 59s"),
        (3725, "1h 02m"),
        (7199, "1h 59m"),
        (7200, "2h"),
        (86400, "1d"),
        (90000, "1d 01h"),
        (2 * 86400 + 3 * 3600, "2d 03h"),
        (400 * 86400, "400d"),
    ],
)
def test_a_duration_reads_as_its_two_largest_units(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize("text", ["90s", "30m", "2h", "1d"])
def test_what_parse_duration_reads_shows_as_typed(text: str) -> None:
    seconds = parse_duration(text, "--for", at_most_s=30 * 86400, at_most="30d")
    assert human_duration(seconds) == {"90s": "1m 30s"}.get(text, text)
