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
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import anyio
import anyio.abc

from provider_agent.errors import ConfigError, StatusUnavailable
from provider_agent.observe.status import (
    AgentStatus,
)
from provider_agent.safe_text import printable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    from provider_agent.observe.prometheus import AgentMetrics

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

#: How long the endpoint's connections get to finish when the agent stops.
SHUTDOWN_S = 1.0
#: The most connections the endpoint holds at once (config.md, settled 2026-12-06).
MAX_CONNECTIONS = 64
#: A connection without a complete request this long after it opened, or after its last
#: answer, is closed (config.md, settled 2026-12-06).
IDLE_S = 10.0
#: At most one warning line per this many seconds while connections are turned away.
FLOOD_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """What the endpoint serves: the agent's snapshot (one callable: the endpoint never sees the
    agent's parts), its metrics, and where to listen."""

    listen: tuple[str, int]
    snapshot: Callable[[], Awaitable[AgentStatus]]
    metrics: AgentMetrics
    #: The config file, named when the address cannot be bound (exit 78).
    config_file: str = "agent.toml"


def make_app(endpoint: Endpoint) -> web.Application:
    """The four routes; anything else is aiohttp's 404."""
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")  # answered by the event loop itself: it turns

    async def readyz(_: web.Request) -> web.Response:
        ready = (await endpoint.snapshot()).readiness
        return web.Response(text=ready.reason + "\n", status=200 if ready.ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        endpoint.metrics.observe(await endpoint.snapshot())
        body, content_type = endpoint.metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def status(_: web.Request) -> web.Response:
        current = await endpoint.snapshot()
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
    endpoint: Endpoint,
    *,
    max_connections: int | None = None,
    idle_s: float | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, report the bound port to `start()`, serve until cancelled. A bind that fails is a
    `ConfigError` naming the address (cli.md: exit 78, so systemd does not loop on it).
    `max_connections` and `idle_s` default to MAX_CONNECTIONS and IDLE_S (read at the call)."""
    from aiohttp import web

    host, port = endpoint.listen
    idle = IDLE_S if idle_s is None else idle_s
    app = make_app(endpoint)
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
                endpoint.config_file,
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


#: `/status` of an agent with hundreds of BYOK models is well under this.
MAX_STATUS_BYTES = 8 * 1024 * 1024
STATUS_TIMEOUT_S = 5.0


def asked_host(host: str) -> str:
    """Where a client on this machine asks an endpoint bound to `host`: a wildcard bind address
    is asked on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def status_url(host: str, port: int) -> str:
    """Where `status` asks."""
    return f"http://{address(asked_host(host), port)}/status"


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
