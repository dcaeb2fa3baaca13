"""The coordinator link's I/O: dial, handshake, one reader and one writer; reconnect forever.

Every decision is `session_state.SessionCore`'s: this module feeds it what happened (dialled,
a frame arrived, the socket ended, frames were written, a pong came back) and carries out the
actions it answers. The socket has one owner, the writer, which drains the daemon's `Outbound`
lanes; the reader never waits on anything but the socket, so pongs are always read.

Reconnecting is tenacity's loop: `AsyncRetrying` calls `_attempt` (one connection, start to
end) for as long as it returns a `Redial`; `PolicyWait` asks `ReconnectPolicy` how long to wait;
`before_sleep` writes the one log line per ended attempt and tells the daemon; the sleep is a
cancel scope that `reconnect()` cuts short. Cancellation is never retried: tenacity stores any
BaseException an attempt raises, and `retry_if_result` sends it back up unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_never
from tenacity.wait import wait_base
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from provider_agent import __version__
from provider_agent.clock import DEFAULT_TIMINGS, Timings
from provider_agent.errors import Fault, FaultKind, LocalFault, SessionFailure
from provider_agent.link.faults import classify, classify_close
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import Capabilities, Heartbeat, Job, decode, encode
from provider_agent.link.state import (
    Action,
    Authenticated,
    Close,
    Confirmed,
    DeliverCancel,
    DeliverJob,
    Dial,
    Ended,
    Fail,
    Ignore,
    Opened,
    Ping,
    Ponged,
    Received,
    Reconnect,
    ReconnectPolicy,
    Redial,
    RejectJob,
    SessionCore,
    Signer,
    State,
    Stop,
    StoreProviderId,
    Written,
)
from provider_agent.link.state import Send as SendFrame
from provider_agent.link.ws import close_code_received, dial, send_all, write_at_once
from provider_agent.observe.logs import Throttle

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001


class SavesProviderId(Signer, Protocol):
    """The identity as the session uses it: sign, and remember the provider_id."""

    def save_provider_id(self, provider_id: str) -> bool: ...


async def _no_undelivered() -> list[tuple[str, str]]:
    return []


def _ignore_fault(fault: Fault | None) -> None:
    return None


def _redial_of(retry_state: RetryCallState) -> Redial:
    """The `Redial` the attempt just ended with (tenacity asks for a wait only after one)."""
    outcome = retry_state.outcome
    redial = outcome.result() if outcome is not None and not outcome.failed else None
    if not isinstance(redial, Redial):
        raise RuntimeError(f"no Redial to wait after: {retry_state}")
    return redial


def _goes_on(outcome: object) -> bool:
    """tenacity's retry predicate: an attempt that ended in a `Redial` is retried; one that
    returned None (the session is stopped) or raised (cancelled, interrupted) is not."""
    return isinstance(outcome, Redial)


class PolicyWait(wait_base):
    """tenacity's wait, decided by `ReconnectPolicy` from how the last connection ended: the
    reset after a healthy session, full jitter, the planned spread, the local floor, the
    immediate redial after a requested reconnect. The decision itself stays pure, in the policy."""

    def __init__(self, policy: ReconnectPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.policy.delay_after(_redial_of(retry_state))


class InboundSink(Protocol):
    """Where the session hands what the coordinator sends about jobs (the executor is one). Each
    call returns at once: the reader waits on it, and pongs must keep being read."""

    def submit(self, job: Job) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def reject(
        self, job_id: str, reason: str, code: Literal["bad_request", "unsupported_format"]
    ) -> None: ...

    async def confirmed(self, job_ids: Sequence[str]) -> None:
        """Terminal frames the coordinator has read (pong after them) or stored (job_ack)."""

    def connection_lost(self) -> None:
        """The authenticated connection is gone: jobs in flight lose their coordinator."""


@dataclass
class SessionHooks:
    """What the session asks of the rest of the agent (the agent's wiring supplies these)."""

    url: Callable[[], str]
    enrollment_code: Callable[[], str | None]
    heartbeat_interval_s: Callable[[], float]
    capabilities: Callable[[], Capabilities]
    heartbeat: Callable[[], Heartbeat]
    #: Called after every successful auth_ok (the daemon asks for a discovery pass).
    on_authenticated: Callable[[], None]
    #: The outbox's undelivered terminal frames (job_id, frame), oldest first.
    undelivered: Callable[[], Awaitable[list[tuple[str, str]]]] = _no_undelivered
    #: A connection ended and will be dialled again; its fault (None: a requested reconnect).
    on_reconnect: Callable[[Fault | None], None] = _ignore_fault


class Session:
    """Keeps one authenticated WebSocket to the coordinator for as long as the agent runs."""

    def __init__(
        self,
        hooks: SessionHooks,
        identity: SavesProviderId,
        sink: InboundSink,
        outbound: Outbound | None = None,
        *,
        policy: ReconnectPolicy | None = None,
        timings: Timings = DEFAULT_TIMINGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hooks = hooks
        self.sink = sink
        self.outbound = outbound or Outbound()
        self.policy = policy or ReconnectPolicy()
        self.timings = timings
        #: `job` frames without an answerable job_id: one line per 10 s (protocol.md §8).
        self._unanswerable_jobs = Throttle(10.0)
        self.core = SessionCore(identity, __version__, hooks.enrollment_code)
        self._identity = identity
        self.clock = clock
        self._ws: ClientConnection | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._handshake_scope: anyio.CancelScope | None = None
        self._wait_scope: anyio.CancelScope | None = None
        #: Set when a stop or reconnect asked to close a connection that is not yet serving.
        self._closing_code: int | None = None
        #: What the writer closes a serving connection with once its lanes finish.
        self._writer_close_code = CLOSE_GOING_AWAY

    # --- the public face -------------------------------------------------------------------------

    @property
    def identity(self) -> SavesProviderId:
        return self._identity

    @identity.setter
    def identity(self, identity: SavesProviderId) -> None:
        self._identity = identity
        self.core.signer = identity

    @property
    def attempts(self) -> int:
        return self.core.attempts

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def authenticated(self) -> bool:
        return self.core.state is State.AUTHENTICATED

    @property
    def stopping(self) -> bool:
        return self.core.stopping

    def _is(self, state: State) -> bool:
        """The core's state now (a call, so type narrowing does not outlive an await)."""
        return self.core.state is state

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; returns after `close()`. Cancelling it ends it
        at once, whether connected, dialling or waiting to redial."""
        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_never,
            wait=PolicyWait(self.policy),
            retry=retry_if_result(_goes_on),
            before_sleep=self._before_sleep,
        )
        with anyio.CancelScope() as self._run_scope:
            await retrying(self._attempt)
        self._run_scope = None
        log.info("coordinator session closed (going away)")

    def push(self, capabilities: Capabilities) -> None:
        """Queue a capabilities message (it goes out now if a session is up, and a fresh one is
        sent after every auth_ok anyway)."""
        if self.authenticated:
            self.outbound.control("capabilities", encode(capabilities))

    def reconnect(self) -> None:
        """Drop the current connection and dial again at once (coordinator URL or key changed)."""
        previous = self.core.state
        for action in self.core.handle(Reconnect()):
            self._close_soon(action)
        if previous is State.IDLE and self._wait_scope is not None:
            self._wait_scope.cancel()  # waiting out a backoff: dial now

    def close(self) -> None:
        """Graceful stop: flush what waits, close with 1001, and do not reconnect."""
        previous = self.core.state
        actions = self.core.handle(Stop())
        if previous is State.AUTHENTICATED:
            self._writer_close_code = CLOSE_GOING_AWAY
            self.outbound.finish()  # the writer flushes, then closes with 1001
        elif previous in (State.IDLE, State.CONNECTING) and self._run_scope is not None:
            self._run_scope.cancel()  # dialling or waiting to redial: nothing to flush
        else:
            for action in actions:
                self._close_soon(action)

    # --- the retry loop's parts ------------------------------------------------------------------

    async def _attempt(self) -> Redial | None:
        """One connection from dial to end: the `Redial` the core answers its end with, or None
        once the session is stopped."""
        if self._is(State.STOPPED):
            return None  # closed before it ever ran
        self.core.handle(Dial(self.clock()))
        self._closing_code = None
        fault = await self._one_connection()
        actions = self.core.handle(Ended(fault, self.clock()))
        return next((a for a in actions if isinstance(a, Redial)), None)

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        """The one log line per ended attempt, then the daemon's hook (its metrics)."""
        redial = _redial_of(retry_state)
        self._log_wait(redial, retry_state.upcoming_sleep)
        self.hooks.on_reconnect(redial.fault)

    async def _sleep(self, seconds: float) -> None:
        """The wait before a redial: `reconnect()` cuts it short (dial now), `close()` cancels
        the whole run."""
        with anyio.CancelScope() as self._wait_scope:
            await anyio.sleep(seconds)
        self._wait_scope = None

    # --- one connection --------------------------------------------------------------------------

    async def _one_connection(self) -> Fault | None:
        """Dial, handshake, serve until the socket ends; returns whose fault the end was."""
        try:
            async with dial(self.hooks.url(), self.timings) as ws:
                self._ws = ws
                try:
                    self.core.handle(Opened(self.clock()))
                    if self.core.state is State.CLOSING:  # a stop or reconnect came while dialling
                        await ws.close(self._closing_code or CLOSE_GOING_AWAY, "going away")
                        return None
                    with anyio.CancelScope() as self._handshake_scope:
                        await self._handshake(ws)
                    self._handshake_scope = None
                    if self._closing_code is not None and self._is(State.CLOSING):
                        await ws.close(self._closing_code, "going away")
                        return None
                    if self.core.authenticated_at is not None:
                        await self._serve(ws)  # also when a stop came meanwhile: it flushes
                    return self._end_of(ws)
                finally:
                    self._ws = None
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            raise
        except Exception as exc:
            fault = classify(exc)
            if fault.kind is FaultKind.LOCAL:
                log.error("coordinator session failed on our side: %s", fault.detail, exc_info=exc)
            return fault

    async def _handshake(self, ws: ClientConnection) -> None:
        with anyio.fail_after(self.timings.handshake_timeout_s):
            while self.core.state in (State.AWAIT_CHALLENGE, State.AWAIT_AUTH):
                message = await ws.recv()
                if isinstance(message, bytes):
                    continue  # binary frames during the handshake are skipped (protocol §1)
                for action in self.core.handle(Received(decode(message), self.clock())):
                    await self._perform(action, ws)

    async def _serve(self, ws: ClientConnection) -> None:
        if not self.core.stopping:  # a stop that came after auth_ok has finished the lanes
            self._writer_close_code = CLOSE_GOING_AWAY
            self.outbound.reopen()
        undelivered = await self.hooks.undelivered()
        self.outbound.begin(undelivered)
        self.outbound.control("capabilities", encode(self.hooks.capabilities()))
        self.outbound.control("heartbeat", encode(self.hooks.heartbeat()))
        if undelivered:
            log.info("re-sending undelivered terminal frames count=%d", len(undelivered))
        self.hooks.on_authenticated()
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                if self._closing_code is not None:  # a reconnect came while this one started
                    self._writer_close_code = self._closing_code
                    self.outbound.finish()
                group.start_soon(self._writer, ws, group.cancel_scope)
                group.start_soon(self._reader, ws, group.cancel_scope)
                group.start_soon(self._heartbeats)
        finally:
            self._group = None
            self.sink.connection_lost()

    def _end_of(self, ws: ClientConnection) -> Fault | None:
        """Whose fault the end of a connection that closed without an exception was."""
        if self.core.state is State.CLOSING:
            return None  # we closed it (stop or reconnect)
        return classify_close(close_code_received(ws))

    async def _writer(self, ws: ClientConnection, scope: anyio.CancelScope) -> None:
        """The one sender. Ends the session when the lanes finish (graceful stop) or the socket
        fails. While it waits for frames it lends the lanes `send_now` (a job's first bytes)."""
        writing = False

        def send_now(frames: list[str]) -> bool:
            return not writing and write_at_once(ws, frames)

        self.outbound.attach(send_now)
        try:
            async for batch in self.outbound.batches(self.timings.write_spacing_s):
                if not write_at_once(ws, batch.frames):
                    writing = True
                    await send_all(ws, batch.frames)
                    writing = False
                if batch.terminal_ids:
                    for action in self.core.handle(Written(tuple(batch.terminal_ids))):
                        await self._perform(action, ws)
            code = self._writer_close_code
            await ws.close(code, "going away" if code == CLOSE_GOING_AWAY else "reconnecting")
        except ConnectionClosed:
            pass  # the reader or `_end_of` says why
        finally:
            self.outbound.attach(None)
            scope.cancel()

    async def _reader(self, ws: ClientConnection, scope: anyio.CancelScope) -> None:
        """Ends the session when the socket closes; no inbound frame can end it otherwise."""
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    log.debug("binary frame ignored bytes=%d", len(message))
                    continue
                for action in self.core.handle(Received(decode(message), self.clock())):
                    await self._perform(action, ws)
                # Let what this frame started (a job's upstream request) run before the next
                # frame: a burst of jobs then reaches the backends staggered, not in one clump.
                await anyio.lowlevel.checkpoint()
        except ConnectionClosed:
            pass
        finally:
            scope.cancel()

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(self.hooks.heartbeat_interval_s())
            self.outbound.control("heartbeat", encode(self.hooks.heartbeat()))

    # --- carrying out the core's actions ---------------------------------------------------------

    async def _perform(self, action: Action, ws: ClientConnection) -> None:
        match action:
            case SendFrame(frame=frame):
                await ws.send(encode(frame))
            case StoreProviderId(provider_id=provider_id):
                try:
                    stored = await anyio.to_thread.run_sync(
                        self._identity.save_provider_id, provider_id
                    )
                except Exception as exc:
                    raise LocalFault(
                        "cannot store the provider_id in the identity file", exc
                    ) from exc
                if stored:
                    log.info("provider_id stored provider_id=%s", provider_id)
            case Authenticated(provider_id=provider_id):
                log.info("authenticated to coordinator provider_id=%s", provider_id)
            case DeliverJob(job=job):
                self.sink.submit(job)
            case DeliverCancel(job_id=job_id):
                self.sink.cancel(job_id)
            case RejectJob(job_id=job_id, reason=reason, code=code):
                self.sink.reject(job_id, reason, code)
            case Ignore():
                self._log_ignored(action)
            case Ping(token=token):
                waiter = await ws.ping()
                if self._group is not None:
                    self._group.start_soon(self._await_pong, waiter, token, ws)
            case Confirmed(job_ids=job_ids):
                if self._group is not None:
                    self._group.start_soon(self._confirm, job_ids)
                else:
                    await self.sink.confirmed(job_ids)
            case Close(code=code):
                self._writer_close_code = code  # the writer flushes, then closes with it
                self.outbound.finish()
            case Fail(fault=fault):
                if "auth_failed" in fault.detail:
                    log.warning("coordinator refused the handshake: %s", fault.detail)
                raise SessionFailure(fault)

    async def _confirm(self, job_ids: tuple[str, ...]) -> None:
        await self.sink.confirmed(job_ids)

    def _log_ignored(self, ignored: Ignore) -> None:
        if ignored.throttled:
            held = self._unanswerable_jobs.due(self.clock())
            if held is not None:
                log.warning("%s (and %d more since the last line)", ignored.reason, held)
        elif ignored.loud:
            log.warning("%s", ignored.reason)
        else:
            log.debug("inbound ignored: %s", ignored.reason)

    async def _await_pong(self, waiter: Awaitable[float], token: int, ws: ClientConnection) -> None:
        try:
            await waiter
        except ConnectionClosed:
            return  # unconfirmed: the outbox re-sends after the next auth_ok
        for action in self.core.handle(Ponged(token)):
            await self._perform(action, ws)

    def _close_soon(self, action: Action) -> None:
        """Close the connection from outside its tasks (a stop or reconnect request)."""
        if not isinstance(action, Close):
            return
        if self._ws is not None and self._group is not None:
            self._writer_close_code = action.code  # the writer flushes, then closes with it
            self.outbound.finish()
        elif self._handshake_scope is not None:
            self._closing_code = action.code  # `_one_connection` closes once the handshake stops
            self._handshake_scope.cancel()
        elif self._run_scope is not None and self.core.state is State.CLOSING:
            self._closing_code = action.code

    def _log_wait(self, redial: Redial, delay_s: float) -> None:
        fault = redial.fault
        if fault is None:
            log.info("reconnecting now")
        elif fault.kind is FaultKind.PLANNED:
            log.info("coordinator restarting: reconnect in %.3fs (%s)", delay_s, fault.detail)
        else:
            log.warning(
                "coordinator connection attempt=%d ended fault=%s cause=%s next_delay_s=%.3f",
                self.core.attempts,
                fault.kind.value,
                fault.detail,
                delay_s,
            )
