"""Releases side by side: what the service runs, one directory per commit.

    <install dir>/                  the git checkout (/opt/provider-agent)
      releases/<commit>/            `git archive` of one commit …
        .venv/                      … and a non-editable install of it in its own venv
        release.json                written last: the release is complete (`Release`)
      current -> releases/<commit>  what the unit's ExecStart runs:
                                    <install dir>/current/.venv/bin/provider-agent

A release's scripts start its own venv's python by its real path (the venv is built where it
stays), so a running process never imports from another release, and switching `current` (one
`rename(2)` of a symlink: atomic) changes only what the next start runs.

The decisions — which release `--rollback` goes back to, which ones to prune, the `--list`
table — are pure functions over `Release` records; reading and writing the directory is the thin
rest of this module.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, ValidationError

from provider_agent.errors import UpgradeError
from provider_agent.ops.render import columns
from provider_agent.safe_text import printable
from provider_agent.store.atomic import fsync_directory, write_atomic

RELEASES: Final = "releases"
CURRENT: Final = "current"
VENV: Final = ".venv"
META: Final = "release.json"
#: A release directory's name: a full commit id (sha1, or sha256 repositories).
_COMMIT: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: How a commit is shown to a person.
SHORT: Final = 12


def short(commit: str) -> str:
    return commit[:SHORT]


def is_commit(text: str) -> bool:
    return _COMMIT.fullmatch(text) is not None


class Release(BaseModel):
    """One complete release, as its `release.json` keeps it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    commit: str
    version: str
    #: The outbox schema this release writes (store/engine.SCHEMA_VERSION) …
    schema_version: int
    #: … and the oldest schema version whose code can still read and write such a file.
    readable_from: int
    #: When `upgrade` (or `service install`) last chose it, ms since the epoch: the order of
    #: releases, newest last. A rollback does not change it.
    installed_ms: int
    #: The commit's subject line, for `--list`.
    subject: str = ""
    #: Why the last switch to it was undone (None: it ran, or never was switched to).
    failed: str | None = None


@dataclass(frozen=True)
class Layout:
    """The paths of an installation directory (`root`)."""

    root: Path

    @property
    def releases(self) -> Path:
        return self.root / RELEASES

    @property
    def current(self) -> Path:
        return self.root / CURRENT

    @property
    def stable_executable(self) -> Path:
        """What the unit's ExecStart names: through `current`, so it never changes."""
        return self.current / VENV / "bin" / "provider-agent"

    def directory(self, commit: str) -> Path:
        return self.releases / commit

    def executable(self, commit: str) -> Path:
        return self.directory(commit) / VENV / "bin" / "provider-agent"

    def python(self, commit: str) -> Path:
        return self.directory(commit) / VENV / "bin" / "python"

    def meta(self, commit: str) -> Path:
        return self.directory(commit) / META


def layout_of(executable: Path) -> Layout | None:
    """The installation an executable belongs to when it is a release's (reached through
    `current` or its own directory); None for any other (a checkout's own `.venv`)."""
    parts = executable.parts
    if len(parts) >= 4 and parts[-3:] == (VENV, "bin", "provider-agent"):
        if parts[-4] == CURRENT:
            return Layout(Path(*parts[:-4]))
        if len(parts) >= 5 and parts[-5] == RELEASES and is_commit(parts[-4]):
            return Layout(Path(*parts[:-5]))
    return None


# --- pure decisions ------------------------------------------------------------------------------


def ordered(releases: Iterable[Release]) -> list[Release]:
    """Oldest first: by when they were installed, then by commit (a stable order)."""
    return sorted(releases, key=lambda r: (r.installed_ms, r.commit))


def previous(releases: Sequence[Release], current: str | None) -> Release | None:
    """What `--rollback` goes back to: the newest release installed before `current` that did
    not fail; None when there is none (or `current` is not a release)."""
    by_commit = {r.commit: r for r in releases}
    now = by_commit.get(current or "")
    if now is None:
        return None
    earlier = [
        r for r in ordered(releases) if r.failed is None and r.installed_ms < now.installed_ms
    ]
    return earlier[-1] if earlier else None


def to_prune(releases: Sequence[Release], keep: int, protected: Iterable[str | None]) -> list[str]:
    """The commits to delete so that `keep` releases remain (the newest), never one in
    `protected` (the current and the running release); oldest first."""
    if keep < 1:
        raise ValueError("keep at least one release")
    guarded = {c for c in protected if c}
    newest_first = list(reversed(ordered(releases)))
    kept = {r.commit for r in newest_first if r.commit in guarded}
    for release in newest_first:
        if len(kept) >= keep:
            break
        kept.add(release.commit)
    return [r.commit for r in ordered(releases) if r.commit not in kept]


def render_list(releases: Sequence[Release], current: str | None, running: str | None) -> list[str]:
    """`upgrade --list`: newest first; `*` marks the running release, `current` the one the
    service starts (they differ only between a switch and its restart)."""
    if not releases:
        return ["no releases installed (`service install` builds the first)"]
    rows = []
    for release in reversed(ordered(releases)):
        notes = ["current"] if release.commit == current else []
        if release.failed is not None:
            notes.append(f"rolled back: {release.failed}")
        rows.append(
            [
                "*" if release.commit == running else "",
                short(release.commit),
                printable(release.version, 60),
                str(release.schema_version),
                printable(release.subject, 72),
                "; ".join(notes),
            ]
        )
    lines = columns(["", "COMMIT", "VERSION", "SCHEMA", "SUBJECT", ""], rows, right=(3,))
    lines.append("* the running release" if running else "* none: the service is not running")
    return lines


# --- the directory -------------------------------------------------------------------------------


def current_commit(layout: Layout) -> str | None:
    """The commit `current` points at; None without a `current` link."""
    try:
        target = os.readlink(layout.current)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UpgradeError(f"cannot read {layout.current}: {exc.strerror or exc}") from None
    head, _, name = target.rstrip("/").rpartition("/")
    if Path(head).name != RELEASES or not is_commit(name):
        raise UpgradeError(
            f"{layout.current} points at {target!r}, not at a release (releases/<commit>)"
        )
    return name


def read_release(layout: Layout, commit: str) -> Release | None:
    """The release's record; None when the directory holds no complete release."""
    try:
        data = layout.meta(commit).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UpgradeError(f"cannot read {layout.meta(commit)}: {exc.strerror or exc}") from None
    try:
        release = Release.model_validate_json(data)
    except ValidationError:
        raise UpgradeError(f"{layout.meta(commit)} is not a release record") from None
    if release.commit != commit:
        raise UpgradeError(f"{layout.meta(commit)} describes another commit ({release.commit})")
    return release


def read_releases(layout: Layout) -> list[Release]:
    """Every complete release, oldest first."""
    return ordered(r for c in release_dirs(layout) if (r := read_release(layout, c)) is not None)


def release_dirs(layout: Layout) -> list[str]:
    """The commits with a directory under releases/, complete or not."""
    try:
        names = os.listdir(layout.releases)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if is_commit(n) and (layout.releases / n).is_dir())


def write_release(layout: Layout, release: Release) -> None:
    """Write (or rewrite) the release's record, atomically: once it is there the release is
    complete."""
    data = release.model_dump_json(indent=2).encode() + b"\n"
    write_atomic(layout.meta(release.commit), data, mode=0o644)


def mark_failed(layout: Layout, commit: str, why: str | None) -> None:
    """Record why a switch to the release was undone (None: it ran after all)."""
    release = read_release(layout, commit)
    if release is not None and release.failed != why:
        write_release(layout, release.model_copy(update={"failed": why}))


def switch(layout: Layout, commit: str) -> None:
    """Point `current` at releases/<commit>: a new symlink beside it renamed over it, so a
    reader sees the old target or the new one, never none."""
    if read_release(layout, commit) is None:
        raise UpgradeError(f"no complete release {short(commit)} in {layout.releases}")
    temporary = layout.root / f".{CURRENT}.{secrets.token_hex(4)}.tmp"
    try:
        os.symlink(f"{RELEASES}/{commit}", temporary)
        os.replace(temporary, layout.current)
    except OSError as exc:
        raise UpgradeError(
            f"cannot point {layout.current} at {short(commit)}: {exc.strerror or exc}"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(layout.root)


def remove(layout: Layout, commit: str, protected: Iterable[str | None] = ()) -> None:
    """Delete a release's directory (never the current one, nor one in `protected`)."""
    if commit == current_commit(layout) or commit in set(protected):
        raise UpgradeError(f"{short(commit)} is in use: not removed")
    shutil.rmtree(layout.directory(commit))


def running_release(layout: Layout, pid: int) -> str | None:
    """The release process `pid` runs, from its command line: a release's script starts that
    release's python by its real path (`releases/<commit>/.venv/bin/python`)."""
    if pid <= 0:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in argv[:2]:
        path = Path(os.fsdecode(arg))
        parts = path.parts
        if (
            len(parts) >= 4
            and parts[-3:-1] == (VENV, "bin")
            and is_commit(parts[-4])
            and path.parent.parent.parent.parent == layout.releases
        ):
            return parts[-4]
    return None
