"""The lean reader of a job's upstream answer, for plain-HTTP backends (the GPU host's own).

One connection per job, an asyncio Protocol that feeds httptools (uvicorn's HTTP parser) and
hands the body's bytes to the relay as they arrive. Measured on a 2-core machine under
`bench/relay.py` (256 streams at once): aiohttp costs about 0.4 ms of CPU to start a job and
about 40 µs to read an SSE event; this reader a fraction of both. A burst of jobs therefore
delays the first tokens of the jobs already streaming far less.

No pool: the request says `Connection: close`, so the backend closes when the answer ends and
keeps the TIME_WAIT on its side; a fresh loopback connection costs tens of microseconds next to
seconds of generation, and no job can ever pick a connection the backend is closing. The same
contract as `AiohttpStream` (see `backends.stream`), held by the same tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Literal, cast
from urllib.parse import urlsplit

import anyio
import httptools

from provider_agent.backends.stream import (
    CONNECT_TIMEOUT_S,
    ERROR_BODY_CAP,
    HEAD_CAP,
    HEAD_TOO_LARGE,
    UpstreamBody,
    head_problem,
)
from provider_agent.errors import RouteFailure, StreamFailed
from provider_agent.jobs.upstream import FirstBytes

#: Body bytes held for a slow reader before the socket stops being read (TCP backpressure).
READ_HIGH_WATER = 256 * 1024

Fault = Literal["reset", "invalid"]


class Exchange(asyncio.Protocol):
    """One request and its answer on a connection of its own: the parser's callbacks record
    what arrived, `wait()` returns whenever anything did."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers_done = False
        #: Content-Length or chunked: the answer marks its own end (else the close ends it).
        self.framed = False
        self.complete = False
        #: Bytes read while no final head was complete (bounds what a head can make us hold).
        self._head_read = 0
        #: The head's size as parsed (status reason and header lines), for the exact cap.
        self._head_size = 0
        #: The head's `Content-Encoding` values (checked once it is complete).
        self._encodings: list[bytes] = []
        #: Why the exchange broke, in words, and of which kind; None while it is fine.
        self.fault: tuple[Fault, str] | None = None
        self._pieces: list[bytes] = []
        self.buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        #: Takes the first bytes of a 2xx body as they are read (then None), else they wait.
        self.first_bytes: FirstBytes | None = None
        #: What `first_bytes` raised: the reader raises it again (a bug costs its job, not the
        #: event loop's read callback).
        self.first_bytes_error: Exception | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.complete or self.fault is not None:
            return  # past the answer: nothing more is read
        in_head = not self.headers_done
        if in_head:
            self._head_read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break("invalid", "the answer is not valid HTTP (it switched protocols)")
        except httptools.HttpParserError as exc:
            self._break("invalid", f"the answer is not valid HTTP ({exc or type(exc).__name__})")
        if in_head and self._head_read > HEAD_CAP and not self.headers_done and not self.fault:
            self._break("invalid", HEAD_TOO_LARGE)  # still no end to it: no more is read

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.fault is None:
            if self.headers_done and not self.framed:
                self.complete = True  # a close-delimited body: the close is its end
            elif exc is not None:
                self.fault = ("reset", _describe(exc))
            elif self.headers_done:
                self.fault = ("reset", "the answer was cut short")
            else:
                self.fault = ("reset", "the connection was closed before an answer")
        self.transport = None
        self._wake()

    # --- httptools callbacks (they must not raise) -------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self.framed = True
        elif name == b"content-encoding":
            self._encodings.append(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self.framed = False  # an interim answer (103 Early Hints…): the real one follows
            self._encodings.clear()
            return
        refusal = head_problem(status, self._head_size, self._encodings)
        if refusal is not None:
            self.first_bytes = None  # not one byte of this answer goes anywhere
            self._break("invalid", refusal)
            return
        self.status = status
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        first_bytes, self.first_bytes = self.first_bytes, None
        if first_bytes is not None and 200 <= self.status < 300:
            try:
                first_bytes(body)
            except Exception as exc:
                self.first_bytes_error = exc
                self._wake()
            return
        self._pieces.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True
            self._wake()

    # --- the reader's side -------------------------------------------------------------------

    async def wait(self) -> None:
        """Until the next callback that changes something (headers, bytes, end, fault)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """Every body byte that arrived since the last call, as one bytes object."""
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces = []
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def abort(self) -> None:
        """Drop the connection now (unsent request bytes included): the backend sees it go."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _break(self, kind: Fault, words: str) -> None:
        self.fault = (kind, words)
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def request_head(url: str, headers: Mapping[str, str], length: int) -> tuple[str, int, bytes]:
    """(host, port, the request's head) of a POST to a plain-HTTP `url` with `headers` (the
    adapter's, User-Agent included; values are checked free of line breaks where they are
    read, see `read_api_key`)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Accept: */*",
        f"Content-Length: {length}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return host, parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode()


class LeanStream(UpstreamBody):
    """The async context manager `Backend.stream()` returns for a plain-HTTP backend; inside
    it, the async iterator of the response body's bytes (after transfer decoding, as read)."""

    __slots__ = ("_exchange", "_first_bytes", "_host", "_port", "_request")

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        deadline: float,
        *,
        kind: str,
        secrets: tuple[str, ...] = (),
        first_bytes: FirstBytes | None = None,
    ) -> None:
        super().__init__(kind, secrets, deadline)
        self._host, self._port, head = request_head(url, headers, len(body))
        self._request = head + body
        self._exchange: Exchange | None = None
        self._first_bytes = first_bytes

    async def __aenter__(self) -> LeanStream:
        if anyio.current_time() >= self._deadline:
            raise StreamFailed(self._timeout("before the request was sent"))
        loop = asyncio.get_running_loop()
        exchange = Exchange(self._request)
        if self._first_bytes is not None:
            exchange.first_bytes = self._pushed
        with anyio.CancelScope(deadline=self._deadline):
            with anyio.move_on_after(CONNECT_TIMEOUT_S) as connecting:
                try:
                    await loop.create_connection(lambda: exchange, self._host, self._port)
                except OSError as exc:
                    raise StreamFailed(self._unreachable(_cannot_connect(exc))) from None
            if connecting.cancelled_caught:
                words = f"cannot connect (no connection within {CONNECT_TIMEOUT_S:g}s)"
                raise StreamFailed(self._unreachable(words))
            try:
                while not exchange.headers_done and exchange.fault is None:
                    await exchange.wait()
            finally:
                if not exchange.headers_done:
                    exchange.abort()  # cancelled or failed before the answer: drop it
        if exchange.fault is not None and not exchange.headers_done:
            kind, words = exchange.fault  # before the head: a broken connection is left
            failure = self._unreachable(words) if kind == "reset" else self._refused_head(words)
            raise StreamFailed(failure)
        if not exchange.headers_done:
            raise StreamFailed(self._timeout("before the backend answered"))
        self._exchange = exchange
        return await self._answered(exchange.status)

    async def __anext__(self) -> bytes:
        exchange = self._exchange
        if exchange is None:
            raise StopAsyncIteration
        while True:
            if exchange.first_bytes_error is not None:
                raise exchange.first_bytes_error
            if exchange.buffered:
                break
            if exchange.complete:
                self._eof = True
                raise StopAsyncIteration
            if exchange.fault is not None:
                if self._timed_out:
                    raise StreamFailed(self._timeout(f"after {self.relayed} bytes"))
                raise StreamFailed(self._faulted(*exchange.fault))
            await exchange.wait()
        data = exchange.take()
        self.relayed += len(data)
        return data

    def _pushed(self, data: bytes) -> None:
        """The first bytes, from the read callback: counted as relayed, then handed over."""
        assert self._first_bytes is not None
        self.relayed += len(data)
        self._first_bytes(data)

    def _faulted(self, kind: Fault, words: str) -> RouteFailure:
        """The exchange broke after the 2xx head: `backend_error`, never left for another
        route (the backend accepted the job)."""
        if kind == "reset" or self.relayed:
            return self._cut_short(words)
        return self._failure("backend_error", words)  # not HTTP: its own words say enough

    def _drop(self) -> bool:
        exchange = self._exchange
        if exchange is None or exchange.complete:
            return False
        exchange.abort()
        return True

    def _let_go(self, *, clean: bool) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        if clean:
            exchange.close()
        else:
            exchange.abort()  # anything else: drop it, the backend sees the client go

    async def _excerpt(self) -> bytes:
        exchange = self._exchange
        assert exchange is not None
        with anyio.CancelScope(deadline=self._deadline):
            while (
                exchange.buffered < ERROR_BODY_CAP
                and not exchange.complete
                and exchange.fault is None
            ):
                await exchange.wait()
        return exchange.take()[:ERROR_BODY_CAP]


def _cannot_connect(exc: OSError) -> str:
    """ "cannot connect (Connection refused)", "(Name or service not known)"…"""
    return f"cannot connect ({exc.strerror or exc})"


def _describe(exc: Exception) -> str:
    """Why an open connection failed, in words."""
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connection failed ({exc.strerror})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
