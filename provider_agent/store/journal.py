"""The in-flight journal: the jobs this agent accepted and has not ended, in `inflight.jsonl`
beside the outbox. A job is written here before its upstream request starts (write-ahead), so
every job the coordinator has seen a byte of is reported `connection_lost` after the agent dies
(protocol.md §4) — CI once SIGKILLed the agent between a first chunk and its record.

Why not a row in the outbox: a sqlite commit goes through the worker thread and, under
`synchronous=FULL`, an fsync. In a burst of 256 jobs that took 4-7 ms at the median
(bench/relay.py), and the first chunk must wait for the record. An append here is one `write()`
on the event loop (a few µs) and survives the process being killed — SIGKILL, the OOM killer, a
crash — because the bytes are in the kernel's page cache. It is not fsynced: after a power cut or
kernel panic in the following seconds, jobs that were in flight may go unreported, and the
coordinator times them out (protocol.md §5). Terminal frames, the billing records, stay fsynced
in the outbox.

Format: one JSON object per line — `{"a": job_id, "m": model, "t": accepted_ms}` accepted,
`{"p": job_id, "b": bytes_relayed}` progress, `{"e": job_id}` ended. A line that does not parse
(a torn last line: the process died mid-write) is skipped, and the next record starts on a new
line (protocol.md §8): at open, a file that does not end in a line break gets one before
anything is appended, and after a write that failed part-way (a full disk) the next record is
written after a line break too. Past `COMPACT_BYTES` the file is rewritten with the open jobs
only (write a new file, rename it over).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from provider_agent.errors import OutboxError

log = logging.getLogger(__name__)

FILE_NAME = "inflight.jsonl"
#: Rewritten with the open jobs once it grows past this (progress lines come once a second per job).
COMPACT_BYTES = 1024 * 1024


@dataclass
class InFlight:
    """One accepted job that has not ended."""

    model: str
    accepted_ms: int
    bytes_relayed: int = 0


def replay(data: bytes) -> tuple[dict[str, InFlight], int]:
    """The open jobs a journal's bytes describe, and how many lines were skipped as unreadable."""
    jobs: dict[str, InFlight] = {}
    skipped = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            if "a" in record:
                job_id = record["a"]
                jobs[_text(job_id)] = InFlight(_text(record["m"]), _count(record["t"]))
            elif "p" in record:
                job = jobs.get(_text(record["p"]))
                if job is not None:
                    job.bytes_relayed = _count(record["b"])
            else:
                jobs.pop(_text(record["e"]), None)
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
            skipped += 1
    return jobs, skipped


def accepted_line(job_id: str, job: InFlight) -> bytes:
    return orjson.dumps({"a": job_id, "m": job.model, "t": job.accepted_ms}) + b"\n"


def progress_line(job_id: str, bytes_relayed: int) -> bytes:
    return orjson.dumps({"p": job_id, "b": bytes_relayed}) + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("not a count")
    return value


class Journal:
    """The open file and the jobs it holds open. Every write happens on the caller's thread (the
    event loop): an append of under 300 bytes, or now and then a compaction of a few KiB."""

    def __init__(self, path: Path, jobs: dict[str, InFlight], fd: int) -> None:
        self.path = path
        self.jobs = jobs
        self._fd: int | None = fd
        self._size = os.fstat(fd).st_size
        #: The file may end inside a record (torn by a crash or a failed write): the next write
        #: starts with a line break, so that record is not glued onto the torn one.
        self._torn = False

    @classmethod
    def open(cls, path: Path, carried: Iterable[tuple[str, InFlight]] = ()) -> Journal:
        """Read what an earlier run left (its open jobs are the orphans), add `carried` (jobs an
        older outbox schema kept), and open the file for appending. OutboxError on failure."""
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise OutboxError(
                f"outbox {path}: cannot open it for writing: {exc.strerror}"
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutboxError(f"outbox {path}: is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as existing:
                data = existing.read()
        except OSError as exc:
            os.close(fd)
            raise OutboxError(f"outbox {path}: cannot read it: {exc.strerror}") from None
        jobs, skipped = replay(data)
        if skipped:
            log.warning("outbox %s: skipped %d unreadable line(s)", path, skipped)
        journal = cls(path, jobs, fd)
        journal._torn = bool(data) and not data.endswith(b"\n")
        extra = [(job_id, job) for job_id, job in carried if job_id not in jobs]
        if extra:
            jobs.update(extra)
            journal._write(b"".join(accepted_line(job_id, job) for job_id, job in extra))
            os.fsync(fd)
        return journal

    def accepted(self, job_id: str, model: str, now_ms: int) -> None:
        job = InFlight(model, now_ms)
        self._write(accepted_line(job_id, job))
        self.jobs[job_id] = job

    def progressed(self, job_id: str, bytes_relayed: int) -> None:
        job = self.jobs.get(job_id)
        if job is None or self._fd is None:
            return
        job.bytes_relayed = bytes_relayed
        self._write(progress_line(job_id, bytes_relayed))

    def ended(self, job_id: str) -> None:
        """A job whose terminal frame is stored. After `close` (a `finish` that completed as
        the outbox closed) nothing is written: the next start finds the job open, and its
        `connection_lost` changes nothing, since the stored frame is kept."""
        if self.jobs.pop(job_id, None) is None or self._fd is None:
            return
        self._write(orjson.dumps({"e": job_id}) + b"\n")
        if self._size > COMPACT_BYTES:
            self._compact()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise OutboxError(f"outbox {self.path}: used after it was closed")
        if self._torn:
            data = b"\n" + data
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._torn = True  # some of it may be in the file: the next record starts afresh
            raise OutboxError(f"outbox {self.path}: cannot write: {exc.strerror}") from None
        self._torn = False
        self._size += len(data)

    def _compact(self) -> None:
        """Rewrite the file with the open jobs only. The new file replaces the old one in one
        rename, so a kill at any moment leaves one whole journal or the other."""
        data = b"".join(accepted_line(job_id, job) for job_id, job in self.jobs.items())
        data += b"".join(
            progress_line(job_id, job.bytes_relayed)
            for job_id, job in self.jobs.items()
            if job.bytes_relayed
        )
        fresh = self.path.with_name(self.path.name + ".new")
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(fresh, flags, 0o600)
            try:
                _write_all(fd, data)
                os.replace(fresh, self.path)
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            log.warning("outbox %s: cannot compact it: %s", self.path, exc.strerror)
            return
        old, self._fd, self._size = self._fd, fd, len(data)
        if old is not None:
            os.close(old)
