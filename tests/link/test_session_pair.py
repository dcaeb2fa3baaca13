"""A bare `Session` against a scripted coordinator: what reaches the `InboundSink`, what the
agent writes and when it counts as delivered, and how a connection ends (`session_pair.py`)."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

from provider_agent.clock import Timings
from provider_agent.errors import FaultKind
from provider_agent.link.identity import load
from provider_agent.link.protocol import (
    Capabilities,
    CapabilityLimits,
    CapabilityMetadata,
    Heartbeat,
    Job,
    JobAck,
    JobCancel,
    JobChunk,
    JobDone,
    JobError,
    ModelOffer,
    TokenCounts,
    encode,
)
from tests.link.session_pair import (
    PAIR_TIMINGS,
    STEP_S,
    Decoded,
    SessionPair,
    plain_heartbeat,
)


def done_frame(job_id: str) -> str:
    tokens = TokenCounts(input=3, output=5, input_tokens=3, output_tokens=5)
    return encode(JobDone(job_id=job_id, tokens=tokens, duration_ms=12))


def error_frame(job_id: str) -> str:
    return encode(JobError(job_id=job_id, error_code="backend_error", message="boom"))


# --- inbound: what reaches the sink --------------------------------------------------------------


async def test_a_job_frame_reaches_submit_with_its_fields(tmp_path: Path) -> None:
    """Every field of a `job` arrives as sent, extras included (the protocol grows additively),
    and `null` format/deadline mean their defaults (protocol.md §8)."""
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        await peer.send(
            {
                "type": "job",
                "job_id": "job-1",
                "model_id": "meta-llama/Llama-3.1-8B-Instruct",
                "request": request,
                "format": "anthropic",
                "deadline_ms": 1234,
                "priority": "high",
            }
        )
        await peer.send(
            {
                "type": "job",
                "job_id": "job-2",
                "model_id": "m",
                "request": {},
                "format": None,
                "deadline_ms": None,
            }
        )
        first = await pair.sink.job("job-1")
        second = await pair.sink.job("job-2")
        assert pair.sink.calls == [("submit", "job-1"), ("submit", "job-2")]
    assert first.model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert first.request == request
    assert first.format == "anthropic" and first.deadline_ms == 1234
    assert first.model_extra == {"priority": "high"}
    assert (second.format, second.deadline_ms) == ("openai", 60000)


async def test_a_job_cancel_reaches_cancel(tmp_path: Path) -> None:
    """`job_cancel` is handed over as the job id alone, in order with the job it cancels."""
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        await peer.send(Job(job_id="job-1", model_id="m", request={}))
        await peer.send(JobCancel(job_id="job-1"))
        await pair.sink.wait_for(lambda s: s.cancels)
        assert pair.sink.calls == [("submit", "job-1"), ("cancel", "job-1")]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"model_id": "m", "request": "not an object"}, "bad_request"),
        ({"model_id": "m", "request": {}, "deadline_ms": "60000"}, "bad_request"),
        ({"request": {}}, "bad_request"),
        ({"model_id": "m", "request": {}, "format": "gemini"}, "unsupported_format"),
    ],
)
async def test_a_malformed_job_with_a_readable_job_id_is_rejected(
    tmp_path: Path, fields: dict[str, object], code: str
) -> None:
    """A broken `job` whose job_id can be answered goes to `reject` with the code protocol.md §8
    names (never to `submit`), and the session goes on."""
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        await peer.send({"type": "job", "job_id": "bad-1", **fields})
        await peer.send(Job(job_id="good-1", model_id="m", request={}))
        await pair.sink.job("good-1")
        assert pair.sink.calls == [("reject", "bad-1"), ("submit", "good-1")]
        assert pair.sink.lost == 0 and pair.session.attempts == 1
    [(job_id, reason, got)] = pair.sink.rejects
    assert (job_id, got) == ("bad-1", code)
    assert reason.startswith("invalid job: ")


async def test_frames_without_an_answerable_job_id_and_unknown_types_do_not_end_the_session(
    tmp_path: Path,
) -> None:
    """Garbage after auth is logged and dropped: nothing reaches the sink, the connection stays,
    and the job sent after it still arrives (the reader handles frames in order)."""
    garbage: list[str | bytes | dict[str, object]] = [
        {"type": "job", "model_id": "m", "request": {}},  # no job_id
        {"type": "job", "job_id": "", "model_id": "m", "request": {}},  # unanswerable job_id
        {"type": "job", "job_id": "x" * 129, "model_id": "m", "request": {}},
        {"type": "job_cancel"},
        {"type": "job_ack"},
        {"type": "mystery", "job_id": "job-0"},  # an unknown type, even with a job_id
        {"type": "job_done", "job_id": "job-0"},  # malformed, a job_id, but not a `job`
        {"type": "heartbeat", "job_id": "job-0"},
        {"type": "config_update"},
        {"type": "auth_ok", "provider_id": "prov_other"},  # a handshake frame, too late
        "not json",
        "[]",
        b"\x00\xff binary",
    ]
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        for frame in garbage:
            await peer.send(frame)
        await peer.send(Job(job_id="after", model_id="m", request={}))
        await pair.sink.job("after")
        assert pair.session.authenticated
        assert pair.sink.calls == [("submit", "after")]
    assert pair.session.attempts == 1 and pair.coordinator.authenticated == 1
    assert pair.session.core.provider_id == "prov_pair"  # the late auth_ok changed nothing


# --- outbound: written, then confirmed -----------------------------------------------------------


async def test_terminal_frames_are_written_then_confirmed_by_the_pong(tmp_path: Path) -> None:
    """Terminal frames leave in order after the connection's first frames; the ping sent after
    them confirms both once its pong returns."""
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        pair.outbound.terminal("job-1", done_frame("job-1"))
        pair.outbound.terminal("job-2", error_frame("job-2"))
        first = await peer.recv_type("job_done")
        second = await peer.recv()
        await pair.sink.confirmation_of("job-1", "job-2")
    assert isinstance(first, JobDone) and first.job_id == "job-1"
    assert isinstance(second, JobError) and second.job_id == "job-2"
    assert sorted(pair.sink.confirmed_ids) == ["job-1", "job-2"]  # each once
    assert peer.pings >= 1


async def test_nothing_is_confirmed_before_the_coordinator_answers_the_ping(
    tmp_path: Path,
) -> None:
    """Written is not delivered: while the coordinator reads nothing (so answers no ping) the
    frames stay unconfirmed, however long the agent waits; its pong then confirms them."""
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        await peer.recv_type("heartbeat")  # the connection's first frames are through
        peer.pause_reading()
        pair.outbound.terminal("job-1", done_frame("job-1"))
        await pair.written()  # written and pinged: only the pong is missing
        assert pair.sink.confirmations == []
        peer.resume_reading()
        await peer.recv_type("job_done")
        await pair.sink.confirmation_of("job-1")
    assert pair.sink.confirmations == [("job-1",)]


async def test_after_one_job_ack_only_job_acks_confirm(tmp_path: Path) -> None:
    """A coordinator that sends `job_ack` confirms that way from then on: the agent stops
    pinging after terminal frames, and a written frame waits for its own ack."""
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        pair.outbound.terminal("job-a", done_frame("job-a"))
        await peer.recv_type("job_done")
        await pair.sink.confirmation_of("job-a")  # by the pong: no ack seen yet
        pings = peer.pings
        assert pings >= 1
        await peer.send(JobAck(job_id="job-a"))
        await pair.sink.wait_for(lambda s: len(s.confirmations) == 2)

        pair.outbound.terminal("job-b", done_frame("job-b"))
        assert (await peer.recv()).type == "job_done"
        # A frame queued now leaves in the writer's next batch, after any ping for job-b: once
        # it is read, such a ping would have been read (and answered) too.
        pair.outbound.control("heartbeat", encode(plain_heartbeat()))
        assert (await peer.recv()).type == "heartbeat"
        assert peer.pings == pings  # no ping after job-b: only its ack can confirm it
        assert "job-b" not in pair.sink.confirmed_ids
        await peer.send(JobAck(job_id="job-b"))
        await pair.sink.confirmation_of("job-b")
    assert pair.sink.confirmations == [("job-a",), ("job-a",), ("job-b",)]


async def test_a_pong_that_comes_back_after_the_first_job_ack_confirms_nothing(
    tmp_path: Path,
) -> None:
    """The switch to acks is immediate: a ping sent before the first `job_ack` may be answered
    after it, and that pong must not confirm again what only acks confirm now."""
    async with SessionPair(tmp_path) as pair:
        peer = await pair.peer()
        await peer.recv_type("heartbeat")
        peer.pause_reading()  # the ping after job-a stays unanswered for now
        pair.outbound.terminal("job-a", done_frame("job-a"))
        await pair.written()  # written and pinged
        await peer.send(JobAck(job_id="job-a"))
        await pair.sink.confirmation_of("job-a")
        peer.resume_reading()  # now the pong goes back
        await peer.recv_type("job_done")
        # Two acks in turn: by the time the second is confirmed, the pong (read before the
        # first) has long been handled.
        await peer.send(JobAck(job_id="barrier-1"))
        await pair.sink.confirmation_of("barrier-1")
        await peer.send(JobAck(job_id="barrier-2"))
        await pair.sink.confirmation_of("barrier-2")
        assert peer.pings == 1
    assert pair.sink.confirmations == [("job-a",), ("barrier-1",), ("barrier-2",)]


# --- the first frames after auth_ok --------------------------------------------------------------


async def test_capabilities_then_heartbeat_are_the_first_frames_after_auth_ok(
    tmp_path: Path,
) -> None:
    """protocol.md §1–§3: the hooks' capabilities and a heartbeat go out first on every
    connection, in that order, and the provider_id from auth_ok is stored."""
    capabilities = Capabilities(
        models=[
            ModelOffer(
                model_id="m-7b",
                input_per_1m=300000,
                output_per_1m=600000,
                max_concurrent=4,
                backend="vllm",
                context_window=8192,
            )
        ],
        limits=CapabilityLimits(max_concurrent_total=4, max_tokens_per_minute=90000),
        metadata=CapabilityMetadata(agent_version="0.1.0"),
    )
    heartbeat = Heartbeat(
        queue_depth=2,
        tokens_per_sec_p50=41.5,
        p50_latency_ms=120,
        p95_latency_ms=340,
        error_rate_60s=0.25,
        last_error_at="2026-12-06T17:23:15.412Z",
        last_error_code="backend_timeout",
    )
    async with SessionPair(
        tmp_path, capabilities=lambda: capabilities, heartbeat=lambda: heartbeat
    ) as pair:
        peer = await pair.peer()
        first, second = await peer.recv(), await peer.recv()
        await peer.close(1001)
        again = await pair.peer()
        third, fourth = await again.recv(), await again.recv()
    assert first == capabilities and second == heartbeat
    assert third == capabilities and fourth == heartbeat
    assert pair.authentications == 2
    assert load(pair.identity.path).provider_id == "prov_pair"


async def test_undelivered_terminal_frames_go_before_capabilities_and_are_confirmed(
    tmp_path: Path,
) -> None:
    """protocol.md §5: the outbox's undelivered frames are re-sent first after auth_ok, oldest
    first, and confirmed like any terminal frame."""
    undelivered = [("old-1", done_frame("old-1")), ("old-2", error_frame("old-2"))]
    async with SessionPair(tmp_path, undelivered=undelivered) as pair:
        peer = await pair.peer()
        kinds = [(await peer.recv()).type for _ in range(4)]
        await pair.sink.confirmation_of("old-1", "old-2")
    assert kinds == ["job_done", "job_error", "capabilities", "heartbeat"]


async def test_heartbeats_follow_the_interval_hook(tmp_path: Path) -> None:
    """After the first one, a heartbeat is queued every `heartbeat_interval_s`."""
    async with SessionPair(tmp_path, heartbeat_interval_s=0.05) as pair:
        peer = await pair.peer()
        kinds = [(await peer.recv()).type for _ in range(4)]
    assert kinds == ["capabilities", "heartbeat", "heartbeat", "heartbeat"]


# --- how a connection ends -----------------------------------------------------------------------


async def test_a_coordinator_close_1001_redials_and_each_lost_connection_is_reported_once(
    tmp_path: Path,
) -> None:
    """A planned close (1001) is redialled soon with a fresh, correctly signed handshake; the
    sink hears `connection_lost` once per authenticated connection that ended, never for a
    refused handshake. The enrollment code is sent only until a provider_id is stored."""
    async with SessionPair(tmp_path, enrollment_code="POD-1") as pair:
        pair.coordinator.refuse = 1  # the first handshake is refused: no connection lost
        first = await pair.peer()
        assert pair.sink.lost == 0
        await first.close(1001, "restarting")
        second = await pair.peer()
        assert pair.sink.lost == 1  # reported before the redial, and only once
        await second.close(1001, "restarting")
        await pair.peer()
        assert pair.sink.lost == 2
    assert [h.enrollment_code for h in pair.coordinator.handshakes] == [
        "POD-1",
        "POD-1",
        None,
        None,
    ]
    assert pair.session.attempts == 4
    kinds = [f.kind if f is not None else None for f in pair.faults]
    assert kinds == [FaultKind.COORDINATOR, FaultKind.PLANNED, FaultKind.PLANNED]
    assert pair.policy.failures == 1  # the refusal escalated, the planned cycles did not


async def test_session_close_flushes_what_waits_then_closes_1001(tmp_path: Path) -> None:
    """The graceful stop: everything queued before `close()` is written, even what takes the
    writer several batches (3 MiB of one job's bytes leave about 1 MiB a turn, and this writer
    waits 50 ms between turns: a close that did not wait for it would cut in), and only then
    does the socket close, with 1001; `run()` returns and nothing redials."""
    body = bytes(range(256)) * (3 * 1024 * 4)  # 3 MiB
    spaced = replace(PAIR_TIMINGS, write_spacing_s=0.05)
    async with SessionPair(tmp_path, timings=spaced) as pair:
        peer = await pair.peer()
        await peer.recv_type("heartbeat")
        pair.outbound.chunk("job-1", body)
        pair.outbound.terminal("job-1", done_frame("job-1"))
        pair.outbound.terminal("job-2", error_frame("job-2"))
        pair.session.close()  # in the same step: nothing of the above has left yet
        received = bytearray()
        frames: list[Decoded] = []
        with pytest.raises(ConnectionClosed):
            while True:
                frame = await peer.recv()
                frames.append(frame)
                if isinstance(frame, JobChunk):
                    received += base64.b64decode(frame.data)
        code = await peer.closed()
        with anyio.fail_after(STEP_S):
            await pair.stopped.wait()
    kinds = [f.type or "" for f in frames]
    # job-2 had no bytes waiting: its terminal frame may leave first; job-1's after its bytes.
    assert sorted(kinds) == ["job_chunk"] * (len(kinds) - 2) + ["job_done", "job_error"]
    assert kinds[-1] == "job_done" and len(kinds) > 4  # it took the writer several batches
    assert received == body
    assert code == 1001
    assert pair.sink.lost == 1 and pair.faults == [] and pair.session.attempts == 1


async def test_a_dead_coordinator_is_found_by_the_keepalive_and_redialled(
    tmp_path: Path,
) -> None:
    """A coordinator that stops answering pings (its host froze) is given up after
    ping_interval + ping_timeout (+ the close timeout, which websockets then waits for a close
    frame that cannot come): the connection counts as lost, and the session redials."""
    timings = Timings(
        ping_interval_s=0.1, ping_timeout_s=0.2, handshake_timeout_s=2.0, close_timeout_s=0.2
    )
    async with SessionPair(tmp_path, timings=timings) as pair:
        frozen = await pair.peer()
        frozen.pause_reading()
        again = await pair.peer()
        assert pair.sink.lost == 1
        frozen.resume_reading()  # let the server see the agent's close too
        await again.recv_type("heartbeat")
    [fault] = pair.faults
    assert fault is not None and fault.kind is FaultKind.NETWORK
