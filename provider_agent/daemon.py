"""The supervisor: one anyio task group owns the discovery loop, the coordinator session and the
signal watcher; signals, reload and the graceful stop are handled here.

Stop order (fixed): draining capabilities → in-flight jobs get `state.drain_timeout_s` (a second
SIGTERM/SIGINT skips the wait) → the session flushes its queue and closes with 1001 → every task
is cancelled. Nothing outlives `Daemon.run()`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc

from provider_agent import __version__, logs
from provider_agent.backends.base import new_http_session
from provider_agent.catalog import Catalog, capabilities_message
from provider_agent.config import Config, load
from provider_agent.discovery import Discovery
from provider_agent.errors import ConfigError, IdentityError
from provider_agent.identity import Identity, load_or_create
from provider_agent.metrics import JobStats
from provider_agent.protocol import Capabilities, Heartbeat, JobError, encode
from provider_agent.session import Link, Session, SessionHooks
from provider_agent.session_state import Inbound, ReconnectPolicy

log = logging.getLogger(__name__)

#: The largest `limits.max_concurrent` allowed: the pool admits it even after a reload raises it.
POOL_STREAMS = 256
CLOSE_BUDGET_S = 5.0
CRASH_RESTART_S = 1.0


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
        self.stats = JobStats()
        self.catalog: Catalog | None = None
        self.draining = False
        self.clock = anyio.current_time
        self.session: Session | None = None
        self.discovery: Discovery | None = None
        self.started = anyio.Event()
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._pass_wanted = anyio.Event()

    # --- what the session asks for ---------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        routes = self.catalog.routes if self.catalog else {}
        return capabilities_message(self.config, routes, draining=self.draining)

    def heartbeat(self) -> Heartbeat:
        return self.stats.heartbeat(self.clock())

    def request_pass(self) -> None:
        """Ask the discovery loop for a pass now (single-flight makes repeats cheap)."""
        self._pass_wanted.set()

    # --- control ---------------------------------------------------------------------------------

    def request_stop(self, *, force: bool = False) -> None:
        """First call: graceful stop. A second call (or force) skips the drain wait."""
        if self._stop.is_set() or force:
            self._force.set()
        self._stop.set()

    async def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else keep running on the old one."""
        if self.config_path is None:
            return False
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
        must_reconnect = (
            new.coordinator.url != self.config.coordinator.url or identity is not self.identity
        )
        self.config, self.identity = new, identity
        logs.setup(self.log_level or new.observability.log_level, new.observability.log_format)
        log.info("config reloaded path=%s backends=%d", self.config_path, len(new.backends))
        if self.session is not None:
            self.session.identity = identity
            if must_reconnect:
                log.info("coordinator url or identity changed: reconnecting")
                self.session.reconnect()
        self.request_pass()
        return True

    # --- the tree --------------------------------------------------------------------------------

    async def run(self) -> int:
        async with new_http_session(POOL_STREAMS) as http:
            self.discovery = Discovery(http, lambda: self.config)
            self.session = Session(
                SessionHooks(
                    url=lambda: self.config.coordinator.url,
                    enrollment_code=lambda: self.config.enrollment_code,
                    heartbeat_interval_s=lambda: self.config.coordinator.heartbeat_interval_s,
                    capabilities=self.capabilities,
                    heartbeat=self.heartbeat,
                    on_authenticated=self.request_pass,
                    on_inbound=self._on_inbound,
                ),
                self.identity,
                policy=self.policy,
            )
            async with anyio.create_task_group() as group:
                if self.handle_signals:  # first, so no signal meets its default action
                    await group.start(self._watch_signals)
                await self._refresh()  # the first pass completes before the first dial
                self._pass_wanted = anyio.Event()
                group.start_soon(self._supervised, "discovery", self._discovery_loop)
                session_done = anyio.Event()
                group.start_soon(self._run_session, session_done)
                self.started.set()
                log.info("agent started version=%s", __version__)
                await self._stop.wait()
                await self._shutdown(session_done)
                group.cancel_scope.cancel()
        log.info("agent stopped")
        return 0

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
        while True:
            with anyio.move_on_after(self.config.discovery.interval_s):
                await self._pass_wanted.wait()
            self._pass_wanted = anyio.Event()
            await self._refresh()

    async def _refresh(self) -> None:
        """One pass; swap the catalog in; tell the coordinator (also when unchanged: it may
        have lost state)."""
        assert self.discovery is not None
        result = await self.discovery.run()
        self.catalog = result.catalog
        if self.session is not None:
            await self.session.push(self.capabilities())

    async def _on_inbound(self, inbound: Inbound, link: Link) -> None:
        if inbound.action == "job" and inbound.job_id is not None:
            # The job executor is not part of this build: refuse (a refusal, not a serving
            # failure) so the coordinator routes the job elsewhere.
            log.warning("job refused job_id=%s: this build does not run jobs", inbound.job_id)
            await link.send(
                encode(
                    JobError(
                        job_id=inbound.job_id,
                        error_code="out_of_capacity",
                        message="this agent build does not run jobs yet",
                    )
                )
            )
        elif inbound.action == "reject_job" and inbound.job_id is not None:
            log.warning("malformed job job_id=%s: %s", inbound.job_id, inbound.reason)
            await link.send(
                encode(
                    JobError(
                        job_id=inbound.job_id, error_code="bad_request", message=inbound.reason
                    )
                )
            )
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
        assert self.session is not None
        self.draining = True
        await self.session.push(self.capabilities())
        if self.stats.in_flight:
            log.info("waiting for in-flight jobs in_flight=%d", self.stats.in_flight)
            idle = anyio.Event()
            self.stats.on_idle = idle.set
            with anyio.move_on_after(self.config.state.drain_timeout_s):
                await wait_any(idle, self._force)
        self.session.close()
        with anyio.move_on_after(CLOSE_BUDGET_S):
            await session_done.wait()


async def wait_any(*events: anyio.Event) -> None:
    """Return as soon as one of the events is set."""
    async with anyio.create_task_group() as group:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            group.cancel_scope.cancel()

        for event in events:
            group.start_soon(wait, event)


def run_daemon(config_path: Path, allow_insecure: bool, log_level: str | None) -> int:
    """Load, set up logging and identity, run until stopped. Config/identity errors raise (78)."""
    config = load(config_path, allow_insecure=allow_insecure)
    logs.setup(log_level or config.observability.log_level, config.observability.log_format)
    identity = load_or_create(config.identity.key_path)

    async def main() -> int:
        daemon = Daemon(
            config,
            identity,
            config_path=config_path,
            allow_insecure=allow_insecure,
            log_level=log_level,
        )
        return await daemon.run()

    return anyio.run(main)
