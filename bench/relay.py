"""Benchmark: the hot path, the same streaming load direct to a backend and through the agent.

    .venv/bin/python bench/relay.py [--streams 256] [--rate 40] [--tokens 200] [--repeat 5]
                                    [--no-double]

Three separate processes on loopback: a simulated vLLM (this file, `--serve-backend`), the
reference coordinator (`provider-agent dev-coordinator`) and the agent (`provider-agent run`).
All streams start at once; the backend writes one SSE event per token at `--rate` tokens/s per
stream. The load runs directly against the backend, then through coordinator → agent → backend.

Figures (targets from docs' benchmarks contract):
- wall through the agent ÷ wall direct (≤ 1.1);
- added time to first token, as the issue defines it: the first `job_chunk`'s arrival at the
  coordinator (its `/jobs` record, matched by the `X-Job-Id` response header) − the backend's
  first write for that stream (matched by the request's `user` field), minus the direct client's
  first arrival − first write at the same percentile (p50 ≤ 2 ms, p99 ≤ 10 ms). All ends read
  `time.monotonic()`, one clock on Linux. The client-side figure (through the coordinator's HTTP
  front, which adds its own relay) is printed for information, and so is the agent's dispatch:
  the coordinator's `job` frame → the backend's first write;
- agent CPU (utime + stime from /proc/<pid>/stat) per relayed token event (≤ 40 µs) and the
  ceiling it implies (events/s one core relays);
- agent peak RSS (VmHWM from /proc/<pid>/status, ≤ 150 MB, MB = 2**20 bytes).
The pair (direct, then through the agent) runs `--repeat` times (5) against the same processes
and every figure is the median of the runs (the RSS: the highest): a shared 2-core machine
where four processes compete is noisy, and one lucky or unlucky run decides nothing. Each run's
own figures are printed too.
A second set at twice the rate (`--double`, on by default) shows where the agent stops keeping
up; its figures are reported, not held to the targets. Prints a table and one summary line;
exits 1 when a target is missed or a stream did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import orjson
from _common import BenchError, cpu_seconds, free_port, peak_rss_mb, percentile, verdict
from aiohttp import web

from provider_agent.runtime import event_loop_options, settle_heap

_T = TypeVar("_T")
MODEL = "m"
TARGET_RATIO = 1.1
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 10.0
TARGET_US_PER_EVENT = 40.0
TARGET_RSS_MB = 150.0
READY_TIMEOUT_S = 30.0
DONE_MARK = b"data: [DONE]"


# --- the simulated backend (a separate process) --------------------------------------------------


@dataclass
class BackendState:
    rate: float
    tokens: int
    #: `time.monotonic()` of each stream's first body write, by the request's `user` field.
    first_write: dict[str, float] = field(default_factory=dict)
    streams: int = 0


def backend_app(state: BackendState) -> web.Application:
    """vLLM's /health, /v1/models and streaming /v1/chat/completions, plus /stats and /reset."""

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        data = [{"id": MODEL, "object": "model", "max_model_len": 4096}]
        return web.json_response({"object": "list", "data": data})

    async def stats(_: web.Request) -> web.Response:
        payload = {"first_write": state.first_write, "streams": state.streams}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        state.rate = float(request.query.get("rate", state.rate))
        state.tokens = int(request.query.get("tokens", state.tokens))
        state.first_write.clear()
        state.streams = 0
        return web.Response()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        user = str(body.get("user", ""))
        rate, tokens = state.rate, state.tokens
        state.streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": f"cmpl-{user}", "object": "chat.completion.chunk", "model": MODEL}
        started = time.monotonic()
        for i in range(tokens):
            delta: dict[str, str] = {"content": f"t{i} "}
            if i == 0:
                delta["role"] = "assistant"
            event = {**base, "choices": [{"index": 0, "delta": delta}]}
            data = b"data: " + orjson.dumps(event) + b"\n\n"
            if i == 0:
                state.first_write[user] = time.monotonic()
            await response.write(data)
            if i + 1 < tokens:
                # paced to a schedule from the first write, so pacing error does not accumulate
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}))
        await response.write(b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def serve_backend(port: int, rate: float, tokens: int) -> None:
    runner = web.AppRunner(backend_app(BackendState(rate, tokens)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()  # until the benchmark terminates this process


# --- the load client (in the benchmark process) ---------------------------------------------------


@dataclass
class StreamResult:
    user: str
    job_id: str | None = None
    status: int | None = None
    first_at: float | None = None
    end_at: float | None = None
    complete: bool = False
    error: str | None = None


class StreamClient(asyncio.Protocol):
    """One streaming request over HTTP/1.0, so the body arrives unframed and ends with the
    connection: the first body byte's arrival and the `[DONE]` event's arrival are recorded.
    A raw protocol rather than an HTTP client library keeps the client's CPU small on a shared
    2-core machine, where it competes with the processes measured."""

    def __init__(self, request: bytes, result: StreamResult, finished: asyncio.Future[None]):
        self.request = request
        self.result = result
        self.finished = finished
        self.head = bytearray()
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        result = self.result
        if result.status is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            result.status = int(head[0].split()[1])
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "x-job-id":
                    result.job_id = value.strip()
            data = bytes(self.head[end + 4 :])
        if not data:
            return
        if result.first_at is None:
            result.first_at = now
        window = self.tail + data
        if not result.complete and DONE_MARK in window:
            result.complete = True
            result.end_at = now
        self.tail = window[-len(DONE_MARK) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.result.error = str(exc) or type(exc).__name__
        if self.result.end_at is None:
            self.result.end_at = time.monotonic()
        if not self.finished.done():
            self.finished.set_result(None)


def request_bytes(port: int, user: str, tokens: int) -> bytes:
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count."}],
            "stream": True,
            "max_tokens": tokens,
            "user": user,
        }
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_one(port: int, result: StreamResult, tokens: int) -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    request = request_bytes(port, result.user, tokens)
    try:
        await loop.create_connection(
            lambda: StreamClient(request, result, finished), "127.0.0.1", port
        )
    except OSError as exc:
        result.error = f"connect: {exc.strerror or exc}"
        return
    await finished


async def run_load(
    port: int, label: str, streams: int, tokens: int
) -> tuple[float, float, list[StreamResult]]:
    """All streams at once: the start, the wall time from it to the last stream's end, results."""
    results = [StreamResult(f"{label}-{i}") for i in range(streams)]
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for result in results:
            group.create_task(run_one(port, result, tokens))
    ends = [r.end_at for r in results if r.end_at is not None]
    return started, (max(ends) if ends else time.monotonic()) - started, results


# --- processes and /proc --------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in text)


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """Started children, each terminated (then killed) on the way out, errors and ^C included."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            if child.process.poll() is None:
                child.process.terminate()
        for child in reversed(started):
            try:
                child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def spawn(started: list[Child], name: str, argv: Sequence[str], workdir: Path) -> Child:
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    child = Child(name, process, log)
    started.append(child)
    return child


def write_agent_config(directory: Path, coordinator_port: int, backend_port: int) -> Path:
    """The agent under test, with the learned limits on (the default): 256 streams started at
    once make the backend's first bytes take up to ~100 ms instead of 1 ms, which is no queue
    for jobs of 5 s (protocol.md §9: `jobs/capacity.py` judges lateness against the route's job
    durations), so every stream is taken."""
    path = directory / "agent.toml"
    path.write_text(
        f'[coordinator]\nurl = "ws://127.0.0.1:{coordinator_port}/provider/connect"\n'
        f'[identity]\nkey_path = "{directory / "identity.key"}"\n'
        f'[state]\ndir = "{directory / "state"}"\n'
        '[observability]\nprometheus_addr = ""\n'
        f'[[backends]]\nkind = "vllm"\nurl = "http://127.0.0.1:{backend_port}"\n'
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        "[limits]\nmax_concurrent = 256\n"
    )
    return path


async def wait_until(
    http: aiohttp.ClientSession, url: str, ready: object, watched: Sequence[Child]
) -> None:
    """Poll `url` until `ready(json)` holds; fail at once if a watched child exits."""
    assert callable(ready)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for child in watched:
            if child.process.poll() is not None:
                raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as response:
                if response.status == 200 and ready(await response.json()):
                    return
        await asyncio.sleep(0.1)
    tails = "\n".join(child.log_tail() for child in watched)
    raise BenchError(f"not ready within {READY_TIMEOUT_S:.0f} s: {url}\n{tails}")


def agent_serves_model(agents: object) -> bool:
    if not isinstance(agents, list):
        return False
    for agent in agents:
        caps = agent.get("capabilities") or {}
        if agent.get("connected") and any(
            m.get("model_id") == MODEL for m in caps.get("models", [])
        ):
            return True
    return False


# --- rounds and figures ---------------------------------------------------------------------------


@dataclass
class Round:
    wall_s: float
    #: From the round's start to the backend's last first write: how long dispatch took.
    dispatch_ms: float
    #: Direct: client arrival − first write. Through the agent: arrival at the coordinator −
    #: first write (the issue's definition of the agent's added time).
    ttft_ms: list[float]
    failed: int
    errors: list[str]
    #: Through the agent only: client arrival − first write (the coordinator's front included).
    client_ttft_ms: list[float] = field(default_factory=list)
    #: Through the agent only: the coordinator sent the `job` frame → the backend's first write.
    agent_dispatch_ms: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.ttft_ms, q)


@dataclass
class Pair:
    rate: float
    direct: Round
    through: Round
    agent_cpu_s: float
    coordinator_cpu_s: float
    #: The simulated backend's CPU seconds in the direct round and in the round via the agent.
    backend_cpu_s: tuple[float, float]
    agent_rss_mb: float
    events: int

    @property
    def ratio(self) -> float:
        return self.through.wall_s / self.direct.wall_s

    def added(self, q: float) -> float:
        return self.through.p(q) - self.direct.p(q)

    @property
    def us_per_event(self) -> float:
        return self.agent_cpu_s / self.events * 1e6

    @property
    def ceiling(self) -> float:
        return 1e6 / self.us_per_event if self.us_per_event > 0 else math.inf


async def measure(
    http: aiohttp.ClientSession,
    backend: str,
    port: int,
    *,
    label: str,
    streams: int,
    tokens: int,
    coordinator: str | None = None,
) -> Round:
    async with http.post(f"{backend}/reset") as response:
        response.raise_for_status()
    started, wall, results = await run_load(port, label, streams, tokens)
    async with http.get(f"{backend}/stats") as response:
        first_write: dict[str, float] = (await response.json())["first_write"]
    jobs: dict[str, dict[str, Any]] = {}
    if coordinator is not None:
        async with http.get(f"{coordinator}/jobs") as response:
            jobs = {job["job_id"]: job for job in await response.json()}
    ttft, client_ttft, dispatch, errors = [], [], [], []
    for r in results:
        written = first_write.get(r.user)
        if r.status != 200 or not r.complete or r.first_at is None or written is None:
            errors.append(r.error or f"status {r.status}, complete={r.complete}")
            continue
        if coordinator is None:
            ttft.append((r.first_at - written) * 1000)
            continue
        job = jobs.get(r.job_id or "")
        if job is None or job.get("first_chunk_at") is None:
            errors.append(f"no coordinator record of job {r.job_id}")
            continue
        ttft.append((job["first_chunk_at"] - written) * 1000)
        client_ttft.append((r.first_at - written) * 1000)
        if job.get("dispatched_at") is not None:
            dispatch.append((written - job["dispatched_at"]) * 1000)
    dispatch_ms = (max(first_write.values(), default=started) - started) * 1000
    return Round(wall, dispatch_ms, ttft, len(errors), errors[:3], client_ttft, dispatch)


async def run_pair(
    http: aiohttp.ClientSession,
    backend_port: int,
    coordinator_port: int,
    *,
    agent: Child,
    coordinator: Child,
    backend_child: Child,
    label: str,
    streams: int,
    rate: float,
    tokens: int,
) -> Pair:
    backend = f"http://127.0.0.1:{backend_port}"
    async with http.post(f"{backend}/reset", params={"rate": str(rate)}) as response:
        response.raise_for_status()
    backend_cpu = cpu_seconds(backend_child.process.pid)
    direct = await measure(
        http, backend, backend_port, label=f"{label}d", streams=streams, tokens=tokens
    )
    backend_direct_cpu = cpu_seconds(backend_child.process.pid) - backend_cpu
    backend_cpu = cpu_seconds(backend_child.process.pid)
    agent_cpu, coord_cpu = cpu_seconds(agent.process.pid), cpu_seconds(coordinator.process.pid)
    through = await measure(
        http,
        backend,
        coordinator_port,
        label=f"{label}a",
        streams=streams,
        tokens=tokens,
        coordinator=f"http://127.0.0.1:{coordinator_port}",
    )
    return Pair(
        rate=rate,
        direct=direct,
        through=through,
        agent_cpu_s=cpu_seconds(agent.process.pid) - agent_cpu,
        coordinator_cpu_s=cpu_seconds(coordinator.process.pid) - coord_cpu,
        backend_cpu_s=(backend_direct_cpu, cpu_seconds(backend_child.process.pid) - backend_cpu),
        agent_rss_mb=peak_rss_mb(agent.process.pid),
        events=streams * tokens,
    )


@dataclass
class Runs:
    """The same pair run several times at one rate: each figure is the median over the runs."""

    pairs: list[Pair]

    def median(self, figure: Callable[[Pair], float]) -> float:
        return statistics.median(figure(pair) for pair in self.pairs)

    @property
    def rate(self) -> float:
        return self.pairs[0].rate

    @property
    def events(self) -> int:
        return self.pairs[0].events

    @property
    def ratio(self) -> float:
        return self.median(lambda p: p.ratio)

    def added(self, q: float) -> float:
        return self.median(lambda p: p.added(q))

    @property
    def us_per_event(self) -> float:
        return self.median(lambda p: p.us_per_event)

    @property
    def ceiling(self) -> float:
        return 1e6 / self.us_per_event if self.us_per_event > 0 else math.inf

    @property
    def rss_mb(self) -> float:
        return max(pair.agent_rss_mb for pair in self.pairs)

    @property
    def failed(self) -> int:
        return sum(pair.direct.failed + pair.through.failed for pair in self.pairs)


def misses(runs: Runs) -> list[str]:
    checks = {
        "wall ratio": runs.ratio <= TARGET_RATIO,
        "added TTFT p50": runs.added(50) <= TARGET_ADDED_P50_MS,
        "added TTFT p99": runs.added(99) <= TARGET_ADDED_P99_MS,
        "CPU per event": runs.us_per_event <= TARGET_US_PER_EVENT,
        "peak RSS": runs.rss_mb <= TARGET_RSS_MB,
        "streams complete": runs.failed == 0,
    }
    return [name for name, ok in checks.items() if not ok]


def print_table(runs: Runs, streams: int, tokens: int, *, held_to_targets: bool) -> None:
    def target(text: str, ok: bool) -> str:
        return f"{text:>9}  {verdict(ok)}" if held_to_targets else ""

    def both(figure: Callable[[Round], float], fmt: str) -> tuple[str, str]:
        return (
            format(runs.median(lambda p: figure(p.direct)), fmt),
            format(runs.median(lambda p: figure(p.through)), fmt),
        )

    def through(figure: Callable[[Round], float]) -> str:
        return f"{runs.median(lambda p: figure(p.through)):.1f}"

    print(
        f"\n{streams} streams × {runs.rate:g} tokens/s × {tokens} tokens "
        f"({runs.events / (tokens / runs.rate):,.0f} events/s offered), "
        f"median of {len(runs.pairs)} runs"
        + ("" if held_to_targets else "  [informative: twice the rate, no targets]")
    )
    rows = [
        ("", "direct", "via agent", "target"),
        ("wall s", *both(lambda r: r.wall_s, ".3f"), ""),
        ("all streams begun ms", *both(lambda r: r.dispatch_ms, ".0f"), ""),
        ("wall ratio", "", f"{runs.ratio:.3f}", target("≤ 1.1", runs.ratio <= TARGET_RATIO)),
        ("TTFT p50 ms (at coord.)", *both(lambda r: r.p(50), ".2f"), ""),
        ("TTFT p99 ms (at coord.)", *both(lambda r: r.p(99), ".2f"), ""),
        (
            "  at the client p50/p99",
            "",
            through(lambda r: percentile(r.client_ttft_ms, 50))
            + "/"
            + through(lambda r: percentile(r.client_ttft_ms, 99)),
            "",
        ),
        (
            "agent dispatch p50/p99",
            "",
            through(lambda r: percentile(r.agent_dispatch_ms, 50))
            + "/"
            + through(lambda r: percentile(r.agent_dispatch_ms, 99)),
            "",
        ),
        (
            "added TTFT p50 ms",
            "",
            f"{runs.added(50):.2f}",
            target("≤ 2", runs.added(50) <= TARGET_ADDED_P50_MS),
        ),
        (
            "added TTFT p99 ms",
            "",
            f"{runs.added(99):.2f}",
            target("≤ 10", runs.added(99) <= TARGET_ADDED_P99_MS),
        ),
        ("agent CPU s", "", f"{runs.median(lambda p: p.agent_cpu_s):.2f}", ""),
        (
            "agent µs/event",
            "",
            f"{runs.us_per_event:.1f}",
            target("≤ 40", runs.us_per_event <= TARGET_US_PER_EVENT),
        ),
        ("ceiling events/s/core", "", f"{runs.ceiling:,.0f}", ""),
        (
            "agent peak RSS MB",
            "",
            f"{runs.rss_mb:.1f}",
            target("≤ 150", runs.rss_mb <= TARGET_RSS_MB),
        ),
        (
            "coordinator µs/event",
            "",
            f"{runs.median(lambda p: p.coordinator_cpu_s / p.events * 1e6):.1f}",
            "",
        ),
        (
            "backend µs/event",
            f"{runs.median(lambda p: p.backend_cpu_s[0] / p.events * 1e6):.1f}",
            f"{runs.median(lambda p: p.backend_cpu_s[1] / p.events * 1e6):.1f}",
            "",
        ),
        (
            "failed streams",
            str(sum(p.direct.failed for p in runs.pairs)),
            str(sum(p.through.failed for p in runs.pairs)),
            "",
        ),
    ]
    for name, a, b, c in rows:
        print(f"  {name:<24}{a:>10}{b:>12}   {c}".rstrip())
    for n, pair in enumerate(runs.pairs, 1):
        print(
            f"  run {n}: wall ratio {pair.ratio:.3f}, added TTFT p50 {pair.added(50):.2f} ms "
            f"p99 {pair.added(99):.2f} ms, {pair.us_per_event:.1f} µs/event"
        )
    for pair in runs.pairs:
        for error in pair.direct.errors + pair.through.errors:
            print(f"  e.g. {error}")


async def bench(args: argparse.Namespace, workdir: Path) -> int:
    backend_port, coordinator_port = free_port(), free_port()
    agent_bin = str(Path(sys.executable).parent / "provider-agent")
    with children() as started:
        backend = spawn(
            started,
            "backend",
            [
                sys.executable,
                __file__,
                "--serve-backend",
                str(backend_port),
                "--tokens-per-s",
                str(args.rate),
                "--tokens",
                str(args.tokens),
            ],
            workdir,
        )
        coordinator = spawn(
            started,
            "coordinator",
            [
                agent_bin,
                "dev-coordinator",
                "--listen",
                f"127.0.0.1:{coordinator_port}",
                "--log-level",
                "warn",  # a line per job costs it ~40 µs, in the burst the agent is measured in
            ],
            workdir,
        )
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_until(
                http, f"http://127.0.0.1:{backend_port}/stats", bool, [backend, coordinator]
            )
            await wait_until(
                http, f"http://127.0.0.1:{coordinator_port}/agents", lambda _: True, [coordinator]
            )
            config = write_agent_config(workdir, coordinator_port, backend_port)
            agent = spawn(
                started,
                "agent",
                [agent_bin, "run", "--allow-insecure", "--config", str(config)],
                workdir,
            )
            await wait_until(
                http,
                f"http://127.0.0.1:{coordinator_port}/agents",
                agent_serves_model,
                [backend, coordinator, agent],
            )
            rates = [args.rate, args.rate * 2] if args.double else [args.rate]
            sets = []
            for n, rate in enumerate(rates):
                pairs = [
                    await run_pair(
                        http,
                        backend_port,
                        coordinator_port,
                        agent=agent,
                        coordinator=coordinator,
                        backend_child=backend,
                        label=f"r{n}x{k}",
                        streams=args.streams,
                        rate=rate,
                        tokens=args.tokens,
                    )
                    for k in range(args.repeat)
                ]
                sets.append(Runs(pairs))
    print(
        f"relay benchmark: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
        f"agent pid {agent.process.pid}"
    )
    for n, runs in enumerate(sets):
        print_table(runs, args.streams, args.tokens, held_to_targets=n == 0)
    main_runs = sets[0]
    missed = misses(main_runs)
    print(
        f"\nrelay: {'MISS ' + ', '.join(missed) if missed else 'ok'} — "
        f"{args.streams}×{args.rate:g} tok/s, median of {args.repeat}: "
        f"wall ratio {main_runs.ratio:.3f}, "
        f"added TTFT p50 {main_runs.added(50):.2f} ms p99 {main_runs.added(99):.2f} ms, "
        f"{main_runs.us_per_event:.1f} µs/event (ceiling {main_runs.ceiling:,.0f} events/s/core), "
        f"peak RSS {main_runs.rss_mb:.0f} MB"
        + (f"; at {sets[1].rate:g} tok/s ratio {sets[1].ratio:.3f}" if len(sets) > 1 else "")
    )
    return 1 if missed else 0


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """On the loop the agent and the reference coordinator run on, with the heap settled as
    theirs is (`provider_agent.runtime`): the harness's own processes (the simulated backend,
    the clients) then take less of the two cores that the agent's figures depend on, and none
    stalls every stream at once with a full garbage collection."""
    settle_heap()
    if event_loop_options().get("use_uvloop"):
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams (256)")
    parser.add_argument("--rate", type=float, default=40.0, help="tokens/s per stream (40)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per response (200)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs of each pair; figures are medians (5)"
    )
    parser.add_argument(
        "--double",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a second round at twice the rate (on)",
    )
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-per-s", type=float, default=40.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend is not None:
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(serve_backend(args.serve_backend, args.tokens_per_s, args.tokens))
        return 0
    if args.streams < 1 or args.rate <= 0 or args.tokens < 1 or args.repeat < 1:
        parser.error("--streams, --rate, --tokens and --repeat must be positive")
    # SIGTERM unwinds like ^C, so the children are stopped either way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as workdir:
        try:
            return run_loop(bench(args, Path(workdir)))
        except BenchError as exc:
            print(f"relay: cannot run: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("relay: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
