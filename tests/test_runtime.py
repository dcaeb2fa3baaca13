"""The process runtime: which loop, a heap settled so full collections stay short, and how a
one-shot command ends on a signal."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from provider_agent.runtime import STOP_GRACE_S, event_loop_options, settle_heap
from tests.signals import stop_and_time


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on collecting everything, as before


def test_event_loop_options_name_uvloop_where_installed() -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert event_loop_options() == {}
    else:
        assert event_loop_options() == {"use_uvloop": True}


def test_settle_heap_moves_what_lives_now_out_of_full_collections(unfrozen: None) -> None:
    survivors = [[n] for n in range(50_000)]  # long-lived containers, as imported modules are
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    walked_all = time.perf_counter() - started
    settle_heap()
    assert gc.get_freeze_count() >= len(survivors)
    started = time.perf_counter()
    gc.collect()
    walked_new = time.perf_counter() - started
    assert walked_new < walked_all / 2


#: A one-shot command whose work is stuck in a thread that cannot be cancelled (a resolver that
#: never answers): it says "working" once the thread is in, then waits.
_STUCK = """
import sys, threading, time
import anyio.to_thread
from provider_agent.runtime import Stopped, run_until_signal

async def work() -> None:
    entered = anyio.Event()

    def stuck() -> None:
        anyio.from_thread.run_sync(entered.set)
        time.sleep(60)

    async with anyio.create_task_group() as group:
        group.start_soon(anyio.to_thread.run_sync, stuck)
        await entered.wait()
        print("working", flush=True)

result = run_until_signal(work)
sys.exit(result.exit_code if isinstance(result, Stopped) else 3)
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_stopped_one_shot_command_ends_even_with_its_work_stuck_in_a_thread(
    signum: signal.Signals, code: int
) -> None:
    """cli.md: a one-shot command abandons its work on a signal, within a second — even work
    that cannot be cancelled."""
    process = subprocess.Popen(
        [sys.executable, "-c", _STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    if process.stdout.readline() != "working\n":
        stop_and_time(process, signal.SIGKILL)
        pytest.fail("the work never started")
    err, elapsed = stop_and_time(process, signum)
    assert process.returncode == code, err
    assert elapsed < 1.0 + STOP_GRACE_S, f"took {elapsed:.2f}s"


_AFTER_A_BIG_FRAME = """
import sys
from provider_agent.runtime import pin_mmap_threshold

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

pinned = sys.argv[1] == "pin" and pin_mmap_threshold()
big = bytearray(16 * 2**20)  # a near-limit frame: mapped on its own
del big
before = rss_mb()
pieces = [bytearray(4 * 2**20) for _ in range(6)]  # later mid-size buffers
del pieces
print(pinned, round(rss_mb() - before, 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_memory_goes_back_after_a_near_limit_frame_with_the_threshold_pinned() -> None:
    """bench/fuzz.py's memory target: without the pin, the buffers after one 16 MiB block stay
    in the heap (24 MB here); with it they are given back."""
    pinned, grown = subprocess.run(
        [sys.executable, "-c", _AFTER_A_BIG_FRAME, "pin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if pinned != "True":
        pytest.skip("this C library has no mallopt")
    _, unpinned_grown = subprocess.run(
        [sys.executable, "-c", _AFTER_A_BIG_FRAME, "no"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert float(grown) < 4, grown
    assert float(unpinned_grown) > 16, unpinned_grown  # what the pin is for
