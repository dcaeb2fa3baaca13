"""Test helpers: write an agent.toml, run a Daemon in-process, serve a tiny vLLM look-alike."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from aiohttp import web

from provider_agent.config import load
from provider_agent.daemon import Daemon
from provider_agent.dev.coordinator import AgentRecord, DevCoordinator
from provider_agent.identity import load_or_create
from provider_agent.session_state import ReconnectPolicy


def write_config(
    directory: Path,
    coordinator_url: str,
    *,
    backend_urls: tuple[str, ...] = (),
    heartbeat_interval_s: int = 15,
    interval_s: int = 300,
    enrollment_code: str | None = None,
    drain_timeout_s: int = 60,
    extra: str = "",
) -> Path:
    """An agent.toml in `directory` with its identity and state kept there too."""
    enrollment = f'enrollment_code = "{enrollment_code}"\n' if enrollment_code else ""
    backends = "".join(f'[[backends]]\nkind = "vllm"\nurl = "{u}"\n' for u in backend_urls)
    path = directory / "agent.toml"
    path.write_text(
        f'[coordinator]\nurl = "{coordinator_url}"\n{enrollment}'
        f"heartbeat_interval_s = {heartbeat_interval_s}\n"
        f'[identity]\nkey_path = "{directory / "identity.key"}"\n'
        f"[discovery]\ninterval_s = {interval_s}\ntimeout_s = 2\n"
        f'[state]\ndir = "{directory / "state"}"\ndrain_timeout_s = {drain_timeout_s}\n'
        f'[observability]\nprometheus_addr = ""\n'
        f"{backends}"
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        f"{extra}"
    )
    return path


def fast_policy(cap_s: float = 0.2, healthy_after_s: float = 30.0) -> ReconnectPolicy:
    return ReconnectPolicy(
        base_s=0.02, cap_s=cap_s, healthy_after_s=healthy_after_s, rng=random.Random(1)
    )


@asynccontextmanager
async def running_agent(
    config_path: Path, policy: ReconnectPolicy | None = None
) -> AsyncIterator[Daemon]:
    """A Daemon running in a task group of the test; stopped (gracefully) on exit."""
    config = load(config_path, allow_insecure=True)
    daemon = Daemon(
        config,
        load_or_create(config.identity.key_path),
        config_path=config_path,
        allow_insecure=True,
        policy=policy or fast_policy(),
        handle_signals=False,
    )
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.run)
        await daemon.started.wait()
        yield daemon
        daemon.request_stop()


@dataclass
class FakeVllm:
    url: str
    models: list[str]


@asynccontextmanager
async def fake_vllm(*models: str) -> AsyncIterator[FakeVllm]:
    """A loopback server that answers like vLLM's /health and /v1/models."""
    state = FakeVllm("", list(models))

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def listing(_: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "max_model_len": 4096} for m in state.models]
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", listing)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def agent_where(
    coord: DevCoordinator,
    predicate: Callable[[AgentRecord], object] = bool,
    timeout: float = 5.0,  # noqa: ASYNC109 (read as `agent_where(c, pred, timeout=…)`)
) -> AgentRecord:
    """Wait for the (single) agent the coordinator knows to satisfy `predicate`; return it."""

    def matching(c: DevCoordinator) -> AgentRecord | None:
        record = next(iter(c.agents.values()), None)
        return record if record is not None and predicate(record) else None

    found = await coord.wait_for(matching, timeout=timeout)
    assert found is not None
    return found
