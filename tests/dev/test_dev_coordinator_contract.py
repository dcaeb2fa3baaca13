"""The reference coordinator's pure parts: the contract checks, provider choice, `--listen`."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from provider_agent.dev.coordinator import (
    MAX_CHUNK_FRAME_BYTES,
    JobRecord,
    Refusal,
    check_agent_frame,
    chunk_problems,
    contract_problems,
    parse_listen,
    pick_provider,
    terminal_problems,
)
from provider_agent.link.protocol import (
    Capabilities,
    CapabilityLimits,
    CapabilityMetadata,
    JobDone,
    JobError,
    ModelOffer,
    TokenCounts,
)


def offer(model_id: object = "m", **changes: Any) -> dict[str, Any]:
    base = {
        "model_id": model_id,
        "input_per_1m": 300_000,
        "output_per_1m": 600_000,
        "max_concurrent": 4,
        "backend": "vllm",
        "formats": ["openai"],
    }
    return base | changes


def caps(*models: dict[str, Any], status: str = "ready", **changes: Any) -> dict[str, Any]:
    base = {
        "type": "capabilities",
        "models": list(models),
        "limits": {"max_concurrent_total": 8, "max_tokens_per_minute": None},
        "metadata": {"agent_version": "0.1.0", "status": status},
    }
    return base | changes


def beat(**changes: Any) -> dict[str, Any]:
    base = {
        "type": "heartbeat",
        "queue_depth": 0,
        "tokens_per_sec_p50": 41.5,
        "p50_latency_ms": 180,
        "p95_latency_ms": 420,
        "error_rate_60s": 0.0,
        "last_error_at": None,
        "last_error_code": None,
    }
    return base | changes


def done(job_id: str = "j", **changes: Any) -> dict[str, Any]:
    tokens = {"input": 3, "output": 2, "input_tokens": 3, "output_tokens": 2}
    return {"type": "job_done", "job_id": job_id, "tokens": tokens, "duration_ms": 5} | changes


def failed(job_id: str = "j", **changes: Any) -> dict[str, Any]:
    base = {
        "type": "job_error",
        "job_id": job_id,
        "error_code": "backend_error",
        "message": "upstream said 500",
        "tokens_emitted": 0,
    }
    return base | changes


def chunk(data: bytes = b"data: x\n\n", job_id: str = "j") -> dict[str, Any]:
    return {"type": "job_chunk", "job_id": job_id, "data": base64.b64encode(data).decode()}


def problems(frame: dict[str, Any] | str | bytes, *, handshake: bool = False) -> list[str]:
    text = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
    return list(check_agent_frame(text, handshake=handshake).problems)


def without(frame: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k not in keys}


# --- valid frames pass ---------------------------------------------------------------------------

VALID = {
    "capabilities": caps(offer("a", formats=["openai", "anthropic"]), offer("b")),
    "capabilities, every optional field": caps(
        offer(
            "a",
            context_window=8192,
            measured={
                "ttft_ms_p50": 180,
                "tokens_per_sec_p50": 41.5,
                "samples": 37,
                "window_s": 900,
            },
        ),
        limits={"max_concurrent_total": 4, "max_tokens_per_minute": 200_000},
        metadata={"agent_version": "0.1.0", "status": "ready", "hostname": "gpu-1"},
        extension={"anything": "additive"},
    ),
    "capabilities, unicode and spaces inside an id": caps(offer("Qwen 2.5 — 7B ü")),
    "capabilities, a 256-character id": caps(offer("x" * 256)),
    "capabilities, draining": caps(status="draining"),
    "capabilities, paused": caps(status="paused"),
    "heartbeat": beat(),
    "heartbeat, a failure": beat(
        last_error_at="2026-11-26T22:15:08.123Z", last_error_code="backend_timeout"
    ),
    "heartbeat, nanoseconds": beat(
        last_error_at="2026-11-26T22:15:08.123456789Z", last_error_code="connection_lost"
    ),
    "heartbeat, whole seconds and additive fields": beat(
        last_error_at="2026-11-26T22:15:08Z", last_error_code="internal", in_flight=0, status="ok"
    ),
    "heartbeat, gpus": beat(
        gpus=[
            {
                "index": 0,
                "healthy": True,
                "uuid": "GPU-1",
                "memory_total_mb": 81559,
                "memory_used_mb": 70211,
                "utilization_pct": 87,
                "temperature_c": 64,
                "power_w": 512.3,
            },
            {"index": 1, "healthy": False},
        ]
    ),
    "job_chunk": chunk(),
    "job_chunk, empty data": chunk(b""),
    "job_chunk, a 128-character id": chunk(job_id="j" * 128),
    "job_done": done(),
    "job_done, estimated": done(usage_source="estimated"),
    "job_error": failed(tokens_emitted=12),
    "job_error, every code": failed(error_code="cancelled"),
}


@pytest.mark.parametrize("frame", VALID.values(), ids=VALID.keys())
def test_frames_as_the_contract_describes_them_pass(frame: dict[str, Any]) -> None:
    verdict = check_agent_frame(orjson.dumps(frame).decode())
    assert verdict.problems == ()
    assert verdict.kind == frame["type"] and verdict.known


def test_unknown_types_are_ignored_not_violations() -> None:
    verdict = check_agent_frame('{"type":"from_the_future","x":1}')
    assert (verdict.kind, verdict.known, verdict.problems) == ("from_the_future", False, ())


def test_a_valid_chunk_comes_with_its_bytes() -> None:
    assert check_agent_frame(orjson.dumps(chunk(b"\x00\xffraw")).decode()).chunk == b"\x00\xffraw"


def test_this_packages_own_frames_pass() -> None:
    offers = [
        ModelOffer(model_id=m, input_per_1m=1, output_per_1m=2, max_concurrent=2, backend="ollama")
        for m in ("a", "b")
    ]
    frame = Capabilities(
        models=offers,
        limits=CapabilityLimits(max_concurrent_total=2, max_tokens_per_minute=None),
        metadata=CapabilityMetadata(agent_version="0.1.0"),
    )
    assert contract_problems(frame) == []
    counts = TokenCounts(input=1, output=1, input_tokens=1, output_tokens=1)
    assert contract_problems(JobDone(job_id="j", tokens=counts, duration_ms=0)) == []


# --- broken frames, class by class ---------------------------------------------------------------

BROKEN: dict[str, tuple[dict[str, Any] | str | bytes, str]] = {
    # not a frame at all
    "binary": (b'{"type":"heartbeat"}', "binary frame"),
    "empty": ("", "not JSON"),
    "not JSON": ("{", "not JSON"),
    "an array": ("[]", "not a JSON object"),
    "null": ("null", "not a JSON object"),
    "no type": ('{"job_id":"j"}', "no string `type`"),
    "a numeric type": ('{"type":5}', "no string `type`"),
    # the wrong direction
    "auth_ok": ('{"type":"auth_ok","provider_id":"x"}', "auth_ok is not a frame an agent sends"),
    "job": ('{"type":"job","job_id":"j"}', "job is not a frame an agent sends"),
    "job_ack": ('{"type":"job_ack","job_id":"j"}', "job_ack is not a frame an agent"),
    "config_update": ('{"type":"config_update"}', "config_update is not a frame an agent"),
    "auth_response again": (
        '{"type":"auth_response","pubkey":"a","signature":"b","agent_version":"1"}',
        "auth_response is not a frame an agent sends now",
    ),
    # capabilities: model ids
    "an empty id": (caps(offer("")), "invalid capabilities: models.0.model_id"),
    "a 257-character id": (caps(offer("x" * 257)), "invalid capabilities: models.0.model_id"),
    "a newline in an id": (caps(offer("a\nb")), "model_id has control or unprintable"),
    "a NUL in an id": (caps(offer("a\x00")), "model_id has control or unprintable"),
    "an ANSI escape in an id": (caps(offer("\x1b[31mred")), "model_id has control or unprintable"),
    "a zero-width space in an id": (caps(offer("a\u200bb")), "model_id has control or unprintable"),
    "a blank id": (caps(offer(" ")), "model_id is only whitespace"),
    "a numeric id": (caps(offer(7)), "invalid capabilities: models.0.model_id"),
    # capabilities: the list
    "unsorted": (caps(offer("b"), offer("a")), "capabilities.models not sorted by model_id"),
    "duplicate ids": (caps(offer("a"), offer("a")), "capabilities.models has duplicate model_id"),
    "draining with models": (
        caps(offer("a"), status="draining"),
        "capabilities: draining but models is not empty",
    ),
    "paused with models": (
        caps(offer("a"), status="paused"),
        "capabilities: paused but models is not empty",
    ),
    # capabilities: one offer's fields
    "formats missing": (
        caps(without(offer(), "formats")),
        "invalid capabilities: models.0.formats",
    ),
    "formats empty": (caps(offer(formats=[])), "invalid capabilities: models.0.formats"),
    "an unknown format": (caps(offer(formats=["grpc"])), "invalid capabilities: models.0.formats"),
    "a repeated format": (caps(offer(formats=["openai", "openai"])), "formats repeats a format"),
    "context_window null": (caps(offer(context_window=None)), "context_window is null"),
    "context_window 0": (caps(offer(context_window=0)), "models.0.context_window"),
    "measured null": (caps(offer(measured=None)), "measured is null"),
    "measured without samples": (
        caps(
            offer(measured={"ttft_ms_p50": 1, "tokens_per_sec_p50": 1, "samples": 0, "window_s": 9})
        ),
        "models.0.measured.samples",
    ),
    "a negative price": (caps(offer(input_per_1m=-1)), "models.0.input_per_1m"),
    "a fractional price": (caps(offer(output_per_1m=1.5)), "invalid capabilities: models.0.output"),
    "a price in quotes": (caps(offer(input_per_1m="300000")), "capabilities is loosely typed"),
    "max_concurrent 0": (caps(offer(max_concurrent=0)), "models.0.max_concurrent"),
    "max_concurrent above the total": (
        caps(offer(max_concurrent=9)),
        "max_concurrent above limits.max_concurrent_total",
    ),
    "an empty backend": (caps(offer(backend="")), "models.0.backend"),
    # capabilities: limits and metadata
    "status missing": (
        caps(metadata={"agent_version": "0.1.0"}),
        "invalid capabilities: metadata.status",
    ),
    "an unknown status": (caps(status="busy"), "invalid capabilities: metadata.status"),
    "max_tokens_per_minute missing": (
        caps(limits={"max_concurrent_total": 8}),
        "limits.max_tokens_per_minute",
    ),
    "max_tokens_per_minute 0": (
        caps(limits={"max_concurrent_total": 8, "max_tokens_per_minute": 0}),
        "limits.max_tokens_per_minute",
    ),
    "models missing": (without(caps(), "models"), "invalid capabilities: models"),
    # heartbeat: fields and types
    "a heartbeat field missing": (without(beat(), "p95_latency_ms"), "invalid heartbeat"),
    "a nullable field left out": (without(beat(), "last_error_at"), "last_error_at"),
    "a number in quotes": (beat(queue_depth="2"), "heartbeat is loosely typed: queue_depth"),
    "a boolean for a number": (beat(queue_depth=True), "heartbeat is loosely typed: queue_depth"),
    "a fractional queue depth": (beat(queue_depth=1.5), "invalid heartbeat: queue_depth"),
    "a negative latency": (beat(p50_latency_ms=-1, p95_latency_ms=0), "p50_latency_ms"),
    "an error rate above 1": (beat(error_rate_60s=1.5), "error_rate_60s"),
    "p95 below p50": (beat(p50_latency_ms=400, p95_latency_ms=300), "p95_latency_ms below p50"),
    # heartbeat: the last error
    "a time without a code": (
        beat(last_error_at="2026-11-26T22:15:08Z"),
        "disagree on null",
    ),
    "a code without a time": (beat(last_error_code="backend_error"), "disagree on null"),
    "an offset instead of Z": (
        beat(last_error_at="2026-11-26T22:15:08+00:00", last_error_code="internal"),
        "not ISO-8601 UTC ending in Z",
    ),
    "no zone": (
        beat(last_error_at="2026-11-26T22:15:08", last_error_code="internal"),
        "not ISO-8601 UTC ending in Z",
    ),
    "a space for the T": (
        beat(last_error_at="2026-11-26 22:15:08Z", last_error_code="internal"),
        "not ISO-8601 UTC ending in Z",
    ),
    "month 13": (
        beat(last_error_at="2026-13-01T00:00:00Z", last_error_code="internal"),
        "not ISO-8601 UTC ending in Z",
    ),
    "a refusal as the last error": (
        beat(last_error_at="2026-11-26T22:15:08Z", last_error_code="out_of_capacity"),
        "out_of_capacity is not a serving-side failure",
    ),
    "an unknown error code": (
        beat(last_error_at="2026-11-26T22:15:08Z", last_error_code="oops"),
        "invalid heartbeat: last_error_code",
    ),
    # heartbeat: gpus
    "a gpu without healthy": (beat(gpus=[{"index": 0}]), "invalid heartbeat: gpus.0.healthy"),
    "a gpu over 100 %": (
        beat(gpus=[{"index": 0, "healthy": True, "utilization_pct": 150}]),
        "gpus.0.utilization_pct",
    ),
    "a gpu using more than it has": (
        beat(gpus=[{"index": 0, "healthy": True, "memory_total_mb": 8, "memory_used_mb": 9}]),
        "gpus[0].memory_used_mb above memory_total_mb",
    ),
    "two gpus with one index": (
        beat(gpus=[{"index": 0, "healthy": True}, {"index": 0, "healthy": True}]),
        "heartbeat.gpus has duplicate index",
    ),
    # job_chunk
    "a chunk that is not base64": (
        {"type": "job_chunk", "job_id": "j", "data": "!!"},
        "job_chunk.data is not base64",
    ),
    "a chunk with non-ASCII data": (
        {"type": "job_chunk", "job_id": "j", "data": "é"},
        "job_chunk.data is not base64",
    ),
    "a chunk without data": ({"type": "job_chunk", "job_id": "j"}, "invalid job_chunk: data"),
    "a chunk with an empty job_id": (chunk(job_id=""), "invalid job_chunk: job_id"),
    "a chunk with a 129-character job_id": (chunk(job_id="j" * 129), "invalid job_chunk: job_id"),
    "a chunk over 1 MiB": (chunk(b"x" * (MAX_CHUNK_FRAME_BYTES * 3 // 4)), "over the 1 MiB"),
    # job_done and job_error
    "tokens that disagree": (
        done(tokens={"input": 3, "output": 2, "input_tokens": 3, "output_tokens": 9}),
        "job_done.tokens: input/output differ",
    ),
    "a tokens field missing": (
        done(tokens={"input": 3, "output": 2, "input_tokens": 3}),
        "invalid job_done: tokens.output_tokens",
    ),
    "a negative duration": (done(duration_ms=-1), "invalid job_done: duration_ms"),
    "an unknown usage_source": (done(usage_source="guessed"), "invalid job_done: usage_source"),
    "a done without job_id": (without(done(), "job_id"), "invalid job_done: job_id"),
    "an unknown error_code": (failed(error_code="exploded"), "invalid job_error: error_code"),
    "tokens_emitted missing": (without(failed(), "tokens_emitted"), "tokens_emitted"),
    "tokens_emitted negative": (failed(tokens_emitted=-1), "tokens_emitted"),
}


@pytest.mark.parametrize(("frame", "reason"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_frames_get_one_reason_that_says_what(
    frame: dict[str, Any] | str | bytes, reason: str
) -> None:
    found = problems(frame)
    assert len(found) == 1, found
    assert reason in found[0], found


def test_many_missing_fields_are_one_problem_naming_them() -> None:
    [reason] = problems('{"type":"heartbeat","queue_depth":1}')
    assert reason.startswith("invalid heartbeat: tokens_per_sec_p50: Field required")
    assert reason.endswith("(and 3 more)")


def test_a_chunk_of_exactly_1_mib_passes_and_multibyte_ids_count_in_bytes() -> None:
    frame = chunk(b"", job_id="j")
    frame["job_id"] += "j" * ((MAX_CHUNK_FRAME_BYTES - len(orjson.dumps(frame))) % 4)
    frame["data"] = "A" * (MAX_CHUNK_FRAME_BYTES - len(orjson.dumps(frame)))
    assert len(orjson.dumps(frame)) == MAX_CHUNK_FRAME_BYTES
    assert problems(frame) == []
    frame["job_id"] = "é" + frame["job_id"][1:]  # as many characters, one byte more
    assert problems(frame) == [
        f"job_chunk is {MAX_CHUNK_FRAME_BYTES + 1} bytes, over the 1 MiB one frame may carry"
    ]


def test_the_handshake_expects_an_auth_response() -> None:
    response = {"type": "auth_response", "pubkey": "a", "signature": "b", "agent_version": "1"}
    assert problems(response, handshake=True) == []
    assert problems(response | {"enrollment_code": "POD-ENROLL-1"}, handshake=True) == []
    assert problems(beat(), handshake=True) == [
        "handshake: expected auth_response (got type=heartbeat)"
    ]
    assert problems("nope", handshake=True)[0].startswith("handshake: not JSON")
    [loose] = problems(response | {"agent_version": 1}, handshake=True)
    assert loose.startswith("handshake: invalid auth_response: agent_version")
    [missing] = problems(without(response, "signature"), handshake=True)
    assert missing.startswith("handshake: invalid auth_response: signature")


# --- the per-job rules ---------------------------------------------------------------------------


def sent(job_id: str = "j", provider_id: str = "p", **changes: Any) -> JobRecord:
    record = JobRecord(job_id=job_id, provider_id=provider_id, dispatched_at=1.0, sent=1, sent_on=1)
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def job_done(job_id: str = "j", output: int = 2) -> JobDone:
    counts = TokenCounts(input=3, output=output, input_tokens=3, output_tokens=output)
    return JobDone(job_id=job_id, tokens=counts, duration_ms=5)


def job_error(tokens_emitted: int = 0, code: str = "backend_error") -> JobError:
    return JobError(job_id="j", error_code=code, message="x", tokens_emitted=tokens_emitted)


CHUNKS: dict[str, tuple[JobRecord | None, list[str]]] = {
    "a job sent to this agent": (sent(), []),
    "an unknown job": (None, ["job_chunk for a job not sent to this agent: j"]),
    "a job known only from a terminal frame": (
        sent(dispatched_at=None),
        ["job_chunk for a job not sent to this agent: j"],
    ),
    "another agent's job": (
        sent(provider_id="other"),
        ["job_chunk for a job not sent to this agent: j"],
    ),
    "a finished job": (sent(terminal=job_done()), ["job_chunk after the terminal frame: j"]),
}


@pytest.mark.parametrize(("job", "expected"), CHUNKS.values(), ids=CHUNKS.keys())
def test_chunks_belong_to_a_running_job_of_this_agent(
    job: JobRecord | None, expected: list[str]
) -> None:
    assert chunk_problems(job, "p", "j") == expected


TERMINALS: dict[str, tuple[JobRecord | None, JobDone | JobError, int, list[str]]] = {
    "the first terminal": (sent(), job_done(), 1, []),
    "unknown here (sent before a restart)": (None, job_done(), 1, []),
    "the same frame again": (sent(terminal=job_done()), job_done(), 2, []),
    "a different frame again": (
        sent(terminal=job_done()),
        job_done(output=3),
        1,
        ["resent terminal frame differs: j"],
    ),
    "an error after a done": (
        sent(terminal=job_done()),
        job_error(),
        1,
        ["resent terminal frame differs: j"],
    ),
    "another agent's job": (
        sent(provider_id="other"),
        job_done(),
        1,
        ["terminal frame for another provider's job j"],
    ),
    "tokens_emitted matching the bytes": (sent(bytes_relayed=12), job_error(12), 1, []),
    "tokens_emitted not matching the bytes": (
        sent(bytes_relayed=12),
        job_error(5),
        1,
        ["job_error.tokens_emitted is 5 but 12 bytes came in job_chunk frames: j"],
    ),
    "bytes on another connection": (sent(bytes_relayed=12), job_error(0), 2, []),
    "chunks that came elsewhere": (
        sent(bytes_relayed=12, chunks_elsewhere=True),
        job_error(0),
        1,
        [],
    ),
    "a job sent twice": (sent(bytes_relayed=12, sent=2), job_error(0), 1, []),
}


@pytest.mark.parametrize(
    ("job", "frame", "attempt", "expected"), TERMINALS.values(), ids=TERMINALS.keys()
)
def test_one_terminal_frame_per_job_and_repeats_identical(
    job: JobRecord | None, frame: JobDone | JobError, attempt: int, expected: list[str]
) -> None:
    assert terminal_problems(job, "p", frame, attempt) == expected


# --- choosing the provider -----------------------------------------------------------------------


def model_offer(model_id: str, *formats: str) -> ModelOffer:
    return ModelOffer.model_validate(offer(model_id, formats=list(formats or ("openai",))))


def test_the_least_busy_provider_serving_model_and_format_is_picked() -> None:
    offers = {
        "p1": {"m": model_offer("m", "openai")},
        "p2": {"m": model_offer("m", "openai", "anthropic")},
        "p3": {"other": model_offer("other")},
    }
    assert pick_provider(offers, {}, "m", "openai") == "p1"  # a tie: the lowest id
    assert pick_provider(offers, {"p1": 2, "p2": 1}, "m", "openai") == "p2"
    assert pick_provider(offers, {}, "m", "anthropic") == "p2"
    assert pick_provider(offers, {}, "m", "openai", pinned="p2") == "p2"
    assert pick_provider(offers, {}, "m", "openai", pinned="p3") == Refusal(
        404, "model_not_found", "no connected agent serves model 'm'"
    )
    assert pick_provider(offers, {}, "other", "anthropic") == Refusal(
        400, "unsupported_format", "no agent serves 'other' as anthropic"
    )
    assert isinstance(pick_provider({}, {}, "m", "openai"), Refusal)


# --- --listen ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8765", ("::1", 8765)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "must be HOST:PORT"),
        ("nonsense", "must be HOST:PORT"),
        (":80", "must be HOST:PORT"),
        (":80x", "must be HOST:PORT"),
        ("127.0.0.1:", "port must be a number from 0 to 65535"),
        ("127.0.0.1:99999", "port must be a number from 0 to 65535"),
        ("127.0.0.1:123456", "port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "port must be a number from 0 to 65535"),
        ("127.0.0.1:+80", "port must be a number from 0 to 65535"),
        ("127.0.0.1: 80", "port must be a number from 0 to 65535"),
        ("127.0.0.1:٨٠", "port must be a number from 0 to 65535"),
        ("::1:8765", "IPv6 address in brackets"),
        ("[::1:8765", "IPv6 address in brackets"),
        ("[]:80", "is not a host name or address"),
        ("a b:80", "is not a host name or address"),
        ("host\x1b[2J:80", "is not a host name or address"),
        ("user@host:80", "is not a host name or address"),
        ("http://host:80", "is not a host name or address"),
    ],
)
def test_bad_listen_addresses_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="--listen") as refused:
        parse_listen(text)
    message = str(refused.value)
    assert says in message
    assert "\n" not in message and "\x1b" not in message


def test_a_huge_listen_value_is_cut_in_the_message() -> None:
    with pytest.raises(ValueError, match="--listen") as refused:
        parse_listen("h" * 100_000)
    assert len(str(refused.value)) < 200
