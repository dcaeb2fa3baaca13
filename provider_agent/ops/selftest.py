"""`provider-agent selftest`: does every route this host would sell really answer?

One discovery pass, then one tiny completion (`MAX_TOKENS`) per route, one at a time, through
`jobs.Executor` — the code that serves the coordinator's jobs: admission, route order, the
backend's stream, the deadline, the usage meter, the terminal frame. What differs is only where
the executor's records go, so that a selftest run beside a serving agent changes nothing of it:

- the job store is `MemoryStore` (the executor's `JobStore` seam), not the `Outbox`: no row in
  the outbox or the ledger, not even a file opened in the state dir;
- the statistics (`JobStats`) and outbound lanes are the selftest's own, thrown away afterwards:
  nothing reaches a heartbeat or the `measured` figures of a running agent;
- each completion gets an executor of its own whose route table holds only the route under test,
  so a failing backend is reported, not hidden by a fallback to another route.

Which routes (`plan`, pure): every route of a local backend; of each BYOK backend (which bills
the operator) only the route of its cheapest model by advertised price, unless `--all`; none of
them with `--local`, whose run leaves BYOK backends out altogether (not even discovered: `upgrade`
gates a new release with it, from a shell that holds none of the service's API keys). A
configured backend that fails discovery is a failed row too: something the operator set up does
not answer.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import anyio.abc
import orjson

from provider_agent.backends import Registry
from provider_agent.backends.base import new_http_session
from provider_agent.config.schema import BYOK_KINDS, Config
from provider_agent.discovery.catalog import Route
from provider_agent.discovery.run_pass import BackendReport, run_pass
from provider_agent.jobs.executor import Executor, ExecutorHooks
from provider_agent.jobs.ratelimit import TokenWindow
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import Job, JobDone, JobError, WireFormat, decode
from provider_agent.observe.heartbeat import FinishedJob, JobStats
from provider_agent.ops.render import columns
from provider_agent.safe_text import printable
from provider_agent.store.outbox import LedgerEntry

log = logging.getLogger(__name__)

#: cli.md: a selftest completion asks for 1–8 tokens.
MAX_TOKENS = 8
#: Each completion's deadline (the job's `deadline_ms`): generous for a cold model, and bounded.
DEADLINE_MS = 30_000
PROMPT = "Say hello."
ERROR_LIMIT = 300


@dataclass(frozen=True)
class Check:
    """One completion to try: an advertised model through one of its routes."""

    model_id: str
    route: Route


@dataclass(frozen=True)
class CheckResult:
    """One row of the table. `model` is None for a backend that failed discovery."""

    model: str | None
    backend: str
    kind: str
    ok: bool
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Report:
    results: tuple[CheckResult, ...]
    #: BYOK routes left out (they cost money; `--all` tries them).
    not_tried: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        """Exit 0 only when something was tried and everything answered."""
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def tried(self) -> int:
        return sum(1 for r in self.results if r.model is not None)


# --- pure decisions ------------------------------------------------------------------------------


def plan(
    routes: Mapping[str, Sequence[Route]], *, include_all: bool, local_only: bool = False
) -> tuple[tuple[Check, ...], tuple[Check, ...]]:
    """(to try, not tried), by model id then route order. Every local route is tried. A BYOK
    backend's routes cost the operator money, so only its cheapest model is tried (input +
    output price per 1M, ties by model id) unless `include_all`; none with `local_only`."""
    every = [Check(model_id, route) for model_id in sorted(routes) for route in routes[model_id]]
    if local_only:
        local = tuple(c for c in every if c.route.kind not in BYOK_KINDS)
        return local, tuple(c for c in every if c.route.kind in BYOK_KINDS)
    if include_all:
        return tuple(every), ()
    cheapest: dict[str, Check] = {}
    for check in every:
        if check.route.kind not in BYOK_KINDS:
            continue
        best = cheapest.get(check.route.backend)
        if best is None or _cost(check) < _cost(best):
            cheapest[check.route.backend] = check
    chosen = set(cheapest.values())
    tried = tuple(c for c in every if c.route.kind not in BYOK_KINDS or c in chosen)
    return tried, tuple(c for c in every if c.route.kind in BYOK_KINDS and c not in chosen)


def _cost(check: Check) -> tuple[int, str]:
    price = check.route.price
    return price.input_per_1m + price.output_per_1m, check.model_id


def tiny_request() -> dict[str, Any]:
    """The selftest's request; openai and anthropic both read `messages` and `max_tokens`."""
    return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}


def result_of(check: Check, frame: str, finished: FinishedJob | None) -> CheckResult:
    """A row from the executor's terminal frame and its timing of the job."""
    route = check.route
    decoded = decode(frame)
    if isinstance(decoded, JobError):
        return CheckResult(
            check.model_id,
            route.backend,
            route.kind,
            ok=False,
            error=f"{decoded.error_code}: {printable(decoded.message, ERROR_LIMIT)}",
        )
    if not isinstance(decoded, JobDone):
        return CheckResult(
            check.model_id, route.backend, route.kind, ok=False, error=f"internal: {frame[:100]}"
        )
    ttft = finished.time_to_first_byte_ms if finished is not None else None
    rate = None
    if finished is not None and finished.generation_s > 0:
        rate = round(finished.output_tokens / finished.generation_s, 1)
    return CheckResult(
        check.model_id,
        route.backend,
        route.kind,
        ok=True,
        ttft_ms=round(ttft, 1) if ttft is not None else None,
        tokens_per_s=rate,
        output_tokens=decoded.tokens.output,
    )


def discovery_failure(report: BackendReport) -> CheckResult:
    return CheckResult(
        None,
        report.name,
        report.kind,
        ok=False,
        error=f"discovery: {printable(report.error, ERROR_LIMIT)}",
    )


# --- the executor's store, in memory -------------------------------------------------------------


class MemoryStore:
    """The executor's `JobStore` for selftest: terminal frames kept in memory for the caller to
    read, ledger entries dropped. Nothing is written anywhere."""

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._frames: dict[str, str] = {}
        self._changed = anyio.Event()

    def in_store(self, job_id: str) -> bool:
        return job_id in self._known

    async def accept(self, job_id: str, model_id: str) -> None:
        self._known.add(job_id)

    def progress(self, job_id: str, bytes_relayed: int) -> None:
        """Progress is kept for crash recovery; a selftest has nothing to recover."""

    async def finish(self, job_id: str, frame: str, ledger: LedgerEntry | None) -> str:
        """Keep the first frame (as the outbox does); the ledger entry is not recorded."""
        self._known.add(job_id)
        stored = self._frames.setdefault(job_id, frame)
        self._changed.set()
        self._changed = anyio.Event()
        return stored

    async def delivered(self, job_ids: Sequence[str]) -> None:
        """Nothing is sent to a coordinator, so nothing is confirmed."""

    async def orphans(self) -> list[tuple[str, str, int]]:
        return []

    async def stored_frame(self, job_id: str) -> str | None:
        return self._frames.get(job_id)

    async def ended(self, job_id: str) -> str:
        """Wait for the job's terminal frame."""
        while (frame := self._frames.get(job_id)) is None:
            await self._changed.wait()
        return frame


# --- I/O -----------------------------------------------------------------------------------------


async def run_selftest(
    config: Config, *, include_all: bool = False, local_only: bool = False
) -> Report:
    """The discovery pass, then the checks one at a time (so that timings are not shared).
    `local_only`: BYOK backends are left out of the pass too."""
    if local_only:
        local = [b for b in config.backends if b.kind not in BYOK_KINDS]
        config = config.model_copy(update={"backends": local})
    async with new_http_session(config.limits.max_concurrent) as http:
        found = await run_pass(config, http)
        registry = Registry.build(config, http)
        to_try, not_tried = plan(
            found.catalog.routes, include_all=include_all, local_only=local_only
        )
        results = [await complete(check, config, registry) for check in to_try]
    results += [discovery_failure(report) for report in found.reports if not report.ok]
    return Report(tuple(results), not_tried)


async def complete(check: Check, config: Config, registry: Registry) -> CheckResult:
    """One completion through an executor whose route table holds only `check.route`."""
    route = check.route
    store = MemoryStore()
    stats = JobStats()
    only = {check.model_id: (route,)}
    hooks = ExecutorHooks(
        routes=lambda: only,
        registry=lambda: registry,
        max_concurrent=lambda: config.limits.max_concurrent,
        status=lambda: "ready",
        backend_failed=lambda _: None,  # the row says so; no discovery pass to ask for
    )
    executor = Executor(Outbound(), stats, store, hooks, TokenWindow(None))
    fmt: WireFormat = "openai" if "openai" in route.formats else "anthropic"
    job = Job(
        job_id=f"selftest-{uuid.uuid4().hex}",
        model_id=check.model_id,
        request=tiny_request(),
        format=fmt,
        deadline_ms=DEADLINE_MS,
    )
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        executor.submit(job)
        frame = await store.ended(job.job_id)
        await executor.wait_idle()
        group.cancel_scope.cancel()
    finished = stats.window(anyio.current_time())
    return result_of(check, frame, finished[-1] if finished else None)


# --- output --------------------------------------------------------------------------------------


def render(report: Report) -> str:
    """The table for a person; foreign text escaped."""
    rows = [
        [
            printable(r.model, 300) if r.model is not None else "-",
            printable(r.backend, 300),
            "ok" if r.ok else "FAIL",
            f"{r.ttft_ms:.0f}" if r.ttft_ms is not None else "-",
            f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-",
            r.error or "-",
        ]
        for r in report.results
    ]
    lines = columns(["MODEL", "BACKEND", "OK", "TTFT MS", "TOKENS/S", "ERROR"], rows, right=(3, 4))
    failed = sum(1 for r in report.results if not r.ok)
    if report.tried == 0:
        lines.append("(no model advertised: nothing to try; see `provider-agent discover`)")
    lines.append("")
    lines.append(
        f"{report.tried} completion(s) of at most {MAX_TOKENS} tokens; "
        + (f"{failed} failed" if failed else "all ok")
    )
    if report.not_tried:
        backends = sorted({c.route.backend for c in report.not_tried})
        lines.append(
            f"not tried: {len(report.not_tried)} more model(s) of "
            f"{', '.join(printable(b, 100) for b in backends)} (BYOK: they cost money; "
            "--all tries every one)"
        )
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return orjson.dumps(
        {
            "ok": report.ok,
            "results": [asdict(r) for r in report.results],
            "not_tried": [
                {"model": c.model_id, "backend": c.route.backend} for c in report.not_tried
            ],
        }
    ).decode()


def selftest_command(
    config: Config, *, as_json: bool, include_all: bool, local_only: bool = False
) -> int:
    """`provider-agent selftest`: 0 all ok; 1 some failed or no model advertised; stopped by
    SIGTERM (0) or SIGINT (130), the work is abandoned and nothing is printed on stdout
    (cli.md)."""
    from provider_agent.runtime import Stopped, run_until_signal

    report = run_until_signal(
        lambda: run_selftest(config, include_all=include_all, local_only=local_only)
    )
    if isinstance(report, Stopped):
        print("selftest: stopped before it finished", file=sys.stderr)
        return report.exit_code
    print(to_json(report) if as_json else render(report))
    return 0 if report.ok else 1
