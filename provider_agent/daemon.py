"""The supervisor: `provider-agent run`. It opens the agent (`agent.py`), runs its parts' loops in
one anyio task group, restarts a crashed loop with capped backoff, and handles the signals,
reload and the graceful stop. It wires and orders; the parts decide.

The stop is a fixed list of steps, each with its own deadline (a second SIGTERM/SIGINT cuts the
wait for in-flight jobs short): announce draining → wait for the jobs in flight (up to
`state.drain_timeout_s`) → cancel those still running → store their last terminal frames →
close the session (what waits is sent, then close 1001) → flush and close the outbox. Then every
task is cancelled; nothing outlives `Daemon.run()`. A stop during the first discovery pass ends
that pass at once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc

from provider_agent import __version__
from provider_agent.agent import Agent
from provider_agent.clock import DEFAULT_TIMINGS, Clock, Timings
from provider_agent.config.load import load
from provider_agent.config.schema import Config
from provider_agent.errors import ConfigError, IdentityError, OutboxError
from provider_agent.link.identity import Identity, load_or_create
from provider_agent.link.state import ReconnectPolicy
from provider_agent.observe import logs
from provider_agent.observe.http_api import Endpoint
from provider_agent.observe.http_api import serve as serve_http
from provider_agent.observe.systemd import Notifier, keep_alive
from provider_agent.observe.telemetry import GpuTelemetry
from provider_agent.runtime import event_loop_options, first_of, release_free_heap, settle_heap
from provider_agent.store import statedir

log = logging.getLogger(__name__)


def restart_delay_s(crashes: int, timings: Timings) -> float:
    """How long a child that crashed `crashes` times in a row waits before it runs again:
    doubling from `restart_base_s`, capped at `restart_cap_s`."""
    return min(timings.restart_cap_s, timings.restart_base_s * 2.0 ** max(0, crashes - 1))


class Daemon:
    """`provider-agent run`. Construct with a loaded config and identity, then `await run()`;
    `agent` is there from `started` on."""

    def __init__(
        self,
        config: Config,
        identity: Identity,
        *,
        config_path: Path | None = None,
        allow_insecure: bool = False,
        log_level: str | None = None,
        policy: ReconnectPolicy | None = None,
        timings: Timings = DEFAULT_TIMINGS,
        telemetry: GpuTelemetry | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self.identity = identity
        self.config_path = config_path
        self.allow_insecure = allow_insecure
        self.log_level = log_level
        self.policy = policy or ReconnectPolicy()
        self.timings = timings
        self.handle_signals = handle_signals
        self.telemetry = telemetry
        self.clock = Clock()
        self.notifier = Notifier.from_env()
        self.started = anyio.Event()
        self._agent: Agent | None = None
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._startup: anyio.CancelScope | None = None

    @property
    def agent(self) -> Agent:
        """The running agent's parts (from `started` on; still there for a look once stopped)."""
        if self._agent is None:
            raise RuntimeError("the agent is not running")
        return self._agent

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
            new = load(self.config_path, allow_insecure=self.allow_insecure)
            identity = (
                load_or_create(new.identity.key_path)
                if new.identity.key_path != self.config.identity.key_path
                else self.identity
            )
        except (ConfigError, IdentityError) as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        finally:
            self.notifier.ready()
        self.config, self.identity = new, identity
        logs.setup(self.log_level or new.observability.log_level, new.observability.log_format)
        log.info("config reloaded path=%s backends=%d", self.config_path, len(new.backends))
        if self._agent is not None:
            self._agent.apply(new, identity)
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
        async with (
            Agent.open(
                self.config,
                self.identity,
                policy=self.policy,
                timings=self.timings,
                clock=self.clock,
                notifier=self.notifier,
                telemetry=self.telemetry,
            ) as agent,
            anyio.create_task_group() as group,
        ):
            self._agent = agent
            if self.handle_signals:  # first, so no signal meets its default action
                await group.start(self._watch_signals)
            listen = self.config.observability.listen
            if listen is not None:  # an address in use fails here
                endpoint = Endpoint(
                    listen, agent.snapshot, agent.metrics, str(self.config_path or "agent.toml")
                )
                await group.start(serve_http, endpoint)
            group.start_soon(self._supervised, "gpu telemetry", self._telemetry)
            await group.start(agent.pause.serve)
            with anyio.CancelScope() as self._startup:
                await agent.refresh()  # the first pass completes before the first dial
            self._startup = None
            if self._stop.is_set():
                log.info("stopped before the first discovery pass finished")
                group.cancel_scope.cancel()
                return 0
            await group.start(agent.jobs.run)
            group.start_soon(self._supervised, "discovery", agent.passes.run)
            group.start_soon(self._supervised, "outbox pruning", self._prune)
            group.start_soon(self._supervised, "route probes", agent.routes.run)
            group.start_soon(self._supervised, "route limits", agent.keep_offer)
            session_done = anyio.Event()
            group.start_soon(self._run_session, session_done)
            if self.notifier.watchdog_interval_s is not None:
                group.start_soon(
                    keep_alive,
                    self.notifier,
                    self.notifier.watchdog_interval_s,
                    lambda: agent.session.state,
                    agent.notify_status,
                )
            release_free_heap()  # what startup and the first pass freed
            self.started.set()
            self.notifier.ready()
            agent.notify_status()
            log.info("agent started version=%s", __version__)
            await self._stop.wait()
            await self._shutdown(agent, session_done)
            group.cancel_scope.cancel()
        log.info("agent stopped")
        return 0

    async def _supervised(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a child; a crash is logged with its traceback and the child restarted after a
        backoff that doubles per crash in a row (1 s → 30 s): never the end of the daemon, never
        silent, never a hot loop."""
        crashes = 0
        while True:
            started_at = self.clock.now()
            try:
                await body()
                return
            except Exception:
                ran_s = self.clock.now() - started_at
                crashes = 1 if ran_s >= self.timings.restart_cap_s else crashes + 1
                delay = restart_delay_s(crashes, self.timings)
                log.exception("task %s crashed; restarting in %.0fs", name, delay)
                await self.clock.sleep(delay)

    async def _run_session(self, done: anyio.Event) -> None:
        try:
            await self._supervised("session", self.agent.session.run)
        finally:
            done.set()

    async def _telemetry(self) -> None:
        await self.agent.telemetry.run(
            enabled=lambda: self.config.telemetry.gpu == "auto",
            interval_s=lambda: self.config.coordinator.heartbeat_interval_s,
        )

    async def _prune(self) -> None:
        await self.agent.outbox.keep_pruned(self.timings.prune_every_s)

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

    # --- the stop --------------------------------------------------------------------------------

    async def _shutdown(self, agent: Agent, session_done: anyio.Event) -> None:
        """The stop, step by step; each step has a deadline and a late step never blocks the
        next one."""
        timings = self.timings
        await self._step("announce draining", timings.announce_s, self._announce_draining, agent)
        if agent.jobs.in_flight:
            log.info("waiting for in-flight jobs in_flight=%d", agent.jobs.in_flight)
        await self._step(
            "wait for in-flight jobs",
            self.config.state.drain_timeout_s,
            agent.jobs.wait_idle,
            skippable=True,
        )
        await self._step("cancel remaining jobs", timings.cancel_jobs_s, agent.jobs.cancel_all)
        with anyio.CancelScope(shield=True):
            await self._step(
                "store the last terminal frames", timings.flush_outbox_s, agent.jobs.flush
            )
        await self._step(
            "close the session", timings.close_session_s, self._close_session, agent, session_done
        )
        with anyio.CancelScope(shield=True):
            await self._step(
                "flush and close the outbox", timings.flush_outbox_s, agent.outbox.aclose
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

    async def _announce_draining(self, agent: Agent) -> None:
        self.notifier.stopping()
        self.notifier.extend_timeout(
            self.config.state.drain_timeout_s + self.timings.shutdown_budget_s
        )
        agent.draining = True
        agent.session.push(agent.capabilities(sent=True))

    async def _close_session(self, agent: Agent, session_done: anyio.Event) -> None:
        agent.session.close()
        await session_done.wait()


def run_command(config_path: Path, allow_insecure: bool, log_level: str | None) -> int:
    """`provider-agent run`: load, set up logging, take the state dir, load the identity, run
    until stopped. Config/identity errors and a state dir another agent holds raise (78)."""
    config = load(config_path, allow_insecure=allow_insecure)
    logs.setup(log_level or config.observability.log_level, config.observability.log_format)
    try:  # one agent per state dir: before anything reads or writes there (protocol.md §8)
        state_lock = statedir.lock(config.state.dir)
    except OutboxError as exc:
        log.error("cannot start: %s", exc)
        return 1
    with state_lock:
        statedir.check_files(config.state.dir)
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
