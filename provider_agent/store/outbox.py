"""The durable outbox and the earnings ledger: one sqlite file, `outbox.sqlite3` in `state.dir`.

Why (protocol.md §4–§5): a terminal frame is a billing record. It is written here before it is
sent, kept until the coordinator confirms it, and kept 24 h more so that a repeated `job` gets the
SAME frame back. Each stored terminal frame is also one ledger row, written in the same
transaction, so a ledger row exists exactly when a billing record does. The jobs accepted and not
yet ended (found again at start when the agent was killed) are kept beside it, in the in-flight
journal (`journal.py`): their record must be written before a job's first byte leaves, and a
sqlite commit is too slow for that.

Durability: WAL with `synchronous=FULL`. A commit returns once its WAL frames are written and
fsynced, so a stored record survives SIGKILL of the agent (which NORMAL would too: the bytes are
in the kernel's cache) and also a power cut or kernel panic a moment later (which NORMAL would
not: it fsyncs only at checkpoints). The fsync is paid once per batch, not per call: calls that
arrive while a commit is in progress are committed together in the next one (group commit), so
throughput under load does not fall to one fsync per job (`bench/outbox.py` measures it).

Threads: every sqlite call runs in a worker thread (`anyio.to_thread`), one batch at a time on one
connection; the event loop never blocks on the disk. Calls are shielded from cancellation: a
record that was handed to the outbox is written even if its caller is being cancelled.

The decisions (amounts, cut-offs, what a frame says) are pure functions at the bottom of the
file; `Outbox` is the I/O around them. Opening, checking and migrating the file is `engine.py`'s.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast

import anyio
import anyio.to_thread
import orjson

from provider_agent.errors import OutboxError
from provider_agent.observe.logs import Throttle
from provider_agent.store.engine import (
    BUSY_TIMEOUT_S,
    FILE_NAME,
    open_store,
    outbox_error,
    rollback,
)
from provider_agent.store.journal import Journal

log = logging.getLogger(__name__)

#: Delivered frames are kept this long to answer a repeated `job` (protocol.md §5).
DELIVERED_KEEP_S = 24 * 3600
#: Undelivered frames (and accepted, never-ended jobs) older than this are dropped with a warning
#: (protocol.md §8).
UNDELIVERED_KEEP_S = 30 * 24 * 3600
#: A prune acts only when the wall clock moved forward by at most this since the last prune
#: (and not backwards): a clock correction never drops minutes-old records (protocol.md §8).
PRUNE_CLOCK_JUMP_S = 24 * 3600
DEFAULT_KEEP_DAYS = 400
_INT64_MAX = 2**63 - 1

T = TypeVar("T")
UsageSource = Literal["reported", "estimated"]


@dataclass(frozen=True)
class LedgerEntry:
    """What the executor knows about a job when it ends, for its ledger row.

    `outcome` is "job_done" or the `error_code`; prices are the list prices in force (integer
    micro-USDC per 1M tokens). Values outside 0..2^63-1 are refused here, at construction, so a
    backend reporting absurd usage cannot make the outbox write fail.
    """

    model: str
    backend: str
    outcome: str
    tokens_in: int
    tokens_out: int
    usage_source: UsageSource
    input_per_1m: int
    output_per_1m: int

    def __post_init__(self) -> None:
        for name in ("tokens_in", "tokens_out", "input_per_1m", "output_per_1m"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
                raise ValueError(f"ledger entry: {name} must be an integer in 0..2^63-1")
        if self.amount_micro_usdc > _INT64_MAX:
            raise ValueError("ledger entry: amount does not fit in 64 bits")

    @property
    def amount_micro_usdc(self) -> int:
        return amount_micro_usdc(
            self.outcome, self.tokens_in, self.tokens_out, self.input_per_1m, self.output_per_1m
        )


@dataclass(frozen=True)
class PruneReport:
    """What one `prune()` removed."""

    delivered: tuple[str, ...]
    dropped_undelivered: tuple[str, ...]
    dropped_orphans: tuple[str, ...]
    ledger_rows: int
    #: The wall clock jumped since the last prune: nothing was removed (see `clock_jumped`).
    skipped: bool = False


@dataclass(eq=False)
class _Call(Generic[T]):
    """One operation waiting for the next batch; filled in by the worker thread."""

    op: Callable[[sqlite3.Connection], T]
    done: bool = False
    result: T | None = None
    error: BaseException | None = None


class Outbox:
    """The store. Open with `await Outbox.open(state_dir)`; every method is safe to call from
    many tasks at once. Call `prune()` after opening and then periodically (hourly is plenty).

    The executor's view of a `job_id`: `in_store()` (no I/O) says whether the store has seen it;
    if so, `stored_frame()` is the frame to answer a repeat with (None while it is in flight).
    """

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        known: set[str],
        journal: Journal,
        *,
        clock: Callable[[], float],
        keep_days: int,
    ) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = connection
        self._known = known
        self._journal = journal
        self._clock = clock
        self._keep_days = keep_days
        self._queue: list[_Call[Any]] = []
        self._flush_done: anyio.Event | None = None
        self._closing = False
        self._seen_while_pruning: list[set[str]] = []
        self._progress_failing = Throttle(60.0)
        #: When the last prune ran (wall clock, ms); read from the file at the first prune.
        self._last_prune_ms: int | None = None

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        keep_days: int = DEFAULT_KEEP_DAYS,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> Outbox:
        """Open (creating it if needed) the store in `state_dir`; OutboxError with one line
        naming the file when it is corrupt, foreign, newer than this agent, or unwritable."""
        path = state_dir / FILE_NAME
        connection, known, journal = await anyio.to_thread.run_sync(
            open_store, state_dir, path, synchronous, _ms(clock()), busy_timeout_s
        )
        return cls(path, connection, known, journal, clock=clock, keep_days=keep_days)

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    def in_store(self, job_id: str) -> bool:
        """True when the store holds `job_id`: accepted (in flight or orphaned), or ended and its
        frame still kept. No I/O: the ids are kept in memory (about 130 bytes each).
        Between expiry and the next `prune()` it may still say True; `stored_frame()` is exact."""
        return job_id in self._known

    async def accept(self, job_id: str, model_id: str) -> None:
        """Record a job the executor accepted; it stays an orphan until `finish`. Written to the
        journal before this returns, without a suspension point: nothing else runs in between.
        An id already in flight records nothing new. (An id that ended is never accepted again
        while its frame is kept: the executor answers it with `stored_frame`.)"""
        if self._conn is None or self._closing:
            raise OutboxError(f"outbox {self.path}: used after it was closed")
        if job_id in self._journal.jobs:
            return
        self._remember(job_id)
        self._journal.accepted(job_id, model_id, self._now())

    def progress(self, job_id: str, bytes_relayed: int) -> None:
        """Record how many upstream bytes were relayed so far (for `connection_lost` after a
        crash); meant for at most ~1 call/s per job. Synchronous (one append), so the relay
        records a job's first bytes in the same step that hands them on. Best effort: a
        record that cannot be written costs only the figure a crash would report."""
        try:
            self._journal.progressed(job_id, min(bytes_relayed, _INT64_MAX))
        except OutboxError as exc:
            if self._progress_failing.due(time.monotonic()) is not None:
                log.warning("outbox: progress of jobs in flight not recorded: %s", exc)

    async def finish(self, job_id: str, frame: str, ledger: LedgerEntry | None) -> str:
        """Store the terminal frame (undelivered) and its ledger row in one transaction, and
        return the frame to send: the one given, or the FIRST one stored for this `job_id` (a
        second `finish` changes nothing, so there are never two billing records).

        `ledger=None` still writes a row, taken from the frame (outcome and tokens; prices 0,
        so amount 0): pass a LedgerEntry whenever the prices are known.
        """
        self._remember(job_id)
        now = self._now()
        in_flight = self._journal.jobs.get(job_id)
        entry = ledger or entry_from_frame(frame, in_flight.model if in_flight else "")

        def op(db: sqlite3.Connection) -> tuple[bool, str]:
            _forget_expired(db, job_id, now)
            cursor = db.execute(
                "INSERT OR IGNORE INTO frames (job_id, frame, finished_ms) VALUES (?, ?, ?)",
                (job_id, frame, now),
            )
            if cursor.rowcount == 0:
                row = db.execute("SELECT frame FROM frames WHERE job_id = ?", (job_id,)).fetchone()
                return False, str(row[0])
            db.execute(
                "INSERT INTO ledger (time_ms, job_id, model, backend, outcome, tokens_in,"
                " tokens_out, usage_source, input_per_1m, output_per_1m, amount_micro_usdc)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    job_id,
                    entry.model,
                    entry.backend,
                    entry.outcome,
                    entry.tokens_in,
                    entry.tokens_out,
                    entry.usage_source,
                    entry.input_per_1m,
                    entry.output_per_1m,
                    entry.amount_micro_usdc,
                ),
            )
            return True, frame

        first, stored = await self._run(op)
        try:
            self._journal.ended(job_id)
        except OutboxError as exc:  # the frame is stored: send it; a restart's report is a repeat
            log.warning("outbox: job_id=%s stored, but not marked ended: %s", job_id, exc)
        if not first:
            log.warning("outbox: job_id=%s already has a terminal frame; keeping the first", job_id)
        elif ledger is None and stored_type(frame) == "job_done":
            log.warning("outbox: job_id=%s job_done without prices: ledger amount 0", job_id)
        return stored

    async def delivered(self, job_ids: Iterable[str]) -> None:
        """The coordinator has these frames (pong after them, or `job_ack`); keep them 24 h."""
        now = self._now()
        rows = [(now, job_id) for job_id in job_ids]
        if not rows:
            return

        def op(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE frames SET delivered_ms = ? WHERE job_id = ? AND delivered_ms IS NULL",
                rows,
            )

        await self._run(op)

    async def undelivered(self) -> list[tuple[str, str]]:
        """(job_id, frame) of every frame not yet confirmed, oldest first: re-send them first."""

        def op(db: sqlite3.Connection) -> list[tuple[str, str]]:
            return db.execute(
                "SELECT job_id, frame FROM frames WHERE delivered_ms IS NULL ORDER BY seq"
            ).fetchall()

        return await self._run(op)

    async def orphans(self) -> list[tuple[str, str, int]]:
        """(job_id, model, bytes_relayed) of jobs accepted and never ended, oldest first. At
        start these are the jobs a killed agent left behind; each gets `connection_lost`."""

        jobs = sorted(self._journal.jobs.items(), key=lambda item: (item[1].accepted_ms, item[0]))
        return [(job_id, job.model, job.bytes_relayed) for job_id, job in jobs]

    async def stored_frame(self, job_id: str) -> str | None:
        """The terminal frame stored for `job_id`: undelivered, or delivered in the last 24 h."""
        if job_id not in self._known:
            return None
        since = self._now() - DELIVERED_KEEP_S * 1000

        def op(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT frame FROM frames WHERE job_id = ?"
                " AND (delivered_ms IS NULL OR delivered_ms >= ?)",
                (job_id, since),
            ).fetchone()
            return str(row[0]) if row else None

        return await self._run(op)

    async def keep_pruned(self, every_s: float) -> None:
        """Prune now and then every `every_s`, until cancelled."""
        while True:
            await self.prune()
            await anyio.sleep(every_s)

    async def prune(self) -> PruneReport:
        """Drop delivered frames older than 24 h, undelivered frames and orphans older than
        30 days (with a warning: billing records the coordinator never confirmed), and ledger
        rows older than `keep_days` — unless the wall clock moved backwards, or forward by more
        than a day, since the last prune: then nothing, one warning, and the next prune acts
        (protocol.md §8). The last prune's time is kept in the file, across restarts."""
        now = self._now()
        # Ids seen again while the prune runs (a repeat accepted anew) must stay known.
        seen_meanwhile: set[str] = set()
        self._seen_while_pruning.append(seen_meanwhile)
        try:
            return await self._prune(now, seen_meanwhile)
        finally:
            self._seen_while_pruning.remove(seen_meanwhile)

    async def _prune(self, now: int, seen_meanwhile: set[str]) -> PruneReport:
        def last_pruned(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('pruned_ms', ?)", (str(now),)
            )

        if self._last_prune_ms is None:
            self._last_prune_ms = await self._run(_meta_ms("pruned_ms"))
        jump = clock_jumped(self._last_prune_ms, now)
        if jump is not None:
            await self._run(last_pruned)
            self._last_prune_ms = now
            log.warning(
                "outbox: the wall clock %s since the last prune; nothing pruned until the next "
                "one (a clock correction must not drop billing records)",
                jump,
            )
            return PruneReport((), (), (), 0, skipped=True)
        self._last_prune_ms = now
        cuts = prune_cutoffs(now, self._keep_days)
        orphans = tuple(
            job_id
            for _, job_id in sorted(
                (job.accepted_ms, job_id)
                for job_id, job in self._journal.jobs.items()
                if job.accepted_ms < cuts.undelivered
            )
        )
        for job_id in orphans:
            self._journal.ended(job_id)

        def op(db: sqlite3.Connection) -> PruneReport:
            delivered = db.execute(
                "SELECT job_id FROM frames WHERE delivered_ms < ?", (cuts.delivered,)
            ).fetchall()
            stale = db.execute(
                "SELECT job_id FROM frames WHERE delivered_ms IS NULL AND finished_ms < ?"
                " ORDER BY seq",
                (cuts.undelivered,),
            ).fetchall()
            db.execute("DELETE FROM frames WHERE delivered_ms < ?", (cuts.delivered,))
            db.execute(
                "DELETE FROM frames WHERE delivered_ms IS NULL AND finished_ms < ?",
                (cuts.undelivered,),
            )
            ledger = db.execute("DELETE FROM ledger WHERE time_ms < ?", (cuts.ledger,))
            last_pruned(db)
            return PruneReport(
                delivered=tuple(row[0] for row in delivered),
                dropped_undelivered=tuple(row[0] for row in stale),
                dropped_orphans=orphans,
                ledger_rows=ledger.rowcount,
            )

        report = await self._run(op)
        self._known.difference_update(
            job_id
            for job_id in (*report.delivered, *report.dropped_undelivered, *report.dropped_orphans)
            if job_id not in seen_meanwhile
        )
        if report.dropped_undelivered:
            log.warning(
                "outbox: dropped %d terminal frame(s) the coordinator did not confirm in 30 days "
                "(billing records it never got; their ledger rows stay): job_ids=%s",
                len(report.dropped_undelivered),
                _some(report.dropped_undelivered),
            )
        if report.dropped_orphans:
            log.warning(
                "outbox: dropped %d job(s) accepted over 30 days ago that never ended: job_ids=%s",
                len(report.dropped_orphans),
                _some(report.dropped_orphans),
            )
        return report

    async def depth(self) -> tuple[int, float | None]:
        """(undelivered frames, age in seconds of the oldest one or None)."""
        now = self._now()

        def op(db: sqlite3.Connection) -> tuple[int, int | None]:
            count, oldest = db.execute(
                "SELECT count(*), min(finished_ms) FROM frames WHERE delivered_ms IS NULL"
            ).fetchone()
            return int(count), oldest

        count, oldest = await self._run(op)
        return count, None if oldest is None else max(0.0, (now - oldest) / 1000)

    async def aclose(self) -> None:
        """Refuse new calls, write every call already handed over, then close the file."""
        if self._conn is None or self._closing:
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            while self._queue or self._flush_done is not None:
                if self._flush_done is None:
                    await self._flush()
                else:
                    await self._flush_done.wait()
            connection, self._conn = self._conn, None
            await anyio.to_thread.run_sync(connection.close)
            self._journal.close()

    # -- the batching engine ---------------------------------------------------------------

    def _remember(self, job_id: str) -> None:
        self._known.add(job_id)
        for seen in self._seen_while_pruning:
            seen.add(job_id)

    def _now(self) -> int:
        return _ms(self._clock())

    async def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Queue `op` and return its result once a batch containing it has committed.

        Group commit without a background task: the first caller that finds no batch running
        runs one with everything queued; the others wait for it to end and look again.
        """
        if self._conn is None or self._closing:
            raise OutboxError(f"outbox {self.path}: used after it was closed")
        call: _Call[T] = _Call(op)
        self._queue.append(call)
        with anyio.CancelScope(shield=True):
            while not call.done:
                if self._flush_done is None:
                    await self._flush()
                else:
                    await self._flush_done.wait()
        if call.error is not None:
            raise call.error
        return cast(T, call.result)

    async def _flush(self) -> None:
        self._flush_done = done = anyio.Event()
        batch, self._queue = self._queue, []
        try:
            await anyio.to_thread.run_sync(self._execute, batch)
        finally:
            self._flush_done = None
            done.set()

    def _execute(self, batch: list[_Call[Any]]) -> None:
        """(worker thread) One transaction for the batch; if it fails, each call alone, so a
        failing call fails only itself."""
        if len(batch) > 1 and self._transact(batch):
            return
        for call in batch:
            self._transact([call])

    def _transact(self, calls: list[_Call[Any]]) -> bool:
        connection = self._conn
        assert connection is not None
        try:
            connection.execute("BEGIN IMMEDIATE")
            results = [call.op(connection) for call in calls]
            connection.execute("COMMIT")
        except Exception as exc:
            rollback(connection)
            if len(calls) > 1:
                return False
            calls[0].error = outbox_error(self.path, exc) if isinstance(exc, sqlite3.Error) else exc
            calls[0].done = True
            return True
        for call, result in zip(calls, results, strict=True):
            call.result = result
            call.done = True
        return True


def _forget_expired(db: sqlite3.Connection, job_id: str, now_ms: int) -> None:
    """Drop `job_id`'s frame if it was delivered over 24 h ago: from then on the id is new
    (protocol.md §4), whether or not `prune()` has run since."""
    db.execute(
        "DELETE FROM frames WHERE job_id = ? AND delivered_ms < ?",
        (job_id, now_ms - DELIVERED_KEEP_S * 1000),
    )


# -- decisions: pure functions over plain data ----------------------------------------------


def amount_micro_usdc(
    outcome: str, tokens_in: int, tokens_out: int, input_per_1m: int, output_per_1m: int
) -> int:
    """Gross amount at list price (cli.md): ceil((in × in_price + out × out_price) / 10^6)
    micro-USDC, in exact integer arithmetic; a failed job earns nothing."""
    if outcome != "job_done":
        return 0
    return -(-(tokens_in * input_per_1m + tokens_out * output_per_1m) // 1_000_000)


def stored_type(frame: str) -> str | None:
    """The `type` of a frame's JSON text, or None when it is not a JSON object."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def entry_from_frame(frame: str, model: str) -> LedgerEntry:
    """A ledger row read off the terminal frame itself, for a `finish` without prices."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        data = {}
    outcome = "job_done" if data.get("type") == "job_done" else str(data.get("error_code", "?"))
    tokens = data.get("tokens") if outcome == "job_done" else None
    counts = tokens if isinstance(tokens, dict) else {}
    source: UsageSource = "estimated" if data.get("usage_source") == "estimated" else "reported"
    return LedgerEntry(
        model=model,
        backend="",
        outcome=outcome[:64],
        tokens_in=_count(counts.get("input")),
        tokens_out=_count(counts.get("output")),
        usage_source=source,
        input_per_1m=0,
        output_per_1m=0,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value <= _INT64_MAX else 0


@dataclass(frozen=True)
class Cutoffs:
    """Times (ms) before which each kind of entry is pruned."""

    delivered: int
    undelivered: int
    ledger: int


def clock_jumped(last_prune_ms: int | None, now_ms: int) -> str | None:
    """How the wall clock moved since the last prune when a prune must not act on it (moved
    backwards, or forward by more than PRUNE_CLOCK_JUMP_S); None when it may."""
    if last_prune_ms is None:
        return None
    if now_ms < last_prune_ms:
        return f"moved back {_span(last_prune_ms - now_ms)}"
    if now_ms - last_prune_ms > PRUNE_CLOCK_JUMP_S * 1000:
        return f"moved forward {_span(now_ms - last_prune_ms)}"
    return None


def _span(ms: int) -> str:
    seconds = ms / 1000
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds:.0f} s"


def _meta_ms(key: str) -> Callable[[sqlite3.Connection], int | None]:
    def op(db: sqlite3.Connection) -> int | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        try:
            return int(row[0]) if row else None
        except ValueError:
            return None

    return op


def prune_cutoffs(now_ms: int, keep_days: int) -> Cutoffs:
    return Cutoffs(
        delivered=now_ms - DELIVERED_KEEP_S * 1000,
        undelivered=now_ms - UNDELIVERED_KEEP_S * 1000,
        ledger=now_ms - keep_days * 86_400_000,
    )


def keep_days_of(config: object) -> int:
    """`[ledger] keep_days` of a loaded config, the documented default when it has none."""
    section = getattr(config, "ledger", None)
    value = getattr(section, "keep_days", None)
    return value if isinstance(value, int) and value > 0 else DEFAULT_KEEP_DAYS


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


def _some(job_ids: tuple[str, ...], limit: int = 5) -> str:
    shown = ",".join(job_ids[:limit])
    return f"{shown},…(+{len(job_ids) - limit})" if len(job_ids) > limit else shown


# -- I/O: opening the file, errors ----------------------------------------------------------
