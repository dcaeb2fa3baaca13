"""How a long-running process of this package runs: on which event loop, and with what heap.

Both serve the relay's latency (bench/relay.py): uvloop halves its CPU per event, and a settled
heap keeps the garbage collector from stalling every stream at once.
"""

from __future__ import annotations

import gc


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
