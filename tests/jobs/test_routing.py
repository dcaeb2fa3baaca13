"""Admission and route order as tables: plain data in, a decision out (no sockets)."""

from __future__ import annotations

import pytest

from provider_agent.discovery.catalog import Price, Route, model_concurrency
from provider_agent.jobs.routing import SKIP_AFTER_FAILURE_S, RouteLoad, admit, order_routes


def route(
    backend: str = "a",
    native: str = "m",
    *,
    cap: int | None = None,
    slots: int | None = None,
    priority: int = 0,
    index: int = 0,
) -> Route:
    return Route(
        backend,
        "vllm",
        native,
        Price(1, 1),
        frozenset({"openai"}),
        None,
        cap,
        priority,
        index,
        slots,
    )


ROUTES = {"m": (route(),)}


@pytest.mark.parametrize(
    ("changes", "code", "message"),
    [
        ({}, None, None),
        ({"status": "draining"}, "shutting_down", "stopping"),
        ({"status": "paused"}, "out_of_capacity", "paused for maintenance"),
        ({"status": "draining", "store_problem": "x"}, "shutting_down", "stopping"),
        ({"store_problem": "cannot store in /s"}, "out_of_capacity", "cannot store in /s"),
        ({"in_flight": 4}, "out_of_capacity", "all 4 job slots are busy"),
        ({"window_open": False}, "rate_limited", "token budget"),
        ({"model_id": "other"}, "model_not_loaded", "no backend"),
        ({"fmt": "anthropic"}, "unsupported_format", "anthropic"),
    ],
)
def test_admission_in_order(changes: dict[str, object], code: str | None, message: str) -> None:
    args: dict[str, object] = {
        "model_id": "m",
        "fmt": "openai",
        "routes": ROUTES,
        "in_flight": 0,
        "max_concurrent": 4,
        "window_open": True,
        "status": "ready",
        "store_problem": None,
        **changes,
    }
    refusal = admit(**args)  # type: ignore[arg-type]
    assert (refusal.code if refusal else None) == code
    if refusal is not None:
        assert message in refusal.message


def test_a_route_failing_is_skipped_for_10_s_but_not_the_other_models_of_its_backend() -> None:
    """protocol.md §8: the skip is per route (backend × model), not per backend."""
    load = RouteLoad()
    m1_a, m2_a, m2_b = route("a", "m1"), route("a", "m2"), route("b", "m2", index=1)
    load.failed(m1_a, now=100.0)
    assert order_routes([m2_a, m2_b], "openai", load, 101.0) == [m2_a, m2_b]
    assert order_routes([m1_a, route("b", "m1", index=1)], "openai", load, 101.0)[0].backend == "b"
    assert order_routes([m1_a], "openai", load, 101.0) == [m1_a]  # the only route: kept
    later = 100.0 + SKIP_AFTER_FAILURE_S
    assert order_routes([m1_a, route("b", "m1", index=1)], "openai", load, later)[0] == m1_a
    load.failed(m1_a, now=100.0)
    load.succeeded(m1_a)
    assert not load.recently_failed(m1_a, 101.0)


def test_slots_cap_a_route_and_the_backends_cap_counts_all_its_routes() -> None:
    load = RouteLoad()
    small = route("a", "m1", slots=2)
    other = route("a", "m2", cap=3)
    for _ in range(2):
        load.started(small)
    assert order_routes([small], "openai", load, 0.0) == []  # at its slots: left out
    load.started(other)
    assert order_routes([other], "openai", load, 0.0) == []  # backend a: 3 in flight, cap 3
    load.ended(small)
    assert order_routes([small], "openai", load, 0.0) == [small]
    assert load.backends == {"a": 2} and load.routes == {("a", "m1"): 1, ("a", "m2"): 1}
    load.ended(small)
    load.ended(other)
    assert load.backends == {} and load.routes == {}


def test_least_loaded_backend_first_among_equal_priority() -> None:
    load = RouteLoad()
    one, two = route("a", "m"), route("b", "m", index=1)
    load.started(route("a", "other"))  # backend a is busier, whatever the model
    assert order_routes([one, two], "openai", load, 0.0) == [two, one]


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ([(None, None)], 16),
        ([(None, 4)], 4),  # a llama.cpp server with -np 4
        ([(8, 4), (None, 2)], 6),
        ([(2, 4)], 2),
        ([(None, 4), (None, None)], 16),
        ([(100, 50)], 16),
    ],
)
def test_advertised_concurrency_counts_slots(
    caps: list[tuple[int | None, int | None]], expected: int
) -> None:
    routes = [route(str(i), cap=cap, slots=slots) for i, (cap, slots) in enumerate(caps)]
    assert model_concurrency(16, routes) == expected
