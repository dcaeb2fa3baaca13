"""Saturation: a FIFO gate in front of generation, like an inference server's slots (llama.cpp's
`--parallel`, vLLM's batch budget, `OLLAMA_NUM_PARALLEL`). At most `capacity` completions hold a
slot at once; the others wait in arrival order, before any byte of their answer, and each takes
the slot the one before it frees. `capacity` None is no limit (a request never waits). It can
change at any time: raising it starts waiters at once, lowering it lets holders finish (no
preemption). anyio's `Semaphore` promises neither FIFO waiters nor a changeable capacity, hence a
small gate with one `Event` a waiter.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio


def valid_slots(value: object) -> int | None:
    """`value` as a slot count: a whole number ≥ 1, or None for no limit; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"slots must be a whole number ≥ 1 or null (no limit), not {value!r}")
    return value


def valid_seconds(name: str, value: object) -> float:
    """`value` as a duration in seconds: a finite number ≥ 0; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds ≥ 0, not {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be ≥ 0")
    return float(value)


class SlotGate:
    """At most `capacity` holders at once (None: no limit); the rest wait first come, first served.
    `on_change` is called whenever `busy` or `queued` changes."""

    def __init__(self, capacity: int | None, on_change: Callable[[], None]) -> None:
        self._capacity = valid_slots(capacity)
        self._busy = 0
        self._waiters: deque[anyio.Event] = deque()
        self._on_change = on_change

    @property
    def capacity(self) -> int | None:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        self._capacity = valid_slots(value)
        self._admit()
        self._on_change()

    @property
    def busy(self) -> int:
        """Slots held now (may exceed `capacity` for a while after it was lowered)."""
        return self._busy

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def _free(self) -> bool:
        return self._capacity is None or self._busy < self._capacity

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold a slot for the block: wait for it in turn, and always give it back."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if not self._waiters and self._free():  # no wait and no checkpoint: as if ungated
            self._busy += 1
            self._on_change()
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        self._on_change()
        try:
            await turn.wait()
        except BaseException:  # cancelled: the client went away, or the sim stopped
            if turn.is_set():  # the slot was handed over just before: pass it on
                self._release()
            else:
                self._waiters.remove(turn)
                self._on_change()
            raise

    def _release(self) -> None:
        self._busy -= 1
        self._admit()
        self._on_change()

    def _admit(self) -> None:
        """Hand free slots to the longest waiters; each counts as busy from this moment."""
        while self._waiters and self._free():
            self._busy += 1
            self._waiters.popleft().set()
