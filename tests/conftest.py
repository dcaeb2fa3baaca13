"""Shared fixtures: a pooled client session, loopback fake backends, fixture files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web

from provider_agent.backends.base import new_http_session
from provider_agent.runtime import event_loop_options


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked `both_loops` run on asyncio's loop and on the loop the daemon runs on
    (uvloop where installed); the rest on asyncio's."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.get_closest_marker("both_loops") is not None:
        options = event_loop_options()
        if options.get("use_uvloop"):
            import uvloop

            factories["uvloop"] = uvloop.new_event_loop
    return factories


FIXTURES = Path(__file__).parent / "fixtures"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fixture_bytes(relative: str) -> bytes:
    """A file under tests/fixtures, e.g. `fixture_bytes("vllm/models.json")`."""
    return (FIXTURES / relative).read_bytes()


@dataclass(frozen=True)
class Seen:
    """One request the fake server received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeServer:
    """A real HTTP server on 127.0.0.1 answering canned bodies by (method, path).

    `reply()` registers a body (bytes, str, or JSON-able object) or a handler; `("*", "*")`
    answers whatever has no route of its own (default: 404). Every request is recorded.
    """

    url: str = ""
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)

    def reply(
        self,
        method: str,
        path: str,
        body: Any = b"",
        *,
        status: int = 200,
        content_type: str | None = None,
    ) -> None:
        if callable(body):
            self.routes[(method, path)] = body
            return
        data, ctype = _encode(body)

        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(body=data, status=status, content_type=content_type or ctype)

        self.routes[(method, path)] = handler

    def fixture(self, method: str, path: str, relative: str, *, status: int = 200) -> None:
        """Serve tests/fixtures/<relative> (JSON unless it ends in .txt)."""
        ctype = "text/plain" if relative.endswith(".txt") else "application/json"
        self.reply(method, path, fixture_bytes(relative), status=status, content_type=ctype)

    def seen(self, method: str, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                await request.read(),
            )
        )
        handler = self.routes.get((request.method, request.path)) or self.routes.get(("*", "*"))
        if handler is None:
            return web.Response(text="404 page not found", status=404)
        return await handler(request)


def _encode(body: Any) -> tuple[bytes, str]:
    if isinstance(body, bytes):
        return body, "application/json"
    if isinstance(body, str):
        return body.encode(), "text/plain"
    return orjson.dumps(body), "application/json"


@pytest.fixture
async def http_session() -> AsyncIterator[ClientSession]:
    session = new_http_session(8)
    yield session
    await session.close()


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    server = FakeServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server._dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections and never answers: its URL."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()
