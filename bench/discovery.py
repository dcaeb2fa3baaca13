"""Benchmark: one discovery pass over 50 backends with hostile ones, the idle agent's memory, and
`provider-agent --version`.

    .venv/bin/python bench/discovery.py [--backends 50] [--silent 2] [--oversize 1]
        [--timeout-s 2] [--repeat 5] [--idle-s 60] [--version-runs 9]

Three figures, side by side in one run (targets: shared/spec/benchmarks.md):

- One discovery pass (`provider_agent.discovery.run_pass.run_pass`, the daemon's code and pool) over
  `--backends` simulated vLLM servers, served by a child process (this file, `--serve-backends`):
  `--silent` of them accept TCP and never answer, `--oversize` answer their model listing with
  8 MiB + 1 bytes (chunked, so the cap is met while reading, not from a header). Target: every
  pass ≤ `timeout_s` + 0.5 s (the worst of `--repeat` passes). The same pass is then run once
  with the backends probed one after another, for the ratio that concurrency buys.
- Idle agent RSS: the agent (`provider-agent run`, its HTTP endpoint on as by default) connected
  to the reference coordinator with one simulated backend and no jobs, VmRSS from /proc
  `--idle-s` seconds after its start (60 by default; less for a quick look). Target ≤ 70 MB
  (MB = 2**20 bytes).
- `provider-agent --version`: wall time, the median of `--version-runs`. Target ≤ 0.3 s.

The idle agent waits out its minute while the passes and the `--version` runs are measured (they
do not touch it). Prints a table and one summary line; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
from _common import (
    AGENT,
    BenchError,
    Child,
    Table,
    agent_serves,
    children,
    free_port,
    peak_rss_mb,
    rss_mb,
    run_bench,
    wait_http,
    write_agent_config,
)
from aiohttp import web

from provider_agent.agent import POOL_STREAMS
from provider_agent.backends import make_backend
from provider_agent.backends.base import new_http_session
from provider_agent.config.load import parse
from provider_agent.config.schema import Config
from provider_agent.dev.sim.core import SimBackend
from provider_agent.discovery.catalog import BackendSeen, build
from provider_agent.discovery.run_pass import BackendReport, PassResult, probe, run_pass

OVERSIZE_BYTES = 8 * 1024 * 1024 + 1
TARGET_SLACK_S = 0.5
TARGET_IDLE_RSS_MB = 70.0
TARGET_VERSION_S = 0.3
IDLE_MODEL = "m"


# --- the backends (a child process) --------------------------------------------------------------


async def serve_backends(normal: int, silent: int, oversize: int, urls_file: Path) -> None:
    """Serve the backends; write their URLs (JSON) to `urls_file` once all listen."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, read from never, answered never

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def huge_listing(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b" " * (1024 * 1024)
        await response.write(b'{"object":"list","data":[]}')
        left = OVERSIZE_BYTES - len(b'{"object":"list","data":[]}')
        while left > 0:
            piece = block[: min(left, len(block))]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    sims = [
        SimBackend("vllm", models=[f"model-{i}-a", f"model-{i}-b"], host="127.0.0.1")
        for i in range(normal)
    ]
    urls: dict[str, list[str]] = {"normal": [], "silent": [], "oversize": []}
    async with contextlib.AsyncExitStack() as stack:
        for sim in sims:
            await stack.enter_async_context(sim)
            urls["normal"].append(sim.url)
        for _ in range(silent):
            server = await asyncio.start_server(swallow, "127.0.0.1", 0)
            stack.push_async_callback(_close_server, server)
            urls["silent"].append(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", huge_listing)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        for _ in range(oversize):
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            urls["oversize"].append(f"http://127.0.0.1:{runner.addresses[-1][1]}")
        partial = urls_file.with_suffix(".part")
        partial.write_text(json.dumps(urls))
        partial.rename(urls_file)
        await asyncio.Event().wait()  # until the benchmark terminates this process


async def _close_server(server: asyncio.Server) -> None:
    server.close()


# --- the passes ----------------------------------------------------------------------------------


def pass_config(urls: list[str], timeout_s: int) -> Config:
    entries = "".join(f'[[backends]]\nkind = "vllm"\nurl = "{u}"\n' for u in urls)
    return parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        f"[discovery]\ntimeout_s = {timeout_s}\n"
        f"{entries}[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n"
    )


async def sequential_pass(config: Config, http: aiohttp.ClientSession) -> PassResult:
    """`run_pass` with the backends probed one after another (for the ratio only)."""
    started = time.perf_counter()
    budget = config.discovery.timeout_s
    reports: list[BackendReport] = []
    for cfg in config.backends:
        reports.append(await probe(make_backend(cfg, http, budget), budget))
    seen = [
        BackendSeen(i, config.backends[i], r.models, r.formats)
        for i, r in enumerate(reports)
        if r.ok
    ]
    duration = (time.perf_counter() - started) * 1000
    return PassResult(build(config, seen), tuple(reports), duration)


async def measure_passes(
    urls: list[str], timeout_s: int, repeat: int
) -> tuple[list[float], float, PassResult]:
    """Seconds of each concurrent pass, of the sequential one, and the last concurrent result."""
    config = pass_config(urls, timeout_s)
    timings = []
    async with new_http_session(POOL_STREAMS) as http:
        for _ in range(repeat):
            started = time.perf_counter()
            result = await run_pass(config, http)
            timings.append(time.perf_counter() - started)
        started = time.perf_counter()
        await sequential_pass(config, http)
        sequential = time.perf_counter() - started
    return timings, sequential, result


def version_timings(runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([AGENT, "--version"], capture_output=True, check=False)
        timings.append(time.perf_counter() - started)
        if done.returncode != 0 or not done.stdout.startswith(b"provider-agent "):
            raise BenchError(f"provider-agent --version failed: {done.stdout!r} {done.stderr!r}")
    return timings


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Figures:
    timings: list[float]
    sequential: float
    result: PassResult
    versions: list[float]
    connected_s: float
    idle_rss: float
    idle_peak: float
    still_connected: bool


async def wait_for_file(path: Path, writer: Child) -> dict[str, list[str]]:
    """The JSON a child writes to `path` (renamed into place, so it is whole once it exists)."""
    deadline = time.monotonic() + 60
    while not await anyio.Path(path).exists():
        if not writer.alive() or time.monotonic() > deadline:
            raise BenchError(f"the backends did not start:\n{writer.log_tail()}")
        await asyncio.sleep(0.05)
    urls: dict[str, list[str]] = json.loads(await anyio.Path(path).read_text())
    return urls


async def measure(args: argparse.Namespace, workdir: Path) -> Figures:
    urls_file = workdir / "urls.json"
    sim_port, coord_port = free_port(), free_port()
    coord_url = f"http://127.0.0.1:{coord_port}"
    with children() as started:
        backends = Child(
            "backends",
            [
                *(sys.executable, __file__, "--serve-backends", str(urls_file)),
                *("--backends", str(args.backends), "--silent", str(args.silent)),
                *("--oversize", str(args.oversize)),
            ],
            workdir / "backends.log",
        )
        sim = Child(
            "sim",
            [
                *(AGENT, "sim-backend", "--kind", "vllm"),
                *("--listen", f"127.0.0.1:{sim_port}", "--model", IDLE_MODEL),
            ],
            workdir / "sim.log",
        )
        coordinator = Child(
            "coordinator",
            [AGENT, "dev-coordinator", "--listen", f"127.0.0.1:{coord_port}"],
            workdir / "coordinator.log",
        )
        config = write_agent_config(
            workdir,
            f"ws://127.0.0.1:{coord_port}/provider/connect",
            f'[[backends]]\nkind = "vllm"\nurl = "http://127.0.0.1:{sim_port}"\n',
            prometheus_addr=f"127.0.0.1:{free_port()}",  # on, as by default
        )
        agent = Child(
            "agent",
            [AGENT, "run", "--allow-insecure", "--config", str(config)],
            workdir / "agent.log",
        )
        for child in (backends, sim, coordinator):
            child.start()
            started.append(child)
        async with aiohttp.ClientSession() as http:
            await wait_http(http, f"http://127.0.0.1:{sim_port}/health", None, [sim])
            await wait_http(http, f"{coord_url}/agents", lambda _: True, [coordinator])
            agent.start()
            agent_started = time.monotonic()
            started.append(agent)
            await wait_http(
                http, f"{coord_url}/agents", agent_serves(IDLE_MODEL), [agent, coordinator]
            )
            connected_s = time.monotonic() - agent_started

            urls = await wait_for_file(urls_file, backends)
            all_urls = urls["normal"] + urls["silent"] + urls["oversize"]
            timings, sequential, result = await measure_passes(
                all_urls, args.timeout_s, args.repeat
            )
            versions = await anyio.to_thread.run_sync(version_timings, args.version_runs)

            await anyio.sleep(max(0.0, agent_started + args.idle_s - time.monotonic()))
            if not agent.alive():
                raise BenchError(f"the agent exited while idle:\n{agent.log_tail()}")
            idle_rss, idle_peak = rss_mb(agent.pid), peak_rss_mb(agent.pid)
            agents = await wait_http(http, f"{coord_url}/agents", lambda _: True, [])
    connected = isinstance(agents, list) and any(a["connected"] for a in agents)
    return Figures(
        timings, sequential, result, versions, connected_s, idle_rss, idle_peak, connected
    )


def report(args: argparse.Namespace, f: Figures) -> int:
    normal = args.backends - args.silent - args.oversize
    failed = {r.name: r.error or "" for r in f.result.reports if not r.ok}
    limit = args.timeout_s + TARGET_SLACK_S
    worst, median = max(f.timings), statistics.median(f.timings)
    version_median = statistics.median(f.versions)
    hostile = args.silent + args.oversize
    print(
        f"discovery benchmark: {args.backends} backends ({normal} answering, {args.silent} "
        f"silent, {args.oversize} listing {OVERSIZE_BYTES:,} bytes), timeout_s = {args.timeout_s}"
    )
    table = Table()
    table.check(
        "backends left out", str(len(failed)), f"= {hostile} hostile", len(failed) == hostile
    )
    table.info("models advertised", str(len(f.result.catalog.routes)))
    table.info(f"pass s, median of {args.repeat}", f"{median:.3f}")
    table.check(f"pass s, worst of {args.repeat}", f"{worst:.3f}", f"≤ {limit:g}", worst <= limit)
    table.info("sequential pass s", f"{f.sequential:.3f}")
    table.info("sequential ÷ concurrent", f"{f.sequential / median:.1f}×")
    table.info("agent connected after s", f"{f.connected_s:.2f}")
    table.check(
        f"idle agent RSS MB at {args.idle_s:g} s",
        f"{f.idle_rss:.1f}",
        f"≤ {TARGET_IDLE_RSS_MB:g}",
        f.idle_rss <= TARGET_IDLE_RSS_MB,
    )
    table.info("idle agent peak RSS MB", f"{f.idle_peak:.1f}")
    table.check(
        "agent still connected", "yes" if f.still_connected else "no", "yes", f.still_connected
    )
    table.check(
        f"--version s, median of {args.version_runs}",
        f"{version_median:.3f}",
        f"≤ {TARGET_VERSION_S:g}",
        version_median <= TARGET_VERSION_S,
    )
    table.info("--version s, worst", f"{max(f.versions):.3f}")
    table.print()
    for name, why in sorted(failed.items()):
        print(f"  left out: {name}: {why}")
    print(
        f"\ndiscovery: {'MISS ' + ', '.join(table.missed) if table.missed else 'ok'} — "
        f"{args.backends} backends: pass {worst:.2f} s worst (≤ {limit:g}), "
        f"sequential {f.sequential:.2f} s ({f.sequential / median:.1f}×); idle RSS "
        f"{f.idle_rss:.1f} MB (≤ {TARGET_IDLE_RSS_MB:g}); --version "
        f"{version_median * 1000:.0f} ms (≤ {TARGET_VERSION_S * 1000:.0f})"
    )
    return 1 if table.missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=50, help="backends in all (50)")
    parser.add_argument("--silent", type=int, default=2, help="of which never answer (2)")
    parser.add_argument("--oversize", type=int, default=1, help="of which list 8 MiB + 1 (1)")
    parser.add_argument("--timeout-s", type=int, default=2, help="discovery.timeout_s (2)")
    parser.add_argument("--repeat", type=int, default=5, help="concurrent passes timed (5)")
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle RSS read after (60)")
    parser.add_argument("--version-runs", type=int, default=9, help="--version runs (9)")
    parser.add_argument("--serve-backends", type=Path, metavar="URLS_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    normal = args.backends - args.silent - args.oversize
    if normal < 0 or min(args.silent, args.oversize) < 0 or args.repeat < 1:
        parser.error("--silent + --oversize must not exceed --backends; --repeat ≥ 1")
    if args.serve_backends is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_backends(normal, args.silent, args.oversize, args.serve_backends))
        return 0

    def run() -> int:
        with tempfile.TemporaryDirectory(prefix="discovery-bench-") as workdir:
            return report(args, asyncio.run(measure(args, Path(workdir))))

    return run_bench(run)


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    sys.exit(main())
