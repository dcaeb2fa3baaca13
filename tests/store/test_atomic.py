"""Atomic writes: the whole new file or the old one, the mode asked for, no temporary left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from provider_agent.store.atomic import write_atomic


def test_new_file_has_the_bytes_and_exactly_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    old_umask = os.umask(0o000)  # the mode must not depend on the umask
    try:
        write_atomic(path, b"key material", mode=0o600)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"key material"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_mode_none_follows_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    old_umask = os.umask(0o027)
    try:
        write_atomic(path, b"x", mode=None)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_replace_swaps_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old content that is longer")
    inode = path.stat().st_ino
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != inode  # renamed over, not rewritten in place


@pytest.mark.parametrize("existing", ["file", "symlink", "dangling-symlink"])
def test_no_replace_never_touches_what_is_there(tmp_path: Path, existing: str) -> None:
    path = tmp_path / "f"
    target = tmp_path / "target"
    if existing == "file":
        path.write_bytes(b"keep me")
    else:
        if existing == "symlink":
            target.write_bytes(b"keep me")
        path.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"new", replace=False)
    if existing != "dangling-symlink":
        assert path.read_bytes() == b"keep me"
    else:
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["f"] + (["target"] if existing == "symlink" else [])
    )


@pytest.mark.parametrize(
    "where",
    ["missing-parent", "parent-is-a-file", "target-is-a-directory"],
)
def test_failures_raise_oserror_and_leave_no_temporary(tmp_path: Path, where: str) -> None:
    if where == "missing-parent":
        path = tmp_path / "nope" / "f"
    elif where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "f"
    else:
        path = tmp_path / "dir"
        (path / "inside").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError):
        write_atomic(path, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
