"""The HTTP endpoint at `observability.prometheus_addr`: `/healthz`, `/readyz`, `/metrics`,
`/status` (cli.md).

Started by the daemon with its task group's `start()`: the address is bound before `start()`
returns, so an address in use fails the start (a `ConfigError` naming it: exit 78) instead of
surfacing later. Every answer is built from one snapshot of the running agent (`snapshot`), so
`/metrics`' gauges and `/status` never disagree. Nothing secret is reachable from here: the
snapshot names backends by label and carries no config values beyond limits.

Whatever connects, the endpoint cannot starve the jobs of file descriptors (config.md,
settled): it holds at most MAX_CONNECTIONS connections (a newcomer over the cap takes the place
of the oldest connection that is not being answered, so a flood of idle sockets never locks
out a real scrape), and aiohttp closes a connection that sent no complete request within
IDLE_S of opening or of its last answer (an idle or trickling client holds nothing for long).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

import anyio
import anyio.abc

from provider_agent import __version__
from provider_agent.clock import utc_ms
from provider_agent.errors import ConfigError, OutboxError
from provider_agent.observe.status import (
    AgentStatus,
    BackendStatus,
    GpuStatus,
    JobsStatus,
    ModelStatus,
    OutboxStatus,
    PauseStatus,
    RateWindowStatus,
    RouteStatus,
    RunningJob,
    SessionStatus,
    WithdrawnRoute,
    readiness,
)
from provider_agent.safe_text import printable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    from provider_agent.daemon import Daemon

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

#: `/status` lists at most this many running jobs (the oldest first); `in_flight` counts all.
RUNNING_LISTED = 100
#: How long the endpoint's connections get to finish when the agent stops.
SHUTDOWN_S = 1.0
#: The most connections the endpoint holds at once (config.md, settled 2026-12-06).
MAX_CONNECTIONS = 64
#: A connection without a complete request this long after it opened, or after its last
#: answer, is closed (config.md, settled 2026-12-06).
IDLE_S = 10.0
#: At most one warning line per this many seconds while connections are turned away.
FLOOD_LOG_EVERY_S = 60.0


async def snapshot(daemon: Daemon) -> AgentStatus:
    """The running agent as `/status` shows it (and as `/metrics`' gauges are set)."""
    metrics = daemon.metrics
    now = daemon.clock()
    session = daemon.session
    state = session.state.value if session is not None else "idle"
    authenticated = session is not None and session.authenticated
    connected_at = session.core.authenticated_at if session is not None else None
    capabilities = daemon.capabilities()
    latest = daemon.discovery.latest if daemon.discovery is not None else None
    if latest is not None:
        backends = [
            BackendStatus(
                name=report.name,
                kind=report.kind,
                healthy=report.ok,
                latency_ms=report.health.latency_ms,
                models_listed=len(report.models),
                error=printable(report.error, 300) if report.error else None,
                probe_skipped=report.probe_skipped,
            )
            for report in latest.reports
        ]
    else:
        backends = [
            BackendStatus(name=b.label, kind=b.kind, healthy=False, error="not probed yet")
            for b in daemon.config.backends
        ]
    routes = daemon.catalog.routes if daemon.catalog is not None else {}
    models = [
        ModelStatus(
            model_id=model_id,
            context_window=found[0].context_window if found else None,
            formats=sorted({fmt for route in found for fmt in route.formats}),
            routes=[
                RouteStatus(backend=r.backend, native_id=r.native_id, priority=r.priority)
                for r in found
            ],
        )
        for model_id, found in sorted(routes.items())
    ]
    executor = getattr(daemon, "jobs", None)
    running = sorted(executor.running.values(), key=lambda r: r.received_at) if executor else []
    beat = daemon.heartbeat()
    jobs = JobsStatus(
        in_flight=len(running),
        max_concurrent=daemon.config.limits.max_concurrent,
        running=[
            RunningJob(
                job_id=r.job.job_id,
                model_id=r.job.model_id,
                backend=r.route.backend if r.route is not None else None,
                age_s=round(max(0.0, executor.clock() - r.received_at), 3) if executor else 0.0,
                bytes_relayed=r.relayed,
            )
            for r in running[:RUNNING_LISTED]
        ],
        tokens_per_sec_p50=beat.tokens_per_sec_p50,
        p50_ttfb_ms=beat.p50_latency_ms,
        p95_ttfb_ms=beat.p95_latency_ms,
        error_rate_60s=beat.error_rate_60s,
    )
    outbox = OutboxStatus(depth=None)
    if daemon.outbox is not None:
        try:
            depth, oldest = await daemon.outbox.depth()
            outbox = OutboxStatus(depth=depth, oldest_age_s=oldest)
        except OutboxError as exc:
            outbox = OutboxStatus(depth=None, error=str(exc))
    window = daemon.window
    pause = daemon.control.view() if daemon.control is not None else None
    return AgentStatus(
        agent_version=__version__,
        provider_id=(session.core.provider_id if session is not None else None)
        or daemon.identity.provider_id,
        advertising=capabilities.metadata.status,
        models_advertised=len(capabilities.models),
        uptime_s=round(time.monotonic() - metrics.started_monotonic, 3),
        started_at=utc_ms(metrics.started_at),
        readiness=readiness(
            authenticated=authenticated,
            session_state=state,
            passes=0 if latest is None else 1,
            healthy=sum(1 for b in backends if b.healthy),
            backends=len(backends),
            store_problem=daemon.jobs.store_problem if hasattr(daemon, "jobs") else None,
        ),
        session=SessionStatus(
            state=state,
            authenticated=authenticated,
            connected_for_s=round(session.clock() - connected_at, 3)
            if session is not None and connected_at is not None and authenticated
            else None,
            attempts=session.attempts if session is not None else 0,
            reconnects=metrics.reconnect_count,
        ),
        backends=backends,
        last_pass_at=utc_ms(metrics.last_pass_at) if metrics.last_pass_at else None,
        models=models,
        jobs=jobs,
        outbox=outbox,
        rate_window=RateWindowStatus(
            tokens_last_60s=window.total(now), limit=window.limit, fill=round(window.fill(now), 4)
        ),
        last_errors=list(daemon.metrics.last_errors),
        paused=PauseStatus(**pause.model_dump()) if pause is not None else None,
        gpus=gpus(daemon),
        withdrawn_routes=withdrawn_routes(daemon, now),
    )


def gpus(daemon: Daemon) -> list[GpuStatus]:
    """The last GPU sample (never waits for NVML), with why each unhealthy one is."""
    telemetry = daemon.telemetry
    return [
        GpuStatus(
            **gpu.model_dump(),
            faults=[printable(fault, 300) for fault in telemetry.faults.get(gpu.index, ())],
        )
        for gpu in telemetry.latest or ()
    ]


def withdrawn_routes(daemon: Daemon, now: float) -> list[WithdrawnRoute]:
    """Routes withdrawn for failing jobs, the longest withdrawn first (times on the daemon's
    clock, shown as wall-clock time)."""
    wall = datetime.now(UTC)
    return [
        WithdrawnRoute(
            backend=entry.route.backend,
            model=printable(entry.route.native_id, 300),
            since=utc_ms(wall - timedelta(seconds=max(0.0, now - entry.since))),
            last_code=entry.last_code,
            probes=entry.probes,
            next_probe_in_s=round(max(0.0, entry.next_probe_at - now), 1),
        )
        for entry in sorted(daemon.health.withdrawn.values(), key=lambda w: w.since)
    ]


def make_app(daemon: Daemon) -> web.Application:
    """The four routes; anything else is aiohttp's 404."""
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # answered by the event loop itself: it turns

    async def readyz(_: web.Request) -> web.Response:
        ready = (await snapshot(daemon)).readiness
        return web.Response(text=ready.reason + "\n", status=200 if ready.ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        daemon.metrics.observe(await snapshot(daemon))
        body, content_type = daemon.metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def status(_: web.Request) -> web.Response:
        current = await snapshot(daemon)
        return web.Response(text=current.model_dump_json(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


def address(host: str, port: int) -> str:
    """`host:port` as an operator writes it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    daemon: Daemon,
    *,
    max_connections: int | None = None,
    idle_s: float | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, report the bound port to `start()`, serve until cancelled. A bind that fails is a
    `ConfigError` naming the address (cli.md: exit 78, so systemd does not loop on it).
    `max_connections` and `idle_s` default to MAX_CONNECTIONS and IDLE_S (read at the call)."""
    from aiohttp import web

    listen = daemon.config.observability.listen
    assert listen is not None, "serve() with the endpoint disabled"
    host, port = listen
    idle = IDLE_S if idle_s is None else idle_s
    app = make_app(daemon)
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_S, keepalive_timeout=idle
    )
    guard = ConnectionGuard(MAX_CONNECTIONS if max_connections is None else max_connections)

    @web.middleware
    async def busy_while_answered(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await guard.answer(request, handler)

    app.middlewares.append(busy_while_answered)
    await runner.setup()
    assert runner.server is not None
    guard.server = runner.server
    listener: asyncio.Server | None = None
    try:
        try:
            listener = await asyncio.get_running_loop().create_server(
                guard.protocol, host, port, reuse_address=True, backlog=128
            )
        except OSError as exc:
            raise ConfigError(
                str(daemon.config_path or "agent.toml"),
                "observability.prometheus_addr",
                f"cannot listen on {address(host, port)}: {_why(exc)}",
            ) from None
        bound = int(listener.sockets[0].getsockname()[1])
        log.info("http endpoint listening addr=%s", address(host, bound))
        task_status.started(bound)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            if listener is not None:
                listener.close()
            await runner.cleanup()


class ConnectionGuard:
    """The endpoint's connections, at most `limit` at once. Each accepted connection is a
    `_Connection` around aiohttp's own handler; a middleware marks it busy while one of its
    requests is answered. A connection over the cap takes the place of the oldest one that is
    not busy (closed at once); when all are busy, the newcomer is closed instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.server: web.Server | None = None
        #: Open connections by transport, oldest first.
        self.open: dict[asyncio.BaseTransport, _Connection] = {}
        self.turned_away = 0
        self._next_warning_at = 0.0

    def protocol(self) -> _Connection:
        return _Connection(self)

    def admit(self, connection: _Connection, transport: asyncio.BaseTransport) -> bool:
        if len(self.open) >= self.limit:
            oldest_idle = next((c for c in self.open.values() if not c.busy), None)
            self._warn()
            if oldest_idle is None:
                return False
            oldest_idle.close()
        self.open[transport] = connection
        return True

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self.open.pop(transport, None)

    async def answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """`handler(request)`, its connection counted busy meanwhile (the app's middleware)."""
        connection = self.open.get(request.transport) if request.transport else None
        if connection is None:
            return await handler(request)
        connection.busy += 1
        try:
            return await handler(request)
        finally:
            connection.busy -= 1

    def _warn(self) -> None:
        self.turned_away += 1
        now = time.monotonic()
        if now < self._next_warning_at:
            return
        self._next_warning_at = now + FLOOD_LOG_EVERY_S
        log.warning(
            "http endpoint: %d connections held, the most it takes; closing the oldest idle one "
            "for each newcomer (a flood of connections?) turned_away=%d",
            self.limit,
            self.turned_away,
        )


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's request handler inside, counted by the guard."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        #: Requests of this connection being answered now.
        self.busy = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.guard.admit(self, transport):
            self.transport.abort()
            return
        assert self.guard.server is not None
        self.inner = self.guard.server()
        self.inner.connection_made(transport)

    def close(self) -> None:
        """Closed by the guard to make room: gone from the count at once."""
        if self.transport is not None:
            self.guard.forget(self.transport)
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard.forget(self.transport)
        if self.inner is not None:
            self.inner.connection_lost(exc)
            self.inner = None

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            self.inner.eof_received()
        return None  # as aiohttp's own handler: the client closed its side, so close ours

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return 'address already in use (another agent? pick a free port, or "" to disable)'
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no such address on this machine"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return (exc.strerror or type(exc).__name__).lower()


class StatusUnavailable(Exception):
    """`status` could not read a running agent; `str()` is the one line the operator sees."""


#: `/status` of an agent with hundreds of BYOK models is well under this.
MAX_STATUS_BYTES = 8 * 1024 * 1024
STATUS_TIMEOUT_S = 5.0


def status_url(host: str, port: int) -> str:
    """Where `status` asks: a wildcard bind address is asked on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{address(host, port)}/status"


async def fetch_status(url: str, timeout_s: float = STATUS_TIMEOUT_S) -> AgentStatus:
    """GET `/status` of a running agent; StatusUnavailable with a person's reason otherwise."""
    import aiohttp
    from pydantic import ValidationError

    from provider_agent.backends.base import USER_AGENT

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT}) as http,
            http.get(url, allow_redirects=False) as response,
        ):
            body = await response.content.read(MAX_STATUS_BYTES + 1)
            status = response.status
    except TimeoutError:
        raise StatusUnavailable(f"no answer from {url} within {timeout_s:g}s") from None
    except aiohttp.ClientConnectorError as exc:
        why = (exc.strerror or "cannot connect").lower()
        raise StatusUnavailable(
            f"no agent answers at {url} ({why}): is `provider-agent run` running with this config?"
        ) from None
    except aiohttp.ClientError as exc:
        raise StatusUnavailable(f"{url} failed: {printable(exc)}") from None
    not_agent = "is another program listening on observability.prometheus_addr?"
    if status != 200:
        raise StatusUnavailable(f"{url} answered HTTP {status}, not as an agent: {not_agent}")
    if len(body) > MAX_STATUS_BYTES:
        raise StatusUnavailable(f"{url} answered more than 8 MiB: {not_agent}")
    try:
        return AgentStatus.model_validate_json(body)
    except ValidationError:
        raise StatusUnavailable(
            f"{url} answered, but not with an agent's /status object: {not_agent}"
        ) from None
