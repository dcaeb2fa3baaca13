"""The state dir as `run` takes it: one agent per state dir, and only regular files where the
agent reads one (protocol.md §8, config.md; both settled on 2026-12-06).

`lock()` is the first thing `run` does there, before the identity, the outbox, the in-flight
journal or the pause file is read or written: an exclusive `flock` on `agent.lock`, held for
the life of the process (the kernel drops it when the process dies, SIGKILL included), with the
holder's pid written in the file so that a second `run` can name it. A second `run` on the same
state dir changes nothing there: it opens the lock file, fails to take the lock, reads the pid
and exits 78.

Only `run` takes the lock. The other commands that look at the state dir while an agent runs
keep to reading: `pause`/`resume` talk to the agent over its socket, `earnings` and `doctor`
read the ledger and the outbox read-only, `selftest` opens nothing there; none of them may be
refused because an agent runs, which is when an operator needs them.

`check_files()` then refuses (exit 78, one line) a FIFO, device, socket, directory or link where
the agent reads a file: opening a FIFO for reading waits for a writer that never comes, which
hung the start-up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path
from types import TracebackType

from provider_agent.errors import OutboxError, StateDirError
from provider_agent.ops.pause import PAUSE_FILE
from provider_agent.store.engine import FILE_NAME as OUTBOX_FILE
from provider_agent.store.engine import make_state_dir
from provider_agent.store.journal import FILE_NAME as JOURNAL_FILE

log = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
#: The files `run` reads in the state dir (sqlite's own beside the outbox: it reads them too).
READ_FILES = (
    OUTBOX_FILE,
    f"{OUTBOX_FILE}-wal",
    f"{OUTBOX_FILE}-shm",
    f"{OUTBOX_FILE}-journal",
    JOURNAL_FILE,
    PAUSE_FILE,
)
#: A pid and a newline; anything longer in the lock file is not ours to show.
_PID_BYTES = 32


class StateLock:
    """The held lock; `release()` (or leaving the `with`) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def lock(directory: Path) -> StateLock:
    """Take the state dir for this process, creating it (0700) when absent.

    StateDirError (exit 78) when another process holds it (naming the dir and that pid) or the
    lock file is not a regular file; OutboxError (exit 1, as an unusable outbox) when the
    directory cannot be created or written."""
    make_state_dir(directory)
    path = directory / LOCK_FILE
    _refuse_if_not_regular(path)  # before opening it: opening a device may do something
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        _refuse_if_not_regular(path)  # replaced in between
        raise OutboxError(
            f"outbox: cannot use the state directory {directory}: {path}: {exc.strerror or exc}"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StateDirError(_not_regular(path, mode))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirError(
                f"{directory}: in use by another provider-agent ({_holder(fd)}): one agent per "
                "state dir; stop that one first, or give this one its own [state] dir"
            ) from None
        _write_pid(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return StateLock(path, fd)


def lock_holder(directory: Path, proc_locks: Path = Path("/proc/locks")) -> int | None:
    """The pid holding `directory`'s lock now, from the kernel's table of locks (read-only: a
    probe that took the lock, even for a moment, could make a starting agent exit 78); None
    when nobody holds it, or where there is no such table (not Linux)."""
    try:
        found = (directory / LOCK_FILE).stat()
        table = proc_locks.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return flock_holder(table, os.major(found.st_dev), os.minor(found.st_dev), found.st_ino)


def flock_holder(table: str, major: int, minor: int, inode: int) -> int | None:
    """Pure: the pid of the exclusive `flock` on the file (major, minor, inode) in a
    `/proc/locks` text (`1: FLOCK  ADVISORY  WRITE 4242 fe:00:2884778 0 EOF`)."""
    for line in table.splitlines():
        fields = line.split()  # a waiter's line has "->" second: not a holder
        if len(fields) < 6 or fields[1:4] != ["FLOCK", "ADVISORY", "WRITE"]:
            continue
        try:
            parts = zip(fields[5].split(":"), (16, 16, 10), strict=True)
            where = tuple(int(part, base) for part, base in parts)
            pid = int(fields[4])
        except ValueError:
            continue
        if where == (major, minor, inode):
            return pid if pid > 0 else None
    return None


def check_files(directory: Path) -> None:
    """StateDirError naming the first file `run` reads in `directory` that exists and is not a
    regular file (a FIFO, a device, a socket, a directory, a symbolic link)."""
    for name in READ_FILES:
        _refuse_if_not_regular(directory / name)


def _refuse_if_not_regular(path: Path) -> None:
    """StateDirError when `path` exists and is not a regular file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateDirError(f"{path}: cannot look at it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise StateDirError(_not_regular(path, mode))


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((word for test, word in kinds if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int) -> str:
    return (
        f"{path}: is {file_kind(mode)}, not a regular file: the agent keeps only its own regular "
        "files there; remove it (the agent makes a fresh one)"
    )


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown: it has not written it yet"


def _write_pid(fd: int, path: Path) -> None:
    """The holder's pid, for the next `run` to name. A full disk must not stop a start that
    holds the lock: the lock is what protects the state dir, the pid only names its holder."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        log.warning("cannot write the pid into %s: %s", path, exc.strerror or exc)
