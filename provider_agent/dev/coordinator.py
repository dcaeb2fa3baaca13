"""The reference coordinator: the coordinator side of `shared/spec/protocol.md`, for local testing.

Not the marketplace. One process, state in memory, no billing. It exists so the agent can be run
and tested end to end on loopback: it checks every frame an agent sends against the protocol's
models (and a few rules of the contract the models cannot express), records what it saw for tests
to assert on, relays OpenAI/Anthropic-style HTTP requests to agents as `job` frames, and has hooks
to misbehave on purpose (refuse, flap, drop, withhold acks or pongs) so the agent's recovery paths
can be exercised without sleeps: `wait_for()` wakes on every recorded event.

    async with DevCoordinator(host="127.0.0.1", port=0) as coord:
        ...  # point an agent at coord.ws_url, an HTTP client at coord.http_url
        record = await coord.wait_for(lambda c: c.agents.get(provider_id))

A violation is logged at warning and appended to `violations`; nothing an agent sends ends its
session except a frame over 16 MiB, which the WebSocket layer refuses (close 1009).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import orjson
from aiohttp import WebSocketError, WSMessage, WSMsgType, web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from provider_agent.protocol import (
    AuthChallenge,
    AuthFailed,
    AuthOk,
    AuthResponse,
    BadFrame,
    Capabilities,
    Frame,
    Heartbeat,
    Job,
    JobAck,
    JobCancel,
    JobChunk,
    JobDone,
    JobError,
    ModelOffer,
    UnknownFrame,
    WireFormat,
    decode,
    encode,
)

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8765
CONNECT_PATH: Final = "/provider/connect"
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
AUTH_TIMEOUT_S: Final = 10.0
#: How long a close handshake, or `drop()` waiting for a session to wind down, may take.
CLOSE_TIMEOUT_S: Final = 2.0
JOB_DEADLINE_MS: Final = 60_000
#: Beyond the job's deadline the agent owes a terminal frame; after this much more the HTTP
#: client gets a 504 from the coordinator itself.
DEADLINE_GRACE_S: Final = 10.0
#: Chunks waiting for a slow HTTP client; when full, the agent's reader waits (backpressure).
JOB_QUEUE_FRAMES: Final = 64
#: Bound of every history kept (timestamps, violations, attempts, jobs), so a long run stays small.
HISTORY: Final = 10_000
#: Excerpt of an offending frame kept in a violation.
EXCERPT_CHARS: Final = 300

#: HTTP status answered for a `job_error` that arrives before any byte (others: 502).
HTTP_STATUS_FOR_ERROR: Final[dict[str, int]] = {
    "model_not_loaded": 404,
    "unsupported_format": 400,
    "bad_request": 400,
    "out_of_capacity": 429,
    "rate_limited": 429,
    "auth_rejected_by_backend": 502,
    "backend_timeout": 504,
}
#: Frame types only a coordinator sends; an agent sending one has its direction wrong.
_COORDINATOR_TYPES: Final = frozenset(
    {"auth_challenge", "auth_ok", "auth_failed", "job", "job_cancel", "job_ack", "config_update"}
)

_T = TypeVar("_T")
Outcome = Literal["open", "refused", "flapped", "auth_failed", "authenticated", "not_websocket"]
ClosedBy = Literal["agent", "coordinator", "connection"]


def provider_id_for(pubkey: bytes) -> str:
    """The stable id of a raw Ed25519 public key, so an agent keeps its id across connections."""
    return "prov_" + hashlib.sha256(pubkey).hexdigest()[:16]


def http_status_for(error_code: str) -> int:
    """The HTTP status a client gets for a `job_error` that came before any byte."""
    return HTTP_STATUS_FOR_ERROR.get(error_code, 502)


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """An OpenAI-style error object, so OpenAI clients show the code."""
    kind = (
        "rate_limit_error"
        if status == 429
        else "invalid_request_error"
        if status < 500
        else "server_error"
    )
    return {"error": {"message": message, "type": kind, "code": code}}


def contract_problems(frame: BaseModel) -> list[str]:
    """Rules of protocol.md the pydantic models cannot express; empty when the frame is fine."""
    problems: list[str] = []
    if isinstance(frame, Capabilities):
        ids = [offer.model_id for offer in frame.models]
        if ids != sorted(ids):
            problems.append("capabilities.models not sorted by model_id")
        if len(set(ids)) != len(ids):
            problems.append("capabilities.models has duplicate model_id")
        for offer in frame.models:
            if "formats" not in offer.model_fields_set or not offer.formats:
                problems.append(f"capabilities.models[{offer.model_id}].formats missing or empty")
            if offer.max_concurrent < 1 or offer.input_per_1m < 0 or offer.output_per_1m < 0:
                problems.append(f"capabilities.models[{offer.model_id}] has a negative value")
        if "status" not in frame.metadata.model_fields_set:
            problems.append("capabilities.metadata.status missing")
        if frame.metadata.status == "draining" and frame.models:
            problems.append("capabilities: draining but models is not empty")
    elif isinstance(frame, Heartbeat):
        numbers = (frame.queue_depth, frame.tokens_per_sec_p50, frame.p50_latency_ms)
        if min(numbers) < 0 or frame.p95_latency_ms < 0:
            problems.append("heartbeat has a negative value")
        if not 0.0 <= frame.error_rate_60s <= 1.0:
            problems.append("heartbeat.error_rate_60s outside [0, 1]")
        if frame.p95_latency_ms < frame.p50_latency_ms:
            problems.append("heartbeat.p95_latency_ms below p50_latency_ms")
        if (frame.last_error_at is None) != (frame.last_error_code is None):
            problems.append("heartbeat.last_error_at and last_error_code disagree on null")
    elif isinstance(frame, JobDone):
        tokens = frame.tokens
        if tokens.input != tokens.input_tokens or tokens.output != tokens.output_tokens:
            problems.append("job_done.tokens: input/output differ from input_tokens/output_tokens")
        if min(tokens.input, tokens.output, frame.duration_ms) < 0:
            problems.append("job_done has a negative value")
    elif isinstance(frame, JobError) and frame.tokens_emitted < 0:
        problems.append("job_error.tokens_emitted is negative")
    return problems


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _excerpt(text: str | bytes) -> str:
    if isinstance(text, bytes):
        return f"<{len(text)} bytes binary>"
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# --- records: what the coordinator saw, for tests and for GET /agents ---------------------------


@dataclass(frozen=True)
class Violation:
    """One thing an agent sent that breaks the contract."""

    reason: str
    provider_id: str | None
    frame: str
    at: datetime = field(default_factory=_utcnow)

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "frame": self.frame, "at": _iso(self.at)}


@dataclass
class ConnectionAttempt:
    """One connection attempt on /provider/connect; `at` is `time.monotonic()` (backoff checks)."""

    index: int
    at: float
    outcome: Outcome = "open"
    provider_id: str | None = None
    #: Code of the close frame the agent sent (1001 on a graceful stop); None if none came.
    close_code: int | None = None
    close_reason: str | None = None
    #: Code of the close frame this coordinator sent (drop, flap, auth_failed, shutdown).
    sent_close_code: int | None = None
    closed_by: ClosedBy | None = None
    ended_at: float | None = None


@dataclass
class AgentRecord:
    """Everything seen from one provider (one public key), across its connections."""

    provider_id: str
    pubkey: str
    agent_version: str = ""
    connected: bool = False
    connections: int = 0
    #: The first enrollment code the agent presented, if any.
    enrollment_code: str | None = None
    #: The code presented on each authenticated connection (None where none was sent).
    enrollment_codes: deque[str | None] = field(default_factory=lambda: deque(maxlen=HISTORY))
    capabilities: Capabilities | None = None
    capabilities_count: int = 0
    capabilities_times: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last_heartbeat: Heartbeat | None = None
    last_heartbeat_at: datetime | None = None
    heartbeat_count: int = 0
    heartbeat_times: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    unknown_frames: int = 0
    violations: deque[Violation] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def offers(self) -> dict[str, ModelOffer]:
        """The latest advertised models by id (empty before the first capabilities)."""
        if self.capabilities is None:
            return {}
        return {offer.model_id: offer for offer in self.capabilities.models}

    def to_json(self) -> dict[str, Any]:
        caps, beat = self.capabilities, self.last_heartbeat
        return {
            "provider_id": self.provider_id,
            "pubkey": self.pubkey,
            "connected": self.connected,
            "agent_version": self.agent_version,
            "enrollment_code": self.enrollment_code,
            "capabilities": caps.model_dump(mode="json") if caps is not None else None,
            "capabilities_count": self.capabilities_count,
            "last_heartbeat": beat.model_dump(mode="json") if beat is not None else None,
            "last_heartbeat_at": _iso(self.last_heartbeat_at),
            "heartbeat_count": self.heartbeat_count,
            "connections": self.connections,
            "unknown_frames": self.unknown_frames,
            "violations": [v.to_json() for v in self.violations],
        }


@dataclass
class JobRecord:
    """One job: dispatched here, or known only from a terminal frame (e.g. resent after a restart
    of this coordinator: `dispatched_at` is then None)."""

    job_id: str
    provider_id: str
    model_id: str | None = None
    format: str | None = None
    dispatched_at: float | None = None
    bytes_relayed: int = 0
    chunk_frames: int = 0
    #: The first terminal frame; later ones are counted, not kept (one billing record per job).
    terminal: JobDone | JobError | None = None
    terminal_count: int = 0
    finished_at: float | None = None

    @property
    def resends(self) -> int:
        """Terminal frames received beyond the first (the agent's outbox re-sending)."""
        return max(0, self.terminal_count - 1)

    def to_json(self) -> dict[str, Any]:
        term = self.terminal
        return {
            "job_id": self.job_id,
            "provider_id": self.provider_id,
            "model_id": self.model_id,
            "format": self.format,
            "bytes_relayed": self.bytes_relayed,
            "chunk_frames": self.chunk_frames,
            "terminal": term.model_dump(mode="json") if term is not None else None,
            "terminal_count": self.terminal_count,
        }


# --- one WebSocket and one in-flight HTTP request -----------------------------------------------


class _Lost:
    """Sentinel: the agent's connection ended before the job's terminal frame."""


_LOST: Final = _Lost()
_Relayed = bytes | JobDone | JobError | _Lost


class _Link:
    """One agent WebSocket. Sends go through one lock so frames never interleave."""

    def __init__(
        self, ws: web.WebSocketResponse, request: web.Request, attempt: ConnectionAttempt
    ) -> None:
        self.ws = ws
        self.request = request
        self.attempt = attempt
        self.provider_id: str | None = None
        self.finished = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def send(self, data: str | bytes) -> None:
        async with self._lock:
            if isinstance(data, bytes):
                await self.ws.send_bytes(data)
            else:
                await self.ws.send_str(data)

    async def pong(self, payload: bytes) -> None:
        async with self._lock:
            await self.ws.pong(payload)

    async def close(self, code: int, reason: str) -> None:
        if self.attempt.sent_close_code is None and self.attempt.closed_by is None:
            self.attempt.sent_close_code = code
            self.attempt.closed_by = "coordinator"
        async with self._lock:
            await self.ws.close(code=code, message=reason.encode()[:120])

    def abort(self) -> None:
        """Cut the TCP connection without a close frame (what a crash or a pulled cable does)."""
        if self.attempt.closed_by is None:
            self.attempt.closed_by = "coordinator"
        transport = self.request.transport
        if transport is not None:
            transport.abort()


@dataclass
class _PendingJob:
    """A job whose HTTP client is still waiting; the agent's reader feeds `queue`."""

    record: JobRecord
    link: _Link
    queue: asyncio.Queue[_Relayed] = field(
        default_factory=lambda: asyncio.Queue[_Relayed](JOB_QUEUE_FRAMES)
    )
    #: Set when the link ended; read once the queue is empty (the queue may have been full).
    lost: bool = False

    async def next(self) -> _Relayed:
        if self.lost and self.queue.empty():
            return _LOST
        return await self.queue.get()

    def abandon(self) -> None:
        """Empty the queue, so a reader blocked on a full one goes on (its item is dropped)."""
        while not self.queue.empty():
            self.queue.get_nowait()

    def mark_lost(self) -> None:
        self.lost = True
        if not self.queue.full():
            self.queue.put_nowait(_LOST)


# --- the coordinator -----------------------------------------------------------------------------


class DevCoordinator:
    """The reference coordinator: WebSocket endpoint for agents, HTTP front for people and tests.

    Use as `async with DevCoordinator(port=0) as coord:` (port 0 picks a free one; read
    `coord.ws_url`). State is plain attributes: `agents`, `attempts`, `violations`, `jobs`.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.host = host
        self.port = port
        self.agents: dict[str, AgentRecord] = {}
        self.attempts: deque[ConnectionAttempt] = deque(maxlen=HISTORY)
        self.violations: deque[Violation] = deque(maxlen=HISTORY)
        self.jobs: dict[str, JobRecord] = {}
        #: Send `job_ack` for terminal frames (the agent then also has pongs to confirm delivery).
        self.ack_enabled = True
        #: Answer the agent's pings; off, the agent cannot confirm delivery and must time out.
        self.pong_enabled = True
        self.ack_delay_s = 0.0
        self._attempt_count = 0
        self._refuse = 0
        self._flap = 0
        self._flap_code = 1012
        self._fail_auth = 0
        self._fail_auth_reason = ""
        self._links: dict[str, _Link] = {}
        self._open: set[_Link] = set()
        self._pending: dict[str, _PendingJob] = {}
        self._changed_event = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve; `port` becomes the bound port when 0 was asked for."""
        app = web.Application(client_max_size=MAX_FRAME_BYTES)
        app.router.add_get(CONNECT_PATH, self._handle_connect)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_post("/v1/chat/completions", self._handle_chat_completions)
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_get("/agents", self._handle_agents)
        app.router.add_get("/jobs", self._handle_jobs)
        # handler_cancellation: an HTTP client that goes away cancels its job at the agent.
        runner = web.AppRunner(
            app, shutdown_timeout=CLOSE_TIMEOUT_S, handler_cancellation=True, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("dev-coordinator listening ws_url=%s http_url=%s", self.ws_url, self.http_url)

    async def aclose(self) -> None:
        """Close every agent socket with 1001, end waiting HTTP clients, stop serving."""
        for pending in list(self._pending.values()):
            pending.mark_lost()
        await asyncio.gather(
            *(self._close_quietly(link, 1001, "coordinator shutting down") for link in self._open)
        )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("dev-coordinator stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self._netloc}{CONNECT_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self._netloc}"

    # --- state helpers and test hooks --------------------------------------------------------

    @property
    def finished(self) -> dict[str, JobRecord]:
        """Jobs a terminal frame was received for, by job_id."""
        return {job_id: rec for job_id, rec in self.jobs.items() if rec.terminal is not None}

    def connected(self) -> list[str]:
        """Provider ids with an authenticated socket open now."""
        return sorted(self._links)

    async def wait_for(
        self,
        predicate: Callable[[DevCoordinator], _T | Literal[False] | None],
        timeout: float = 5.0,  # noqa: ASYNC109 (tests read best as `wait_for(pred, timeout=…)`)
    ) -> _T:
        """Wait until `predicate(self)` is truthy and return its value; re-checked on every event
        (frame, connection change, job), so tests synchronise without sleeping."""
        async with asyncio.timeout(timeout):
            while True:
                event = self._changed_event
                value = predicate(self)
                if value:
                    return value
                await event.wait()

    def refuse_next(self, n: int = 1) -> None:
        """Answer the next `n` connection attempts with HTTP 503 before the upgrade."""
        self._refuse = n

    def flap_next(self, n: int = 1, code: int = 1012) -> None:
        """Accept the next `n` upgrades, then close at once (before the challenge) with `code`."""
        self._flap = n
        self._flap_code = code

    def fail_auth_next(self, n: int = 1, reason: str = "refused by fail_auth_next()") -> None:
        """Answer the next `n` valid `auth_response`s with `auth_failed`."""
        self._fail_auth = n
        self._fail_auth_reason = reason

    def delay_acks(self, seconds: float) -> None:
        """Send each `job_ack` this long after its terminal frame (0: at once)."""
        self.ack_delay_s = seconds

    async def send(self, provider_id: str, frame: Frame | str | bytes) -> None:
        """Send a frame, or any text (a text frame) or bytes (a binary frame), to a connected agent.
        Raises LookupError when it is not connected."""
        link = self._links.get(provider_id)
        if link is None:
            raise LookupError(f"provider {provider_id} is not connected")
        await link.send(frame if isinstance(frame, str | bytes) else encode(frame))

    async def drop(self, provider_id: str | None = None, code: int | None = None) -> int:
        """Close agent sockets (one provider's, or every open one): abruptly when `code` is None
        (TCP cut, no close frame), else with a close frame carrying `code`. Returns how many were
        dropped, once the coordinator has recorded their end."""
        links = [
            link for link in self._open if provider_id is None or link.provider_id == provider_id
        ]
        for link in links:
            log.info("drop provider_id=%s code=%s", link.provider_id, code)
            if code is None:
                link.abort()
            else:
                await self._close_quietly(link, code, "dropped by test hook")
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            for link in links:
                await link.finished.wait()
        return len(links)

    def _changed(self) -> None:
        self._changed_event.set()
        self._changed_event = asyncio.Event()

    def _violation(self, provider_id: str | None, reason: str, text: str | bytes) -> None:
        violation = Violation(reason=reason, provider_id=provider_id, frame=_excerpt(text))
        self.violations.append(violation)
        record = self.agents.get(provider_id) if provider_id is not None else None
        if record is not None:
            record.violations.append(violation)
        log.warning("protocol violation provider_id=%s reason=%s", provider_id, reason)
        self._changed()

    async def _close_quietly(self, link: _Link, code: int, reason: str) -> None:
        try:
            await link.close(code, reason)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            log.debug("close failed provider_id=%s error=%r", link.provider_id, exc)
            link.abort()

    async def _send_quietly(self, link: _Link, frame: Frame) -> bool:
        try:
            await link.send(encode(frame))
        except (ConnectionError, RuntimeError) as exc:
            log.debug(
                "send failed provider_id=%s type=%s error=%r", link.provider_id, frame.type, exc
            )
            return False
        return True

    # --- the agent WebSocket -----------------------------------------------------------------

    async def _handle_connect(self, request: web.Request) -> web.StreamResponse:
        self._attempt_count += 1
        attempt = ConnectionAttempt(index=self._attempt_count, at=time.monotonic())
        self.attempts.append(attempt)
        self._changed()
        peer = request.remote
        if self._refuse > 0:
            self._refuse -= 1
            attempt.outcome = "refused"
            attempt.ended_at = time.monotonic()
            log.info("connection refused attempt=%d peer=%s", attempt.index, peer)
            return web.Response(status=503, text="refused by refuse_next()")
        ws = web.WebSocketResponse(
            timeout=CLOSE_TIMEOUT_S,
            autoping=False,
            compress=False,
            max_msg_size=MAX_FRAME_BYTES,
        )
        if not ws.can_prepare(request).ok:
            attempt.outcome = "not_websocket"
            attempt.ended_at = time.monotonic()
            return web.Response(status=426, text="WebSocket upgrade expected")
        await ws.prepare(request)
        link = _Link(ws, request, attempt)
        self._open.add(link)
        log.info("connection opened attempt=%d peer=%s", attempt.index, peer)
        try:
            if self._flap > 0:
                self._flap -= 1
                attempt.outcome = "flapped"
                await self._close_quietly(link, self._flap_code, "flapped by flap_next()")
                return ws
            record = await self._handshake(link)
            if record is not None:
                await self._serve_agent(link, record)
        finally:
            self._connection_ended(link)
        return ws

    def _connection_ended(self, link: _Link) -> None:
        self._open.discard(link)
        for task in link.tasks:
            task.cancel()
        attempt = link.attempt
        attempt.ended_at = time.monotonic()
        if attempt.closed_by is None:
            attempt.closed_by = "connection"
        pid = link.provider_id
        if pid is not None and self._links.get(pid) is link:
            del self._links[pid]
            self.agents[pid].connected = False
        for pending in self._pending.values():
            if pending.link is link:
                pending.mark_lost()
        log.info(
            "connection closed attempt=%d provider_id=%s closed_by=%s close_code=%s",
            attempt.index,
            pid,
            attempt.closed_by,
            attempt.close_code if attempt.closed_by == "agent" else attempt.sent_close_code,
        )
        link.finished.set()
        self._changed()

    async def _receive(self, link: _Link, within_s: float | None = None) -> WSMessage | None:
        """The next text or binary message; pings answered (if `pong_enabled`), pongs skipped.
        None once the socket is closing, with the agent's close code recorded."""
        while True:
            msg = await link.ws.receive(timeout=within_s)
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                return msg
            if msg.type is WSMsgType.PING:
                if self.pong_enabled:
                    try:
                        await link.pong(msg.data)
                    except (ConnectionError, RuntimeError):
                        return None
                continue
            if msg.type is WSMsgType.PONG:
                continue
            if msg.type is WSMsgType.CLOSE:
                link.attempt.close_code = int(msg.data)
                link.attempt.close_reason = str(msg.extra or "")
                if link.attempt.closed_by is None:
                    link.attempt.closed_by = "agent"
            elif msg.type is WSMsgType.ERROR:
                log.warning("websocket error provider_id=%s error=%r", link.provider_id, msg.data)
                # aiohttp answered a protocol error (1009: frame too big) with that close code.
                if isinstance(msg.data, WebSocketError):
                    link.attempt.sent_close_code = int(msg.data.code)
                if link.attempt.closed_by is None:
                    link.attempt.closed_by = "coordinator"
            return None

    async def _handshake(self, link: _Link) -> AgentRecord | None:
        """Challenge, verify, answer; the agent's record on success, None when refused or gone."""
        nonce = secrets.token_bytes(32)
        challenge = AuthChallenge(nonce=base64.b64encode(nonce).decode())
        if not await self._send_quietly(link, challenge):
            return None
        while True:
            try:
                msg = await self._receive(link, within_s=AUTH_TIMEOUT_S)
            except TimeoutError:
                await self._refuse_auth(link, "no auth_response in time")
                return None
            if msg is None:
                return None
            if msg.type is WSMsgType.TEXT:
                break
        text = str(msg.data)
        frame = decode(text)
        if not isinstance(frame, AuthResponse):
            kind = frame.type if isinstance(frame, BaseModel) else None
            reason = frame.reason if isinstance(frame, BadFrame) else "expected auth_response"
            self._violation(None, f"handshake: {reason} (got type={kind})", text)
            await self._refuse_auth(link, f"expected auth_response, got {kind}")
            return None
        try:
            pubkey = _b64decode(frame.pubkey)
            signature = _b64decode(frame.signature)
            Ed25519PublicKey.from_public_bytes(pubkey).verify(signature, nonce)
        except (binascii.Error, ValueError, InvalidSignature) as exc:
            reason = "bad signature" if isinstance(exc, InvalidSignature) else "bad key encoding"
            self._violation(None, f"handshake: {reason}: {exc!r}", text)
            await self._refuse_auth(link, reason)
            return None
        if self._fail_auth > 0:
            self._fail_auth -= 1
            await self._refuse_auth(link, self._fail_auth_reason)
            return None
        return await self._admit(link, frame, provider_id_for(pubkey))

    async def _refuse_auth(self, link: _Link, reason: str) -> None:
        link.attempt.outcome = "auth_failed"
        log.warning("auth failed attempt=%d reason=%s", link.attempt.index, reason)
        self._changed()
        await self._send_quietly(link, AuthFailed(reason=reason))
        await self._close_quietly(link, 1008, "auth failed")

    async def _admit(self, link: _Link, frame: AuthResponse, pid: str) -> AgentRecord | None:
        record = self.agents.get(pid)
        if record is None:
            record = self.agents[pid] = AgentRecord(provider_id=pid, pubkey=frame.pubkey)
        older = self._links.get(pid)
        if older is not None:
            log.info("replacing older connection provider_id=%s", pid)
            older.provider_id = None
            await self._close_quietly(older, 4000, "replaced by a newer connection")
        link.provider_id = pid
        link.attempt.provider_id = pid
        link.attempt.outcome = "authenticated"
        record.agent_version = frame.agent_version
        record.connections += 1
        record.connected = True
        record.enrollment_codes.append(frame.enrollment_code)
        if record.enrollment_code is None:
            record.enrollment_code = frame.enrollment_code
        self._links[pid] = link
        if not await self._send_quietly(link, AuthOk(provider_id=pid)):
            return None
        log.info(
            "agent authenticated provider_id=%s agent_version=%s enrollment=%s connection=%d",
            pid,
            frame.agent_version,
            frame.enrollment_code is not None,
            record.connections,
        )
        self._changed()
        return record

    async def _serve_agent(self, link: _Link, record: AgentRecord) -> None:
        """Read frames until the socket ends; a bug handling one frame is logged, not fatal."""
        while True:
            msg = await self._receive(link)
            if msg is None:
                return
            if msg.type is WSMsgType.BINARY:
                self._violation(record.provider_id, "binary frame (frames are text)", msg.data)
                continue
            text = str(msg.data)
            try:
                await self._on_text(link, record, text)
            except Exception:
                log.exception("frame handling failed provider_id=%s", record.provider_id)
                self._violation(record.provider_id, "frame broke the coordinator", text)

    async def _on_text(self, link: _Link, record: AgentRecord, text: str) -> None:
        pid = record.provider_id
        frame = decode(text)
        if isinstance(frame, BadFrame):
            self._violation(pid, frame.reason, text)
            return
        if isinstance(frame, UnknownFrame):
            record.unknown_frames += 1
            log.info("unknown frame ignored provider_id=%s type=%s", pid, frame.type)
            self._changed()
            return
        if frame.type in _COORDINATOR_TYPES or isinstance(frame, AuthResponse):
            self._violation(pid, f"{frame.type} is not a frame an agent sends now", text)
            return
        if isinstance(frame, JobChunk):
            await self._on_chunk(link, record, frame, text)
            return
        self._check_strictly(pid, frame, text)
        for problem in contract_problems(frame):
            self._violation(pid, problem, text)
        if isinstance(frame, Capabilities):
            record.capabilities = frame
            record.capabilities_count += 1
            record.capabilities_times.append(time.monotonic())
            log.info(
                "capabilities provider_id=%s models=%d status=%s",
                pid,
                len(frame.models),
                frame.metadata.status,
            )
        elif isinstance(frame, Heartbeat):
            record.last_heartbeat = frame
            record.last_heartbeat_at = _utcnow()
            record.heartbeat_count += 1
            record.heartbeat_times.append(time.monotonic())
            log.debug("heartbeat provider_id=%s queue_depth=%d", pid, frame.queue_depth)
        elif isinstance(frame, JobDone | JobError):
            await self._on_terminal(link, record, frame, text)
        self._changed()

    def _check_strictly(self, pid: str, frame: Frame, text: str) -> None:
        """Re-validate without coercion: the contract says numbers are numbers, not "2"."""
        try:
            type(frame).model_validate(orjson.loads(text), strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            self._violation(pid, f"{frame.type} is loosely typed: {where}: {first['msg']}", text)

    async def _on_chunk(self, link: _Link, record: AgentRecord, frame: JobChunk, text: str) -> None:
        pid = record.provider_id
        job = self.jobs.get(frame.job_id)
        if job is None or job.dispatched_at is None or job.provider_id != pid:
            self._violation(
                pid, f"job_chunk for a job not sent to this agent: {frame.job_id}", text
            )
            return
        if job.terminal is not None:
            self._violation(pid, f"job_chunk after the terminal frame: {frame.job_id}", text)
            return
        try:
            data = _b64decode(frame.data)
        except (binascii.Error, ValueError):
            self._violation(pid, "job_chunk.data is not base64", text)
            return
        job.bytes_relayed += len(data)
        job.chunk_frames += 1
        pending = self._pending.get(frame.job_id)
        if pending is not None and pending.link is link:
            await pending.queue.put(data)
        self._changed()

    async def _on_terminal(
        self, link: _Link, record: AgentRecord, frame: JobDone | JobError, text: str
    ) -> None:
        pid = record.provider_id
        job = self.jobs.get(frame.job_id)
        if job is None:
            job = self._remember(JobRecord(job_id=frame.job_id, provider_id=pid))
            log.info("terminal frame for a job not dispatched here job_id=%s", frame.job_id)
        elif job.provider_id != pid:
            self._violation(pid, f"terminal frame for another provider's job {frame.job_id}", text)
        job.terminal_count += 1
        if job.terminal is None:
            job.terminal = frame
            job.finished_at = time.monotonic()
            log.info(
                "job finished job_id=%s provider_id=%s type=%s bytes=%d",
                frame.job_id,
                pid,
                frame.type,
                job.bytes_relayed,
            )
            pending = self._pending.get(frame.job_id)
            if pending is not None and pending.link is link:
                await pending.queue.put(frame)
        else:
            log.info("terminal frame resent job_id=%s count=%d", frame.job_id, job.terminal_count)
            if frame.model_dump() != job.terminal.model_dump():
                self._violation(pid, f"resent terminal frame differs: {frame.job_id}", text)
        await self._ack(link, frame.job_id)

    async def _ack(self, link: _Link, job_id: str) -> None:
        if not self.ack_enabled:
            return
        if self.ack_delay_s <= 0:
            await self._send_quietly(link, JobAck(job_id=job_id))
            return
        task = asyncio.get_running_loop().create_task(self._ack_later(link, job_id))
        link.tasks.add(task)
        task.add_done_callback(link.tasks.discard)

    async def _ack_later(self, link: _Link, job_id: str) -> None:
        """A delayed ack; cancelled with its connection, so it is lost like a real one would be."""
        await asyncio.sleep(self.ack_delay_s)
        await self._send_quietly(link, JobAck(job_id=job_id))

    def _remember(self, job: JobRecord) -> JobRecord:
        self.jobs[job.job_id] = job
        while len(self.jobs) > HISTORY:
            del self.jobs[next(iter(self.jobs))]
        return job

    # --- the HTTP front ----------------------------------------------------------------------

    async def _handle_models(self, _: web.Request) -> web.Response:
        owners: dict[str, list[str]] = {}
        for pid in sorted(self._links):
            for model_id in self.agents[pid].offers():
                owners.setdefault(model_id, []).append(pid)
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": 0,
                "owned_by": "dev-coordinator",
                "providers": providers,
            }
            for model_id, providers in sorted(owners.items())
        ]
        return _json({"object": "list", "data": data})

    async def _handle_agents(self, _: web.Request) -> web.Response:
        return _json([self.agents[pid].to_json() for pid in sorted(self.agents)])

    async def _handle_jobs(self, _: web.Request) -> web.Response:
        return _json([job.to_json() for job in self.jobs.values()])

    async def _handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._run_job(request, "openai")

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._run_job(request, "anthropic")

    def _pick(self, model: str, fmt: WireFormat, pinned: str | None) -> _Link | web.Response:
        """The connected agent to run `model` in `fmt` (fewest jobs in flight here), or the error
        response to send. `pinned` (header X-Provider-Id) restricts the choice to one provider."""
        serving = [
            (pid, offer)
            for pid in sorted(self._links)
            if (pinned is None or pid == pinned)
            and (offer := self.agents[pid].offers().get(model)) is not None
        ]
        if not serving:
            return _error(404, "model_not_found", f"no connected agent serves model {model!r}")
        able = [pid for pid, offer in serving if fmt in offer.formats]
        if not able:
            return _error(400, "unsupported_format", f"no agent serves {model!r} as {fmt}")
        in_flight = {pid: 0 for pid in able}
        for pending in self._pending.values():
            if pending.record.provider_id in in_flight:
                in_flight[pending.record.provider_id] += 1
        return self._links[min(able, key=lambda pid: in_flight[pid])]

    async def _run_job(self, request: web.Request, fmt: WireFormat) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "bad_request", "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "bad_request", "the body must be a JSON object with a string model")
        picked = self._pick(body["model"], fmt, request.headers.get("X-Provider-Id"))
        if isinstance(picked, web.Response):
            return picked
        link = picked
        assert link.provider_id is not None
        job = Job(
            job_id=str(uuid.uuid4()),
            model_id=body["model"],
            request=body,
            format=fmt,
            deadline_ms=JOB_DEADLINE_MS,
        )
        record = self._remember(
            JobRecord(
                job_id=job.job_id,
                provider_id=link.provider_id,
                model_id=job.model_id,
                format=fmt,
                dispatched_at=time.monotonic(),
            )
        )
        pending = self._pending[job.job_id] = _PendingJob(record=record, link=link)
        log.info(
            "job dispatched job_id=%s provider_id=%s model=%s format=%s",
            job.job_id,
            link.provider_id,
            job.model_id,
            fmt,
        )
        self._changed()
        try:
            if not await self._send_quietly(link, job):
                return _error(502, "connection_lost", "the agent's connection ended")
            return await self._relay(request, pending, job.deadline_ms / 1000 + DEADLINE_GRACE_S)
        finally:
            del self._pending[job.job_id]
            pending.abandon()
            if record.terminal is None and not pending.lost:
                log.info("job abandoned job_id=%s, cancelling at the agent", job.job_id)
                await self._send_quietly(link, JobCancel(job_id=job.job_id))

    async def _relay(
        self, request: web.Request, pending: _PendingJob, budget_s: float
    ) -> web.StreamResponse:
        """Stream the agent's bytes to the HTTP client as they come; an error before the first
        byte becomes an HTTP error, after it the stream just ends."""
        record = pending.record
        response: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(budget_s):
                while True:
                    item = await pending.next()
                    if isinstance(item, bytes):
                        if response is None:
                            response = await self._start_stream(request, record)
                        await response.write(item)
                        continue
                    if response is not None:
                        await response.write_eof()
                        return response
                    if isinstance(item, JobDone):
                        response = await self._start_stream(request, record)
                        await response.write_eof()
                        return response
                    if isinstance(item, JobError):
                        status = http_status_for(item.error_code)
                        return _error(status, item.error_code, item.message, record)
                    return _error(502, "connection_lost", "the agent's connection ended", record)
        except TimeoutError:
            log.warning("job timed out job_id=%s", record.job_id)
            if response is not None:
                await response.write_eof()
                return response
            return _error(504, "timeout", "no answer from the agent in time", record)

    async def _start_stream(self, request: web.Request, record: JobRecord) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Job-Id": record.job_id,
                "X-Provider-Id": record.provider_id,
            }
        )
        await response.prepare(request)
        return response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, job: JobRecord | None = None) -> web.Response:
    response = _json(error_body(status, code, message), status)
    if job is not None:
        response.headers["X-Job-Id"] = job.job_id
        response.headers["X-Provider-Id"] = job.provider_id
    return response


async def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the reference coordinator until cancelled (`provider-agent dev-coordinator`)."""
    async with DevCoordinator(host=host, port=port):
        await asyncio.Event().wait()
