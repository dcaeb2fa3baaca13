"""Benchmark: capacity that is measured (protocol.md §9), a learned limit beside a fixed one.

A backend that queues beyond its slots is offered three times what it serves, through an agent
that learns its concurrency limit and through one that keeps it fixed.

    .venv/bin/python bench/capacity.py [--seconds 30] [--slots 4] [--raised 8] [--ttft-ms 50]
        [--tokens 100] [--rate 200] [--prefill-s-per-1k 0.1] [--prompt-tokens 200-400]
        [--retry-ms 50] [--unloaded 7] [--seed 5] [--keep DIR]

Processes on loopback: a simulated vLLM with S slots (`provider-agent sim-backend --slots S`: at
most S completions generate at once, the rest wait in line before any byte, as a saturated server
does) and the agent (`provider-agent run`); this process is the reference coordinator
(`DevCoordinator`) and its clients, which send `job` frames with `send_job` and read the
coordinator's records: when each `job` frame went out, when its first `job_chunk` arrived, its
terminal frame, and the agent's capabilities and heartbeats.

The same scenario runs twice, each with processes of its own: `learned` (`[limits] adaptive =
true`, `max_concurrent = 32`) and `fixed` (`adaptive = false`, `max_concurrent = 32`: the limit
is the ceiling, §2's rule). Each run:
1. unloaded: `--unloaded` jobs one at a time; the median time to first chunk at the coordinator
   (`job` frame sent → first `job_chunk` received) is the unloaded figure, and the median time the
   backend held a slot for them (its own record) is the service time;
2. S = `--slots` for `--seconds`, offered 3 × S jobs at all times: a closed loop of 3 × S clients,
   each sending its next job when its last one ended; one refused `out_of_capacity` (or failed
   otherwise) waits `--retry-ms` first, so the offer stays 3 × S without a busy loop;
3. the backend's slots raised to `--raised` at runtime (`POST /__sim/slots`), and as many clients
   added (3 × the new S), for `--seconds` more.
Prompts vary from job to job (`--prompt-tokens`, seeded), so the time to first byte does too.
The unloaded jobs are also the learned controller's first calm samples (its baseline), as a
provider's first jobs would be.

Figures per run: the model's `max_concurrent` at the end of each loaded phase — learned, the sum
of its routes' limits in the agent's latest heartbeat (sent every second here: what capabilities
would advertise now), and advertised, the coordinator's record of the last capabilities (§9
pushes a move of more than one at once, smaller ones with the next pass); p50/p95 time to first
chunk of the accepted jobs (sent during the load) and their ratio to the unloaded one; `job_done`
throughput against the backend's capacity (S ÷ service time, S as it was at each moment), and the
share of slot-seconds the backend spent serving; the terminal frames by kind. Targets (the
learned run, shared/spec/benchmarks.md): `max_concurrent` within S−1…S+2 after each phase, p95
≤ 2.5 × unloaded, throughput ≥ 85 % of capacity, no `backend_timeout`; the p95 and throughput are
those of the whole load, both phases and the move between them. Also printed: both runs' figures
per phase, the ratios learned ÷ fixed, and a timeline, one figure a second: the advertised
`max_concurrent`, the learned one (heartbeat), the route's limit in `/status` (like the heartbeat's,
the last known good: neither shows a re-measure's hold or a trial one above), and the jobs
accepted and in flight at the coordinator (the mean over the second: holds and trials show
there). Prints a table and one summary line; exits 1 when a target is missed, 2 when the
benchmark could not run. With `--keep DIR` the logs stay in DIR, and one line a loaded job in
`learned-jobs.jsonl` and `fixed-jobs.jsonl` (sent, time to first chunk, end, terminal frame).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from _common import (
    AGENT,
    BenchError,
    Child,
    Table,
    children,
    free_port,
    in_workdir,
    percentile,
    run_bench,
    wait_http,
    write_agent_config,
)

from provider_agent.dev.coordinator import DevCoordinator, JobRecord
from provider_agent.link.protocol import JobDone, JobError

MODEL = "m"
GLOBAL_MAX = 32
TARGET_P95_RATIO = 2.5
TARGET_THROUGHPUT = 0.85
READY_S = 30.0
#: A job's terminal frame is awaited this long at most (its deadline is 60 s).
JOB_WAIT_S = 70.0
SAMPLE_EVERY_S = 1.0


# --- the coordinator and its clients --------------------------------------------------------------


class LoadCoordinator(DevCoordinator):
    """The reference coordinator, telling each client when its job's terminal frame came (one
    event a job, rather than every client re-checking on every frame). The hook is its internal
    step, as in chaos.py's coordinator."""

    def __init__(self) -> None:
        super().__init__(host="127.0.0.1", port=0)
        self._ended: dict[str, anyio.Event] = {}

    async def run_job(self, provider_id: str, request: dict[str, Any]) -> JobRecord:
        """Send one job and wait for its terminal frame; its record."""
        job_id = str(uuid.uuid4())
        ended = self._ended[job_id] = anyio.Event()
        try:
            record = await self.send_job(
                provider_id, MODEL, request, job_id=job_id, keep_data=False
            )
            with anyio.fail_after(JOB_WAIT_S):
                await ended.wait()
        except TimeoutError:
            raise BenchError(f"no terminal frame for job {job_id} in {JOB_WAIT_S:.0f} s") from None
        except LookupError:
            raise BenchError("the agent is not connected any more") from None
        finally:
            del self._ended[job_id]
        return record

    async def _on_terminal(
        self, link: Any, record: Any, frame: JobDone | JobError, text: str
    ) -> None:
        await super()._on_terminal(link, record, frame, text)
        ended = self._ended.get(frame.job_id)
        if ended is not None:
            ended.set()

    def offered(self, provider_id: str) -> int | None:
        """The model's `max_concurrent` in the agent's last capabilities."""
        caps = self.agents[provider_id].capabilities
        offers = [m.max_concurrent for m in caps.models if m.model_id == MODEL] if caps else []
        return offers[0] if offers else None

    def learned(self, provider_id: str) -> int | None:
        """The model's routes' limits in the agent's last heartbeat, summed (at most the global
        ceiling): what its capabilities would advertise now."""
        beat = self.agents[provider_id].last_heartbeat
        routes = [r.limit for r in (beat.backends or []) if r.model == MODEL] if beat else []
        return min(GLOBAL_MAX, sum(routes)) if routes else None


def prompt_request(tokens: int, max_tokens: int) -> dict[str, Any]:
    """A chat request whose body is about `tokens` prompt tokens by the usual 4 bytes a token
    (the agent's estimate and the simulator's prefill both read it so)."""
    words = ("lorem ipsum dolor sit amet " * (tokens // 5 + 1))[: tokens * 4]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": max_tokens,
        "stream": True,
    }


@dataclass
class Load:
    """The closed loop of clients, and the records of their jobs."""

    coord: LoadCoordinator
    provider_id: str
    prompt_tokens: tuple[int, int]
    max_tokens: int
    retry_s: float
    stop: anyio.Event = field(default_factory=anyio.Event)
    jobs: list[JobRecord] = field(default_factory=list)

    def request(self, rng: random.Random) -> dict[str, Any]:
        return prompt_request(rng.randint(*self.prompt_tokens), self.max_tokens)

    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            record = await self.coord.run_job(self.provider_id, self.request(rng))
            self.jobs.append(record)
            if isinstance(record.terminal, JobError):  # refused: a short pause, not a busy loop
                with anyio.move_on_after(self.retry_s):
                    await self.stop.wait()


# --- one run --------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One second of the timeline."""

    t: float
    advertised: int | None
    learned: int | None
    status: int | None


@dataclass
class Phase:
    slots: int
    start: float
    end: float
    #: (learned, advertised) `max_concurrent` at the phase's end.
    limits: tuple[int | None, int | None] = (None, None)


@dataclass
class Run:
    name: str
    unloaded_ttfc_s: list[float]
    service_s: float
    phases: list[Phase]
    jobs: list[JobRecord]
    samples: list[Sample]
    #: (slot taken, slot given back) of every completion the backend served during the load.
    slot_spans: list[tuple[float, float]]
    violations: list[str]

    @property
    def start(self) -> float:
        return self.phases[0].start

    @property
    def end(self) -> float:
        return self.phases[-1].end

    @property
    def unloaded_s(self) -> float:
        return statistics.median(self.unloaded_ttfc_s)

    def ttfc_s(self, start: float, end: float) -> list[float]:
        """Time to first chunk of the accepted jobs sent in [start, end)."""
        return [
            j.first_chunk_at - j.dispatched_at
            for j in self.jobs
            if j.first_chunk_at is not None
            and j.dispatched_at is not None
            and start <= j.dispatched_at < end
        ]

    def p_ratio(self, q: float, start: float | None = None, end: float | None = None) -> float:
        values = self.ttfc_s(
            self.start if start is None else start, self.end if end is None else end
        )
        return percentile(values, q) / self.unloaded_s

    def throughput(self, start: float | None = None, end: float | None = None) -> float:
        """`job_done` frames that came in [start, end) ÷ what the backend could serve then."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        done = sum(
            1
            for j in self.jobs
            if isinstance(j.terminal, JobDone)
            and j.finished_at is not None
            and start <= j.finished_at < end
        )
        return done / (self.slot_seconds(start, end) / self.service_s)

    def slot_seconds(self, start: float, end: float) -> float:
        """The backend's slots × seconds in [start, end), S as it was at each moment."""
        return sum(p.slots * max(0.0, min(end, p.end) - max(start, p.start)) for p in self.phases)

    def busy(self, start: float | None = None, end: float | None = None) -> float:
        """The share of the backend's slot-seconds spent serving."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        held = sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.slot_spans)
        return held / self.slot_seconds(start, end)

    def in_flight(self) -> list[tuple[float, int | None]]:
        """Jobs accepted (not refused) and not ended at the coordinator, the mean over each
        whole second of the load, rounded: (the second's middle, seconds into the load; jobs)."""
        spans = [
            (j.dispatched_at, j.finished_at or self.end)
            for j in self.jobs
            if j.dispatched_at is not None
            and not (
                isinstance(j.terminal, JobError) and j.terminal.error_code == "out_of_capacity"
            )
        ]
        means: list[tuple[float, int | None]] = []
        for second in range(int(self.end - self.start)):
            a = self.start + second
            held = sum(max(0.0, min(a + 1, end) - max(a, sent)) for sent, end in spans)
            means.append((second + 0.5, round(held)))
        return means

    def codes(self) -> Counter[str]:
        """Terminal frames of the jobs sent during the load, by kind."""
        return Counter(
            "job_done" if isinstance(j.terminal, JobDone) else j.terminal.error_code
            for j in self.jobs
            if j.terminal is not None
            and j.dispatched_at is not None
            and j.dispatched_at >= self.start
        )


async def until(
    predicate: Callable[[], object], watched: Sequence[Child], what: str, within_s: float = READY_S
) -> None:
    """Poll `predicate` until it holds; fail at once if a watched child exits."""
    deadline = time.monotonic() + within_s
    while not predicate():
        for child in watched:
            if not child.alive():
                raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(child.log_tail() for child in watched)
            raise BenchError(f"not within {within_s:.0f} s: {what}\n{tails}")
        await anyio.sleep(0.05)


async def completions(http: aiohttp.ClientSession, sim_url: str) -> list[dict[str, Any]]:
    """The simulator's record of the completions it took a slot for."""
    async with http.get(f"{sim_url}/__sim/state") as response:
        response.raise_for_status()
        state = await response.json()
    return [r for r in state["requests"] if r.get("slot_monotonic") is not None]


async def status_limit(http: aiohttp.ClientSession, status_url: str) -> int | None:
    """The route's limit in the agent's /status (None when it cannot say)."""
    with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError, TimeoutError):
        async with http.get(status_url, timeout=aiohttp.ClientTimeout(total=1)) as response:
            status = await response.json()
        for model in status["models"]:
            if model["model_id"] == MODEL:
                limits = [r["limit"] for r in model["routes"] if r.get("limit") is not None]
                return sum(limits) if limits else None
    return None


@dataclass
class Rig:
    """One run's processes and the coordinator's view of its agent."""

    coord: LoadCoordinator
    http: aiohttp.ClientSession
    provider_id: str
    sim_url: str
    status_url: str
    watched: list[Child]

    def check_alive(self) -> None:
        for child in self.watched:
            if not child.alive():
                raise BenchError(f"{child.name} exited:\n{child.log_tail()}")

    async def unloaded(self, load: Load, jobs: int, seed: int) -> tuple[list[float], float]:
        """Jobs one at a time: their times to first chunk, and the backend's median service
        time (a slot taken → given back)."""
        rng = random.Random(seed)
        ttfc = []
        for _ in range(jobs):
            record = await self.coord.run_job(self.provider_id, load.request(rng))
            if not isinstance(record.terminal, JobDone) or record.first_chunk_at is None:
                raise BenchError(f"an unloaded job failed: {record.terminal}")
            assert record.dispatched_at is not None
            ttfc.append(record.first_chunk_at - record.dispatched_at)
        served = await completions(self.http, self.sim_url)
        return ttfc, statistics.median(
            r["finished_monotonic"] - r["slot_monotonic"] for r in served
        )

    async def loaded(
        self, load: Load, slot_counts: Sequence[int], seconds: float, seed: int
    ) -> tuple[list[Phase], list[Sample]]:
        """3 × S clients for `seconds` at each slot count in turn, sampled every second."""
        samples: list[Sample] = []
        phases: list[Phase] = []
        sampling = anyio.Event()
        coord, pid = self.coord, self.provider_id

        async def sample() -> None:
            while not sampling.is_set():
                self.check_alive()
                status = await status_limit(self.http, self.status_url)
                t = time.monotonic() - phases[0].start
                samples.append(Sample(t, coord.offered(pid), coord.learned(pid), status))
                with anyio.move_on_after(SAMPLE_EVERY_S):
                    await sampling.wait()

        async with anyio.create_task_group() as group:
            clients = 0
            for slots in slot_counts:
                if phases:
                    url = f"{self.sim_url}/__sim/slots"
                    async with self.http.post(url, json={"slots": slots}) as response:
                        response.raise_for_status()
                phases.append(Phase(slots, time.monotonic(), math.inf))
                if len(phases) == 1:
                    group.start_soon(sample)
                for n in range(clients, 3 * slots):
                    group.start_soon(load.client, seed * 1000 + n)
                clients = max(clients, 3 * slots)
                await anyio.sleep(seconds)
                phases[-1].end = time.monotonic()
                phases[-1].limits = (coord.learned(pid), coord.offered(pid))
            load.stop.set()  # each client ends with its job in flight (at most JOB_WAIT_S)
            sampling.set()
        return phases, samples


def keep_jobs(path: Path, jobs: Sequence[JobRecord], start: float) -> None:
    """One line a job, times in seconds from the load's start (for `--keep`)."""
    with path.open("wb") as out:
        for job in jobs:
            sent, first, end = job.dispatched_at, job.first_chunk_at, job.finished_at
            terminal = job.terminal
            line = {
                "sent": None if sent is None else sent - start,
                "ttfc": None if sent is None or first is None else first - sent,
                "end": None if end is None else end - start,
                "terminal": getattr(terminal, "error_code", None)
                or getattr(terminal, "type", None),
            }
            out.write(orjson.dumps(line) + b"\n")


async def run_one(
    args: argparse.Namespace, workdir: Path, name: str, *, adaptive: bool, started: list[Child]
) -> Run:
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    status_addr = f"127.0.0.1:{free_port()}"
    sim = Child(
        f"{name}-backend",
        [
            *(AGENT, "sim-backend", "--kind", "vllm", "--listen", f"127.0.0.1:{sim_port}"),
            *("--model", MODEL, "--tokens", str(args.tokens), "--tokens-per-s", str(args.rate)),
            *("--ttft-ms", str(args.ttft_ms), "--slots", str(args.slots)),
            *("--prefill-s-per-1k", str(args.prefill_s_per_1k)),
        ],
        workdir / f"{name}-backend.log",
    )
    sim.start()
    started.append(sim)
    async with LoadCoordinator() as coord, aiohttp.ClientSession() as http:
        await wait_http(http, f"{sim_url}/health", None, [sim])
        directory = workdir / name
        directory.mkdir()
        config = write_agent_config(
            directory,
            coord.ws_url,
            f'[[backends]]\nkind = "vllm"\nurl = "{sim_url}"\n',
            prometheus_addr=status_addr,
            heartbeat_interval_s=SAMPLE_EVERY_S,
            extra=(
                f"[limits]\nmax_concurrent = {GLOBAL_MAX}\n"
                f"adaptive = {'true' if adaptive else 'false'}\n"
            ),
        )
        agent = Child(
            f"{name}-agent",
            [AGENT, "run", "--allow-insecure", "--log-level", "warn", "--config", str(config)],
            workdir / f"{name}-agent.log",
        )
        agent.start()
        started.append(agent)

        def serving() -> bool:
            return any(coord.agents[pid].offers().get(MODEL) for pid in coord.connected())

        await until(serving, [sim, agent], f"the {name} agent advertising {MODEL}")
        [pid] = coord.connected()
        rig = Rig(coord, http, pid, sim_url, f"http://{status_addr}/status", [sim, agent])
        load = Load(coord, pid, args.prompt_tokens, args.tokens, args.retry_ms / 1000)
        unloaded, service_s = await rig.unloaded(load, args.unloaded, args.seed)
        phases, samples = await rig.loaded(load, (args.slots, args.raised), args.seconds, args.seed)
        spans = [
            (r["slot_monotonic"], r["finished_monotonic"] or phases[-1].end)
            for r in await completions(http, sim_url)
        ]
        violations = [f"{v.reason}: {v.frame}" for v in coord.violations]
        if args.keep is not None:
            keep_jobs(args.keep / f"{name}-jobs.jsonl", load.jobs, phases[0].start)
        await anyio.to_thread.run_sync(agent.stop)  # the coordinator answers its goodbye
    await anyio.to_thread.run_sync(sim.stop)
    return Run(name, unloaded, service_s, phases, load.jobs, samples, spans, violations)


# --- the report -----------------------------------------------------------------------------------


def pair(learned: str, fixed: str) -> str:
    return f"{learned:>22}{fixed:>22}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def limits_text(phase: Phase) -> str:
    learned, advertised = phase.limits
    return f"{learned} (adv. {advertised})"


def compact(values: Sequence[int | None]) -> str:
    """`4×12 5 4×3`: each value and how many samples in a row had it (`-`: unknown)."""
    parts: list[str] = []
    for value in values:
        text = "-" if value is None else str(value)
        if parts and parts[-1].split("×")[0] == text:
            head, _, count = parts[-1].partition("×")
            parts[-1] = f"{head}×{int(count or 1) + 1}"
        else:
            parts.append(text)
    return " ".join(parts)


def timeline(run: Run, points: Sequence[tuple[float, int | None]]) -> str:
    """(seconds into the load, value) points, compacted, split where the slots were raised."""
    raised = run.phases[1].start - run.start
    before = [value for t, value in points if t < raised]
    after = [value for t, value in points if t >= raised]
    return f"{compact(before)} | {compact(after)}"


def report(args: argparse.Namespace, runs: Sequence[Run]) -> int:
    learned, fixed = runs
    both = (learned, fixed)
    table = Table()
    table.info("", pair("learned", "fixed"))
    table.info(
        f"unloaded TTFC ms (median of {args.unloaded})", pair(*(ms(r.unloaded_s) for r in both))
    )
    table.info("backend service time s", pair(*(f"{r.service_s:.3f}" for r in both)))
    table.info(
        "capacity jobs/s (S ÷ service)",
        pair(*(" → ".join(f"{p.slots / r.service_s:.1f}" for p in r.phases) for r in both)),
    )
    for n, phase in enumerate(learned.phases):
        low, high = phase.slots - 1, phase.slots + 2
        value = phase.limits[0]
        table.check(
            f"max_concurrent {'after' if n == 0 else 'after raised to'} S={phase.slots}",
            pair(limits_text(phase), limits_text(fixed.phases[n])),
            f"{low}–{high}",
            value is not None and low <= value <= high,
        )

    def ttfc(run: Run, q: float, start: float | None = None, end: float | None = None) -> str:
        values = run.ttfc_s(run.start if start is None else start, run.end if end is None else end)
        return f"{ms(percentile(values, q))} ({run.p_ratio(q, start, end):.2f}×)"

    table.info("TTFC p50 ms (× unloaded)", pair(*(ttfc(r, 50) for r in both)))
    table.check(
        "TTFC p95 ms (× unloaded)",
        pair(*(ttfc(r, 95) for r in both)),
        f"≤ {TARGET_P95_RATIO:g}×",
        learned.p_ratio(95) <= TARGET_P95_RATIO,
    )
    for n, phase in enumerate(learned.phases):
        table.info(
            f"  S={phase.slots} phase p95",
            pair(*(ttfc(r, 95, r.phases[n].start, r.phases[n].end) for r in both)),
        )

    def rate(run: Run, start: float | None = None, end: float | None = None) -> str:
        start = run.start if start is None else start
        end = run.end if end is None else end
        done = run.throughput(start, end) * run.slot_seconds(start, end) / run.service_s
        return f"{done / (end - start):.2f}/s ({run.throughput(start, end) * 100:.0f} %)"

    table.check(
        "job_done/s (% of capacity)",
        pair(*(rate(r) for r in both)),
        f"≥ {TARGET_THROUGHPUT * 100:.0f} %",
        learned.throughput() >= TARGET_THROUGHPUT,
    )
    for n, phase in enumerate(learned.phases):
        table.info(
            f"  S={phase.slots} phase",
            pair(*(rate(r, r.phases[n].start, r.phases[n].end) for r in both)),
        )
    table.info("backend slots busy", pair(*(f"{r.busy() * 100:.0f} %" for r in both)))
    codes = [r.codes() for r in both]
    table.info("job_done", pair(*(str(c["job_done"]) for c in codes)))
    table.info("out_of_capacity", pair(*(str(c["out_of_capacity"]) for c in codes)))
    table.check(
        "backend_timeout",
        pair(*(str(c["backend_timeout"]) for c in codes)),
        "0",
        codes[0]["backend_timeout"] == 0,
    )
    known = {"job_done", "out_of_capacity", "backend_timeout"}
    others = [", ".join(f"{k} {v}" for k, v in c.items() if k not in known) or "0" for c in codes]
    table.info("other terminal frames", pair(*others))
    table.check(
        "contract violations",
        pair(*(str(len(r.violations)) for r in both)),
        "0",
        not any(r.violations for r in both),
    )
    p95_ratio = learned.p_ratio(95) / fixed.p_ratio(95)
    throughput_ratio = learned.throughput() / fixed.throughput()
    table.info("learned ÷ fixed: TTFC p95", f"{p95_ratio:.2f}")
    table.info("learned ÷ fixed: throughput", f"{throughput_ratio:.2f}")

    print(
        f"capacity benchmark: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; "
        f"simulated vLLM with {args.slots} slots, raised to {args.raised} after {args.seconds:g} s "
        f"(then {args.seconds:g} s more), ttft {args.ttft_ms:g} ms + prefill "
        f"{args.prefill_s_per_1k:g} s/1k of {args.prompt_tokens[0]}–{args.prompt_tokens[1]} "
        f"prompt tokens, {args.tokens} tokens at {args.rate:g}/s; 3 × S clients, a refused one "
        f"retrying after {args.retry_ms:g} ms; limits.max_concurrent {GLOBAL_MAX}"
    )
    table.print()
    print("\n  timeline, one sample a second ('|': slots raised; value×seconds):")
    for run in both:
        for label, points in (
            ("advertised (capabilities)", [(s.t, s.advertised) for s in run.samples]),
            ("learned (heartbeat)", [(s.t, s.learned) for s in run.samples]),
            ("/status routes[].limit", [(s.t, s.status) for s in run.samples]),
            ("accepted, in flight", run.in_flight()),
        ):
            print(f"  {run.name:<8}{label:<27}{timeline(run, points)}")
    for run in both:
        for violation in run.violations[:3]:
            print(f"  {run.name} violation: {violation}")
    first, second = learned.phases
    print(
        f"\ncapacity: {'MISS ' + ', '.join(table.missed) if table.missed else 'ok'} — learned: "
        f"max_concurrent {first.limits[0]} at S={first.slots} and {second.limits[0]} at "
        f"S={second.slots} (advertised {first.limits[1]}, {second.limits[1]}), TTFC p95 "
        f"{learned.p_ratio(95):.2f}× unloaded, throughput {learned.throughput() * 100:.0f} % of "
        f"capacity, {codes[0]['backend_timeout']} backend_timeout; fixed: p95 "
        f"{fixed.p_ratio(95):.2f}×, {fixed.throughput() * 100:.0f} %; learned ÷ fixed: p95 "
        f"{p95_ratio:.2f}, throughput {throughput_ratio:.2f}"
    )
    return 1 if table.missed else 0


async def bench(args: argparse.Namespace, workdir: Path) -> list[Run]:
    runs = []
    with children() as started:
        for name, adaptive in (("learned", True), ("fixed", False)):
            runs.append(await run_one(args, workdir, name, adaptive=adaptive, started=started))
    return runs


def token_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not LOW-HIGH: {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"need 1 ≤ LOW ≤ HIGH: {text!r}")
    return bounds


#: (option, type, default, help) of the scenario's knobs.
OPTIONS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    ("--seconds", float, 30.0, "each loaded phase"),
    ("--slots", int, 4, "the backend's slots, S"),
    ("--raised", int, 8, "S after the first phase"),
    ("--ttft-ms", float, 50.0, "time to 1st token"),
    ("--tokens", int, 100, "tokens per answer"),
    ("--rate", float, 200.0, "tokens/s per answer"),
    ("--prefill-s-per-1k", float, 0.1, "prefill seconds per 1,000 prompt tokens"),
    ("--retry-ms", float, 50.0, "a refused client's pause"),
    ("--unloaded", int, 7, "jobs alone for the unloaded figures"),
    ("--seed", int, 5, "the prompts' seed"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option, kind, default, text in OPTIONS:
        parser.add_argument(option, type=kind, default=default, help=f"{text} ({default:g})")
    parser.add_argument(
        "--prompt-tokens", type=token_range, default=(200, 400), help="LOW-HIGH (200-400)"
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep the logs")
    args = parser.parse_args()
    if min(args.slots, args.raised, args.tokens, args.unloaded) < 1 or args.seconds <= 0:
        parser.error("--seconds, --slots, --raised, --tokens and --unloaded must be positive")
    if args.rate <= 0 or args.ttft_ms < 0 or args.prefill_s_per_1k < 0 or args.retry_ms < 0:
        parser.error("--rate must be positive; --ttft-ms, --prefill-s-per-1k, --retry-ms ≥ 0")

    def work(directory: Path) -> int:
        return report(args, asyncio.run(bench(args, directory)))

    return run_bench(lambda: in_workdir(args.keep, "capacity-bench-", work))


if __name__ == "__main__":
    sys.exit(main())
