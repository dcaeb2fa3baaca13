"""`measured` per model: the 15-minute window of served jobs (pure, with an injected clock), the
offers it is attached to, and end to end through the reference coordinator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from provider_agent.config.load import parse
from provider_agent.config.schema import Config
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.coordinator.contract import contract_problems
from provider_agent.discovery.catalog import Price, Route, capabilities_message
from provider_agent.jobs.measured import MeasuredSpeed
from provider_agent.link.protocol import JobDone, JobError, Measured, encode
from tests.agent_harness import agent_where, fake_vllm, running_agent, write_config

REQUEST = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


def served(speed: MeasuredSpeed, at: float, ttft_ms: float, tokens: int, seconds: float) -> None:
    speed.add("m", at, ttft_ms=ttft_ms, output_tokens=tokens, generation_s=seconds)


# --- the window (pure) ---------------------------------------------------------------------------


def test_medians_and_count_over_the_window() -> None:
    speed = MeasuredSpeed()
    served(speed, 10.0, 300.0, 100, 2.0)  # 50 tok/s
    served(speed, 20.0, 100.0, 30, 1.0)  # 30 tok/s
    served(speed, 30.0, 200.0, 40, 1.0)  # 40 tok/s
    assert speed.snapshot(30.0) == {
        "m": Measured(ttft_ms_p50=200.0, tokens_per_sec_p50=40.0, samples=3, window_s=900)
    }


def test_an_even_count_takes_the_heartbeats_medians() -> None:
    """Nearest-rank for the time to first byte (as `p50_latency_ms`), the mean of the middle two
    for tokens/s (as the heartbeat's `tokens_per_sec_p50`)."""
    speed = MeasuredSpeed()
    served(speed, 0.0, 100.0, 10, 1.0)
    served(speed, 0.0, 180.0, 43, 1.0)
    measured = speed.of("m", 0.0)
    assert measured is not None
    assert (measured.ttft_ms_p50, measured.tokens_per_sec_p50) == (100.0, 26.5)


def test_jobs_older_than_fifteen_minutes_leave_the_window() -> None:
    speed = MeasuredSpeed()
    served(speed, 100.0, 500.0, 10, 1.0)
    served(speed, 400.0, 100.0, 90, 1.0)
    at_edge = speed.of("m", 1000.0)  # exactly 900 s after the first: still in
    assert at_edge is not None and at_edge.samples == 2
    later = speed.of("m", 1000.5)
    assert later is not None and (later.samples, later.ttft_ms_p50) == (1, 100.0)
    assert speed.snapshot(1300.5) == {}  # absent without data, never zeros
    assert speed.of("m", 1300.5) is None


def test_models_are_kept_apart_and_unknown_ones_have_nothing() -> None:
    speed = MeasuredSpeed()
    speed.add("a", 1.0, ttft_ms=50.0, output_tokens=10, generation_s=1.0)
    speed.add("b", 1.0, ttft_ms=70.0, output_tokens=20, generation_s=1.0)
    snap = speed.snapshot(2.0)
    assert {k: (v.ttft_ms_p50, v.tokens_per_sec_p50) for k, v in snap.items()} == {
        "a": (50.0, 10.0),
        "b": (70.0, 20.0),
    }
    assert speed.of("c", 2.0) is None


@pytest.mark.parametrize("seconds", [0.0, -0.001])
def test_a_job_without_generation_time_counts_for_latency_only(seconds: float) -> None:
    speed = MeasuredSpeed()
    served(speed, 0.0, 80.0, 5, seconds)
    measured = speed.of("m", 0.0)
    assert measured is not None
    assert (measured.samples, measured.ttft_ms_p50, measured.tokens_per_sec_p50) == (1, 80.0, 0.0)


def test_rounding_matches_the_heartbeat() -> None:
    speed = MeasuredSpeed()
    served(speed, 0.0, 123.456, 10, 3.0)
    assert speed.of("m", 0.0) == Measured(
        ttft_ms_p50=123.5, tokens_per_sec_p50=3.33, samples=1, window_s=900
    )


def test_a_busy_model_keeps_only_its_newest_samples() -> None:
    speed = MeasuredSpeed(max_samples=3)
    for i in range(10):
        served(speed, float(i), float(i), 1, 1.0)
    measured = speed.of("m", 10.0)
    assert measured is not None and (measured.samples, measured.ttft_ms_p50) == (3, 8.0)


# --- the capabilities message --------------------------------------------------------------------


def config() -> Config:
    return parse(
        '[coordinator]\nurl = "wss://coord.example/provider/connect"\n'
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        '[[backends]]\nkind = "vllm"\nurl = "http://127.0.0.1:8000"\n'
    )


def route(model: str) -> tuple[Route, ...]:
    price = Price(300000, 600000)
    return (Route("b0", "vllm", model, price, frozenset({"openai"}), None, None, 0, 0),)


def test_measured_is_attached_to_the_offers_it_names_and_omitted_elsewhere() -> None:
    routes = {"a": route("a"), "b": route("b")}
    speed = MeasuredSpeed()
    speed.add("a", 0.0, ttft_ms=180.0, output_tokens=83, generation_s=2.0)
    speed.add("gone", 0.0, ttft_ms=1.0, output_tokens=1, generation_s=1.0)  # not advertised
    message = capabilities_message(config(), routes, measured=speed.snapshot(0.0))
    assert contract_problems(message) == []
    models = orjson.loads(encode(message))["models"]
    assert [m["model_id"] for m in models] == ["a", "b"]
    assert models[0]["measured"] == {
        "ttft_ms_p50": 180.0,
        "tokens_per_sec_p50": 41.5,
        "samples": 1,
        "window_s": 900,
    }
    assert "measured" not in models[1]  # absent, never null
    draining = capabilities_message(config(), routes, draining=True, measured=speed.snapshot(0.0))
    assert draining.models == []
    assert capabilities_message(config(), routes) == capabilities_message(
        config(), routes, measured={}
    )


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def test_a_served_job_shows_in_the_next_capabilities_and_a_failed_one_does_not(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m", tokens=12) as good, fake_vllm("broken") as bad:
        bad.status = 500
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(good.url, bad.url))
        async with running_agent(cfg) as daemon:
            agent = await agent_where(
                coord, lambda a: a.capabilities is not None and len(a.capabilities.models) == 2
            )
            assert agent.capabilities is not None
            assert all(o.measured is None for o in agent.capabilities.models)
            pid = agent.provider_id
            ids = []
            for model in ("m", "broken", "unknown"):
                job = await coord.send_job(pid, model, REQUEST)
                ids.append(job.job_id)
            await coord.wait_for(lambda c: all(c.jobs[i].terminal is not None for i in ids), 10)
            daemon.agent.passes.request()  # the next capabilities message
            agent = await agent_where(
                coord,
                lambda a: (
                    a.capabilities is not None and any(o.measured for o in a.capabilities.models)
                ),
            )
            assert agent.capabilities is not None
            offers = {o.model_id: o for o in agent.capabilities.models}  # before the drain's
    terminals = [coord.jobs[i].terminal for i in ids]
    assert isinstance(terminals[0], JobDone)
    assert isinstance(terminals[1], JobError) and isinstance(terminals[2], JobError)
    measured = offers["m"].measured
    assert measured is not None
    assert measured.samples == 1 and measured.window_s == 900
    assert measured.ttft_ms_p50 > 0 and measured.tokens_per_sec_p50 > 0
    assert offers["broken"].measured is None  # only job_done counts
    coord.assert_no_violations()
