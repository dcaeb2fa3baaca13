"""When discovery passes run: every `interval_s`, and sooner when asked (auth_ok, reload, a
failing backend) — but out-of-cycle passes at most once per `out_of_cycle_pass_s` (protocol.md
§2), so a flapping coordinator cannot make the agent probe in a loop. What a pass does is the
caller's (`refresh`)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio

from provider_agent.clock import Clock


class PassSchedule:
    """Single-flight: asking for a pass while one is wanted costs nothing."""

    def __init__(
        self,
        refresh: Callable[[], Awaitable[None]],
        interval_s: Callable[[], float],
        spacing_s: float,
        clock: Clock,
    ) -> None:
        self._refresh = refresh
        self._interval_s = interval_s
        self.spacing_s = spacing_s
        self.clock = clock
        self._wanted = anyio.Event()
        self._last_failure_request = -math.inf

    def request(self) -> None:
        """A pass now (or as soon as the spacing allows)."""
        self._wanted.set()

    def request_for_failure(self) -> bool:
        """A backend failed a job: a pass soon, at most once per spacing; True when asked."""
        now = self.clock.now()
        if now - self._last_failure_request < self.spacing_s:
            return False
        self._last_failure_request = now
        self.request()
        return True

    async def run(self) -> None:
        """Run passes until cancelled (the first one has run already, before the first dial)."""
        self._wanted = anyio.Event()
        last = self.clock.now()
        while True:
            with anyio.move_on_after(self._interval_s()):
                await self._wanted.wait()
                await anyio.sleep(max(0.0, last + self.spacing_s - self.clock.now()))
            self._wanted = anyio.Event()
            last = self.clock.now()
            await self._refresh()
