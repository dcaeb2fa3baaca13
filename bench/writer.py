"""Frames/s and chunks/s through the outbound lanes and one writer, beside plain `ws.send`.

    .venv/bin/python bench/writer.py [--events 100000] [--jobs 256]

Both rounds send to a websockets server on loopback that reads and discards. "plain" sends one
pre-built `job_chunk` per event with `await ws.send` (the floor: the socket's own cost);
"outbound" has producers append each event's bytes to its job's lane while the writer drains
batches (coalescing what piled up per job), as the agent does. Events are ~60-byte SSE lines.
Prints a table and one summary line; exits 1 when the outbound path relays fewer events/s than
the job path needs (10,000/s, the relay benchmark's load).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import anyio
import anyio.lowlevel
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from provider_agent.link.lanes import Outbound, chunk_frame

EVENT = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
TARGET_EVENTS_PER_S = 10_000


async def sink(ws: ServerConnection) -> None:
    async for _ in ws:
        pass


async def plain(url: str, events: int, jobs: int) -> tuple[float, int]:
    frames = [chunk_frame(f"job-{i % jobs}", EVENT) for i in range(events)]
    async with connect(url, compression=None, max_size=None) as ws:
        started = time.perf_counter()
        for frame in frames:
            await ws.send(frame)
        await ws.ping()
        return time.perf_counter() - started, len(frames)


async def through_outbound(url: str, events: int, jobs: int) -> tuple[float, int]:
    out = Outbound()
    sent = 0
    async with connect(url, compression=None, max_size=None) as ws:

        async def writer() -> None:
            nonlocal sent
            async for batch in out.batches():
                for frame in batch.frames:
                    await ws.send(frame)
                sent += len(batch.frames)

        async def producer(job: int, count: int) -> None:
            job_id = f"job-{job}"
            for _ in range(count):
                out.chunk(job_id, EVENT)
                await (
                    anyio.lowlevel.checkpoint()
                )  # each event arrives on its own, as upstream reads do

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            group.start_soon(writer)
            async with anyio.create_task_group() as producers:
                for job in range(jobs):
                    producers.start_soon(producer, job, events // jobs)
            out.finish()
        await ws.ping()
        return time.perf_counter() - started, sent


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    async with serve(sink, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://127.0.0.1:{port}"
        rows: dict[str, list[tuple[float, float]]] = {"plain ws.send": [], "outbound+writer": []}
        events = args.events // args.jobs * args.jobs
        for _ in range(args.rounds):
            for name, body in (("plain ws.send", plain), ("outbound+writer", through_outbound)):
                elapsed, frames = await body(url, events, args.jobs)
                rows[name].append((events / elapsed, frames / elapsed))
    print(f"{'path':<18} {'events/s':>12} {'frames/s':>12}  (median of {args.rounds})")
    medians = {}
    for name, samples in rows.items():
        ev = statistics.median(s[0] for s in samples)
        fr = statistics.median(s[1] for s in samples)
        medians[name] = ev
        print(f"{name:<18} {ev:>12,.0f} {fr:>12,.0f}")
    ok = medians["outbound+writer"] >= TARGET_EVENTS_PER_S
    print(
        f"summary: outbound relays {medians['outbound+writer']:,.0f} events/s "
        f"({medians['outbound+writer'] / medians['plain ws.send']:.2f}x plain ws.send); "
        f"target >= {TARGET_EVENTS_PER_S:,}/s: {'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
