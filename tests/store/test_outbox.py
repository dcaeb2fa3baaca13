"""The durable outbox on real sqlite files: the life of a job, a SIGKILLed agent, repeats,
pruning with an injected clock, and every way the file can be unusable."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from fractions import Fraction
from math import ceil
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.errors import OutboxError
from provider_agent.store.engine import APPLICATION_ID, FILE_NAME, SCHEMA_VERSION
from provider_agent.store.outbox import (
    LedgerEntry,
    Outbox,
    PruneReport,
    amount_micro_usdc,
    entry_from_frame,
    keep_days_of,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_750_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR


class Clock:
    """An injected wall clock: tests move it, nothing sleeps."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def done(job_id: str, tokens_in: int = 42, tokens_out: int = 8) -> str:
    return (
        f'{{"type":"job_done","job_id":"{job_id}","tokens":{{"input":{tokens_in},'
        f'"output":{tokens_out},"input_tokens":{tokens_in},"output_tokens":{tokens_out}}},'
        '"duration_ms":1234}'
    )


def failed(job_id: str, code: str = "backend_error") -> str:
    return f'{{"type":"job_error","job_id":"{job_id}","error_code":"{code}","tokens_emitted":0}}'


def entry(outcome: str = "job_done", tokens_in: int = 42, tokens_out: int = 8) -> LedgerEntry:
    return LedgerEntry(
        "llama3.1:8b", "ollama", outcome, tokens_in, tokens_out, "reported", 300_000, 600_000
    )


def ledger_rows(state: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(state / FILE_NAME) as db:
        return db.execute(
            "SELECT job_id, outcome, tokens_in, tokens_out, amount_micro_usdc"
            " FROM ledger ORDER BY id"
        ).fetchall()


async def test_a_job_from_accept_to_delivered_and_kept_for_repeats(tmp_path: Path) -> None:
    state = tmp_path / "state"
    clock = Clock()
    async with await Outbox.open(state, clock=clock) as outbox:
        assert not outbox.in_store("j1")
        await outbox.accept("j1", "llama3.1:8b")
        assert outbox.in_store("j1")
        assert await outbox.stored_frame("j1") is None  # in flight: no frame yet
        outbox.progress("j1", 512)
        assert await outbox.orphans() == [("j1", "llama3.1:8b", 512)]

        clock.now += 2
        assert await outbox.finish("j1", done("j1"), entry()) == done("j1")
        assert await outbox.orphans() == []
        assert await outbox.undelivered() == [("j1", done("j1"))]
        assert await outbox.depth() == (1, 0.0)
        clock.now += 3
        assert await outbox.depth() == (1, 3.0)

        await outbox.delivered(["j1"])
        assert await outbox.undelivered() == []
        assert await outbox.depth() == (0, None)
        # Kept 24 h after delivery, to answer a repeated `job` with the same frame.
        clock.now += DAY - 1
        assert await outbox.stored_frame("j1") == done("j1")
        clock.now += 2
        assert await outbox.stored_frame("j1") is None
    # 42 × 0.3 + 8 × 0.6 = 17.4 → 18 micro-USDC
    assert ledger_rows(state) == [("j1", "job_done", 42, 8, 18)]


async def test_the_store_is_private_to_the_agent(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    async with await Outbox.open(state) as outbox:
        await outbox.finish("j", done("j"), entry())
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in (FILE_NAME, f"{FILE_NAME}-wal", f"{FILE_NAME}-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        with sqlite3.connect(state / FILE_NAME) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)


async def test_undelivered_frames_come_back_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        ids = [f"job-{n}" for n in (5, 3, 9, 1, 7)]
        for job_id in ids:
            await outbox.accept(job_id, "m")
        for job_id in reversed(ids):  # end in another order than accepted
            clock.now += 1
            await outbox.finish(job_id, failed(job_id), entry("backend_error"))
        await outbox.delivered([ids[2], "never-heard-of"])
        assert [job_id for job_id, _ in await outbox.undelivered()] == [
            "job-7",
            "job-1",
            "job-3",
            "job-5",
        ]


async def test_a_second_finish_keeps_the_first_frame_and_one_ledger_row(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path) as outbox:
        await outbox.accept("j", "m")
        assert await outbox.finish("j", done("j"), entry()) == done("j")
        # The executor's late error after the job ended, and a racing pair of finishes.
        assert await outbox.finish("j", failed("j", "cancelled"), entry("cancelled")) == done("j")
        results: list[str] = []

        async def finish(frame: str) -> None:
            results.append(await outbox.finish("k", frame, entry()))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(finish, done("k", 1, 1))
            tasks.start_soon(finish, done("k", 2, 2))
        assert results[0] == results[1] == done("k", 1, 1)
        await outbox.delivered(["j"])
        # Delivered or not, the stored frame is the first one.
        assert await outbox.finish("j", failed("j"), entry("internal")) == done("j")
    assert [row[0] for row in ledger_rows(tmp_path)] == ["j", "k"]


async def test_refusals_never_accepted_are_stored_and_recorded(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path) as outbox:
        frame = failed("r1", "out_of_capacity")
        assert await outbox.finish("r1", frame, None) == frame
        assert outbox.in_store("r1")
        assert await outbox.stored_frame("r1") == frame
        # Accepted again by mistake and ended again (as after a crash): still the first frame.
        await outbox.accept("r1", "m")
        assert await outbox.finish("r1", failed("r1", "connection_lost"), None) == frame
        assert await outbox.orphans() == []
    assert ledger_rows(tmp_path) == [("r1", "out_of_capacity", 0, 0, 0)]


async def test_finish_without_prices_reads_the_row_off_the_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Outbox.open(tmp_path) as outbox:
        await outbox.accept("j", "qwen")
        await outbox.finish("j", done("j", 10, 20), None)
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        row = db.execute(
            "SELECT model, outcome, tokens_in, tokens_out, amount_micro_usdc FROM ledger"
        )
        assert row.fetchall() == [("qwen", "job_done", 10, 20, 0)]
    assert "without prices" in caplog.text


async def test_a_record_handed_over_is_written_even_if_its_caller_is_cancelled(
    tmp_path: Path,
) -> None:
    async with await Outbox.open(tmp_path) as outbox:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await outbox.finish("j", done("j"), entry())
        assert await outbox.undelivered() == [("j", done("j"))]


async def test_one_failing_call_in_a_batch_fails_only_itself(tmp_path: Path) -> None:
    outcomes: dict[str, object] = {}
    async with await Outbox.open(tmp_path) as outbox:

        async def call(name: str, coro_fn: object) -> None:
            try:
                outcomes[name] = await coro_fn()  # type: ignore[operator]
            except UnicodeEncodeError as exc:
                outcomes[name] = exc

        unstorable = done("bad").replace("bad", "\ud800")  # a lone surrogate: not UTF-8
        async with anyio.create_task_group() as tasks:
            # The first call runs alone; the next two queue behind it and share one batch.
            tasks.start_soon(call, "a", lambda: outbox.finish("a", done("a"), entry()))
            tasks.start_soon(call, "bad", lambda: outbox.finish("bad", unstorable, entry()))
            tasks.start_soon(call, "b", lambda: outbox.finish("b", done("b"), entry()))
        assert isinstance(outcomes["bad"], UnicodeEncodeError)
        assert outcomes["a"] == done("a") and outcomes["b"] == done("b")
        assert [job for job, _ in await outbox.undelivered()] == ["a", "b"]


async def test_a_full_disk_is_a_loud_error_and_loses_nothing_stored(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path) as outbox:
        await outbox.finish("kept", done("kept"), entry())
        assert outbox._conn is not None
        pages = outbox._conn.execute("PRAGMA page_count").fetchone()[0]
        outbox._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(OutboxError, match=r"outbox .*outbox\.sqlite3: the disk is full"):
            for n in range(50):
                await outbox.finish(f"x{n}", "x" * 20_000, entry())
        assert ("kept", done("kept")) in await outbox.undelivered()


async def test_a_frame_stored_while_the_journal_cannot_be_written_is_still_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The commit decides: a frame in the store is returned for sending even when its journal
    entry cannot be ended; the next start's `connection_lost` for it keeps the stored frame."""
    async with await Outbox.open(tmp_path) as outbox:
        await outbox.accept("j1", "m")
        journal_fd = outbox._journal._fd
        assert journal_fd is not None
        full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC, for real
        os.dup2(full, journal_fd)
        os.close(full)
        assert await outbox.finish("j1", done("j1"), entry()) == done("j1")
        assert await outbox.undelivered() == [("j1", done("j1"))]
    assert "j1 stored, but not marked ended" in caplog.text and "No space left" in caplog.text
    async with await Outbox.open(tmp_path) as outbox:
        assert [job for job, _, _ in await outbox.orphans()] == ["j1"]
        assert await outbox.finish("j1", "connection_lost", None) == done("j1")
        assert len(ledger_rows(tmp_path)) == 1


async def test_use_after_close_is_an_outbox_error(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path)
    await outbox.aclose()
    await outbox.aclose()
    with pytest.raises(OutboxError, match="closed"):
        await outbox.finish("j", done("j"), entry())


# -- a killed agent ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from provider_agent.store.outbox import LedgerEntry, Outbox

    async def main():
        outbox = await Outbox.open(Path(sys.argv[1]))
        price = LedgerEntry("m1", "ollama", "job_done", 1000, 1000, "reported", 1, 1)
        await outbox.accept("done-undelivered", "m1")
        await outbox.accept("in-flight", "m2")
        await outbox.accept("done-delivered", "m1")
        await outbox.finish("done-undelivered", sys.argv[2], price)
        outbox.progress("in-flight", 1234)
        await outbox.finish("done-delivered", sys.argv[3], price)
        await outbox.delivered(["done-delivered"])
        print("ready", flush=True)
        await anyio.sleep_forever()

    anyio.run(main)
    """
)


def test_after_sigkill_undelivered_frames_and_orphans_survive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), done("done-undelivered"), done("done-delivered")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (state / f"{FILE_NAME}-wal").exists()  # nothing checkpointed or closed cleanly

    async def restart() -> None:
        async with await Outbox.open(state) as outbox:
            assert await outbox.undelivered() == [("done-undelivered", done("done-undelivered"))]
            assert await outbox.orphans() == [("in-flight", "m2", 1234)]
            for job_id in ("done-undelivered", "in-flight", "done-delivered"):
                assert outbox.in_store(job_id)
            assert await outbox.stored_frame("done-delivered") == done("done-delivered")
            # What the executor does at start: the orphan ends `connection_lost`, billed nothing.
            lost = failed("in-flight", "connection_lost")
            await outbox.finish("in-flight", lost, entry("connection_lost"))
            assert await outbox.orphans() == []

    anyio.run(restart)
    assert ledger_rows(state) == [
        ("done-undelivered", "job_done", 1000, 1000, 1),
        ("done-delivered", "job_done", 1000, 1000, 1),
        ("in-flight", "connection_lost", 42, 8, 0),
    ]


# -- pruning ----------------------------------------------------------------------------------


async def prune_until(outbox: Outbox, clock: Clock, when: float) -> list[PruneReport]:
    """Prune every (nearly) day until `when`, as a running agent does (hourly)."""
    reports = []
    while clock.now < when:
        clock.now = min(when, clock.now + DAY - 1)
        reports.append(await outbox.prune())
    return reports


async def test_prune_keeps_each_kind_exactly_as_long_as_promised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock, keep_days=60) as outbox:
        await outbox.finish("delivered", done("delivered"), entry())
        await outbox.delivered(["delivered"])
        await outbox.finish("unconfirmed", done("unconfirmed"), entry())
        await outbox.accept("orphan", "m")

        clock.now += DAY - 1
        report = await outbox.prune()
        assert report.delivered == () and report.ledger_rows == 0
        assert outbox.in_store("delivered")

        clock.now += 2
        report = await outbox.prune()
        assert report.delivered == ("delivered",)
        assert not outbox.in_store("delivered")
        assert await outbox.stored_frame("delivered") is None
        assert await outbox.undelivered() == [("unconfirmed", done("unconfirmed"))]

        reports = await prune_until(outbox, clock, T0 + 30 * DAY - 1)
        assert not any(r.dropped_undelivered or r.skipped for r in reports)
        assert caplog.records == []
        clock.now = T0 + 30 * DAY + 1
        with caplog.at_level(logging.WARNING):
            report = await outbox.prune()
        assert report.dropped_undelivered == ("unconfirmed",)
        assert report.dropped_orphans == ("orphan",)
        assert "dropped 1 terminal frame" in caplog.text and "unconfirmed" in caplog.text
        assert "dropped 1 job(s)" in caplog.text and "orphan" in caplog.text
        assert await outbox.undelivered() == [] and await outbox.orphans() == []
        assert not outbox.in_store("unconfirmed") and not outbox.in_store("orphan")
        # The ledger keeps both rows until keep_days.
        assert len(ledger_rows(tmp_path)) == 2
        assert sum(r.ledger_rows for r in await prune_until(outbox, clock, T0 + 60 * DAY - 1)) == 0
        clock.now = T0 + 60 * DAY + 1
        assert (await outbox.prune()).ledger_rows == 2
    assert ledger_rows(tmp_path) == []


async def test_a_repeat_seen_while_pruning_stays_known(tmp_path: Path) -> None:
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        await outbox.finish("j", done("j"), entry())
        await outbox.delivered(["j"])
        clock.now += 2 * DAY
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(outbox.prune)
            tasks.start_soon(outbox.accept, "j", "m")  # the repeat, run anew after 24 h
        assert outbox.in_store("j")
        assert await outbox.orphans() == [("j", "m", 0)]


# -- unusable stores ---------------------------------------------------------------------------


def _write_foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('precious')")
    sqlite3.connect(path).close()


def _write_newer(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.execute("CREATE TABLE future (x)")
    sqlite3.connect(path).close()


def _store_of_many_pages(path: Path) -> bytearray:
    async def fill() -> None:
        async with await Outbox.open(path.parent) as outbox, anyio.create_task_group() as tasks:
            for n in range(300):
                tasks.start_soon(outbox.finish, f"j{n}", done(f"j{n}") + " " * 500, entry())

    anyio.run(fill)
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    return data


def _write_truncated(path: Path) -> None:
    data = _store_of_many_pages(path)
    path.write_bytes(data[: len(data) // 2])


def _write_garbage_page(path: Path) -> None:
    data = _store_of_many_pages(path)
    data[3 * 4096 : 4 * 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_bytes(os.urandom(8192)), "not a database"),
        (lambda p: p.write_text("hello, I am a text file\n" * 100), "not a database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200), "not a database"),
        (_write_foreign, "not a provider-agent outbox"),
        (_write_newer, "written by a newer provider-agent"),
        (_write_truncated, "corrupt|not a database"),
        (_write_garbage_page, "corrupt|not a database"),
    ],
    ids=["random", "text", "bad-header", "foreign", "newer", "truncated", "garbage-page"],
)
def test_a_corrupt_or_foreign_store_is_one_loud_line_and_left_untouched(
    tmp_path: Path, make: Callable[[Path], object], expected: str
) -> None:
    path = tmp_path / FILE_NAME
    make(path)
    for sidecar in (f"{FILE_NAME}-wal", f"{FILE_NAME}-shm"):
        (tmp_path / sidecar).unlink(missing_ok=True)
    before = path.read_bytes()
    with pytest.raises(OutboxError) as caught:
        anyio.run(Outbox.open, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"outbox {path}")
    assert re.search(expected, message), message
    assert path.read_bytes() == before  # nothing is lost: the operator decides what to do


async def test_an_empty_file_is_a_new_store(tmp_path: Path) -> None:
    # The agent creates the file before sqlite writes its header: a crash in between leaves
    # an empty file, which holds nothing to lose.
    (tmp_path / FILE_NAME).touch()
    async with await Outbox.open(tmp_path) as outbox:
        assert await outbox.undelivered() == []


async def test_a_directory_or_other_non_file_where_the_store_should_be(tmp_path: Path) -> None:
    (tmp_path / "a" / FILE_NAME).mkdir(parents=True)
    with pytest.raises(OutboxError, match=r"outbox .*outbox\.sqlite3: is a directory"):
        await Outbox.open(tmp_path / "a")
    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / FILE_NAME)
    with pytest.raises(OutboxError, match="is not a regular file"):
        await Outbox.open(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / FILE_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutboxError, match="is not a regular file"):
        await Outbox.open(tmp_path / "c")


async def test_a_state_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("x")
    for state in (tmp_path / "plain-file", tmp_path / "plain-file" / "state"):
        with pytest.raises(OutboxError, match="cannot create the state directory") as caught:
            await Outbox.open(state)
        assert str(state) in str(caught.value)


OPEN_AND_REPORT = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from provider_agent.errors import OutboxError
    from provider_agent.store.outbox import Outbox

    async def main():
        try:
            outbox = await Outbox.open(Path(sys.argv[1]))
        except OutboxError as exc:
            print(exc)
            sys.exit(3)
        await outbox.aclose()

    anyio.run(main)
    """
)


def _open_without_privileges(state: Path) -> subprocess.CompletedProcess[str]:
    """Open the store in a process that file modes apply to (root drops its capabilities)."""
    command = [sys.executable, "-c", OPEN_AND_REPORT, str(state)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file modes cannot deny root")
        command = [setpriv, "--bounding-set", "-all", "--inh-caps", "-all", *command]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def test_unwritable_places_are_refused_at_open(tmp_path: Path) -> None:
    read_only_dir = tmp_path / "ro-dir"
    read_only_dir.mkdir(mode=0o500)
    read_only_file = tmp_path / "ro-file"
    read_only_file.mkdir()
    (read_only_file / FILE_NAME).touch(mode=0o400)
    read_only_parent = tmp_path / "ro-parent"
    read_only_parent.mkdir(mode=0o500)
    cases = {
        read_only_dir: "cannot open it for writing: Permission denied",
        read_only_file: "cannot open it for writing: Permission denied",
        read_only_parent / "state": "cannot create the state directory",
    }
    try:
        for state, expected in cases.items():
            result = _open_without_privileges(state)
            assert result.returncode == 3, result.stderr
            assert expected in result.stdout and result.stdout.count("\n") == 1, result.stdout
            assert "Traceback" not in result.stderr
    finally:
        for path in (read_only_dir, read_only_parent):
            path.chmod(0o700)


async def test_a_read_only_existing_store_is_refused_not_silently_read(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path) as outbox:
        await outbox.finish("j", done("j"), entry())
    (tmp_path / FILE_NAME).chmod(0o400)
    result = _open_without_privileges(tmp_path)
    assert result.returncode == 3 and "cannot open it for writing" in result.stdout


# -- the pure parts ---------------------------------------------------------------------------


@given(
    tokens_in=st.integers(0, 10**12),
    tokens_out=st.integers(0, 10**12),
    price_in=st.integers(0, 10**9),
    price_out=st.integers(0, 10**9),
)
def test_amount_is_the_exact_ceiling(
    tokens_in: int, tokens_out: int, price_in: int, price_out: int
) -> None:
    exact = Fraction(tokens_in * price_in + tokens_out * price_out, 10**6)
    amount = amount_micro_usdc("job_done", tokens_in, tokens_out, price_in, price_out)
    assert amount == ceil(exact) and amount - 1 < exact <= amount
    assert amount_micro_usdc("backend_error", tokens_in, tokens_out, price_in, price_out) == 0


def test_amount_examples() -> None:
    assert amount_micro_usdc("job_done", 1, 0, 1, 0) == 1  # a millionth rounds up to one
    assert amount_micro_usdc("job_done", 0, 0, 300_000, 600_000) == 0
    assert amount_micro_usdc("job_done", 1_000_000, 1_000_000, 300_000, 600_000) == 900_000
    assert amount_micro_usdc("job_done", 1_000_001, 0, 1, 0) == 2
    assert amount_micro_usdc("cancelled", 10**6, 10**6, 10**6, 10**6) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"tokens_in": -1},
        {"tokens_out": 2**63},
        {"input_per_1m": -5},
        {"output_per_1m": 1.5},
        {"tokens_in": 2**63 - 1, "tokens_out": 2**63 - 1},  # the amount would overflow
    ],
)
def test_a_ledger_entry_out_of_range_is_refused_when_built(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "model": "m",
        "backend": "b",
        "outcome": "job_done",
        "tokens_in": 1,
        "tokens_out": 1,
        "usage_source": "reported",
        "input_per_1m": 10**6,
        "output_per_1m": 10**6,
    }
    with pytest.raises(ValueError, match="ledger entry"):
        LedgerEntry(**{**fields, **bad})  # type: ignore[arg-type]


def test_entry_from_frame_reads_outcome_tokens_and_source() -> None:
    estimated = done("j", 5, 6)[:-1] + ',"usage_source":"estimated"}'
    row = entry_from_frame(estimated, "m")
    assert (row.outcome, row.tokens_in, row.tokens_out, row.usage_source) == (
        "job_done",
        5,
        6,
        "estimated",
    )
    assert row.amount_micro_usdc == 0
    assert entry_from_frame(failed("j", "cancelled"), "m").outcome == "cancelled"
    for garbage in ("", "not json", "[1,2]", '{"type":"job_done","tokens":{"input":-3}}'):
        row = entry_from_frame(garbage, "m")
        assert row.tokens_in == 0 and row.amount_micro_usdc == 0


def test_keep_days_of_a_config_with_or_without_the_section() -> None:
    class Ledger:
        keep_days = 30

    class WithLedger:
        ledger = Ledger()

    assert keep_days_of(WithLedger()) == 30
    assert keep_days_of(object()) == 400


async def test_an_id_is_new_again_once_its_delivered_frame_expired(tmp_path: Path) -> None:
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        await outbox.finish("j", done("j", 1, 1), entry())
        await outbox.delivered(["j"])
        clock.now += DAY + 1  # expired, and no prune has run
        assert await outbox.stored_frame("j") is None
        await outbox.accept("j", "m")
        assert await outbox.orphans() == [("j", "m", 0)]
        assert await outbox.finish("j", done("j", 2, 2), entry()) == done("j", 2, 2)
        assert await outbox.undelivered() == [("j", done("j", 2, 2))]
    assert [row[0] for row in ledger_rows(tmp_path)] == ["j", "j"]


async def test_close_writes_every_call_already_handed_over(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path)
    async with anyio.create_task_group() as tasks:
        for n in range(20):
            tasks.start_soon(outbox.finish, f"j{n}", done(f"j{n}"), entry())
        tasks.start_soon(outbox.aclose)
    with pytest.raises(OutboxError, match="closed"):
        await outbox.accept("late", "m")
    assert len(ledger_rows(tmp_path)) == 20


@pytest.mark.parametrize(
    ("jump", "word"), [(8 * DAY, "moved forward 8.0 days"), (-HOUR, "moved back 3600 s")]
)
async def test_a_prune_after_the_wall_clock_jumped_removes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, jump: float, word: str
) -> None:
    """protocol.md §8: a clock correction (NTP stepping a clock that was days behind) must not
    drop minutes-old unconfirmed billing records, nor end the 24 h of a delivered frame: the
    prune that sees the jump acts on nothing and says so; the next one acts."""
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        await outbox.prune()
        await outbox.finish("unconfirmed", done("unconfirmed"), entry())
        await outbox.finish("delivered", done("delivered"), entry())
        await outbox.delivered(["delivered"])
        clock.now += jump
        with caplog.at_level(logging.WARNING):
            report = await outbox.prune()
        assert report.skipped and report == PruneReport((), (), (), 0, skipped=True)
        assert word in caplog.text and "nothing pruned" in caplog.text
        assert await outbox.undelivered() == [("unconfirmed", done("unconfirmed"))]
        assert outbox.in_store("delivered")
        clock.now += HOUR
        assert not (await outbox.prune()).skipped  # the next prune acts, on the new clock


async def test_the_last_prune_is_remembered_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        await outbox.prune()
        await outbox.finish("unconfirmed", done("unconfirmed"), entry())
    clock.now += 40 * DAY  # the clock was stepped while the agent was stopped
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        assert (await outbox.prune()).skipped
        assert await outbox.undelivered() == [("unconfirmed", done("unconfirmed"))]
