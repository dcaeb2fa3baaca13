"""The systemd side: sd_notify on a real datagram socket, the unit file checked by systemd's own
tools, and the agent running under the unit's system-call sandbox (tests/unit_sandbox.py)."""

from __future__ import annotations

import ctypes.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from provider_agent.config.schema import StateConfig
from provider_agent.dev.coordinator import AgentRecord, DevCoordinator
from provider_agent.observe.systemd import Notifier
from provider_agent.ops.service import this_executable
from tests.agent_harness import agent_where, fake_vllm, write_config
from tests.unit_sandbox import unit_settings

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd/provider-agent.service"
README = REPO / "systemd/README.md"


# --- sd_notify ------------------------------------------------------------------------------------


class Listener:
    """systemd's end of NOTIFY_SOCKET: a bound unix datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def receive(self) -> str:
        return self.sock.recv(65536).decode()

    def pending(self) -> list[str]:
        found = []
        self.sock.setblocking(False)
        try:
            while True:
                found.append(self.receive())
        except BlockingIOError:
            return found
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield Listener(sock, str(path))


def test_messages_arrive_in_order(listener: Listener) -> None:
    notifier = Notifier.from_env(listener.env)
    assert notifier.enabled
    notifier.ready()
    notifier.status("authenticated; 3 models advertised")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    notifier.extend_timeout(90.5)
    notifier.close()

    received = [listener.receive() for _ in range(7)]
    reloading = received[2].split("\n")
    assert reloading[0] == "RELOADING=1"
    key, _, usec = reloading[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert received[:2] + received[3:] == [
        "READY=1",
        "STATUS=authenticated; 3 models advertised",
        "READY=1",
        "WATCHDOG=1",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=90500000",
    ]
    assert listener.pending() == []


def test_an_abstract_socket_is_reached_too() -> None:
    name = f"provider-agent-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": f"@{name}"})
        notifier.ready()
        assert sock.recv(100) == b"READY=1"


def test_odd_timeouts_are_bounded_or_dropped(listener: Listener) -> None:
    notifier = Notifier.from_env(listener.env)
    for seconds in (float("nan"), float("inf"), -5.0, 0.0, 1e30):
        notifier.extend_timeout(seconds)
    assert listener.pending() == [
        "EXTEND_TIMEOUT_USEC=1",
        "EXTEND_TIMEOUT_USEC=1",
        "EXTEND_TIMEOUT_USEC=86400000000",
    ]


def test_status_stays_one_line_and_bounded(listener: Listener) -> None:
    notifier = Notifier.from_env(listener.env)
    notifier.status("line one\nREADY=1\r\x00\x1b[31m" + "x" * 5000)
    message = listener.receive()
    assert "\n" not in message and "\x00" not in message and "\x1b" not in message
    assert message.startswith("STATUS=line one READY=1 [31m")
    assert len(message) <= len("STATUS=") + 1000


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "@"])
def test_without_a_usable_socket_every_call_is_a_no_op(value: str | None) -> None:
    notifier = Notifier.from_env({} if value is None else {"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    notifier.ready()
    notifier.status("x")
    notifier.reloading()
    notifier.stopping()
    notifier.extend_timeout(1)
    notifier.watchdog()


def test_a_dead_socket_never_raises_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.DEBUG, logger="provider_agent.observe.systemd"):
        for _ in range(3):
            notifier.watchdog()
        notifier.ready()
    records = [r for r in caplog.records if r.name == "provider_agent.observe.systemd"]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG


def test_a_full_socket_does_not_block_the_caller(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env(listener.env)

    def flood() -> None:
        for _ in range(5000):  # far beyond the receive queue (net.unix.max_dgram_qlen, 512)
            notifier.watchdog()

    with caplog.at_level(logging.DEBUG, logger="provider_agent.observe.systemd"):
        worker = threading.Thread(target=flood, daemon=True)
        worker.start()
        worker.join(timeout=30)
    assert not worker.is_alive(), "a send blocked"
    assert len([r for r in caplog.records if r.name == "provider_agent.observe.systemd"]) == 1
    assert listener.receive() == "WATCHDOG=1"


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_systemds_period(
    env: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval_s == interval


# --- the unit file --------------------------------------------------------------------------------


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip(
            "systemd-analyze is not installed and scripts/test could not install it "
            "(it needs root and apt-get)"
        )
    return found


def unit_copy(directory: Path, replace: tuple[str, str] | None = None) -> Path:
    """The shipped unit with ExecStart at this installation's provider-agent (which exists)."""
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={this_executable()}", UNIT.read_text(), flags=re.M)
    if replace is not None:
        text = text.replace(*replace)
    copy = directory / UNIT.name
    copy.write_text(text)
    return copy


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    done = subprocess.run(
        [analyze, "verify", str(unit_copy(tmp_path))], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


@pytest.mark.parametrize(
    "breakage",
    [
        ("KillMode=mixed", "KillMode=mixd"),  # a bad value: a warning, exit 0
        ("WatchdogSec=60", "WatchdogSecs=60"),  # an unknown key: a warning, exit 0
        ("ExecStart=", "ExecStart=/nonexistent/provider-agent #"),  # not executable: exit 1
    ],
)
def test_verify_catches_a_broken_copy(tmp_path: Path, breakage: tuple[str, str]) -> None:
    """The check above can fail: each of these makes verify speak up."""
    analyze = systemd_analyze()
    copy = unit_copy(tmp_path, breakage)
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 or done.stderr != ""


def test_the_unit_says_what_the_daemon_relies_on() -> None:
    settings = {key: values[-1] for key, values in unit_settings(UNIT).items()}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "DynamicUser": "yes",
        "StateDirectory": "provider-agent",
        "RestartPreventExitStatus": "78",
        "KillMode": "mixed",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Environment": "PROVIDER_AGENT_CONFIG=/etc/provider-agent/agent.toml",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
        "MemoryDenyWriteExecute": "yes",
        "DeviceAllow": "char-nvidia* rw",
        # config.md (settled): the jobs keep their descriptors whatever holds the metrics port.
        "LimitNOFILE": "65536",
    }
    assert {key: settings.get(key) for key in expected} == expected
    for key in (
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "LockPersonality",
    ):
        assert settings.get(key) == "yes", key
    assert "PrivateDevices" not in settings  # GPU telemetry opens /dev/nvidia*
    assert "LoadCredential" in settings
    default_drain = StateConfig().drain_timeout_s
    assert float(settings["TimeoutStopSec"]) > default_drain


def test_the_security_score_is_the_one_the_readme_quotes(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    if "--offline" in done.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    found = re.search(r"Overall exposure level for provider-agent\.service: (\d+\.\d)", done.stdout)
    assert found, done.stdout + done.stderr
    score = found.group(1)
    assert float(score) <= 2.0, done.stdout
    # The README quotes the score of one systemd version; others weigh the settings differently.
    quoted = re.search(
        r"\(systemd (\d+)\) scores the unit\s+\*\*(\d+\.\d) OK\*\*", README.read_text()
    )
    assert quoted, "systemd/README.md no longer quotes the score"
    version = subprocess.run(
        [analyze, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    if version == quoted.group(1):
        assert score == quoted.group(2), (
            f"the README quotes {quoted.group(2)}, systemd says {score}"
        )


# --- the agent under the unit's sandbox -----------------------------------------------------------


def sandbox_available() -> None:
    systemd_analyze()
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed (it comes with systemd)")


def sandboxed(*command: str, kill: bool = True) -> list[str]:
    flag = ["--kill"] if kill else []
    return [sys.executable, "-m", "tests.unit_sandbox", *flag, str(UNIT), "--", *command]


def test_the_sandbox_is_real() -> None:
    """Calls the unit forbids fail (or kill) under tests.unit_sandbox, so the test below means
    something."""
    sandbox_available()
    cases = {
        # @resources is taken out of @system-service: with --kill it is SIGSYS.
        "import os; os.sched_setaffinity(0, {0})": -signal.SIGSYS,
        # MemoryDenyWriteExecute=yes
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)": 1,
        # RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
        "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)": 1,
        "import socket; socket.socket(socket.AF_INET6).close()": 0,
    }
    for code, status in cases.items():
        done = subprocess.run(
            sandboxed(sys.executable, "-c", code), cwd=REPO, capture_output=True, check=False
        )
        assert done.returncode == status, (code, done.stderr)


async def test_the_agent_runs_under_the_units_sandbox(tmp_path: Path) -> None:
    """Handshake (Ed25519), discovery over HTTP, heartbeats, a SIGHUP reload and a SIGTERM drain,
    under @system-service minus @privileged @resources (a call outside kills the process),
    MemoryDenyWriteExecute and the address-family restriction."""
    sandbox_available()
    first, second = "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct"
    stderr = bytearray()
    async with (
        DevCoordinator(host="127.0.0.1", port=0) as coord,
        fake_vllm(first) as vllm,
    ):
        config = write_config(
            tmp_path, coord.ws_url, backend_urls=(vllm.url,), heartbeat_interval_s=1
        )
        command = sandboxed(
            sys.executable, "-m", "provider_agent", "run", "--config", str(config),
            "--allow-insecure",
        )  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PROVIDER_AGENT_ENROLLMENT_CODE", None)

        def advertised(record: AgentRecord) -> list[str]:
            offers = record.capabilities.models if record.capabilities else []
            return sorted(offer.model_id for offer in offers)

        async with (
            await anyio.open_process(command, cwd=REPO, env=env) as process,
            anyio.create_task_group() as group,
        ):

            async def collect() -> None:
                assert process.stderr is not None
                async for chunk in process.stderr:
                    stderr.extend(chunk)

            group.start_soon(collect)
            try:
                await agent_where(
                    coord,
                    lambda r: advertised(r) == [first] and r.heartbeat_count >= 2,
                    timeout=30,
                )
                vllm.models.append(second)
                process.send_signal(signal.SIGHUP)  # reload: a new discovery pass
                await agent_where(
                    coord, lambda r: advertised(r) == sorted([first, second]), timeout=30
                )
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    log = stderr.decode(errors="replace")
    assert code == 0, log
    assert "config reloaded" in log
    assert "Operation not permitted" not in log and "Traceback" not in log
    assert coord.attempts[-1].close_code == 1001
