"""The HTTP endpoint on a real loopback port: /healthz, /readyz, /metrics, /status, served by an
agent connected to the reference coordinator and relaying real jobs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import aiohttp
import anyio
import anyio.abc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from provider_agent.clock import Timings
from provider_agent.config.load import load
from provider_agent.daemon import Daemon
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.errors import ConfigError
from provider_agent.jobs.route_health import FAILURES_TO_WITHDRAW
from provider_agent.link.identity import load_or_create
from provider_agent.link.protocol import JobDone, JobError
from provider_agent.observe import http_api
from provider_agent.observe.prometheus import AgentMetrics
from provider_agent.observe.status import AgentStatus
from provider_agent.ops import pause as control
from provider_agent.ops.render import render_status
from tests.agent_harness import (
    agent_where,
    fake_vllm,
    free_port,
    running_agent,
    write_config,
)
from tests.jobs.test_executor import finished
from tests.nvml_stand_in import StandInGpu, StandInNvml
from tests.observe.test_telemetry import telemetry_of
from tests.test_clock import RFC3339_MS
from tests.test_daemon import agent_process

REQUEST = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def scrape(http: aiohttp.ClientSession, port: int) -> Samples:
    """/metrics, parsed by prometheus-client's own parser (which raises on a malformed line)."""
    status, text = await get(http, port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value, 0 when it does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def status_of(http: aiohttp.ClientSession, port: int) -> AgentStatus:
    code, text = await get(http, port, "/status")
    assert code == 200
    return AgentStatus.model_validate_json(text)


async def until_answer(
    http: aiohttp.ClientSession,
    port: int,
    path: str,
    code: int,
    timeout: float = 10,  # noqa: ASYNC109
) -> str:
    """Ask `path` until it answers `code` (the agent's state has no event a test can await)."""
    with anyio.fail_after(timeout):
        while True:
            status, text = await get(http, port, path)
            if status == code:
                return text
            await anyio.sleep(0.02)


async def serving(coord: DevCoordinator, model: str = "m") -> str:
    agent = await agent_where(
        coord,
        lambda a: (
            a.capabilities is not None and any(o.model_id == model for o in a.capabilities.models)
        ),
    )
    return agent.provider_id


async def test_metrics_parse_and_move_while_a_job_runs(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    async with fake_vllm("m", tokens=5) as backend:
        backend.gate = anyio.Event()
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(backend.url,),
            prometheus_addr=f"127.0.0.1:{port}",
        )
        label = f"vllm:{backend.url}"
        async with running_agent(cfg):
            pid = await serving(coord)
            await until_answer(http, port, "/readyz", 200)
            before = await scrape(http, port)
            job = await coord.send_job(pid, "m", REQUEST)
            with anyio.fail_after(10):
                await backend.started.wait()
            during = await scrape(http, port)
            running = (await status_of(http, port)).jobs.running
            backend.gate.set()
            await coord.wait_for(lambda c: c.jobs[job.job_id].terminal is not None, 10)
            after = await scrape(http, port)
    done = {"backend": label, "outcome": "done", "code": "job_done"}
    assert value(before, "provider_agent_jobs_total", **done) == 0
    assert value(after, "provider_agent_jobs_total", **done) == 1
    assert value(before, "provider_agent_jobs_in_flight") == 0
    assert value(during, "provider_agent_jobs_in_flight") == 1
    assert [(r.job_id, r.model_id) for r in running] == [(job.job_id, "m")]
    assert value(after, "provider_agent_jobs_in_flight") == 0
    tokens = "provider_agent_tokens_total"
    assert value(after, tokens, backend=label, direction="output") == 5
    assert value(after, tokens, backend=label, direction="input") == 7
    relayed = value(after, "provider_agent_relayed_bytes_total", backend=label)
    assert relayed == len(backend.streamed[0]) > 0
    for histogram in ("job_time_to_first_byte_seconds", "job_duration_seconds"):
        name = f"provider_agent_{histogram}_count"
        assert value(before, name, backend=label) == 0
        assert value(after, name, backend=label) == 1
    assert value(after, "provider_agent_discovery_pass_duration_seconds_count") >= 1
    for samples in (before, during, after):
        assert value(samples, "provider_agent_session_state", state="authenticated") == 1
        assert value(samples, "provider_agent_session_state", state="idle") == 0
        assert value(samples, "provider_agent_backend_up", backend=label, kind="vllm") == 1
        assert value(samples, "provider_agent_models_advertised") == 1
        assert value(samples, "provider_agent_ready") == 1
        assert value(samples, "provider_agent_outbox_depth") >= 0
    # The library's own families sit beside the agent's.
    assert any(name == "process_cpu_seconds_total" for name, _ in after)
    assert any(name == "python_info" for name, _ in after)
    assert any(name == "provider_agent_build_info" for name, _ in after)
    coord.assert_no_violations()


async def test_readyz_flips_to_503_when_the_coordinator_goes_away_and_back(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    coord = DevCoordinator(host="127.0.0.1", port=0)
    await coord.start()
    try:
        async with fake_vllm("m") as backend:
            cfg = write_config(
                tmp_path,
                coord.ws_url,
                backend_urls=(backend.url,),
                prometheus_addr=f"127.0.0.1:{port}",
            )
            async with running_agent(cfg):
                await serving(coord)
                ready = await until_answer(http, port, "/readyz", 200)
                assert ready.strip() == "ready: authenticated, 1 of 1 backend(s) healthy"
                await coord.aclose()
                gone = await until_answer(http, port, "/readyz", 503)
                assert gone.startswith("not ready: not authenticated to the coordinator")
                assert (await get(http, port, "/healthz")) == (200, "ok\n")
                await coord.start()  # the same port again
                await until_answer(http, port, "/readyz", 200)
                samples = await scrape(http, port)
                status = await status_of(http, port)
    finally:
        await coord.aclose()
    assert total(samples, "provider_agent_session_reconnects_total") >= 1
    assert value(samples, "provider_agent_session_reconnects_total", cause="planned") >= 1
    assert status.session.authenticated and status.session.reconnects >= 1
    assert status.session.attempts >= 2
    coord.assert_no_violations()


async def test_readyz_names_every_reason_and_status_lists_the_failing_backend(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = write_config(
        tmp_path, coord.ws_url, backend_urls=(dead,), prometheus_addr=f"127.0.0.1:{port}"
    )
    async with running_agent(cfg):
        await agent_where(coord, lambda a: a.capabilities is not None)
        reason = await until_answer(http, port, "/readyz", 503)
        status = await status_of(http, port)
        samples = await scrape(http, port)
        assert (await get(http, port, "/nowhere"))[0] == 404
    assert reason.strip() == "not ready: no healthy backend (0 of 1 in the last discovery pass)"
    assert status.readiness.reason == reason.strip()
    (backend,) = status.backends
    assert backend.name == f"vllm:{dead}" and not backend.healthy and backend.error
    assert status.models == [] and status.models_advertised == 0
    assert status.last_pass_at is not None and status.provider_id is not None
    assert value(samples, "provider_agent_backend_up", backend=backend.name, kind="vllm") == 0
    assert value(samples, "provider_agent_ready") == 0
    coord.assert_no_violations()


async def test_no_secret_in_any_answer(
    coord: DevCoordinator,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A BYOK key (a canary in the environment), the enrollment code and the identity's secret
    appear in none of the endpoint's answers, also after a job the backend refused."""
    key, enrollment = "sk-canary-9f8e7d6c5b4a", "enroll-canary-1a2b3c4d"
    monkeypatch.setenv("CANARY_OPENROUTER_KEY", key)
    port = free_port()
    async with SimBackend("openrouter", ["sim/model"], api_key=key, tokens=3) as sim:
        byok = (
            f'[[backends]]\nkind = "openrouter"\nurl = "{sim.base_url}"\n'
            'api_key_env = "CANARY_OPENROUTER_KEY"\n'
        )
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            enrollment_code=enrollment,
            prometheus_addr=f"127.0.0.1:{port}",
            extra=byok,
        )
        async with running_agent(cfg):
            pid = await serving(coord, "sim/model")
            ok = await coord.send_job(pid, "sim/model", REQUEST)
            await coord.wait_for(lambda c: c.jobs[ok.job_id].terminal is not None, 10)
            sim.fault = Fault(kind="http", status=401, count=1)
            refused = await coord.send_job(pid, "sim/model", REQUEST)
            await coord.wait_for(lambda c: c.jobs[refused.job_id].terminal is not None, 10)
            answers = [(await get(http, port, path))[1] for path in ("/metrics", "/status")]
            answers += [(await get(http, port, path))[1] for path in ("/readyz", "/healthz")]
            status = await status_of(http, port)
    secret_key = json.loads((tmp_path / "identity.key").read_text())["secret_key"]
    assert sim.requests[-1].headers["Authorization"] == f"Bearer {key}"  # the key was in use
    assert [note.code for note in status.last_errors] == ["auth_rejected_by_backend"]
    assert status.backends[0].name == f"openrouter:{sim.base_url}"
    for answer in answers:
        for secret in (key, enrollment, secret_key):
            assert secret not in answer
    coord.assert_no_violations()


async def test_an_address_in_use_fails_the_start_naming_it(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, coord.ws_url, prometheus_addr=f"127.0.0.1:{port}")
        config = load(cfg, allow_insecure=True)
        daemon = Daemon(
            config, load_or_create(config.identity.key_path), config_path=cfg, handle_signals=False
        )
        with anyio.fail_after(10), pytest.raises(ConfigError) as caught:
            await daemon.run()
    assert caught.value.key == "observability.prometheus_addr"
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in str(caught.value)
    assert not coord.attempts  # it failed before dialling the coordinator


# --- operations: the pause, the GPUs, route health ----------------------------------------------


async def until_status(
    http: aiohttp.ClientSession,
    port: int,
    predicate: Callable[[AgentStatus], bool],
    timeout: float = 10,  # noqa: ASYNC109
) -> AgentStatus:
    """Ask `/status` until `predicate` holds (GPU samples come once per heartbeat interval)."""
    with anyio.fail_after(timeout):
        while True:
            status = await status_of(http, port)
            if predicate(status):
                return status
            await anyio.sleep(0.05)


async def test_a_pause_shows_with_its_reason_and_time_left_and_goes_with_resume(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    async with fake_vllm("m") as backend:
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(backend.url,), prometheus_addr=f"127.0.0.1:{port}"
        )
        async with running_agent(cfg):
            await serving(coord)
            before = await status_of(http, port)
            idle = await scrape(http, port)
            request = control.ControlRequest(op="pause", for_s=7200, reason="driver upgrade")
            await control.call(tmp_path / "state", request)
            paused = await status_of(http, port)
            during = await scrape(http, port)
            await control.call(tmp_path / "state", control.ControlRequest(op="resume"))
            after = await status_of(http, port)
            resumed = await scrape(http, port)
    assert before.paused is None and after.paused is None
    assert value(idle, "provider_agent_paused") == 0 == value(resumed, "provider_agent_paused")
    assert value(during, "provider_agent_paused") == 1
    pause = paused.paused
    assert pause is not None and pause.reason == "driver upgrade" and pause.until is not None
    # protocol.md §8: every timestamp in /status is RFC 3339 UTC, three fraction digits, Z.
    for stamp in (pause.since, pause.until, paused.started_at, paused.last_pass_at):
        assert stamp is not None and RFC3339_MS.fullmatch(stamp), stamp
    assert pause.left_s is not None and 7000 < pause.left_s <= 7200
    assert paused.advertising == "paused" and paused.models_advertised == 0
    text = render_status(paused)
    left = "2h" if pause.left_s == 7200 else "1h 59m"
    assert (
        f"\npaused: since {pause.since}, until {pause.until} ({left} left); "
        "reason: driver upgrade\n"
    ) in text
    assert "paused:" not in render_status(after)
    coord.assert_no_violations()


async def test_gpus_show_in_status_and_metrics_and_follow_each_sample(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    nvml = StandInNvml(StandInGpu(), StandInGpu(uuid="GPU-2", name=b"NVIDIA L4"))
    cfg = write_config(
        tmp_path, coord.ws_url, heartbeat_interval_s=1, prometheus_addr=f"127.0.0.1:{port}"
    )
    try:
        async with running_agent(cfg, telemetry=telemetry_of(nvml)):
            first = await until_status(http, port, lambda s: len(s.gpus) == 2)
            well = await scrape(http, port)
            nvml.gpus[1].temperature = nvml.gpus[1].slowdown  # throttling: unhealthy
            nvml.gpus[0].memory_used = 1024 * 2**20
            hot = await until_status(http, port, lambda s: not s.gpus[1].healthy)
            sick = await scrape(http, port)
    finally:
        nvml.release.set()
    h100, l4 = first.gpus
    assert (h100.index, h100.uuid, h100.name) == (0, StandInGpu().uuid, "NVIDIA H100 80GB HBM3")
    assert (h100.memory_used_mb, h100.memory_total_mb) == (70211, 81559)
    assert (h100.utilization_pct, h100.temperature_c, h100.power_w) == (87, 64, 512.3)
    assert h100.healthy and l4.healthy and (l4.index, l4.name) == (1, "NVIDIA L4")
    assert hot.gpus[1].faults == ["temperature 90 C at or above its slowdown 90 C"]
    assert hot.gpus[0].healthy and hot.gpus[0].memory_used_mb == 1024
    gpu0 = {"index": "0", "uuid": StandInGpu().uuid}
    gpu1 = {"index": "1", "uuid": "GPU-2"}
    assert value(well, "provider_agent_gpu_memory_used_bytes", **gpu0) == 70211 * 2**20
    assert value(well, "provider_agent_gpu_memory_total_bytes", **gpu0) == 81559 * 2**20
    assert value(well, "provider_agent_gpu_utilization_ratio", **gpu0) == 0.87
    assert value(well, "provider_agent_gpu_temperature_celsius", **gpu0) == 64
    assert value(well, "provider_agent_gpu_power_watts", **gpu0) == 512.3
    assert value(well, "provider_agent_gpu_healthy", **gpu1) == 1
    assert value(sick, "provider_agent_gpu_healthy", **gpu1) == 0
    assert value(sick, "provider_agent_gpu_temperature_celsius", **gpu1) == 90
    assert value(sick, "provider_agent_gpu_memory_used_bytes", **gpu0) == 1024 * 2**20
    text = render_status(hot)
    assert text.endswith(
        "GPU  NAME                            MEMORY  UTIL  TEMP    POWER  HEALTH\n"
        "  0  NVIDIA H100 80GB HBM3   1024/81559 MiB   87%  64 C  512.3 W  ok\n"
        "  1  NVIDIA L4              70211/81559 MiB   87%  90 C  512.3 W  FAIL\n"
        "    unhealthy: temperature 90 C at or above its slowdown 90 C"
    )
    coord.assert_no_violations()


async def test_no_gpus_without_telemetry(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path,
        coord.ws_url,
        heartbeat_interval_s=1,
        prometheus_addr=f"127.0.0.1:{port}",
        extra='[telemetry]\ngpu = "off"\n',
    )
    nvml = StandInNvml(StandInGpu())
    async with running_agent(cfg, telemetry=telemetry_of(nvml)):
        await agent_where(coord, lambda a: a.heartbeat_count >= 2)
        status = await status_of(http, port)
        samples = await scrape(http, port)
    assert status.gpus == [] and nvml.calls == []
    assert not any(name.startswith("provider_agent_gpu_") for name, _ in samples)
    assert "GPU" not in render_status(status)


async def test_a_withdrawn_route_shows_until_a_probe_restores_it_and_every_step_is_counted(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    async with SimBackend("vllm", ["m"], tokens=3, tokens_per_s=0) as sim:
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(sim.base_url,),
            prometheus_addr=f"127.0.0.1:{port}",
        )
        label = f"vllm:{sim.base_url}"
        async with running_agent(cfg, timings=Timings(route_probe_s=0.3)):
            pid = await serving(coord)
            healthy = await scrape(http, port)
            sim.fault = Fault(kind="http", status=500)  # /health still answers: a sick GPU
            for _ in range(FAILURES_TO_WITHDRAW):
                failed = await coord.send_job(pid, "m", REQUEST)
                await finished(coord, failed.job_id)
            await agent_where(coord, lambda a: "m" not in a.offers())
            withdrawn = await until_status(
                http, port, lambda s: s.withdrawn_routes != [] and s.withdrawn_routes[0].probes > 0
            )
            failing = await scrape(http, port)
            sim.fault = None
            await agent_where(coord, lambda a: "m" in a.offers(), timeout=10)
            restored = await status_of(http, port)
            back = await scrape(http, port)
            job = await coord.send_job(pid, "m", REQUEST)
            await finished(coord, job.job_id)
    [route] = withdrawn.withdrawn_routes
    assert (route.backend, route.model, route.last_code) == (label, "m", "backend_error")
    assert route.since.endswith("Z") and route.next_probe_in_s is not None
    assert restored.withdrawn_routes == []
    assert isinstance(coord.jobs[job.job_id].terminal, JobDone)
    withdrawals, restorations = (
        "provider_agent_route_withdrawals_total",
        ("provider_agent_route_restorations_total"),
    )
    probes, gauge = "provider_agent_route_probes_total", "provider_agent_routes_withdrawn"
    assert value(healthy, withdrawals, backend=label) == 0 == value(healthy, gauge, backend=label)
    assert value(failing, withdrawals, backend=label) == 1
    assert value(failing, gauge, backend=label) == 1
    assert value(failing, probes, backend=label, result="failed") >= 1
    assert value(failing, restorations, backend=label) == 0
    assert value(back, restorations, backend=label) == 1
    assert value(back, probes, backend=label, result="ok") == 1
    assert value(back, gauge, backend=label) == 0
    text = render_status(withdrawn)
    assert "withdrawn routes (their last jobs failed" in text
    assert f"{label}  m      {route.since}  backend_error" in text
    assert isinstance(coord.jobs[failed.job_id].terminal, JobError)
    coord.assert_no_violations()


# --- the `status` command and `run`'s exit code, as real processes ------------------------------


async def provider_agent(*args: str) -> tuple[int, str, str]:
    """`python -m provider_agent ARGS`: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT_")}
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "provider_agent", *args], env=env, check=False
        )
    assert done.returncode is not None
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_status_shows_a_live_agent_then_says_none_answers(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    port = free_port()
    async with fake_vllm("m") as backend:
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(backend.url,), prometheus_addr=f"127.0.0.1:{port}"
        )
        async with agent_process(cfg, "--allow-insecure") as agent:
            pid = await serving(coord)
            await agent.wait_for_line("authenticated to coordinator")
            code, text, errors = await provider_agent(
                "status", "--config", str(cfg), "--allow-insecure"
            )
            json_code, as_json, _ = await provider_agent(
                "status", "--json", "--config", str(cfg), "--allow-insecure"
            )
            agent.signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await agent.process.wait() == 0
        gone_code, gone_out, gone = await provider_agent(
            "status", "--config", str(cfg), "--allow-insecure"
        )
    assert code == 0, errors
    assert f"provider_id: {pid}" in text
    assert "session: authenticated for " in text
    assert "readiness: ready: authenticated, 1 of 1 backend(s) healthy" in text
    assert f"vllm:{backend.url}  vllm  ok" in text
    assert "\nm " in text and "jobs: 0 in flight of 8" in text
    assert json_code == 0
    status = AgentStatus.model_validate_json(as_json)
    assert status.provider_id == pid and status.session.state == "authenticated"
    assert [m.model_id for m in status.models] == ["m"]
    assert [r.backend for r in status.models[0].routes] == [f"vllm:{backend.url}"]
    assert gone_code == 1 and gone_out == ""
    assert gone.count("\n") == 1
    assert gone.startswith(f"status: no agent answers at http://127.0.0.1:{port}/status (")
    coord.assert_no_violations()


async def test_status_with_the_endpoint_disabled_says_so(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:1/provider/connect")  # prometheus_addr = ""
    code, out, errors = await provider_agent("status", "--config", str(cfg), "--allow-insecure")
    assert code == 1 and out == "" and errors.count("\n") == 1
    assert errors.startswith("status: the HTTP endpoint is disabled (observability.prometheus_addr")


@pytest.mark.parametrize(
    ("status", "body", "fragment"),
    [
        (404, b"not found", "answered HTTP 404, not as an agent"),
        (500, b"", "answered HTTP 500, not as an agent"),
        (200, b"<html>grafana</html>", "not with an agent's /status object"),
        (200, b'{"agent_version": "0.1.0"}', "not with an agent's /status object"),
        (200, b"\xff\xfe\x00garbage", "not with an agent's /status object"),
        (200, b"[" * 100_000, "not with an agent's /status object"),
    ],
)
async def test_status_against_something_else_is_one_clear_line(
    tmp_path: Path, status: int, body: bytes, fragment: str
) -> None:
    """Another program on the port (an exporter, a web page, garbage) is not taken for an agent."""
    from aiohttp import web

    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_get("/status", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        cfg = write_config(
            tmp_path, "ws://127.0.0.1:1/provider/connect", prometheus_addr=f"127.0.0.1:{port}"
        )
        code, out, errors = await provider_agent("status", "--config", str(cfg), "--allow-insecure")
    finally:
        await runner.cleanup()
    assert code == 1 and out == "" and errors.count("\n") == 1, errors
    assert errors.startswith(f"status: http://127.0.0.1:{port}/status ") and fragment in errors
    assert "Traceback" not in errors


# --- a flood of connections (config.md, settled: 64 at most, idle ones closed after 10 s) ------


class Flood:
    """Raw connections to a port that send nothing; `closed` counts those the server closed."""

    def __init__(self) -> None:
        self.streams: list[anyio.abc.SocketStream] = []
        self.closed = 0
        self.closed_at: list[float] = []
        self._changed = anyio.Event()

    async def open(self, port: int, count: int, group: anyio.abc.TaskGroup) -> None:
        async def one() -> None:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            self.streams.append(stream)
            group.start_soon(self._watch, stream)

        async with anyio.create_task_group() as connecting:
            for _ in range(count):
                connecting.start_soon(one)

    async def _watch(self, stream: anyio.abc.SocketStream) -> None:
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        self.closed += 1
        self.closed_at.append(anyio.current_time())
        self._changed.set()
        self._changed = anyio.Event()

    async def until_closed(self, count: int, timeout: float = 10) -> None:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while self.closed < count:
                await self._changed.wait()

    async def aclose(self) -> None:
        for stream in self.streams:
            await stream.aclose()


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_flood_of_connections_cannot_take_the_descriptors_jobs_need(
    coord: DevCoordinator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A local user holding connections to the metrics port used to exhaust the agent's file
    descriptors (NOFILE 1024; here 256): every job then failed `backend_unreachable`. The
    endpoint holds at most 64; jobs still run, and a real scrape still gets its answer."""
    port = free_port()
    async with fake_vllm("m") as backend:
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(backend.url,), prometheus_addr=f"127.0.0.1:{port}"
        )
        async with agent_process(cfg, "--allow-insecure", nofile=256) as agent:
            pid = await serving(coord)
            await until_answer(http, port, "/readyz", 200)
            baseline = open_files(agent.process.pid)
            flood = Flood()
            async with anyio.create_task_group() as group:
                await flood.open(port, 400, group)
                await flood.until_closed(400 - http_api.MAX_CONNECTIONS)
                held = open_files(agent.process.pid) - baseline
                job = await coord.send_job(pid, "m", REQUEST)
                done = await coord.wait_for(
                    lambda c: c.jobs[job.job_id] if c.jobs[job.job_id].terminal else None, 20
                )
                async with aiohttp.ClientSession() as fresh:
                    status, text = await get(fresh, port, "/healthz")
                still_open = 400 - flood.closed
                await flood.aclose()
                group.cancel_scope.cancel()
            agent.signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await agent.process.wait() == 0
    assert held <= http_api.MAX_CONNECTIONS + 2, held  # + the odd descriptor of the moment
    assert isinstance(done.terminal, JobDone), done.terminal
    assert (status, text) == (200, "ok\n")  # a newcomer takes an idle flooder's place
    assert 0 < still_open <= http_api.MAX_CONNECTIONS
    assert any("http endpoint: 64 connections held" in line for line in agent.lines)
    coord.assert_no_violations()


async def test_a_connection_without_a_complete_request_is_closed_after_the_idle_limit(
    tmp_path: Path,
) -> None:
    """Silent, trickling a header a byte at a time (slowloris), or silent after an answer: each
    is closed once `idle_s` passes without a complete request, and not before."""
    port = free_port()

    async def no_snapshot() -> AgentStatus:
        raise AssertionError("only /healthz is asked for here")

    endpoint = http_api.Endpoint(("127.0.0.1", port), no_snapshot, AgentMetrics())
    idle_s = 0.5
    async with anyio.create_task_group() as group:
        await group.start(partial(http_api.serve, endpoint, idle_s=idle_s))
        started = anyio.current_time()
        flood = Flood()
        await flood.open(port, 3, group)
        _silent, trickling, answered = flood.streams

        async def trickle() -> None:
            await trickling.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                while True:
                    await trickling.send(b"X")
                    await anyio.sleep(0.05)  # pacing the trickle, not waiting for anything

        group.start_soon(trickle)
        await answered.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await flood.until_closed(3)
        async with aiohttp.ClientSession() as session:
            after = await get(session, port, "/healthz")
        group.cancel_scope.cancel()
    for closed_at in flood.closed_at:
        assert idle_s * 0.8 <= closed_at - started <= idle_s + 3
    assert after == (200, "ok\n")


#: What a hostile process on the agent's port may put in any string of its `/status`: terminal
#: escapes (clear the screen, a title, colours), a carriage return that hides the line, a bell,
#: a bidi override, a NUL.
EVIL = "\x1b[2J\x1b]0;owned\x07\x1b[31mred\rX\u202e\x00"


def evil_status() -> dict[str, object]:
    """A `/status` object with EVIL in every string field, nested ones included."""
    return {
        "agent_version": EVIL,
        "provider_id": EVIL,
        "advertising": EVIL,
        "models_advertised": 1,
        "uptime_s": 5.0,
        "started_at": EVIL,
        "readiness": {"ready": False, "reason": EVIL},
        "session": {"state": EVIL, "authenticated": False},
        "backends": [{"name": EVIL, "kind": EVIL, "healthy": False, "error": EVIL}],
        "last_pass_at": EVIL,
        "models": [
            {
                "model_id": EVIL,
                "formats": [EVIL],
                "routes": [{"backend": EVIL, "native_id": EVIL, "priority": 0}],
            }
        ],
        "jobs": {
            "in_flight": 1,
            "max_concurrent": 8,
            "running": [
                {
                    "job_id": EVIL,
                    "model_id": EVIL,
                    "backend": EVIL,
                    "age_s": 1.0,
                    "bytes_relayed": 3,
                }
            ],
        },
        "outbox": {"depth": None, "error": EVIL},
        "rate_window": {"tokens_last_60s": 0},
        "last_errors": [{"at": EVIL, "source": EVIL, "code": EVIL, "message": EVIL}],
        "paused": {"since": EVIL, "until": EVIL, "left_s": 60.0, "reason": EVIL},
        "gpus": [{"index": 0, "healthy": False, "uuid": EVIL, "name": EVIL, "faults": [EVIL]}],
        "withdrawn_routes": [
            {"backend": EVIL, "model": EVIL, "since": EVIL, "last_code": EVIL, "probes": 1}
        ],
    }


async def test_status_escapes_every_string_from_whatever_answers_on_the_port(
    tmp_path: Path,
) -> None:
    """cli.md (settled): `status` shows foreign strings escaped, like everything else — all of
    them: a process answering on the agent's port chooses every field."""
    from aiohttp import web

    async def answer(_: web.Request) -> web.Response:
        return web.json_response(evil_status())

    app = web.Application()
    app.router.add_get("/status", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        cfg = write_config(
            tmp_path, "ws://127.0.0.1:1/provider/connect", prometheus_addr=f"127.0.0.1:{port}"
        )
        code, out, errors = await provider_agent("status", "--config", str(cfg))
        json_code, as_json, _ = await provider_agent("status", "--json", "--config", str(cfg))
    finally:
        await runner.cleanup()
    assert code == 0, errors
    unsafe = [ch for ch in out if not ch.isprintable() and ch != "\n"]
    assert unsafe == [], sorted(set(unsafe))
    shown = "\\x1b[2J\\x1b]0;owned\\x07\\x1b[31mred\\rX\\u202e\\x00"
    assert out.count(shown) >= 20  # each field, shown escaped rather than dropped
    assert json_code == 0 and "\x1b" not in as_json  # JSON escapes control characters itself


async def test_run_with_the_endpoints_address_in_use_exits_78_with_one_line(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:1/provider/connect")
    load_or_create(tmp_path / "identity.key")  # so that `run` logs no "identity created"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg.write_text(
            cfg.read_text().replace('prometheus_addr = ""', f'prometheus_addr = "127.0.0.1:{port}"')
        )
        code, out, errors = await provider_agent("run", "--config", str(cfg), "--allow-insecure")
    assert code == 78 and out == ""
    assert errors.count("\n") == 1, errors
    assert errors.startswith(
        f"config error: {cfg}: observability.prometheus_addr: cannot listen on 127.0.0.1:{port}: "
        "address already in use"
    )
