"""`backend.stream()` against real loopback servers: bytes verbatim for every kind and format,
each failure mapped to its protocol code, our headers only, and the response released or its
connection closed on every way out (the server sees the client go)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import anyio
import pytest
from aiohttp import web

from provider_agent.backends import Backend, Registry, make_backend
from provider_agent.backends.base import new_http_session
from provider_agent.config.load import parse
from provider_agent.config.schema import BackendConfig, WireFormat
from provider_agent.errors import RouteFailure, StreamFailed
from provider_agent.jobs.upstream import request_body
from provider_agent.jobs.usage import Usage, UsageMeter
from provider_agent.safe_text import MESSAGE_LIMIT
from tests.conftest import FakeServer, fixture_bytes
from tests.realbackend import MODEL_ALIAS, llamacpp_server

pytestmark = pytest.mark.both_loops

KEY_ENV = "PA_TEST_STREAM_KEY"
SECRET = "sk-test-0123456789abcdef-SECRET"
BYOK_KINDS = ("openrouter", "venice")
#: Every header the agent may send on a job's POST (both readers add Host, Accept and
#: Content-Length; the lean one, which opens a connection per job, `Connection: close`).
OUR_HEADERS = {
    "connection",
    "host",
    "accept",
    "accept-encoding",
    "content-length",
    "content-type",
    "user-agent",
    "authorization",
    "anthropic-version",
}
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
#: A generous bound: only to turn a hang into a failure, never a timing target.
BOUND_S = 10
#: Tests of what only the lean reader does (aiohttp keeps waiting after malformed chunking
#: until the job's deadline ends it, keeps connections alive by design, and yields a body's
#: first bytes rather than handing them to `first_bytes`).
lean_only = pytest.mark.parametrize("reader", ["lean"], indirect=True)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture(autouse=True, params=["lean", "aiohttp"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test holds both readers to the contract: `LeanStream` (what a plain-HTTP backend
    gets) and `AiohttpStream` (what an https one gets; here over plain HTTP on loopback)."""
    monkeypatch.setattr(Backend, "lean_reader", request.param == "lean")
    return str(request.param)


def backend_for(kind: str, root: str, http: aiohttp.ClientSession, *, key: bool = True) -> Backend:
    """An adapter of `kind` pointed at a loopback server (BYOK bases keep their `/api/v1`)."""
    url = f"{root}/api/v1" if kind in BYOK_KINDS else root
    config = BackendConfig(kind=kind, url=url, api_key_env=KEY_ENV if key else None)
    return make_backend(config, http, 1)


def deadline_in(seconds: float = BOUND_S) -> float:
    return anyio.current_time() + seconds


async def collect(backend: Backend, fmt: WireFormat = "openai", deadline: float = 0) -> bytes:
    parts = []
    async with backend.stream(fmt, BODY, deadline or deadline_in()) as chunks:
        async for data in chunks:
            parts.append(data)
    return b"".join(parts)


async def failure_of(
    backend: Backend, fmt: WireFormat = "openai", deadline: float = 0
) -> RouteFailure:
    with pytest.raises(StreamFailed) as caught:
        await collect(backend, fmt, deadline)
    return caught.value.failure


async def refused_before_any_byte(backend: Backend) -> RouteFailure:
    """The failure of a stream that must fail before a single body byte reaches anyone: the
    block is never entered and the `first_bytes` callback never called."""
    sink = FirstBytesSink()
    with anyio.fail_after(BOUND_S), pytest.raises(StreamFailed) as caught:
        async with backend.stream("openai", BODY, deadline_in(), first_bytes=sink):
            raise AssertionError("entered: bytes could have been relayed")
    assert sink.handed == []
    return caught.value.failure


def odd_pieces(data: bytes) -> list[bytes]:
    """`data` cut at sizes that never line up with SSE events (1, 7, 13, 2, 31, … bytes)."""
    sizes = [1, 7, 13, 2, 31, 5, 64, 3]
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at : at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return pieces


def sse_handler(
    pieces: list[bytes], *, pause: Callable[[int], Awaitable[None]] | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, piece in enumerate(pieces):
            await response.write(piece)
            if pause is not None:
                await pause(index)
        await response.write_eof()
        return response

    return handler


# --- bytes verbatim, for every kind and format ---------------------------------------------------

CASES = [
    ("vllm", "openai", "vllm/chat-stream-usage.sse", "/v1/chat/completions"),
    ("vllm", "anthropic", "anthropic/messages-stream.sse", "/v1/messages"),
    ("llamacpp", "openai", "llamacpp/chat-stream-usage.sse", "/v1/chat/completions"),
    ("llamacpp", "anthropic", "llamacpp/messages-stream.sse", "/v1/messages"),
    ("lmstudio", "openai", "lmstudio/chat-stream-usage.sse", "/v1/chat/completions"),
    ("ollama", "openai", "ollama/v1-chat-stream-usage.sse", "/v1/chat/completions"),
    ("ollama", "anthropic", "ollama/messages-stream.sse", "/v1/messages"),
    ("openrouter", "openai", "openrouter/chat-stream.sse", "/api/v1/chat/completions"),
    ("openrouter", "anthropic", "anthropic/messages-stream.sse", "/api/v1/messages"),
    ("venice", "openai", "venice/chat-stream.sse", "/api/v1/chat/completions"),
]


@pytest.mark.parametrize(("kind", "fmt", "fixture", "path"), CASES)
async def test_relays_the_body_verbatim_with_our_headers_only(
    fake_server: FakeServer,
    http_session: aiohttp.ClientSession,
    *,
    kind: str,
    fmt: WireFormat,
    fixture: str,
    path: str,
) -> None:
    recorded = fixture_bytes(fixture)
    fake_server.reply("POST", path, sse_handler(odd_pieces(recorded)))
    backend = backend_for(kind, fake_server.url, http_session)

    with anyio.fail_after(BOUND_S):
        assert await collect(backend, fmt) == recorded

    [seen] = fake_server.requests
    assert (seen.method, seen.path, seen.body) == ("POST", path, BODY)
    headers = {name.lower(): value for name, value in seen.headers.items()}
    assert set(headers) <= OUR_HEADERS, set(headers) - OUR_HEADERS
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert headers["accept-encoding"] == "identity"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("provider-agent/")
    assert ("anthropic-version" in headers) == (fmt == "anthropic")


async def test_a_backend_named_by_hostname_is_reached(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    """`localhost` resolves to ::1 and 127.0.0.1; the server listens on the second only."""
    fake_server.reply("POST", "/v1/chat/completions", sse_handler([b"data: [DONE]\n\n"]))
    url = fake_server.url.replace("127.0.0.1", "localhost")
    with anyio.fail_after(BOUND_S):
        assert await collect(backend_for("vllm", url, http_session)) == b"data: [DONE]\n\n"
    assert fake_server.requests[0].headers["Host"] == url.removeprefix("http://")


async def test_a_local_backend_without_a_key_sends_no_authorization(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    fake_server.reply("POST", "/v1/chat/completions", sse_handler([b"data: [DONE]\n\n"]))
    backend = backend_for("ollama", fake_server.url, http_session, key=False)
    assert await collect(backend) == b"data: [DONE]\n\n"
    headers = {name.lower() for name in fake_server.requests[0].headers}
    assert "authorization" not in headers


async def test_bytes_are_yielded_as_they_arrive_not_when_the_body_ends(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    got_first = anyio.Event()

    async def pause(index: int) -> None:
        if index == 0:
            await got_first.wait()  # the rest comes only once the client has the first part

    pieces = [b'data: {"choices":[{"delta":{"content":"Hel', b'lo"}}]}\n\ndata: [DONE]\n\n']
    fake_server.reply("POST", "/v1/chat/completions", sse_handler(pieces, pause=pause))
    backend = backend_for("vllm", fake_server.url, http_session)
    received = []
    with anyio.fail_after(BOUND_S):
        async with backend.stream("openai", BODY, deadline_in()) as chunks:
            async for data in chunks:
                received.append(data)
                got_first.set()
    assert received[0] == pieces[0]
    assert b"".join(received) == b"".join(pieces)


async def test_a_large_body_arrives_whole(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'
    recorded = event * 3000 + b"data: [DONE]\n\n"  # about 3 MiB
    pieces = [recorded[i : i + 65_537] for i in range(0, len(recorded), 65_537)]
    fake_server.reply("POST", "/v1/chat/completions", sse_handler(pieces))
    backend = backend_for("llamacpp", fake_server.url, http_session)
    with anyio.fail_after(BOUND_S):
        assert await collect(backend) == recorded


# --- failures before the first byte ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "code", "fallback"),
    [
        ("vllm", 500, "backend_error", True),
        ("vllm", 503, "backend_error", True),
        ("llamacpp", 404, "model_not_loaded", True),
        ("ollama", 429, "backend_error", True),
        ("lmstudio", 401, "auth_rejected_by_backend", True),
        ("venice", 403, "auth_rejected_by_backend", True),
        ("openrouter", 403, "bad_request", True),
        ("vllm", 400, "bad_request", False),
        ("venice", 422, "bad_request", False),
        ("openrouter", 402, "backend_error", False),
    ],
)
async def test_error_statuses_map_to_their_code_with_the_upstream_message(
    fake_server: FakeServer,
    http_session: aiohttp.ClientSession,
    *,
    kind: str,
    status: int,
    code: str,
    fallback: bool,
) -> None:
    path = "/api/v1/chat/completions" if kind in BYOK_KINDS else "/v1/chat/completions"
    fake_server.reply("POST", path, {"error": {"message": f"nope {status}"}}, status=status)
    failure = await failure_of(backend_for(kind, fake_server.url, http_session))
    assert (failure.code, failure.fallback) == (code, fallback)
    assert failure.message == f"{kind} answered HTTP {status}: nope {status}"


async def test_a_redirect_is_not_followed(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    async def redirect(_: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "http://127.0.0.1:9/elsewhere"})

    fake_server.reply("POST", "/v1/chat/completions", redirect)
    failure = await failure_of(backend_for("vllm", fake_server.url, http_session))
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert len(fake_server.requests) == 1


async def test_an_error_body_that_echoes_the_key_is_scrubbed_and_trimmed(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        text = f"bad key {SECRET} " + "\x1b[31m" + "y" * 200_000  # larger than the read cap
        return web.Response(status=401, text=text)

    fake_server.reply("POST", "/api/v1/chat/completions", echo)
    failure = await failure_of(backend_for("openrouter", fake_server.url, http_session))
    assert failure.code == "auth_rejected_by_backend"
    assert SECRET not in failure.message
    assert "bad key [redacted]" in failure.message
    assert len(failure.message) <= MESSAGE_LIMIT
    assert failure.message.isprintable()


async def test_a_missing_key_fails_without_a_request(
    fake_server: FakeServer, http_session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    failure = await failure_of(backend_for("venice", fake_server.url, http_session))
    assert (failure.code, failure.fallback) == ("auth_rejected_by_backend", True)
    assert KEY_ENV in failure.message
    assert fake_server.requests == []


async def test_connection_refused_is_unreachable_and_falls_back(
    http_session: aiohttp.ClientSession,
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    failure = await failure_of(backend_for("vllm", f"http://127.0.0.1:{port}", http_session))
    assert (failure.code, failure.fallback) == ("backend_unreachable", True)
    assert "cannot connect" in failure.message


# --- a raw server that records how the client left ----------------------------------------------

Script = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def head(self) -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a crashing server does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@dataclass
class RawServer:
    """Reads one HTTP request per connection, runs `script`, then waits until the client
    closes its side: `disconnected` is set then (or when the script itself closed)."""

    script: Script
    url: str = ""
    #: The request's head, as read.
    head: bytes = b""
    got_request: anyio.Event = field(default_factory=anyio.Event)
    disconnected: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = self.head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            self.got_request.set()
            await self.script(Conn(reader, writer))
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.disconnected.set()
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawServer:
        raw = RawServer(script)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return raw

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def stall(_: Conn) -> None:
    """Send nothing; the server then only waits for the client to go."""


async def part_then_stall(conn: Conn) -> None:
    """Headers and one event, then nothing more."""
    await conn.head()
    await conn.chunk(b"data: {}\n\n")


async def test_reset_before_the_answer_is_unreachable_and_falls_back(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    async def reset(conn: Conn) -> None:
        conn.reset()

    server = await raw_server(reset)
    failure = await failure_of(backend_for("vllm", server.url, http_session))
    assert (failure.code, failure.fallback) == ("backend_unreachable", True)


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_break_after_a_2xx_head_before_any_byte_is_a_backend_error_without_fallback(
    raw_server: Callable[[Script], Awaitable[RawServer]],
    http_session: aiohttp.ClientSession,
    how: str,
) -> None:
    """A 2xx head means the backend accepted the job (it may be generating; on BYOK, billing):
    whatever breaks after it, even before the first body byte, is never tried elsewhere."""
    client_has_head = anyio.Event()

    async def head_then_break(conn: Conn) -> None:
        await conn.head()
        await client_has_head.wait()  # else the break could overtake the head
        if how == "reset":
            conn.reset()
        else:
            conn.writer.close()  # a clean close, with the chunked body not ended

    server = await raw_server(head_then_break)
    with anyio.fail_after(BOUND_S), pytest.raises(StreamFailed) as caught:
        async with backend_for("openrouter", server.url, http_session).stream(
            "openai", BODY, deadline_in()
        ) as chunks:
            client_has_head.set()
            async for _ in chunks:
                raise AssertionError("no body byte was sent")
    failure = caught.value.failure
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert failure.message.startswith("openrouter: the answer broke off after 0 bytes (")


async def test_an_answer_that_is_not_http_is_a_backend_error_without_fallback(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    async def garbage(conn: Conn) -> None:
        conn.writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await conn.writer.drain()

    server = await raw_server(garbage)
    failure = await failure_of(backend_for("vllm", server.url, http_session))
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert failure.message.startswith("vllm: the answer is not valid HTTP (")
    assert "127.0.0.1" not in failure.message and failure.message.isprintable()


async def test_a_body_that_breaks_off_is_a_backend_error_after_the_bytes(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    part = b'data: {"choices":[{"delta":{"content":"Par'
    client_has_it = anyio.Event()

    async def part_then_reset(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(part)
        await client_has_it.wait()  # else the RST could overtake the part
        conn.reset()

    server = await raw_server(part_then_reset)
    backend = backend_for("vllm", server.url, http_session)
    received = []
    with anyio.fail_after(BOUND_S), pytest.raises(StreamFailed) as caught:
        async with backend.stream("openai", BODY, deadline_in()) as chunks:
            async for data in chunks:
                received.append(data)
                client_has_it.set()
    failure = caught.value.failure
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert b"".join(received) == part
    assert f"broke off after {len(part)} bytes" in failure.message


async def test_deadline_before_the_headers_is_a_timeout_and_closes_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(stall)
    backend = backend_for("vllm", server.url, http_session)
    with anyio.fail_after(BOUND_S):
        failure = await failure_of(backend, deadline=deadline_in(0.2))
        await server.disconnected.wait()
    assert (failure.code, failure.fallback) == ("backend_timeout", False)
    assert "before the backend answered" in failure.message


async def test_a_deadline_already_passed_sends_nothing(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    failure = await failure_of(
        backend_for("vllm", fake_server.url, http_session), deadline=anyio.current_time() - 1
    )
    assert failure.code == "backend_timeout"
    assert fake_server.requests == []


async def test_deadline_mid_body_is_a_timeout_and_closes_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(part_then_stall)
    backend = backend_for("vllm", server.url, http_session)
    received = []
    with anyio.fail_after(BOUND_S):
        with pytest.raises(StreamFailed) as caught:
            async with backend.stream("openai", BODY, deadline_in(0.3)) as chunks:
                async for data in chunks:
                    received.append(data)
        await server.disconnected.wait()
    assert received == [b"data: {}\n\n"]
    assert (caught.value.failure.code, caught.value.failure.fallback) == (
        "backend_timeout",
        False,
    )
    assert "after 10 bytes" in caught.value.failure.message


async def test_the_deadline_drops_the_connection_even_while_nobody_reads(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(part_then_stall)
    backend = backend_for("vllm", server.url, http_session)
    with anyio.fail_after(BOUND_S):
        async with backend.stream("openai", BODY, deadline_in(0.3)) as chunks:
            iterator = aiter(chunks)
            assert await anext(iterator) == b"data: {}\n\n"
            await server.disconnected.wait()  # the relay is busy elsewhere; the timer acts
            with pytest.raises(StreamFailed) as caught:
                await anext(iterator)
    assert caught.value.failure.code == "backend_timeout"


# --- the end marker ends the job, open connection or not -----------------------------------------

END_MARKED = {
    "openai": [
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n",
    ],
    "anthropic": [
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi"}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ],
}


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
@pytest.mark.parametrize("split", ["one-piece", "marker-later"])
@pytest.mark.parametrize("push", [True, False], ids=["first-bytes", "iterated"])
async def test_the_body_ends_at_the_end_marker_while_the_backend_keeps_the_connection_open(
    raw_server: Callable[[Script], Awaitable[RawServer]],
    http_session: aiohttp.ClientSession,
    *,
    fmt: WireFormat,
    split: str,
    push: bool,
) -> None:
    """protocol.md §8: the job ends at `data: [DONE]` / `message_stop`; a backend that then
    keeps the connection open must not hold it until the deadline. The relay leaves as the
    executor does — a cancel scope cancelled when its meter sees the marker, which lands in the
    read waiting, even when the marker came in the first bytes handed over from the read
    callback — and the connection is dropped on the way out."""
    events = END_MARKED[fmt]
    pieces = [b"".join(events)] if split == "one-piece" else events
    entered = anyio.Event()
    client_has_it = anyio.Event()

    async def marker_then_hold(conn: Conn) -> None:
        await conn.head()
        await entered.wait()  # the first bytes then come while the caller waits for them
        for index, piece in enumerate(pieces):
            if index:
                await client_has_it.wait()
            await conn.chunk(piece)
        # ...and nothing more: no end of the chunked body, no close

    server = await raw_server(marker_then_hold)
    meter = UsageMeter(fmt, {"messages": []})
    received: list[bytes] = []
    reading = anyio.CancelScope()

    def take(data: bytes) -> None:
        received.append(data)
        meter.feed(data)
        client_has_it.set()
        if meter.ended:
            reading.cancel()

    with anyio.fail_after(BOUND_S):
        async with backend_for("vllm", server.url, http_session).stream(
            fmt, BODY, deadline_in(60), first_bytes=take if push else None
        ) as chunks:
            entered.set()
            with reading:
                async for data in chunks:
                    take(data)
        await server.disconnected.wait()  # the connection was let go at the marker
    assert b"".join(received) == b"".join(pieces)
    assert meter.ended and meter.error is None


async def test_a_stream_left_at_its_end_marker_never_lends_its_connection_again(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    """A pool of one connection: the next job gets a fresh one (the raw server answers one
    request per connection, so a reused connection would hang it)."""

    async def marker_then_hold(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(b"data: [DONE]\n\n")

    server = await raw_server(marker_then_hold)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        backend = backend_for("vllm", server.url, http)
        with anyio.fail_after(BOUND_S):
            for _ in range(3):
                meter = UsageMeter("openai", {})
                async with backend.stream("openai", BODY, deadline_in(60)) as chunks:
                    async for data in chunks:
                        meter.feed(data)
                        if meter.ended:
                            break
                assert meter.ended


# --- heads that cannot be relayed: compressed, or too large --------------------------------------

GZIP_BODY = gzip.compress(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n')


def head_with(status: bytes, extra: list[bytes], body: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status, b"Content-Type: text/event-stream", *extra]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def answering(data: bytes) -> Script:
    async def answer(conn: Conn) -> None:
        conn.writer.write(data)
        await conn.writer.drain()

    return answer


@pytest.mark.parametrize(
    "encodings",
    [[b"gzip"], [b"br"], [b"deflate"], [b"x-custom"], [b"identity, gzip"], [b"identity", b"GZIP"]],
    ids=lambda e: b"+".join(e).decode(),
)
async def test_a_compressed_answer_is_a_backend_error_before_any_byte(
    raw_server: Callable[[Script], Awaitable[RawServer]],
    http_session: aiohttp.ClientSession,
    encodings: list[bytes],
) -> None:
    extra = [b"Content-Encoding: " + value for value in encodings]
    server = await raw_server(answering(head_with(b"200 OK", extra, GZIP_BODY)))
    failure = await refused_before_any_byte(backend_for("vllm", server.url, http_session))
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert failure.message.startswith("vllm: the answer is compressed (Content-Encoding: ")


@pytest.mark.parametrize("value", [b"identity", b"Identity", b" identity ", b""])
async def test_an_identity_answer_is_relayed(
    raw_server: Callable[[Script], Awaitable[RawServer]],
    http_session: aiohttp.ClientSession,
    value: bytes,
) -> None:
    body = b"data: [DONE]\n\n"
    server = await raw_server(answering(head_with(b"200 OK", [b"Content-Encoding:" + value], body)))
    with anyio.fail_after(BOUND_S):
        assert await collect(backend_for("vllm", server.url, http_session)) == body


async def test_a_compressed_error_answer_is_judged_by_its_status(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    """Only a 2xx body would be relayed: an error answer keeps its status's code (and its
    fallback), compressed or not."""
    extra = [b"Content-Encoding: gzip"]
    server = await raw_server(answering(head_with(b"503 Unavailable", extra, GZIP_BODY)))
    failure = await failure_of(backend_for("vllm", server.url, http_session))
    assert (failure.code, failure.fallback) == ("backend_error", True)
    assert failure.message.startswith("vllm answered HTTP 503")


def padded_head(total: int) -> list[bytes]:
    """Header lines of about `total` bytes in all (each well under aiohttp's 8190-byte line
    limit, fewer than its 128 lines)."""
    line_size = 1000
    return [b"X-Pad-%03d: %s" % (i, b"p" * (line_size - 14)) for i in range(total // line_size)]


async def test_a_head_over_64_kib_is_a_backend_error_before_any_byte(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    body = b"data: [DONE]\n\n"
    server = await raw_server(answering(head_with(b"200 OK", padded_head(70_000), body)))
    failure = await refused_before_any_byte(backend_for("vllm", server.url, http_session))
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert failure.message == "vllm: the answer's head is larger than 64 KiB"


async def test_a_head_under_64_kib_is_fine(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    body = b"data: [DONE]\n\n"
    server = await raw_server(answering(head_with(b"200 OK", padded_head(60_000), body)))
    with anyio.fail_after(BOUND_S):
        assert await collect(backend_for("vllm", server.url, http_session)) == body


#: What the endless head's server writes at most (the old reader took it all, and then waited).
ENDLESS_HEAD_BYTES = 64 * 1024 * 1024


@pytest.mark.parametrize("shape", ["many-lines", "one-line"])
async def test_an_endless_head_is_refused_with_memory_bounded(
    raw_server: Callable[[Script], Awaitable[RawServer]],
    http_session: aiohttp.ClientSession,
    shape: str,
) -> None:
    """A head that never ends (1 GiB took one job to 474 MB): refused once it passes the cap,
    and no more of it is read — the server's writes stall, then fail, a few socket buffers
    past the cap."""
    written = 0

    async def endless(conn: Conn) -> None:
        nonlocal written
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        conn.writer.write(b"HTTP/1.1 200 OK\r\n" + (b"X-Endless: " if shape == "one-line" else b""))
        piece = b"x" * 4096 if shape == "one-line" else b"X-Pad: " + b"p" * 1000 + b"\r\n"
        while written < ENDLESS_HEAD_BYTES:
            conn.writer.write(piece)
            written += len(piece)
            await conn.writer.drain()

    server = await raw_server(endless)
    with anyio.fail_after(2 * BOUND_S):
        failure = await failure_of(backend_for("vllm", server.url, http_session))
        await server.disconnected.wait()
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert written < 16 * 1024 * 1024, written


# --- first bytes handed over as they are read (`first_bytes`) -------------------------------------


@dataclass
class FirstBytesSink:
    """A `first_bytes` callback that records what it was handed (and may fail)."""

    fail: bool = False
    handed: list[bytes] = field(default_factory=list)
    got: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, data: bytes) -> None:
        self.handed.append(data)
        self.got.set()
        if self.fail:
            raise RuntimeError("relay broke on the first bytes")


async def test_with_first_bytes_every_byte_arrives_once_and_in_order(
    fake_server: FakeServer, http_session: aiohttp.ClientSession, reader: str
) -> None:
    recorded = fixture_bytes("vllm/chat-stream-usage.sse")
    fake_server.reply("POST", "/v1/chat/completions", sse_handler(odd_pieces(recorded)))
    sink = FirstBytesSink()
    iterated = []
    with anyio.fail_after(BOUND_S):
        async with backend_for("vllm", fake_server.url, http_session).stream(
            "openai", BODY, deadline_in(), first_bytes=sink
        ) as chunks:
            async for data in chunks:
                iterated.append(data)
    assert b"".join(sink.handed + iterated) == recorded
    # The lean reader pushes the first read; aiohttp's yields it like the rest.
    assert len(sink.handed) == (1 if reader == "lean" else 0)


@lean_only
async def test_the_lean_reader_hands_the_first_bytes_over_before_anyone_reads(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    handed_over = anyio.Event()

    async def first_then_rest(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(b"data: {}\n\n")
        await handed_over.wait()
        await conn.chunk(b"data: [DONE]\n\n")
        await conn.chunk(b"")

    server = await raw_server(first_then_rest)
    sink = FirstBytesSink()
    with anyio.fail_after(BOUND_S):
        async with backend_for("vllm", server.url, http_session).stream(
            "openai", BODY, deadline_in(), first_bytes=sink
        ) as chunks:
            await sink.got.wait()  # no read asked for them: the read callback handed them over
            handed_over.set()
            rest = [data async for data in chunks]
    assert sink.handed == [b"data: {}\n\n"]
    assert b"".join(rest) == b"data: [DONE]\n\n"


async def test_an_error_answer_never_reaches_first_bytes(
    fake_server: FakeServer, http_session: aiohttp.ClientSession
) -> None:
    fake_server.reply("POST", "/v1/chat/completions", {"error": {"message": "nope"}}, status=503)
    sink = FirstBytesSink()
    with anyio.fail_after(BOUND_S), pytest.raises(StreamFailed) as caught:
        async with backend_for("vllm", fake_server.url, http_session).stream(
            "openai", BODY, deadline_in(), first_bytes=sink
        ):
            pass
    assert caught.value.failure.message == "vllm answered HTTP 503: nope"
    assert sink.handed == []


@lean_only
async def test_what_first_bytes_raises_is_raised_by_the_next_read_and_drops_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(part_then_stall)
    sink = FirstBytesSink(fail=True)
    with anyio.fail_after(BOUND_S):
        with pytest.raises(RuntimeError, match="relay broke on the first bytes"):
            async with backend_for("vllm", server.url, http_session).stream(
                "openai", BODY, deadline_in(), first_bytes=sink
            ) as chunks:
                async for _ in chunks:
                    pass
        await server.disconnected.wait()
    assert sink.handed == [b"data: {}\n\n"]


async def test_a_break_after_first_bytes_handed_over_is_a_backend_error_without_fallback(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    """The bytes handed over count as relayed: the route is no longer left for the next one."""
    part = b'data: {"choices":[{"delta":{"content":"Par'
    sink = FirstBytesSink()

    async def part_then_reset(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(part)
        await sink.got.wait()  # else the RST could overtake the part
        conn.reset()

    server = await raw_server(part_then_reset)
    with anyio.fail_after(BOUND_S), pytest.raises(StreamFailed) as caught:
        async with backend_for("vllm", server.url, http_session).stream(
            "openai", BODY, deadline_in(), first_bytes=sink
        ) as chunks:
            async for data in chunks:
                sink(data)  # aiohttp's reader yields them: the same record either way
    failure = caught.value.failure
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert sink.handed == [part]
    assert f"broke off after {len(part)} bytes" in failure.message


# --- released or closed on every way out ---------------------------------------------------------


async def test_an_exception_in_the_caller_closes_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(part_then_stall)
    backend = backend_for("vllm", server.url, http_session)
    with anyio.fail_after(BOUND_S):
        with pytest.raises(RuntimeError, match="relay broke"):
            async with backend.stream("openai", BODY, deadline_in()) as chunks:
                async for _ in chunks:
                    raise RuntimeError("relay broke")
        await server.disconnected.wait()


async def test_leaving_early_closes_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(part_then_stall)
    backend = backend_for("vllm", server.url, http_session)
    with anyio.fail_after(BOUND_S):
        async with backend.stream("openai", BODY, deadline_in()) as chunks:
            async for _ in chunks:
                break
        await server.disconnected.wait()


async def test_cancel_mid_body_closes_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(part_then_stall)
    backend = backend_for("vllm", server.url, http_session)
    received = []
    with anyio.fail_after(BOUND_S):
        with anyio.CancelScope() as scope:
            async with backend.stream("openai", BODY, deadline_in()) as chunks:
                async for data in chunks:
                    received.append(data)
                    scope.cancel()  # job_cancel: the next read is where it lands
        await server.disconnected.wait()
    assert scope.cancelled_caught
    assert received == [b"data: {}\n\n"]


async def test_cancel_while_waiting_for_headers_closes_the_connection(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    server = await raw_server(stall)
    backend = backend_for("vllm", server.url, http_session)
    entered = False
    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as group:

            async def job() -> None:
                nonlocal entered
                async with backend.stream("openai", BODY, deadline_in()):
                    entered = True

            group.start_soon(job)
            await server.got_request.wait()
            group.cancel_scope.cancel()
        await server.disconnected.wait()
    assert not entered


async def test_a_close_delimited_body_ends_at_the_close(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    """HTTP/1.0 style: no Content-Length, no chunking; the close is the body's end."""

    async def close_delimited(conn: Conn) -> None:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        conn.writer.write(b"data: [DONE]\n\n")
        await conn.writer.drain()
        conn.writer.close()

    server = await raw_server(close_delimited)
    with anyio.fail_after(BOUND_S):
        assert await collect(backend_for("vllm", server.url, http_session)) == b"data: [DONE]\n\n"


async def test_an_interim_answer_is_skipped(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    async def early_hints_then_stream(conn: Conn) -> None:
        conn.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
        await conn.head()
        await conn.chunk(b"data: [DONE]\n\n")
        await conn.chunk(b"")

    server = await raw_server(early_hints_then_stream)
    with anyio.fail_after(BOUND_S):
        assert await collect(backend_for("vllm", server.url, http_session)) == b"data: [DONE]\n\n"


@lean_only
async def test_broken_chunking_mid_body_is_a_backend_error_after_the_bytes(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:
    client_has_it = anyio.Event()

    async def bad_chunk(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(b"data: {}\n\n")
        await client_has_it.wait()  # else the garbage could arrive in the same read
        conn.writer.write(b"zz\r\nnot a chunk\r\n")
        await conn.writer.drain()

    server = await raw_server(bad_chunk)
    received = []
    with anyio.fail_after(BOUND_S), pytest.raises(StreamFailed) as caught:
        async with backend_for("vllm", server.url, http_session).stream(
            "openai", BODY, deadline_in()
        ) as chunks:
            async for data in chunks:
                received.append(data)
                client_has_it.set()
    failure = caught.value.failure
    assert (failure.code, failure.fallback) == ("backend_error", False)
    assert b"".join(received) == b"data: {}\n\n"
    assert "broke off after 10 bytes" in failure.message


@lean_only
async def test_the_lean_reader_asks_the_backend_to_close_and_leaves_nothing_open(
    raw_server: Callable[[Script], Awaitable[RawServer]], http_session: aiohttp.ClientSession
) -> None:

    async def finish(conn: Conn) -> None:
        await conn.head()
        await conn.chunk(b"data: [DONE]\n\n")
        await conn.chunk(b"")

    server = await raw_server(finish)
    with anyio.fail_after(BOUND_S):
        assert await collect(backend_for("vllm", server.url, http_session)) == b"data: [DONE]\n\n"
        await server.disconnected.wait()
    assert b"\r\nconnection: close\r\n" in server.head.lower()


async def test_a_key_with_a_line_break_is_refused_without_a_request(
    fake_server: FakeServer, http_session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-abc\r\nX-Injected: 1")
    failure = await failure_of(backend_for("vllm", fake_server.url, http_session))
    assert (failure.code, failure.fallback) == ("auth_rejected_by_backend", True)
    assert "control characters" in failure.message and "sk-abc" not in failure.message
    assert fake_server.requests == []


async def test_a_finished_stream_gives_its_connection_back(fake_server: FakeServer) -> None:
    """One pooled connection only: the next job could not start unless the first released it,
    whether it ended normally, failed on a status, or was left early."""
    recorded = fixture_bytes("vllm/chat-stream-usage.sse")
    fake_server.reply("POST", "/v1/chat/completions", sse_handler(odd_pieces(recorded)))
    fake_server.reply("POST", "/v1/messages", {"error": "no"}, status=500)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        backend = backend_for("vllm", fake_server.url, http)
        with anyio.fail_after(BOUND_S):
            for _ in range(3):
                assert await collect(backend) == recorded
                assert (await failure_of(backend, "anthropic")).code == "backend_error"
                async with backend.stream("openai", BODY, deadline_in()) as chunks:
                    async for _ in chunks:
                        break
    assert len(fake_server.requests) == 9


# --- the registry ---------------------------------------------------------------------------------


async def test_registry_holds_one_adapter_per_configured_backend_by_label() -> None:
    config = parse(
        '[coordinator]\nurl = "wss://c.example/provider/connect"\n'
        "[discovery]\ntimeout_s = 7\n"
        '[[backends]]\nkind = "vllm"\nurl = "http://127.0.0.1:8000"\n'
        '[[backends]]\nkind = "ollama"\nurl = "http://127.0.0.1:11434"\nname = "box"\n'
        f'[[backends]]\nkind = "openrouter"\napi_key_env = "{KEY_ENV}"\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n"
    )
    async with new_http_session(4) as http:
        registry = Registry(config, http)
        labels = [backend.name for backend in registry]
        assert labels == ["vllm:http://127.0.0.1:8000", "box", "openrouter:PA_TEST_STREAM_KEY"]
        assert len(registry) == 3 and "box" in registry and "nope" not in registry
        box = registry.get("box")
        assert box.config.kind == "ollama" and box.http is http and box.timeout_s == 7
        assert (
            registry.get("openrouter:PA_TEST_STREAM_KEY").base_url == "https://openrouter.ai/api/v1"
        )
        with pytest.raises(KeyError, match="no configured backend is named 'nope'"):
            registry.get("nope")
        rebuilt = Registry.build(config, http)
        assert rebuilt.get("box") is not box  # a reload gets fresh adapters


# --- the real llama.cpp-based server ----------------------------------------------------------


@pytest.fixture(scope="module")
def real_llamacpp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llamacpp_server(tmp_path_factory.mktemp("llamacpp")) as base_url:
        yield base_url


@pytest.mark.realbackend
async def test_a_real_llamacpp_server_streams_through_the_adapter(
    real_llamacpp: str, http_session: aiohttp.ClientSession
) -> None:
    """The job path's pieces on a real server: the body the agent sends, the bytes it relays,
    and the usage it reads (estimated: llama-cpp-python sends none)."""
    request = {
        "model": "whatever-the-client-said",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "temperature": 0,
        "seed": 0,
    }
    body = request_body("openai", request, MODEL_ALIAS)
    config = BackendConfig(kind="llamacpp", url=real_llamacpp)
    backend = make_backend(config, http_session, 1)
    meter = UsageMeter("openai", request)
    parts = []
    with anyio.fail_after(60):
        async with backend.stream("openai", body, deadline_in(60)) as chunks:
            async for data in chunks:
                parts.append(data)
                meter.feed(data)
    raw = b"".join(parts)
    assert raw.endswith(b"data: [DONE]\n\n")
    assert f'"model": "{MODEL_ALIAS}"'.encode() in raw
    assert meter.ended and meter.error is None
    assert meter.result() == Usage(6, 4, True)
