"""One job's upstream request: POST, check the answer, relay the body's bytes as they arrive.

The one place where a job touches HTTP, kept to a small interface so routing and billing never
see which reader serves it:

    async with backend.stream(fmt, body, deadline, first_bytes=take) as chunks:
        async for data in chunks:
            take(data)

Two readers stand behind it. A plain-HTTP backend (the GPU host's own vLLM, llama.cpp, LM
Studio, Ollama: the hot path) gets `LeanStream` (`backends.lean`): one connection per job, read by
an asyncio Protocol with httptools, about half the CPU per event of aiohttp and a tenth of its
cost to start a job. An https backend (BYOK, across the internet) gets `AiohttpStream` here: the
daemon's pooled aiohttp session, so a job reuses a warm TLS connection instead of paying a
handshake before its first token.

`first_bytes` (optional, synchronous) is where a reader may hand a 2xx body's first bytes the
moment they are read, from the socket's read callback, instead of waking the job's task to
yield them: during a burst of job starts that wake-up waits behind every queued start, and so
does the job's first token (bench/relay.py, interleaved: added TTFT p50 1.6–2.2 → 1.1–1.4 ms).
The lean reader does; aiohttp's yields them, as a push there would run in the same task step
anyway. So every byte reaches the caller once, in order, by one way or the other. An exception
the callback raises is raised again by the next read.

A caller that saw its format's end marker (`data: [DONE]`, `message_stop`) need not wait for
the backend to close (protocol.md §8): it leaves the iteration (a `break`, or a cancel scope
cancelled from `first_bytes`, which lands in the read waiting), and the way out drops the
connection.

Both share this contract. Failures surface as `StreamFailed` with the protocol code (see
`provider_agent.jobs.upstream`): before the first byte from `async with` (or from the first read),
after it from the iteration. A 2xx head means the backend accepted the job: whatever breaks after
it, before or after the first body byte, is `backend_error` with no fallback (it may already be
generating, on BYOK billing). A head larger than HEAD_CAP, or a 2xx one whose `Content-Encoding`
is not `identity`, is `backend_error` before any byte (the client must never get bytes it cannot
read; we ask for `identity`). The deadline (an absolute `anyio.current_time()`) bounds
connecting, waiting for headers and the body (a timer drops the connection when it passes);
besides it only connecting has a timeout of its own, so a slow backend is waited for and never
fallen back from. The response is released or closed on every way out — the normal end, an
exception, a cancellation from outside — so an aborted job closes its connection and the
backend sees it go.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Self

import aiohttp
import anyio

from provider_agent.errors import RouteFailure, StreamFailed
from provider_agent.jobs.upstream import error_for_status
from provider_agent.link.protocol import ErrorCode
from provider_agent.safe_text import MESSAGE_LIMIT, printable

#: Seconds to establish the TCP (and TLS) connection; refused or silent past it = unreachable.
CONNECT_TIMEOUT_S = 5.0
#: Most bytes of an error answer read for its message.
ERROR_BODY_CAP = 64 * 1024
#: Most bytes of a response head (status line and header lines); a larger one is refused before
#: any byte is relayed, and no more of it is read.
HEAD_CAP = 64 * 1024
HEAD_TOO_LARGE = f"the answer's head is larger than {HEAD_CAP // 1024} KiB"
#: aiohttp's own bounds on a head (its defaults, set per request so that no session setting
#: lifts them): the longest line, header value and the most header lines. They keep what it
#: buffers of an endless head near 1 MiB; HEAD_CAP is then checked on the head it parsed.
AIOHTTP_MAX_LINE = 8190
AIOHTTP_MAX_HEADERS = 128
STREAM_TIMEOUT = aiohttp.ClientTimeout(
    total=None, connect=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=None
)
#: Errors that mean the connection could not be made or was dropped (refused, reset, DNS,
#: TLS, connect timeout): the route is unreachable and, before its first byte, left.
_UNREACHABLE = (aiohttp.ClientConnectionError, OSError)


class RefusedStream:
    """A stream that fails on entry without touching the network (e.g. its API key is missing)."""

    def __init__(self, failure: RouteFailure) -> None:
        self.failure = failure

    async def __aenter__(self) -> AsyncIterator[bytes]:
        raise StreamFailed(self.failure)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class UpstreamBody(ABC):
    """What both readers share: failures worded the same way (the backend's kind first, no
    secrets, one line), the body's deadline as one timer (a cancel scope around every read
    costs microseconds on the hot path; anyio's clock on asyncio is the loop's), and the way
    out: a body read to its end is let go cleanly, anything else drops the connection."""

    __slots__ = ("_deadline", "_eof", "_kind", "_secrets", "_timed_out", "_watchdog", "relayed")

    def __init__(self, kind: str, secrets: tuple[str, ...], deadline: float) -> None:
        self._kind = kind
        self._secrets = secrets
        self._deadline = deadline
        #: The body was read to its end.
        self._eof = False
        #: The deadline passed while the body streamed (the next read raises the timeout).
        self._timed_out = False
        self._watchdog: asyncio.TimerHandle | None = None
        #: Body bytes yielded so far.
        self.relayed = 0

    def __aiter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._let_go(clean=self._eof and exc_type is None)

    def _watch_deadline(self) -> None:
        """Once the body streams: when the deadline passes, the connection is dropped (the
        backend sees it go even if nobody is reading)."""
        self._watchdog = asyncio.get_running_loop().call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        if self._drop():
            self._timed_out = True

    async def _answered(self, status: int) -> Self:
        """The answer's head is in and its connection held: a 2xx streams under the deadline's
        watchdog; any other status is read for an excerpt, dropped and raised."""
        if not 200 <= status < 300:
            try:
                excerpt = await self._excerpt()
            finally:
                self._let_go(clean=False)
            raise StreamFailed(error_for_status(status, self._kind, excerpt, self._secrets))
        self._watch_deadline()
        return self

    @abstractmethod
    def _drop(self) -> bool:
        """Drop the connection if the body is still coming; whether it was."""

    @abstractmethod
    def _let_go(self, *, clean: bool) -> None:
        """Leaving: release the connection (`clean`) or drop it."""

    @abstractmethod
    async def _excerpt(self) -> bytes:
        """Up to ERROR_BODY_CAP bytes of an error answer, within the deadline. Best effort: the
        status already decides the failure, so a body that breaks off or does not come in time
        just gives a shorter message."""

    def _cut_short(self, what: str) -> RouteFailure:
        """The answer broke after its 2xx head: the backend accepted the job (it may be
        generating, on BYOK billing), so no fallback — before the first byte as after it."""
        return self._failure(
            "backend_error", f"the answer broke off after {self.relayed} bytes ({what})"
        )

    def _refused_head(self, why: str) -> RouteFailure:
        """A head that cannot be relayed (too large, compressed): the backend is there, and
        wrong; no byte of it went anywhere."""
        return self._failure("backend_error", why)

    def _unreachable(self, what: str) -> RouteFailure:
        return self._failure("backend_unreachable", what, fallback=True)

    def _timeout(self, when: str) -> RouteFailure:
        return self._failure("backend_timeout", f"the job's deadline passed {when}")

    def _failure(self, code: ErrorCode, detail: str, *, fallback: bool = False) -> RouteFailure:
        text = printable(
            f"{self._kind}: {detail}", MESSAGE_LIMIT, secrets=self._secrets, message=True
        )
        return RouteFailure(code, text, fallback)


class AiohttpStream(UpstreamBody):
    """The async context manager `Backend.stream()` returns for an https backend; inside it,
    the async iterator of the response body's bytes (after HTTP transfer decoding, as read)."""

    __slots__ = ("_body", "_headers", "_http", "_response", "_url")

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        deadline: float,
        *,
        kind: str,
        secrets: tuple[str, ...] = (),
    ) -> None:
        super().__init__(kind, secrets, deadline)
        self._http = http
        self._url = url
        self._headers = headers
        self._body = body
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> AiohttpStream:
        response: aiohttp.ClientResponse | None = None
        with anyio.CancelScope(deadline=self._deadline):
            try:
                response = await self._http.post(
                    self._url,
                    data=self._body,
                    headers=self._headers,
                    timeout=STREAM_TIMEOUT,
                    allow_redirects=False,
                    auto_decompress=False,  # a coded body is refused on its head, never decoded
                    max_line_size=AIOHTTP_MAX_LINE,
                    max_field_size=AIOHTTP_MAX_LINE,
                    max_headers=AIOHTTP_MAX_HEADERS,
                )
            except _UNREACHABLE as exc:
                raise StreamFailed(self._unreachable(_describe(exc))) from None
            except aiohttp.ClientError as exc:
                raise StreamFailed(self._failure("backend_error", _describe(exc))) from None
        if response is None:
            raise StreamFailed(self._timeout("before the backend answered"))
        self._response = response
        refusal = head_problem(
            response.status,
            sum(len(name) + len(value) + 4 for name, value in response.raw_headers),
            response.headers.getall("Content-Encoding", ()),
        )
        if refusal is not None:
            self._let_go(clean=False)
            raise StreamFailed(self._refused_head(refusal))
        return await self._answered(response.status)

    async def __anext__(self) -> bytes:
        response = self._response
        if response is None:
            raise StopAsyncIteration
        try:
            data = await response.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            if self._timed_out:
                raise StreamFailed(self._timeout(f"after {self.relayed} bytes")) from None
            raise StreamFailed(self._cut_short(_describe(exc))) from None
        if not data:
            self._eof = True
            raise StopAsyncIteration
        self.relayed += len(data)
        return data

    def _drop(self) -> bool:
        if self._response is None:
            return False
        self._response.close()
        return True

    def _let_go(self, *, clean: bool) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        if clean:
            response.release()  # read to the end: the connection may serve the next request
        else:
            response.close()  # anything else: drop the connection, the backend sees it close

    async def _excerpt(self) -> bytes:
        response = self._response
        assert response is not None
        parts: list[bytes] = []
        size = 0
        with anyio.CancelScope(deadline=self._deadline):
            try:
                while size < ERROR_BODY_CAP:
                    part = await response.content.read(ERROR_BODY_CAP - size)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
            except (aiohttp.ClientError, OSError):
                pass  # keep what arrived; the status is the failure
        return b"".join(parts)


def head_problem(status: int, size: int, encodings: Iterable[str | bytes]) -> str | None:
    """Why a response head cannot be relayed, else None: larger than HEAD_CAP (`size` counts
    its header lines), or a 2xx answer in a `Content-Encoding` other than `identity`."""
    if size > HEAD_CAP:
        return HEAD_TOO_LARGE
    if 200 <= status < 300:
        for value in encodings:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if text.strip().lower() not in ("", "identity"):
                return (
                    f"the answer is compressed (Content-Encoding: {text.strip()[:40]}),"
                    " though the agent asks for identity"
                )
    return None


def _describe(exc: BaseException) -> str:
    """A transport error in words: "cannot connect (Connection refused)", "connection reset"…"""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"cannot connect (no connection within {CONNECT_TIMEOUT_S:g}s)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection was closed before an answer"
    if isinstance(exc, aiohttp.ClientResponseError):  # its str() names the URL: keep it out
        return f"the answer is not valid HTTP ({exc.message})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connection failed ({exc.strerror})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
