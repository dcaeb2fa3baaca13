"""Debian root filesystems for deployment tests, made with mmdebstrap and cached by recipe.

`debian_rootfs_tar(packages)` gives a tarball of a minimal Debian (bookworm unless told) with
those packages, built once and kept under /var/tmp, named by a hash of its recipe; a test session
that finds it there reuses it. `podman_base_image(packages)` imports that tarball into podman's
store as `localhost/provider-agent-base:<suite>-<hash>` (again only when missing), so a
`podman build --build-arg BASE=…` needs no image registry. `podman_problem()` and
`mmdebstrap_problem()` say why this machine cannot do that (a test skips with the reason), and
`podman_problem()` writes the one podman setting file this kind of machine needs when it is
missing (`CONTAINERS_CONF`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Where the tarballs are kept between test sessions (`$PROVIDER_AGENT_ROOTFS_CACHE` overrides).
CACHE_DIR = Path(os.environ.get("PROVIDER_AGENT_ROOTFS_CACHE", "/var/tmp/provider-agent-rootfs"))
#: Bumped when what a recipe makes changes without its fields changing (the hash then changes).
RECIPE_VERSION = 1
#: The repository of the imported base images.
BASE_REPOSITORY = "localhost/provider-agent-base"
#: The PATH an imported image gets (an imported tarball has no config; Debian's images set it).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: podman's engine settings for a root session on a host whose kernel has hybrid cgroups: runc (crun
#: refuses them), cgroupfs (no systemd to ask), and open-file/process limits no higher than root may
#: set here (a `--ulimit` flag replaces these defaults).
CONTAINERS_CONF_PATH = Path("/etc/containers/containers.conf")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""

#: How long a build may take (mmdebstrap downloads ~40 MB of packages).
BUILD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Recipe:
    """What a root filesystem is made of; `digest` names it in the cache."""

    packages: tuple[str, ...]
    suite: str = "bookworm"
    variant: str = "minbase"

    @classmethod
    def of(cls, packages: Sequence[str], suite: str, variant: str) -> Recipe:
        return cls(tuple(sorted(set(packages))), suite, variant)

    @property
    def digest(self) -> str:
        text = json.dumps(
            {
                "version": RECIPE_VERSION,
                "suite": self.suite,
                "variant": self.variant,
                "packages": self.packages,
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def mmdebstrap_problem() -> str | None:
    """Why `debian_rootfs_tar` cannot run here, or None."""
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (apt-get install mmdebstrap)"
    if os.geteuid() != 0:
        return "mmdebstrap needs root here (a rootless one needs subuid ranges)"
    return None


def podman_problem() -> str | None:
    """Why podman cannot run containers here, or None. As root, writes `CONTAINERS_CONF` to
    /etc/containers/containers.conf when that file is missing (machine setup, done once)."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    if os.geteuid() != 0:
        return "these tests run rootful podman (as root)"
    if not CONTAINERS_CONF_PATH.exists():
        CONTAINERS_CONF_PATH.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF_PATH.write_text(CONTAINERS_CONF)
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if info.returncode != 0:
        return f"podman info failed: {info.stderr.strip()[-400:]}"
    return None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (another session building the same recipe waits, then finds
    it built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {tail}")


def debian_rootfs_tar(
    packages: Sequence[str], *, suite: str = "bookworm", variant: str = "minbase"
) -> Path:
    """A tarball of a Debian `suite` root filesystem (`variant` as mmdebstrap names them) with
    `packages` installed; made once per recipe and kept in `CACHE_DIR`."""
    recipe = Recipe.of(packages, suite, variant)
    tarball = CACHE_DIR / f"{suite}-{variant}-{recipe.digest}.tar"
    if tarball.exists():
        return tarball
    with locked(CACHE_DIR / f".{recipe.digest}.lock"):
        if tarball.exists():
            return tarball
        partial = tarball.with_suffix(".tar.partial")
        command = [
            "mmdebstrap",
            "--quiet",
            "--format=tar",
            f"--variant={variant}",
            *([f"--include={','.join(recipe.packages)}"] if recipe.packages else []),
            suite,
            str(partial),
        ]
        try:
            _run(command, "mmdebstrap")
            partial.replace(tarball)
        finally:
            partial.unlink(missing_ok=True)
    return tarball


def podman_image_exists(name: str) -> bool:
    found = subprocess.run(["podman", "image", "exists", name], timeout=60, check=False)
    return found.returncode == 0


def podman_base_image(
    packages: Sequence[str], *, suite: str = "bookworm", variant: str = "minbase"
) -> str:
    """The name of a podman image of `debian_rootfs_tar(packages, …)`, imported into podman's
    store once per recipe (with PATH and LANG set as Debian's own images set them)."""
    recipe = Recipe.of(packages, suite, variant)
    name = f"{BASE_REPOSITORY}:{suite}-{variant}-{recipe.digest}"
    if podman_image_exists(name):
        return name
    tarball = debian_rootfs_tar(packages, suite=suite, variant=variant)
    with locked(CACHE_DIR / f".{recipe.digest}.import.lock"):
        if not podman_image_exists(name):
            command = ["podman", "import", "--quiet"]
            command += ["--change", f"ENV PATH={IMAGE_PATH}", "--change", "ENV LANG=C.UTF-8"]
            _run([*command, str(tarball), name], "podman import")
    return name
