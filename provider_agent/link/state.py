"""Pure core of the coordinator link: a state machine fed with events and `now`, answering with
actions; plus the handshake steps, inbound dispatch and the reconnect policy.

`session.py` does the I/O and asks this module what to do; nothing here touches a socket or a
clock, so every rule is tested with plain events (an injected `now`, no sleeps).

The states and what moves between them (h11's style: `TRANSITIONS` is the table, every state
change there is; the handlers only decide the actions and the outcome: ok, failed, stopped):

    IDLE ──Dial──▶ CONNECTING ──Opened──▶ AWAIT_CHALLENGE ──Received──▶ AWAIT_AUTH
      ▲                                                                    │ Received (auth_ok)
      └──────────── Ended (any connected state; a Redial says how it ended) ◀── AUTHENTICATED
    Stop: from IDLE/CONNECTING straight to STOPPED; from a connected state to CLOSING, then
    Ended → STOPPED. Reconnect: from a connected state to CLOSING, then Ended → IDLE, no wait.

Rules (protocol.md §1, §4–§7; the issues' reconnect policy):
- The first meaningful frame must be `auth_challenge`; our answer signs the DECODED nonce and
  carries the enrollment code only while no provider_id is stored.
- After our answer, `auth_ok` (→ provider_id, stored when new) or `auth_failed` (→ back off and
  retry); anything else is a pre-auth failure, the coordinator's fault.
- Inbound frames after auth never end the session: each maps to one typed inbound action
  (DeliverJob, DeliverCancel, RejectJob, Ignore; a `job_ack` confirms delivery).
- Delivery: terminal frames written are confirmed by the pong to a ping sent right after them, or
  by `job_ack` — and once a coordinator has sent one `job_ack` in a session, only `job_ack`.
- Backoff (`ReconnectPolicy.delay_after(redial)`, asked by the session's tenacity wait): full
  jitter, exponential from `base_s`, capped at `cap_s`, forever. A session that stayed
  authenticated for `healthy_after_s` resets it; a connect-then-drop flap escalates it. A close
  with 1001/1012 from the coordinator is a planned cycle: 0–2 s, no escalation. A local fault
  (our disk, a bug) waits at least `local_fault_s`: redialling cannot fix it. A reconnect we
  asked for redials at once and resets the backoff.
"""

from __future__ import annotations

import base64
import binascii
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Protocol

from provider_agent.errors import (
    AuthFailed,
    CoordinatorError,
    Fault,
    FaultKind,
    InvalidTransition,
)
from provider_agent.link.protocol import (
    AuthChallenge,
    AuthOk,
    AuthResponse,
    BadFrame,
    ConfigUpdate,
    Frame,
    Job,
    JobAck,
    JobCancel,
    UnknownFrame,
)
from provider_agent.link.protocol import AuthFailed as AuthFailedFrame


class Signer(Protocol):
    """What the handshake needs of the identity (`identity.Identity` is one)."""

    @property
    def public_key_b64(self) -> str: ...

    @property
    def provider_id(self) -> str | None: ...

    def sign(self, nonce: bytes) -> str: ...


def answer_challenge(
    frame: Frame | UnknownFrame | BadFrame,
    signer: Signer,
    agent_version: str,
    enrollment_code: str | None,
) -> AuthResponse:
    """The `auth_response` to the coordinator's first frame; CoordinatorError if it is not a
    usable `auth_challenge`."""
    if not isinstance(frame, AuthChallenge):
        raise CoordinatorError(f"expected auth_challenge, got {_describe(frame)}")
    try:
        nonce = base64.b64decode(frame.nonce, validate=True)
    except (binascii.Error, ValueError):
        raise CoordinatorError("auth_challenge nonce is not base64") from None
    if not nonce:
        raise CoordinatorError("auth_challenge nonce is empty")
    return AuthResponse(
        pubkey=signer.public_key_b64,
        signature=signer.sign(nonce),
        agent_version=agent_version,
        enrollment_code=enrollment_code if signer.provider_id is None else None,
    )


def auth_outcome(frame: Frame | UnknownFrame | BadFrame) -> str:
    """The provider_id from `auth_ok`; AuthFailed for `auth_failed`; CoordinatorError otherwise."""
    if isinstance(frame, AuthOk):
        return frame.provider_id
    if isinstance(frame, AuthFailedFrame):
        raise AuthFailed(frame.reason or "no reason given")
    raise CoordinatorError(f"expected auth_ok or auth_failed, got {_describe(frame)}")


def _describe(frame: Frame | UnknownFrame | BadFrame) -> str:
    if isinstance(frame, BadFrame):
        return f"a malformed frame ({frame.reason})"
    return f"a {frame.type!r} frame"


# Inbound actions: what one frame after auth asks of the agent (the session hands each to its
# `InboundSink`); typed, so that a new kind of frame cannot be dispatched by a misspelt string.


@dataclass(frozen=True)
class DeliverJob:
    job: Job


@dataclass(frozen=True)
class DeliverCancel:
    job_id: str


@dataclass(frozen=True)
class RejectJob:
    """A `job` whose job_id can be answered but whose fields cannot be served (protocol.md §8)."""

    job_id: str
    reason: str
    code: Literal["bad_request", "unsupported_format"] = "bad_request"


@dataclass(frozen=True)
class Acked:
    """`job_ack`: the coordinator holds this job's terminal frame."""

    job_id: str


@dataclass(frozen=True)
class Ignore:
    """Nothing to do but say so: surprises (`loud`) are warnings, known no-ops debug lines; a
    `job` that cannot be answered (no readable job_id) is `throttled`: at most one line per 10 s
    for all such frames (protocol.md §8), so a flood of them cannot flood the log."""

    reason: str
    loud: bool = False
    throttled: bool = False


Inbound = DeliverJob | DeliverCancel | RejectJob | Acked | Ignore


def dispatch(frame: Frame | UnknownFrame | BadFrame) -> Inbound:
    """Map a decoded inbound frame to its action. Total: never raises, never ends the session."""
    if isinstance(frame, Job):
        return DeliverJob(frame)
    if isinstance(frame, JobCancel):
        return DeliverCancel(frame.job_id)
    if isinstance(frame, JobAck):
        return Acked(frame.job_id)
    if isinstance(frame, BadFrame):
        if frame.type == "job" and frame.job_id is not None:
            return RejectJob(frame.job_id, frame.reason, frame.code)
        return Ignore(
            f"malformed frame dropped: {frame.reason}", loud=True, throttled=frame.type == "job"
        )
    if isinstance(frame, UnknownFrame | ConfigUpdate):
        return Ignore(f"{frame.type} ignored")
    return Ignore(f"unexpected {frame.type} after auth", loud=True)


@dataclass
class ReconnectPolicy:
    """Exponential backoff with full jitter; reset only by a session that proved healthy."""

    base_s: float = 1.0
    cap_s: float = 60.0
    healthy_after_s: float = 30.0
    #: The least wait after a local fault (disk, a bug): redialling at once cannot fix those.
    local_fault_s: float = 30.0
    #: A planned cycle (coordinator closed with 1001/1012) redials after uniform(0, this).
    planned_spread_s: float = 2.0
    #: Failed or short-lived sessions since the last healthy one.
    failures: int = 0
    #: The jitter's source; tests pass a seeded one.
    rng: random.Random = field(default_factory=random.Random)

    def session_ended(self, authenticated_at: float | None, ended_at: float) -> None:
        """Record how a session ended: healthy (reset) or not (escalate)."""
        healthy = (
            authenticated_at is not None and ended_at - authenticated_at >= self.healthy_after_s
        )
        self.failures = 0 if healthy else self.failures + 1

    def ceiling_s(self) -> float:
        """The upper bound of the next delay; 0 right after a healthy session."""
        if self.failures == 0:
            return 0.0
        return min(self.cap_s, self.base_s * 2.0 ** (self.failures - 1))

    def next_delay_s(self) -> float:
        """Full jitter: uniform in [0, ceiling] (spreads a fleet's reconnects after an outage)."""
        return self.rng.uniform(0.0, self.ceiling_s())

    def delay_after(self, redial: Redial) -> float:
        """How long to wait before dialling again after the connection `redial` describes, and
        record it: a requested reconnect redials at once and resets; a planned cycle waits
        0–`planned_spread_s` and leaves the backoff as it was; anything else resets (a healthy
        session) or escalates it, then a local fault waits at least `local_fault_s`."""
        if redial.requested:
            self.failures = 0
            return 0.0
        fault = redial.fault
        if fault is not None and fault.kind is FaultKind.PLANNED:
            return self.rng.uniform(0.0, self.planned_spread_s)
        self.session_ended(redial.authenticated_at, redial.ended_at)
        delay = self.next_delay_s()
        if fault is not None and fault.kind is FaultKind.LOCAL:
            delay = max(delay, self.local_fault_s)
        return delay


# --- whose fault a failure is --------------------------------------------------------------------


# --- the state machine ---------------------------------------------------------------------------


class State(Enum):
    IDLE = "idle"  # not connected: before the first dial, or waiting out a backoff
    CONNECTING = "connecting"
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_AUTH = "await_auth"
    AUTHENTICATED = "authenticated"
    CLOSING = "closing"
    STOPPED = "stopped"


# Events: plain frozen data, `now` in monotonic seconds where time matters.


@dataclass(frozen=True)
class Dial:
    now: float


@dataclass(frozen=True)
class Opened:
    now: float


@dataclass(frozen=True)
class Received:
    frame: Frame | UnknownFrame | BadFrame
    now: float


@dataclass(frozen=True)
class Ended:
    """The connection is gone (or the dial failed); `fault` is None for a close we asked for."""

    fault: Fault | None
    now: float


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Reconnect:
    pass


@dataclass(frozen=True)
class Written:
    """The writer handed these terminal frames to the socket."""

    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class Ponged:
    token: int


Event = Dial | Opened | Received | Ended | Stop | Reconnect | Written | Ponged


# Actions: what the I/O layer must do, in order.


@dataclass(frozen=True)
class Send:
    frame: AuthResponse


@dataclass(frozen=True)
class StoreProviderId:
    provider_id: str


@dataclass(frozen=True)
class Authenticated:
    provider_id: str


@dataclass(frozen=True)
class Ping:
    token: int


@dataclass(frozen=True)
class Confirmed:
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class Close:
    """Close the socket with this code (1001 when stopping: flush what waits first)."""

    code: int


@dataclass(frozen=True)
class Fail:
    fault: Fault


@dataclass(frozen=True)
class Redial:
    """The connection is gone and the session goes on: dial again after
    `ReconnectPolicy.delay_after(this)`. What the policy needs to decide how long, nothing more."""

    #: Whose fault the end was; None for a close of ours (always None when `requested`).
    fault: Fault | None
    #: When the connection authenticated (None: it never did) and when it ended, monotonic.
    authenticated_at: float | None
    ended_at: float
    #: `reconnect()` asked for it: dial again at once.
    requested: bool = False


Action = (
    Send
    | StoreProviderId
    | Authenticated
    | DeliverJob
    | DeliverCancel
    | RejectJob
    | Ignore
    | Ping
    | Confirmed
    | Close
    | Fail
    | Redial
)

_CONNECTED = (State.CONNECTING, State.AWAIT_CHALLENGE, State.AWAIT_AUTH, State.AUTHENTICATED)
_OPEN = (State.AWAIT_CHALLENGE, State.AWAIT_AUTH, State.AUTHENTICATED)

#: How handling an event went: as planned, the connection failed (a wrong handshake frame), or it
#: ended while the session is stopping.
Outcome = Literal["ok", "failed", "stopped"]

_NORMAL: dict[tuple[State, type[Event]], State] = {
    (State.IDLE, Dial): State.CONNECTING,
    (State.IDLE, Stop): State.STOPPED,
    (State.IDLE, Reconnect): State.IDLE,
    (State.CONNECTING, Opened): State.AWAIT_CHALLENGE,
    (State.CONNECTING, Stop): State.STOPPED,
    (State.AWAIT_CHALLENGE, Received): State.AWAIT_AUTH,
    (State.AWAIT_AUTH, Received): State.AUTHENTICATED,
    (State.AUTHENTICATED, Received): State.AUTHENTICATED,
    (State.AUTHENTICATED, Written): State.AUTHENTICATED,
    (State.AUTHENTICATED, Ponged): State.AUTHENTICATED,
    (State.CLOSING, Opened): State.CLOSING,
    (State.CLOSING, Received): State.CLOSING,
    (State.CLOSING, Written): State.CLOSING,
    (State.CLOSING, Ponged): State.CLOSING,
    (State.CLOSING, Stop): State.CLOSING,
    (State.CLOSING, Reconnect): State.CLOSING,
    (State.CLOSING, Ended): State.IDLE,
    (State.STOPPED, Stop): State.STOPPED,
    (State.STOPPED, Ended): State.STOPPED,
    **{(s, Ended): State.IDLE for s in _CONNECTED},
    **{(s, Stop): State.CLOSING for s in _OPEN},
    **{(s, Reconnect): State.CLOSING for s in (*_OPEN, State.CONNECTING)},
}

#: The transition table, every state change there is: (state, event type, outcome) → next state.
#: A (state, event type) pair that is missing is a bug in the I/O layer (it fed an event the
#: state cannot have), raised as `InvalidTransition`.
TRANSITIONS: dict[tuple[State, type[Event], Outcome], State] = {
    **{(state, event, "ok"): target for (state, event), target in _NORMAL.items()},
    # A handshake frame that is not the one expected fails the connection: close it.
    (State.AWAIT_CHALLENGE, Received, "failed"): State.CLOSING,
    (State.AWAIT_AUTH, Received, "failed"): State.CLOSING,
    # A connection that ends while the session is stopping ends the session.
    **{(s, Ended, "stopped"): State.STOPPED for s in (*_CONNECTED, State.CLOSING, State.STOPPED)},
}


class SessionCore:
    """The coordinator link's decisions. Feed events with `handle()`; do the actions returned.
    How long to wait before a redial is not its decision but `ReconnectPolicy`'s."""

    def __init__(
        self,
        signer: Signer,
        agent_version: str,
        enrollment_code: Callable[[], str | None],
    ) -> None:
        self.signer = signer
        self.agent_version = agent_version
        self.enrollment_code = enrollment_code
        self.state = State.IDLE
        self.provider_id: str | None = None
        self.attempts = 0
        self.authenticated_at: float | None = None
        self._stopping = False
        self._reconnecting = False
        self._acks_seen = False
        self._next_token = 0
        self._awaiting_pong: dict[int, tuple[str, ...]] = {}

    @property
    def stopping(self) -> bool:
        return self._stopping

    def handle(self, event: Event) -> list[Action]:
        """Apply one event: decide what to do, then move along the table."""
        if (self.state, type(event)) not in _NORMAL:
            raise InvalidTransition(f"{type(event).__name__} in state {self.state.value}")
        actions, outcome = self._actions(self.state, event)
        self.state = TRANSITIONS[(self.state, type(event), outcome)]
        return actions

    def _actions(self, state: State, event: Event) -> tuple[list[Action], Outcome]:
        match event:
            case Dial():
                self.attempts += 1
                self._reconnecting = False
                return [], "ok"
            case Opened():
                return [], "ok"
            case Received():
                return self._received(state, event)
            case Written(job_ids=job_ids):
                return self._written(job_ids), "ok"
            case Ponged(token=token):
                job_ids = self._awaiting_pong.pop(token, ())
                return ([Confirmed(job_ids)] if job_ids and not self._acks_seen else []), "ok"
            case Stop():
                self._stopping = True
                return ([Close(1001)] if state in _OPEN else []), "ok"
            case Reconnect():
                self._reconnecting = state in (*_OPEN, State.CONNECTING, State.CLOSING)
                return ([Close(1000)] if state in _OPEN else []), "ok"
            case Ended():
                return self._ended(event)
        raise InvalidTransition(f"unhandled {type(event).__name__}")

    def _received(self, state: State, event: Received) -> tuple[list[Action], Outcome]:
        if state is State.AWAIT_CHALLENGE:
            try:
                answer = answer_challenge(
                    event.frame, self.signer, self.agent_version, self.enrollment_code()
                )
            except CoordinatorError as exc:
                return self._fail(FaultKind.COORDINATOR, str(exc))
            return [Send(answer)], "ok"
        if state is State.AWAIT_AUTH:
            try:
                provider_id = auth_outcome(event.frame)
            except AuthFailed as exc:
                return self._fail(FaultKind.COORDINATOR, f"auth_failed: {exc}")
            except CoordinatorError as exc:
                return self._fail(FaultKind.COORDINATOR, str(exc))
            self.provider_id = provider_id
            self.authenticated_at = event.now
            self._acks_seen = False
            self._awaiting_pong.clear()
            store: list[Action] = (
                [StoreProviderId(provider_id)] if self.signer.provider_id != provider_id else []
            )
            return [*store, Authenticated(provider_id)], "ok"
        if state is State.CLOSING:
            return [], "ok"
        inbound = dispatch(event.frame)
        if isinstance(inbound, Acked):
            self._acks_seen = True
            return [Confirmed((inbound.job_id,))], "ok"
        return [inbound], "ok"

    def _written(self, job_ids: tuple[str, ...]) -> list[Action]:
        if not job_ids or self._acks_seen:
            return []
        token = self._next_token
        self._next_token += 1
        self._awaiting_pong[token] = job_ids
        return [Ping(token)]

    def _fail(self, kind: FaultKind, detail: str) -> tuple[list[Action], Outcome]:
        return [Fail(Fault(kind, detail))], "failed"

    def _ended(self, event: Ended) -> tuple[list[Action], Outcome]:
        self._awaiting_pong.clear()
        authenticated_at, self.authenticated_at = self.authenticated_at, None
        if self._stopping:
            return [], "stopped"
        if self._reconnecting:
            self._reconnecting = False
            return [Redial(None, authenticated_at, event.now, requested=True)], "ok"
        return [Redial(event.fault, authenticated_at, event.now)], "ok"
