"""The job executor: accept → route → stream through a backend → chunks → exactly one terminal
frame, recorded in the outbox before it is sent.

Follow a job top-down: `submit` (called by the session's reader; decides at once, never waits)
→ `_run` (its own cancel scope in the jobs task group) → `_serve` (routes in order; fallback only
before the first byte) → `_relay` (upstream bytes verbatim into the job's outbound lane, usage
metered as they pass) → `_end` (shielded: outbox, outbound, statistics, ledger).

Every distinct `job_id` gets one terminal frame: a repeat while it runs is ignored, a repeat after
it ended gets the SAME stored frame again (protocol.md §4). Cancel, deadline, a lost connection
and the stop all end a job through its cancel scope with a reason, so they share one path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import anyio.abc

from provider_agent.clock import DEFAULT_TIMINGS, Timings
from provider_agent.discovery.catalog import Route
from provider_agent.errors import OutboxError, RouteFailure, StreamFailed, UnencodableRequest
from provider_agent.jobs.measured import MeasuredSpeed
from provider_agent.jobs.ratelimit import TokenWindow
from provider_agent.jobs.route_health import ROUTE_FAILURES
from provider_agent.jobs.route_limits import RouteLimits
from provider_agent.jobs.routing import AgentStatus, Refusal, RouteLoad, admit, order_routes
from provider_agent.jobs.upstream import FirstBytes, request_body
from provider_agent.jobs.usage import UsageMeter
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import (
    ErrorCode,
    Job,
    JobDone,
    JobError,
    TokenCounts,
    WireFormat,
    encode,
)
from provider_agent.observe.heartbeat import FinishedJob, JobStats
from provider_agent.observe.logs import Throttle
from provider_agent.safe_text import printable
from provider_agent.store.outbox import LedgerEntry

if TYPE_CHECKING:
    from provider_agent.backends import Registry

log = logging.getLogger(__name__)


class StreamOpener(Protocol):
    """`Backend.stream`'s shape, as the relay uses it (see `backends.stream`)."""

    def __call__(
        self,
        fmt: WireFormat,
        body: bytes,
        deadline: float,
        *,
        first_bytes: FirstBytes | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


#: A job's bytes waiting for the writer beyond this make its relay wait (backpressure) …
BACKPRESSURE_BYTES = 1024 * 1024
#: How often a running job's relayed byte count is recorded (for `connection_lost` after a crash).
PROGRESS_EVERY_S = 1.0
#: Past the deadline, the stream's own timer should have ended the job; this is the backstop.
DEADLINE_GRACE_S = 1.0
#: A terminal frame the outbox could not store is stored again this often (protocol.md §8) …
STORE_RETRY_S = 5.0
#: … and while the store fails, one error line says so this often.
STORE_FAILING_LOG_S = 60.0
#: Frames waiting for a failing store beyond which new refusals are dropped, not kept.
MAX_UNSTORED = 10_000
#: A repeat's stored frame is read this many times (STORE_RETRY_S apart) while the store fails.
REPEAT_READ_TRIES = 12


@dataclass
class Outcome:
    """How a job ended, before it becomes a frame."""

    error_code: ErrorCode | None = None
    message: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False


@dataclass
class Running:
    """One job in flight."""

    job: Job
    received_at: float
    deadline: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop_reason: tuple[ErrorCode, str] | None = None
    route: Route | None = None
    relayed: int = 0
    first_byte_at: float | None = None
    counted_tokens: int = 0
    #: `route` failed before its first byte and was left for the next one (already reported).
    route_left: bool = False
    #: `route` answered 429 (busy, not broken: route health leaves its streak alone).
    throttled: bool = False
    #: When the request went to `route`, and the jobs in flight there then (itself included):
    #: with the first byte's time, one sample for the route's limit (protocol.md §9).
    sent_at: float = 0.0
    route_in_flight: int = 0

    def stop(self, code: ErrorCode, message: str) -> None:
        """End the job from outside (cancel, lost connection, shutdown); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = (code, message)
        self.scope.cancel()


class JobStore(Protocol):
    """What the executor records jobs in: the `Outbox` when serving; `selftest` hands it an
    in-memory stand-in, so its completions leave no trace in the outbox or the ledger."""

    def in_store(self, job_id: str) -> bool: ...
    async def accept(self, job_id: str, model_id: str) -> None: ...
    def progress(self, job_id: str, bytes_relayed: int) -> None: ...
    async def finish(self, job_id: str, frame: str, ledger: LedgerEntry | None) -> str: ...
    async def delivered(self, job_ids: Sequence[str]) -> None: ...
    async def orphans(self) -> list[tuple[str, str, int]]: ...
    async def stored_frame(self, job_id: str) -> str | None: ...


@dataclass
class ExecutorHooks:
    """What the executor reads from the rest of the agent, fresh for every job."""

    routes: Callable[[], Mapping[str, Sequence[Route]]]
    registry: Callable[[], Registry]
    max_concurrent: Callable[[], int]
    #: Ready, draining (new jobs: `shutting_down`) or paused (new jobs: `out_of_capacity`).
    status: Callable[[], AgentStatus]
    #: A backend failed a job before its first byte (the daemon asks for a discovery pass).
    backend_failed: Callable[[str], None]
    #: A route attempt ended: (route, error code or None, bytes relayed, the backend answered
    #: 429), for route health.
    route_ended: Callable[[Route, ErrorCode | None, int, bool], None] = lambda *_: None


class Executor:
    """Jobs in flight and their terminal frames."""

    def __init__(
        self,
        outbound: Outbound,
        stats: JobStats,
        outbox: JobStore,
        hooks: ExecutorHooks,
        window: TokenWindow,
        *,
        clock: Callable[[], float] = anyio.current_time,
        tick: Callable[[], float] = time.monotonic,
        measured: MeasuredSpeed | None = None,
        timings: Timings = DEFAULT_TIMINGS,
        limits: RouteLimits | None = None,
    ) -> None:
        self.outbound = outbound
        self.timings = timings
        self.stats = stats
        self.outbox = outbox
        self.hooks = hooks
        self.window = window
        self.clock = clock
        #: The cheap clock of per-event bookkeeping (the token window, progress records); `clock`
        #: (the event loop's) times jobs and their deadlines.
        self.tick = tick
        #: Served jobs per model, advertised as `measured` (job_done only).
        self.measured = measured or MeasuredSpeed()
        self.load = RouteLoad()
        #: Each route's concurrency limit (protocol.md §9); None: slot counts and caps only.
        self.limits = limits
        self.running: dict[str, Running] = {}
        #: Refusals whose terminal frame is being stored: a repeat meanwhile counts as in flight.
        self._refusing: set[str] = set()
        #: Terminal frames the outbox could not store (disk full, database locked), oldest
        #: first: stored again every STORE_RETRY_S and sent once stored, never before.
        self._unstored: dict[str, tuple[str, LedgerEntry]] = {}
        self._unstored_added = anyio.Event()
        #: Why the outbox cannot store frames now (new jobs are refused meanwhile); None: it can.
        self.store_problem: str | None = None
        #: How often frames waiting for the store are tried again (tests shorten it).
        self.store_retry_s = STORE_RETRY_S
        self._store_failing_log = Throttle(STORE_FAILING_LOG_S)
        self._delivery_failing_log = Throttle(STORE_FAILING_LOG_S)
        self._group: anyio.abc.TaskGroup | None = None
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def _limit_of(self, route: Route) -> int:
        assert self.limits is not None
        return self.limits.limit(route, self.clock())

    def _has_room(self, route: Route) -> bool:
        return self.load.has_room(route, self._limit_of(route))

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The jobs task group; lives until the daemon cancels it."""
        async with anyio.create_task_group() as self._group:
            task_status.started()
            await self._store_again_while_failing()

    @property
    def unstored(self) -> int:
        """Terminal frames waiting for the outbox to take them."""
        return len(self._unstored)

    # --- inbound: decide at once, never wait -----------------------------------------------------

    def submit(self, job: Job) -> None:
        """A `job` frame from the coordinator."""
        assert self._group is not None, "submit before run()"
        job_id = job.job_id
        if job_id in self.running or job_id in self._refusing:
            log.warning("job already in flight, repeat ignored job_id=%s", printable(job_id))
            return
        if self._known(job_id):
            self._group.start_soon(self._answer_repeat, job_id, lambda: self._start(job))
            return
        self._start(job)

    def _start(self, job: Job) -> None:
        """A job this agent holds no frame for: refused at once, or run."""
        assert self._group is not None
        job_id = job.job_id
        if job_id in self.running or job_id in self._refusing:
            return  # a repeat of it arrived while its stored frame was looked for
        refusal = admit(
            model_id=job.model_id,
            fmt=job.format,
            routes=self.hooks.routes(),
            in_flight=len(self.running),
            max_concurrent=self.hooks.max_concurrent(),
            window_open=self.window.admit(self.tick()),
            status=self.hooks.status(),
            store_problem=self.store_problem,
            has_room=self._has_room if self.limits is not None else None,
        )
        if refusal is not None:
            self._refusing.add(job_id)
            self._group.start_soon(self._refuse, job, refusal)
            return
        now = self.clock()
        running = Running(job, received_at=now, deadline=now + job.deadline_ms / 1000)
        self.running[job_id] = running
        self._idle = anyio.Event()
        self.stats.job_started()
        self._group.start_soon(self._run, running)

    def reject(
        self,
        job_id: str,
        reason: str,
        code: Literal["bad_request", "unsupported_format"] = "bad_request",
    ) -> None:
        """A `job` frame that could not be parsed but whose id could be read: `bad_request` (or
        `unsupported_format`), only for a job_id that is new (a repeat of a known id gets its
        stored frame)."""
        assert self._group is not None, "reject before run()"
        if job_id in self.running or job_id in self._refusing:
            return

        def refuse() -> None:
            assert self._group is not None
            if job_id in self.running or job_id in self._refusing:
                return
            self._refusing.add(job_id)
            log.warning("malformed job job_id=%s: %s", printable(job_id), printable(reason))
            self._group.start_soon(self._refuse_id, job_id, Refusal(code, reason))

        if self._known(job_id):
            self._group.start_soon(self._answer_repeat, job_id, refuse)
            return
        refuse()

    def _known(self, job_id: str) -> bool:
        """The store (or the frames waiting for it) has seen `job_id`: answer it as a repeat."""
        return job_id in self._unstored or self.outbox.in_store(job_id)

    def cancel(self, job_id: str) -> None:
        """`job_cancel`: abort upstream, answer `cancelled`. Unknown or finished ids: ignored."""
        running = self.running.get(job_id)
        if running is None:
            log.debug("cancel for a job not in flight job_id=%s", printable(job_id))
            return
        running.stop("cancelled", "cancelled by the coordinator")

    def connection_lost(self) -> None:
        """The coordinator's socket is gone: every job in flight loses its client."""
        for running in list(self.running.values()):
            running.stop("connection_lost", "the coordinator connection dropped mid-job")
            self.outbound.discard(running.job.job_id)

    async def confirmed(self, job_ids: Sequence[str]) -> None:
        """Terminal frames the coordinator has read (pong) or stored (job_ack). A confirmation
        the store cannot record (a full disk) costs nothing but a re-send of those frames after
        the next auth_ok (the same frames: the coordinator keeps one per job_id), so it never
        ends the session."""
        try:
            await self.outbox.delivered(job_ids)
        except OutboxError as exc:
            if self._delivery_failing_log.due(self.tick()) is not None:
                log.error("delivery of terminal frames not recorded (they go again later): %s", exc)

    # --- the daemon's shutdown steps -------------------------------------------------------------

    async def wait_idle(self) -> None:
        """Returns once no job is in flight (the drain step)."""
        await self._until_idle()

    async def _until_idle(self) -> None:
        while self.running:
            await self._idle.wait()

    async def cancel_all(self) -> None:
        """Stop every job still running and wait until each has its terminal frame."""
        for running in list(self.running.values()):
            running.stop("shutting_down", "the agent stopped before the job finished")
        await self._until_idle()

    async def flush(self) -> None:
        """Waits for jobs still writing their terminal frames, then tries once more to store
        those the outbox refused. What still cannot be stored is lost from memory only: the
        journal holds those jobs, so the next start reports them `connection_lost`."""
        await self._until_idle()
        if self._unstored:
            await self._store_unstored()
        if self._unstored:
            log.error(
                "%d terminal frame(s) could not be stored before the stop; the next start "
                "reports those jobs connection_lost: %s",
                len(self._unstored),
                self.store_problem,
            )

    async def report_orphans(self) -> int:
        """After a restart: jobs accepted but never ended (the agent died) get `connection_lost`
        with the bytes relayed as far as recorded. Their frames go out after the next auth_ok."""
        orphans = await self.outbox.orphans()
        for job_id, model_id, relayed in orphans:
            frame = encode(
                JobError(
                    job_id=job_id,
                    error_code="connection_lost",
                    message="the agent stopped before the job finished",
                    tokens_emitted=relayed,
                )
            )
            await self.outbox.finish(job_id, frame, None)
            log.warning(
                "job left unfinished by an earlier run reported job_id=%s model=%s bytes=%d",
                printable(job_id),
                printable(model_id),
                relayed,
            )
        return len(orphans)

    # --- one job ---------------------------------------------------------------------------------

    async def _run(self, running: Running) -> None:
        job = running.job
        outcome: Outcome | None = None
        try:
            # Written ahead of the upstream request (the in-flight journal, a few µs): whatever
            # the coordinator sees of this job, a crash reports it `connection_lost` after restart.
            await self.outbox.accept(job.job_id, job.model_id)
            with running.scope:
                running.scope.deadline = running.deadline + DEADLINE_GRACE_S
                outcome = await self._serve(running)
            if running.stop_reason is not None:  # what was read after the stop was not relayed
                outcome = Outcome(*running.stop_reason)
            elif outcome is None:
                outcome = Outcome("backend_timeout", "deadline_ms passed")
        except OutboxError as exc:  # the state dir is full or gone: the store fails (§8)
            self._store_failing(exc)
            outcome = Outcome("out_of_capacity", self.store_problem or str(exc))
        except Exception as exc:  # a bug must cost one job, never the agent
            log.exception("job failed internally job_id=%s", printable(job.job_id))
            outcome = Outcome("internal", f"internal error ({type(exc).__name__})")
        finally:
            with anyio.CancelScope(shield=True):
                await self._end(running, outcome or Outcome("shutting_down", "agent stopped"))

    async def _serve(self, running: Running) -> Outcome:
        job = running.job
        now = self.clock()
        routes = order_routes(
            self.hooks.routes().get(job.model_id, ()),
            job.format,
            self.load,
            now,
            self._limit_of if self.limits is not None else None,
        )
        if not routes:
            return Outcome("out_of_capacity", "every backend serving this model is at its limit")
        last: RouteFailure | None = None
        for route in routes:
            try:
                backend = self.hooks.registry().get(route.backend)
            except KeyError:
                continue  # removed by a reload since the last pass
            running.route = route
            running.route_left = False
            running.throttled = False
            self.load.started(route)
            running.sent_at = self.clock()
            running.route_in_flight = self.load.routes.get(route.key, 0)
            try:
                outcome = await self._relay(running, backend.stream, route)
                if self.limits is not None and running.first_byte_at is not None:
                    self.limits.finished(route, self.clock() - running.sent_at)
                return outcome
            except UnencodableRequest as exc:  # read, but nested beyond what the encoder writes
                return Outcome("bad_request", str(exc))
            except StreamFailed as exc:
                failure = exc.failure
                if running.relayed:  # after the first byte there is no retry
                    return Outcome(failure.code, failure.message)
                last = failure
                running.throttled = failure.throttled
                if failure.throttled or failure.code in ROUTE_FAILURES:
                    self.load.failed(route, self.clock())  # skipped for 10 s (protocol.md §8)
                if self.limits is not None and (
                    failure.throttled or failure.code == "backend_timeout"
                ):
                    self.limits.failed(route, self.clock())  # busy: a lower limit (§9)
                if failure.code != "bad_request" and not failure.throttled:
                    self.hooks.backend_failed(route.backend)  # a pass soon (a 404 too)
                if not failure.fallback:
                    return Outcome(failure.code, failure.message)
                running.route_left = True
                self.hooks.route_ended(route, failure.code, 0, failure.throttled)
                log.info(
                    "route failed before its first byte, trying the next job_id=%s backend=%s "
                    "code=%s",
                    printable(job.job_id),
                    route.backend,
                    failure.code,
                )
            finally:
                self.load.ended(route)
        if last is None:
            return Outcome("model_not_loaded", "no backend of this agent serves this model")
        return Outcome(last.code, last.message)

    async def _relay(self, running: Running, stream: StreamOpener, route: Route) -> Outcome:
        job = running.job
        job_id = job.job_id
        meter = UsageMeter(job.format, job.request)
        body = request_body(job.format, job.request, route.native_id)
        #: The prompt's size for the route's limit: the body's length (≈ 4 bytes a token) is
        #: free here and grows with the prompt, which is all the controller compares.
        prompt_tokens = len(body) // 4
        next_progress = 0.0
        #: Cancelled at the end marker: a backend that keeps the connection open after it is
        #: not waited for (protocol.md §8), however the marker arrived (read or pushed).
        reading = anyio.CancelScope()

        def take(data: bytes) -> int:
            """One piece of the body, on its way: metered, counted and handed to the job's lane;
            returns the job's bytes waiting for the writer. Synchronous, so the lean reader can
            call it for the first bytes from its read callback (`first_bytes`). Bytes read
            after the job was stopped (cancel, lost connection) are not its to send. The bytes
            relayed are journalled with the first ones, then at least once a second, so a crash
            reports them in `tokens_emitted` (protocol.md §8)."""
            nonlocal next_progress
            if running.stop_reason is not None:
                return 0
            first = running.first_byte_at is None
            if first:
                running.first_byte_at = at = self.clock()
                if self.limits is not None:
                    self.limits.observe(
                        route, at, at - running.sent_at, prompt_tokens, running.route_in_flight
                    )
            meter.feed(data)
            running.relayed += len(data)
            counted = meter.output_so_far
            now = self.tick()
            if counted > running.counted_tokens:
                self.window.add(now, counted - running.counted_tokens)
                running.counted_tokens = counted
            pending = self.outbound.chunk(job_id, data, first=first)
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.outbox.progress(job_id, running.relayed)
            if meter.ended:
                reading.cancel()
            return pending

        async with stream(job.format, body, running.deadline, first_bytes=take) as chunks:
            with reading:
                async for data in chunks:
                    if take(data) > BACKPRESSURE_BYTES:
                        with anyio.move_on_after(self.timings.send_stall_s) as stalled:
                            await self.outbound.sent_down_to(job_id, BACKPRESSURE_BYTES)
                        if stalled.cancelled_caught:
                            return Outcome(
                                "connection_lost",
                                f"frames could not be sent for {self.timings.send_stall_s:g} s",
                            )
        if meter.disbelieved:
            log.warning(
                "usage figures outside 0..10^12 not believed, job billed on the estimate "
                "job_id=%s backend=%s fields=%s",
                printable(job_id),
                route.backend,
                ",".join(meter.disbelieved),
            )
        if meter.error is not None:
            return Outcome("backend_error", f"error event mid-stream: {meter.error}")
        if not meter.ended:
            marker = "data: [DONE]" if job.format == "openai" else "message_stop"
            return Outcome("backend_error", f"the stream ended before {marker}")
        usage = meter.result()
        self.load.succeeded(route)
        return Outcome(
            None,
            "",
            input_tokens=usage.input,
            output_tokens=usage.output,
            estimated=usage.estimated,
        )

    async def _end(self, running: Running, outcome: Outcome) -> None:
        """The one terminal frame: outbox first (a billing record), then the wire. Never raises:
        whatever happens while one job ends stays with that job (protocol.md §8)."""
        job = running.job
        now = self.clock()
        try:
            if outcome.error_code == "connection_lost":
                self.outbound.discard(job.job_id)  # nobody will read those bytes
            try:
                frame, ledger = self._terminal(running, outcome, now)
            except Exception as exc:  # a figure no frame or ledger row can hold: a bug
                log.exception("terminal frame failed job_id=%s", printable(job.job_id))
                outcome = Outcome("internal", f"internal error ({type(exc).__name__})")
                frame, ledger = self._terminal(running, outcome, now)
            text = await self._store(job.job_id, frame, ledger)
            if text is not None:
                self.outbound.terminal(job.job_id, text)
            self._record(running, outcome, now)
        except Exception:
            log.exception("ending the job failed job_id=%s", printable(job.job_id))
        finally:
            del self.running[job.job_id]
            if not self.running:
                self._idle.set()

    def _terminal(self, running: Running, outcome: Outcome, now: float) -> tuple[str, LedgerEntry]:
        """The terminal frame's text and its ledger row."""
        job = running.job
        route = running.route
        if outcome.error_code is None:
            frame: JobDone | JobError = JobDone(
                job_id=job.job_id,
                tokens=TokenCounts(
                    input=outcome.input_tokens,
                    output=outcome.output_tokens,
                    input_tokens=outcome.input_tokens,
                    output_tokens=outcome.output_tokens,
                ),
                duration_ms=round((now - running.received_at) * 1000),
                usage_source="estimated" if outcome.estimated else None,
            )
        else:
            frame = JobError(
                job_id=job.job_id,
                error_code=outcome.error_code,
                message=outcome.message,
                tokens_emitted=running.relayed,
            )
        ledger = LedgerEntry(
            model=job.model_id,
            backend=route.backend if route else "",
            outcome=outcome.error_code or "job_done",
            tokens_in=outcome.input_tokens,
            tokens_out=outcome.output_tokens,
            usage_source="estimated" if outcome.estimated else "reported",
            input_per_1m=route.price.input_per_1m if route else 0,
            output_per_1m=route.price.output_per_1m if route else 0,
        )
        return encode(frame), ledger

    def _record(self, running: Running, outcome: Outcome, now: float) -> None:
        """An ended job in the statistics: the rate window, `measured`, the heartbeat's window,
        route health, one log line."""
        job = running.job
        route = running.route
        first = running.first_byte_at
        if outcome.error_code is None:
            actual = outcome.input_tokens + outcome.output_tokens
            self.window.correct(self.tick(), running.counted_tokens, actual)
            if first is not None:
                self.measured.add(
                    job.model_id,
                    now,
                    ttft_ms=(first - running.received_at) * 1000,
                    output_tokens=outcome.output_tokens,
                    generation_s=now - first,
                )
        self.stats.job_finished(
            FinishedJob(
                at=now,
                time_to_first_byte_ms=(first - running.received_at) * 1000 if first else None,
                output_tokens=outcome.output_tokens,
                generation_s=now - first if first else 0.0,
                error_code=outcome.error_code,
                backend=route.backend if route else "",
                input_tokens=outcome.input_tokens,
                duration_s=now - running.received_at,
                relayed_bytes=running.relayed,
                job_id=job.job_id,
                message=outcome.message,
            )
        )
        log.info(
            "job ended job_id=%s model=%s backend=%s outcome=%s bytes=%d",
            printable(job.job_id),
            printable(job.model_id),
            route.backend if route else "-",
            outcome.error_code or "job_done",
            running.relayed,
        )
        if route is not None and not running.route_left:
            self.hooks.route_ended(route, outcome.error_code, running.relayed, running.throttled)

    # --- the store: stored before sent, kept until stored -----------------------------------------

    async def _store(self, job_id: str, frame: str, ledger: LedgerEntry) -> str | None:
        """The terminal frame to send, once stored. When the outbox cannot take it (a full disk,
        a database locked by another process), it is kept here and stored again every
        STORE_RETRY_S; it is sent once stored, never before (protocol.md §5, §8), and new jobs
        are refused meanwhile. None: not stored yet."""
        if self._unstored:  # frames go in the order they ended
            self._keep_unstored(job_id, frame, ledger, None)
            return None
        try:
            return await self.outbox.finish(job_id, frame, ledger)
        except OutboxError as exc:
            self._keep_unstored(job_id, frame, ledger, exc)
            return None

    def _keep_unstored(
        self, job_id: str, frame: str, ledger: LedgerEntry, exc: OutboxError | None
    ) -> None:
        self._unstored.setdefault(job_id, (frame, ledger))
        if exc is not None:
            self._store_failing(exc)
        self._unstored_added.set()

    def _store_failing(self, exc: OutboxError) -> None:
        """The store refused a record. New jobs are refused until the frames waiting are stored,
        or, when none waits (the journal failed), for one retry interval: the next job tries."""
        self.store_problem = f"this agent cannot store billing records now: {exc}"
        self._unstored_added.set()
        held = self._store_failing_log.due(self.tick())
        if held is not None:
            log.error(
                "terminal frames cannot be stored, so they are not sent yet and new jobs are "
                "refused; trying again every %gs (%d waiting, %d lines held back): %s",
                self.store_retry_s,
                len(self._unstored),
                held,
                exc,
            )

    async def _store_again_while_failing(self) -> None:
        """Every STORE_RETRY_S while frames wait for the outbox: store them, oldest first."""
        while True:
            await self._unstored_added.wait()
            self._unstored_added = anyio.Event()
            while self._unstored or self.store_problem is not None:
                await anyio.sleep(self.store_retry_s)
                await self._store_unstored()

    async def _store_unstored(self) -> None:
        with anyio.CancelScope(shield=True):
            while self._unstored:
                job_id, (frame, ledger) = next(iter(self._unstored.items()))
                try:
                    text = await self.outbox.finish(job_id, frame, ledger)
                except OutboxError as exc:
                    self._store_failing(exc)
                    return
                del self._unstored[job_id]
                self.outbound.terminal(job_id, text)
        if self.store_problem is not None:
            self.store_problem = None
            self._store_failing_log.reset()
            log.warning("the outbox stores terminal frames again; taking new jobs")

    # --- refusals and repeats --------------------------------------------------------------------

    async def _refuse(self, job: Job, refusal: Refusal) -> None:
        log.info(
            "job refused job_id=%s model=%s code=%s",
            printable(job.job_id),
            printable(job.model_id),
            refusal.code,
        )
        await self._refuse_id(job.job_id, refusal, model_id=job.model_id)

    async def _refuse_id(self, job_id: str, refusal: Refusal, model_id: str = "") -> None:
        frame = encode(JobError(job_id=job_id, error_code=refusal.code, message=refusal.message))
        ledger = LedgerEntry(model_id, "", refusal.code, 0, 0, "reported", 0, 0)
        if len(self._unstored) >= MAX_UNSTORED:
            # The store has failed for long under a flood of jobs: a refusal bills nothing, so
            # past this many waiting frames it is dropped (the coordinator times the job out)
            # rather than grow memory without end. A served job's frame is always kept.
            self._refusing.discard(job_id)
            log.debug("refusal dropped while the store fails job_id=%s", job_id)
            return
        try:
            text = await self._store(job_id, frame, ledger)
        finally:
            self._refusing.discard(job_id)
        if text is not None:
            self.outbound.terminal(job_id, text)
        self.stats.job_refused(FinishedJob(self.clock(), None, 0, 0.0, refusal.code))

    async def _answer_repeat(self, job_id: str, as_new: Callable[[], None]) -> None:
        """A job_id the store has seen: the same stored terminal frame again. A repeat is never
        unanswered (protocol.md §8): a frame still waiting for the store goes out once stored,
        and where no frame can be found (its 24 h ended before the hourly prune) the job is
        new, `as_new` (run or refused as any new job)."""
        if job_id in self._unstored:
            log.info("repeated job_id answered once its frame is stored job_id=%s", job_id)
            return
        for attempt in range(REPEAT_READ_TRIES):
            try:
                frame = await self.outbox.stored_frame(job_id)
                break
            except OutboxError as exc:  # locked by another process: read again soon
                if attempt + 1 == REPEAT_READ_TRIES:
                    log.error("repeated job_id left unanswered job_id=%s: %s", job_id, exc)
                    return
                await anyio.sleep(self.store_retry_s)
        if frame is None:
            if job_id not in self.running and job_id not in self._refusing:
                log.info("repeated job_id has no stored frame: a new job job_id=%s", job_id)
                as_new()
            return
        log.info("repeated job answered with its stored frame job_id=%s", printable(job_id))
        self.outbound.terminal(job_id, frame)
