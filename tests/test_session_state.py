"""The session's pure core: handshake answers, inbound dispatch, reconnect policy."""

from __future__ import annotations

import base64
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.errors import AuthFailed, CoordinatorError
from provider_agent.protocol import AuthChallenge, AuthResponse, decode
from provider_agent.session_state import (
    TRANSITIONS,
    Authenticated,
    Close,
    Confirmed,
    Deliver,
    Dial,
    Ended,
    Fail,
    Fault,
    FaultKind,
    InvalidTransition,
    LocalFault,
    Opened,
    Ping,
    Ponged,
    Received,
    Reconnect,
    ReconnectPolicy,
    Send,
    SessionCore,
    SessionFailure,
    State,
    Stop,
    StoreProviderId,
    Wait,
    Written,
    answer_challenge,
    auth_outcome,
    classify,
    dispatch,
)


class Key:
    def __init__(self, provider_id: str | None = None) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.provider_id = provider_id
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()

    def sign(self, nonce: bytes) -> str:
        return base64.b64encode(self._key.sign(nonce)).decode()


def challenge(nonce: bytes = b"n" * 32) -> AuthChallenge:
    return AuthChallenge(nonce=base64.b64encode(nonce).decode())


def test_answer_signs_the_decoded_nonce_and_sends_enrollment_only_before_provider_id() -> None:
    key = Key()
    answer = answer_challenge(challenge(b"abc" * 11), key, "0.1.0", "POD-ENROLL-1")
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(answer.pubkey))
    public.verify(base64.b64decode(answer.signature), b"abc" * 11)
    assert answer.enrollment_code == "POD-ENROLL-1" and answer.agent_version == "0.1.0"
    enrolled = answer_challenge(challenge(), Key(provider_id="prov_1"), "0.1.0", "POD-ENROLL-1")
    assert enrolled.enrollment_code is None
    assert "enrollment_code" not in enrolled.model_dump(exclude_none=True)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"auth_ok","provider_id":"p"}',
        '{"type":"heartbeat"}',
        '{"type":"auth_challenge","nonce":"%%%"}',
        '{"type":"auth_challenge","nonce":""}',
        "garbage",
    ],
)
def test_wrong_first_frame_is_a_pre_auth_failure(text: str) -> None:
    with pytest.raises(CoordinatorError):
        answer_challenge(decode(text), Key(), "0.1.0", None)


def test_auth_outcome() -> None:
    assert auth_outcome(decode('{"type":"auth_ok","provider_id":"prov_9"}')) == "prov_9"
    with pytest.raises(AuthFailed, match="bad signature"):
        auth_outcome(decode('{"type":"auth_failed","reason":"bad signature"}'))
    with pytest.raises(CoordinatorError):
        auth_outcome(decode('{"type":"job_ack","job_id":"j"}'))


@pytest.mark.parametrize(
    ("text", "action", "job_id"),
    [
        ('{"type":"job","job_id":"j1","model_id":"m","request":{}}', "job", "j1"),
        ('{"type":"job_cancel","job_id":"j2"}', "cancel", "j2"),
        ('{"type":"job_ack","job_id":"j3"}', "ack", "j3"),
        ('{"type":"job","job_id":"j4","model_id":"m","request":"no"}', "reject_job", "j4"),
        ('{"type":"job","model_id":"m"}', "ignore", None),
        ('{"type":"config_update","x":1}', "ignore", None),
        ('{"type":"brand_new_thing"}', "ignore", None),
        ('{"type":"auth_ok","provider_id":"p"}', "ignore", None),
        ("[1,2]", "ignore", None),
    ],
)
def test_dispatch(text: str, action: str, job_id: str | None) -> None:
    inbound = dispatch(decode(text))
    assert (inbound.action, inbound.job_id) == (action, job_id)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_dispatch_is_total_on_garbage(data: str | bytes) -> None:
    assert dispatch(decode(data)).action in {"job", "cancel", "ack", "reject_job", "ignore"}


def test_backoff_escalates_caps_and_jitters_within_the_ceiling() -> None:
    policy = ReconnectPolicy(base_s=1, cap_s=60)
    ceilings = []
    for _ in range(9):
        policy.session_ended(authenticated_at=None, ended_at=0)
        ceilings.append(policy.ceiling_s())
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    policy.rng = random.Random(7)
    delays = [policy.next_delay_s() for _ in range(200)]
    assert all(0 <= d <= 60 for d in delays) and max(delays) > 30


def test_flap_after_auth_escalates_but_a_healthy_session_resets() -> None:
    policy = ReconnectPolicy(base_s=1, cap_s=60, healthy_after_s=30)
    for t in range(5):
        policy.session_ended(authenticated_at=float(t), ended_at=t + 0.1)  # connect-then-drop
    assert policy.failures == 5 and policy.ceiling_s() == 16
    policy.session_ended(authenticated_at=100.0, ended_at=130.0)
    assert policy.failures == 0 and policy.next_delay_s() == 0.0


# --- the state machine: events in, actions out, an injected clock ---------------------------------


def core(provider_id: str | None = None, **policy: float) -> SessionCore:
    return SessionCore(
        Key(provider_id),
        "0.1.0",
        lambda: "POD-ENROLL-1",
        ReconnectPolicy(rng=random.Random(3), **policy),  # type: ignore[arg-type]
    )


def state_of(c: SessionCore) -> State:
    """Read the state anew (mypy would keep an earlier narrowing across handle())."""
    return c.state


def authenticate(c: SessionCore, now: float = 0.0) -> list[object]:
    assert c.handle(Dial(now)) == []
    assert c.handle(Opened(now)) == []
    [send] = c.handle(Received(challenge(), now))
    assert isinstance(send, Send) and isinstance(send.frame, AuthResponse)
    return list(c.handle(Received(decode('{"type":"auth_ok","provider_id":"prov_1"}'), now)))


def test_handshake_path_stores_a_new_provider_id_once() -> None:
    c = core()
    assert authenticate(c) == [StoreProviderId("prov_1"), Authenticated("prov_1")]
    assert c.state is State.AUTHENTICATED and c.attempts == 1
    again = core(provider_id="prov_1")
    assert authenticate(again) == [Authenticated("prov_1")]  # already stored: no write


@pytest.mark.parametrize(
    "first", ['{"type":"auth_ok","provider_id":"p"}', "garbage", '{"type":"heartbeat"}']
)
def test_a_wrong_first_frame_fails_as_the_coordinators_fault(first: str) -> None:
    c = core()
    c.handle(Dial(0))
    c.handle(Opened(0))
    [fail] = c.handle(Received(decode(first), 0))
    assert isinstance(fail, Fail) and fail.fault.kind is FaultKind.COORDINATOR
    assert c.state is State.CLOSING
    [wait] = c.handle(Ended(fail.fault, 1.0))
    assert isinstance(wait, Wait) and state_of(c) is State.IDLE and c.policy.failures == 1


def test_auth_failed_backs_off_with_growing_ceilings() -> None:
    c = core(base_s=1, cap_s=60)
    ceilings = []
    for t in range(6):
        c.handle(Dial(t))
        c.handle(Opened(t))
        c.handle(Received(challenge(), t))
        [fail] = c.handle(Received(decode('{"type":"auth_failed","reason":"no"}'), t))
        assert isinstance(fail, Fail) and "auth_failed: no" in fail.fault.detail
        [wait] = c.handle(Ended(fail.fault, t + 0.1))
        assert isinstance(wait, Wait) and 0 <= wait.delay_s <= c.policy.ceiling_s()
        ceilings.append(c.policy.ceiling_s())
    assert ceilings == [1, 2, 4, 8, 16, 32]


def test_inbound_after_auth_is_delivered_and_never_ends_the_session() -> None:
    c = core()
    authenticate(c)
    for text in ["garbage", '{"type":"job","job_id":"j","model_id":"m","request":{}}', "[]"]:
        [action] = c.handle(Received(decode(text), 1.0))
        assert isinstance(action, Deliver)
    assert c.state is State.AUTHENTICATED


def test_delivery_by_pong_until_the_first_job_ack() -> None:
    c = core()
    authenticate(c)
    [ping] = c.handle(Written(("a", "b")))
    assert isinstance(ping, Ping)
    [ping2] = c.handle(Written(("c",)))
    assert isinstance(ping2, Ping) and ping2.token != ping.token
    assert c.handle(Ponged(ping2.token)) == [Confirmed(("c",))]
    assert c.handle(Ponged(ping.token)) == [Confirmed(("a", "b"))]
    assert c.handle(Ponged(ping.token)) == []  # a pong is used once
    # The coordinator acks: from now on only job_ack confirms.
    [ping3] = c.handle(Written(("d",)))
    assert isinstance(ping3, Ping)
    assert c.handle(Received(decode('{"type":"job_ack","job_id":"x"}'), 2)) == [Confirmed(("x",))]
    assert c.handle(Ponged(ping3.token)) == []
    assert c.handle(Written(("e",))) == []
    # A new session starts in pong mode again.
    c.handle(Ended(Fault(FaultKind.NETWORK, "reset"), 3))
    authenticate(c, 4)
    assert isinstance(c.handle(Written(("f",)))[0], Ping)


def test_unconfirmed_pings_are_forgotten_when_the_socket_ends() -> None:
    c = core()
    authenticate(c)
    [ping] = c.handle(Written(("a",)))
    assert isinstance(ping, Ping)
    c.handle(Ended(Fault(FaultKind.NETWORK, "reset"), 1))
    authenticate(c, 2)
    assert c.handle(Ponged(ping.token)) == []  # the outbox re-sends "a" instead


def test_healthy_session_resets_backoff_with_an_injected_clock() -> None:
    c = core(base_s=1, cap_s=60, healthy_after_s=30)
    c.policy.failures = 5
    authenticate(c, now=100.0)
    [wait] = c.handle(Ended(Fault(FaultKind.NETWORK, "reset"), 131.0))
    assert wait == Wait(0.0, Fault(FaultKind.NETWORK, "reset")) and c.policy.failures == 0
    authenticate(c, now=200.0)
    [wait] = c.handle(Ended(Fault(FaultKind.NETWORK, "reset"), 201.0))  # a flap: escalate
    assert isinstance(wait, Wait) and c.policy.failures == 1


def test_planned_restart_neither_escalates_nor_waits_long() -> None:
    c = core(base_s=1, cap_s=60)
    c.policy.failures = 6
    for t in range(20):
        authenticate(c, now=float(t))
        [wait] = c.handle(Ended(Fault(FaultKind.PLANNED, "1012"), t + 0.5))
        assert isinstance(wait, Wait) and 0 <= wait.delay_s <= 2.0
    assert c.policy.failures == 6


def test_a_local_fault_waits_at_least_local_fault_s() -> None:
    c = core(base_s=0.01, cap_s=0.1, local_fault_s=30)
    authenticate(c)
    [wait] = c.handle(Ended(Fault(FaultKind.LOCAL, "disk full"), 0.1))
    assert isinstance(wait, Wait) and wait.delay_s >= 30


def test_stop_and_reconnect_from_each_state() -> None:
    c = core()
    assert c.handle(Stop()) == [] and c.state is State.STOPPED  # idle: nothing to close
    c = core()
    authenticate(c)
    assert c.handle(Stop()) == [Close(1001)] and c.state is State.CLOSING
    assert c.handle(Ended(None, 1)) == [] and state_of(c) is State.STOPPED
    c = core()
    authenticate(c)
    c.policy.failures = 4
    assert c.handle(Reconnect()) == [Close(1000)]
    assert c.handle(Ended(None, 1)) == [Wait(0.0, None)] and c.policy.failures == 0
    c = core()
    c.handle(Dial(0))
    assert c.handle(Reconnect()) == [] and c.state is State.CLOSING
    assert c.handle(Opened(0)) == [] and c.state is State.CLOSING  # dial finished: close it


def test_events_a_state_cannot_have_are_bugs_not_input() -> None:
    c = core()
    with pytest.raises(InvalidTransition):
        c.handle(Opened(0))
    with pytest.raises(InvalidTransition):
        c.handle(Received(challenge(), 0))
    assert all(isinstance(state, State) for state, _ in TRANSITIONS)


# --- classify: whose fault ------------------------------------------------------------------------


def _closed(code: int | None) -> BaseException:
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close as CloseFrame

    rcvd = CloseFrame(code, "") if code is not None else None
    return ConnectionClosed(rcvd, None)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(111, "Connection refused"), FaultKind.NETWORK),
        (ConnectionResetError(104, "Connection reset by peer"), FaultKind.NETWORK),
        (TimeoutError(), FaultKind.NETWORK),
        (OSError(113, "No route to host"), FaultKind.NETWORK),
        (_closed(None), FaultKind.NETWORK),
        (_closed(1011), FaultKind.COORDINATOR),
        (_closed(1008), FaultKind.COORDINATOR),
        (_closed(1012), FaultKind.PLANNED),
        (_closed(1001), FaultKind.PLANNED),
        (CoordinatorError("expected auth_challenge"), FaultKind.COORDINATOR),
        (AuthFailed("not enrolled"), FaultKind.COORDINATOR),
        (LocalFault("storing provider_id", OSError(28, "No space left")), FaultKind.LOCAL),
        (OSError(28, "No space left on device"), FaultKind.LOCAL),
        (OSError(30, "Read-only file system"), FaultKind.LOCAL),
        (PermissionError(13, "Permission denied"), FaultKind.LOCAL),
        (IsADirectoryError(21, "Is a directory"), FaultKind.LOCAL),
        (KeyError("bug"), FaultKind.LOCAL),
        (TypeError("bug"), FaultKind.LOCAL),
        (SessionFailure(Fault(FaultKind.COORDINATOR, "x")), FaultKind.COORDINATOR),
    ],
)
def test_classify(exc: BaseException, kind: FaultKind) -> None:
    fault = classify(exc)
    assert fault.kind is kind and fault.detail
