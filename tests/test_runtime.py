"""The process runtime: which loop, and a heap settled so full collections stay short."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from provider_agent.runtime import event_loop_options, settle_heap


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
