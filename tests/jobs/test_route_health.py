"""Traffic-aware route health: the pure rules (table-tested), then a route withdrawn by its
failing jobs and restored by a probe, end to end through the reference coordinator and the
backend simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from provider_agent.clock import Timings
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.dev.sim.records import SimRequest
from provider_agent.discovery.catalog import Price, Route
from provider_agent.jobs.route_health import (
    FAILURES_TO_WITHDRAW,
    BackendTraffic,
    RouteHealth,
    Traffic,
    healthy_by_traffic,
    probe_every_s,
    verdict,
)
from provider_agent.link.protocol import ErrorCode, JobDone, JobError
from tests.agent_harness import agent_where, free_port, running_agent, write_config
from tests.jobs.test_executor import REQUEST, finished, serving
from tests.observe.test_http_api import scrape, status_of, value


def route(backend: str = "vllm:a", native_id: str = "m") -> Route:
    return Route(
        backend=backend,
        kind="vllm",
        native_id=native_id,
        price=Price(1, 1),
        formats=frozenset({"openai"}),
        context_window=None,
        max_concurrent=None,
        priority=0,
        config_index=0,
    )


@pytest.mark.parametrize(
    ("code", "relayed", "expected"),
    [
        (None, 100, "success"),
        ("backend_unreachable", 0, "failure"),
        ("backend_error", 0, "failure"),
        ("backend_error", 500, "failure"),  # an error event mid-stream counts too
        ("auth_rejected_by_backend", 0, "failure"),
        ("backend_timeout", 0, "failure"),  # before any byte
        ("backend_timeout", 10, "neutral"),  # after bytes: slow, not broken (§8)
        ("connection_lost", 0, "neutral"),
        ("cancelled", 0, "neutral"),
        ("shutting_down", 0, "neutral"),
        ("internal", 0, "neutral"),
        ("out_of_capacity", 0, "neutral"),
        ("rate_limited", 0, "neutral"),
        ("bad_request", 0, "neutral"),  # §8: only a job_done breaks a streak
        ("model_not_loaded", 0, "neutral"),  # a 404: discovery's business (§8)
    ],
)
def test_what_a_finished_attempt_says_about_its_route(
    code: ErrorCode | None, relayed: int, expected: str
) -> None:
    assert verdict(code, relayed) == expected


def test_three_failures_in_a_row_withdraw_and_anything_served_in_between_resets() -> None:
    health = RouteHealth()
    r = route()
    assert not health.record(r, "backend_error", 0, 0.0, 5.0)
    assert not health.record(r, "backend_unreachable", 0, 1.0, 5.0)
    assert not health.record(r, None, 100, 2.0, 5.0)  # served: the streak starts again
    assert not health.record(r, "backend_error", 0, 3.0, 5.0)
    assert not health.record(r, "cancelled", 0, 3.5, 5.0)  # says nothing: streak kept
    assert not health.record(r, "connection_lost", 0, 3.6, 5.0)
    assert not health.record(r, "backend_error", 0, 4.0, 5.0)
    assert health.record(r, "backend_timeout", 0, 5.0, 5.0)  # the third in a row
    assert health.withdrawals == 1
    assert not health.record(r, "backend_error", 0, 5.5, 5.0)  # already withdrawn: once


def test_a_withdrawn_route_leaves_the_table_and_only_a_successful_probe_restores_it() -> None:
    health = RouteHealth()
    bad, good, other = route("vllm:a"), route("vllm:b"), route("vllm:a", "solo")
    table = {"m": (bad, good), "solo": (other,)}
    assert health.serving(table) is table  # nothing withdrawn: the same table, no copy
    for at in range(FAILURES_TO_WITHDRAW):
        health.record(bad, "backend_error", 0, float(at), 10.0)
    for at in range(FAILURES_TO_WITHDRAW):
        health.record(other, "backend_unreachable", 0, float(at), 10.0)
    assert health.serving(table) == {"m": (good,)}  # "solo" has no route left
    assert health.next_due_at() == 12.0
    assert health.due(11.9) == []
    assert [w.route for w in health.due(12.0)] == [bad, other]
    assert not health.probed(bad, False, 12.5, 10.0)  # still failing: next try in 10 s
    assert health.withdrawn[("vllm:a", "m")].next_probe_at == 22.5
    assert health.probed(bad, True, 23.0, 10.0)
    assert health.serving(table) == {"m": (bad, good)}
    assert (health.withdrawals, health.restorations, health.probes) == (2, 1, 2)
    assert [w.route for w in health.withdrawn.values()] == [other]
    # A restored route needs three new failures in a row to go again.
    assert not health.record(bad, "backend_error", 0, 24.0, 10.0)


def test_backends_removed_by_a_reload_are_forgotten() -> None:
    health = RouteHealth()
    gone, kept = route("vllm:gone"), route("vllm:kept")
    for at in range(FAILURES_TO_WITHDRAW):
        health.record(gone, "backend_error", 0, float(at), 1.0)
    health.record(kept, "backend_error", 0, 0.0, 1.0)
    forgotten = health.forget_backends_not_in({"vllm:kept"})
    assert [w.route for w in forgotten] == [gone]
    assert health.withdrawn == {} and health.streaks == {("vllm:kept", "m"): 1}


@pytest.mark.parametrize(("interval", "expected"), [(300, 30.0), (10, 10), (30, 30.0)])
def test_probes_run_at_most_every_min_of_interval_and_30s(interval: int, expected: float) -> None:
    assert probe_every_s(interval) == expected


# --- backends healthy by their jobs: not probed by discovery ------------------------------------

LISTED, NOW, INTERVAL = 100.0, 150.0, 300.0


@pytest.mark.parametrize(
    ("traffic", "listed_at", "now", "skip"),
    [
        (Traffic(succeeded_at=120), None, NOW, False),  # no good listing to reuse
        (Traffic(succeeded_at=120), LISTED, LISTED + INTERVAL, False),  # the listing is due
        (Traffic(streaming=2), LISTED, LISTED + INTERVAL + 1, False),  # busy, still listed
        (Traffic(), LISTED, NOW, False),  # idle: no evidence
        (Traffic(succeeded_at=90), LISTED, NOW, False),  # served only before the listing
        (Traffic(succeeded_at=120), LISTED, NOW, True),  # served since the listing
        (Traffic(streaming=1), LISTED, NOW, True),  # a job streaming now
        (Traffic(succeeded_at=120, failed_at=130), LISTED, NOW, False),  # failed after it
        (Traffic(succeeded_at=140, failed_at=130), LISTED, NOW, True),  # served after failing
        (Traffic(failed_at=130, streaming=1), LISTED, NOW, False),  # a failure needs a probe
        (Traffic(succeeded_at=120, failed_at=90), LISTED, NOW, True),  # an old failure
        (Traffic(succeeded_at=LISTED), LISTED, NOW, False),  # the same instant is not "since"
    ],
)
def test_a_backend_is_healthy_by_traffic_only_on_fresh_evidence(
    traffic: Traffic, listed_at: float | None, now: float, skip: bool
) -> None:
    assert healthy_by_traffic(traffic, listed_at, now, INTERVAL) is skip


def test_backend_traffic_keeps_the_last_success_and_failure_per_backend() -> None:
    traffic = BackendTraffic()
    assert traffic.of("a") == Traffic()
    traffic.record("a", "success", 1.0)
    traffic.record("a", "failure", 2.0)
    traffic.record("a", "neutral", 3.0)  # a cancelled job says nothing
    traffic.record("b", "success", 4.0)
    traffic.record("a", "success", 5.0)
    assert traffic.of("a", streaming=2) == Traffic(succeeded_at=5.0, failed_at=2.0, streaming=2)
    assert traffic.of("b") == Traffic(succeeded_at=4.0)


# --- end to end ----------------------------------------------------------------------------------


def posts(sim: SimBackend) -> list[SimRequest]:
    """Every completion request the simulator answered, faults included."""
    return [r for r in sim.requests if r.path.endswith("/chat/completions")]


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def test_three_failed_jobs_withdraw_the_route_and_a_probe_brings_it_back(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with SimBackend("vllm", ["m"], tokens=3, tokens_per_s=0) as sim:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(sim.base_url,))
        # Probes come fast here (min(interval_s, 30 s) in use).
        async with running_agent(cfg, timings=Timings(route_probe_s=0.2)) as daemon:
            pid = await serving(coord)
            sim.fault = Fault(kind="http", status=500)  # /health still answers: a sick GPU
            for _ in range(FAILURES_TO_WITHDRAW):
                job = await coord.send_job(pid, "m", REQUEST)
                record = await finished(coord, job.job_id)
                assert isinstance(record.terminal, JobError)
                assert record.terminal.error_code == "backend_error"
            # Withdrawn at once: an out-of-cycle capabilities message (a budget of 1 s).
            await agent_where(coord, lambda a: "m" not in a.offers(), timeout=1.0)
            assert daemon.agent.routes.health.withdrawals == 1

            # A discovery pass (the backend's /health is fine) does not bring it back.
            passes = daemon.agent.discovery.passes if daemon.agent.discovery else 0
            daemon.agent.passes.request()
            await coord.wait_for(lambda _: daemon.agent.discovery.passes > passes)
            assert "m" not in next(iter(coord.agents.values())).offers()
            # Probes were tried (and failed) while the fault lasted.
            await sim.wait_for(lambda s: len(posts(s)) >= FAILURES_TO_WITHDRAW + 1)

            sim.fault = None
            await agent_where(coord, lambda a: "m" in a.offers(), timeout=10)
            assert (
                daemon.agent.routes.health.restorations == 1
                and not daemon.agent.routes.health.withdrawn
            )
            probe = posts(sim)[-1].json()
            assert probe["max_tokens"] == 1 and probe["model"] == "m"

            job = await coord.send_job(pid, "m", REQUEST)  # served again
            record = await finished(coord, job.job_id)
            assert isinstance(record.terminal, JobDone)
    # Probes are no jobs: the coordinator saw only the four it sent.
    assert len(coord.jobs) == FAILURES_TO_WITHDRAW + 1
    coord.assert_no_violations()


async def test_a_job_for_a_withdrawn_model_is_refused_without_touching_the_backend(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with SimBackend("vllm", ["m"], tokens=3, tokens_per_s=0) as sim:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(sim.base_url,))
        # No probe during this test.
        async with running_agent(cfg, timings=Timings(route_probe_s=3600.0)):
            pid = await serving(coord)
            sim.fault = Fault(kind="http", status=503)
            for _ in range(FAILURES_TO_WITHDRAW):
                job = await coord.send_job(pid, "m", REQUEST)
                await finished(coord, job.job_id)
            await agent_where(coord, lambda a: "m" not in a.offers(), timeout=1.0)
            tried = len(posts(sim))
            job = await coord.send_job(pid, "m", REQUEST)  # as if sent before it heard
            record = await finished(coord, job.job_id)
            assert len(posts(sim)) == tried  # the sick backend never saw it
    assert isinstance(record.terminal, JobError)
    assert record.terminal.error_code == "model_not_loaded"
    coord.assert_no_violations()


def probes(sim: SimBackend, since: int = 0) -> list[str]:
    """The discovery requests (health, listing) the simulator got from request `since` on."""
    return [r.path for r in sim.requests[since:] if r.path in ("/health", "/v1/models")]


async def test_a_busy_backend_is_not_probed_by_a_pass_while_an_idle_one_is(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """A job streaming on one backend: a pass triggered meanwhile probes only the other (on
    llama-cpp-python a probe would interrupt the stream). Later, the backend whose job succeeded
    is spared and the one whose job was cancelled (no evidence) is probed."""
    long_request = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000}
    async with (
        SimBackend("vllm", ["slow"], tokens=4000, tokens_per_s=50) as busy,
        SimBackend("vllm", ["quick"], tokens=3, tokens_per_s=0) as idle,
    ):
        port = free_port()
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(busy.base_url, idle.base_url),
            prometheus_addr=f"127.0.0.1:{port}",
        )
        async with running_agent(cfg) as daemon, aiohttp.ClientSession() as http:
            discovery = daemon.agent.discovery
            pid = await serving(coord, "slow")
            await coord.wait_for(lambda _: discovery.passes >= 2)  # the start's and auth_ok's
            job = await coord.send_job(pid, "slow", long_request)
            await coord.wait_for(lambda c: c.jobs[job.job_id].bytes_relayed > 0)
            busy_mark, idle_mark = len(busy.requests), len(idle.requests)
            passes = discovery.passes
            daemon.agent.passes.request()
            await coord.wait_for(lambda _: discovery.passes > passes)
            during = probes(busy, busy_mark)
            [stream] = busy.completions
            assert stream.outcome == "open" and not stream.disconnected  # still streaming
            assert probes(idle, idle_mark) == ["/health", "/v1/models"]
            spared = await status_of(http, port)
            counted = await scrape(http, port)

            await coord.cancel_job(job.job_id)
            record = await finished(coord, job.job_id)
            quick = await coord.send_job(pid, "quick", REQUEST)
            assert isinstance((await finished(coord, quick.job_id)).terminal, JobDone)
            busy_mark, idle_mark = len(busy.requests), len(idle.requests)
            passes = discovery.passes
            daemon.agent.passes.request()
            await coord.wait_for(lambda _: discovery.passes > passes)
            assert probes(busy, busy_mark) == ["/health", "/v1/models"]  # cancelled: no evidence
            assert probes(idle, idle_mark) == []  # its job succeeded since its last probe
            assert "quick" in next(iter(coord.agents.values())).offers()  # the listing reused
            later = await scrape(http, port)
    assert during == []
    busy_label, idle_label = f"vllm:{busy.base_url}", f"vllm:{idle.base_url}"
    assert [(b.name, b.healthy, b.probe_skipped) for b in spared.backends] == [
        (busy_label, True, True),
        (idle_label, True, False),
    ]
    skipped = "provider_agent_discovery_probes_skipped_total"
    assert value(counted, skipped, backend=busy_label) == 1
    assert value(counted, skipped, backend=idle_label) == 0
    assert value(later, skipped, backend=busy_label) == 1
    assert value(later, skipped, backend=idle_label) == 1
    assert isinstance(record.terminal, JobError) and record.terminal.error_code == "cancelled"
    coord.assert_no_violations()
