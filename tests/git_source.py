"""Real git repositories of this project for the release and upgrade tests.

`origin()` commits the working tree as it is now (tracked files as edited, untracked ones git
does not ignore) into a fresh repository: the code under test, not the last commit. `checkout()`
clones it where an installation lives, tracking `origin/main`, as README's checkout does.
`commit()` adds a commit to the origin that edits files by exact replacement.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
_IDENTITY: Final = {
    "GIT_AUTHOR_NAME": "provider-agent tests",
    "GIT_AUTHOR_EMAIL": "tests@provider-agent.invalid",
    "GIT_COMMITTER_NAME": "provider-agent tests",
    "GIT_COMMITTER_EMAIL": "tests@provider-agent.invalid",
}
_VERSION_LINE: Final = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "commit.gpgsign=false", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **_IDENTITY},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def origin(destination: Path, source: Path = REPO) -> Path:
    """A repository whose one commit on `main` is `source`'s working tree as it is now."""
    listed = subprocess.run(
        ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    destination.mkdir(parents=True)
    for relative in filter(None, listed.split("\0")):
        found = source / relative
        if not found.exists() and not found.is_symlink():
            continue  # deleted in the working tree
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(found, target, follow_symlinks=False)
    git(destination, "init", "--quiet", "--initial-branch=main")
    git(destination, "add", "--all")
    git(destination, "commit", "--quiet", "--message=the working tree under test")
    return destination


def checkout(repository: Path, destination: Path) -> Path:
    """A clone of `repository` at `destination`, its `main` tracking `origin/main`."""
    subprocess.run(
        ["git", "clone", "--quiet", str(repository), str(destination)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return destination


def commit(repository: Path, message: str, edits: Mapping[str, tuple[str, str]]) -> str:
    """A new commit on the repository's branch replacing, in each file named, the one text
    with the other (each must occur exactly once); returns its id."""
    for relative, (old, new) in edits.items():
        path = repository / relative
        text = path.read_text()
        assert text.count(old) == 1, f"{relative} no longer holds {old!r} exactly once"
        path.write_text(text.replace(old, new))
    git(repository, "commit", "--quiet", "--all", f"--message={message}")
    return head(repository)


def head(repository: Path) -> str:
    return git(repository, "rev-parse", "HEAD").strip()


def version(repository: Path) -> str:
    found = _VERSION_LINE.search((repository / "provider_agent/__init__.py").read_text())
    assert found is not None
    return found.group(1)


def bump_version(repository: Path, suffix: str) -> tuple[str, str]:
    """A commit that changes only `__version__` (a PEP 440 local version); (commit, version)."""
    now = version(repository)
    new = f"{now}.{suffix}" if "+" in now else f"{now}+{suffix}"
    line = f'__version__ = "{now}"'
    done = commit(
        repository,
        f"version {new}",
        {"provider_agent/__init__.py": (line, f'__version__ = "{new}"')},
    )
    return done, new
