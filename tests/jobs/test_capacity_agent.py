"""Learned route limits in a running agent (protocol.md §9): a simulated server with 2 slots that
queues beyond them, jobs through the reference coordinator. The limit comes down to the knee, the
coordinator hears it (capabilities out of cycle, heartbeats), jobs beyond it are refused at once,
and `/status` and `/metrics` show it. With `adaptive = false` nothing of that happens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.link.protocol import JobDone, JobError
from tests.agent_harness import running_agent, write_config
from tests.jobs.test_executor import REQUEST, finished, serving

SLOTS = 2


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def offer(coord: DevCoordinator, pid: str, jobs: int) -> list[str]:
    """`jobs` jobs at once; the codes they ended with (`done` for a job_done)."""
    sent = [await coord.send_job(pid, "m", REQUEST) for _ in range(jobs)]
    codes: list[str] = []
    for job in sent:
        terminal = (await finished(coord, job.job_id)).terminal
        assert isinstance(terminal, JobDone | JobError)
        codes.append("done" if isinstance(terminal, JobDone) else str(terminal.error_code))
    return codes


def advertised(coord: DevCoordinator) -> int:
    [agent] = coord.agents.values()
    return agent.offers()["m"].max_concurrent


async def test_a_saturated_route_is_learned_refused_beyond_and_shown(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    # 20 tokens at 100/s: a slot is busy for about 0.2 s; the unloaded first byte takes 20 ms.
    async with SimBackend("vllm", ["m"], tokens=20, tokens_per_s=100, ttft_s=0.02) as sim:
        sim.slots = SLOTS
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(sim.base_url,), heartbeat_interval_s=1
        )
        async with running_agent(cfg) as daemon:
            pid = await serving(coord)
            assert advertised(coord) == 8  # the ceiling, until jobs teach otherwise
            for _ in range(12):  # one at a time: the unloaded baseline
                assert await offer(coord, pid, 1) == ["done"]
            codes: list[str] = []
            with anyio.fail_after(30):
                while advertised(coord) > SLOTS + 1:  # bursts of 6 on 2 slots: queueing
                    codes += await offer(coord, pid, 6)
            codes += await offer(coord, pid, 6)
            assert "out_of_capacity" in codes  # beyond the learned limit: refused at once
            assert "backend_timeout" not in codes
            status = await daemon.agent.snapshot()
            [route] = status.models[0].routes
            assert route.limit is not None and 1 <= route.limit <= SLOTS + 1
            assert route.ceiling == 8 and route.ttfb_baseline_ms is not None
            daemon.agent.metrics.observe(status)
            text = daemon.agent.metrics.exposition()[0].decode()
            label = f'backend="vllm:{sim.base_url}"'
            assert f"provider_agent_route_concurrency_limit{{{label}}} {route.limit}.0" in text
            assert f"provider_agent_route_ttfb_baseline_seconds{{{label}}}" in text
            [agent] = coord.agents.values()

            def beats() -> list[int]:
                beat = agent.last_heartbeat
                return [b.limit for b in beat.backends or ()] if beat is not None else []

            with anyio.fail_after(5):
                while not any(limit <= SLOTS + 1 for limit in beats()):  # noqa: ASYNC110 (a heartbeat a second)
                    await anyio.sleep(0.1)
            assert len(beats()) == 1
    coord.assert_no_violations()


async def test_fixed_limits_when_adaptive_is_off(coord: DevCoordinator, tmp_path: Path) -> None:
    async with SimBackend("vllm", ["m"], tokens=20, tokens_per_s=100, ttft_s=0.02) as sim:
        sim.slots = SLOTS
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(sim.base_url,),
            extra="[limits]\nadaptive = false\nmax_concurrent = 6\n",
        )
        async with running_agent(cfg) as daemon:
            pid = await serving(coord)
            for _ in range(4):
                assert await offer(coord, pid, 1) == ["done"]
            for _ in range(4):  # the backend queues, every job is still taken
                assert await offer(coord, pid, 6) == ["done"] * 6
            assert advertised(coord) == 6
            status = await daemon.agent.snapshot()
            [route] = status.models[0].routes
            assert (route.limit, route.ceiling) == (6, 6)
