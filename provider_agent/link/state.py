"""Pure core of the coordinator link: a state machine fed with events and `now`, answering with
actions; plus the handshake steps, inbound dispatch, the reconnect policy and `classify(exc)`.

`session.py` does the I/O and asks this module what to do; nothing here touches a socket or a
clock, so every rule is tested with plain events (an injected `now`, no sleeps).

The states and what moves between them (h11's style: `TRANSITIONS` is the table, the handlers
only add actions and may divert to a failure):

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
- Inbound frames after auth never end the session: each maps to one `Inbound` action.
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
import errno
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Protocol

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from provider_agent.errors import AgentError, AuthFailed, BackendError, CoordinatorError
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


@dataclass(frozen=True)
class Inbound:
    """What the session does with one inbound frame after auth."""

    action: Literal["job", "cancel", "ack", "reject_job", "ignore"]
    job: Job | None = None
    job_id: str | None = None
    reason: str = ""
    #: Log level for `ignore`: surprises are warnings, known no-ops are debug.
    loud: bool = False
    #: What a `reject_job` is answered with.
    code: Literal["bad_request", "unsupported_format"] = "bad_request"
    #: A `job` that cannot be answered (no readable job_id): logged at most once per 10 s
    #: for all such frames (protocol.md §8), so a flood of them cannot flood the log.
    throttled: bool = False


def dispatch(frame: Frame | UnknownFrame | BadFrame) -> Inbound:
    """Map a decoded inbound frame to its action. Total: never raises, never ends the session."""
    if isinstance(frame, Job):
        return Inbound("job", job=frame, job_id=frame.job_id)
    if isinstance(frame, JobCancel):
        return Inbound("cancel", job_id=frame.job_id)
    if isinstance(frame, JobAck):
        return Inbound("ack", job_id=frame.job_id)
    if isinstance(frame, BadFrame):
        if frame.type == "job" and frame.job_id is not None:
            return Inbound("reject_job", job_id=frame.job_id, reason=frame.reason, code=frame.code)
        return Inbound(
            "ignore",
            reason=f"malformed frame dropped: {frame.reason}",
            loud=True,
            throttled=frame.type == "job",
        )
    if isinstance(frame, UnknownFrame | ConfigUpdate):
        return Inbound("ignore", reason=f"{frame.type} ignored")
    return Inbound("ignore", reason=f"unexpected {frame.type} after auth", loud=True)


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


class FaultKind(Enum):
    NETWORK = "network"  # retry with backoff
    COORDINATOR = "coordinator"  # retry with backoff; logged as the coordinator's doing
    PLANNED = "planned"  # the coordinator restarts (close 1001/1012): redial soon, no escalation
    LOCAL = "local"  # ours: disk, identity file, a bug; logged loudly, never blamed on the network


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    detail: str


class LocalFault(Exception):
    """Wraps a failure of our own side met while serving a session (e.g. storing the
    provider_id), so that `classify` never mistakes a full disk for a network problem."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {cause}")
        self.cause = cause


class SessionFailure(Exception):
    """The core decided this connection failed (wrong frame, auth_failed)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.detail)
        self.fault = fault


#: errno values that mean the local machine, not the network, is in trouble.
_LOCAL_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EMFILE}
)
PLANNED_CLOSE_CODES = frozenset({1001, 1012})


def classify(exc: BaseException) -> Fault:
    """Whose fault one failed connection is, from the exception that ended it."""
    if isinstance(exc, SessionFailure):
        return exc.fault
    if isinstance(exc, LocalFault):
        return Fault(FaultKind.LOCAL, str(exc))
    if isinstance(exc, ConnectionClosed):
        return classify_close(exc.rcvd.code if exc.rcvd is not None else None)
    if isinstance(exc, CoordinatorError | InvalidHandshake):
        return Fault(FaultKind.COORDINATOR, _text(exc))
    if isinstance(exc, InvalidURI):
        return Fault(FaultKind.LOCAL, f"coordinator url is not usable: {exc}")
    if isinstance(exc, TimeoutError):
        return Fault(FaultKind.NETWORK, "timed out")
    if isinstance(exc, socket.gaierror):
        return Fault(FaultKind.NETWORK, f"cannot resolve the coordinator's host ({exc.strerror})")
    if isinstance(exc, ConnectionError | BackendError):
        return Fault(FaultKind.NETWORK, f"cannot connect ({_text(exc)})")
    if isinstance(exc, OSError):
        if exc.errno in _LOCAL_ERRNOS or isinstance(
            exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | FileExistsError
        ):
            return Fault(FaultKind.LOCAL, f"local I/O failed ({_text(exc)})")
        return Fault(FaultKind.NETWORK, f"cannot connect ({_text(exc)})")
    if isinstance(exc, AgentError):
        return Fault(FaultKind.LOCAL, _text(exc))
    return Fault(FaultKind.LOCAL, f"internal error ({type(exc).__name__}: {exc})")


def classify_close(code: int | None) -> Fault:
    """A connection that ended with this close code from the coordinator (None: no close frame)."""
    if code in PLANNED_CLOSE_CODES:
        return Fault(FaultKind.PLANNED, f"coordinator restarting (close code {code})")
    if code is None:
        return Fault(FaultKind.NETWORK, "connection lost (no close frame)")
    return Fault(FaultKind.COORDINATOR, f"coordinator closed the connection (code {code})")


def _text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


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
class Deliver:
    inbound: Inbound


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


Action = Send | StoreProviderId | Authenticated | Deliver | Ping | Confirmed | Close | Fail | Redial

_CONNECTED = (State.CONNECTING, State.AWAIT_CHALLENGE, State.AWAIT_AUTH, State.AUTHENTICATED)
_OPEN = (State.AWAIT_CHALLENGE, State.AWAIT_AUTH, State.AUTHENTICATED)

#: The transition table: (state, event type) → next state. A pair that is missing is a bug in the
#: I/O layer (it fed an event the state cannot have), raised as `InvalidTransition`.
TRANSITIONS: dict[tuple[State, type[Event]], State] = {
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


class InvalidTransition(Exception):
    """The I/O layer fed an event the current state cannot have (a bug, not bad input)."""


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
        """Apply one event: move along the table, return what to do."""
        target = TRANSITIONS.get((self.state, type(event)))
        if target is None:
            raise InvalidTransition(f"{type(event).__name__} in state {self.state.value}")
        previous, self.state = self.state, target
        return self._actions(previous, event)

    def _actions(self, previous: State, event: Event) -> list[Action]:
        match event:
            case Dial():
                self.attempts += 1
                self._reconnecting = False
                return []
            case Opened():
                return []
            case Received():
                return self._received(previous, event)
            case Written(job_ids=job_ids):
                return self._written(job_ids)
            case Ponged(token=token):
                job_ids = self._awaiting_pong.pop(token, ())
                return [Confirmed(job_ids)] if job_ids and not self._acks_seen else []
            case Stop():
                self._stopping = True
                return [Close(1001)] if previous in _OPEN else []
            case Reconnect():
                self._reconnecting = previous in (*_OPEN, State.CONNECTING, State.CLOSING)
                return [Close(1000)] if previous in _OPEN else []
            case Ended():
                return self._ended(event)
        raise InvalidTransition(f"unhandled {type(event).__name__}")

    def _received(self, previous: State, event: Received) -> list[Action]:
        if previous is State.AWAIT_CHALLENGE:
            try:
                answer = answer_challenge(
                    event.frame, self.signer, self.agent_version, self.enrollment_code()
                )
            except CoordinatorError as exc:
                return self._fail(FaultKind.COORDINATOR, str(exc))
            return [Send(answer)]
        if previous is State.AWAIT_AUTH:
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
            return [*store, Authenticated(provider_id)]
        if previous is State.CLOSING:
            return []
        inbound = dispatch(event.frame)
        if inbound.action == "ack" and inbound.job_id is not None:
            self._acks_seen = True
            return [Confirmed((inbound.job_id,))]
        return [Deliver(inbound)]

    def _written(self, job_ids: tuple[str, ...]) -> list[Action]:
        if not job_ids or self._acks_seen:
            return []
        token = self._next_token
        self._next_token += 1
        self._awaiting_pong[token] = job_ids
        return [Ping(token)]

    def _fail(self, kind: FaultKind, detail: str) -> list[Action]:
        self.state = State.CLOSING
        return [Fail(Fault(kind, detail))]

    def _ended(self, event: Ended) -> list[Action]:
        self._awaiting_pong.clear()
        authenticated_at, self.authenticated_at = self.authenticated_at, None
        if self._stopping:
            self.state = State.STOPPED
            return []
        if self._reconnecting:
            self._reconnecting = False
            return [Redial(None, authenticated_at, event.now, requested=True)]
        return [Redial(event.fault, authenticated_at, event.now)]
