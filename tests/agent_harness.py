"""Test helpers: write an agent.toml, run a Daemon in-process, serve a tiny vLLM look-alike."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import orjson
from aiohttp import web
from anyio.abc import Process

from provider_agent.clock import DEFAULT_TIMINGS, Timings
from provider_agent.config.load import load
from provider_agent.daemon import Daemon
from provider_agent.dev.coordinator import AgentRecord, DevCoordinator
from provider_agent.link.identity import load_or_create
from provider_agent.link.state import ReconnectPolicy
from provider_agent.observe.telemetry import GpuTelemetry


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
    prometheus_addr: str = "",
) -> Path:
    """An agent.toml in `directory` with its identity and state kept there too (the HTTP
    endpoint off unless `prometheus_addr` is given)."""
    enrollment = f'enrollment_code = "{enrollment_code}"\n' if enrollment_code else ""
    backends = "".join(f'[[backends]]\nkind = "vllm"\nurl = "{u}"\n' for u in backend_urls)
    path = directory / "agent.toml"
    path.write_text(
        f'[coordinator]\nurl = "{coordinator_url}"\n{enrollment}'
        f"heartbeat_interval_s = {heartbeat_interval_s}\n"
        f'[identity]\nkey_path = "{directory / "identity.key"}"\n'
        f"[discovery]\ninterval_s = {interval_s}\ntimeout_s = 2\n"
        f'[state]\ndir = "{directory / "state"}"\ndrain_timeout_s = {drain_timeout_s}\n'
        f'[observability]\nprometheus_addr = "{prometheus_addr}"\n'
        f"{backends}"
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        f"{extra}"
    )
    return path


def free_port() -> int:
    """A loopback port nothing listens on now (for a config that cannot say port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fast_policy(cap_s: float = 0.2, healthy_after_s: float = 30.0) -> ReconnectPolicy:
    return ReconnectPolicy(
        base_s=0.02, cap_s=cap_s, healthy_after_s=healthy_after_s, rng=random.Random(1)
    )


@asynccontextmanager
async def running_agent(
    config_path: Path,
    policy: ReconnectPolicy | None = None,
    *,
    out_of_cycle_pass_s: float = 0.0,
    timings: Timings = DEFAULT_TIMINGS,
    telemetry: GpuTelemetry | None = None,
) -> AsyncIterator[Daemon]:
    """A Daemon running in a task group of the test; stopped (gracefully) on exit. Out-of-cycle
    passes are not spaced (tests wait on them) unless `out_of_cycle_pass_s` says so; other
    intervals are `timings`'. GPUs are sampled through `telemetry` when given."""
    config = load(config_path, allow_insecure=True)
    daemon = Daemon(
        config,
        load_or_create(config.identity.key_path),
        config_path=config_path,
        allow_insecure=True,
        policy=policy or fast_policy(),
        timings=replace(timings, out_of_cycle_pass_s=out_of_cycle_pass_s),
        telemetry=telemetry,
        handle_signals=False,
    )
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.run)
        await daemon.started.wait()
        yield daemon
        daemon.request_stop()


@dataclass
class FakeVllm:
    """A vLLM look-alike: /health, /v1/models and a streaming /v1/chat/completions.

    `gate`, when given, holds every stream after its tokens until it is set (a job in flight);
    `status` other than 200 answers completions with that error; `bodies` are the completion
    requests seen and `disconnects` counts streams the client closed before their end."""

    url: str
    models: list[str]
    tokens: int = 3
    gate: anyio.Event | None = None
    status: int = 200
    bodies: list[dict[str, object]] = field(default_factory=list)
    streamed: list[bytes] = field(default_factory=list)
    disconnects: int = 0
    started: anyio.Event = field(default_factory=anyio.Event)
    disconnected: anyio.Event = field(default_factory=anyio.Event)
    #: Answer completions for these models with this status instead (per model).
    statuses: dict[str, int] = field(default_factory=dict)
    #: The usage object to report instead of the true one (a backend's absurd figures).
    usage: dict[str, object] | None = None


def sse_chunk(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@asynccontextmanager
async def fake_vllm(*models: str, tokens: int = 3) -> AsyncIterator[FakeVllm]:
    """A loopback server that answers like vLLM's /health, /v1/models and completions."""
    state = FakeVllm("", list(models), tokens=tokens)

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def listing(_: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "max_model_len": 4096} for m in state.models]
        return web.json_response({"object": "list", "data": data})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.bodies.append(body)
        status = state.statuses.get(str(body["model"]), state.status)
        if status != 200:
            return web.json_response(
                {"error": {"message": "fake failure", "code": status}}, status=status
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = bytearray()
        try:

            async def write(data: bytes) -> None:
                sent.extend(data)
                await response.write(data)

            base = {"id": "cmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
            await write(
                sse_chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            )
            state.started.set()
            for i in range(state.tokens):
                delta = {"index": 0, "delta": {"content": f"t{i} "}}
                await write(sse_chunk({**base, "choices": [delta]}))
            if state.gate is not None:
                await state.gate.wait()
            usage = state.usage or {
                "prompt_tokens": 7,
                "completion_tokens": state.tokens,
                "total_tokens": 7 + state.tokens,
            }
            await write(sse_chunk({**base, "choices": [], "usage": usage}))
            await write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            state.disconnects += 1
            state.disconnected.set()
            raise
        finally:
            state.streamed.append(bytes(sent))
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", listing)
    app.router.add_post("/v1/chat/completions", completions)
    # handler_cancellation: a client that goes away cancels its stream, so a test sees it at once
    runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
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


class ProcessLines:
    """A child process (`provider-agent run`, `dev-coordinator`, …) with its stderr collected
    line by line, so a test can wait for a line instead of sleeping."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new_line = anyio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]
            self._new_line.set()
            self._new_line = anyio.Event()

    async def wait_for_line(self, needle: str, timeout: float = 10) -> str:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while True:
                found = next((line for line in self.lines if needle in line), None)
                if found is not None:
                    return found
                await self._new_line.wait()

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)
