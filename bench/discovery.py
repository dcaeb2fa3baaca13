"""Benchmark: one discovery pass over many loopback backends, with and without black holes.

    .venv/bin/python bench/discovery.py [--backends 50] [--holes 2] [--repeat 7]

Prints the median and spread of the pass time. With black holes the pass is bounded by
`discovery.timeout_s` (1 s here); without them it should be a few milliseconds per backend
at most, since every backend is probed concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiohttp import web

from provider_agent.backends.base import new_http_session
from provider_agent.config import parse
from provider_agent.discovery import run_pass


async def start_backends(count: int) -> tuple[web.AppRunner, list[str]]:
    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        port = request.url.port
        data = [{"id": f"model-{port}-{i}", "max_model_len": 8192} for i in range(3)]
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    urls = []
    for _ in range(count):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls.append(f"http://127.0.0.1:{runner.addresses[-1][1]}")
    return runner, urls


async def start_holes(count: int) -> tuple[list[asyncio.Server], list[str]]:
    """Servers that accept connections and never answer (the writers are simply kept)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    servers = [await asyncio.start_server(swallow, "127.0.0.1", 0) for _ in range(count)]
    return servers, [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]


async def main(backends: int, holes: int, repeat: int) -> None:
    runner, urls = await start_backends(backends)
    servers, hole_urls = await start_holes(holes)
    entries = "".join(f'[[backends]]\nkind = "vllm"\nurl = "{u}"\n' for u in urls + hole_urls)
    config = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n[discovery]\ntimeout_s = 1\n'
        f"{entries}[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n"
    )
    timings = []
    async with new_http_session(8) as http:
        for _ in range(repeat):
            started = time.perf_counter()
            result = await run_pass(config, http)
            timings.append((time.perf_counter() - started) * 1000)
    print(
        f"backends={backends} black_holes={holes} models={len(result.catalog.routes)} "
        f"pass_ms median={statistics.median(timings):.1f} "
        f"min={min(timings):.1f} max={max(timings):.1f} (n={repeat})"
    )
    for server in servers:
        server.close()
    await runner.cleanup()


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=50)
    parser.add_argument("--holes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.backends, args.holes, args.repeat))
