"""A deterministic virtual-time model of an inference server, to drive `RouteCapacity` with.

The server has S slots and queues beyond them, first in first out. A job holds a slot for its
prefill (proportional to its prompt) and its generation (proportional to its output); its first
byte comes `base_s` after its prefill ends, so its time to first byte is queue wait + prefill +
base. Nothing sleeps: events run off a heap in virtual seconds, and prompt sizes, output sizes
and noise come from a seeded generator, so a run is the same every time.

The client is a closed loop: it always has `demand` jobs on offer (3 × S by default) and starts
as many as the controller's limit allows (the agent refuses the rest), feeding `observe` with
each started job's first byte and calling `tick` on every event and every half second, as the
executor does on every admission check. `capacity` changes S mid-run (a larger S starts queued
jobs at once, a smaller one lets the running jobs finish); `backends` swaps the server's costs.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from provider_agent.jobs.capacity import RouteCapacity
from provider_agent.observe.heartbeat import percentile

TICK_EVERY_S = 0.5
#: Phases in which the controller holds its limit down on purpose (left out of the figures).
HOLDS = frozenset({"remeasuring"})


@dataclass(frozen=True)
class Server:
    """Costs of the modelled backend (defaults: a mid-size model on one GPU). Each job's base
    and prefill are stretched by a factor drawn from [1, 1 + `jitter`], and three times more
    for the share `stalls` of jobs (a stall)."""

    base_s: float = 0.02
    prefill_tokens_per_s: float = 20_000.0
    decode_tokens_per_s: float = 200.0
    jitter: float = 0.0
    stalls: float = 0.0

    def unloaded_s(self, prompt_tokens: int) -> float:
        return self.base_s + prompt_tokens / self.prefill_tokens_per_s


NOISY = Server(jitter=0.3, stalls=0.02)


@dataclass(frozen=True)
class Mix:
    """Prompt sizes: a share of long prompts, the rest short; outputs of 100–300 tokens."""

    long_share: float = 0.0
    short: tuple[int, int] = (100, 300)
    long: tuple[int, int] = (4_000, 8_000)
    output: tuple[int, int] = (100, 300)

    def draw(self, rng: random.Random) -> tuple[int, int]:
        low, high = self.long if rng.random() < self.long_share else self.short
        return rng.randint(low, high), rng.randint(*self.output)


SHORT = Mix()
MIXED = Mix(long_share=0.2)
LONG = Mix(long_share=1.0)


@dataclass
class Job:
    sent: float
    prompt_tokens: int
    output_tokens: int
    in_flight: int
    stretch: float
    start: float = math.nan
    first_byte: float = math.nan
    end: float = math.nan
    unloaded: float = math.nan  # its own time to first byte had it not waited


@dataclass
class Run:
    """What one run left: the jobs, the limit over time (with the controller's phase), the
    slot count over time, and when it ended."""

    jobs: list[Job]
    trace: list[tuple[float, int, str]]
    slots: list[tuple[float, int]]
    end: float

    def limits(self, since: float, until: float, *, holds: bool = False) -> list[int]:
        """Every limit in force during [since, until], the re-measure holds left out unless
        asked for."""
        found: list[int] = []
        for index, (at, limit, phase) in enumerate(self.trace):
            following = self.trace[index + 1][0] if index + 1 < len(self.trace) else self.end
            if following < since or at > until or (phase in HOLDS and not holds):
                continue
            found.append(limit)
        return found

    def settled_at(self, low: int, high: int) -> float:
        """When the limit last entered [low, high] to stay (holds aside); inf if it ends out."""
        settled = self.trace[0][0]
        for at, limit, phase in self.trace:
            if phase not in HOLDS and not low <= limit <= high:
                settled = math.inf
            elif settled == math.inf and phase not in HOLDS:
                settled = at
        return settled

    def p95_ratio(self, since: float, until: float) -> float:
        """p95, over the jobs admitted in [since, until), of time to first byte ÷ that job's
        own unloaded time (like with like: a long prompt is compared with its own prefill)."""
        ratios = [
            (job.first_byte - job.sent) / job.unloaded
            for job in self.jobs
            if since <= job.sent < until and job.first_byte <= self.end
        ]
        return percentile(ratios, 95)

    def throughput(self, since: float, until: float) -> float:
        """Busy slot-seconds ÷ slot-seconds on offer over [since, until]."""
        busy = sum(
            max(0.0, min(job.end, until) - max(job.start, since))
            for job in self.jobs
            if not math.isnan(job.start)
        )
        offered = 0.0
        for index, (at, slots) in enumerate(self.slots):
            following = self.slots[index + 1][0] if index + 1 < len(self.slots) else math.inf
            offered += slots * max(0.0, min(following, until) - max(at, since))
        return busy / offered


@dataclass
class _Simulation:
    """The server, its queue and the closed-loop client, one event at a time."""

    control: RouteCapacity
    slots: int
    mix: Mix
    costs: Server
    offered: int
    rng: random.Random
    jobs: list[Job] = field(default_factory=list)
    queue: list[Job] = field(default_factory=list)  # FIFO: `head` is next
    head: int = 0
    busy: int = 0
    in_flight: int = 0
    events: list[tuple[float, int, str, Job | None, int]] = field(default_factory=list)
    order: int = 0

    def push(self, at: float, kind: str, job: Job | None = None, value: int = 0) -> None:
        self.order += 1
        heapq.heappush(self.events, (at, self.order, kind, job, value))

    def begin(self, job: Job, now: float) -> None:
        self.busy += 1
        costs = self.costs
        prefill_end = now + job.stretch * job.prompt_tokens / costs.prefill_tokens_per_s
        job.start = now
        job.first_byte = prefill_end + job.stretch * costs.base_s
        job.end = prefill_end + job.output_tokens / costs.decode_tokens_per_s
        job.unloaded = job.first_byte - now
        self.push(job.first_byte, "first", job)
        self.push(job.end, "done", job)

    def serve_and_admit(self, now: float) -> None:
        """Queued jobs into free slots, then as many new jobs as the limit allows."""
        while self.head < len(self.queue) and self.busy < self.slots:
            self.begin(self.queue[self.head], now)
            self.head += 1
        while self.in_flight < min(self.control.limit, self.offered):
            prompt, output = self.mix.draw(self.rng)
            stretch = 1.0 + self.costs.jitter * self.rng.random()
            if self.costs.stalls and self.rng.random() < self.costs.stalls:
                stretch *= 3.0
            self.in_flight += 1
            job = Job(now, prompt, output, self.in_flight, stretch)
            self.jobs.append(job)
            if self.busy < self.slots and self.head == len(self.queue):
                self.begin(job, now)
            else:
                self.queue.append(job)


def run(
    control: RouteCapacity,
    slots: int,
    seconds: float,
    *,
    mix: Mix = MIXED,
    server: Server = NOISY,
    capacity: Sequence[tuple[float, int]] = (),
    backends: Sequence[tuple[float, Server]] = (),
    demand: int | None = None,
    start: float = 0.0,
    seed: int = 7,
) -> Run:
    """Drives `control` against the modelled server from `start` for `seconds` of virtual
    time (`capacity` and `backends` change at absolute times)."""
    sim = _Simulation(control, slots, mix, server, demand or 3 * slots, random.Random(seed))
    end = start + seconds
    trace: list[tuple[float, int, str]] = []
    slot_trace = [(start, slots)]
    for at, count in capacity:
        sim.push(at, "capacity", value=count)
    for index, (at, _) in enumerate(backends):
        sim.push(at, "backend", value=index)
    for tick in range(int(seconds / TICK_EVERY_S) + 1):
        sim.push(start + tick * TICK_EVERY_S, "tick")
    while sim.events:
        now, _, kind, job, value = heapq.heappop(sim.events)
        if now > end:
            break
        control.tick(now)
        if kind == "first" and job is not None:
            control.observe(now, now - job.sent, job.prompt_tokens, job.in_flight)
        elif kind == "done":
            sim.busy -= 1
            sim.in_flight -= 1
            if job is not None:
                control.finished(now - job.sent)
        elif kind == "capacity":
            sim.slots = value
            slot_trace.append((now, value))
        elif kind == "backend":
            sim.costs = backends[value][1]
        sim.serve_and_admit(now)
        if not trace or trace[-1][1:] != (control.limit, control.phase):
            trace.append((now, control.limit, control.phase))
    return Run(sim.jobs, trace, slot_trace, end)
