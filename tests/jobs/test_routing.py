"""Admission and route order as tables: plain data in, a decision out (no sockets)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from provider_agent.discovery.catalog import Price, Route, model_concurrency
from provider_agent.jobs.routing import (
    SKIP_AFTER_FAILURE_S,
    Refusal,
    RouteLoad,
    admit,
    order_routes,
)
from provider_agent.link.protocol import WireFormat


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


def admit_with(**changes: Any) -> Refusal | None:
    args: dict[str, Any] = {
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
    return admit(**args)


EVERY_LATER_PROBLEM: dict[str, Any] = {
    "store_problem": "cannot store in /state",
    "in_flight": 4,
    "window_open": False,
    "model_id": "other",
    "fmt": "anthropic",
}


def serving(*formats: WireFormat) -> Route:
    return replace(route(), formats=frozenset(formats))


@pytest.mark.parametrize(
    ("changes", "code", "message"),
    [
        pytest.param(
            {**EVERY_LATER_PROBLEM, "status": "draining"},
            "shutting_down",
            "this agent is stopping and takes no new jobs",
            id="draining beats every other reason",
        ),
        pytest.param(
            {**EVERY_LATER_PROBLEM, "status": "paused"},
            "out_of_capacity",
            "paused for maintenance",
            id="paused beats the store and everything after it",
        ),
        pytest.param(
            EVERY_LATER_PROBLEM,
            "out_of_capacity",
            "cannot store in /state",
            id="the store beats full slots",
        ),
        pytest.param(
            {**EVERY_LATER_PROBLEM, "store_problem": None},
            "out_of_capacity",
            "all 4 job slots are busy",
            id="full slots beat the token window",
        ),
        pytest.param(
            {"in_flight": 9},
            "out_of_capacity",
            "all 4 job slots are busy",
            id="more in flight than slots (a lowered limit)",
        ),
        pytest.param(
            {"max_concurrent": 0},
            "out_of_capacity",
            "all 0 job slots are busy",
            id="no slots at all",
        ),
        pytest.param({"in_flight": 3}, None, None, id="the last slot admits"),
        pytest.param(
            {"window_open": False, "model_id": "other", "fmt": "anthropic"},
            "rate_limited",
            "the token budget of the last 60 s is spent",
            id="the token window beats an unknown model",
        ),
        pytest.param(
            {"model_id": "other", "fmt": "anthropic"},
            "model_not_loaded",
            "no backend of this agent serves this model",
            id="an unknown model beats the format",
        ),
        pytest.param(
            {"model_id": "M"},
            "model_not_loaded",
            "no backend of this agent serves this model",
            id="model ids match exactly (case)",
        ),
        pytest.param(
            {"routes": {}},
            "model_not_loaded",
            "no backend",
            id="no routes for any model",
        ),
        pytest.param(
            {"routes": {"m": ()}},
            "model_not_loaded",
            "no backend",
            id="the model listed with no routes",
        ),
        pytest.param(
            {
                "fmt": "anthropic",
                "routes": {"m": (serving("openai"),), "x": (serving("anthropic"),)},
            },
            "unsupported_format",
            "no backend serving this model speaks anthropic",
            id="another model's routes speaking the format do not count",
        ),
        pytest.param(
            {"fmt": "anthropic", "routes": {"m": (serving("openai"), serving("anthropic"))}},
            None,
            None,
            id="one of several routes speaking the format admits",
        ),
        pytest.param(
            {"fmt": "anthropic", "routes": {"m": (serving("openai", "anthropic"),)}},
            None,
            None,
            id="a route speaking both formats admits",
        ),
        pytest.param(
            {"fmt": "openai", "routes": {"m": (serving(),)}},
            "unsupported_format",
            "speaks openai",
            id="a route speaking no format",
        ),
    ],
)
def test_admission_precedence(
    changes: dict[str, Any], code: str | None, message: str | None
) -> None:
    """Each row also carries every problem checked after the one it expects, so the order shows."""
    refusal = admit_with(**changes)
    if code is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.code == code
        assert message is not None and message in refusal.message


NOW = 100.0


def spec(
    label: str,
    *,
    priority: int = 0,
    index: int = 0,
    cap: int | None = None,
    slots: int | None = None,
    formats: tuple[WireFormat, ...] = ("openai",),
    price: int = 1,
) -> Route:
    """A route named "backend/native"."""
    backend, native = label.split("/")
    made = route(backend, native, cap=cap, slots=slots, priority=priority, index=index)
    return replace(made, formats=frozenset(formats), price=Price(price, price))


def label(r: Route) -> str:
    return f"{r.backend}/{r.native_id}"


@pytest.mark.parametrize(
    ("routes", "busy", "failed", "fmt", "expected"),
    [
        pytest.param([], {}, {}, "openai", [], id="no routes"),
        pytest.param([spec("a/m")], {}, {}, "openai", ["a/m"], id="one route"),
        pytest.param(
            [spec("a/m", priority=5), spec("b/m", priority=1, index=1)],
            {},
            {},
            "openai",
            ["b/m", "a/m"],
            id="lower priority number first, before config order",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", priority=-3, index=1)],
            {},
            {},
            "openai",
            ["b/m", "a/m"],
            id="a negative priority comes first",
        ),
        pytest.param(
            [spec("b/m", index=1), spec("a/m")],
            {},
            {},
            "openai",
            ["a/m", "b/m"],
            id="ties go by config index, not input order",
        ),
        pytest.param(
            [spec("a/m2"), spec("a/m1")],
            {},
            {},
            "openai",
            ["a/m2", "a/m1"],
            id="a complete tie keeps the input order",
        ),
        pytest.param(
            [spec("a/m", price=900), spec("b/m", index=1, price=1)],
            {},
            {},
            "openai",
            ["a/m", "b/m"],
            id="price plays no part",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {"a/m": 2, "b/m": 1},
            {},
            "openai",
            ["b/m", "a/m"],
            id="fewer jobs in flight beats config order",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {"a/m": 1, "b/m": 1},
            {},
            "openai",
            ["a/m", "b/m"],
            id="equal load falls back to config order",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {"b/m": 1, "a/x": 2},
            {},
            "openai",
            ["b/m", "a/m"],
            id="load is counted per backend, over all its models",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", priority=1, index=1)],
            {"a/m": 3},
            {},
            "openai",
            ["a/m", "b/m"],
            id="priority beats load",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1, formats=("anthropic",))],
            {},
            {},
            "anthropic",
            ["b/m"],
            id="routes not speaking the format are left out",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1, formats=("openai", "anthropic"))],
            {},
            {},
            "anthropic",
            ["b/m"],
            id="a route speaking both formats is kept",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {},
            {},
            "anthropic",
            [],
            id="no route speaks the format",
        ),
        pytest.param(
            [spec("a/m", priority=-5), spec("b/m", priority=5, index=1)],
            {},
            {"a/m": NOW - 5},
            "openai",
            ["b/m", "a/m"],
            id="a recent failure goes behind even a worse priority",
        ),
        pytest.param(
            [spec("a/m", priority=2), spec("b/m", priority=1, index=1), spec("c/m", priority=9)],
            {"c/m": 4},
            {"a/m": NOW - 1, "b/m": NOW - 1},
            "openai",
            ["c/m", "b/m", "a/m"],
            id="failed routes keep their priority order among themselves",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {},
            {"a/m": NOW - SKIP_AFTER_FAILURE_S},
            "openai",
            ["a/m", "b/m"],
            id="a failure exactly the skip time ago no longer counts",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {},
            {"a/m": NOW - SKIP_AFTER_FAILURE_S + 0.001},
            "openai",
            ["b/m", "a/m"],
            id="a failure just inside the skip time counts",
        ),
        pytest.param(
            [spec("a/m"), spec("b/m", index=1)],
            {},
            {"a/m": NOW + 50},
            "openai",
            ["b/m", "a/m"],
            id="a failure stamped later than now (clock stepped back) counts",
        ),
        pytest.param(
            [spec("a/m", cap=2), spec("b/m", index=1)],
            {"a/x": 2},
            {},
            "openai",
            ["b/m"],
            id="a backend at its cap is left out, whichever model fills it",
        ),
        pytest.param(
            [spec("a/m", cap=3), spec("b/m", index=1)],
            {"a/x": 2},
            {},
            "openai",
            ["b/m", "a/m"],
            id="a backend below its cap is kept",
        ),
        pytest.param(
            [spec("a/m", cap=0), spec("b/m", index=1)],
            {},
            {},
            "openai",
            ["b/m"],
            id="a cap of 0 always leaves it out",
        ),
        pytest.param(
            [spec("a/m", slots=1), spec("b/m", index=1)],
            {"a/m": 1},
            {},
            "openai",
            ["b/m"],
            id="a route at its slot count is left out",
        ),
        pytest.param(
            [spec("a/m", slots=1), spec("b/m", index=1)],
            {"a/x": 1},
            {},
            "openai",
            ["b/m", "a/m"],
            id="slots count per route, not per backend",
        ),
        pytest.param(
            [spec("a/m", slots=0)],
            {},
            {},
            "openai",
            [],
            id="no slots at all",
        ),
        pytest.param(
            [spec("a/m", priority=-1, slots=1), spec("b/m", index=1)],
            {"a/m": 1},
            {},
            "openai",
            ["b/m"],
            id="a full route is left out even with the best priority",
        ),
        pytest.param(
            [spec("a/m", slots=1), spec("b/m", cap=1, index=1)],
            {"a/m": 1, "b/x": 1},
            {},
            "openai",
            [],
            id="every route full",
        ),
        pytest.param(
            [spec("a/m", slots=1)],
            {"a/m": 1},
            {"a/m": NOW - 1},
            "openai",
            [],
            id="a full route is left out even when it is the only one",
        ),
    ],
)
def test_route_order(
    routes: list[Route],
    busy: dict[str, int],
    failed: dict[str, float],
    fmt: WireFormat,
    expected: list[str],
) -> None:
    """`busy` is jobs in flight per "backend/native", `failed` when each last failed."""
    load = RouteLoad()
    for name, count in busy.items():
        for _ in range(count):
            load.started(spec(name))
    for name, at in failed.items():
        load.failed(spec(name), now=at)
    assert [label(r) for r in order_routes(routes, fmt, load, NOW)] == expected


# --- learned limits (protocol.md §9) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "room", "fmt", "code"),
    [
        ("a route with room admits", {"a"}, "openai", None),
        ("every route at its limit refuses at once", set(), "openai", "out_of_capacity"),
        ("one route with room of two admits", {"b"}, "openai", None),
        ("the format is checked before the limits", set(), "anthropic", "unsupported_format"),
    ],
)
def test_admission_refuses_a_job_beyond_its_routes_limits(
    name: str, room: set[str], fmt: WireFormat, code: str | None
) -> None:
    routes = {"m": (route("a"), route("b", index=1))}
    refusal = admit(
        model_id="m",
        fmt=fmt,
        routes=routes,
        in_flight=0,
        max_concurrent=8,
        window_open=True,
        status="ready",
        has_room=lambda r: r.backend in room,
    )
    assert (refusal.code if refusal else None) == code, name
    if code == "out_of_capacity":
        assert refusal is not None and "concurrency limit" in refusal.message


@pytest.mark.parametrize(
    ("name", "limits", "in_flight", "order"),
    [
        ("the most headroom first", {"a": 4, "b": 8}, {"a": 1, "b": 2}, ["b", "a"]),
        ("equal headroom: config order", {"a": 4, "b": 4}, {"a": 1, "b": 1}, ["a", "b"]),
        ("a route at its limit is left out", {"a": 2, "b": 8}, {"a": 2, "b": 7}, ["b"]),
        ("all at their limits: none", {"a": 1, "b": 1}, {"a": 1, "b": 1}, []),
        ("a learned limit below the slots wins", {"a": 1, "b": 3}, {"a": 1}, ["b"]),
    ],
)
def test_routes_order_by_headroom_under_learned_limits(
    name: str, limits: dict[str, int], in_flight: dict[str, int], order: list[str]
) -> None:
    routes = [route("a", slots=4), route("b", index=1)]
    load = RouteLoad()
    for backend, count in in_flight.items():
        for _ in range(count):
            load.started(next(r for r in routes if r.backend == backend))
    found = order_routes(routes, "openai", load, 0.0, lambda r: limits[r.backend])
    assert [r.backend for r in found] == order, name


def test_priority_still_wins_over_headroom() -> None:
    routes = [route("a", priority=0), route("b", priority=1, index=1)]
    found = order_routes(routes, "openai", RouteLoad(), 0.0, lambda r: 1 if r.backend == "a" else 8)
    assert [r.backend for r in found] == ["a", "b"]
