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
from provider_agent.link.protocol import (
    KNOWN_TYPES,
    AuthChallenge,
    AuthFailed,
    AuthOk,
    BadFrame,
    ConfigUpdate,
    Job,
    JobAck,
    JobCancel,
    UnknownFrame,
    decode,
    readable_job_id,
)


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


#: A digit run long enough to send the text through the exact-integer parser instead of orjson.
LONG = "1" * 30
DEEP = 10_000


def frame_text(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param(b"", "not JSON", id="empty bytes"),
        pytest.param("", "not JSON", id="empty text"),
        pytest.param(" \n\t", "not JSON", id="only whitespace"),
        pytest.param("hello", "not JSON", id="not JSON"),
        pytest.param("{'type': 'job_cancel'}", "not JSON", id="single quotes"),
        pytest.param('{"type":"job_cancel"', "not JSON", id="cut short"),
        pytest.param('{"type":"job_cancel","job_id":"j",}', "not JSON", id="trailing comma"),
        pytest.param('{"type":"job_cancel","job_id":"j"} {}', "not JSON", id="two documents"),
        pytest.param('{"type":"job_cancel","job_id":"j"}\x00', "not JSON", id="a trailing NUL"),
        pytest.param(
            '\ufeff{"type":"job_cancel","job_id":"j"}', "not JSON", id="a byte-order mark"
        ),
        pytest.param('{"type":"job_cancel","job_id":"a\nb"}', "not JSON", id="a raw newline"),
        pytest.param("null", "not a JSON object", id="null"),
        pytest.param("[]", "not a JSON object", id="an empty array"),
        pytest.param(
            '[{"type":"job_cancel","job_id":"j"}]', "not a JSON object", id="a frame in an array"
        ),
        pytest.param('"job_cancel"', "not a JSON object", id="a string"),
        pytest.param("0", "not a JSON object", id="a number"),
        pytest.param("-1.5e3", "not a JSON object", id="a float"),
        pytest.param("true", "not a JSON object", id="a boolean"),
        pytest.param(LONG, "not a JSON object", id="a number past 2^64"),
        pytest.param("-" + LONG, "not a JSON object", id="a number below -2^63"),
        pytest.param("[" * DEEP + "]" * DEEP, "not JSON", id="arrays 10,000 deep"),
        pytest.param('{"a":' * DEEP + "1" + "}" * DEEP, "not JSON", id="objects 10,000 deep"),
        pytest.param(
            '{"type":"job","job_id":"j","model_id":"m","request":' + "[" * DEEP + "]" * DEEP + "}",
            "not JSON",
            id="a job whose request nests 10,000 deep",
        ),
        pytest.param(
            '{"type":"job","job_id":"j","model_id":"m","request":'
            + '{"a":' * DEEP
            + LONG
            + "}" * DEEP
            + "}",
            "not JSON",
            id="10,000 deep on the exact-integer path",
        ),
        pytest.param(b"\xff", "not JSON", id="a byte that is never UTF-8"),
        pytest.param(b'{"type":"job_cancel","job_id":"\xff"}', "not JSON", id="invalid UTF-8"),
        pytest.param(b'{"type":"job_cancel","job_id":"\xc0\xaf"}', "not JSON", id="overlong"),
        pytest.param(b'{"type":"job_cancel","job_id":"\xe2\x82"}', "not JSON", id="cut sequence"),
        pytest.param(
            b'{"type":"job_cancel","job_id":"\xed\xa0\x80"}', "not JSON", id="an encoded surrogate"
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"\ud800"}', "not JSON", id="a lone surrogate in str"
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"\\ud800"}', "not JSON", id="an escaped high surrogate"
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"\\udc00x"}', "not JSON", id="an escaped low surrogate"
        ),
        pytest.param('{"type":"job_cancel","job_id":"j","x":NaN}', "not JSON", id="NaN"),
        pytest.param('{"type":"job_cancel","job_id":"j","x":Infinity}', "not JSON", id="Infinity"),
        pytest.param(
            '{"type":"job_cancel","job_id":"j","x":-Infinity}', "not JSON", id="-Infinity"
        ),
        pytest.param('{"type":"job_cancel","job_id":"j","x":-1e400}', "not JSON", id="-1e400"),
        pytest.param(
            '{"type":"job_cancel","job_id":"j","x":Infinity,"n":' + LONG + "}",
            "not JSON: Infinity is not JSON",
            id="Infinity on the exact-integer path",
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"j","x":-Infinity,"n":' + LONG + "}",
            "not JSON: -Infinity is not JSON",
            id="-Infinity on the exact-integer path",
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"j","x":1' + "0" * 400 + ".5}",
            "not JSON",
            id="a float out of range on the exact-integer path",
        ),
    ],
)
def test_text_that_is_no_json_object_is_a_bad_frame(text: str | bytes, reason: str) -> None:
    frame = decode(text)
    assert isinstance(frame, BadFrame), frame
    assert frame.reason.startswith(reason)
    assert (frame.type, frame.job_id, frame.code) == (None, None, "bad_request")


@pytest.mark.parametrize("pad", [{}, {"pad": int(LONG)}], ids=["orjson", "exact-integer path"])
@pytest.mark.parametrize(
    ("kind", "fields", "where", "job_id"),
    [
        pytest.param("auth_challenge", {}, "nonce", None, id="auth_challenge without nonce"),
        pytest.param("auth_challenge", {"nonce": 7}, "nonce", None, id="auth_challenge nonce 7"),
        pytest.param("auth_challenge", {"nonce": None}, "nonce", None, id="auth_challenge null"),
        pytest.param("auth_challenge", {"nonce": ["n"]}, "nonce", None, id="auth_challenge list"),
        pytest.param("auth_ok", {}, "provider_id", None, id="auth_ok without provider_id"),
        pytest.param("auth_ok", {"provider_id": 7}, "provider_id", None, id="auth_ok number"),
        pytest.param("auth_ok", {"provider_id": None}, "provider_id", None, id="auth_ok null"),
        pytest.param("auth_ok", {"provider_id": {}}, "provider_id", None, id="auth_ok object"),
        pytest.param(
            "auth_ok",
            {"provider_id": True, "job_id": "j"},
            "provider_id",
            "j",
            id="any frame keeps a readable job_id",
        ),
        pytest.param("auth_failed", {"reason": 7}, "reason", None, id="auth_failed number"),
        pytest.param("auth_failed", {"reason": None}, "reason", None, id="auth_failed null"),
        pytest.param("auth_failed", {"reason": []}, "reason", None, id="auth_failed list"),
        pytest.param("job_cancel", {}, "job_id", None, id="job_cancel without job_id"),
        pytest.param("job_cancel", {"job_id": 7}, "job_id", None, id="job_cancel number"),
        pytest.param("job_cancel", {"job_id": None}, "job_id", None, id="job_cancel null"),
        pytest.param("job_cancel", {"job_id": ["j"]}, "job_id", None, id="job_cancel list"),
        pytest.param("job_cancel", {"job_id": 2**64}, "job_id", None, id="job_cancel past 2^64"),
        pytest.param("job_ack", {"job_id": False}, "job_id", None, id="job_ack boolean"),
        pytest.param(
            "job",
            {"job_id": 7, "model_id": "m", "request": {}},
            "job_id",
            None,
            id="job job_id number",
        ),
        pytest.param(
            "job", {"job_id": "j", "request": {}}, "model_id", "j", id="job without model_id"
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": 7, "request": {}},
            "model_id",
            "j",
            id="job model_id number",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": None, "request": {}},
            "model_id",
            "j",
            id="job model_id null",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": ["m"], "request": {}},
            "model_id",
            "j",
            id="job model_id list",
        ),
        pytest.param(
            "job", {"job_id": "j", "model_id": "m"}, "request", "j", id="job without request"
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": "m", "request": None},
            "request",
            "j",
            id="job request null",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": "m", "request": "{}"},
            "request",
            "j",
            id="job request string",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": "m", "request": 7},
            "request",
            "j",
            id="job request number",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": "m", "request": {}, "deadline_ms": -1},
            "deadline_ms",
            "j",
            id="job deadline negative",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": "m", "request": {}, "deadline_ms": 2**64},
            "deadline_ms",
            "j",
            id="job deadline past 2^64",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": "m", "request": {}, "deadline_ms": []},
            "deadline_ms",
            "j",
            id="job deadline list",
        ),
        pytest.param(
            "job",
            {"job_id": "j", "model_id": 7, "request": {}, "format": "xml"},
            "",
            "j",
            id="job format and model_id both wrong",
        ),
    ],
)
def test_a_field_of_the_wrong_type_is_a_bad_frame(
    kind: str, fields: dict[str, object], where: str, job_id: str | None, pad: dict[str, int]
) -> None:
    """Both parsers read the same frame the same way, so each row runs on both."""
    frame = decode(frame_text(kind, **fields, **pad))
    assert isinstance(frame, BadFrame), frame
    assert (frame.type, frame.job_id, frame.code) == (kind, job_id, "bad_request")
    assert frame.reason.startswith(f"invalid {kind}: {where}")


@pytest.mark.parametrize("fmt", [["openai"], {"openai": True}, "OPENAI", "openai ", ""], ids=repr)
def test_a_format_of_any_wrong_kind_alone_is_unsupported(fmt: object) -> None:
    frame = decode(job_text(format=fmt))
    assert isinstance(frame, BadFrame) and frame.code == "unsupported_format"
    assert frame.job_id == "j1" and frame.reason.startswith("invalid job: format")


@pytest.mark.parametrize(
    "kind",
    [7, None, True, [], {}, ["job"], 2**64, -(2**63) - 1],
    ids=repr,
)
def test_a_type_that_is_not_a_string_is_a_bad_frame_that_keeps_the_job_id(kind: object) -> None:
    frame = decode(json.dumps({"type": kind, "job_id": "j", "model_id": "m", "request": {}}))
    assert frame == BadFrame(reason="no string `type`", job_id="j")


def test_a_frame_without_type_is_a_bad_frame_that_keeps_the_job_id() -> None:
    frame = decode('{"job_id":"j","model_id":"m","request":{}}')
    assert frame == BadFrame(reason="no string `type`", job_id="j")


@pytest.mark.parametrize(
    "kind",
    ["", "JOB", "job ", " job", "Job_Cancel", "job\u0000", "\u202ejob", "作业", "x" * 1_000_000],
    ids=lambda kind: repr(kind)[:20],
)
def test_any_other_string_type_is_an_unknown_frame(kind: str) -> None:
    """Whatever else the frame holds: garbage fields of a type we do not know are not read."""
    text = json.dumps({"type": kind, "job_id": [], "model_id": 7, "request": "x"})
    assert decode(text) == UnknownFrame(type=kind)


HUGE = "x" * 10_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            frame_text("auth_challenge", nonce="bm9uY2U="),
            AuthChallenge(nonce="bm9uY2U="),
            id="auth_challenge",
        ),
        pytest.param(frame_text("auth_ok", provider_id="p-1"), AuthOk(provider_id="p-1"), id="ok"),
        pytest.param(
            frame_text("auth_failed", reason="revoked"), AuthFailed(reason="revoked"), id="failed"
        ),
        pytest.param(frame_text("auth_failed"), AuthFailed(reason=""), id="failed, no reason"),
        pytest.param(
            frame_text(
                "job",
                job_id="j",
                model_id="org/m:Q4",
                request={"messages": [{"role": "user", "content": "hi"}]},
                format="anthropic",
                deadline_ms=5,
            ),
            Job(
                job_id="j",
                model_id="org/m:Q4",
                request={"messages": [{"role": "user", "content": "hi"}]},
                format="anthropic",
                deadline_ms=5,
            ),
            id="job",
        ),
        pytest.param(
            frame_text("job", job_id="j", model_id="m", request={}, deadline_ms=2**64 - 1),
            Job(job_id="j", model_id="m", request={}, deadline_ms=2**64 - 1),
            id="job with the largest deadline orjson holds",
        ),
        pytest.param(
            frame_text("job", job_id="j", model_id="m", request={"prompt": HUGE}),
            Job(job_id="j", model_id="m", request={"prompt": HUGE}),
            id="job with a 10 MB string",
        ),
        pytest.param(frame_text("job_cancel", job_id="j"), JobCancel(job_id="j"), id="job_cancel"),
        pytest.param(
            b'{"type":"job_cancel","job_id":"\xc3\xbc\xf0\x9f\x99\x82"}',
            JobCancel(job_id="ü🙂"),
            id="UTF-8 bytes",
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"\\ud83d\\ude42"}',
            JobCancel(job_id="🙂"),
            id="an escaped surrogate pair",
        ),
        pytest.param(
            '{"type":"job_cancel","job_id":"a","job_id":"b"}',
            JobCancel(job_id="b"),
            id="a duplicate key: the last wins",
        ),
        pytest.param(
            '{"type":"auth_ok","type":"job_cancel","job_id":"j"}',
            JobCancel(job_id="j"),
            id="a duplicate type: the last wins",
        ),
        pytest.param(
            frame_text("job_cancel", job_id="j", reason="client left", n=[{"a": None}]),
            JobCancel.model_validate({"job_id": "j", "reason": "client left", "n": [{"a": None}]}),
            id="unknown fields are kept",
        ),
        pytest.param(frame_text("job_ack", job_id="j"), JobAck(job_id="j"), id="job_ack"),
        pytest.param(frame_text("config_update"), ConfigUpdate(), id="config_update"),
        pytest.param(
            frame_text("config_update", models=None, job_id=7),
            ConfigUpdate.model_validate({"models": None, "job_id": 7}),
            id="config_update with anything in it",
        ),
    ],
)
def test_each_inbound_frame_decodes_to_its_model(text: str | bytes, expected: object) -> None:
    assert decode(text) == expected


@pytest.mark.parametrize("pad", ["", ',"n":' + LONG], ids=["orjson", "exact-integer path"])
def test_both_parsers_take_the_last_of_duplicate_keys(pad: str) -> None:
    frame = decode('{"type":"job_cancel","job_id":"a","job_id":"b"' + pad + "}")
    assert isinstance(frame, JobCancel) and frame.job_id == "b"


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"x\\ud800","n":' + LONG + "}",
        '{"type":"auth_ok","provider_id":"p\\ud800","n":' + LONG + "}",
        '{"type":"job","job_id":"j","model_id":"m","request":{"a":"\\ud800","n":' + LONG + "}}",
    ],
    ids=["type", "auth_ok", "job request"],
)
def test_a_lone_surrogate_escape_is_not_json_on_either_path(text: str) -> None:
    """orjson refuses `\\ud800`; the stdlib path (frames with a 19-digit run) is held to the same
    rule, so one frame does not decode two ways."""
    frame = decode(text)
    assert isinstance(frame, BadFrame) and frame.reason.startswith("not JSON")


FIELD_NAMES = sorted(
    {"type", "job_id", "model_id", "request", "format", "deadline_ms", "nonce", "provider_id"}
    | {"reason", "tokens", "duration_ms", "error_code", "message", "data", "tokens_emitted"}
)
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())  # surrogates included
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(ANY_CHARACTER, max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)
FRAMES = st.builds(
    lambda kind, fields: {**fields, "type": kind},
    st.sampled_from(sorted(KNOWN_TYPES)) | st.text(max_size=6) | JSON_VALUES,
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=7),
)


@given(
    st.text(ANY_CHARACTER, max_size=300)
    | st.builds(json.dumps, JSON_VALUES | FRAMES, ensure_ascii=st.booleans())
    | st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES | FRAMES)
)
def test_decode_never_raises_on_any_text_or_json_value(text: str | bytes) -> None:
    """Known types with fields of every JSON kind reach validation, not just the parser."""
    frame = decode(text)
    assert isinstance(frame, BadFrame | UnknownFrame) or frame.type in KNOWN_TYPES
    if isinstance(frame, BadFrame):
        assert frame.job_id is None or readable_job_id(frame.job_id) == frame.job_id
        assert frame.code == "bad_request" or frame.type == "job"
