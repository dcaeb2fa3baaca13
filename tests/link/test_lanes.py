"""The outbound lanes, without a socket: a writer here is a plain list sink."""

from __future__ import annotations

import base64

import anyio
import orjson
import pytest

from provider_agent.link.lanes import MAX_FRAME_JSON, Outbound, chunk_frame, max_chunk_bytes


def decoded(frame: str) -> dict[str, object]:
    data = orjson.loads(frame)
    assert isinstance(data, dict)
    return data


def chunk_bytes(frame: str) -> bytes:
    data = decoded(frame)
    assert data["type"] == "job_chunk"
    return base64.b64decode(str(data["data"]))


def test_control_frames_overtake_queued_chunks_and_the_latest_wins() -> None:
    out = Outbound()
    for i in range(100):
        out.chunk(f"job-{i}", b"data: x\n\n")
    out.control("heartbeat", '{"type":"heartbeat","n":1}')
    out.control("capabilities", '{"type":"capabilities","n":1}')
    out.control("heartbeat", '{"type":"heartbeat","n":2}')
    batch = out.take()
    assert [decoded(f)["type"] for f in batch.frames[:2]] == ["capabilities", "heartbeat"]
    assert decoded(batch.frames[1])["n"] == 2  # the older heartbeat never leaves
    assert len(batch.frames) == 102


def test_a_jobs_pending_bytes_leave_as_one_frame_in_order() -> None:
    out = Outbound()
    pieces = [f"data: {i}\n\n".encode() for i in range(50)]
    for piece in pieces:
        out.chunk("j", piece)
    assert out.pending("j") == sum(map(len, pieces))
    [frame] = out.take().frames
    assert chunk_bytes(frame) == b"".join(pieces)
    assert out.pending("j") == 0 and out.idle()


@pytest.mark.parametrize("job_id", ["j", "x" * 128, 'quote"and\\slash', "ünïcödé"])
def test_chunk_frames_are_valid_json_within_the_frame_limit(job_id: str) -> None:
    out = Outbound()
    payload = bytes(range(256)) * (3 * MAX_FRAME_JSON // 256)  # ~3 MiB: several frames
    out.chunk(job_id, payload)
    out.terminal(job_id, '{"type":"job_done"}')
    frames: list[str] = []
    while not out.idle():
        frames += out.take().frames
    *chunks, done = frames
    assert len(chunks) >= 4
    assert all(len(f.encode()) <= MAX_FRAME_JSON for f in chunks)
    assert all(decoded(f)["job_id"] == job_id for f in chunks)
    assert b"".join(chunk_bytes(f) for f in chunks) == payload
    assert decoded(done)["type"] == "job_done"  # never before its own bytes


def test_round_robin_between_a_large_job_and_small_ones() -> None:
    out = Outbound()
    big = b"y" * (max_chunk_bytes("big") * 3)
    out.chunk("big", big)
    out.chunk("small", b"hello")
    first = out.take()
    assert [decoded(f)["job_id"] for f in first.frames] == ["big", "small"]
    out.chunk("small", b"again")
    second = out.take()
    assert [decoded(f)["job_id"] for f in second.frames] == ["big", "small"]


def test_terminal_notices_arrive_in_order_and_wait_for_their_chunks() -> None:
    out = Outbound()
    out.terminal("a", "done-a")
    out.chunk("b", b"b-bytes")
    out.terminal("b", "done-b")
    out.terminal("c", "done-c")
    batch = out.take()
    assert batch.frames == [chunk_frame("b", b"b-bytes"), "done-a", "done-b", "done-c"]
    assert batch.terminal_ids == ["a", "b", "c"]


def test_a_new_connection_resends_undelivered_first_without_doubles() -> None:
    out = Outbound()
    out.terminal("late", "done-late")  # finished after the outbox was read: stays
    out.terminal("old", "done-old")  # also listed by the outbox: sent once
    out.control("heartbeat", "stale heartbeat")  # from the previous connection: dropped
    out.begin([("older", "done-older"), ("old", "done-old")])
    out.control("capabilities", "caps")
    batch = out.take()
    assert batch.frames == ["done-older", "done-old", "caps", "done-late"]
    assert batch.terminal_ids == ["older", "old", "late"]


def test_producers_never_block_and_backpressure_is_opt_in() -> None:
    out = Outbound()
    for i in range(1024):  # 64 MiB queued without a writer: plain calls, nothing to await
        out.chunk("j", b"z" * 65536)
        out.control("heartbeat", f"hb {i}")
    assert out.pending("j") == 64 * 1024 * 1024
    assert out.discard("j") == 64 * 1024 * 1024 and out.pending("j") == 0


async def test_writer_batches_end_after_finish_once_everything_left() -> None:
    out = Outbound()
    written: list[str] = []

    async def writer() -> None:
        async for batch in out.batches():
            written.extend(batch.frames)

    async with anyio.create_task_group() as group:
        group.start_soon(writer)
        out.chunk("j", b"one")
        await out.sent_down_to("j", 0)
        out.terminal("j", "done")
        out.finish()
    assert written == [chunk_frame("j", b"one"), "done"]


async def test_spaced_batches_gather_what_arrives_between_them() -> None:
    out = Outbound()
    taken: list[tuple[float, list[str]]] = []
    spacing = 0.05

    async def writer() -> None:
        async for batch in out.batches(spacing):
            taken.append((anyio.current_time(), batch.frames))

    async with anyio.create_task_group() as group:
        group.start_soon(writer)
        out.chunk("a", b"1")
        await out.sent_down_to("a", 0)  # the first batch leaves at once
        for job in ("b", "c", "d"):
            out.chunk(job, b"2")
            await anyio.lowlevel.checkpoint()  # the writer runs between them: it must wait
        await out.sent_down_to("d", 0)
        out.finish()
    assert [frames for _, frames in taken] == [
        [chunk_frame("a", b"1")],
        [chunk_frame(job, b"2") for job in ("b", "c", "d")],
    ]
    assert taken[1][0] - taken[0][0] >= spacing


async def test_a_finished_writer_does_not_wait_out_its_spacing() -> None:
    out = Outbound()
    out.chunk("a", b"1")
    async with anyio.create_task_group() as group:

        async def writer() -> None:
            async for batch in out.batches(3600):
                if batch.frames == [chunk_frame("a", b"1")]:
                    out.chunk("b", b"2")  # one more after the first batch, then the stop
                    out.finish()

        group.start_soon(writer)
        with anyio.fail_after(5):  # spacing would be an hour: finish() cut it short
            await out.sent_down_to("b", 0)
    assert out.idle()


async def test_sent_down_to_waits_for_the_writer() -> None:
    out = Outbound()
    out.chunk("j", b"x" * 1000)
    released = anyio.Event()

    async def producer() -> None:
        await out.sent_down_to("j", 100)
        released.set()

    async with anyio.create_task_group() as group:
        group.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        assert not released.is_set()
        out.take()
        await released.wait()


# --- a job's first bytes, sent on the spot -------------------------------------------------------


class Spot:
    """A writer's on-the-spot sender: records what it sent, or refuses while `busy`."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.busy = False

    def __call__(self, frames: list[str]) -> bool:
        if self.busy:
            return False
        self.sent.extend(frames)
        return True


def test_a_jobs_first_bytes_leave_at_once_through_the_lent_sender() -> None:
    out, spot = Outbound(), Spot()
    out.attach(spot)
    assert out.chunk("j", b"data: first\n\n", first=True) == 0
    assert spot.sent == [chunk_frame("j", b"data: first\n\n")]
    assert out.idle()  # nothing left for the writer
    out.chunk("j", b"data: second\n\n")  # later bytes coalesce in the lane as before
    assert spot.sent == [chunk_frame("j", b"data: first\n\n")]
    assert [chunk_bytes(f) for f in out.take().frames] == [b"data: second\n\n"]


def test_first_bytes_wait_in_the_lane_when_they_cannot_leave_at_once() -> None:
    out, spot = Outbound(), Spot()
    out.chunk("no-sender", b"a", first=True)  # no writer lent one
    out.attach(spot)
    spot.busy = True
    out.chunk("busy", b"b", first=True)  # the writer is mid-write
    spot.busy = False
    out.chunk("no-sender", b"c", first=True)  # bytes already wait: order first
    out.chunk("huge", b"x" * (MAX_FRAME_JSON + 1), first=True)  # needs the lane's splitting
    out.attach(None)
    out.chunk("taken-back", b"d", first=True)
    assert spot.sent == []
    frames = out.take().frames
    assert [decoded(f)["job_id"] for f in frames] == ["no-sender", "busy", "huge", "taken-back"]
    assert chunk_bytes(frames[0]) == b"ac"


def test_first_bytes_take_every_jobs_waiting_bytes_along() -> None:
    out, spot = Outbound(), Spot()
    out.chunk("a", b"1", first=True)  # no sender yet: waits
    out.chunk("a", b"2")
    out.chunk("big", b"x" * (MAX_FRAME_JSON + 1))  # too big for one frame: left to the writer
    out.attach(spot)
    out.chunk("b", b"3", first=True)
    assert spot.sent == [chunk_frame("a", b"12"), chunk_frame("b", b"3")]
    assert out.pending("a") == 0 and out.pending("big") == MAX_FRAME_JSON + 1


def test_first_bytes_never_overtake_frames_resent_after_a_reconnect() -> None:
    out, spot = Outbound(), Spot()
    out.begin([("old", "done-old")])
    out.attach(spot)
    out.chunk("new", b"data: x\n\n", first=True)
    assert spot.sent == []
    assert out.take().frames == ["done-old", chunk_frame("new", b"data: x\n\n")]
