"""Making a release: the commit from git, a venv beside the running one, a non-editable install.

The thin edges `upgrade` and `service install` need: git (fetch, resolve a ref, the log between
two commits, a file at a commit, `git archive`), `python -m venv`, `pip install`, and asking the
built release what it is. Nothing here touches `current` or the service: a build has no effect
on the running agent.

pip runs with this process's environment and configuration (PIP_* variables, pip.conf), so an
offline wheelhouse or a local index works as it does for `scripts/install`. What the new
release's own processes see is that environment without Python's own variables (`PYTHONPATH`
and friends would make them import someone else's code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from provider_agent.errors import UpgradeError
from provider_agent.ops.upgrade.releases import Layout, Release, read_release, short, write_release
from provider_agent.safe_text import printable

GIT_TIMEOUT_S: Final = 300.0
PIP_TIMEOUT_S: Final = 1800.0
#: What a built release is asked about itself (its version and outbox schema); an older release
#: without the schema marker is taken to read only its own schema.
FACTS_SCRIPT: Final = (
    "import json, provider_agent\n"
    "from provider_agent.store import engine\n"
    "print(json.dumps({'version': provider_agent.__version__,"
    " 'schema_version': engine.SCHEMA_VERSION,"
    " 'readable_from': getattr(engine, 'READABLE_FROM', engine.SCHEMA_VERSION)}))\n"
)
_VERSION: Final = re.compile(r'^__version__\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)
#: Left behind in the source tree by an in-tree build; not part of the release.
_BUILD_LEFTOVERS: Final = ("build", "provider_agent.egg-info")


def base_python() -> Path:
    """The interpreter new venvs are made from: the one this venv was made from."""
    return Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def release_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a release's processes run with: ours, less Python's own variables and
    an active venv's, so that they import only the release's code."""
    return {
        key: value
        for key, value in environ.items()
        if not key.startswith("PYTHON") and key not in ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
    }


def last_line(text: str, limit: int = 300) -> str:
    """The line of a program's output that says why it failed, escaped, for a one-line error:
    its last `ERROR:` line (pip writes warnings after it) unless that only introduces a
    traceback, else its last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if line.startswith(("ERROR:", "error:", "fatal:")) and not line.endswith(":")
    ]
    chosen = errors or lines
    return printable(chosen[-1], limit) if chosen else "no output"


# --- git -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Git:
    """git in the installation's checkout."""

    repo: Path
    env: Mapping[str, str]

    def run(self, *args: str, timeout: float = GIT_TIMEOUT_S) -> str:
        """Run git; UpgradeError with its last line when it fails."""
        argv = ["git", "-C", str(self.repo), *args]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env={**self.env, "GIT_TERMINAL_PROMPT": "0"},
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise UpgradeError("git is not installed") from None
        except subprocess.TimeoutExpired:
            raise UpgradeError(f"git {args[0]} did not finish within {timeout:g}s") from None
        if done.returncode != 0:
            raise UpgradeError(f"git {args[0]} failed: {last_line(done.stderr + done.stdout)}")
        return done.stdout

    def ok(self, *args: str) -> bool:
        try:
            self.run(*args)
        except UpgradeError:
            return False
        return True

    def upstream(self) -> tuple[str, str] | None:
        """(remote, upstream ref such as `origin/main`) of the checked-out branch; None when
        detached or not tracking a remote branch."""
        if not self.ok("symbolic-ref", "--quiet", "HEAD"):
            return None
        branch = self.run("symbolic-ref", "--quiet", "--short", "HEAD").strip()
        found = self.run(
            "for-each-ref",
            "--format=%(upstream:remotename)%09%(upstream:short)",
            f"refs/heads/{branch}",
        ).strip()
        remote, _, ref = found.partition("\t")
        return (remote, ref) if remote and ref else None

    def default_remote(self) -> str | None:
        remotes = self.run("remote").split()
        if not remotes:
            return None
        return "origin" if "origin" in remotes else remotes[0]

    def fetch(self, remote: str) -> None:
        self.run("fetch", "--quiet", "--tags", "--", remote)

    def resolve(self, ref: str, remote: str | None) -> str:
        """The commit `ref` names. A branch of `remote` wins over a local branch of that name
        (which `fetch` does not move)."""
        candidates = [f"refs/remotes/{remote}/{ref}"] if remote else []
        candidates.append(ref)
        for candidate in candidates:
            try:
                out = self.run("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}")
            except UpgradeError:
                continue
            return out.strip()
        where = f" (after fetching {remote})" if remote else ""
        raise UpgradeError(f"--to {printable(ref, 100)}: no such commit, branch or tag{where}")

    def log(self, since: str, until: str) -> list[tuple[str, str]]:
        """(commit, subject) of the commits in `until` and not in `since`, newest first."""
        out = self.run("log", "--no-decorate", "--format=%H%x09%s", f"{since}..{until}", "--")
        pairs = (line.partition("\t") for line in out.splitlines())
        return [(commit, subject) for commit, tab, subject in pairs if tab]

    def has(self, commit: str) -> bool:
        return self.ok("cat-file", "-e", f"{commit}^{{commit}}")

    def subject(self, commit: str) -> str:
        return self.run("log", "-1", "--format=%s", commit, "--").strip()

    def version_at(self, commit: str) -> str | None:
        """`__version__` as the commit's provider_agent/__init__.py sets it."""
        try:
            text = self.run("show", f"{commit}:provider_agent/__init__.py")
        except UpgradeError:
            return None
        found = _VERSION.search(text)
        return found.group(1) if found else None

    def head(self) -> str:
        return self.run("rev-parse", "--verify", "HEAD^{commit}").strip()

    def archive(self, commit: str, destination: Path) -> None:
        """The commit's files into `destination` (an existing, empty directory)."""
        with tempfile.TemporaryFile() as tar:
            try:
                done = subprocess.run(
                    ["git", "-C", str(self.repo), "archive", "--format=tar", commit],
                    stdout=tar,
                    stderr=subprocess.PIPE,
                    env=dict(self.env),
                    timeout=GIT_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise UpgradeError(
                    f"git archive did not finish within {GIT_TIMEOUT_S:g}s"
                ) from None
            if done.returncode != 0:
                raise UpgradeError(f"git archive failed: {last_line(done.stderr.decode())}")
            tar.seek(0)
            with tarfile.open(fileobj=tar, mode="r:") as archive:
                if hasattr(tarfile, "data_filter"):
                    archive.extractall(destination, filter="data")
                else:  # Python before 3.11.4 (Debian 12's 3.11.2): the same refusals, by hand
                    members = archive.getmembers()
                    for member in members:
                        check_member(member)
                    archive.extractall(destination, members=members)


def check_member(member: tarfile.TarInfo) -> None:
    """What the "data" extraction filter refuses: anything but plain files, directories and
    links, and any path or link target that is absolute or climbs out with `..`."""
    paths = [member.name] + ([member.linkname] if member.issym() or member.islnk() else [])
    unsafe = any(p.startswith("/") or ".." in PurePosixPath(p).parts for p in paths)
    if unsafe or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise UpgradeError(f"git archive: refusing {printable(member.name, 200)!r} in the archive")


# --- building ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    release: Release
    #: False when a complete release of the commit was already there.
    fresh: bool
    seconds: float


def build(
    layout: Layout,
    git: Git,
    commit: str,
    *,
    python: Path,
    env: Mapping[str, str],
    now_ms: int,
) -> Built:
    """releases/<commit>/: the commit's files, a venv, a non-editable install of them, and the
    record written last. A complete release of the commit is reused; an incomplete one (a build
    that was cut short) is built again. UpgradeError, with the build removed, when it fails."""
    started = time.monotonic()
    existing = read_release(layout, commit)
    if existing is not None:
        return Built(existing, fresh=False, seconds=time.monotonic() - started)
    directory = layout.directory(commit)
    if directory.exists():
        shutil.rmtree(directory)
    # The service's user reads the release: whatever our umask, it must be open to others.
    old_umask = os.umask(0o022)
    try:
        directory.mkdir(parents=True, mode=0o755)
        layout.releases.chmod(0o755)
        try:
            git.archive(commit, directory)
            _make_venv(python, directory, env)
            _pip_install(layout.python(commit), directory, env)
            for leftover in _BUILD_LEFTOVERS:
                shutil.rmtree(directory / leftover, ignore_errors=True)
            facts = release_facts(layout.python(commit), env)
            release = Release(
                commit=commit,
                version=facts.version,
                schema_version=facts.schema_version,
                readable_from=facts.readable_from,
                installed_ms=now_ms,
                subject=printable(git.subject(commit), 200),
            )
            write_release(layout, release)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        os.umask(old_umask)
    return Built(release, fresh=True, seconds=time.monotonic() - started)


def _make_venv(python: Path, directory: Path, env: Mapping[str, str]) -> None:
    _run_step(
        [str(python), "-m", "venv", str(directory / ".venv")],
        "python -m venv",
        release_env(env),
        timeout=300,
    )


def _pip_install(python: Path, source: Path, env: Mapping[str, str]) -> None:
    _run_step(
        [str(python), "-m", "pip", "install", "--no-input", "--quiet", str(source)],
        "pip install",
        release_env(env),
        timeout=PIP_TIMEOUT_S,
        cwd=source,
    )


@dataclass(frozen=True)
class Facts:
    version: str
    schema_version: int
    readable_from: int


def release_facts(python: Path, env: Mapping[str, str]) -> Facts:
    """What a built release says it is: its version and outbox schema."""
    out = _run_step([str(python), "-I", "-c", FACTS_SCRIPT], "the new release", release_env(env))
    try:
        said = json.loads(out)
        facts = Facts(said["version"], said["schema_version"], said["readable_from"])
    except (ValueError, KeyError, TypeError):
        raise UpgradeError(f"the new release did not say what it is: {last_line(out)}") from None
    if not (
        isinstance(facts.version, str)
        and isinstance(facts.schema_version, int)
        and isinstance(facts.readable_from, int)
    ):
        raise UpgradeError(f"the new release did not say what it is: {last_line(out)}")
    return facts


def _run_step(
    argv: Sequence[str],
    what: str,
    env: Mapping[str, str],
    *,
    timeout: float = 120,
    cwd: Path | None = None,
) -> str:
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=dict(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise UpgradeError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise UpgradeError(f"{what} did not finish within {timeout:g}s") from None
    if done.returncode != 0:
        raise UpgradeError(
            f"{what} failed (exit {done.returncode}): {last_line(done.stderr + done.stdout)}"
        )
    return done.stdout


def describe(release: Release) -> str:
    """`0.1.1 (1a2b3c4d5e6f)`."""
    return f"{printable(release.version, 60)} ({short(release.commit)})"
