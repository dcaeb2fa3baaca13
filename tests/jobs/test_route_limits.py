"""Every route's limit as the agent reads it (protocol.md §9): ceilings, the sums advertised per
model, and when a move is worth an out-of-cycle capabilities message. Pure: no sockets."""

from __future__ import annotations

import pytest

from provider_agent.config.schema import LimitsConfig
from provider_agent.discovery.catalog import Price, Route
from provider_agent.jobs.route_limits import RouteLimits, ceiling_of, offer_moved


def route(backend: str, *, cap: int | None = None, slots: int | None = None) -> Route:
    return Route(backend, "vllm", "m", Price(1, 1), frozenset({"openai"}), None, cap, 0, 0, slots)


@pytest.mark.parametrize(
    ("name", "cap", "slots", "global_max", "ceiling"),
    [
        ("the global maximum alone", None, None, 8, 8),
        ("the backend's cap below it", 3, None, 8, 3),
        ("a llama.cpp server's slots below both", 6, 2, 8, 2),
        ("the global maximum below the slots", None, 16, 4, 4),
    ],
)
def test_a_routes_ceiling_is_the_smallest_bound(
    name: str, cap: int | None, slots: int | None, global_max: int, ceiling: int
) -> None:
    assert ceiling_of(route("a", cap=cap, slots=slots), global_max) == ceiling, name


@pytest.mark.parametrize(
    ("name", "advertised", "current", "moved"),
    [
        ("unchanged", {"m": 8}, {"m": 8}, False),
        ("by one: waits for the next message", {"m": 8}, {"m": 7}, False),
        ("by two: pushed", {"m": 8}, {"m": 6}, True),
        ("up by two: pushed", {"m": 2}, {"m": 4}, True),
        ("a model no longer served is not a move", {"m": 8}, {}, False),
        ("nothing advertised (draining)", {}, {"m": 1}, False),
    ],
)
def test_only_a_move_of_more_than_one_is_pushed(
    name: str, advertised: dict[str, int], current: dict[str, int], moved: bool
) -> None:
    assert offer_moved(advertised, current) is moved, name


def test_a_models_max_concurrent_is_the_sum_of_its_routes_at_most_the_global() -> None:
    config = LimitsConfig(max_concurrent=8)
    limits = RouteLimits(lambda: config)
    routes = {"m": [route("a", slots=2), route("b", cap=3)], "n": [route("c"), route("d")]}
    assert limits.model_limits(routes, 0.0) == {"m": 5, "n": 8}


def test_without_adaptive_the_limit_is_the_ceiling_whatever_the_samples() -> None:
    config = LimitsConfig(max_concurrent=8, adaptive=False)
    limits = RouteLimits(lambda: config)
    served = route("a", slots=4)
    for at in range(100):
        limits.observe(served, float(at), 30.0, 100, 4)  # every job queued for 30 s
    assert limits.limit(served, 100.0) == 4


def test_a_reload_that_lowers_the_global_maximum_lowers_every_ceiling() -> None:
    config = [LimitsConfig(max_concurrent=8)]
    limits = RouteLimits(lambda: config[0])
    served = route("a")
    assert limits.limit(served, 0.0) == 8
    config[0] = LimitsConfig(max_concurrent=3)
    assert limits.limit(served, 1.0) == 3
    [shown] = limits.shown([served], 1.0)
    assert (shown.limit, shown.advertised, shown.ceiling) == (3, 3, 3)


def test_queued_first_bytes_lower_the_limit_and_say_so() -> None:
    """A route whose jobs start queueing past two at once comes down, and the agent hears of
    the change (it then decides whether to push capabilities). A queue's wait is judged
    against how long the route's jobs take: 2 s of 1 s jobs is a queue."""
    moves: list[int] = []
    config = LimitsConfig(max_concurrent=8)
    limits = RouteLimits(lambda: config, on_change=lambda: moves.append(1))
    served = route("a")
    now = 0.0
    for _ in range(20):  # calm: one at a time, 0.1 s to the first byte, 1 s in all
        now += 1.0
        limits.observe(served, now, 0.1, 100, 1)
        limits.finished(served, 1.0)
    for _ in range(20):  # eight at once, and a queue: 2 s to the first byte
        now += 0.5
        limits.observe(served, now, 2.0, 100, 8)
    assert limits.limit(served, now) < 8 and moves


def test_milliseconds_of_jitter_on_a_fast_backend_are_not_a_queue() -> None:
    """First bytes of 1 ms that become 80 ms in a burst, on jobs of 5 s: scheduling, not a
    wait for a slot (which would be most of a job); the limit stays."""
    config = LimitsConfig(max_concurrent=256)
    limits = RouteLimits(lambda: config)
    served = route("a")
    now = 0.0
    for _ in range(20):
        now += 6.0
        limits.observe(served, now, 0.001, 100, 1)
        limits.finished(served, 5.0)
    for _ in range(200):
        now += 0.01
        limits.observe(served, now, 0.08, 100, 256)
    assert limits.limit(served, now) == 256
