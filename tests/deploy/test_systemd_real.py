"""The systemd unit under a real systemd, and `provider-agent upgrade` run for real.

One Debian container with systemd as PID 1 (`tests/deploy/nspawn.py`) per module: the project is
installed in it as README says (a checkout in /opt/provider-agent, `bash scripts/install`, then
`provider-agent service install`, which builds the first release from the checkout, writes the
shipped unit with ExecStart in `current` and starts it), with its config in
/etc/provider-agent and an OpenRouter key in /etc/credstore. Its peers run in this process on
loopback, which the container shares: the reference coordinator (behind TLS, as the unit runs
without `--allow-insecure`; the test CA is in the container's trust store), a vLLM look-alike
whose streams can be held open (a job in flight), a backend that never answers (so the first
discovery pass takes `[discovery] timeout_s`) and an OpenRouter stand-in that records the
Authorization header it gets. The only change to the unit is a drop-in that shortens two times so
that the test waits seconds, not minutes: `WatchdogSec=` 60 s → 8 s (a stuck agent is restarted
sooner) and `TimeoutStopSec=` 90 s → 4 s (a drain longer than that must be asked for, as the agent
does with EXTEND_TIMEOUT_USEC, whatever the unit's value).

The tests run in file order on the one container and each leaves the service running. The last
ones upgrade it with `provider-agent upgrade` (pip offline, from the wheelhouse): a dry run, a
version bump with a job in flight, the same commit again, and a commit whose agent exits at start,
which is switched back; the ledger then holds exactly the coordinator's `job_done`s.
"""

from __future__ import annotations

import copy
import csv
import errno
import io
import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import pytest
from aiohttp import web
from anyio.abc import SocketAttribute, SocketStream
from anyio.from_thread import BlockingPortal, start_blocking_portal

from provider_agent.dev.coordinator import (
    CONNECT_PATH,
    JOB_DEADLINE_MS,
    AgentRecord,
    DevCoordinator,
    JobRecord,
)
from provider_agent.link.protocol import JobDone
from tests import git_source
from tests.agent_harness import FakeVllm, fake_vllm, free_port
from tests.deploy.nspawn import (
    INSTALL_DIR,
    OFFLINE_PIP,
    SOURCE_GUEST,
    WHEELHOUSE_GUEST,
    Bind,
    LoopbackCA,
    SystemdContainer,
    boot,
    debian_root,
    install_checkout,
    nspawn_problem,
    poll,
    tls_front,
    trust_ca,
    wheelhouse,
)

UNIT: Final = "provider-agent.service"
SYSTEMD_README: Final = Path(__file__).resolve().parents[2] / "systemd" / "README.md"
CONFIG: Final = "/etc/provider-agent/agent.toml"
#: The checkout's own command (`service install` is run from it, README: Install) …
AGENT: Final = f"{INSTALL_DIR}/.venv/bin/provider-agent"
#: … and the release the service runs, through `current` (operator commands, `upgrade`).
RELEASED: Final = f"{INSTALL_DIR}/current/.venv/bin/provider-agent"
DROP_IN: Final = "/etc/systemd/system/provider-agent.service.d/test.conf"
WATCHDOG_S: Final = 8
#: The drop-in's TimeoutStopSec= (the unit says 90): a drain longer than this must be asked for.
STOP_TIMEOUT_S: Final = 4
#: `[discovery] timeout_s`: the first pass waits this long for the backend that never answers.
DISCOVERY_TIMEOUT_S: Final = 2
MODEL: Final = "tiny-chat"
BYOK_MODEL: Final = "standin/tiny"
KEY_NAME: Final = "OPENROUTER_API_KEY"
REQUEST: Final = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
#: `upgrade --watch`: how long a new release must stay up after its start.
UPGRADE_WATCH_S: Final = 10
#: How long a start may take: the first pass plus Python's start in a busy container.
START_S: Final = 60

_T = TypeVar("_T")

_PROBLEM: Final = nspawn_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


# --- the peers on loopback -----------------------------------------------------------------------


@dataclass
class Silent:
    """A backend that accepts connections and never answers; when each one arrived
    (`time.monotonic()`, the clock systemd's `…TimestampMonotonic` properties use)."""

    url: str = ""
    accepted: list[float] = field(default_factory=list)


@asynccontextmanager
async def silent_backend() -> AsyncIterator[Silent]:
    state = Silent()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    state.url = f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"

    async def hold(stream: SocketStream) -> None:
        state.accepted.append(time.monotonic())
        with suppress(anyio.BrokenResourceError):
            async with stream:
                async for _ in stream:
                    pass

    async with anyio.create_task_group() as group:
        group.start_soon(listener.serve, hold)
        try:
            yield state
        finally:
            group.cancel_scope.cancel()


@dataclass
class Byok:
    """An OpenRouter stand-in (https): the Authorization headers it was sent."""

    url: str = ""
    authorizations: list[str] = field(default_factory=list)


@asynccontextmanager
async def byok_stand_in(ca: LoopbackCA) -> AsyncIterator[Byok]:
    state = Byok()

    async def key(request: web.Request) -> web.Response:
        state.authorizations.append(request.headers.get("Authorization", ""))
        return web.json_response({"data": {"label": "stand-in", "usage": 0, "limit": None}})

    async def models(request: web.Request) -> web.Response:
        state.authorizations.append(request.headers.get("Authorization", ""))
        price = {"prompt": "0.000001", "completion": "0.000002"}
        entry = {"id": BYOK_MODEL, "context_length": 4096, "pricing": price}
        return web.json_response({"data": [entry]})

    app = web.Application()
    app.router.add_get("/api/v1/key", key)
    app.router.add_get("/api/v1/models", models)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context()).start()
    state.url = f"https://127.0.0.1:{runner.addresses[0][1]}/api/v1"
    try:
        yield state
    finally:
        await runner.cleanup()


@dataclass
class Peers:
    """The loopback peers, served by an event loop in a thread of this process (`portal`), so
    that the tests can block on the container's commands while the peers go on answering."""

    portal: BlockingPortal
    coord: DevCoordinator
    coordinator_url: str
    vllm: FakeVllm
    silent: Silent
    byok: Byok

    def wait(self, predicate: Callable[[DevCoordinator], _T | None], timeout: float = 30) -> _T:
        """`DevCoordinator.wait_for` from the test's thread."""

        async def waiting() -> _T:
            return await self.coord.wait_for(predicate, timeout)

        return self.portal.call(waiting)

    def read(self, look: Callable[[DevCoordinator], _T]) -> _T:
        """Read the coordinator's records in its own thread."""
        return self.portal.call(look, self.coord)

    def record(self) -> AgentRecord:
        """The one agent the coordinator knows, as it is now (a copy: the coordinator's own
        record changes as frames arrive)."""
        agents = self.read(lambda c: [copy.copy(r) for r in c.agents.values()])
        assert len(agents) == 1, f"the coordinator knows {len(agents)} agents"
        return agents[0]

    def hold_streams(self) -> anyio.Event:
        """From now on the vLLM look-alike holds every stream after its tokens until the returned
        event is set (`release`)."""
        gate = self.portal.call(anyio.Event)
        self.vllm.gate = gate
        return gate

    def release(self, gate: anyio.Event) -> None:
        self.portal.call(gate.set)

    def send_job(self, provider_id: str, deadline_ms: int = JOB_DEADLINE_MS) -> JobRecord:
        return self.portal.call(
            lambda: self.coord.send_job(provider_id, MODEL, dict(REQUEST), deadline_ms=deadline_ms)
        )


@pytest.fixture(scope="module")
def ca() -> LoopbackCA:
    """The TLS authority of the loopback peers, trusted inside the container."""
    return LoopbackCA.create()


@pytest.fixture(scope="module")
def peers(ca: LoopbackCA) -> Iterator[Peers]:
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())
        coord = stack.enter_context(
            portal.wrap_async_context_manager(DevCoordinator(host="127.0.0.1", port=0))
        )
        port = stack.enter_context(
            portal.wrap_async_context_manager(tls_front(coord.port, ca.server_context()))
        )
        yield Peers(
            portal=portal,
            coord=coord,
            coordinator_url=f"wss://127.0.0.1:{port}{CONNECT_PATH}",
            vllm=stack.enter_context(portal.wrap_async_context_manager(fake_vllm(MODEL))),
            silent=stack.enter_context(portal.wrap_async_context_manager(silent_backend())),
            byok=stack.enter_context(portal.wrap_async_context_manager(byok_stand_in(ca))),
        )
        assert not coord.violations, list(coord.violations)


# --- the deployment ------------------------------------------------------------------------------


def agent_toml(peers: Peers, metrics_port: int, output_per_1m: int = 600_000) -> str:
    """The operator's config: the coordinator, the vLLM look-alike, the silent backend, the
    OpenRouter stand-in (key as a credential), identity and state where `service install` puts
    them."""
    return f"""\
[coordinator]
url = "{peers.coordinator_url}"

[identity]
key_path = "/var/lib/provider-agent/identity.key"

[discovery]
timeout_s = {DISCOVERY_TIMEOUT_S}

[state]
dir = "/var/lib/provider-agent"

[observability]
prometheus_addr = "127.0.0.1:{metrics_port}"

[[backends]]
kind = "vllm"
url = "{peers.vllm.url}"

[[backends]]
kind = "vllm"
name = "never-answers"
url = "{peers.silent.url}"

[[backends]]
kind = "openrouter"
url = "{peers.byok.url}"
api_key_env = "{KEY_NAME}"

[pricing]
default_input_per_1m = 300000
default_output_per_1m = {output_per_1m}
"""


@dataclass
class Deployment:
    container: SystemdContainer
    peers: Peers
    #: The repository the container's checkout was cloned from (on the host, bind-mounted).
    source: Path
    #: `provider-agent service install`, as it ran.
    install: subprocess.CompletedProcess[str]
    #: `time.monotonic()` just before it ran.
    installed_at: float
    api_key: str
    metrics_port: int

    def props(self, *names: str) -> dict[str, str]:
        return self.container.unit_properties(UNIT, *names)

    def agent(self, *args: str) -> subprocess.CompletedProcess[str]:
        """An operator command as README gives it: as root, with the service's config."""
        return self.container.run([RELEASED, "--config", CONFIG, *args])

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.agent("status", "--json").stdout)
        return result

    def wait(
        self, predicate: Callable[[DevCoordinator], _T | None], what: str, timeout: float = 30
    ) -> _T:
        """`Peers.wait`, failing with what the coordinator and the unit's journal say."""
        try:
            return self.peers.wait(predicate, timeout)
        except TimeoutError:
            attempts = self.peers.read(lambda coord: list(coord.attempts)[-5:])
            journal = self.container.journal(UNIT)[-6000:]
            raise AssertionError(
                f"not within {timeout:g}s: {what}\nlast connection attempts: {attempts}\n"
                f"journal of {UNIT}:\n{journal}"
            ) from None

    def streaming(self, job_id: str) -> JobRecord:
        """Wait until the job's first chunk reached the coordinator: it is in flight."""
        return self.wait(
            lambda c: c.jobs[job_id] if c.jobs[job_id].chunk_frames else None,
            f"job {job_id} streaming",
        )

    def done(self, job_id: str, timeout: float = 60) -> JobDone:
        record = self.wait(
            lambda c: c.jobs[job_id] if c.jobs[job_id].terminal else None,
            f"job {job_id} finished",
            timeout,
        )
        assert isinstance(record.terminal, JobDone), record.terminal
        return record.terminal

    def ensure_running(self) -> int:
        """The service active (started if an earlier test left it otherwise); its MainPID."""
        if self.props("ActiveState")["ActiveState"] != "active":
            self.container.systemctl("start", UNIT, timeout=START_S)
        self.container.wait_for_state(UNIT, START_S, ActiveState="active", SubState="running")
        pid = self.container.main_pid(UNIT)
        assert pid > 0
        self.wait(lambda c: c.connected(), "the agent connected")
        return pid


@pytest.fixture(scope="module")
def deployment(
    ca: LoopbackCA, peers: Peers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    source = git_source.origin(tmp_path_factory.mktemp("systemd-real") / "source")
    binds = [Bind(source, SOURCE_GUEST), Bind(wheelhouse(), WHEELHOUSE_GUEST)]
    api_key = f"sk-or-v1-{secrets.token_hex(24)}"
    metrics_port = free_port()
    with debian_root() as root, boot(root, binds=binds) as container:
        trust_ca(container, ca)
        install_checkout(container)
        container.run(["install", "-d", "-m", "0755", "/etc/provider-agent"])
        container.write_file(CONFIG, agent_toml(peers, metrics_port), mode="0600")
        container.run(["install", "-d", "-m", "0700", "/etc/credstore"])
        container.write_file(f"/etc/credstore/{KEY_NAME}", api_key + "\n", mode="0600")
        container.run(["install", "-d", "-m", "0755", os.path.dirname(DROP_IN)])
        container.write_file(
            DROP_IN,
            f"[Service]\nWatchdogSec={WATCHDOG_S}s\nTimeoutStopSec={STOP_TIMEOUT_S}s\n",
        )
        installed_at = time.monotonic()
        install = container.run(
            [AGENT, "service", "install"],
            cwd=INSTALL_DIR,
            env=OFFLINE_PIP,  # the first release's pip install, from the wheelhouse
            check=False,
            timeout=START_S + 600,
        )
        yield Deployment(
            container=container,
            peers=peers,
            source=source,
            install=install,
            installed_at=installed_at,
            api_key=api_key,
            metrics_port=metrics_port,
        )


def proc_status(container: SystemdContainer, pid: int) -> dict[str, str]:
    """/proc/PID/status of a process inside, as a dict."""
    pairs = (line.split(":", 1) for line in container.read_file(f"/proc/{pid}/status").splitlines())
    return {key: value.strip() for key, value in pairs}


def monotonic_s(value: str) -> float:
    """A `…TimestampMonotonic` property (µs) in seconds."""
    return int(value) / 1_000_000


def ledger_rows(deployment: Deployment) -> list[dict[str, str]]:
    """`provider-agent earnings --csv`, the operator's view of the ledger, as rows."""
    return list(csv.DictReader(io.StringIO(deployment.agent("earnings", "--csv").stdout)))


# --- the tests -----------------------------------------------------------------------------------


def test_service_install_starts_the_unit_ready_after_the_first_pass(
    deployment: Deployment,
) -> None:
    d, c = deployment, deployment.container
    assert d.install.returncode == 0, d.install.stdout + d.install.stderr
    assert "systemctl enable --now provider-agent" in d.install.stdout
    props = d.props(
        "ActiveState",
        "SubState",
        "Type",
        "UnitFileState",
        "FragmentPath",
        "DropInPaths",
        "WatchdogUSec",
        "TimeoutStopUSec",
        "ExecStart",
        "NRestarts",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["Type"] == "notify"
    assert props["UnitFileState"] == "enabled"
    assert props["FragmentPath"] == f"/etc/systemd/system/{UNIT}"
    assert DROP_IN in props["DropInPaths"].split()
    assert props["WatchdogUSec"] == f"{WATCHDOG_S}s"
    assert props["TimeoutStopUSec"] == f"{STOP_TIMEOUT_S}s"
    assert f"argv[]={RELEASED} run " in props["ExecStart"]
    assert "build the first release from /opt/provider-agent's HEAD" in d.install.stdout
    assert props["NRestarts"] == "0"

    # READY=1 came after the first discovery pass: the start (Type=notify) ended only once the
    # backend that never answers had been given its whole timeout_s.
    started = monotonic_s(props["ExecMainStartTimestampMonotonic"])
    active = monotonic_s(props["ActiveEnterTimestampMonotonic"])
    assert started > d.installed_at
    probes = d.peers.portal.call(lambda: [t for t in d.peers.silent.accepted if t >= started])
    assert probes, "the first discovery pass never probed the backend that never answers"
    assert active >= probes[0] + DISCOVERY_TIMEOUT_S - 0.25, (started, probes[0], active)

    # The agent works under the unit: it dialled the coordinator over TLS and offers the models
    # of the vLLM look-alike and of the OpenRouter stand-in.
    record = d.wait(
        lambda c: next((r for r in c.agents.values() if r.connected and r.offers()), None),
        "the agent connected and offered models",
    )
    assert MODEL in record.offers()
    assert any(BYOK_MODEL in model for model in record.offers()), record.offers()
    # STATUS=: `systemctl status` shows the agent's own line.
    c.wait_for_state(
        UNIT, 3 * WATCHDOG_S, StatusText=lambda text: text.startswith("session authenticated")
    )
    pid = c.main_pid(UNIT)
    again = c.run([AGENT, "service", "install"], cwd=INSTALL_DIR, env=OFFLINE_PIP)
    assert "unchanged" in again.stdout, again.stdout
    assert c.main_pid(UNIT) == pid


def test_reload_rereads_the_config_and_keeps_the_session(deployment: Deployment) -> None:
    d, c = deployment, deployment.container
    pid = d.ensure_running()
    restarts = d.props("NRestarts")["NRestarts"]
    record = d.peers.record()
    assert record.offers()[MODEL].output_per_1m == 600_000
    attempts = d.peers.read(lambda coord: len(coord.attempts))
    since = time.time()

    # The operator edits the file in place and reloads; `systemctl reload` returns once the
    # agent said READY=1 again.
    c.write_file(
        CONFIG,
        agent_toml(d.peers, d.metrics_port, output_per_1m=650_000),
        mode="0640",
        group="provider-agent-config",
    )
    c.systemctl("reload", UNIT)

    repriced = d.wait(
        lambda coord: next(
            (
                r
                for r in coord.agents.values()
                if MODEL in r.offers() and r.offers()[MODEL].output_per_1m == 650_000
            ),
            None,
        ),
        "the new price offered",
    )
    assert repriced.connections == record.connections, "the reload opened a new session"
    assert d.peers.read(lambda coord: len(coord.attempts)) == attempts
    assert d.peers.read(lambda coord: coord.connected()) == [record.provider_id]
    after = d.props("ActiveState", "MainPID", "NRestarts")
    assert after == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": restarts}
    assert "config reloaded" in c.journal(UNIT, since_realtime=since)

    # A broken file: logged, the running config kept, the session and the process too.
    good = c.read_file(CONFIG)
    c.write_file(CONFIG, good + "[pricing\n", mode="0640", group="provider-agent-config")
    since = time.time()
    c.systemctl("reload", UNIT)
    poll(
        lambda: (
            "reload failed, keeping the running config" in c.journal(UNIT, since_realtime=since)
        ),
        30,
        "the failed reload logged",
    )
    c.write_file(CONFIG, good, mode="0640", group="provider-agent-config")
    assert d.props("ActiveState", "MainPID", "NRestarts") == after
    assert d.peers.record().offers()[MODEL].output_per_1m == 650_000
    assert d.peers.read(lambda coord: len(coord.attempts)) == attempts


def test_the_sandbox_is_in_force_and_the_key_comes_from_the_credstore(
    deployment: Deployment,
) -> None:
    d, c = deployment, deployment.container
    pid = d.ensure_running()

    # DynamicUser=: a uid from systemd's dynamic range, known by name through nss-systemd, with
    # the config group as its supplementary group; no privileges, a seccomp filter.
    status = proc_status(c, pid)
    uid = int(status["Uid"].split()[0])
    assert status["Uid"].split() == [str(uid)] * 4
    assert 61184 <= uid <= 65519, status["Uid"]
    assert c.run(["getent", "passwd", "provider-agent"]).stdout.split(":")[2] == str(uid)
    config_gid = c.run(["getent", "group", "provider-agent-config"]).stdout.split(":")[2]
    assert config_gid in status["Groups"].split()
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0

    # ... and it works under all that: authenticated, its backends answered, the outbox usable.
    readiness = d.status()["readiness"]
    assert readiness["ready"], readiness

    # ProtectSystem=strict: the installation is read-only in the agent's view, not outside it.
    probe = f"{INSTALL_DIR}/.sandbox-probe"
    inside = c.run(["nsenter", f"--target={pid}", "--mount", "touch", probe], check=False)
    assert inside.returncode != 0 and "Read-only file system" in inside.stderr, inside
    c.run(["sh", "-c", 'touch "$1" && rm "$1"', "sh", probe])

    # StateDirectory=: the identity and the outbox in /var/lib/private/provider-agent (0700,
    # the dynamic user's), reached through the /var/lib/provider-agent link; the operator's
    # `identity` (as root, README) finds the key the service made.
    state = "/var/lib/private/provider-agent"
    assert c.run(["readlink", "/var/lib/provider-agent"]).stdout.strip() == "private/provider-agent"
    assert c.run(["stat", "-c", "%a %u", state]).stdout.split() == ["700", str(uid)]
    assert c.run(["stat", "-c", "%a %u", f"{state}/identity.key"]).stdout.split() == [
        "600",
        str(uid),
    ]
    assert c.run(["test", "-s", f"{state}/outbox.sqlite3"]).returncode == 0
    assert d.peers.record().provider_id in d.agent("identity").stdout

    # LoadCredential=: the key in /etc/credstore reached the OpenRouter stand-in as the Bearer
    # token; it is not in the agent's environment nor anywhere in the journal.
    seen = d.peers.portal.call(lambda: list(d.peers.byok.authorizations))
    # (Asserted as booleans: a failure must not print the key.)
    with_key = sum(header == f"Bearer {d.api_key}" for header in seen)
    assert with_key > 0, f"{len(seen)} requests to the stand-in, none with the key"
    environ = c.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
    assert f"CREDENTIALS_DIRECTORY=/run/credentials/{UNIT}" in environ
    in_environment = any(d.api_key in variable for variable in environ)
    assert not in_environment, "the key is in the agent's environment"
    in_journal = d.api_key in c.run(["journalctl", "--no-pager", "-o", "cat"]).stdout
    assert not in_journal, "the key is in the journal"

    # The installed unit is clean for systemd's own verifier, and the running service scores
    # what systemd/README.md says.
    verify = c.run(["systemd-analyze", "verify", UNIT], check=False)
    complaints = [
        line for line in (verify.stdout + verify.stderr).splitlines() if "provider-agent" in line
    ]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    documented = re.search(r"scores the unit\s+\*\*([\d.]+ [A-Z]+)\*\*", SYSTEMD_README.read_text())
    assert documented is not None, "systemd/README.md no longer states the score"
    security = c.run(["systemd-analyze", "security", UNIT]).stdout
    assert f"Overall exposure level for {UNIT}: {documented.group(1)}" in security, security[-300:]


def test_the_watchdog_restarts_an_agent_whose_event_loop_is_stuck(
    deployment: Deployment,
) -> None:
    d, c = deployment, deployment.container
    pid = d.ensure_running()
    restarts = int(d.props("NRestarts")["NRestarts"])
    record = d.peers.record()
    since = time.time()

    # Stuck: the config becomes a named pipe and the agent is told to reload. Its event loop
    # reads the config in place, so it blocks in read() on the pipe, whose writer (this test)
    # never writes: the process is alive, but its loop turns no more and sends no WATCHDOG=1.
    kept = CONFIG + ".kept"
    c.run(["mv", CONFIG, kept])
    c.run(["mkfifo", "--mode=0640", CONFIG])
    c.run(["chgrp", "provider-agent-config", CONFIG])
    c.systemctl("reload", "--no-block", UNIT)

    def writer() -> int | None:
        try:
            return os.open(c.host_path(CONFIG), os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: nobody has the pipe open for reading yet
            if exc.errno == errno.ENXIO:
                return None
            raise

    fd = poll(writer, 30, "the agent opened the config (a named pipe) to reload it")
    try:
        c.run(["mv", kept, CONFIG])  # the next start reads the real file
        assert c.main_pid(UNIT) == pid
        after = c.wait_for_state(
            UNIT,
            WATCHDOG_S + 5 + START_S,
            NRestarts=str(restarts + 1),
            ActiveState="active",
            SubState="running",
            MainPID=lambda value: value not in ("0", str(pid)),
        )
    finally:
        os.close(fd)
    journal = c.journal(UNIT, since_realtime=since)
    assert "Watchdog timeout" in journal, journal
    assert "status=6/ABRT" in journal, journal
    assert int(after["NRestarts"]) == restarts + 1

    # The new process is the same provider: it authenticated again with the same identity; the
    # stuck one's session ended without a close frame (it was killed, not stopped).
    again = d.wait(
        lambda coord: next(
            (
                r
                for r in coord.agents.values()
                if r.connected and r.connections > record.connections
            ),
            None,
        ),
        "the restarted agent authenticated",
        timeout=START_S,
    )
    assert again.provider_id == record.provider_id
    assert d.peers.read(lambda coord: list(coord.agents)) == [record.provider_id]
    ended = d.peers.read(
        lambda coord: [a for a in coord.attempts if a.provider_id == record.provider_id]
    )[-2]
    assert ended.close_code is None and ended.closed_by == "connection", ended


def test_stop_drains_the_job_in_flight_closes_1001_and_ends_inactive(
    deployment: Deployment,
) -> None:
    d, c, p = deployment, deployment.container, deployment.peers
    d.ensure_running()
    provider_id = p.record().provider_id
    since = time.time()
    gate = p.hold_streams()
    try:
        job = d.streaming(p.send_job(provider_id).job_id)
        c.systemctl("stop", "--no-block", UNIT)
        # Draining: the unit is deactivating, the agent advertises nothing and waits for the job.
        c.wait_for_state(UNIT, 30, ActiveState="deactivating")
        d.wait(
            lambda coord: (
                (r := coord.agents[provider_id]).capabilities is not None
                and r.capabilities.metadata.status == "draining"
            ),
            "the agent advertised draining",
        )

        # The job outlasts the unit's TimeoutStopSec: systemd still waits, as the agent asked
        # for its drain_timeout_s (EXTEND_TIMEOUT_USEC) when the drain began.
        def draining_past_the_stop_timeout() -> bool:
            now = time.monotonic()
            shown = d.props("ActiveState", "StateChangeTimestampMonotonic")
            assert shown["ActiveState"] == "deactivating", shown
            return now - monotonic_s(shown["StateChangeTimestampMonotonic"]) > STOP_TIMEOUT_S + 1

        poll(draining_past_the_stop_timeout, 30, f"deactivating for {STOP_TIMEOUT_S + 1}s")
        assert p.read(lambda coord: coord.jobs[job.job_id].terminal) is None
    finally:
        p.release(gate)
    done = d.done(job.job_id)
    assert done.tokens.output == p.vllm.tokens
    c.wait_for_state(UNIT, 60, ActiveState="inactive")
    shown = d.props("SubState", "Result", "ExecMainCode", "ExecMainStatus")
    assert shown == {
        "SubState": "dead",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }, shown
    assert "timed out" not in c.journal(UNIT, since_realtime=since)
    last = p.read(lambda coord: [a for a in coord.attempts if a.provider_id == provider_id][-1])
    assert (last.close_code, last.closed_by) == (1001, "agent"), last
    assert p.read(lambda coord: coord.jobs[job.job_id].sent_on) == last.index
    assert not p.read(lambda coord: list(coord.violations))

    c.systemctl("start", UNIT, timeout=START_S)
    assert d.props("ActiveState")["ActiveState"] == "active"


def upgrade(d: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """`provider-agent upgrade` as README gives it (as root, from the release the service
    runs), pip offline from the wheelhouse."""
    return d.container.run(
        [RELEASED, "upgrade", "--watch", f"{UPGRADE_WATCH_S}s", *args],
        env=OFFLINE_PIP,
        check=False,
        timeout=900,
    )


def releases_now(c: SystemdContainer) -> tuple[str, str]:
    """`current`'s target and the release directories."""
    return (
        c.run(["readlink", f"{INSTALL_DIR}/current"]).stdout.strip(),
        c.run(["ls", f"{INSTALL_DIR}/releases"]).stdout,
    )


def commit_exit_at_start(repository: Path) -> str:
    """A commit whose agent exits at start (status 3, one line on stderr); everything else —
    --version, validate, selftest — works, so the gate passes and the watch must catch it."""
    daemon = repository / "provider_agent" / "daemon.py"
    text = daemon.read_text()
    marker = 'raise (78)."""\n'
    assert text.count(marker) == 1
    daemon.write_text(
        text.replace(
            marker,
            marker + '    import sys\n\n    print("this release exits at start", file=sys.stderr)\n'
            "    return 3\n",
        )
    )
    git_source.git(repository, "commit", "--quiet", "--all", "--message=an agent that exits")
    return git_source.head(repository)


def held_job(d: Deployment, provider_id: str) -> tuple[JobRecord, anyio.Event]:
    """A job streaming and held open by the vLLM look-alike until the returned gate is set;
    later streams (the upgrade's gate selftest) are not held."""
    p = d.peers
    gate = p.hold_streams()
    job = d.streaming(p.send_job(provider_id, deadline_ms=900_000).job_id)
    p.vllm.gate = None
    return job, gate


def upgrade_with_a_job_in_flight(
    d: Deployment, provider_id: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], JobRecord]:
    """`upgrade` while a job streams: the job is held until the restart has begun (the old
    process draining it), then let finish."""
    c, p = d.container, d.peers
    job, gate = held_job(d, provider_id)
    argv = [RELEASED, "upgrade", "--watch", f"{UPGRADE_WATCH_S}s", *args]
    running = subprocess.Popen(
        c.command(argv, env=OFFLINE_PIP),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        c.wait_for_state(UNIT, 900, ActiveState="deactivating")
        assert p.read(lambda coord: coord.jobs[job.job_id].terminal) is None
    finally:
        p.release(gate)
    stdout, stderr = running.communicate(timeout=900)
    done = subprocess.CompletedProcess(running.args, running.returncode, stdout, stderr)
    return done, job


def test_an_upgrade_dry_run_says_what_would_change_and_changes_nothing(
    deployment: Deployment,
) -> None:
    d, c = deployment, deployment.container
    pid = d.ensure_running()
    _, new_version = git_source.bump_version(d.source, "upgraded")  # a new commit upstream
    before = releases_now(c)
    done = upgrade(d, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"version {new_version}" in done.stdout
    assert "nothing was changed" in done.stdout.splitlines()[-1]
    assert releases_now(c) == before
    assert c.main_pid(UNIT) == pid


def test_upgrade_with_a_job_in_flight_runs_the_new_release_and_the_job_finishes(
    deployment: Deployment,
) -> None:
    d, c, p = deployment, deployment.container, deployment.peers
    old_pid = d.ensure_running()
    provider_id = p.record().provider_id
    old_version = d.status()["agent_version"]
    since = time.time()

    done, job = upgrade_with_a_job_in_flight(d, provider_id)

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(re.match(r"^\[ *\d+\.\ds\] [a-z ]+: ", line) for line in lines), lines
    new_version = lines[-1].rsplit("running ", 1)[1].split(" ")[0]
    assert new_version != old_version
    # The job in flight finished on the old code and its record reached the coordinator.
    finished = d.done(job.job_id)
    assert finished.tokens.output == p.vllm.tokens
    # The new release runs: the same identity, the new version at the coordinator, in `status`
    # and in /metrics' build_info.
    record = d.wait(
        lambda coord: next(
            (r for r in coord.agents.values() if r.connected and r.agent_version == new_version),
            None,
        ),
        "the new version authenticated",
        timeout=START_S,
    )
    assert record.provider_id == provider_id
    assert c.main_pid(UNIT) not in (0, old_pid)
    status = d.status()
    assert (status["agent_version"], status["provider_id"]) == (new_version, provider_id)
    url = f"http://127.0.0.1:{d.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        metrics = answer.read().decode()
    assert f'provider_agent_build_info{{version="{new_version}"}}' in metrics
    # The journal shows the switch.
    journal = c.journal(UNIT, since_realtime=since)
    assert f"upgrade: switching provider-agent from {old_version}" in journal, journal[-3000:]
    assert f"upgrade: provider-agent runs {new_version}" in journal, journal[-3000:]
    listed = d.agent("upgrade", "--list").stdout.splitlines()
    assert listed[1].startswith("*") and listed[1].endswith("current"), listed


def test_a_second_upgrade_to_the_running_commit_says_so_and_changes_nothing(
    deployment: Deployment,
) -> None:
    d, c = deployment, deployment.container
    pid = d.ensure_running()
    before = releases_now(c)
    done = upgrade(d)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].endswith(": nothing to do")
    assert "already running" in done.stdout
    assert releases_now(c) == before and c.main_pid(UNIT) == pid


def test_an_upgrade_whose_agent_exits_at_start_ends_with_the_old_one_running(
    deployment: Deployment,
) -> None:
    d, c, p = deployment, deployment.container, deployment.peers
    d.ensure_running()
    provider_id = p.record().provider_id
    version = d.status()["agent_version"]
    current_before = releases_now(c)[0]
    broken = commit_exit_at_start(d.source)
    since = time.time()

    done, job = upgrade_with_a_job_in_flight(d, provider_id, "--to", broken)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"upgrade: {version} ({broken[:12]}) did not come up healthy: ")
    assert "this release exits at start" in done.stderr
    assert done.stderr.rstrip().endswith(
        f"switched back to {version} ({current_before[-40:][:12]})"
    )
    # The job in flight at the time finished; the release before runs again.
    d.done(job.job_id)
    assert releases_now(c)[0] == current_before
    c.wait_for_state(UNIT, START_S, ActiveState="active", SubState="running")
    d.wait(lambda coord: coord.connected(), "the agent connected again", timeout=START_S)
    assert d.status()["agent_version"] == version
    journal = c.journal(UNIT, since_realtime=since)
    assert "did not come up healthy" in journal and "switching back to" in journal, journal[-3000:]
    assert "switched back: provider-agent runs" in journal


def test_no_billing_record_was_lost_through_the_upgrades(deployment: Deployment) -> None:
    d, p = deployment, deployment.peers
    d.ensure_running()
    provider_id = p.record().provider_id
    p.vllm.gate = None
    after = p.send_job(provider_id)  # and it serves
    d.done(after.job_id)
    poll(
        lambda: d.status()["outbox"]["depth"] == 0,
        30,
        "the outbox emptied",
        lambda: json.dumps(d.status()["outbox"]),
    )
    # Every job the coordinator has a job_done for is one row in the ledger, and the ledger has
    # no other.
    finished = p.read(
        lambda coord: {
            job_id
            for job_id, rec in coord.finished.items()
            if rec.provider_id == provider_id and isinstance(rec.terminal, JobDone)
        }
    )
    rows = ledger_rows(d)
    assert after.job_id in finished and len(finished) >= 3
    assert sorted(row["job_id"] for row in rows) == sorted(finished)
    assert {row["outcome"] for row in rows} == {"job_done"}
    assert not p.read(lambda coord: list(coord.violations))
