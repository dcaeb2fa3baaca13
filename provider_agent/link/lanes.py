"""What the agent sends to the coordinator, waiting in lanes that outlive connections.

The socket has one owner, the session's writer; everyone else puts frames here and never waits on
the socket. Lanes, in the order a writer's batch takes them:

1. resend   — terminal frames the outbox still holds undelivered, queued once per new connection
              (protocol.md §5: they go first after `auth_ok`, before capabilities);
2. control  — the latest `capabilities` and the latest `heartbeat`: a newer one replaces an older
              one that has not left yet, and neither ever waits behind job chunks;
3. chunks   — one byte buffer per job, drained round-robin: whatever piled up for a job leaves as
              one `job_chunk` (at most `MAX_FRAME_JSON` of JSON, so large piles take several turns);
4. terminal — `job_done`/`job_error`, each only once its job has no bytes left to send, so a
              terminal frame never overtakes its own chunks.

`take()` is pure bookkeeping (no I/O), so the rules are tested without a socket; `batches()` is
what a writer iterates. A batch says which terminal frames it carries, so the session can report
them written and confirm their delivery (a ping after them, or `job_ack`).

One exception to "wait for the writer": a job's FIRST bytes. While the writer is idle, the session
lends the lanes a synchronous `SendNow` (`attach`), and `chunk(..., first=True)` hands that job's
frame to it at once, from the relay's own step: a job's time to first token then does not wait
a loop round for the writer (bench/relay.py, 256 streams: added TTFT p50 about 2.2 → 1.0 ms).
Later bytes coalesce: the session's writer takes a batch at most once a millisecond
(`batches(spacing_s)`), so at 10,000 events/s one write carries about ten events' frames
(bench/relay.py: 46 → 38 µs of agent CPU per event), at most 1 ms later than they came.
"""

from __future__ import annotations

import base64
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import anyio
import orjson

#: One frame carries at most 1 MiB of JSON (a coordinator's default limit; protocol.md §4).
MAX_FRAME_JSON = 1024 * 1024
CONTROL_ORDER = ("capabilities", "heartbeat")
#: Writes frames on the spot and says whether it did (False: the writer is busy or the socket is
#: not open; the frames then wait in their lane).
SendNow = Callable[[list[str]], bool]


@dataclass
class Batch:
    """Frames to write now, in order, and the job ids of the terminal frames among them."""

    frames: list[str] = field(default_factory=list)
    terminal_ids: list[str] = field(default_factory=list)


def chunk_frame(job_id: str, data: bytes) -> str:
    """`job_chunk` built by hand: pydantic costs ~10 µs a frame on the hot path, this ~1 µs."""
    return (
        '{"type":"job_chunk","job_id":'
        + orjson.dumps(job_id).decode()
        + ',"data":"'
        + base64.b64encode(data).decode("ascii")
        + '"}'
    )


#: Raw bytes that fit one frame whatever the job_id (≤ 128 characters, each at most a 6-character
#: JSON escape): the common case needs no exact sum.
ALWAYS_FITS = (MAX_FRAME_JSON - 1024) // 4 * 3


def max_chunk_bytes(job_id: str) -> int:
    """The most raw bytes one `job_chunk` of this job can carry within `MAX_FRAME_JSON`."""
    overhead = len(chunk_frame(job_id, b"").encode())
    return (MAX_FRAME_JSON - overhead) // 4 * 3


class Outbound:
    """The lanes; one per daemon, shared by every connection it makes."""

    def __init__(self) -> None:
        self._resend: deque[tuple[str, str]] = deque()
        self._control: dict[str, str] = {}
        self._chunks: dict[str, bytearray] = {}
        self._terminal: deque[tuple[str, str]] = deque()
        self._wakeup = anyio.Event()
        #: Made by the first waiter in `sent_down_to`, so a batch nobody waits for makes none.
        self._progress: anyio.Event | None = None
        self._finished = False
        self._send_now: SendNow | None = None

    # --- producers: never block ------------------------------------------------------------------

    def control(self, kind: str, text: str) -> None:
        """The latest frame of a kind (`capabilities`, `heartbeat`) replaces a waiting one."""
        self._control[kind] = text
        self._wake()

    def chunk(self, job_id: str, data: bytes, *, first: bool = False) -> int:
        """Append upstream bytes of a job; returns how many of its bytes now wait to be sent.

        `first`: the job's first bytes, sent at once when the session lent a `SendNow` and no
        undelivered frame of an earlier connection waits (those go first after `auth_ok`)."""
        pending = self._chunks.get(job_id)
        if pending is None:
            if first and self._sent_now(job_id, data):
                return 0
            pending = self._chunks[job_id] = bytearray()
        pending += data
        self._wake()
        return len(pending)

    def _sent_now(self, job_id: str, data: bytes) -> bool:
        """Send a job's first bytes on the spot, and with them every job's waiting bytes (among
        them first bytes that found the writer busy a moment ago)."""
        send_now = self._send_now
        if send_now is None or self._resend or len(data) > ALWAYS_FITS:
            return False
        waiting = [job for job, pending in self._chunks.items() if len(pending) <= ALWAYS_FITS]
        frames = [chunk_frame(job, bytes(self._chunks[job])) for job in waiting]
        frames.append(chunk_frame(job_id, data))
        if not send_now(frames):
            return False
        for job in waiting:
            del self._chunks[job]
        self._sent()
        return True

    def attach(self, send_now: SendNow | None) -> None:
        """The session's writer lends (or, with None, takes back) its on-the-spot sender."""
        self._send_now = send_now

    def terminal(self, job_id: str, text: str) -> None:
        """A terminal frame, sent after every byte of its job that is still waiting."""
        self._terminal.append((job_id, text))
        self._wake()

    def discard(self, job_id: str) -> int:
        """Forget a job's waiting bytes (its connection is gone); returns how many were dropped."""
        dropped = self._chunks.pop(job_id, None)
        return len(dropped) if dropped is not None else 0

    def pending(self, job_id: str) -> int:
        """Bytes of a job not yet handed to a writer."""
        waiting = self._chunks.get(job_id)
        return len(waiting) if waiting is not None else 0

    def begin(self, undelivered: Iterable[tuple[str, str]]) -> None:
        """A new connection: the outbox's undelivered terminal frames go first, oldest first.

        Frames still in the terminal lane that the outbox listed too are not sent twice; those it
        did not list (finished after it was read) stay in the lane."""
        resend = list(undelivered)
        listed = {job_id for job_id, _ in resend}
        self._resend = deque(resend)
        self._terminal = deque(item for item in self._terminal if item[0] not in listed)
        self._control.clear()
        self._wake()

    def finish(self) -> None:
        """No more frames on this connection: the writer sends what is waiting, then its
        iteration ends (and it closes the socket)."""
        self._finished = True
        self._wake()

    def reopen(self) -> None:
        """A new connection's writer: `finish()` no longer holds."""
        self._finished = False

    # --- the writer's side -----------------------------------------------------------------------

    def take(self) -> Batch:
        """Everything that may leave now, in lane order (see the module docstring)."""
        batch = Batch()
        while self._resend:
            job_id, text = self._resend.popleft()
            batch.frames.append(text)
            batch.terminal_ids.append(job_id)
        for kind in CONTROL_ORDER:
            latest = self._control.pop(kind, None)
            if latest is not None:
                batch.frames.append(latest)
        for job_id in list(self._chunks):
            pending = self._chunks[job_id]
            limit = ALWAYS_FITS if len(pending) <= ALWAYS_FITS else max_chunk_bytes(job_id)
            if len(pending) <= limit:
                del self._chunks[job_id]
                batch.frames.append(chunk_frame(job_id, bytes(pending)))
            else:
                batch.frames.append(chunk_frame(job_id, bytes(pending[:limit])))
                del pending[:limit]
                self._chunks[job_id] = self._chunks.pop(job_id)  # to the back: round-robin
        kept: deque[tuple[str, str]] = deque()
        for job_id, text in self._terminal:
            if job_id in self._chunks:
                kept.append((job_id, text))
            else:
                batch.frames.append(text)
                batch.terminal_ids.append(job_id)
        self._terminal = kept
        if batch.frames:
            self._sent()
        return batch

    def idle(self) -> bool:
        return not (self._resend or self._control or self._chunks or self._terminal)

    async def batches(self, spacing_s: float = 0.0) -> AsyncIterator[Batch]:
        """What a writer iterates: a batch whenever something waits; ends after `finish()` once
        everything has left. `spacing_s`: a batch is taken at least that long after the previous
        one, so what arrives in between leaves together (one write for many events)."""
        taken_at = -math.inf
        while True:
            if self.idle():
                if self._finished:
                    return
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            early = taken_at + spacing_s - time.monotonic()
            if early > 0 and not self._finished:
                await anyio.sleep(early)
            taken_at = time.monotonic()
            yield self.take()

    async def sent_down_to(self, job_id: str, limit: int) -> None:
        """Wait until at most `limit` bytes of a job wait here (the job's backpressure)."""
        while self.pending(job_id) > limit:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()

    def _wake(self) -> None:
        self._wakeup.set()

    def _sent(self) -> None:
        """Bytes left the lanes: whoever waits in `sent_down_to` looks again."""
        if self._progress is not None:
            self._progress.set()
            self._progress = None
