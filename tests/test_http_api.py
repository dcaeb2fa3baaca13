"""The HTTP endpoint on a real loopback port: /healthz, /readyz, /metrics, /status, served by an
agent connected to the reference coordinator and relaying real jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from provider_agent.config import load
from provider_agent.daemon import Daemon
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.simbackend import Fault, SimBackend
from provider_agent.errors import ConfigError
from provider_agent.identity import load_or_create
from provider_agent.status import AgentStatus
from tests.agent_harness import (
    agent_where,
    fake_vllm,
    free_port,
    running_agent,
    write_config,
)
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
