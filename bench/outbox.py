"""Benchmark: the outbox's write path, the way the executor uses it.

    .venv/bin/python bench/outbox.py [--jobs 2000] [--concurrency 64] [--ledger-rows 1000000]
                                     [--dir PATH]

For `synchronous` FULL and NORMAL, prints finish+delivered pairs per second with one job at a
time (each call waits for its own commit: bound by fsync latency) and with `--concurrency` jobs
at once (calls arriving during a commit share the next one). Then the time `Outbox.open` takes
on a store whose ledger holds `--ledger-rows` rows (it runs `PRAGMA quick_check`), and the
memory the in-memory id set costs per job. `--dir` picks the disk (default: a temporary dir).
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Literal

import anyio

from provider_agent.store.engine import FILE_NAME
from provider_agent.store.outbox import LedgerEntry, Outbox

ENTRY = LedgerEntry("llama3.1:8b", "ollama", "job_done", 420, 80, "reported", 300_000, 600_000)


def frame(job_id: str) -> str:
    return (
        f'{{"type":"job_done","job_id":"{job_id}","tokens":{{"input":420,"output":80,'
        '"input_tokens":420,"output_tokens":80},"duration_ms":1234}'
    )


async def pairs_per_second(
    state: Path, synchronous: Literal["FULL", "NORMAL"], jobs: int, concurrency: int
) -> float:
    outbox = await Outbox.open(state, synchronous=synchronous)
    ids = [str(uuid.uuid4()) for _ in range(jobs)]

    async def worker(mine: list[str]) -> None:
        for job_id in mine:
            await outbox.finish(job_id, frame(job_id), ENTRY)
            await outbox.delivered([job_id])

    start = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for index in range(concurrency):
            tasks.start_soon(worker, ids[index::concurrency])
    elapsed = time.perf_counter() - start
    assert (await outbox.depth())[0] == 0
    await outbox.aclose()
    return jobs / elapsed


def fill_ledger(state: Path, rows: int) -> None:
    with sqlite3.connect(state / FILE_NAME) as db:
        db.executemany(
            "INSERT INTO ledger (time_ms, job_id, model, backend, outcome, tokens_in, tokens_out,"
            " usage_source, input_per_1m, output_per_1m, amount_micro_usdc)"
            " VALUES (?, ?, 'llama3.1:8b', 'ollama', 'job_done', 420, 80, 'reported',"
            " 300000, 600000, 174)",
            ((1_700_000_000_000 + i * 1000, str(uuid.uuid4())) for i in range(rows)),
        )
    sqlite3.connect(state / FILE_NAME).close()


async def open_seconds(state: Path) -> float:
    start = time.perf_counter()
    outbox = await Outbox.open(state)
    elapsed = time.perf_counter() - start
    await outbox.aclose()
    return elapsed


async def bytes_per_known_id(state: Path, count: int) -> float:
    outbox = await Outbox.open(state)
    for index in range(200):
        await outbox.finish(f"warm-{index}", frame("w"), ENTRY)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(count):
        outbox._remember(str(uuid.uuid4()))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    await outbox.aclose()
    return (after - before) / count


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--ledger-rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"store on {root}")
        for synchronous in ("FULL", "NORMAL"):
            for concurrency in (1, args.concurrency):
                jobs = args.jobs if concurrency > 1 else max(args.jobs // 4, 50)
                state = root / f"{synchronous}-{concurrency}"
                rate = await pairs_per_second(state, synchronous, jobs, concurrency)
                print(
                    f"synchronous={synchronous:<6} concurrency={concurrency:<4} jobs={jobs:<6} "
                    f"finish+delivered: {rate:8.0f} /s"
                )
        state = root / "big"
        await (await Outbox.open(state)).aclose()
        fill_ledger(state, args.ledger_rows)
        size = (state / FILE_NAME).stat().st_size / 2**20
        seconds = await open_seconds(state)
        print(f"open with {args.ledger_rows} ledger rows ({size:.0f} MiB): {seconds * 1000:.0f} ms")
        per_id = await bytes_per_known_id(root / "mem", 100_000)
        print(f"in-memory id set: {per_id:.0f} bytes per job id kept (24 h of jobs)")


if __name__ == "__main__":
    anyio.run(main)
