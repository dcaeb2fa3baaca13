"""A Debian system with systemd as PID 1 (systemd-nspawn), for tests that need a real systemd.

`debian_root()` unpacks a cached mmdebstrap tarball (`tests/deploy/rootfs.py`) into a fresh
directory; `boot()` boots it with `systemd-nspawn --boot --register=no --keep-unit` as a child of
the test and yields a `SystemdContainer` once `systemctl is-system-running` answers; commands run
inside through `nsenter --target <PID 1> --all`. The container shares the host's network namespace
(no `--private-network`), so every address stays on loopback and a peer the test serves on
127.0.0.1 is 127.0.0.1 in there too.

This project goes in the way README says (a checkout in /opt/provider-agent, `bash
scripts/install`): `tests/git_source.origin()` makes a git repository of the working tree (what is
being tested, uncommitted edits included), which the container clones through a read-only bind
mount, and `wheelhouse()` holds the project's dependencies, downloaded on the host once and cached
by requirement list, so the install inside runs offline (`OFFLINE_PIP`).

The coordinator URL must be `wss://` (the unit runs `provider-agent run`, no `--allow-insecure`),
so `LoopbackCA` makes a throwaway CA and a certificate for 127.0.0.1, which `trust_ca()` adds to
the container's trust store, and `tls_front()` serves TLS on loopback in front of a plain server.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Final, TypeVar

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.deploy.rootfs import debian_rootfs_tar, locked, mmdebstrap_problem

REPO: Final = Path(__file__).resolve().parents[2]
#: What a booted systemd container needs, plus what README's install needs (python3-venv, git).
PACKAGES: Final = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-systemd",
    "python3",
    "python3-venv",
    "ca-certificates",
    "git",
    "procps",
)
#: Where unpacked roots go (beside the rootfs cache's disk, not a tmpfs).
WORK_DIR: Final = Path(os.environ.get("PROVIDER_AGENT_NSPAWN_DIR", "/var/tmp"))
WHEELHOUSE_CACHE: Final = Path(
    os.environ.get("PROVIDER_AGENT_WHEELHOUSE_CACHE", "/var/tmp/provider-agent-wheelhouse")
)
#: The environment every command inside starts from (nothing of the test's own leaks in).
GUEST_ENV: Final = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}
#: Where the source repository and the wheelhouse are bind-mounted (read-only) inside.
SOURCE_GUEST: Final = "/srv/provider-agent.git"
WHEELHOUSE_GUEST: Final = "/srv/wheelhouse"
#: README's checkout.
INSTALL_DIR: Final = "/opt/provider-agent"
#: `bash scripts/install` inside, offline: pip takes everything from the wheelhouse.
OFFLINE_PIP: Final = {
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": WHEELHOUSE_GUEST,
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
POLL_S: Final = 0.1

_T = TypeVar("_T")


def nspawn_problem() -> str | None:
    """Why a systemd container cannot be booted here (a test skips with it), or None."""
    if sys.platform != "linux":
        return "systemd-nspawn runs on Linux only"
    if os.geteuid() != 0:
        return "booting a systemd container needs root (systemd-nspawn)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if shutil.which("git") is None:
        return "git is not installed"
    return mmdebstrap_problem()


def poll(
    probe: Callable[[], _T | None],
    timeout_s: float,
    what: str,
    describe: Callable[[], str] = lambda: "",
) -> _T:
    """`probe()` until it returns something truthy (returned), or AssertionError naming `what`
    after `timeout_s` (with `describe()`, the state worth seeing, appended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = describe()
            raise AssertionError(
                f"not within {timeout_s:g}s: {what}" + (f"\n{detail}" if detail else "")
            )
        time.sleep(POLL_S)


# --- the root filesystem -------------------------------------------------------------------------


@contextmanager
def debian_root(packages: Sequence[str] = PACKAGES) -> Iterator[Path]:
    """A fresh root directory of Debian bookworm with `packages` (unpacked from the cached
    tarball, built by mmdebstrap the first time), removed afterwards."""
    tarball = debian_rootfs_tar(packages)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="provider-agent-nspawn-", dir=WORK_DIR))
    root = work / "root"
    try:
        root.mkdir()
        subprocess.run(
            ["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(root)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        yield root
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the container -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    """A host directory seen inside at `guest` (read-only unless said otherwise)."""

    host: Path
    guest: str
    read_only: bool = True

    @property
    def option(self) -> str:
        return f"--bind{'-ro' if self.read_only else ''}={self.host}:{self.guest}"


class CommandFailed(AssertionError):
    """A command inside the container exited non-zero where success was expected."""


class SystemdContainer:
    """A booted container: `run()` a command inside, ask its systemd (`systemctl`,
    `unit_property`, `main_pid`, `journal`), reach its files from the host (`host_path`)."""

    def __init__(self, root: Path, process: subprocess.Popen[bytes], console: Path) -> None:
        self.root = root
        self.process = process
        self.console = console
        self.leader = 0

    # --- commands --------------------------------------------------------------------------------

    def command(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "/"
    ) -> list[str]:
        """The host command line that runs `argv` inside (as root, in every namespace of the
        container, with `GUEST_ENV` and `env` as its whole environment). Values go on a command
        line: never put a secret in `env`; pass it as `input`."""
        variables = [f"{k}={v}" for k, v in {**GUEST_ENV, **(env or {})}.items()]
        return [
            "nsenter",
            f"--target={self.leader}",
            "--all",
            "env",
            "--ignore-environment",
            f"--chdir={cwd}",
            *variables,
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside and wait for it; CommandFailed (with its output) on a non-zero exit
        when `check`."""
        done = subprocess.run(
            self.command(argv, env=env, cwd=cwd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise CommandFailed(
                f"{' '.join(argv)} (in the container) exited {done.returncode}\n"
                f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
            )
        return done

    def popen(self, argv: Sequence[str], *, cwd: str = "/") -> subprocess.Popen[str]:
        """Start `argv` inside without waiting (stdout and stderr piped, text)."""
        return subprocess.Popen(
            self.command(argv, cwd=cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def write_file(self, path: str, text: str, *, mode: str = "0644", group: str = "root") -> None:
        """Write `text` (passed on stdin, never on a command line) to `path` inside; the file is
        created with `mode` and `group` before any byte goes in."""
        self.run(
            [
                "sh",
                "-c",
                'umask 077 && : > "$1" && chgrp "$3" "$1" && chmod "$2" "$1" && cat > "$1"',
                "sh",
                path,
                mode,
                group,
            ],
            input=text,
        )

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def host_path(self, guest: str) -> Path:
        """Where a path inside is on the host (for a file whose parents are plain directories:
        a symlink on the way would be resolved against the host's root)."""
        return self.root / guest.lstrip("/")

    # --- systemd -------------------------------------------------------------------------------

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def unit_properties(self, unit: str, *names: str) -> dict[str, str]:
        """`systemctl show -p NAME…` as a dict."""
        shown = self.systemctl("show", *(f"--property={n}" for n in names), unit).stdout
        pairs = (line.split("=", 1) for line in shown.splitlines() if "=" in line)
        return {key: value for key, value in pairs}

    def unit_property(self, unit: str, name: str) -> str:
        return self.unit_properties(unit, name).get(name, "")

    def main_pid(self, unit: str) -> int:
        """The unit's main process as the container sees it (0: none)."""
        return int(self.unit_property(unit, "MainPID") or 0)

    def journal(self, unit: str, *, since_realtime: float | None = None) -> str:
        """The journal of `unit` (its own lines and systemd's about it), oldest first."""
        since = [f"--since=@{since_realtime:.6f}"] if since_realtime is not None else []
        return self.run(
            ["journalctl", "--no-pager", "--quiet", "-o", "short-precise", "-u", unit, *since]
        ).stdout

    def wait_for_state(
        self, unit: str, timeout_s: float, **wanted: str | Callable[[str], bool]
    ) -> dict[str, str]:
        """Poll `systemctl show` until every named property has the wanted value (or satisfies
        the predicate); return them."""

        def matches() -> dict[str, str] | None:
            now = self.unit_properties(unit, *wanted)
            for name, want in wanted.items():
                value = now.get(name, "")
                if not (want(value) if callable(want) else value == want):
                    return None
            return now

        return poll(
            matches,
            timeout_s,
            f"{unit}: {wanted}",
            lambda: f"now: {self.unit_properties(unit, *wanted)}\n{self.journal(unit)[-4000:]}",
        )

    # --- lifecycle -------------------------------------------------------------------------------

    def console_tail(self, chars: int = 4000) -> str:
        try:
            return self.console.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _find_leader(self, timeout_s: float) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")

        def leader() -> int | None:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn exited {self.process.returncode} while booting:\n"
                    + self.console_tail()
                )
            with suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            return None

        return poll(leader, timeout_s, "systemd-nspawn started systemd", self.console_tail)

    def _wait_booted(self, deadline: float) -> str:
        def state() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the container stopped while booting:\n{self.console_tail()}")
            left = max(1.0, deadline - time.monotonic())
            try:
                answer = self.run(
                    ["systemctl", "is-system-running", "--wait"], check=False, timeout=left
                ).stdout.strip()
            except subprocess.TimeoutExpired:
                return None
            return answer if answer in ("running", "degraded") else None

        return poll(state, deadline - time.monotonic(), "systemd booted", self.console_tail)

    def poweroff(self, timeout_s: float = 90) -> None:
        """`systemctl poweroff` inside and wait for the container to end; killed past
        `timeout_s`."""
        if self.process.poll() is None and self.leader:
            with suppress(subprocess.TimeoutExpired):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=30)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            if self.leader:
                with suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
            self.process.wait(30)


def _cgroup_mounts() -> dict[str, Path]:
    """The mount points of the hierarchies systemd uses: the unified one ("") and, on a hybrid
    host, the named v1 one ("name=systemd")."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _source, options = [*tail.split(" "), "", ""][:3]
        mount_point = Path(fields.split(" ")[4])
        if fstype == "cgroup2":
            mounts.setdefault("", mount_point)
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            mounts.setdefault("name=systemd", mount_point)
    return mounts


def _own_cgroups(name: str) -> list[Path]:
    """A new cgroup `name` below this process's own in each hierarchy systemd uses, created.
    systemd-nspawn --keep-unit puts itself and the container in `supervisor` and `payload`
    below the cgroup it starts in: started in our own, two containers (of this test and of
    another one) never share those."""
    mounts = _cgroup_mounts()
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mount = mounts.get(controllers)
        if mount is None:
            continue
        directory = mount / path.lstrip("/") / name
        directory.mkdir()
        made.append(directory)
    return made


def _remove_cgroups(directories: Sequence[Path], timeout_s: float = 15) -> None:
    """Remove the cgroups (children first) once the kernel has let go of their processes."""

    def removed() -> bool:
        for top in directories:
            if not top.exists():
                continue
            for below, _dirs, _files in os.walk(top, topdown=False):
                with suppress(OSError):
                    os.rmdir(below)
        return not any(top.exists() for top in directories)

    with suppress(AssertionError):
        poll(removed, timeout_s, "the container's cgroups removed")


@contextmanager
def boot(
    root: Path, *, binds: Sequence[Bind] = (), timeout_s: float = 120
) -> Iterator[SystemdContainer]:
    """Boot `root` with systemd-nspawn (systemd as PID 1, the host's network) and yield it once
    systemd says the system is running (or degraded); powered off afterwards."""
    name = f"pa-{secrets.token_hex(4)}"
    cgroups = _own_cgroups(name)
    console = root.parent / f"{name}.console.log"
    nspawn = [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--console=read-only",
        f"--machine={name}",
        f"--directory={root}",
        *(bind.option for bind in binds),
    ]
    # The shell moves itself into the new cgroups, then becomes systemd-nspawn.
    enter = 'for d; do [ "$d" = -- ] && break; echo $$ > "$d/cgroup.procs"; shift; done; shift'
    wrapper = ["sh", "-c", f'{enter}; exec "$@"', "sh", *map(str, cgroups), "--", *nspawn]
    deadline = time.monotonic() + timeout_s
    try:
        with console.open("wb") as log:
            process = subprocess.Popen(
                wrapper,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        container = SystemdContainer(root, process, console)
        try:
            container.leader = container._find_leader(timeout_s)
            container._wait_booted(deadline)
            yield container
        finally:
            container.poweroff()
    finally:
        _remove_cgroups(cgroups)


# --- this project, installed as README says ------------------------------------------------------


def _requirements() -> list[str]:
    """What `pip install -e .` inside needs: the build backend, the dependencies, and pip itself
    (scripts/install upgrades it first)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(
        {*project["build-system"]["requires"], *project["project"]["dependencies"], "pip", "wheel"}
    )


def wheelhouse() -> Path:
    """A directory of wheels of `_requirements()` for this Python (the container's python3 is
    Debian's 3.11, as is the test's), downloaded with the host's pip once per requirement list."""
    requirements = _requirements()
    key = json.dumps(
        [requirements, list(sys.version_info[:2]), platform.machine(), sys.platform],
        sort_keys=True,
    )
    directory = WHEELHOUSE_CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    if directory.is_dir():
        return directory
    with locked(WHEELHOUSE_CACHE / f".{directory.name}.lock"):
        if directory.is_dir():
            return directory
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=WHEELHOUSE_CACHE))
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--only-binary=:all:",
                    f"--dest={partial}",
                    *requirements,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"pip download failed: {(done.stdout + done.stderr)[-2000:]}")
            partial.chmod(0o755)
            partial.replace(directory)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return directory


def install_checkout(container: SystemdContainer) -> None:
    """README: the checkout at /opt/provider-agent (a clone of the bind-mounted source
    repository), then `bash scripts/install` there (offline, from the wheelhouse)."""
    container.run(["git", "clone", "--quiet", SOURCE_GUEST, INSTALL_DIR])
    container.run(["bash", "scripts/install"], cwd=INSTALL_DIR, env=OFFLINE_PIP, timeout=600)


# --- TLS on loopback -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopbackCA:
    """A throwaway certificate authority and a certificate it signed for 127.0.0.1 and
    localhost (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def create(cls) -> LoopbackCA:
        now = datetime.datetime.now(datetime.UTC)
        valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provider-agent test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cls(
            ca_pem=ca.public_bytes(serialization.Encoding.PEM),
            cert_pem=leaf.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as scratch:
            cert, key = Path(scratch, "cert.pem"), Path(scratch, "key.pem")
            cert.write_bytes(self.cert_pem)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(cert, key)
        return context


def trust_ca(container: SystemdContainer, ca: LoopbackCA) -> None:
    """Add the CA to the container's system trust store (what the agent's TLS verifies with)."""
    container.write_file(
        "/usr/local/share/ca-certificates/provider-agent-test.crt", ca.ca_pem.decode()
    )
    container.run(["update-ca-certificates"])


async def _pump(source: ByteStream, sink: ByteStream, done: anyio.CancelScope) -> None:
    with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        async for chunk in source:
            await sink.send(chunk)
    done.cancel()


@asynccontextmanager
async def tls_front(target_port: int, context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS endpoint on 127.0.0.1 relaying every connection, in the clear, to
    127.0.0.1:`target_port`; yields its port. Either side ending ends both."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = int(listener.extra(SocketAttribute.local_port))

    async def relay(client: ByteStream) -> None:
        # A connection that breaks (a client killed mid-handshake, say) ends only itself.
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async with (
                client,
                await anyio.connect_tcp("127.0.0.1", target_port) as upstream,
                anyio.create_task_group() as both,
            ):
                both.start_soon(_pump, client, upstream, both.cancel_scope)
                both.start_soon(_pump, upstream, client, both.cancel_scope)

    async with anyio.create_task_group() as serving:
        serving.start_soon(TLSListener(listener, context).serve, relay)
        try:
            yield port
        finally:
            serving.cancel_scope.cancel()
