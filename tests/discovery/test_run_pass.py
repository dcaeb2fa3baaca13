"""Discovery on real loopback servers: the budget holds, failures are named, passes are shared."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest
from aiohttp import web

from provider_agent.backends import Registry
from provider_agent.backends.base import new_http_session
from provider_agent.backends.ollama import SHOW_CONCURRENCY
from provider_agent.config.load import parse
from provider_agent.config.schema import Config
from provider_agent.discovery.run_pass import Discovery, run_pass
from provider_agent.jobs.route_health import Traffic
from tests.conftest import FakeServer

PRICING = "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"


def config_for(urls: list[str], timeout_s: int = 1) -> Config:
    backends = "".join(f'[[backends]]\nkind = "vllm"\nurl = "{u}"\n' for u in urls)
    return parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f"[discovery]\ntimeout_s = {timeout_s}\n{backends}{PRICING}"
    )


@dataclass
class VllmFarm:
    """One aiohttp app listening on many ports, each port a vLLM serving `model-<port>`."""

    urls: list[str] = field(default_factory=list)
    listing_requests: int = 0
    release: anyio.Event | None = None


@pytest.fixture
async def farm() -> AsyncIterator[VllmFarm]:
    state = VllmFarm()

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        state.listing_requests += 1
        if state.release is not None:
            await state.release.wait()
        port = request.url.port
        return web.json_response(
            {"object": "list", "data": [{"id": f"model-{port}", "max_model_len": 4096}]}
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    for _ in range(20):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state.urls.append(f"http://127.0.0.1:{port}")
    yield state
    await runner.cleanup()


@pytest.fixture
async def black_holes() -> AsyncIterator[list[str]]:
    """Two servers that accept TCP connections and never say a word."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    servers = [await asyncio.start_server(swallow, "127.0.0.1", 0) for _ in range(2)]
    yield [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    for writer in held:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_black_holes_cannot_delay_the_pass_beyond_the_budget(
    farm: VllmFarm, black_holes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_for([black_holes[0], *farm.urls, black_holes[1]], timeout_s=1)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        async with new_http_session(8) as http:
            result = await run_pass(cfg, http)
    elapsed = time.perf_counter() - started
    assert elapsed < cfg.discovery.timeout_s + 1
    advertised = [m.model_id for m in result.catalog.capabilities.models]
    assert len(advertised) == 20
    assert advertised == sorted(f"model-{u.rsplit(':', 1)[1]}" for u in farm.urls)
    failed = [r for r in result.reports if not r.ok]
    assert [r.name for r in failed] == [f"vllm:{black_holes[0]}", f"vllm:{black_holes[1]}"]
    warnings = [r.getMessage() for r in caplog.records if "backend left out" in r.getMessage()]
    assert len(warnings) == 2 and all("vllm:http://127.0.0.1:" in w for w in warnings)


async def test_unreachable_backends_give_an_empty_offer_not_a_failure() -> None:
    cfg = config_for(["http://127.0.0.1:9", "http://127.0.0.1:1"])
    async with new_http_session(8) as http:
        result = await run_pass(cfg, http)
    assert result.catalog.capabilities.models == []
    assert all("cannot connect" in (r.error or "") for r in result.reports)


async def test_concurrent_requests_share_one_pass(farm: VllmFarm) -> None:
    cfg = config_for(farm.urls[:3], timeout_s=5)
    farm.release = anyio.Event()
    results = []
    async with new_http_session(8) as http:
        discovery = Discovery(lambda: Registry.build(cfg, http), lambda: cfg)

        async def ask() -> None:
            results.append(await discovery.run())

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(ask)
            await anyio.wait_all_tasks_blocked()
            farm.release.set()
    assert discovery.passes == 1
    assert farm.listing_requests == 3  # one listing per backend, not per request
    assert all(r is results[0] for r in results)


async def test_a_cancelled_pass_does_not_strand_waiters(farm: VllmFarm) -> None:
    cfg = config_for(farm.urls[:1], timeout_s=5)
    farm.release = anyio.Event()
    async with new_http_session(8) as http:
        discovery = Discovery(lambda: Registry.build(cfg, http), lambda: cfg)
        async with anyio.create_task_group() as group:
            first = anyio.CancelScope()

            async def cancelled_runner() -> None:
                with first:
                    await discovery.run()

            group.start_soon(cancelled_runner)
            await anyio.wait_all_tasks_blocked()
            waiter_result = []

            async def waiter() -> None:
                waiter_result.append(await discovery.run())

            group.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            await anyio.wait_all_tasks_blocked()
            farm.release.set()
    assert len(waiter_result) == 1 and len(waiter_result[0].catalog.routes) == 1


# --- a slow part of a listing does not drop the backend ------------------------------------------


@dataclass
class ShowLoad:
    in_flight: int = 0
    peak: int = 0


def slow_ollama(server: FakeServer, count: int, show_delay_s: float) -> ShowLoad:
    """An Ollama with `count` models whose `/api/show` takes `show_delay_s` each."""
    names = [f"model-{i:03d}:latest" for i in range(count)]
    server.reply("GET", "/", "Ollama is running")
    server.reply("GET", "/api/version", {"version": "0.12.6"})
    server.reply("GET", "/api/tags", {"models": [{"name": n, "model": n} for n in names]})
    server.reply("GET", "/api/ps", {"models": []})
    load = ShowLoad()

    async def show(request: web.Request) -> web.Response:
        load.in_flight += 1
        load.peak = max(load.peak, load.in_flight)
        try:
            await asyncio.sleep(show_delay_s)
        finally:
            load.in_flight -= 1
        return web.json_response(
            {"model_info": {"general.architecture": "llama", "llama.context_length": 8192}}
        )

    server.reply("POST", "/api/show", show)
    return load


def ollama_config(url: str, timeout_s: int) -> Config:
    return parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f"[discovery]\ntimeout_s = {timeout_s}\n"
        f'[[backends]]\nkind = "ollama"\nurl = "{url}"\n{PRICING}'
    )


async def test_ollama_with_200_slow_models_advertises_all_of_them(
    fake_server: FakeServer,
) -> None:
    load = slow_ollama(fake_server, 200, show_delay_s=0.1)
    cfg = ollama_config(fake_server.url, timeout_s=3)
    started = time.perf_counter()
    async with new_http_session(8) as http:
        result = await run_pass(cfg, http)
    assert time.perf_counter() - started < cfg.discovery.timeout_s + 1
    [report] = result.reports
    assert report.ok, report.error
    assert len(result.catalog.capabilities.models) == 200
    assert 1 <= load.peak <= SHOW_CONCURRENCY


async def test_ollama_show_that_never_answers_still_lists_every_model(
    fake_server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    slow_ollama(fake_server, 30, show_delay_s=3600)
    cfg = ollama_config(fake_server.url, timeout_s=1)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        async with new_http_session(8) as http:
            result = await run_pass(cfg, http)
    assert time.perf_counter() - started < cfg.discovery.timeout_s + 1
    offers = result.catalog.capabilities.models
    assert len(offers) == 30
    assert all(o.context_window is None for o in offers)
    assert any("answered for 0 of 30 models" in r.getMessage() for r in caplog.records)


# --- text from backends is escaped before it is logged or printed --------------------------------

EVIL_BODY = b"\x1b[2J\x1b[31mEVIL\r\n12:00:00 INFO forged line\x00\x07" + b"x" * 5000
HOSTILE_IDS = ["", " ", "a\nb", "nul\x00", "\x1b]0;title\x07", "z" * 100_000, "ok-\u202e", "good"]


def hostile_backends(server: FakeServer) -> Config:
    """Three vLLM look-alikes on one server: hostile ids (`/ids`), a failing health with a
    hostile body (`/evil`), and `/ids` again behind a URL carrying credentials."""
    listing = {"data": [{"id": i} for i in HOSTILE_IDS]}
    server.reply("GET", "/ids/health", b"")
    server.reply("GET", "/ids/v1/models", listing)
    server.reply("GET", "/evil/health", EVIL_BODY, status=500, content_type="text/plain")
    cfg = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n[discovery]\ntimeout_s = 5\n'
        f'[[backends]]\nkind = "vllm"\nurl = "{server.url}/ids"\n'
        f'[[backends]]\nkind = "vllm"\nurl = "{server.url}/evil"\n{PRICING}'
    )
    # Config validation refuses credentials in URLs; build the entry past it, as a check that
    # discovery itself never shows them either.
    with_credentials = server.url.replace("http://", "http://admin:s3cret@") + "/ids"
    third = cfg.backends[0].model_copy(update={"url": with_credentials})
    return cfg.model_copy(update={"backends": [*cfg.backends, third]})


def assert_safe(text: str) -> None:
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text), repr(text[:200])
    assert "\u202e" not in text
    assert "s3cret" not in text and "admin:" not in text


async def test_backend_text_is_escaped_in_logs_and_the_table(
    fake_server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    from provider_agent.ops.render import render_discovery

    cfg = hostile_backends(fake_server)
    with caplog.at_level(logging.DEBUG):
        async with new_http_session(8) as http:
            result = await run_pass(cfg, http)
    messages = [r.getMessage() for r in caplog.records]
    for message in messages:
        assert_safe(message)
        assert len(message) <= 1200
    left_out = [m for m in messages if "backend left out" in m]
    assert len(left_out) == 1 and "\\x1b[2J\\x1b[31mEVIL\\r\\n" in left_out[0]
    id_warnings = [m for m in messages if "cannot be advertised" in m]
    assert len(id_warnings) == 2  # one per backend that listed them, per pass
    assert all(m.startswith("model left out: 7 model ids listed by") for m in id_warnings)

    assert [o.model_id for o in result.catalog.capabilities.models] == ["good"]
    table = render_discovery(result)
    for line in table.splitlines():
        assert_safe(line)
        assert len(line) <= 700
    port = fake_server.url.rsplit(":", 1)[1]
    assert f"vllm:http://127.0.0.1:{port}/ids " in table  # the whole name, port included
    assert f"vllm:http://127.0.0.1:{port}/ids" in table.split("error:")[0]


def test_table_columns_fit_names_and_counts_agree_with_the_offer() -> None:
    from provider_agent.discovery.catalog import BackendSeen, build
    from provider_agent.discovery.listing import Health, ModelInfo
    from provider_agent.discovery.run_pass import BackendReport, PassResult
    from provider_agent.ops.render import render_discovery

    long_url = "http://very-long-hostname.internal.example.com:18000"
    cfg = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f'[[backends]]\nkind = "vllm"\nurl = "{long_url}"\nmodels = ["a", "Gone"]\n'
        '[[backends]]\nkind = "ollama"\nurl = "http://o:1"\n' + PRICING
    )
    listed = [
        (ModelInfo("a", 4096), ModelInfo("b"), ModelInfo("\x1b[1m")),
        (ModelInfo("a"), ModelInfo("c", chat=False), ModelInfo("d")),
    ]
    seen = [
        BackendSeen(i, b, models, frozenset({"openai"}))
        for i, (b, models) in enumerate(zip(cfg.backends, listed, strict=True))
    ]
    catalog = build(cfg, seen)
    reports = tuple(
        BackendReport(b.label, b.kind, Health(True, 3.0), models, frozenset({"openai"}))
        for b, models in zip(cfg.backends, listed, strict=True)
    )
    table = render_discovery(PassResult(catalog, reports, 5.0))
    lines = table.splitlines()
    assert lines[0].split() == [
        "BACKEND", "KIND", "HEALTH", "LATENCY", "LISTED", "ADVERTISED", "FORMATS"
    ]  # fmt: skip
    assert lines[1].split() == [f"vllm:{long_url}", "vllm", "ok", "3ms", "3", "1", "openai"]
    assert lines[2].split() == ["ollama:http://o:1", "ollama", "ok", "3ms", "3", "2", "openai"]
    header = next(line for line in lines if line.startswith("MODEL"))
    assert header.split() == ["MODEL", "BACKEND", "CONTEXT", "IN/1M", "OUT/1M", "FORMATS"]
    rows = lines[lines.index(header) + 1 : lines.index(header) + 3]
    assert [r.split()[:3] for r in rows] == [["a", "vllm", "4096"], ["d", "ollama", "?"]]
    assert len(catalog.capabilities.models) == 2
    assert any("'Gone' is not served" in d for d in catalog.dropped)


async def test_a_backend_healthy_by_its_jobs_keeps_its_listing_until_interval_s(
    farm: VllmFarm,
) -> None:
    """The spared backend is neither asked for health nor listed while its listing is younger
    than interval_s; the others are; a changed config or an old listing means a probe."""
    busy, idle = farm.urls[:2]
    cfg = config_for([busy, idle])
    now = [1000.0]
    evidence: dict[str, Traffic] = {}
    async with new_http_session(8) as http:
        discovery = Discovery(
            lambda: Registry.build(cfg, http),
            lambda: cfg,
            traffic=lambda label: evidence.get(label, Traffic()),
            clock=lambda: now[0],
        )
        first = await discovery.run()
        assert farm.listing_requests == 2 and not any(r.probe_skipped for r in first.reports)
        now[0] += 10
        evidence[f"vllm:{busy}"] = Traffic(succeeded_at=now[0] - 1)
        second = await discovery.run()
        assert farm.listing_requests == 3  # the idle one only
        assert [r.probe_skipped for r in second.reports] == [True, False]
        assert second.reports[0].models == first.reports[0].models
        assert second.catalog.routes.keys() == first.catalog.routes.keys()

        now[0] += cfg.discovery.interval_s - 10  # the busy one's listing is interval_s old now
        evidence[f"vllm:{busy}"] = Traffic(succeeded_at=now[0] - 1, streaming=1)
        third = await discovery.run()
        assert farm.listing_requests == 5 and not any(r.probe_skipped for r in third.reports)

        now[0] += 1
        evidence[f"vllm:{busy}"] = Traffic(succeeded_at=now[0] - 0.5)
        # A reload changed the busy backend's settings (same label): probed again.
        cfg = parse(
            '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
            f'[[backends]]\nkind = "vllm"\nurl = "{busy}"\nmax_concurrent = 2\n'
            f'[[backends]]\nkind = "vllm"\nurl = "{idle}"\n{PRICING}'
        )
        fourth = await discovery.run()
        assert farm.listing_requests == 7 and not any(r.probe_skipped for r in fourth.reports)


async def test_without_traffic_every_backend_is_probed_every_pass(farm: VllmFarm) -> None:
    cfg = config_for(farm.urls[:2])
    async with new_http_session(8) as http:
        discovery = Discovery(lambda: Registry.build(cfg, http), lambda: cfg)
        for _ in range(3):
            result = await discovery.run()
            assert not any(r.probe_skipped for r in result.reports)
    assert farm.listing_requests == 6
