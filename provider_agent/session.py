"""The coordinator link's I/O: dial, handshake, one reader and one writer; reconnect forever.

Decisions live in `session_state` (handshake answers, inbound dispatch, the backoff policy);
this module moves bytes. The socket has one owner: only the writer task sends, everything else
puts frames on the bounded outbound queue through `Session.push` / `offer`. Reconnects are
driven by tenacity with the policy's delay, so a healthy session that drops comes back at once
and a flapping one backs off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from provider_agent import __version__
from provider_agent.backends.base import USER_AGENT
from provider_agent.errors import AuthFailed, CoordinatorError
from provider_agent.protocol import Capabilities, Heartbeat, decode, encode
from provider_agent.session_state import (
    Inbound,
    ReconnectPolicy,
    Signer,
    answer_challenge,
    auth_outcome,
    dispatch,
)

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
HANDSHAKE_TIMEOUT_S = 15.0
OUTBOUND_QUEUE = 1024
CLOSE_GOING_AWAY = 1001


class SessionEnded(Exception):
    """One connection attempt is over; tenacity decides when to try again."""


class SavesProviderId(Signer, Protocol):
    """The identity as the session uses it: sign, and remember the provider_id."""

    def save_provider_id(self, provider_id: str) -> bool: ...


@dataclass
class SessionHooks:
    """What the session asks of the rest of the agent (the daemon supplies these)."""

    url: Callable[[], str]
    enrollment_code: Callable[[], str | None]
    heartbeat_interval_s: Callable[[], float]
    capabilities: Callable[[], Capabilities]
    heartbeat: Callable[[], Heartbeat]
    #: Called after every successful auth_ok (the daemon asks for a discovery pass).
    on_authenticated: Callable[[], None]
    #: Called for each inbound frame after auth (jobs, cancels, acks); must not block long.
    on_inbound: Callable[[Inbound, Link], Awaitable[None]]


class Link:
    """One authenticated connection's outbound side: the queue only the writer drains."""

    def __init__(self, provider_id: str) -> None:
        self.provider_id = provider_id
        self._send: MemoryObjectSendStream[str]
        self._receive: MemoryObjectReceiveStream[str]
        self._send, self._receive = anyio.create_memory_object_stream[str](OUTBOUND_QUEUE)

    async def send(self, text: str) -> None:
        """Queue a frame that must go out (waits while the queue is full)."""
        try:
            await self._send.send(text)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("frame not queued: the link is closing")

    def offer(self, text: str) -> bool:
        """Queue a frame that may be dropped under back-pressure (heartbeats)."""
        try:
            self._send.send_nowait(text)
        except anyio.WouldBlock:
            log.warning("outbound queue full: heartbeat dropped")
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    async def write_to(self, ws: ClientConnection) -> None:
        """The writer: the one place that sends on the socket, in queue order."""
        async with self._receive:
            async for text in self._receive:
                await ws.send(text)

    def finish(self) -> None:
        """No more frames: the writer flushes what is queued, then closes the socket with 1001."""
        self._send.close()


class Session:
    """Keeps one authenticated WebSocket to the coordinator for as long as the agent runs."""

    def __init__(
        self,
        hooks: SessionHooks,
        identity: SavesProviderId,
        *,
        policy: ReconnectPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hooks = hooks
        self.identity = identity
        self.policy = policy or ReconnectPolicy()
        self.clock = clock
        self.link: Link | None = None
        self.attempts = 0
        self._stopping = False
        self._attempt_scope: anyio.CancelScope | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._reconnect_requested = False
        self._end_cause = "connection closed"
        self._socket_open = False

    # --- the public face -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; returns after `close()`."""
        retrying = AsyncRetrying(
            sleep=anyio.sleep,
            stop=stop_never,
            wait=self._next_delay,
            retry=retry_if_exception_type(SessionEnded),
            before_sleep=self._log_retry,
            reraise=True,
        )
        with anyio.CancelScope() as self._run_scope:
            async for attempt in retrying:
                with attempt:
                    await self._one_session()

    async def push(self, capabilities: Capabilities) -> None:
        """Send a capabilities message now if a session is up (else the next auth_ok sends one)."""
        if self.link is not None:
            await self.link.send(encode(capabilities))

    def reconnect(self) -> None:
        """Drop the current connection and dial again at once (coordinator URL or key changed)."""
        self._reconnect_requested = True
        if self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def close(self) -> None:
        """Graceful stop: flush the queue, close with 1001, and do not reconnect."""
        self._stopping = True
        if self.link is not None:
            self.link.finish()
        elif self._socket_open:
            pass  # mid-handshake: `_serve` sees `stopping` and closes with 1001 itself
        elif self._run_scope is not None:
            self._run_scope.cancel()  # dialling or waiting to redial: nothing to flush

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- one connection --------------------------------------------------------------------------

    async def _one_session(self) -> None:
        if self._stopping:
            return
        self.attempts += 1
        authenticated_at: float | None = None
        self._reconnect_requested = False
        self._end_cause = "connection closed"
        try:
            with anyio.CancelScope() as self._attempt_scope:
                async with connect(
                    self.hooks.url(),
                    ping_interval=PING_INTERVAL_S,
                    ping_timeout=PING_TIMEOUT_S,
                    max_size=MAX_FRAME_BYTES,
                    compression=None,
                    open_timeout=HANDSHAKE_TIMEOUT_S,
                    close_timeout=5,
                    user_agent_header=USER_AGENT,
                ) as ws:
                    self._socket_open = True
                    provider_id = await self._handshake(ws)
                    authenticated_at = self.clock()
                    await self._serve(ws, provider_id)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            self._end_cause = _cause(exc)
        except CoordinatorError as exc:
            self._end_cause = str(exc)
        finally:
            self._socket_open = False
            self._attempt_scope = None
            self.link = None
            if self._reconnect_requested:
                self.policy.failures = 0
            else:
                self.policy.session_ended(authenticated_at, self.clock())
        if self._stopping:
            log.info("coordinator session closed (going away)")
            return
        raise SessionEnded("reconnect requested" if self._reconnect_requested else self._end_cause)

    async def _handshake(self, ws: ClientConnection) -> str:
        with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
            challenge = decode(await _next_text(ws))
            response = answer_challenge(
                challenge, self.identity, __version__, self.hooks.enrollment_code()
            )
            await ws.send(encode(response))
            try:
                provider_id = auth_outcome(decode(await _next_text(ws)))
            except AuthFailed as exc:
                log.warning("coordinator refused the handshake: auth_failed reason=%s", exc)
                raise
        if self.identity.save_provider_id(provider_id):
            log.info("provider_id stored provider_id=%s", provider_id)
        log.info("authenticated to coordinator provider_id=%s", provider_id)
        return provider_id

    async def _serve(self, ws: ClientConnection, provider_id: str) -> None:
        link = Link(provider_id)
        await link.send(encode(self.hooks.capabilities()))
        link.offer(encode(self.hooks.heartbeat()))
        self.link = link
        if self._stopping:
            link.finish()
        self.hooks.on_authenticated()
        async with anyio.create_task_group() as group:
            group.start_soon(self._writer, ws, link, group.cancel_scope)
            group.start_soon(self._reader, ws, link, group.cancel_scope)
            group.start_soon(self._heartbeats, link)

    async def _writer(self, ws: ClientConnection, link: Link, scope: anyio.CancelScope) -> None:
        """Ends the session when the queue is finished (graceful stop) or the socket fails."""
        try:
            await link.write_to(ws)
            await ws.close(CLOSE_GOING_AWAY, "going away")
        except ConnectionClosed as exc:
            self._end_cause = _cause(exc)
        finally:
            scope.cancel()

    async def _reader(self, ws: ClientConnection, link: Link, scope: anyio.CancelScope) -> None:
        """Ends the session when the socket closes; no inbound frame can end it otherwise."""
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    log.debug("binary frame ignored bytes=%d", len(message))
                    continue
                await self.hooks.on_inbound(dispatch(decode(message)), link)
            self._end_cause = f"coordinator closed the connection (code {ws.close_code})"
        except ConnectionClosed as exc:
            self._end_cause = _cause(exc)
        finally:
            scope.cancel()

    async def _heartbeats(self, link: Link) -> None:
        while True:
            await anyio.sleep(self.hooks.heartbeat_interval_s())
            link.offer(encode(self.hooks.heartbeat()))

    # --- tenacity callbacks ----------------------------------------------------------------------

    def _next_delay(self, retry_state: RetryCallState) -> float:
        return self.policy.next_delay_s()

    def _log_retry(self, retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        cause = outcome.exception() if outcome is not None else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "coordinator connection attempt=%d ended cause=%s next_delay_s=%.2f",
            retry_state.attempt_number,
            cause,
            delay,
        )


async def _next_text(ws: ClientConnection) -> str:
    """The next text frame (binary frames during the handshake are skipped, per protocol §1)."""
    while True:
        message = await ws.recv()
        if isinstance(message, str):
            return message


def _cause(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        code = exc.rcvd.code if exc.rcvd else None
        return f"connection closed (code {code})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return f"cannot connect ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}"
