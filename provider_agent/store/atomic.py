"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The bytes go to a temporary file in the same directory (created with O_EXCL, so nobody else's
file is followed or reused), are fsynced, and the temporary file is renamed over the target; the
directory is then fsynced so the rename itself survives a crash. Used for the identity key, the
file `init` writes and the outbox.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(
    path: Path, data: bytes, *, mode: int | None = 0o600, replace: bool = True
) -> None:
    """Write `data` to `path` atomically.

    `mode`: the file's permission bits, set before any byte is written (None: 0o666 less the
    umask, like any new file). `replace=False` never replaces an existing file: FileExistsError,
    also when one appears while writing. The parent directory must exist. OSError otherwise; no
    temporary file is left behind either way.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as out:  # owns the descriptor from here on
            if mode is not None:
                os.fchmod(out.fileno(), mode)  # exactly `mode`, whatever the umask
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            _publish_no_clobber(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _publish_no_clobber(temporary: Path, path: Path) -> None:
    """Move into place unless `path` exists (a hard link fails if it does: no race)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists") from None
    except OSError:  # no hard links on this filesystem: check, then rename
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists") from None
        os.replace(temporary, path)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable; a filesystem that cannot fsync a directory is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
