"""A bare `Session` (no Daemon, no executor) against a scripted coordinator, for link tests.

`SessionPair` runs the session in a task group of the test and a websockets server on loopback
whose every connection does the real handshake (challenge, signature check, `auth_ok`) and is
then handed to the test as a `Peer`: the test sends any frame, reads what the agent sent, closes
with any code. What the session hands its `InboundSink` lands in a `RecordingSink`, which the
test awaits (`wait_for`): nothing here synchronises by sleeping.

    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        await peer.send(Job(job_id="j-1", model_id="m", request={}))
        job = await pair.sink.job("j-1")
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Literal

import anyio
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode
from websockets.protocol import Event as WireEvent

from provider_agent import __version__
from provider_agent.clock import Timings
from provider_agent.errors import Fault
from provider_agent.link.identity import Identity, load_or_create
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import (
    AuthChallenge,
    AuthOk,
    AuthResponse,
    BadFrame,
    Capabilities,
    CapabilityLimits,
    CapabilityMetadata,
    Frame,
    Heartbeat,
    Job,
    UnknownFrame,
    decode,
    encode,
)
from provider_agent.link.protocol import AuthFailed as AuthFailedFrame
from provider_agent.link.session import Session, SessionHooks
from provider_agent.link.state import ReconnectPolicy

#: Every wait of a test on the pair is bounded by this (seconds): a broken session fails, it
#: never hangs the suite.
STEP_S = 5.0
#: Small deadlines; keepalive pings off in effect (a test that wants them passes its own), so
#: every ping a `Peer` counts is one the session sent to confirm terminal frames.
PAIR_TIMINGS = Timings(ping_interval_s=60.0, ping_timeout_s=5.0, handshake_timeout_s=2.0)


def fast_policy() -> ReconnectPolicy:
    """Quick, seeded backoff; a planned cycle (1001/1012) redials within 20 ms, not 2 s."""
    return ReconnectPolicy(base_s=0.02, cap_s=0.2, planned_spread_s=0.02, rng=random.Random(1))


def plain_capabilities() -> Capabilities:
    return Capabilities(
        models=[],
        limits=CapabilityLimits(max_concurrent_total=1, max_tokens_per_minute=None),
        metadata=CapabilityMetadata(agent_version=__version__),
    )


def plain_heartbeat() -> Heartbeat:
    return Heartbeat(
        queue_depth=0,
        tokens_per_sec_p50=0,
        p50_latency_ms=0,
        p95_latency_ms=0,
        error_rate_60s=0,
        last_error_at=None,
        last_error_code=None,
    )


Decoded = Frame | UnknownFrame | BadFrame
Outgoing = str | bytes | dict[str, object] | BaseModel


class RecordingSink:
    """An `InboundSink` that records every call, in order, and wakes whoever waits on it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.jobs: list[Job] = []
        self.cancels: list[str] = []
        self.rejects: list[tuple[str, str, str]] = []
        self.confirmations: list[tuple[str, ...]] = []
        self.lost = 0
        self._changed = anyio.Event()

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self._record("submit", job.job_id)

    def cancel(self, job_id: str) -> None:
        self.cancels.append(job_id)
        self._record("cancel", job_id)

    def reject(
        self, job_id: str, reason: str, code: Literal["bad_request", "unsupported_format"]
    ) -> None:
        self.rejects.append((job_id, reason, code))
        self._record("reject", job_id)

    async def confirmed(self, job_ids: Sequence[str]) -> None:
        self.confirmations.append(tuple(job_ids))
        self._record("confirmed", tuple(job_ids))

    def connection_lost(self) -> None:
        self.lost += 1
        self._record("connection_lost", self.lost)

    @property
    def confirmed_ids(self) -> list[str]:
        """Every confirmed job id, in order, repeats included."""
        return [job_id for batch in self.confirmations for job_id in batch]

    def _record(self, kind: str, what: object) -> None:
        self.calls.append((kind, what))
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, predicate: Callable[[RecordingSink], object]) -> None:
        """Until `predicate(self)` holds (re-checked after every call the session makes)."""
        with anyio.fail_after(STEP_S):
            while not predicate(self):
                await self._changed.wait()

    async def job(self, job_id: str) -> Job:
        await self.wait_for(lambda s: any(j.job_id == job_id for j in s.jobs))
        return next(j for j in self.jobs if j.job_id == job_id)

    async def confirmation_of(self, *job_ids: str) -> None:
        await self.wait_for(lambda s: set(job_ids) <= set(s.confirmed_ids))


class CountingConnection(ServerConnection):
    """The server side of one connection; counts the pings the agent sent (websockets answers
    them itself, so a test sees them nowhere else)."""

    pings = 0

    def process_event(self, event: WireEvent) -> None:
        if isinstance(event, WireFrame) and event.opcode is Opcode.PING:
            self.pings += 1
        super().process_event(event)


class Peer:
    """One authenticated connection, seen from the coordinator's side."""

    def __init__(self, ws: CountingConnection, number: int, hello: AuthResponse) -> None:
        self.ws = ws
        #: 1 for the first authenticated connection of the pair, 2 for the next, …
        self.number = number
        #: The `auth_response` it authenticated with.
        self.hello = hello

    @property
    def pings(self) -> int:
        """Pings the agent sent on this connection so far."""
        return self.ws.pings

    async def send(self, frame: Outgoing) -> None:
        """A frame as given: text and bytes verbatim (garbage included), a dict as JSON, a
        pydantic frame as its JSON without None-valued fields."""
        if isinstance(frame, BaseModel):
            frame = orjson.dumps(frame.model_dump(mode="json", exclude_none=True)).decode()
        elif isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.ws.send(frame)

    async def recv(self) -> Decoded:
        """The next frame the agent sent, decoded (ConnectionClosed once it is gone)."""
        with anyio.fail_after(STEP_S):
            return decode(await self.ws.recv())

    async def recv_type(self, kind: str) -> Decoded:
        """The next frame of this type, skipping others (capabilities, heartbeats, …)."""
        while True:
            frame = await self.recv()
            if frame.type == kind:
                return frame

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    async def closed(self) -> int | None:
        """Wait for the connection's end; the close code the agent sent (1006: none)."""
        with anyio.fail_after(STEP_S):
            await self.ws.wait_closed()
        return self.ws.close_code

    def pause_reading(self) -> None:
        """Stop reading the socket: the agent's frames and pings wait in the buffers, unanswered."""
        self.ws.transport.pause_reading()

    def resume_reading(self) -> None:
        self.ws.transport.resume_reading()


class ScriptedCoordinator:
    """The server: every connection gets a fresh `auth_challenge`; an `auth_response` whose
    signature verifies against the agent's own key gets `auth_ok` (or `auth_failed` while
    `refuse` is above 0), and the connection then goes to the test as a `Peer`."""

    def __init__(self, public_key_b64: str, provider_id: str) -> None:
        self.public_key_b64 = public_key_b64
        self.provider_id = provider_id
        #: Every `auth_response` received, refused ones included.
        self.handshakes: list[AuthResponse] = []
        #: The next this many handshakes are answered `auth_failed`.
        self.refuse = 0
        #: What the agent got wrong in a handshake; `SessionPair` fails the test on any.
        self.violations: list[str] = []
        self.authenticated = 0
        self._send_peer, self._peers = anyio.create_memory_object_stream[Peer](100)

    async def handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, CountingConnection)
        nonce = os.urandom(32)
        await ws.send(encode(AuthChallenge(nonce=base64.b64encode(nonce).decode())))
        answer = decode(await ws.recv())
        problem = self._check(answer, nonce)
        if problem is not None:
            self.violations.append(problem)
            await ws.close(1008, problem[:100])
            return
        assert isinstance(answer, AuthResponse)
        self.handshakes.append(answer)
        if self.refuse > 0:
            self.refuse -= 1
            await ws.send(encode(AuthFailedFrame(reason="not enrolled")))
            await ws.wait_closed()  # the agent closes a refused connection itself
            return
        await ws.send(encode(AuthOk(provider_id=self.provider_id)))
        self.authenticated += 1
        self._send_peer.send_nowait(Peer(ws, self.authenticated, answer))
        await ws.wait_closed()  # the test owns the connection now

    def _check(self, answer: Decoded, nonce: bytes) -> str | None:
        if not isinstance(answer, AuthResponse):
            return f"expected auth_response, got {answer!r}"
        if answer.pubkey != self.public_key_b64:
            return f"auth_response pubkey {answer.pubkey!r} is not the identity's"
        if answer.agent_version != __version__:
            return f"auth_response agent_version {answer.agent_version!r}"
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(answer.pubkey))
            key.verify(base64.b64decode(answer.signature), nonce)
        except (InvalidSignature, ValueError) as exc:
            return f"auth_response signature does not verify over the nonce ({exc!r})"
        return None

    async def peer(self) -> Peer:
        with anyio.fail_after(STEP_S):
            return await self._peers.receive()


class SessionPair:
    """A running bare `Session` and the scripted coordinator it is connected to.

    Leaving the block cancels the session if it still runs (a test that wants the graceful
    stop calls `session.close()` and awaits `stopped`), then fails the test if the agent got
    a handshake wrong."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        timings: Timings = PAIR_TIMINGS,
        policy: ReconnectPolicy | None = None,
        enrollment_code: str | None = None,
        capabilities: Callable[[], Capabilities] = plain_capabilities,
        heartbeat: Callable[[], Heartbeat] = plain_heartbeat,
        heartbeat_interval_s: float = 60.0,
        undelivered: Sequence[tuple[str, str]] = (),
        provider_id: str = "prov_pair",
    ) -> None:
        self.identity: Identity = load_or_create(tmp_path / "identity.key")
        self.coordinator = ScriptedCoordinator(self.identity.public_key_b64, provider_id)
        self.sink = RecordingSink()
        self.outbound = Outbound()
        self.policy = policy or fast_policy()
        #: `on_reconnect`'s argument for every ended connection the session will redial.
        self.faults: list[Fault | None] = []
        #: How many times `on_authenticated` was called.
        self.authentications = 0
        #: Set when `Session.run()` returned (after `close()`).
        self.stopped = anyio.Event()
        self._undelivered = list(undelivered)
        self._enrollment_code = enrollment_code
        self.url = ""
        self.session = Session(
            SessionHooks(
                url=lambda: self.url,
                enrollment_code=lambda: self._enrollment_code,
                heartbeat_interval_s=lambda: heartbeat_interval_s,
                capabilities=capabilities,
                heartbeat=heartbeat,
                on_authenticated=self._authenticated,
                undelivered=self._take_undelivered,
                on_reconnect=self.faults.append,
            ),
            self.identity,
            self.sink,
            self.outbound,
            policy=self.policy,
            timings=timings,
        )
        self._stack = AsyncExitStack()
        self._markers = 0

    async def __aenter__(self) -> SessionPair:
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(
                serve(
                    self.coordinator.handler,
                    "127.0.0.1",
                    0,
                    create_connection=CountingConnection,
                    compression=None,
                    close_timeout=1.0,
                )
            )
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/provider/connect"
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)  # on exit: stop the session first
            group.start_soon(self._run)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, traceback)
        assert not self.coordinator.violations, self.coordinator.violations

    async def peer(self) -> Peer:
        """The next connection that authenticates (the first one, then each redial's)."""
        return await self.coordinator.peer()

    async def written(self) -> None:
        """Until the writer has written everything queued so far and is done with it (the ping
        after a batch's terminal frames sent), whether or not the coordinator reads.

        Two marker chunks (`job_chunk` frames of a job named `~marker-N`, which the peer reads
        like any frame): the first leaves with or after what was queued; the second is taken
        only once the writer has finished the batch that carried the first."""
        for _ in range(2):
            self._markers += 1
            marker = f"~marker-{self._markers}"
            self.outbound.chunk(marker, b".")
            with anyio.fail_after(STEP_S):
                await self.outbound.sent_down_to(marker, 0)

    async def _run(self) -> None:
        await self.session.run()
        self.stopped.set()

    def _authenticated(self) -> None:
        self.authentications += 1

    async def _take_undelivered(self) -> list[tuple[str, str]]:
        """The outbox's undelivered frames: given to the first connection only (a real outbox
        would list them again until they are confirmed; the tests here want them once)."""
        taken, self._undelivered = self._undelivered, []
        return taken
