"""Pure core of the coordinator link: handshake steps, inbound dispatch, the reconnect policy.

`session.py` does the I/O and asks these functions what to do; they see plain data and `now`
and never touch a socket or a clock, so the rules are tested without a network or sleeps.

Rules (protocol.md §1, §4, §6; the issue's reconnect policy):
- The first meaningful frame must be `auth_challenge`; our answer signs the DECODED nonce and
  carries the enrollment code only while no provider_id is stored.
- After our answer, `auth_ok` (→ provider_id) or `auth_failed` (→ back off and retry); anything
  else is a pre-auth failure.
- Inbound frames after auth never end the session: each maps to one `Inbound` action.
- Backoff: full jitter, exponential from `base_s`, capped at `cap_s`, forever. A session that
  stayed authenticated for `healthy_after_s` resets it; a connect-then-drop flap escalates it.
"""

from __future__ import annotations

import base64
import binascii
import random
from dataclasses import dataclass, field
from typing import Literal, Protocol

from provider_agent.errors import AuthFailed, CoordinatorError
from provider_agent.protocol import (
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
from provider_agent.protocol import AuthFailed as AuthFailedFrame


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
            return Inbound("reject_job", job_id=frame.job_id, reason=frame.reason)
        return Inbound("ignore", reason=f"malformed frame dropped: {frame.reason}", loud=True)
    if isinstance(frame, UnknownFrame | ConfigUpdate):
        return Inbound("ignore", reason=f"{frame.type} ignored")
    return Inbound("ignore", reason=f"unexpected {frame.type} after auth", loud=True)


@dataclass
class ReconnectPolicy:
    """Exponential backoff with full jitter; reset only by a session that proved healthy."""

    base_s: float = 1.0
    cap_s: float = 60.0
    healthy_after_s: float = 30.0
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
