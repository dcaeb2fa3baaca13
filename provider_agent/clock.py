"""PURE: how a moment is written wherever someone else reads it — the wire, `/status`, the
ledger's CSV: RFC 3339 UTC with exactly three fraction digits and `Z`
(`2026-12-06T17:23:15.412Z`, protocol.md §8). One function, so that no field drifts to
microseconds, whole seconds or `+00:00` again.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_ms(when: datetime | float) -> str:
    """`when` (an aware datetime, a naive one taken as UTC, or seconds since the epoch) as
    `YYYY-MM-DDTHH:MM:SS.mmmZ`. The fraction is truncated to the millisecond, never rounded, so
    a moment is never written later than it happened (`…:59.999999` stays in its second)."""
    if isinstance(when, datetime):
        moment = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(when, UTC)  # to the nearest microsecond
    # isoformat pads the year to four digits and truncates to the given unit.
    return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"
