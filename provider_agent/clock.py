"""Time, in one place: how long the agent waits for each thing (`Timings`, handed to every part
that waits, so a test passes small values instead of setting attributes), the monotonic clock
(`Clock`), and how a moment is written wherever someone else reads it (`utc_ms`).

`parse_duration` reads what an operator types (`90s`, `30m`, `2h`, `1d`) for `pause --for` and
`upgrade --watch`; `human_duration` is how every command shows one (`1m 05s`, `2h`).

`utc_ms` is RFC 3339 UTC with exactly three fraction digits and `Z` (`2026-12-06T17:23:15.412Z`,
protocol.md §8): one function, so that no field drifts to microseconds, whole seconds or
`+00:00` again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import anyio


@dataclass(frozen=True)
class Timings:
    """Every fixed interval and deadline of the running agent (the configurable ones live in
    agent.toml). The defaults are the contract's; tests pass smaller ones."""

    # The link (protocol.md §1, §4).
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    handshake_timeout_s: float = 15.0
    #: How long a closing socket waits for the coordinator's close frame.
    close_timeout_s: float = 5.0
    #: The writer writes at most once this often; a job's first bytes never wait for it.
    write_spacing_s: float = 0.001
    #: A job whose frames cannot leave for this long ends `connection_lost` (protocol.md §4).
    send_stall_s: float = 5.0
    # Discovery and route health (protocol.md §2).
    #: Out-of-cycle discovery passes (auth_ok, reload, a failing backend) at most this often.
    out_of_cycle_pass_s: float = 10.0
    #: Between probes of a withdrawn route; None: min(discovery interval, 30 s).
    route_probe_s: float | None = None
    #: The one-token completion that may restore a withdrawn route is given this long.
    route_probe_timeout_s: float = 30.0
    # The store.
    #: How often the outbox drops what it no longer needs to keep.
    prune_every_s: float = 3600.0
    # The supervisor: a crashed child restarts after base, doubling up to cap.
    restart_base_s: float = 1.0
    restart_cap_s: float = 30.0
    # The shutdown steps other than the drain (which is `state.drain_timeout_s`).
    announce_s: float = 2.0
    cancel_jobs_s: float = 5.0
    flush_outbox_s: float = 5.0
    close_session_s: float = 5.0

    @property
    def shutdown_budget_s(self) -> float:
        """The shutdown steps' deadlines summed (systemd hears it with the drain's)."""
        return self.announce_s + self.cancel_jobs_s + self.flush_outbox_s + self.close_session_s


#: The contract's timings, for parts built without a test's.
DEFAULT_TIMINGS = Timings()


class Clock:
    """Monotonic seconds and sleeping: the event loop's, unless a test passes its own."""

    def now(self) -> float:
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


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


#: The units of a duration an operator types, in seconds.
DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]+)?)([a-z])")


def human_duration(seconds: float) -> str:
    """A duration as a person reads it, in its two largest units (the second left out when it is
    0): `250ms`, `1.5s`, `45s`, `1m 05s`, `2m`, `1h 02m`, `1d`, `2d 03h`. What `status` shows for
    uptimes and ages, `pause` for the time left, `upgrade` for its steps and `doctor` for a pause's
    age."""
    if round(seconds * 1000) < 1000:
        return f"{max(0.0, seconds) * 1000:.0f}ms"
    tenths = round(seconds, 1)
    if tenths < 10 and tenths != int(tenths):
        return f"{tenths:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    big, big_s, small, small_s = next(pair for pair in _UNIT_PAIRS if whole >= pair[1])
    count, rest = divmod(whole, big_s)
    rest //= small_s
    return f"{count}{big}" + (f" {rest:02d}{small}" if rest else "")


#: (unit, its seconds, the next smaller unit, its seconds), largest first.
_UNIT_PAIRS: Final = (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1))


def parse_duration(
    text: str,
    option: str,
    *,
    at_most_s: float,
    at_most: str,
    units: str = "smhd",
    signed: bool = True,
) -> float:
    """`90s`, `30m`, `2h`, `1d` (a number with one of `units`) → seconds; a ValueError whose text
    is the one line the operator sees, naming `option`. `signed`: a sign is read (so that `-5m`
    is refused as not longer than 0) rather than not being a duration at all."""
    shown = ascii(text[:40]) + ("…" if len(text) > 40 else "")
    match = _DURATION.fullmatch(text.strip())
    if match is None or match[3] not in units or (match[1] and not signed):
        examples = ", ".join(e for e in ("90s", "30m", "2h", "1d") if e[-1] in units)
        why = f"not a duration; write a number with a unit: {examples}"
        raise ValueError(f"{option} {shown}: {why}")
    seconds = float(match[1] + match[2]) * DURATION_UNITS[match[3]]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{option} {shown}: must be longer than 0")
    if seconds > at_most_s:
        raise ValueError(f"{option} {shown}: at most {at_most}")
    return seconds
