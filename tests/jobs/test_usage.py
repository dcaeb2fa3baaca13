"""Usage, end markers and error events read incrementally from recorded upstream streams —
the same answer however the bytes are split."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_agent.config.schema import WireFormat
from provider_agent.jobs.usage import (
    MAX_LINE_BYTES,
    Usage,
    UsageMeter,
    estimate_input_tokens,
    text_chars,
)
from tests.conftest import fixture_bytes

REQUEST: dict[str, Any] = {"messages": [{"role": "user", "content": "hello"}]}

#: fixture → (format, usage, ended, error substring or None)
RECORDED: dict[str, tuple[WireFormat, Usage, bool, str | None]] = {
    "vllm/chat-stream-usage.sse": ("openai", Usage(42, 8, False), True, None),
    "llamacpp/chat-stream-usage.sse": ("openai", Usage(21, 9, False), True, None),
    "lmstudio/chat-stream-usage.sse": ("openai", Usage(24, 8, False), True, None),
    "ollama/v1-chat-stream-usage.sse": ("openai", Usage(26, 8, False), True, None),
    "openrouter/chat-stream.sse": ("openai", Usage(14, 8, False), True, None),
    "venice/chat-stream.sse": ("openai", Usage(30, 8, False), True, None),
    "anthropic/messages-stream.sse": ("anthropic", Usage(25, 9, False), True, None),
    "llamacpp/messages-stream.sse": ("anthropic", Usage(21, 9, False), True, None),
    "ollama/messages-stream.sse": ("anthropic", Usage(26, 8, False), True, None),
    # llama-cpp-python sends no usage: 4 token deltas (one of them empty), "hello" → 2 + 4.
    "llamacpp-python/chat-stream-include-usage.sse": ("openai", Usage(6, 4, True), True, None),
    # Errors mid-stream: vLLM and Venice still send [DONE], llama.cpp and OpenRouter do not.
    "vllm/chat-stream-error.sse": ("openai", Usage(6, 2, True), True, "internal error"),
    "venice/chat-stream-error.sse": ("openai", Usage(6, 2, True), True, "overloaded"),
    "llamacpp/chat-stream-error.sse": ("openai", Usage(6, 2, True), False, "decode the batch"),
    "openrouter/chat-stream-error.sse": (
        "openai",
        Usage(6, 2, True),
        False,
        "Provider disconnected unexpectedly",
    ),
    "anthropic/messages-stream-error.sse": ("anthropic", Usage(25, 0, True), False, "Overloaded"),
}


def summary(meter: UsageMeter) -> tuple[Usage, bool, str | None, int]:
    return meter.result(), meter.ended, meter.error, meter.output_so_far


def fed(fmt: WireFormat, pieces: list[bytes], request: dict[str, Any] = REQUEST) -> UsageMeter:
    meter = UsageMeter(fmt, request)
    for piece in pieces:
        meter.feed(piece)
    return meter


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("fixture", sorted(RECORDED))
def test_recorded_streams_whole_and_byte_by_byte(fixture: str) -> None:
    fmt, usage, ended, error = RECORDED[fixture]
    data = fixture_bytes(fixture)
    whole = fed(fmt, [data])
    assert whole.result() == usage
    assert whole.ended is ended
    if error is None:
        assert whole.error is None
    else:
        assert whole.error is not None and error in whole.error
    assert summary(fed(fmt, [data[i : i + 1] for i in range(len(data))])) == summary(whole)
    crlf = data.replace(b"\n", b"\r\n")
    assert summary(fed(fmt, [crlf])) == summary(whole)


@settings(max_examples=40, deadline=None)
@given(
    fixture=st.sampled_from(sorted(RECORDED)),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
)
def test_any_split_gives_the_same_answer(fixture: str, cuts: list[int]) -> None:
    fmt = RECORDED[fixture][0]
    data = fixture_bytes(fixture)
    assert summary(fed(fmt, split_at(data, cuts))) == summary(fed(fmt, [data]))


def test_output_so_far_grows_as_content_streams() -> None:
    data = fixture_bytes("vllm/chat-stream-usage.sse")
    meter = UsageMeter("openai", REQUEST)
    seen = []
    for line in data.splitlines(keepends=True):
        meter.feed(line)
        seen.append(meter.output_so_far)
    assert seen == sorted(seen)
    assert seen[-1] == 8  # the usage chunk's count once it arrives
    assert 0 < seen[-5] < 8  # counted from the deltas before the usage chunk came


def sse(*events: dict[str, Any] | str, event: str | None = None) -> bytes:
    out = b""
    for item in events:
        data = item.encode() if isinstance(item, str) else orjson.dumps(item)
        out += (f"event: {event}\n".encode() if event else b"") + b"data: " + data + b"\n\n"
    return out


def test_llamacpp_cache_hits_count_as_input() -> None:
    chunk = {
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
        "timings": {"prompt_n": 5, "cache_n": 100, "predicted_n": 3},
    }
    assert fed("openai", [sse(chunk, "[DONE]")]).result() == Usage(105, 3, False)


def test_timings_stand_in_for_a_missing_usage_object() -> None:
    chunk = {"choices": [], "timings": {"prompt_n": 7, "cache_n": 2, "predicted_n": 11}}
    assert fed("openai", [sse(chunk, "[DONE]")]).result() == Usage(9, 11, False)


def test_openai_usage_already_includes_cached_prompt_tokens() -> None:
    chunk = {
        "choices": [],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 40},
        },
    }
    assert fed("openai", [sse(chunk, "[DONE]")]).result() == Usage(50, 4, False)


def test_running_usage_on_every_chunk_keeps_the_last() -> None:
    chunks = [
        {
            "choices": [{"delta": {"content": "a"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": n},
        }
        for n in (1, 2, 3)
    ]
    assert fed("openai", [sse(*chunks, "[DONE]")]).result() == Usage(9, 3, False)


def test_anthropic_input_adds_cache_creation_and_reads() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 3,
                "cache_creation_input_tokens": 1000,
                "cache_read_input_tokens": 200,
                "output_tokens": 1,
            }
        },
    }
    delta = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 12}}
    stream = sse(start) + sse(delta) + sse({"type": "message_stop"}, event="message_stop")
    assert fed("anthropic", [stream]).result() == Usage(1203, 12, False)


def test_anthropic_event_name_stands_in_for_a_missing_type() -> None:
    stream = (
        b'event: content_block_delta\ndata: {"delta":{"type":"text_delta","text":"hey"}}\n\n'
        b"event: message_stop\ndata: {}\n\n"
    )
    meter = fed("anthropic", [stream])
    assert meter.ended
    assert meter.output_so_far == 1


def test_llamacpp_anthropic_error_event_has_its_own_shape() -> None:
    stream = sse(
        {"code": 500, "message": "failed to decode", "type": "server_error"}, event="error"
    )
    meter = fed("anthropic", [stream])
    assert meter.error == "failed to decode"
    assert not meter.ended


def test_the_first_error_wins_and_is_printable() -> None:
    first = {"error": {"message": "boom\n\x1b[31m" + "x" * 1000}}
    meter = fed("openai", [sse(first, {"error": "second"}, "[DONE]")])
    assert meter.error is not None
    assert meter.error.startswith("boom \\x1b[31m")
    assert len(meter.error) <= 300 and meter.error.isprintable()
    assert fed("openai", [sse({"error": {}})]).error == "an error event without a message"
    assert fed("openai", [sse({"error": None, "choices": []})]).error is None


def test_done_means_nothing_to_anthropic_and_message_stop_nothing_to_openai() -> None:
    assert not fed("anthropic", [b"data: [DONE]\n\n"]).ended
    assert not fed("openai", [sse({"type": "message_stop"}, event="message_stop")]).ended


def test_comments_ids_retries_and_garbage_are_skipped() -> None:
    stream = (
        b": keepalive\n\nid: 7\nretry: 100\n\n"
        b"data: not json\n\ndata: [1,2]\n\ndata: \xff\xfe\n\ndata:\n\n"
        b'data:{"choices":[{"delta":{"content":"ok"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    meter = fed("openai", [stream])
    assert meter.ended and meter.error is None
    assert meter.result() == Usage(6, 1, True)


def test_an_unterminated_last_line_is_not_an_event() -> None:
    assert not fed("openai", [b"data: [DONE]"]).ended  # SSE: an event ends with its line


def test_an_oversize_line_is_dropped_and_the_stream_goes_on() -> None:
    huge = b'data: {"choices":[{"delta":{"content":"' + b"x" * MAX_LINE_BYTES + b'"}}]}\n\n'
    tail = sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}, "[DONE]")
    pieces = [huge[i : i + 65536] for i in range(0, len(huge), 65536)] + [tail]
    meter = fed("openai", pieces)
    assert meter.ended
    assert meter.result() == Usage(1, 2, False)
    assert meter._partial_size == 0  # nothing of the dropped line is kept


# --- estimates --------------------------------------------------------------------------------


def test_output_estimate_counts_deltas_or_characters_whichever_is_more() -> None:
    one_big = {"choices": [{"delta": {"content": "x" * 40}}]}
    many_small = [{"choices": [{"delta": {"content": "a"}}]}] * 5
    assert fed("openai", [sse(one_big)]).result().output == 10
    assert fed("openai", [sse(*many_small)]).result().output == 5


def test_role_and_finish_chunks_are_not_tokens_but_an_empty_token_is() -> None:
    chunks: list[dict[str, Any]] = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"delta": {"content": ""}, "finish_reason": None}]},
        {"choices": [{"delta": {"reasoning_content": "hm"}, "finish_reason": None}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]},
        {"choices": [{"delta": {"content": ""}, "finish_reason": "stop"}]},
    ]
    assert fed("openai", [sse(*chunks)]).result().output == 3


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [
        ({}, 0),
        ({"messages": []}, 0),
        ({"messages": "garbage"}, 0),
        ({"messages": [{"role": "user", "content": "12345678"}]}, 2 + 4),
        ({"messages": [{"role": "user", "content": None}, "junk"]}, 4),
        (
            {
                "system": [{"type": "text", "text": "abcd"}],
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"x": 1}]},
                    {"role": "assistant", "content": "abcd"},
                ],
            },
            3 + 8,
        ),
        ({"prompt": "abcdefgh"}, 2),
    ],
)
def test_input_estimate(request_body: dict[str, Any], expected: int) -> None:
    assert estimate_input_tokens(request_body) == expected


def test_text_chars_survives_deep_nesting() -> None:
    nested: Any = "abc"
    for _ in range(10_000):
        nested = [{"content": nested}]
    assert text_chars(nested) == 3


# --- figures no backend can mean (protocol.md §8): not believed, the job is estimated ---------

ABSURD = [10**12 + 1, 2**63 - 1, 2**63, 2**64, 10**30]


@pytest.mark.parametrize("figure", ABSURD)
@pytest.mark.parametrize(
    ("fmt", "report", "field"),
    [
        (
            "openai",
            lambda n: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}},
            "completion_tokens",
        ),
        (
            "openai",
            lambda n: {"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 3}},
            "prompt_tokens",
        ),
        (
            "openai",
            lambda n: {"choices": [], "timings": {"prompt_n": 3, "predicted_n": n}},
            "predicted_n",
        ),
        (
            "openai",
            lambda n: {"choices": [], "timings": {"prompt_n": 3, "cache_n": n, "predicted_n": 2}},
            "cache_n",
        ),
        (
            "anthropic",
            lambda n: {"type": "message_delta", "usage": {"output_tokens": n}},
            "output_tokens",
        ),
        (
            "anthropic",
            lambda n: {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 1, "cache_read_input_tokens": n}},
            },
            "cache_read_input_tokens",
        ),
    ],
)
def test_a_count_beyond_10_to_the_12_is_not_believed_and_the_job_is_estimated(
    fmt: WireFormat, report: Any, field: str, figure: int
) -> None:
    body = json_sse(report(figure))
    body += sse({"type": "message_stop"}) if fmt == "anthropic" else sse("[DONE]")
    meter = fed(fmt, [body])
    usage = meter.result()
    assert usage.estimated and meter.disbelieved == (field,)
    assert 0 <= usage.input < 10**12 and 0 <= usage.output < 10**12
    assert usage == Usage(estimate_input_tokens(REQUEST), 0, True)


def test_the_largest_believed_count_is_10_to_the_12() -> None:
    chunk = {"choices": [], "usage": {"prompt_tokens": 10**12, "completion_tokens": 0}}
    meter = fed("openai", [sse(chunk, "[DONE]")])
    assert meter.result() == Usage(10**12, 0, False) and meter.disbelieved == ()


def test_three_anthropic_input_parts_that_add_up_beyond_10_to_the_12_are_not_believed() -> None:
    usage = {key: 4 * 10**11 for key in ("input_tokens", "cache_creation_input_tokens")}
    usage["cache_read_input_tokens"] = 4 * 10**11
    events = sse({"type": "message_start", "message": {"usage": usage}}, {"type": "message_stop"})
    meter = fed("anthropic", [events])
    assert meter.result().estimated and meter.disbelieved == ("input_tokens",)


def json_sse(event: dict[str, Any]) -> bytes:
    """One SSE event whose JSON holds integers of any size (orjson writes at most 64 bits)."""
    import json

    return b"data: " + json.dumps(event).encode() + b"\n\n"
