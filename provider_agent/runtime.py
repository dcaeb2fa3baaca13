"""How a process of this package runs: on which event loop, and with what heap; and how a
one-shot command's work ends on SIGINT/SIGTERM (`run_until_signal`).

The first two serve the relay's latency (bench/relay.py): uvloop halves its CPU per event, and a
settled heap keeps the garbage collector from stalling every stream at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.abc

T = TypeVar("T")


def event_loop_options() -> dict[str, bool]:
    """uvloop where it is installed (Linux: a default dependency) — it halves the relay's cost
    per event (bench/relay.py); the stdlib loop elsewhere."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def settle_heap() -> None:
    """Collect once, then move every object alive now into the collector's permanent generation.

    Call it once startup is done. The modules, classes and schemas a server imports are about
    55,000 objects that live as long as the process; every full collection walked them all, at a
    moment of the collector's choosing: 14-28 ms on a 2-core machine, a stall that 256 streams
    feel at once (bench/relay.py saw its p99 added TTFT go from 3-6 ms to 25-31 ms in the runs a
    full collection fell into). Frozen, they are skipped, and a full collection walks only what
    the process made since: 1-5 ms. Objects made later are collected as before.
    """
    gc.collect()
    gc.freeze()
    pin_mmap_threshold()


#: glibc's `M_MMAP_THRESHOLD` (malloc.h) and its default: blocks this large or larger are mapped
#: on their own and go back to the kernel when freed.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def pin_mmap_threshold(size: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep glibc's mmap threshold at its default instead of letting it drift up.

    glibc raises the threshold to the size of every mapped block that is freed (up to 32 MiB),
    and the heap's trim threshold with it: after one near-16 MiB frame from the coordinator, every
    later block under 16 MiB comes from the heap and is not given back, and the agent sat ~30 MB
    higher for good (bench/fuzz.py's memory target). Set explicitly, the threshold stays put.
    False where the C library has no `mallopt` (musl, macOS): nothing to pin there."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, size))


def release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc's `malloc_trim`): what startup and the
    first discovery pass allocated and freed would otherwise stay in the idle agent's RSS. False
    where the C library has no `malloc_trim`."""
    import ctypes

    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(malloc_trim(0))


# --- one-shot commands and signals ----------------------------------------------------------------

#: After SIGINT/SIGTERM, how long a one-shot command's abandoned work gets to unwind before the
#: process ends regardless (a worker thread in a DNS lookup or in NVML cannot be cancelled).
STOP_GRACE_S = 0.5


@dataclass(frozen=True)
class Stopped:
    """A one-shot command was stopped by a signal before its work was done."""

    signum: int

    @property
    def exit_code(self) -> int:
        """cli.md (settled 2026-12-06): 130 for SIGINT, 0 for SIGTERM (a requested stop)."""
        return 130 if self.signum == signal.SIGINT else 0


def run_until_signal(body: Callable[[], Awaitable[T]]) -> T | Stopped:
    """Run a one-shot command's work (`discover`, `doctor`) in an event loop of its own; SIGINT or
    SIGTERM abandons it at once and returns `Stopped`. Work that does not unwind within
    STOP_GRACE_S (a thread blocked in the resolver) does not hold the process: it then ends with
    the stop's exit code all the same. An exception from `body` is raised as it is."""
    outcome: list[T] = []
    failure: list[Exception] = []
    stopped: list[Stopped] = []

    async def main() -> None:
        work = anyio.CancelScope()

        async def watch(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                task_status.started()
                async for signum in received:
                    stop = Stopped(signum)
                    stopped.append(stop)
                    _exit_after(STOP_GRACE_S, stop.exit_code)
                    work.cancel()
                    return

        async with anyio.create_task_group() as group:
            await group.start(watch)
            with work:
                try:
                    outcome.append(await body())
                except Exception as exc:  # raised below, outside the task group's wrapping
                    failure.append(exc)
            group.cancel_scope.cancel()

    anyio.run(main)
    if stopped:
        return stopped[0]
    if failure:
        raise failure[0]
    return outcome[0]


def _exit_after(delay_s: float, code: int) -> None:
    """End the process with `code` after `delay_s`, unless it has ended by then."""

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or full stream: end all the same
                stream.flush()
        os._exit(code)

    timer = threading.Timer(delay_s, end)
    timer.daemon = True
    timer.start()


async def first_of(*bodies: Callable[[], Awaitable[object]]) -> None:
    """Run the bodies concurrently; return as soon as one of them returns."""
    async with anyio.create_task_group() as group:

        async def run(body: Callable[[], Awaitable[object]]) -> None:
            await body()
            group.cancel_scope.cancel()

        for body in bodies:
            group.start_soon(run, body)
