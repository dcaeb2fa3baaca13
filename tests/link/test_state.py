"""The session's pure core: handshake answers, inbound dispatch, reconnect policy."""

from __future__ import annotations

import base64
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.errors import (
    AuthFailed,
    CoordinatorError,
    Fault,
    FaultKind,
    InvalidTransition,
    LocalFault,
    SessionFailure,
)
from provider_agent.link.faults import classify
from provider_agent.link.protocol import AuthChallenge, AuthResponse, decode
from provider_agent.link.state import (
    TRANSITIONS,
    Acked,
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
    Send,
    SessionCore,
    State,
    Stop,
    StoreProviderId,
    Written,
    answer_challenge,
    auth_outcome,
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
        ('{"type":"job","job_id":"j1","model_id":"m","request":{}}', DeliverJob, "j1"),
        ('{"type":"job_cancel","job_id":"j2"}', DeliverCancel, "j2"),
        ('{"type":"job_ack","job_id":"j3"}', Acked, "j3"),
        ('{"type":"job","job_id":"j4","model_id":"m","request":"no"}', RejectJob, "j4"),
        ('{"type":"job","model_id":"m"}', Ignore, None),
        ('{"type":"config_update","x":1}', Ignore, None),
        ('{"type":"brand_new_thing"}', Ignore, None),
        ('{"type":"auth_ok","provider_id":"p"}', Ignore, None),
        ("[1,2]", Ignore, None),
    ],
)
def test_dispatch(text: str, action: type, job_id: str | None) -> None:
    inbound = dispatch(decode(text))
    assert type(inbound) is action
    found = (
        inbound.job.job_id if isinstance(inbound, DeliverJob) else getattr(inbound, "job_id", None)
    )
    assert found == job_id


def test_an_unanswerable_job_is_ignored_throttled_and_other_surprises_loudly() -> None:
    unanswerable = dispatch(decode('{"type":"job","model_id":"m"}'))
    assert unanswerable == Ignore(unanswerable.reason, loud=True, throttled=True)  # type: ignore[union-attr]
    assert dispatch(decode('{"type":"auth_ok","provider_id":"p"}')) == Ignore(
        "unexpected auth_ok after auth", loud=True
    )
    assert dispatch(decode('{"type":"config_update"}')) == Ignore("config_update ignored")


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_dispatch_is_total_on_garbage(data: str | bytes) -> None:
    assert isinstance(
        dispatch(decode(data)), DeliverJob | DeliverCancel | RejectJob | Acked | Ignore
    )


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


class Top(random.Random):
    """A fake rng whose uniform(a, b) is always b: every delay is its ceiling exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Bottom(random.Random):
    """A fake rng whose uniform(a, b) is always a: full jitter at its luckiest (0)."""

    def uniform(self, a: float, b: float) -> float:
        return a


NET = Fault(FaultKind.NETWORK, "connection lost (no close frame)")
COORD = Fault(FaultKind.COORDINATOR, "auth_failed: not enrolled")
PLANNED = Fault(FaultKind.PLANNED, "coordinator restarting (close code 1012)")
LOCAL = Fault(FaultKind.LOCAL, "local I/O failed (No space left on device)")

#: (failures before, how the connection ended, rng, the delay, failures after) with the default
#: policy (1 s doubling to 60 s, healthy after 30 s, local floor 30 s, planned spread 2 s); times
#: are a fake monotonic clock.
POLICY_TABLE: dict[str, tuple[int, Redial, type[random.Random], float, int]] = {
    "first failure, never authenticated": (0, Redial(NET, None, 5.0), Top, 1.0, 1),
    "a refused handshake escalates by doubling": (3, Redial(COORD, None, 5.0), Top, 8.0, 4),
    "capped at 60 s": (6, Redial(NET, None, 5.0), Top, 60.0, 7),
    "stays capped, forever": (40, Redial(NET, None, 5.0), Top, 60.0, 41),
    "full jitter reaches down to 0": (3, Redial(NET, None, 5.0), Bottom, 0.0, 4),
    "30 s authenticated: reset, redial at once": (5, Redial(NET, 100.0, 130.0), Top, 0.0, 0),
    "a flap short of 30 s escalates": (5, Redial(NET, 100.0, 129.9), Top, 32.0, 6),
    "planned close: at most 2 s, no escalation": (6, Redial(PLANNED, 100.0, 100.5), Top, 2.0, 6),
    "planned close: no reset either": (6, Redial(PLANNED, 100.0, 200.0), Top, 2.0, 6),
    "planned close: jitter down to 0": (6, Redial(PLANNED, None, 1.0), Bottom, 0.0, 6),
    "local fault: at least 30 s": (0, Redial(LOCAL, None, 1.0), Bottom, 30.0, 1),
    "local fault after a healthy session": (3, Redial(LOCAL, 0.0, 100.0), Top, 30.0, 0),
    "local fault above the floor keeps it": (7, Redial(LOCAL, None, 1.0), Top, 60.0, 8),
    "reconnect(): at once, reset": (9, Redial(None, None, 1.0, requested=True), Top, 0.0, 0),
    "reconnect() after a healthy session": (0, Redial(None, 0.0, 99.0, requested=True), Top, 0, 0),
    "a close of ours, not requested, backs off": (2, Redial(None, None, 1.0), Top, 4.0, 3),
}


@pytest.mark.parametrize(
    ("failures", "redial", "rng", "delay", "after"),
    list(POLICY_TABLE.values()),
    ids=list(POLICY_TABLE),
)
def test_reconnect_policy_table(
    failures: int, redial: Redial, rng: type[random.Random], delay: float, after: int
) -> None:
    """What the session's tenacity wait (`PolicyWait`) asks, decided by the policy alone."""
    policy = ReconnectPolicy(failures=failures, rng=rng())
    assert policy.delay_after(redial) == delay
    assert policy.failures == after


def test_a_seeded_policy_replays_the_same_delays() -> None:
    def delays(seed: int) -> list[float]:
        policy = ReconnectPolicy(rng=random.Random(seed))
        return [policy.delay_after(Redial(NET, None, float(t))) for t in range(12)]

    assert delays(5) == delays(5) != delays(6)
    assert all(0 <= d <= min(60, 2 ** (n - 1)) for n, d in enumerate(delays(5), start=1))


# --- the state machine: events in, actions out, an injected clock ---------------------------------


def core(provider_id: str | None = None) -> SessionCore:
    return SessionCore(Key(provider_id), "0.1.0", lambda: "POD-ENROLL-1")


def policy(**settings: float) -> ReconnectPolicy:
    return ReconnectPolicy(rng=random.Random(3), **settings)  # type: ignore[arg-type]


def end(
    c: SessionCore, p: ReconnectPolicy, fault: Fault | None, now: float
) -> tuple[Redial, float]:
    """The connection ends: the core's `Redial`, and the delay the policy gives it (one turn of
    the session's tenacity loop, without the loop)."""
    [redial] = c.handle(Ended(fault, now))
    assert isinstance(redial, Redial)
    return redial, p.delay_after(redial)


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
    c, p = core(), policy()
    c.handle(Dial(0))
    c.handle(Opened(0))
    [fail] = c.handle(Received(decode(first), 0))
    assert isinstance(fail, Fail) and fail.fault.kind is FaultKind.COORDINATOR
    assert c.state is State.CLOSING
    redial, _ = end(c, p, fail.fault, 1.0)
    assert redial == Redial(fail.fault, None, 1.0)
    assert state_of(c) is State.IDLE and p.failures == 1


def test_auth_failed_backs_off_with_growing_ceilings() -> None:
    c, p = core(), policy(base_s=1, cap_s=60)
    ceilings = []
    for t in range(6):
        c.handle(Dial(t))
        c.handle(Opened(t))
        c.handle(Received(challenge(), t))
        [fail] = c.handle(Received(decode('{"type":"auth_failed","reason":"no"}'), t))
        assert isinstance(fail, Fail) and "auth_failed: no" in fail.fault.detail
        _, delay = end(c, p, fail.fault, t + 0.1)
        assert 0 <= delay <= p.ceiling_s()
        ceilings.append(p.ceiling_s())
    assert ceilings == [1, 2, 4, 8, 16, 32]


def test_inbound_after_auth_is_delivered_and_never_ends_the_session() -> None:
    c = core()
    authenticate(c)
    for text in ["garbage", '{"type":"job","job_id":"j","model_id":"m","request":{}}', "[]"]:
        [action] = c.handle(Received(decode(text), 1.0))
        assert isinstance(action, DeliverJob | Ignore)
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
    c, p = core(), policy(base_s=1, cap_s=60, healthy_after_s=30)
    p.failures = 5
    authenticate(c, now=100.0)
    reset = Fault(FaultKind.NETWORK, "reset")
    assert end(c, p, reset, 131.0) == (Redial(reset, 100.0, 131.0), 0.0) and p.failures == 0
    authenticate(c, now=200.0)
    end(c, p, reset, 201.0)  # a flap: escalate
    assert p.failures == 1


def test_planned_restart_neither_escalates_nor_waits_long() -> None:
    c, p = core(), policy(base_s=1, cap_s=60)
    p.failures = 6
    for t in range(20):
        authenticate(c, now=float(t))
        _, delay = end(c, p, Fault(FaultKind.PLANNED, "1012"), t + 0.5)
        assert 0 <= delay <= 2.0
    assert p.failures == 6


def test_a_local_fault_waits_at_least_local_fault_s() -> None:
    c, p = core(), policy(base_s=0.01, cap_s=0.1, local_fault_s=30)
    authenticate(c)
    _, delay = end(c, p, Fault(FaultKind.LOCAL, "disk full"), 0.1)
    assert delay >= 30


def test_stop_and_reconnect_from_each_state() -> None:
    c = core()
    assert c.handle(Stop()) == [] and c.state is State.STOPPED  # idle: nothing to close
    c = core()
    authenticate(c)
    assert c.handle(Stop()) == [Close(1001)] and c.state is State.CLOSING
    assert c.handle(Ended(None, 1)) == [] and state_of(c) is State.STOPPED
    c, p = core(), policy()
    authenticate(c)
    p.failures = 4
    assert c.handle(Reconnect()) == [Close(1000)]
    assert end(c, p, None, 1) == (Redial(None, 0.0, 1, requested=True), 0.0) and p.failures == 0
    c = core()
    c.handle(Dial(0))
    assert c.handle(Reconnect()) == [] and c.state is State.CLOSING
    assert c.handle(Opened(0)) == [] and c.state is State.CLOSING  # dial finished: close it


def test_the_core_hands_the_policy_how_the_connection_ended() -> None:
    """The `Redial` carries the facts the policy decides on, and only those; a stop has none."""
    c, p = core(), policy()
    c.handle(Dial(0))
    assert end(c, p, NET, 0.5)[0] == Redial(NET, None, 0.5)  # the dial failed: never authenticated
    authenticate(c, now=1.0)
    assert end(c, p, PLANNED, 9.0)[0] == Redial(PLANNED, 1.0, 9.0)
    c.handle(Dial(10))  # a reconnect asked for while dialling: once it opens, close and redial
    c.handle(Reconnect())
    c.handle(Opened(10))
    assert end(c, p, None, 10.5) == (Redial(None, None, 10.5, requested=True), 0.0)
    c.handle(Dial(11))  # the coordinator broke the handshake, then a reconnect was asked for
    c.handle(Opened(11))
    [fail] = c.handle(Received(decode("garbage"), 11))
    assert isinstance(fail, Fail)
    c.handle(Reconnect())
    assert end(c, p, fail.fault, 12)[0] == Redial(None, None, 12, requested=True)
    authenticate(c, now=20.0)  # a stop: no Redial at all, the loop ends
    c.handle(Stop())
    assert c.handle(Ended(None, 21.0)) == [] and state_of(c) is State.STOPPED


def test_events_a_state_cannot_have_are_bugs_not_input() -> None:
    c = core()
    with pytest.raises(InvalidTransition):
        c.handle(Opened(0))
    with pytest.raises(InvalidTransition):
        c.handle(Received(challenge(), 0))
    assert all(isinstance(state, State) for state, _, _ in TRANSITIONS)


def test_every_state_change_is_in_the_table() -> None:
    """A failed handshake and an end while stopping move along the table too."""
    assert TRANSITIONS[(State.AWAIT_CHALLENGE, Received, "failed")] is State.CLOSING
    assert TRANSITIONS[(State.CLOSING, Ended, "stopped")] is State.STOPPED
    c = core()
    c.handle(Dial(0))
    c.handle(Opened(0))
    [fail] = c.handle(Received(decode('{"type":"auth_ok","provider_id":"p"}'), 0))
    assert isinstance(fail, Fail) and c.state is State.CLOSING


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
