"""The supervisor: one anyio task group owns the signal watcher, the jobs executor, the discovery
loop and the coordinator session; signals, reload and the graceful stop are handled here.

`_shutdown` is a fixed list of steps, each with its own deadline (a second SIGTERM/SIGINT cuts the
wait for in-flight jobs short): draining capabilities → wait for the executor to go idle (up to
`state.drain_timeout_s`) → cancel the jobs still running → flush the outbox (shielded) → the
session sends what waits and closes with 1001. Then every task is cancelled; nothing outlives
`Daemon.run()`. A stop during the first discovery pass ends that pass at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc

from provider_agent import __version__
from provider_agent.backends import Registry
from provider_agent.backends.base import new_http_session
from provider_agent.clock import utc_ms
from provider_agent.config import Config, load
from provider_agent.discovery.catalog import Catalog, Route, capabilities_message
from provider_agent.discovery.run_pass import Discovery
from provider_agent.errors import ConfigError, IdentityError, OutboxError
from provider_agent.jobs.executor import Executor, ExecutorHooks
from provider_agent.jobs.measured import MeasuredSpeed
from provider_agent.jobs.one_completion import tiny_completion
from provider_agent.jobs.ratelimit import TokenWindow
from provider_agent.jobs.route_health import (
    BackendTraffic,
    RouteHealth,
    Traffic,
    Withdrawn,
    probe_every_s,
    verdict,
)
from provider_agent.jobs.routing import AgentStatus
from provider_agent.link.identity import Identity, load_or_create
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import Capabilities, ErrorCode, Heartbeat
from provider_agent.link.session import Session, SessionHooks
from provider_agent.link.state import Fault, Inbound, ReconnectPolicy, State
from provider_agent.observe import http_api, logs
from provider_agent.observe.logs import Throttle
from provider_agent.observe.prometheus import AgentMetrics, JobStats
from provider_agent.observe.systemd import Notifier
from provider_agent.observe.telemetry import GpuTelemetry
from provider_agent.ops.pause import Control
from provider_agent.runtime import event_loop_options, settle_heap
from provider_agent.safe_text import printable
from provider_agent.store import statedir
from provider_agent.store.outbox import Outbox, keep_days_of

log = logging.getLogger(__name__)

#: The largest `limits.max_concurrent` allowed: the pool admits it even after a reload raises it.
POOL_STREAMS = 256
CRASH_RESTART_S = 1.0
#: A backend failing jobs triggers a discovery pass, at most this often (protocol.md §2).
OUT_OF_CYCLE_PASS_S = 10.0
#: How often the outbox drops what it no longer needs to keep.
PRUNE_EVERY_S = 3600.0
#: How long the one-token completion that may restore a withdrawn route is given.
ROUTE_PROBE_TIMEOUT_S = 30.0


@dataclass
class ShutdownBudgets:
    """Deadlines of the shutdown steps other than the drain (which is `state.drain_timeout_s`)."""

    announce_s: float = 2.0
    cancel_jobs_s: float = 5.0
    flush_outbox_s: float = 5.0
    close_session_s: float = 5.0


class Daemon:
    """`provider-agent run`. Construct with a loaded config and identity, then `await run()`."""

    def __init__(
        self,
        config: Config,
        identity: Identity,
        *,
        config_path: Path | None = None,
        allow_insecure: bool = False,
        log_level: str | None = None,
        policy: ReconnectPolicy | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self.identity = identity
        self.config_path = config_path
        self.allow_insecure = allow_insecure
        self.log_level = log_level
        self.policy = policy or ReconnectPolicy()
        self.handle_signals = handle_signals
        self.budgets = ShutdownBudgets()
        self.metrics = AgentMetrics()
        self.stats = JobStats(self.metrics)
        self.measured = MeasuredSpeed()
        self.telemetry = GpuTelemetry()
        self.outbound = Outbound()
        self.window = TokenWindow(config.limits.max_tokens_per_minute)
        self.registry: Registry | None = None
        #: The executor exists once `run()` has opened the outbox.
        self.jobs: Executor
        self.outbox: Outbox | None = None
        self._last_failure_pass = -math.inf
        #: Out-of-cycle passes are this far apart at least (tests shorten it).
        self.out_of_cycle_pass_s = OUT_OF_CYCLE_PASS_S
        self.catalog: Catalog | None = None
        self.draining = False
        self.clock = anyio.current_time
        #: `job` frames without an answerable job_id: one line per 10 s (protocol.md §8).
        self._unanswerable_jobs = Throttle(10.0)
        self.session: Session | None = None
        self.discovery: Discovery | None = None
        self.started = anyio.Event()
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._pass_wanted = anyio.Event()
        self._startup: anyio.CancelScope | None = None
        self.notifier = Notifier.from_env()
        #: The maintenance pause and its socket (`provider-agent pause`), once `run()` started.
        self.control: Control | None = None
        #: Routes withdrawn for failing jobs (protocol.md §2) and their probes.
        self.health = RouteHealth()
        #: Seconds between probes of a withdrawn route; None: min(interval_s, 30 s) (tests set it).
        self.route_probe_s: float | None = None
        self._health_changed = anyio.Event()
        #: What each backend's jobs showed lately: a backend healthy by it is not probed.
        self.traffic = BackendTraffic()

    # --- what the session asks for ---------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        pause = self.control.paused if self.control is not None else None
        return capabilities_message(
            self.config,
            self.serving_routes(),
            draining=self.draining,
            measured=self.measured.snapshot(self.clock()),
            paused=pause is not None,
            paused_until=utc_ms(pause.until) if pause and pause.until is not None else None,
        )

    def serving_routes(self) -> Mapping[str, Sequence[Route]]:
        """The catalog's routes less those withdrawn for failing jobs."""
        return self.health.serving(self.catalog.routes if self.catalog else {})

    @property
    def paused(self) -> bool:
        return self.control is not None and self.control.paused is not None

    def status(self) -> AgentStatus:
        """Stopping wins over paused: a paused agent that is stopping refuses `shutting_down`."""
        return "draining" if self.draining else "paused" if self.paused else "ready"

    def heartbeat(self) -> Heartbeat:
        """The job window's figures, with the last GPU sample (never waits for NVML)."""
        beat = self.stats.heartbeat(self.clock())
        return beat.model_copy(update={"gpus": self.telemetry.latest})

    def request_pass(self) -> None:
        """Ask the discovery loop for a pass now (single-flight makes repeats cheap)."""
        self._pass_wanted.set()

    def backend_failed(self, backend: str) -> None:
        """A backend failed a job: a pass soon, so the coordinator hears of a dead backend
        within seconds (at most one such pass per `out_of_cycle_pass_s`). The failure counts
        against its traffic at once, so that pass probes it."""
        now = self.clock()
        self.traffic.record(backend, "failure", now)
        if now - self._last_failure_pass >= self.out_of_cycle_pass_s:
            self._last_failure_pass = now
            log.info("backend failed a job, discovery pass requested backend=%s", backend)
            self.request_pass()

    def route_ended(
        self, route: Route, code: ErrorCode | None, relayed: int, throttled: bool = False
    ) -> None:
        """A job's attempt on a route ended: a route that failed its last jobs is withdrawn at
        once (an out-of-cycle capabilities message) until a probe through it succeeds."""
        now = self.clock()
        self.traffic.record(route.backend, verdict(code, relayed, throttled=throttled), now)
        probe_s = self._route_probe_s()
        if not self.health.record(route, code, relayed, now, probe_s, throttled=throttled):
            return
        self.metrics.route_withdrawn(route.backend)
        log.warning(
            "route withdrawn: its last jobs failed on the serving side; a one-token completion "
            "every %gs brings it back backend=%s model=%s",
            self._route_probe_s(),
            route.backend,
            printable(route.native_id),
        )
        self._health_changed.set()
        self._push_capabilities()

    def backend_traffic(self, backend: str) -> Traffic:
        """What `backend`'s jobs showed lately, with its jobs streaming now (for discovery)."""
        running = self.jobs.running.values() if hasattr(self, "jobs") else ()
        streaming = sum(
            1
            for r in running
            if r.route is not None
            and r.route.backend == backend
            and r.first_byte_at is not None
            and not r.route_left
        )
        return self.traffic.of(backend, streaming)

    def _route_probe_s(self) -> float:
        if self.route_probe_s is not None:
            return self.route_probe_s
        return probe_every_s(self.config.discovery.interval_s)

    def _push_capabilities(self) -> None:
        if self.session is not None:
            self.session.push(self.capabilities())
        self._notify_status()

    # --- control ---------------------------------------------------------------------------------

    def request_stop(self, *, force: bool = False) -> None:
        """First call: graceful stop. A second call (or force) skips the drain wait."""
        if self._stop.is_set() or force:
            self._force.set()
        self._stop.set()
        if self._startup is not None:
            self._startup.cancel()  # a stop during the first pass ends the pass at once

    async def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else keep running on the old one."""
        if self.config_path is None:
            return False
        self.notifier.reloading()
        try:
            return await self._reload(self.config_path)
        finally:
            self.notifier.ready()

    async def _reload(self, config_path: Path) -> bool:
        try:
            new = load(config_path, allow_insecure=self.allow_insecure)
            identity = (
                load_or_create(new.identity.key_path)
                if new.identity.key_path != self.config.identity.key_path
                else self.identity
            )
        except (ConfigError, IdentityError) as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        must_reconnect = (
            new.coordinator.url != self.config.coordinator.url or identity is not self.identity
        )
        self.config, self.identity = new, identity
        self.window.limit = new.limits.max_tokens_per_minute
        if self.registry is not None:
            self.registry = Registry.build(new, self.registry.http)
        logs.setup(self.log_level or new.observability.log_level, new.observability.log_format)
        log.info("config reloaded path=%s backends=%d", self.config_path, len(new.backends))
        if self.session is not None:
            self.session.identity = identity
            if must_reconnect:
                log.info("coordinator url or identity changed: reconnecting")
                self.session.reconnect()
            else:
                self.session.push(self.capabilities())  # new limits and prices count now
        self.request_pass()  # new or changed backends: with the next out-of-cycle pass
        return True

    # --- the tree --------------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        except ExceptionGroup as failure:
            # The HTTP endpoint's bind failing inside `start()` arrives wrapped by the task group.
            if len(failure.exceptions) == 1 and isinstance(failure.exceptions[0], ConfigError):
                raise failure.exceptions[0] from None
            raise

    async def _run(self) -> int:
        async with new_http_session(POOL_STREAMS) as http, await self._open_outbox() as outbox:
            self.outbox = outbox
            self.registry = Registry.build(self.config, http)
            self.jobs = Executor(
                self.outbound,
                self.stats,
                outbox,
                ExecutorHooks(
                    routes=self.serving_routes,
                    registry=self._registry,
                    max_concurrent=lambda: self.config.limits.max_concurrent,
                    status=self.status,
                    backend_failed=self.backend_failed,
                    route_ended=self.route_ended,
                ),
                self.window,
                measured=self.measured,
            )
            await self.jobs.report_orphans()
            self.control = Control(outbox.path.parent, self._push_capabilities)
            self.control.load()
            self.discovery = Discovery(
                http, lambda: self.config, traffic=self.backend_traffic, clock=self.clock
            )
            self.session = Session(
                SessionHooks(
                    url=lambda: self.config.coordinator.url,
                    enrollment_code=lambda: self.config.enrollment_code,
                    heartbeat_interval_s=lambda: self.config.coordinator.heartbeat_interval_s,
                    capabilities=self.capabilities,
                    heartbeat=self.heartbeat,
                    on_authenticated=self.request_pass,
                    on_inbound=self._on_inbound,
                    undelivered=outbox.undelivered,
                    on_confirmed=self.jobs.confirmed,
                    on_disconnected=self.jobs.connection_lost,
                    on_reconnect=self._session_ended,
                ),
                self.identity,
                self.outbound,
                policy=self.policy,
            )
            async with anyio.create_task_group() as group:
                if self.handle_signals:  # first, so no signal meets its default action
                    await group.start(self._watch_signals)
                if self.config.observability.listen is not None:  # an address in use fails here
                    await group.start(http_api.serve, self)
                group.start_soon(self._supervised, "gpu telemetry", self._telemetry_loop)
                await group.start(self.control.serve)
                with anyio.CancelScope() as self._startup:
                    await self._refresh()  # the first pass completes before the first dial
                self._startup = None
                if self._stop.is_set():
                    log.info("stopped before the first discovery pass finished")
                    group.cancel_scope.cancel()
                    return 0
                self._pass_wanted = anyio.Event()
                await group.start(self.jobs.run)
                group.start_soon(self._supervised, "discovery", self._discovery_loop)
                group.start_soon(self._supervised, "outbox pruning", self._prune_loop)
                group.start_soon(self._supervised, "route probes", self._probe_loop)
                session_done = anyio.Event()
                group.start_soon(self._run_session, session_done)
                if self.notifier.watchdog_interval_s is not None:
                    group.start_soon(self._watchdog, self.notifier.watchdog_interval_s)
                self.started.set()
                self.notifier.ready()
                self._notify_status()
                log.info("agent started version=%s", __version__)
                await self._stop.wait()
                await self._shutdown(session_done)
                group.cancel_scope.cancel()
        log.info("agent stopped")
        return 0

    async def _open_outbox(self) -> Outbox:
        """The outbox under the state dir (`$STATE_DIRECTORY` wins, as under systemd)."""
        state = os.environ.get("STATE_DIRECTORY", "")
        directory = Path(state.split(":")[0]) if state else self.config.state.dir
        return await Outbox.open(directory, keep_days=keep_days_of(self.config))

    def _registry(self) -> Registry:
        assert self.registry is not None
        return self.registry

    def _notify_status(self) -> None:
        """systemd's one-line STATUS=: session state and what is advertised."""
        state = self.session.state.value if self.session is not None else "starting"
        models = len(self.catalog.routes) if self.catalog is not None else 0
        in_flight = self.jobs.in_flight if hasattr(self, "jobs") else 0
        self.notifier.status(
            f"session {state}; {models} model(s) advertised; {in_flight} in flight"
        )

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 only while the loop turns and the session makes progress (authenticated or
        waiting out a backoff); a stuck loop or a wedged handshake lets systemd restart us."""
        stuck_since: float | None = None
        while True:
            await anyio.sleep(interval_s)
            assert self.session is not None
            state = self.session.state
            now = self.clock()
            if state in (State.AUTHENTICATED, State.IDLE, State.STOPPED):
                stuck_since = None
            elif stuck_since is None:
                stuck_since = now
            if stuck_since is None or now - stuck_since < 2 * interval_s:
                self.notifier.watchdog()
            self._notify_status()

    async def _telemetry_loop(self) -> None:
        await self.telemetry.run(
            enabled=lambda: self.config.telemetry.gpu == "auto",
            interval_s=lambda: self.config.coordinator.heartbeat_interval_s,
        )

    async def _prune_loop(self) -> None:
        assert self.outbox is not None
        while True:
            await self.outbox.prune()
            await anyio.sleep(PRUNE_EVERY_S)

    async def _probe_loop(self) -> None:
        """Withdrawn routes get a one-token completion when due; a success restores one."""
        while True:
            due_at = self.health.next_due_at()
            wait = due_at - self.clock() if due_at is not None else math.inf
            with anyio.move_on_after(wait):
                await self._health_changed.wait()
            self._health_changed = anyio.Event()
            due = self.health.due(self.clock())
            async with anyio.create_task_group() as probes:
                for withdrawn in due:
                    probes.start_soon(self._probe_route, withdrawn)

    async def _probe_route(self, withdrawn: Withdrawn) -> None:
        route = withdrawn.route
        try:
            backend = self._registry().get(route.backend)
        except KeyError:
            self.health.forget_backends_not_in({b.label for b in self.config.backends})
            log.info("withdrawn route forgotten: its backend is no longer configured")
            self._push_capabilities()
            return
        result = await tiny_completion(backend.stream, route, ROUTE_PROBE_TIMEOUT_S)
        restored = self.health.probed(route, result.ok, self.clock(), self._route_probe_s())
        self.metrics.route_probed(route.backend, ok=result.ok, restored=restored)
        if restored:
            log.warning(
                "route restored: a one-token completion through it succeeded backend=%s model=%s",
                route.backend,
                printable(route.native_id),
            )
            self._push_capabilities()
        else:
            log.info(
                "withdrawn route still failing backend=%s model=%s probes=%d error=%s",
                route.backend,
                printable(route.native_id),
                withdrawn.probes,
                printable(result.error or ""),
            )

    async def _run_session(self, done: anyio.Event) -> None:
        assert self.session is not None
        try:
            await self._supervised("session", self.session.run)
        finally:
            done.set()

    async def _supervised(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a child; a crash is logged with its traceback and the child restarted, never the
        end of the daemon and never silent."""
        while True:
            try:
                await body()
                return
            except Exception:
                log.exception("task %s crashed; restarting in %.0fs", name, CRASH_RESTART_S)
                await anyio.sleep(CRASH_RESTART_S)

    async def _discovery_loop(self) -> None:
        """A pass every `interval_s`, and sooner when asked (auth_ok, reload, a failing
        backend) — but out-of-cycle passes at most once per `out_of_cycle_pass_s`
        (protocol.md §2), so a flapping coordinator cannot make the agent probe in a loop."""
        last = self.clock()
        while True:
            with anyio.move_on_after(self.config.discovery.interval_s):
                await self._pass_wanted.wait()
                await anyio.sleep(max(0.0, last + self.out_of_cycle_pass_s - self.clock()))
            self._pass_wanted = anyio.Event()
            last = self.clock()
            await self._refresh()

    async def _refresh(self) -> None:
        """One pass; swap the catalog in; tell the coordinator (also when unchanged: it may
        have lost state)."""
        assert self.discovery is not None
        result = await self.discovery.run()
        self.metrics.discovery_pass(result.duration_ms / 1000, datetime.now(UTC))
        for report in result.reports:
            if report.probe_skipped:
                self.metrics.probe_skipped(report.name)
        self.catalog = result.catalog
        if self.session is not None:
            self.session.push(self.capabilities())
        self._notify_status()

    def _session_ended(self, fault: Fault | None) -> None:
        cause = fault.kind.value if fault is not None else "requested"
        self.metrics.session_ended(cause, fault.detail if fault else None, datetime.now(UTC))

    def _on_inbound(self, inbound: Inbound) -> None:
        """Called by the session's reader: hands off, never waits."""
        if inbound.action == "job" and inbound.job is not None:
            self.jobs.submit(inbound.job)
        elif inbound.action == "cancel" and inbound.job_id is not None:
            self.jobs.cancel(inbound.job_id)
        elif inbound.action == "reject_job" and inbound.job_id is not None:
            self.jobs.reject(inbound.job_id, inbound.reason, inbound.code)
        elif inbound.throttled:
            held = self._unanswerable_jobs.due(self.clock())
            if held is not None:
                log.warning("%s (and %d more since the last line)", inbound.reason, held)
        elif inbound.loud:
            log.warning("%s", inbound.reason)
        else:
            log.debug("inbound %s job_id=%s %s", inbound.action, inbound.job_id, inbound.reason)

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
            task_status.started()
            async for signum in received:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", self.config_path)
                    await self.reload()
                else:
                    name = signal.Signals(signum).name
                    second = self._stop.is_set()
                    log.info("%s: %s", name, "stopping now" if second else "draining, then stop")
                    self.request_stop()

    async def _shutdown(self, session_done: anyio.Event) -> None:
        """The stop, step by step; each step has a deadline and a late step never blocks the
        next one."""
        budgets = self.budgets
        await self._step("announce draining", budgets.announce_s, self._announce_draining)
        if self.jobs.in_flight:
            log.info("waiting for in-flight jobs in_flight=%d", self.jobs.in_flight)
        await self._step(
            "wait for in-flight jobs",
            self.config.state.drain_timeout_s,
            self.jobs.wait_idle,
            skippable=True,
        )
        await self._step("cancel remaining jobs", budgets.cancel_jobs_s, self.jobs.cancel_all)
        with anyio.CancelScope(shield=True):
            await self._step("flush the outbox", budgets.flush_outbox_s, self.jobs.flush)
        await self._step(
            "close the session", budgets.close_session_s, self._close_session, session_done
        )

    async def _step(
        self,
        name: str,
        budget_s: float,
        body: Callable[..., Awaitable[None]],
        *args: object,
        skippable: bool = False,
    ) -> None:
        """One shutdown step under its deadline; a skippable one also ends on a second signal."""
        with anyio.move_on_after(budget_s) as scope:
            if skippable:
                await first_of(lambda: body(*args), self._force.wait)
            else:
                await body(*args)
        if scope.cancelled_caught:
            log.warning("shutdown step %r passed its deadline of %gs", name, budget_s)
        elif skippable and self._force.is_set():
            log.info("shutdown step %r cut short by a second signal", name)

    async def _announce_draining(self) -> None:
        assert self.session is not None
        self.notifier.stopping()
        budget = self.config.state.drain_timeout_s + sum(vars(self.budgets).values())
        self.notifier.extend_timeout(budget)
        self.draining = True
        self.session.push(self.capabilities())

    async def _close_session(self, session_done: anyio.Event) -> None:
        assert self.session is not None
        self.session.close()
        await session_done.wait()


async def first_of(*bodies: Callable[[], Awaitable[object]]) -> None:
    """Run the bodies concurrently; return as soon as one of them returns."""
    async with anyio.create_task_group() as group:

        async def run(body: Callable[[], Awaitable[object]]) -> None:
            await body()
            group.cancel_scope.cancel()

        for body in bodies:
            group.start_soon(run, body)


def run_daemon(config_path: Path, allow_insecure: bool, log_level: str | None) -> int:
    """Load, set up logging, take the state dir, load the identity, run until stopped.
    Config/identity errors and a state dir another agent holds raise (78)."""
    config = load(config_path, allow_insecure=allow_insecure)
    logs.setup(log_level or config.observability.log_level, config.observability.log_format)
    try:  # one agent per state dir: before anything reads or writes there (protocol.md §8)
        state_lock = statedir.lock(config.state.dir)
    except OutboxError as exc:
        log.error("cannot start: %s", exc)
        return 1
    with state_lock:
        statedir.check_files(config.state.dir)
        return _run_locked(config, config_path, allow_insecure, log_level)


def _run_locked(
    config: Config, config_path: Path, allow_insecure: bool, log_level: str | None
) -> int:
    identity = load_or_create(config.identity.key_path)

    async def main() -> int:
        daemon = Daemon(
            config,
            identity,
            config_path=config_path,
            allow_insecure=allow_insecure,
            log_level=log_level,
        )
        try:
            return await daemon.run()
        except OutboxError as exc:
            log.error("cannot start: %s", exc)
            return 1

    settle_heap()
    return anyio.run(main, backend_options=event_loop_options())
