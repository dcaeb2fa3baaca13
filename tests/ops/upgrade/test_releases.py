"""Releases side by side: the pure decisions (rollback target, pruning, the list) as tables, and
the directory for real — a release built from a real git repository into its own venv, the
`current` switch under concurrent readers, the running release read from a real process."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from provider_agent.errors import UpgradeError
from provider_agent.ops.upgrade.build import (
    Built,
    Git,
    base_python,
    build,
    check_member,
    last_line,
)
from provider_agent.ops.upgrade.releases import (
    Layout,
    Release,
    current_commit,
    layout_of,
    previous,
    read_release,
    read_releases,
    remove,
    render_list,
    running_release,
    switch,
    to_prune,
    write_release,
)
from tests import git_source
from tests.agent_harness import free_port

A, B, C, D, E = (f"{n}" * 40 for n in "abcde")


def rel(commit: str, at: int, *, failed: str | None = None, version: str = "0.1.0") -> Release:
    return Release(
        commit=commit,
        version=version,
        schema_version=2,
        readable_from=2,
        installed_ms=at,
        subject=f"subject of {commit[:4]}",
        failed=failed,
    )


# --- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root"),
    [
        ("/opt/pa/current/.venv/bin/provider-agent", "/opt/pa"),
        (f"/opt/pa/releases/{A}/.venv/bin/provider-agent", "/opt/pa"),
        ("/opt/pa/.venv/bin/provider-agent", None),  # a checkout's own venv
        ("/opt/pa/releases/main/.venv/bin/provider-agent", None),  # not a commit
        ("/opt/pa/current/.venv/bin/python", None),
        ("/current/.venv/bin/provider-agent", "/"),
    ],
)
def test_which_installation_an_executable_belongs_to(path: str, root: str | None) -> None:
    found = layout_of(Path(path))
    assert (found.root if found else None) == (Path(root) if root else None)


RELEASES = [rel(A, 1), rel(B, 2), rel(C, 3, failed="exited at start"), rel(D, 4)]


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (D, B),  # C failed: skipped
        (B, A),
        (A, None),  # nothing older
        (C, B),
        (E, None),  # not a release
        (None, None),
    ],
)
def test_rollback_goes_to_the_newest_older_release_that_ran(
    current: str | None, expected: str | None
) -> None:
    found = previous(RELEASES, current)
    assert (found.commit if found else None) == expected


@pytest.mark.parametrize(
    ("keep", "protected", "pruned"),
    [
        (3, [D], [A]),
        (2, [D], [A, B]),
        (1, [D], [A, B, C]),
        (2, [B, D], [A, C]),  # the running release after a switch is kept whatever its age
        (2, [A], [B, C]),  # current rolled back to the oldest: it stays, the newest one too
        (10, [D], []),
        (1, [A, B], [C, D]),  # protected ones are kept even beyond `keep`
    ],
)
def test_pruning_keeps_the_newest_and_never_the_protected(
    keep: int, protected: list[str], pruned: list[str]
) -> None:
    assert to_prune(RELEASES, keep, [*protected, None]) == pruned


def test_pruning_keeps_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least one"):
        to_prune(RELEASES, 0, [])


def test_the_list_marks_the_running_and_the_current_release() -> None:
    lines = render_list(RELEASES, current=D, running=B)
    assert lines[0].split() == ["COMMIT", "VERSION", "SCHEMA", "SUBJECT"]
    rows = lines[1:-1]
    assert [row.split()[0] for row in rows] == [D[:12], C[:12], "*", A[:12]]
    assert rows[0].endswith("current") and "*" not in rows[0]
    assert rows[1].endswith("rolled back: exited at start")
    assert rows[2].startswith("*") and B[:12] in rows[2]
    assert lines[-1] == "* the running release"
    assert render_list(RELEASES, current=D, running=None)[-1].startswith("* none")
    assert render_list([], None, None) == [
        "no releases installed (`service install` builds the first)"
    ]


def test_foreign_text_in_a_record_is_escaped_in_the_list() -> None:
    hostile = rel(A, 1, version="1.0\x1b[31m").model_copy(update={"subject": "a\nb"})
    text = "\n".join(render_list([hostile], A, A))
    assert "\x1b" not in text and "a\nb" not in text


# --- the directory -------------------------------------------------------------------------------


def records(root: Path, *releases: Release) -> Layout:
    """Releases that are only their record (what `switch` and `--list` read)."""
    layout = Layout(root)
    for release in releases:
        layout.directory(release.commit).mkdir(parents=True)
        write_release(layout, release)
    return layout


def test_switch_points_current_at_a_release_and_readers_never_see_none(tmp_path: Path) -> None:
    layout = records(tmp_path, rel(A, 1), rel(B, 2))
    assert current_commit(layout) is None
    switch(layout, A)
    assert os.readlink(layout.current) == f"releases/{A}"
    seen: set[str] = set()
    missing: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(layout.current))
            except OSError as exc:
                missing.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(300):
            switch(layout, B if n % 2 == 0 else A)
    finally:
        stop.set()
        reader.join()
    assert missing == []
    assert seen <= {f"releases/{A}", f"releases/{B}"}
    assert current_commit(layout) == A
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]  # no temp link


def test_switch_refuses_an_incomplete_release(tmp_path: Path) -> None:
    layout = records(tmp_path, rel(A, 1))
    layout.directory(B).mkdir()  # a build cut short: no record
    switch(layout, A)
    with pytest.raises(UpgradeError, match=f"no complete release {B[:12]}"):
        switch(layout, B)
    assert current_commit(layout) == A
    assert [r.commit for r in read_releases(layout)] == [A]


def test_current_pointing_elsewhere_is_one_line(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.current.symlink_to("/usr")
    with pytest.raises(UpgradeError, match="not at a release"):
        current_commit(layout)


def test_a_record_of_another_commit_is_refused(tmp_path: Path) -> None:
    layout = records(tmp_path, rel(A, 1))
    (layout.directory(A) / "release.json").rename(tmp_path / "moved.json")
    layout.directory(B).mkdir()
    (tmp_path / "moved.json").rename(layout.meta(B))
    with pytest.raises(UpgradeError, match="describes another commit"):
        read_release(layout, B)


def test_remove_never_deletes_the_current_or_a_protected_release(tmp_path: Path) -> None:
    layout = records(tmp_path, rel(A, 1), rel(B, 2), rel(C, 3))
    switch(layout, B)
    with pytest.raises(UpgradeError, match="in use"):
        remove(layout, B)
    with pytest.raises(UpgradeError, match="in use"):
        remove(layout, C, protected=[C])
    remove(layout, A)
    assert [r.commit for r in read_releases(layout)] == [B, C]


# --- a real build --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Built, Path]:
    """A checkout of this tree and the release built from its HEAD (once per module: ~20 s)."""
    base = tmp_path_factory.mktemp("releases")
    repository = git_source.origin(base / "origin")
    checkout = git_source.checkout(repository, base / "install")
    layout = Layout(checkout)
    built = build(
        layout,
        Git(checkout, os.environ),
        git_source.head(checkout),
        python=base_python(),
        env=os.environ,
        now_ms=1_000,
    )
    return layout, built, repository


def test_a_release_is_the_commit_installed_into_its_own_venv(
    installation: tuple[Layout, Built, Path],
) -> None:
    layout, built, repository = installation
    commit = git_source.head(repository)
    assert built.fresh
    assert built.release == read_release(layout, commit)
    assert built.release.version == git_source.version(repository)
    assert built.release.subject == "the working tree under test"
    assert built.release.installed_ms == 1_000
    directory = layout.directory(commit)
    # The commit's files (the shipped unit among them), not the build's leftovers.
    assert (directory / "systemd/provider-agent.service").is_file()
    assert not (directory / "build").exists()
    assert not (directory / "provider_agent.egg-info").exists()
    # Non-editable: the package is a copy in the venv's site-packages.
    found = subprocess.run(
        [
            str(layout.python(commit)),
            "-I",
            "-c",
            "import provider_agent; print(provider_agent.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    assert Path(found).is_relative_to(directory / ".venv/lib")
    # The script starts this release's python by the path it was built at.
    first = layout.executable(commit).read_text().splitlines()[0]
    assert first == f"#!{layout.python(commit)}"
    done = subprocess.run(
        [str(layout.executable(commit)), "--version"], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == f"provider-agent {built.release.version}"
    # Open to the service's (dynamic) user, whatever the builder's umask.
    for path in (layout.releases, directory, directory / ".venv", Path(found)):
        assert stat.S_IMODE(path.stat().st_mode) & 0o005 == 0o005 or path.is_file()
    assert stat.S_IMODE(Path(found).stat().st_mode) & 0o004


def test_a_complete_release_is_reused(installation: tuple[Layout, Built, Path]) -> None:
    layout, built, _ = installation
    again = build(
        layout,
        Git(layout.root, os.environ),
        built.release.commit,
        python=base_python(),
        env=os.environ,
        now_ms=2_000,
    )
    assert not again.fresh and again.release == built.release


def test_the_running_release_is_read_from_the_process(
    installation: tuple[Layout, Built, Path],
) -> None:
    layout, built, _ = installation
    switch(layout, built.release.commit)
    port = free_port()
    process = subprocess.Popen(
        [str(layout.stable_executable), "dev-coordinator", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        listening(port)  # its command line is complete once it serves
        assert running_release(layout, process.pid) == built.release.commit
        assert running_release(Layout(layout.root / "elsewhere"), process.pid) is None
    finally:
        process.terminate()
        process.wait(30)
    assert running_release(layout, process.pid) is None
    assert running_release(layout, 0) is None


def listening(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)  # a poll of a real condition, not a guess at a duration


def test_a_failed_build_is_one_line_and_leaves_nothing(
    installation: tuple[Layout, Built, Path],
) -> None:
    layout, _, repository = installation
    broken = git_source.commit(
        repository,
        "a release for a Python that does not exist",
        {"pyproject.toml": ('requires-python = ">=3.11"', 'requires-python = ">=99"')},
    )
    git_source.git(layout.root, "fetch", "--quiet", "origin")
    with pytest.raises(UpgradeError) as caught:
        build(
            layout,
            Git(layout.root, os.environ),
            broken,
            python=base_python(),
            env=os.environ,
            now_ms=3_000,
        )
    message = str(caught.value)
    assert message.startswith("pip install failed (exit 1): ERROR: Package 'provider-agent'")
    assert "requires a different Python" in message and "\n" not in message
    assert not layout.directory(broken).exists()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("info", "refused"),
    [
        (member("provider_agent/cli.py"), False),
        (member("systemd", tarfile.DIRTYPE), False),
        (member("docs/link.md", tarfile.SYMTYPE, "../README.md"), True),
        (member("docs/link.md", tarfile.SYMTYPE, "cli.md"), False),
        (member("../outside"), True),
        (member("/etc/passwd"), True),
        (member("a/../../b"), True),
        (member("etc", tarfile.SYMTYPE, "/etc"), True),
        (member("fifo", tarfile.FIFOTYPE), True),
        (member("dev", tarfile.CHRTYPE), True),
    ],
)
def test_what_an_archive_may_hold_where_python_has_no_extraction_filter(
    info: tarfile.TarInfo, refused: bool
) -> None:
    """Python before 3.11.4 (Debian 12 ships 3.11.2) has no `filter="data"`: the same rules."""
    if refused:
        with pytest.raises(UpgradeError, match="refusing"):
            check_member(info)
    else:
        check_member(info)


@pytest.mark.parametrize(
    ("output", "line"),
    [
        ("WARNING: a\nERROR: the reason\nWARNING: later\n", "ERROR: the reason"),
        ("one\ntwo\n\n", "two"),
        ("", "no output"),
        ("fatal: bad ref\x1b[2J\n", "fatal: bad ref\\x1b[2J"),
        ("ERROR: Exception:\nTraceback\n  ...\nValueError: why\n", "ValueError: why"),
    ],
)
def test_the_line_that_says_why(output: str, line: str) -> None:
    assert last_line(output) == line
