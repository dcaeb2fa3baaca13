"""The outbox's sqlite file: creating or opening it (0600, WAL, the chosen `synchronous`),
checking it is ours and sound, migrating its schema, and sqlite's errors in an operator's words.
The group commit and every read and write of records are `outbox.py`'s.

Releases run side by side and `upgrade` rolls back by itself, so a file must stay usable both
ways across one upgrade. `PRAGMA user_version` is the schema version that last migrated the file;
the meta row `readable_from` is the oldest schema version whose code may still open it (read
and write it as it is). A release that only adds to the schema what older code ignores (a table,
a nullable column; never a changed meaning) keeps `READABLE_FROM` where it was; any other change
raises it to its own `SCHEMA_VERSION`, and `upgrade` then says, before switching, that going back
past it is impossible. Older code opens a newer file it is allowed to and changes nothing of its
schema (`compatibility`, pure); it refuses any other newer file in one line, untouched.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path
from typing import Literal

from provider_agent.errors import OutboxError
from provider_agent.store.journal import FILE_NAME as JOURNAL_NAME
from provider_agent.store.journal import InFlight, Journal

log = logging.getLogger(__name__)


FILE_NAME = "outbox.sqlite3"


SCHEMA_VERSION = 2
#: The oldest schema version whose code may open a file this code migrated (module docstring).
READABLE_FROM = 2
#: The meta row that carries READABLE_FROM in the file.
READABLE_FROM_KEY = "readable_from"


#: `PRAGMA application_id`: marks the file as ours ("PAG1"), so a foreign sqlite file is refused.
APPLICATION_ID = 0x50414731


#: How long a write waits for a lock another process holds on the file before it fails.
BUSY_TIMEOUT_S = 10.0


_SCHEMA: tuple[str, ...] = (
    # v1. Times are integer milliseconds since the epoch (UTC): exact, and ordered.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        accepted_ms INTEGER NOT NULL,
        bytes_relayed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE frames (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL UNIQUE,
        frame TEXT NOT NULL,
        finished_ms INTEGER NOT NULL,
        delivered_ms INTEGER
    );
    CREATE INDEX frames_undelivered ON frames (seq) WHERE delivered_ms IS NULL;
    CREATE INDEX frames_delivered ON frames (delivered_ms) WHERE delivered_ms IS NOT NULL;
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        job_id TEXT NOT NULL,
        model TEXT NOT NULL,
        backend TEXT NOT NULL,
        outcome TEXT NOT NULL,
        tokens_in INTEGER NOT NULL,
        tokens_out INTEGER NOT NULL,
        usage_source TEXT NOT NULL,
        input_per_1m INTEGER NOT NULL,
        output_per_1m INTEGER NOT NULL,
        amount_micro_usdc INTEGER NOT NULL
    );
    CREATE INDEX ledger_time ON ledger (time_ms);
    """,
    # v2. Jobs in flight moved to the journal (`journal.py`); `_prepare` carries v1's rows over.
    """
    DROP TABLE jobs;
    """,
)
assert len(_SCHEMA) == SCHEMA_VERSION
assert READABLE_FROM <= SCHEMA_VERSION


Compatibility = Literal["create", "migrate", "open", "refuse"]


def compatibility(file_version: int, readable_from: int | None, ours: int) -> Compatibility:
    """What this code (schema `ours`) does with a file of schema `file_version` whose meta says
    it is `readable_from` (None: no such row, as in files older than the rule). Pure."""
    if file_version == 0:
        return "create"
    if file_version < ours:
        return "migrate"
    if file_version == ours:
        return "open"
    if readable_from is not None and readable_from <= ours:
        return "open"
    return "refuse"


def readable_by(file_version: int, readable_from: int | None, reader: int) -> bool:
    """Whether code of schema `reader` can open such a file (for `upgrade`'s rollback). Pure."""
    return compatibility(file_version, readable_from, reader) != "refuse"


_PLAIN_WORDS = {
    "SQLITE_NOTADB": "not a database (corrupt, or some other file)",
    "SQLITE_CORRUPT": "the database is corrupt",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_CANTOPEN": "cannot open it (check the directory exists and is writable)",
    "SQLITE_BUSY": "locked by another process",
    "SQLITE_LOCKED": "locked by another process",
    "SQLITE_PERM": "permission denied",
    "SQLITE_AUTH": "permission denied",
}


def describe_sqlite_error(exc: sqlite3.Error) -> str:
    """sqlite's error in an operator's words."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    for prefix, words in _PLAIN_WORDS.items():
        if name.startswith(prefix):
            return words
    if name.startswith("SQLITE_READONLY"):
        return "read-only: the agent cannot write it (check its owner and mode)"
    if name.startswith("SQLITE_IOERR"):
        return f"disk I/O error ({name})"
    return str(exc) or name or type(exc).__name__


def outbox_error(path: Path, exc: sqlite3.Error) -> OutboxError:
    words = describe_sqlite_error(exc)
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        words += (
            "; move it aside to start a new one (it holds undelivered billing records"
            " and the earnings ledger)"
        )
    return OutboxError(f"outbox {path}: {words}")


def rollback(connection: sqlite3.Connection) -> None:
    """Undo a failed batch. The failure itself is what gets reported; a ROLLBACK that fails
    too (sqlite may already have rolled back) adds nothing to it."""
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.debug("outbox: rollback after a failed batch also failed: %s", exc)


def make_state_dir(directory: Path) -> None:
    """Create the state directory (0700) when absent; OutboxError (one line) when it cannot be."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise OutboxError(
            f"outbox: cannot create the state directory {directory}: {exc.strerror or exc}"
        ) from None


def open_store(
    state_dir: Path, path: Path, synchronous: str, now_ms: int, busy_timeout_s: float
) -> tuple[sqlite3.Connection, set[str], Journal]:
    """(worker thread) Create or open the file, check it is ours and sound, migrate it, prove
    it writable, open the in-flight journal beside it, and load the ids both hold."""
    make_state_dir(state_dir)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutboxError(f"outbox {path}: {exc.strerror or exc}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutboxError(f"outbox {path}: is a directory; the outbox must be a file")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutboxError(f"outbox {path}: is not a regular file")
    try:
        # Created here with 0600; sqlite gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        raise OutboxError(f"outbox {path}: cannot open it for writing: {exc.strerror}") from None
    try:
        connection = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise outbox_error(path, exc) from None
    try:
        known, journal = _prepare(connection, path, synchronous, now_ms)
    except BaseException as exc:
        connection.close()
        if isinstance(exc, sqlite3.Error):
            raise outbox_error(path, exc) from None
        raise
    return connection, known, journal


def _prepare(
    connection: sqlite3.Connection, path: Path, synchronous: str, now_ms: int
) -> tuple[set[str], Journal]:
    # Look before changing anything: a foreign or newer file is left exactly as it was.
    _check_identity(connection, path)
    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise OutboxError(
            f"outbox {path}: the database is corrupt ({problems[0]}); move it aside to start a"
            " new one (it holds undelivered billing records and the earnings ledger)"
        )
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxError(f"outbox {path}: cannot use write-ahead logging here (got {mode})")
    connection.execute(f"PRAGMA synchronous = {synchronous}")
    connection.execute("BEGIN IMMEDIATE")
    journal: Journal | None = None
    try:
        # A v1 file kept jobs in flight in a table: they move to the journal (fsynced) before
        # the migration drops it; a kill in between carries them again, which changes nothing.
        carried = (
            [
                (str(job_id), InFlight(str(model), int(accepted_ms), int(relayed)))
                for job_id, model, accepted_ms, relayed in connection.execute(
                    "SELECT job_id, model, accepted_ms, bytes_relayed FROM jobs"
                )
            ]
            if _has_table(connection, "jobs")
            else []
        )
        journal = Journal.open(path.with_name(JOURNAL_NAME), carried)
        _migrate(connection, path)
        connection.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('opened_ms', ?)", (str(now_ms),)
        )
        known = set(journal.jobs)
        known.update(row[0] for row in connection.execute("SELECT job_id FROM frames"))
        connection.execute("COMMIT")
    except BaseException:
        rollback(connection)
        if journal is not None:
            journal.close()
        raise
    return known, journal


def _has_table(connection: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return connection.execute(query, (name,)).fetchone() is not None


def _check_identity(connection: sqlite3.Connection, path: Path) -> tuple[int, int | None]:
    """The file's schema version and `readable_from`; OutboxError for another program's file or
    a newer schema this code may not open."""
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id != APPLICATION_ID and (tables or version):
        raise OutboxError(
            f"outbox {path}: not a provider-agent outbox (another program's sqlite file)"
        )
    readable_from = _readable_from(connection) if version else None
    if compatibility(version, readable_from, SCHEMA_VERSION) == "refuse":
        oldest = f"{readable_from}" if readable_from is not None else f"{version}"
        raise OutboxError(
            f"outbox {path}: written by a newer provider-agent (schema {version}, which needs"
            f" schema {oldest} or later; this one knows {SCHEMA_VERSION}): upgrade the agent"
        )
    return version, readable_from


def _readable_from(connection: sqlite3.Connection) -> int | None:
    if not _has_table(connection, "meta"):
        return None
    row = connection.execute(
        "SELECT value FROM meta WHERE key = ?", (READABLE_FROM_KEY,)
    ).fetchone()
    try:
        return int(row[0]) if row is not None else None
    except ValueError:
        return None


def file_schema(path: Path) -> tuple[int, int | None] | None:
    """(schema version, readable_from) of an outbox file, read-only and without changing it;
    None when there is no file yet. OutboxError when it cannot be read."""
    if not path.exists():
        return None
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise outbox_error(path, exc) from None
    try:
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        return version, _readable_from(connection) if version else None
    except sqlite3.Error as exc:
        raise outbox_error(path, exc) from None
    finally:
        connection.close()


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    """(inside the opening transaction) Bring the schema to SCHEMA_VERSION; a newer file this
    code may open keeps its own schema and marker."""
    version, readable_from = _check_identity(connection, path)
    if version > SCHEMA_VERSION:
        return
    for script in _SCHEMA[version:]:
        for statement in script.split(";"):
            if statement.strip():
                connection.execute(statement)
    connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if version < SCHEMA_VERSION or readable_from is None:
        connection.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (READABLE_FROM_KEY, str(READABLE_FROM)),
        )
