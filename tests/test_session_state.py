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
from provider_agent.protocol import AuthChallenge, decode
from provider_agent.session_state import (
    ReconnectPolicy,
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
