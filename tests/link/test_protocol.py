"""`protocol.decode` never raises, and a `job` frame is judged as protocol.md §8 settles it:
what can be answered and with which code, and a `request` whose JSON values reach the backend
unchanged (integers of any size exactly)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.jobs.upstream import request_body
from provider_agent.link.protocol import BadFrame, Job, JobAck, UnknownFrame, decode


def job_text(**fields: object) -> str:
    frame = {"type": "job", "job_id": "j1", "model_id": "m", "request": {}, **fields}
    return json.dumps(frame)


@pytest.mark.parametrize(
    ("fields", "code", "where"),
    [
        ({"format": "xml"}, "unsupported_format", "format"),
        ({"format": 7}, "unsupported_format", "format"),
        ({"format": "xml", "deadline_ms": "1"}, "bad_request", ""),  # more than the format
        ({"deadline_ms": "60000"}, "bad_request", "deadline_ms"),
        ({"deadline_ms": 60000.0}, "bad_request", "deadline_ms"),
        ({"deadline_ms": 1.5}, "bad_request", "deadline_ms"),
        ({"deadline_ms": True}, "bad_request", "deadline_ms"),
        ({"deadline_ms": 0}, "bad_request", "deadline_ms"),
        ({"model_id": ""}, "bad_request", "model_id"),
        ({"model_id": "m" * 257}, "bad_request", "model_id"),
        ({"model_id": "a\u001b[2Jb"}, "bad_request", "model_id"),
        ({"model_id": "a\nb"}, "bad_request", "model_id"),
        ({"model_id": "   "}, "bad_request", "model_id"),
        ({"model_id": "a\u202eb"}, "bad_request", "model_id"),
        ({"request": []}, "bad_request", "request"),
    ],
)
def test_a_job_that_breaks_a_rule_is_answered_with_its_code(
    fields: dict[str, object], code: str, where: str
) -> None:
    frame = decode(job_text(**fields))
    assert isinstance(frame, BadFrame) and frame.job_id == "j1" and frame.code == code
    assert where in frame.reason


@pytest.mark.parametrize("fields", [{"format": None}, {"deadline_ms": None}, {}])
def test_null_format_and_deadline_are_the_defaults(fields: dict[str, object]) -> None:
    frame = decode(job_text(**fields))
    assert isinstance(frame, Job) and frame.format == "openai" and frame.deadline_ms == 60000


@pytest.mark.parametrize(
    "job_id", ["", "x" * 129, "a\u001bb", "a\nb", "a\u0000", "\u202e", 7, None, ["j"]]
)
def test_a_job_id_that_cannot_be_answered_is_not_read(job_id: object) -> None:
    """1–128 printable characters, or the frame cannot be answered (§8): no job_id is read."""
    frame = decode(job_text(job_id=job_id))
    assert isinstance(frame, BadFrame) and frame.job_id is None and frame.type == "job"


@pytest.mark.parametrize("job_id", ["x" * 128, "ü-é 漢字 🙂", "a b"])
def test_any_printable_job_id_up_to_128_is_answered(job_id: str) -> None:
    frame = decode(job_text(job_id=job_id))
    assert isinstance(frame, Job) and frame.job_id == job_id


BIG = [
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**30,
    -(10**40),
]


def test_request_integers_of_any_size_reach_the_backend_exactly() -> None:
    request: dict[str, object] = {f"n{i}": value for i, value in enumerate(BIG)}
    request["nested"] = [{"deep": 2**70}, 1e5, 0.1, -0.0, 12, "99999999999999999999"]
    text = '{"type":"job","job_id":"j","model_id":"m","request":' + json.dumps(request) + "}"
    frame = decode(text)
    assert isinstance(frame, Job)
    sent = json.loads(request_body("openai", frame.request, "native"))
    for key, value in request.items():
        assert sent[key] == value and type(sent[key]) is type(value)


def test_an_integer_beyond_python_s_text_limit_is_passed_on_verbatim() -> None:
    huge = "-" + "9" * 5000  # never converted: Python refuses int() of it by default
    frame = decode('{"type":"job","job_id":"j","model_id":"m","request":{"seed":' + huge + "}}")
    assert isinstance(frame, Job)
    assert b'"seed":' + huge.encode() + b"," in request_body("openai", frame.request, "native")


def test_a_frame_with_long_digits_is_held_to_the_same_json_rules() -> None:
    """The exact-integer path reads only what orjson would accept: no NaN, valid UTF-8."""
    digits = "1" * 30
    for text in (
        '{"type":"job","job_id":"j","model_id":"m","request":{"a":NaN,"b":' + digits + "}}",
        '{"type":"job","job_id":"j","model_id":"m","request":{"a":1e400,"b":' + digits + "}}",
        b'{"type":"job","job_id":"j","model_id":"\xff","request":{"b":' + digits.encode() + b"}}",
        "[" * 100_000 + digits + "]" * 100_000,
    ):
        assert isinstance(decode(text), BadFrame)


@given(st.binary(max_size=300) | st.text(max_size=300) | st.integers().map(str))
def test_decode_never_raises(data: bytes | str) -> None:
    decode(data)


def test_unknown_types_and_acks_pass() -> None:
    assert isinstance(decode('{"type":"future_thing","x":1}'), UnknownFrame)
    assert decode(orjson.dumps({"type": "job_ack", "job_id": "j"})) == JobAck(job_id="j")
