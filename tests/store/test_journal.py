"""The in-flight journal on real files: what a run leaves is what the next one reads, whatever
the file holds (torn lines, garbage, foreign encodings), compaction, and failing writes."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.errors import OutboxError
from provider_agent.store import journal as inflight
from provider_agent.store.engine import FILE_NAME as OUTBOX_NAME
from provider_agent.store.engine import SCHEMA_VERSION
from provider_agent.store.journal import FILE_NAME, InFlight, Journal, replay
from provider_agent.store.outbox import Outbox


def lines(*records: object) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


def test_replay_follows_accept_progress_and_end() -> None:
    data = lines(
        {"a": "j1", "m": "llama", "t": 5},
        {"a": "j2", "m": "qwen", "t": 6},
        {"p": "j1", "b": 100},
        {"p": "j1", "b": 250},
        {"e": "j2"},
        {"p": "j2", "b": 9},  # after its end: nothing to update
        {"e": "never-accepted"},
    )
    assert replay(data) == ({"j1": InFlight("llama", 5, 250)}, 0)


@pytest.mark.parametrize(
    "bad",
    [
        b'{"a": "torn", "m": "x", "t"',  # the process died mid-write
        b"not json at all",
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"a": 7, "m": "x", "t": 1}',
        b'{"a": "j", "m": null, "t": 1}',
        b'{"a": "j", "m": "x", "t": -1}',
        b'{"a": "j", "m": "x", "t": true}',
        b'{"a": "j", "m": "x"}',
        b'{"p": "ok", "b": "many"}',
        b'{"zzz": 1}',
        b"{}",
        b"[" * 10_000 + b"]" * 10_000,  # deeper than the parser goes
    ],
)
def test_replay_skips_a_line_it_cannot_read_and_keeps_the_rest(bad: bytes) -> None:
    data = lines({"a": "ok", "m": "m", "t": 1}) + bad + b"\n" + lines({"p": "ok", "b": 3})
    assert replay(data) == ({"ok": InFlight("m", 1, 3)}, 1)


@given(st.binary(max_size=2000))
def test_replay_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    jobs, skipped = replay(data)
    assert skipped <= data.count(b"\n") + data.count(b"\r") + 1
    assert all(isinstance(job, InFlight) for job in jobs.values())


def test_what_one_run_writes_the_next_reads(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    journal = Journal.open(path)
    journal.accepted("j1", "llama", 10)
    journal.accepted("j2", "qwen", 11)
    journal.accepted('quote " and \n newline \x00', "m", 12)  # opaque ids, written escaped
    journal.progressed("j1", 4096)
    journal.ended("j2")
    journal.ended("j2")  # a second end writes nothing
    journal.progressed("unknown", 1)
    size = path.stat().st_size
    journal.close()  # no flush or sync is needed: each record is one write()
    again = Journal.open(path)
    assert again.jobs == {
        "j1": InFlight("llama", 10, 4096),
        'quote " and \n newline \x00': InFlight("m", 12, 0),
    }
    assert path.stat().st_size == size
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again.close()


def test_past_the_threshold_the_file_is_rewritten_with_open_jobs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inflight, "COMPACT_BYTES", 4096)
    path = tmp_path / FILE_NAME
    journal = Journal.open(path)
    journal.accepted("long-running", "m", 1)
    journal.progressed("long-running", 77)
    largest = 0
    for n in range(500):
        journal.accepted(f"job-{n}", "m", 2 + n)
        journal.progressed(f"job-{n}", n)
        journal.ended(f"job-{n}")
        largest = max(largest, path.stat().st_size)
    journal.close()
    assert largest < 4096 + 200  # compacted each time it passed the threshold
    assert not path.with_name(FILE_NAME + ".new").exists()
    assert replay(path.read_bytes()) == ({"long-running": InFlight("m", 1, 77)}, 0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failing_write_is_an_outbox_error_naming_the_file(tmp_path: Path) -> None:
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    journal = Journal(tmp_path / FILE_NAME, {}, fd)
    with pytest.raises(OutboxError, match=rf"{FILE_NAME}: cannot write: No space left"):
        journal.accepted("j", "m", 1)
    journal.close()
    with pytest.raises(OutboxError, match="closed"):
        journal.accepted("j", "m", 1)
    journal.progressed("j", 5)  # a finish or progress completing as the outbox closes
    journal.ended("j")


@pytest.mark.parametrize("kind", ["directory", "symlink", "dangling symlink"])
def test_a_journal_path_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / FILE_NAME
    if kind == "directory":
        path.mkdir()
    else:
        target = tmp_path / "elsewhere"
        if kind == "symlink":
            target.write_bytes(b"")
        path.symlink_to(target)
    with pytest.raises(OutboxError, match=rf"{FILE_NAME}: cannot open it for writing"):
        Journal.open(path)


async def test_two_runs_of_the_outbox_share_the_journal_as_a_killed_run_would(
    tmp_path: Path,
) -> None:
    """The first outbox is never closed (as when the agent is SIGKILLed): what it accepted is an
    orphan for the next, with the bytes last recorded."""
    first = await Outbox.open(tmp_path)
    await first.accept("j", "m")
    first.progress("j", 512)
    async with await Outbox.open(tmp_path) as second:
        assert await second.orphans() == [("j", "m", 512)]
        assert second.in_store("j")
    await first.aclose()


async def test_a_v1_outbox_carries_its_jobs_in_flight_into_the_journal(tmp_path: Path) -> None:
    async with await Outbox.open(tmp_path):
        pass
    with sqlite3.connect(tmp_path / OUTBOX_NAME) as db:  # back to what v1 looked like
        db.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, model TEXT NOT NULL, accepted_ms"
            " INTEGER NOT NULL, bytes_relayed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        db.execute("INSERT INTO jobs VALUES ('old-2', 'm2', 20, 0), ('old-1', 'm1', 10, 300)")
        db.execute("PRAGMA user_version = 1")
    db.close()
    (tmp_path / FILE_NAME).unlink()
    async with await Outbox.open(tmp_path) as outbox:
        assert await outbox.orphans() == [("old-1", "m1", 300), ("old-2", "m2", 0)]
    with sqlite3.connect(tmp_path / OUTBOX_NAME) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    assert "jobs" not in tables and version == SCHEMA_VERSION
    async with await Outbox.open(tmp_path) as outbox:  # carried once, still there
        assert [job for job, _, _ in await outbox.orphans()] == ["old-1", "old-2"]


# --- torn lines (protocol.md §8): the next record starts on a new line ------------------------


@pytest.mark.parametrize("torn", [b'{"a": "dead", "m": "m", "t"', b'{"e": "j', b"\xff\xfe", b"{"])
def test_a_record_after_a_torn_last_line_is_read_back(tmp_path: Path, torn: bytes) -> None:
    """A crash mid-write leaves a last line without its end; what the next run writes after it
    must not be glued onto it (that job would be lost: no connection_lost, run twice)."""
    path = tmp_path / FILE_NAME
    path.write_bytes(lines({"a": "old", "m": "m", "t": 1}) + torn)
    journal = Journal.open(path)
    assert set(journal.jobs) == {"old"}
    journal.accepted("new", "m", 2)
    journal.progressed("new", 10)
    journal.close()
    jobs, skipped = replay(path.read_bytes())
    assert jobs == {"old": InFlight("m", 1), "new": InFlight("m", 2, 10)}
    assert skipped == 1  # the torn line alone


def test_a_write_that_failed_part_way_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    """A full disk can take part of a record; once space is back, the next record starts on a
    new line. The partial write is made real: a file size limit (RLIMIT_FSIZE) cuts it."""
    import resource
    import signal

    path = tmp_path / FILE_NAME
    journal = Journal.open(path)
    journal.accepted("first", "m", 1)
    limit = path.stat().st_size + 10  # room for 10 bytes of the next record only
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        with pytest.raises(OutboxError, match="cannot write"):
            journal.accepted("cut-short", "m" * 50, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.stat().st_size == limit  # 10 bytes of it are in the file
    journal.accepted("after", "m", 3)
    journal.close()
    jobs, skipped = replay(path.read_bytes())
    assert set(jobs) == {"first", "after"} and skipped == 1
