"""The container image (Dockerfile), built and run with podman against loopback peers.

The image is built from a fresh copy of the working tree (what `git clone` of it would hold:
tracked files and untracked ones git does not ignore, uncommitted edits included) on a Debian
base made locally with mmdebstrap (no image registry is reachable here), cached by recipe. Its
container runs with host networking, so the reference coordinator and a vLLM look-alike in this
test process are on its loopback. Skips, saying why, where podman, mmdebstrap or root are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
import pytest

from provider_agent.dev.coordinator import AgentRecord, DevCoordinator
from tests.agent_harness import FakeVllm, fake_vllm, free_port
from tests.deploy.rootfs import mmdebstrap_problem, podman_base_image, podman_problem

ROOT = Path(__file__).resolve().parents[2]
#: What python:3.12-slim brings that the Dockerfile uses: python3 with venv, CA certificates,
#: useradd/groupadd.
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates", "passwd"]
#: This session's image (a name of its own: sessions may run side by side).
IMAGE = f"localhost/provider-agent:test-{uuid.uuid4().hex[:8]}"
AGENT_UID = 10001
CONFIG_IN_CONTAINER = "/etc/provider-agent/agent.toml"
STATE_IN_CONTAINER = "/var/lib/provider-agent"
#: Planted in the build context beside the Dockerfile (an operator's config, a key, a .git, a
#: venv); none of it may reach the image.
CANARY = f"canary-{uuid.uuid4().hex}"
PLANTED = ("agent.toml", "identity.key", ".git/config", ".venv/pyvenv.cfg", "tests/secret.txt")
ENROLLMENT_CODE = f"POD-ENROLL-{uuid.uuid4().hex[:12]}"
#: Seconds a container may take to start, authenticate and advertise (imports on 2 busy cores).
START_S = 60

_T = TypeVar("_T")


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _fresh_tree(destination: Path) -> Path:
    """The files a clone of the working tree would hold, copied to `destination`."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


#: The system CA bundle: in python:3.12-slim and in the Debian base, and what pip trusts there.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image, built from a fresh tree with canaries planted beside the Dockerfile, without
    layer caching (each change of the code would otherwise leave ~200 MB of stale layers in
    podman's store); removed afterwards, so only the base image stays cached."""
    problem = podman_problem() or mmdebstrap_problem()
    if shutil.which("git") is None:
        problem = "git is not installed"
    if problem:
        pytest.skip(problem)
    base = podman_base_image(BASE_PACKAGES)
    context = _fresh_tree(tmp_path_factory.mktemp("context"))
    assert (context / "Dockerfile").is_file() and (context / ".dockerignore").is_file()
    for name in PLANTED:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(f'enrollment_code = "{CANARY}"\n')
    # This host's CA bundle over the base's, for the build's RUN steps only (a TLS-intercepting
    # proxy's CA must be trusted to reach the package index); a bind mount over an existing file
    # leaves nothing in a layer.
    trust = [f"--volume={CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.is_file() else []
    built = _podman(
        "build",
        "--format=docker",  # podman keeps HEALTHCHECK only in docker's image format
        "--pull=never",
        "--layers=false",
        "--network=host",
        f"--build-arg=BASE={base}",
        *trust,
        f"--tag={IMAGE}",
        str(context),
        timeout=900,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield IMAGE
    _podman("rmi", IMAGE)


@pytest.fixture(scope="module")
def inspected(image: str) -> dict[str, Any]:
    """`podman image inspect` of the image."""
    done = _podman("image", "inspect", image)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = orjson.loads(done.stdout)[0]
    return found


@pytest.fixture(scope="module")
def image_root(image: str) -> Iterator[Path]:
    """The image's filesystem, mounted read-only on the host (rootful podman)."""
    mounted = _podman("image", "mount", image)
    assert mounted.returncode == 0, mounted.stderr
    yield Path(mounted.stdout.strip())
    _podman("image", "unmount", image)


def test_image_runs_the_agent_as_an_unprivileged_entrypoint(inspected: dict[str, Any]) -> None:
    image_config = inspected["Config"]
    assert image_config["Entrypoint"] == ["provider-agent"]
    assert image_config["Cmd"] == ["run", "--config", CONFIG_IN_CONTAINER]
    assert image_config["User"] == "provider-agent:provider-agent"
    assert STATE_IN_CONTAINER in image_config["Volumes"]
    env = dict(item.split("=", 1) for item in image_config["Env"])
    assert env["STATE_DIRECTORY"] == STATE_IN_CONTAINER
    assert env["PATH"].startswith("/opt/provider-agent/bin:")
    assert image_config["StopSignal"] == "SIGTERM"
    # docker's image format, the one that keeps a HEALTHCHECK (OCI's has no field for it).
    assert "docker" in inspected["ManifestType"]
    health = inspected["Healthcheck"]["Test"]
    assert health[0] == "CMD" and "PROVIDER_AGENT_HEALTHZ" in health[-1]


def test_image_holds_the_installed_package_and_nothing_of_the_build(image_root: Path) -> None:
    # A regular (non-editable) install: the package's files in the venv's site-packages, no
    # pointer back at a source tree.
    site = next((image_root / "opt/provider-agent/lib").glob("python3*/site-packages"))
    assert (site / "provider_agent/cli.py").is_file()
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    assert not any("/src" in pth.read_text() for pth in site.glob("*.pth"))
    # The state directory belongs to the agent's user, and only to it.
    state = (image_root / STATE_IN_CONTAINER.lstrip("/")).stat()
    assert (state.st_uid, state.st_mode & 0o777) == (AGENT_UID, 0o700)
    passwd = (image_root / "etc/passwd").read_text()
    assert f"provider-agent:x:{AGENT_UID}:{AGENT_UID}:" in passwd
    # Nothing of the build context beyond the package.
    found: list[str] = []
    for directory, subdirs, files in os.walk(image_root):
        relative = Path(directory).relative_to(image_root)
        if relative.parts[:1] in {("proc",), ("sys",), ("dev",)}:
            subdirs.clear()
            continue
        found += [str(relative / d) for d in subdirs if d in {".git", ".venv"}]
        for name in files:
            path = Path(directory) / name
            planted = name in {"agent.toml", "identity.key"}
            regular = not path.is_symlink() and path.is_file()  # (a link may point at the host)
            if planted or (regular and CANARY.encode() in path.read_bytes()):
                found.append(str(relative / name))
    assert found == []
    assert not (image_root / "src").exists()


def _config(coordinator_url: str, backend_url: str, metrics_port: int) -> str:
    """An agent.toml for the container: no paths (identity and state go to $STATE_DIRECTORY, the
    volume); the enrollment code comes from the environment."""
    return (
        f'[coordinator]\nurl = "{coordinator_url}"\nheartbeat_interval_s = 2\n'
        "[discovery]\ninterval_s = 300\ntimeout_s = 5\n"
        "[state]\ndrain_timeout_s = 60\n"
        f'[observability]\nprometheus_addr = "127.0.0.1:{metrics_port}"\n'
        f'[[backends]]\nkind = "vllm"\nurl = "{backend_url}"\n'
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
    )


async def _podman_async(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`podman ARGS` without blocking the event loop the coordinator and backend run on: its
    exit status and its output (stdout, then stderr)."""
    done = await anyio.run_process(["podman", *args], env=env, check=False)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


@dataclass
class Container:
    """One `podman run --detach` of the image; its log is shown when a wait on it fails."""

    name: str

    async def inspect(self, template: str) -> str:
        code, output = await _podman_async("inspect", "--format", template, self.name)
        assert code == 0, output
        return output.strip()

    async def logs(self) -> str:
        return (await _podman_async("logs", self.name))[1]

    async def wait_for(
        self,
        coord: DevCoordinator,
        predicate: Callable[[DevCoordinator], _T | None],
        what: str,
        timeout: float = START_S,  # noqa: ASYNC109 (read as `wait_for(…, timeout=…)`)
    ) -> _T:
        try:
            return await coord.wait_for(predicate, timeout=timeout)
        except TimeoutError:
            log = await self.logs()
            raise AssertionError(f"{what}: not within {timeout}s; its log:\n{log}") from None

    async def stop(self) -> None:
        """`podman stop`: SIGTERM, and SIGKILL only after 60 s (the agent's drain budget)."""
        code, output = await _podman_async("stop", "--time=60", self.name)
        assert code == 0, output


async def _run_container(name: str, config: Path, volume: str, metrics_port: int) -> Container:
    """Start the image with host networking, `config` mounted read-only, `volume` as the state
    dir and the enrollment code passed by name from this process's environment (not in argv)."""
    code, output = await _podman_async(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",
        f"--volume={config}:{CONFIG_IN_CONTAINER}:ro",
        f"--volume={volume}:{STATE_IN_CONTAINER}",
        "--env=PROVIDER_AGENT_ENROLLMENT_CODE",
        f"--env=PROVIDER_AGENT_HEALTHZ=http://127.0.0.1:{metrics_port}/healthz",
        IMAGE,
        *("run", "--config", CONFIG_IN_CONTAINER, "--allow-insecure"),
        env={**os.environ, "PROVIDER_AGENT_ENROLLMENT_CODE": ENROLLMENT_CODE},
    )
    assert code == 0, output
    return Container(name)


def _offers(record: AgentRecord) -> list[str]:
    return sorted(record.offers()) if record.connected else []


REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _first_start(coord: DevCoordinator, agent: Container) -> AgentRecord:
    """The agent comes up as PID 1 of its container, unprivileged, healthy, enrolled with the
    code from the environment, offering the backend's model; its record at the coordinator."""
    record = await agent.wait_for(
        coord,
        lambda c: next((a for a in c.agents.values() if _offers(a) == ["m"]), None),
        "the agent authenticated and offering the backend's model",
    )
    assert record.enrollment_code == ENROLLMENT_CODE
    assert ENROLLMENT_CODE not in await agent.logs()
    pid = await agent.inspect("{{.State.Pid}}")
    lines = (await anyio.Path(f"/proc/{pid}/status").read_text()).splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    assert status["NSpid"].split()[-1] == "1"  # its pid in the container's namespace
    assert status["Uid"].split() == [str(AGENT_UID)] * 4  # real, effective, saved, fs
    assert status["Name"] == "provider-agent"
    code, output = await _podman_async("healthcheck", "run", agent.name)
    assert code == 0, output
    return record


async def _stop_with_a_job_in_flight(
    coord: DevCoordinator, backend: FakeVllm, agent: Container, record: AgentRecord
) -> None:
    """SIGTERM (podman stop) while a job streams: the agent advertises nothing, lets the job
    finish, closes the session with 1001 and exits 0, long before podman would SIGKILL it."""
    gate = backend.gate = anyio.Event()
    held = await coord.send_job(record.provider_id, "m", REQUEST, job_id="in-flight")
    await agent.wait_for(coord, lambda c: held.bytes_relayed > 0, "the held job streaming")
    async with anyio.create_task_group() as group:
        group.start_soon(agent.stop)
        await agent.wait_for(
            coord,
            lambda c: (
                record.capabilities is not None
                and record.capabilities.metadata.status == "draining"
            ),
            "capabilities saying draining after SIGTERM",
        )
        assert record.capabilities is not None and record.capabilities.models == []
        assert held.terminal is None
        gate.set()
    assert held.terminal is not None and held.terminal.type == "job_done"
    assert coord.attempts[-1].provider_id == record.provider_id
    assert coord.attempts[-1].close_code == 1001
    assert await agent.inspect("{{.State.Status}} {{.State.ExitCode}}") == "exited 0"


async def test_container_serves_drains_on_stop_and_keeps_its_identity(
    image: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    volume = f"provider-agent-test-{tag}"
    names = [f"provider-agent-test-{tag}-{i}" for i in (1, 2)]
    metrics_port = free_port()
    try:
        async with (
            DevCoordinator(host="127.0.0.1", port=0) as coord,
            fake_vllm("m", tokens=3) as backend,
        ):
            config = anyio.Path(tmp_path / "agent.toml")
            await config.write_text(_config(coord.ws_url, backend.url, metrics_port))
            first = await _run_container(names[0], Path(config), volume, metrics_port)
            record = await _first_start(coord, first)

            served = await coord.send_job(record.provider_id, "m", REQUEST, job_id="served")
            await first.wait_for(coord, lambda c: served.terminal, "job_done of the first job")
            assert served.terminal is not None and served.terminal.type == "job_done"
            assert served.data is not None and b"t2 " in bytes(served.data)

            await _stop_with_a_job_in_flight(coord, backend, first, record)

            # A new container on the same volume is the same provider, with the same key file.
            second = await _run_container(names[1], Path(config), volume, metrics_port)
            await second.wait_for(
                coord,
                lambda c: record.connections == 2 and _offers(record) == ["m"],
                "the same provider reconnecting from a new container",
            )
            assert list(coord.agents) == [record.provider_id]
            code, mountpoint = await _podman_async(
                "volume", "inspect", "--format", "{{.Mountpoint}}", volume
            )
            assert code == 0, mountpoint
            key = await anyio.Path(mountpoint.strip(), "identity.key").stat()
            assert (key.st_uid, key.st_mode & 0o777) == (AGENT_UID, 0o600)
            await second.stop()
            assert await second.inspect("{{.State.ExitCode}}") == "0"
            assert coord.attempts[-1].close_code == 1001
            coord.assert_no_violations()
    finally:
        for name in names:
            _podman("rm", "--force", "--time=0", name)
        _podman("volume", "rm", "--force", volume)
