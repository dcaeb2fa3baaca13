"""The reference coordinator's WebSocket server: handshake, reading agents' frames, test hooks.

Every frame an agent sends is judged by `contract` and recorded in `records`; the HTTP front
(`front`) relays jobs through the same connections. Each connection's handler owns a task group
for what runs beside its reader (delayed acks), cancelled when the connection ends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import anyio
import anyio.abc
from aiohttp import WebSocketError, WSMessage, WSMsgType, web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from provider_agent.dev.coordinator.contract import (
    AGENT_TYPES,
    check_agent_frame,
    chunk_problems,
    terminal_problems,
)
from provider_agent.dev.coordinator.front import JOB_DEADLINE_MS, HttpFront, PendingJob
from provider_agent.dev.coordinator.records import (
    HISTORY,
    AgentRecord,
    ConnectionAttempt,
    JobRecord,
    Violation,
    excerpt,
    utcnow,
)
from provider_agent.errors import ExitCode
from provider_agent.link.protocol import (
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
    JobDone,
    JobError,
    WireFormat,
    decode,
    encode,
)
from provider_agent.runtime import event_loop_options, settle_heap

log = logging.getLogger("provider_agent.dev.coordinator")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8765
CONNECT_PATH: Final = "/provider/connect"
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
AUTH_TIMEOUT_S: Final = 10.0
#: How long a close handshake, or `drop()` waiting for a session to wind down, may take.
CLOSE_TIMEOUT_S: Final = 2.0

_T = TypeVar("_T")
_PORT: Final = re.compile(r"[0-9]{1,5}")


def provider_id_for(pubkey: bytes) -> str:
    """The stable id of a raw Ed25519 public key, so an agent keeps its id across connections."""
    return "prov_" + hashlib.sha256(pubkey).hexdigest()[:16]


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8765` for IPv6) as (host, port); ValueError says what is wrong."""
    shown = repr(text if len(text) <= 60 else text[:60] + "…")
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:8765), not {shown}")
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"--listen {shown}: the port must be a number from 0 to 65535")
    if not host.isprintable() or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"--listen {shown}: {host!r} is not a host name or address")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--listen {shown}: write an IPv6 address in brackets, e.g. [::1]:8765")
    if not host or "[" in host or "]" in host:
        raise ValueError(f"--listen {shown}: {host!r} is not a host name or address")
    return host, int(port)


class _Link:
    """One agent WebSocket. Sends go through one lock so frames never interleave; `tasks` is the
    connection's task group, cancelled when it ends."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        attempt: ConnectionAttempt,
        tasks: anyio.abc.TaskGroup,
    ) -> None:
        self.ws = ws
        self.request = request
        self.attempt = attempt
        self.tasks = tasks
        self.provider_id: str | None = None
        self.finished = anyio.Event()
        self._lock = anyio.Lock()

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
        #: Every terminal frame received, repeats included (`len(finished)` counts job_ids).
        self.terminal_frames = 0
        #: Send `job_ack` for terminal frames. Off from an agent's connect on, the agent can only
        #: confirm delivery by pongs (once a session saw a `job_ack`, only acks confirm).
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
        self._pending: dict[str, PendingJob] = {}
        #: One job frame goes out per turn of the event loop: a burst of HTTP requests then
        #: never keeps the agents' frames unread (their arrival times are what benchmarks read).
        self._dispatch_turn = anyio.Lock()
        #: Set on the next change; made only when a `wait_for` waits (a frame costs no Event).
        self._changed_event: anyio.Event | None = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve; `port` becomes the bound port when 0 was asked for."""
        app = web.Application(client_max_size=MAX_FRAME_BYTES)
        app.router.add_get(CONNECT_PATH, self._handle_connect)
        HttpFront(self).add_routes(app)
        # handler_cancellation: an HTTP client that goes away cancels its job at the agent.
        runner = web.AppRunner(
            app, shutdown_timeout=CLOSE_TIMEOUT_S, handler_cancellation=True, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024)  # a burst of clients
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
        for pending in self._pending.values():
            pending.mark_lost()
        async with anyio.create_task_group() as closing:
            for link in list(self._open):
                closing.start_soon(self._close_quietly, link, 1001, "coordinator shutting down")
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

    # --- state for tests ---------------------------------------------------------------------

    @property
    def finished(self) -> dict[str, JobRecord]:
        """Jobs a terminal frame was received for, by job_id (each counted once)."""
        return {job_id: rec for job_id, rec in self.jobs.items() if rec.terminal is not None}

    def terminal_counts(self) -> dict[str, int]:
        """Terminal frames received per job_id, repeats included."""
        return {job_id: rec.terminal_count for job_id, rec in self.jobs.items()}

    def connected(self) -> list[str]:
        """Provider ids with an authenticated socket open now."""
        return sorted(self._links)

    def in_flight(self) -> dict[str, int]:
        """Jobs waiting on an HTTP client here, per connected provider."""
        counts = dict.fromkeys(self._links, 0)
        for pending in self._pending.values():
            pid = pending.record.provider_id
            counts[pid] = counts.get(pid, 0) + 1
        return counts

    def assert_no_violations(self) -> None:
        """Raise AssertionError listing every contract problem seen (an agent test's last line)."""
        if self.violations:
            lines = [f"  {v.provider_id}: {v.reason}; frame: {v.frame}" for v in self.violations]
            raise AssertionError(
                f"the coordinator saw {len(lines)} contract problem(s):\n" + "\n".join(lines)
            )

    async def wait_for(
        self,
        predicate: Callable[[DevCoordinator], _T | Literal[False] | None],
        timeout: float = 5.0,  # noqa: ASYNC109 (tests read best as `wait_for(pred, timeout=…)`)
    ) -> _T:
        """Wait until `predicate(self)` is truthy and return its value; re-checked on every event
        (frame, connection change, job), so tests synchronise without sleeping."""
        with anyio.fail_after(timeout):
            while True:
                if self._changed_event is None:
                    self._changed_event = anyio.Event()
                event = self._changed_event
                value = predicate(self)
                if value:
                    return value
                await event.wait()

    # --- test hooks --------------------------------------------------------------------------

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
        await self._link(provider_id).send(
            frame if isinstance(frame, str | bytes) else encode(frame)
        )

    async def send_job(
        self,
        provider_id: str,
        model_id: str,
        request: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        fmt: WireFormat = "openai",
        deadline_ms: int = JOB_DEADLINE_MS,
        keep_data: bool = True,
    ) -> JobRecord:
        """Send a `job` frame to a connected agent, without an HTTP client: a new job_id unless
        one is given (the same one again is a resend). Its chunks (kept in `data` with
        `keep_data`) and terminal frames land in the returned record. LookupError when the
        agent is not connected."""
        link = self._link(provider_id)
        job = Job(
            job_id=job_id or str(uuid.uuid4()),
            model_id=model_id,
            request=request if request is not None else {"model": model_id, "messages": []},
            format=fmt,
            deadline_ms=deadline_ms,
        )
        record = self._dispatched(link, job)
        if keep_data and record.data is None:
            record.data = bytearray()
        await link.send(encode(job))
        return record

    async def cancel_job(self, job_id: str) -> None:
        """Send `job_cancel` for a job to the agent it was sent to. LookupError when the job is
        unknown or its agent is not connected."""
        job = self.jobs.get(job_id)
        if job is None:
            raise LookupError(f"no job {job_id} was sent")
        await self._link(job.provider_id).send(encode(JobCancel(job_id=job_id)))

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
        with anyio.fail_after(CLOSE_TIMEOUT_S):
            for link in links:
                await link.finished.wait()
        return len(links)

    # --- jobs --------------------------------------------------------------------------------

    @asynccontextmanager
    async def relaying(self, provider_id: str, job: Job) -> AsyncIterator[PendingJob | None]:
        """Send `job` to a connected agent for an HTTP client and yield what the agent relays
        (None: the connection ended before it went out). On exit, a job still running at the
        agent is cancelled there."""
        async with self._dispatch_turn:
            link = self._links[provider_id]
            record = self._dispatched(link, job)
            pending = self._pending[job.job_id] = PendingJob(record, link.attempt.index)
            log.info(
                "job dispatched job_id=%s provider_id=%s model=%s format=%s",
                job.job_id,
                provider_id,
                job.model_id,
                job.format,
            )
            sent = await self._send_quietly(link, job)
            await anyio.lowlevel.checkpoint()
        try:
            yield pending if sent else None
        finally:
            del self._pending[job.job_id]
            pending.abandon()
            if record.terminal is None and not pending.lost:
                log.info("job abandoned job_id=%s, cancelling at the agent", job.job_id)
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                    await self._send_quietly(link, JobCancel(job_id=job.job_id))

    def _dispatched(self, link: _Link, job: Job) -> JobRecord:
        """Record a `job` frame about to go out on `link` (a known job_id: a resend)."""
        assert link.provider_id is not None
        record = self.jobs.get(job.job_id)
        if record is None:
            record = self._remember(JobRecord(job_id=job.job_id, provider_id=link.provider_id))
        record.provider_id = link.provider_id
        record.model_id = job.model_id
        record.format = job.format
        record.dispatched_at = time.monotonic()
        record.sent += 1
        record.sent_on = link.attempt.index
        self._changed()
        return record

    def _remember(self, job: JobRecord) -> JobRecord:
        self.jobs[job.job_id] = job
        while len(self.jobs) > HISTORY:
            del self.jobs[next(iter(self.jobs))]
        return job

    # --- internals ---------------------------------------------------------------------------

    def _link(self, provider_id: str) -> _Link:
        link = self._links.get(provider_id)
        if link is None:
            raise LookupError(f"provider {provider_id} is not connected")
        return link

    def _changed(self) -> None:
        event, self._changed_event = self._changed_event, None
        if event is not None:
            event.set()

    def _violation(self, provider_id: str | None, reason: str, text: str | bytes) -> None:
        violation = Violation(reason=reason, provider_id=provider_id, frame=excerpt(text))
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
        async with anyio.create_task_group() as tasks:
            link = _Link(ws, request, attempt, tasks)
            self._open.add(link)
            log.info("connection opened attempt=%d peer=%s", attempt.index, peer)
            try:
                await self._converse(link)
            finally:
                tasks.cancel_scope.cancel()
                self._connection_ended(link)
        return ws

    async def _converse(self, link: _Link) -> None:
        if self._flap > 0:
            self._flap -= 1
            link.attempt.outcome = "flapped"
            await self._close_quietly(link, self._flap_code, "flapped by flap_next()")
            return
        record = await self._handshake(link)
        if record is not None:
            await self._serve_agent(link, record)

    def _connection_ended(self, link: _Link) -> None:
        self._open.discard(link)
        attempt = link.attempt
        attempt.ended_at = time.monotonic()
        if attempt.closed_by is None:
            attempt.closed_by = "connection"
        pid = link.provider_id
        if pid is not None and self._links.get(pid) is link:
            del self._links[pid]
            self.agents[pid].connected = False
        for pending in self._pending.values():
            if pending.attempt == attempt.index:
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
        verdict = check_agent_frame(text, handshake=True)
        if verdict.problems or verdict.data is None:
            for problem in verdict.problems:
                self._violation(None, problem, text)
            reason = verdict.problems[0].removeprefix("handshake: ")
            await self._refuse_auth(link, reason)
            return None
        frame = AuthResponse.model_validate(verdict.data)
        try:
            pubkey = base64.b64decode(frame.pubkey, validate=True)
            signature = base64.b64decode(frame.signature, validate=True)
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
            received_at = time.monotonic()  # before any checking: benchmarks time arrivals
            data: str | bytes = msg.data if msg.type is WSMsgType.BINARY else str(msg.data)
            try:
                await self._on_frame(link, record, data, received_at)
            except Exception:
                log.exception("frame handling failed provider_id=%s", record.provider_id)
                self._violation(record.provider_id, "frame broke the coordinator", data)

    async def _on_frame(
        self, link: _Link, record: AgentRecord, text: str | bytes, received_at: float = 0.0
    ) -> None:
        pid = record.provider_id
        verdict = check_agent_frame(text)
        for problem in verdict.problems:
            self._violation(pid, problem, text)
        if not verdict.known:
            record.unknown_frames += 1
            log.info("unknown frame ignored provider_id=%s type=%s", pid, verdict.kind)
            self._changed()
            return
        if verdict.kind not in AGENT_TYPES or isinstance(text, bytes):
            return
        if verdict.kind == "job_chunk":
            if verdict.chunk is not None and verdict.data is not None:
                job_id = str(verdict.data["job_id"])
                await self._on_chunk(
                    link, record, job_id, verdict.chunk, text, received_at=received_at
                )
            return
        frame = decode(text)
        if isinstance(frame, BadFrame):
            if not verdict.problems:
                self._violation(
                    pid,
                    f"fits protocol.md but provider_agent.link.protocol refuses it: {frame.reason}",
                    text,
                )
            return
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
            record.last_heartbeat_at = utcnow()
            record.heartbeat_count += 1
            record.heartbeat_times.append(time.monotonic())
            log.debug("heartbeat provider_id=%s queue_depth=%d", pid, frame.queue_depth)
        elif isinstance(frame, JobDone | JobError):
            await self._on_terminal(link, record, frame, text)
        self._changed()

    async def _on_chunk(
        self,
        link: _Link,
        record: AgentRecord,
        job_id: str,
        data: bytes,
        text: str,
        *,
        received_at: float,
    ) -> None:
        pid = record.provider_id
        job = self.jobs.get(job_id)
        problems = chunk_problems(job, pid, job_id)
        for problem in problems:
            self._violation(pid, problem, text)
        if problems or job is None:
            return
        if job.first_chunk_at is None:
            job.first_chunk_at = received_at
        job.bytes_relayed += len(data)
        job.chunk_frames += 1
        if job.sent_on != link.attempt.index:
            job.chunks_elsewhere = True
        pending = self._pending.get(job_id)
        if pending is not None and pending.attempt == link.attempt.index:
            await pending.deliver(data)
        elif job.data is not None:
            job.data.extend(data)
        self._changed()

    async def _on_terminal(
        self, link: _Link, record: AgentRecord, frame: JobDone | JobError, text: str
    ) -> None:
        pid = record.provider_id
        job = self.jobs.get(frame.job_id)
        for problem in terminal_problems(job, pid, frame, link.attempt.index):
            self._violation(pid, problem, text)
        if job is None:
            job = self._remember(JobRecord(job_id=frame.job_id, provider_id=pid))
            log.info("terminal frame for a job not dispatched here job_id=%s", frame.job_id)
        self.terminal_frames += 1
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
            if pending is not None and pending.attempt == link.attempt.index:
                await pending.deliver(frame)
        else:
            log.info("terminal frame resent job_id=%s count=%d", frame.job_id, job.terminal_count)
        await self._ack(link, frame.job_id)

    async def _ack(self, link: _Link, job_id: str) -> None:
        if not self.ack_enabled:
            return
        if self.ack_delay_s <= 0:
            await self._send_quietly(link, JobAck(job_id=job_id))
            return
        link.tasks.start_soon(self._ack_later, link, job_id, self.ack_delay_s)

    async def _ack_later(self, link: _Link, job_id: str, delay_s: float) -> None:
        """A delayed ack; cancelled with its connection, so it is lost like a real one would be."""
        await anyio.sleep(delay_s)
        await self._send_quietly(link, JobAck(job_id=job_id))


async def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the reference coordinator until SIGTERM or SIGINT, then stop gracefully (agents get
    close 1001) and return (`provider-agent dev-coordinator`)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with DevCoordinator(host=host, port=port):
            async for signum in signals:
                log.info("%s received, stopping", signal.Signals(signum).name)
                return


def dev_coordinator_command(listen: str) -> int:
    """`provider-agent dev-coordinator --listen HOST:PORT`: serve until SIGTERM or SIGINT, then
    0; 2 for a bad --listen (an invalid argument, as argparse's own); 1 when it cannot listen."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        print(f"dev-coordinator: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    settle_heap()
    try:
        anyio.run(serve, host, port, backend_options=event_loop_options())
    except KeyboardInterrupt:
        pass  # SIGINT before the signal handlers were installed: a requested stop all the same
    except OSError as exc:
        print(f"dev-coordinator: cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
