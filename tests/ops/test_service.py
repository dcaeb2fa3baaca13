"""`provider-agent service install|uninstall`, into temporary roots.

systemd is not PID 1 here, so what systemctl and groupadd would do is played by `FakeSystem`
(which answers `is-enabled`/`is-active` from what earlier calls did); everything else is real:
real files and modes under a temporary root, the real shipped unit, the real config validation,
`systemd-analyze verify` on the installed unit, and the real command line in a subprocess.
Install runs as a release's `provider-agent` (`installed`, a release that is its record and a
script) unless a test says otherwise; the move of a checkout's install to releases builds a real
release from a real git checkout.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from provider_agent.config import load as config_module
from provider_agent.errors import ConfigError, ServiceError
from provider_agent.link.identity import load_or_create
from provider_agent.ops.init_config import Detected
from provider_agent.ops.service import (
    CONFIG_GROUP,
    DEFAULT_CONFIG,
    TEMPLATE,
    CommandResult,
    Host,
    Target,
    build_first_release,
    install,
    render_unit,
    system_config,
    uninstall,
)
from provider_agent.ops.upgrade.releases import (
    Layout,
    Release,
    current_commit,
    read_releases,
    switch,
    write_release,
)
from tests import git_source

#: The release install runs as in most tests (`installed`): where the unit's ExecStart points.
INSTALLED: dict[str, Path] = {}
RELEASE = Release(
    commit="c0" * 20, version="0.1.0", schema_version=2, readable_from=2, installed_ms=1
)


@pytest.fixture(autouse=True, scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt/provider-agent as a release leaves it: releases/<commit>/ with its record and an
    executable, `current` pointing at it."""
    layout = Layout(tmp_path_factory.mktemp("opt") / "provider-agent")
    script = layout.executable(RELEASE.commit)
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    write_release(layout, RELEASE)
    switch(layout, RELEASE.commit)
    INSTALLED["exe"] = layout.stable_executable
    return layout.stable_executable


def exe() -> Path:
    return INSTALLED["exe"]


DETECTED = [Detected("vllm", "http://127.0.0.1:8000", ["meta-llama/Llama-3.1-8B-Instruct"])]
#: A config an operator might have written: a real coordinator, one backend, a custom price.
OPERATOR_CONFIG = """\
# mine: do not touch
[coordinator]
url = "wss://coordinator.example.net/provider/connect"
[identity]
key_path = "/var/lib/provider-agent/identity.key"
[[backends]]
kind = "ollama"
url = "http://127.0.0.1:11434"
[pricing]
default_input_per_1m = 111111
default_output_per_1m = 222222
[state]
dir = "/var/lib/provider-agent"
"""
QUERIES = frozenset({"is-enabled", "is-active"})
#: The gid the fake groupadd hands out: ours, so that the fake chown can really set it unprivileged.
GID = os.getgid()


@dataclass
class FakeSystem:
    """systemctl and groupadd as a machine with systemd would answer them."""

    enabled: bool = False
    active: bool = False
    groups: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    chowned: list[tuple[Path, int, int]] = field(default_factory=list)
    failing: str | None = None  # a systemctl verb that fails

    def run(self, argv: Sequence[str]) -> CommandResult:
        call = tuple(argv)
        self.calls.append(call)
        if call[0] == "groupadd":
            self.groups[call[-1]] = GID
            return CommandResult(0, "")
        assert call[0] == "systemctl", call
        verb = call[1]
        if verb == self.failing:
            return CommandResult(1, "Failed to enable unit: Access denied")
        if verb in QUERIES:
            on = self.enabled if verb == "is-enabled" else self.active
            return CommandResult(0 if on else 1, "")
        if verb in ("enable", "disable"):
            self.enabled = verb == "enable"
            if "--now" in call:
                self.active = verb == "enable"
        return CommandResult(0, "")

    def chown(self, path: Path, uid: int, gid: int) -> None:
        """Records the call; sets the group (the owner stays: that would need root)."""
        self.chowned.append((path, uid, gid))
        os.chown(path, -1, gid)

    @property
    def changes(self) -> list[tuple[str, ...]]:
        """The calls that change something (not the is-enabled/is-active queries)."""
        return [c for c in self.calls if not (c[0] == "systemctl" and c[1] in QUERIES)]

    def host(self, detected: Sequence[Detected] = DETECTED) -> Host:
        return Host(
            run=self.run,
            euid=0,
            group_id=self.groups.get,
            chown=self.chown,
            detect=lambda: list(detected),
            installation=lambda _: [],
            booted=lambda: True,
            executable=exe,
            first_release=self.first_release,
        )

    def first_release(self, layout: Layout, commit: str) -> Release:
        """The real build, recorded."""
        self.calls.append(("build", str(layout.root), commit))
        return build_first_release(layout, commit)


def root_target(root: Path, config: str = "/etc/provider-agent/agent.toml") -> Target:
    """`--root DIR`: files only."""
    return Target(root=root, manage=False, config=PurePosixPath(config))


def managed_target(root: Path) -> Target:
    """As without --root (systemctl, groups, ownership), with the files still under `root`."""
    return Target(root=root, manage=True)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path under `root` with its mode, inode, mtime and contents."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_ino, info.st_mtime_ns, data)
    return found


def cli(*args: str, user: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROVIDER_AGENT_CONFIG"}
    return subprocess.run(
        [*user, sys.executable, "-m", "provider_agent", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- what --root installs -------------------------------------------------------------------------


def test_root_install_writes_the_unit_the_config_and_the_directory(tmp_path: Path) -> None:
    report = install(root_target(tmp_path), FakeSystem().host())

    unit = tmp_path / "etc/systemd/system/provider-agent.service"
    text = unit.read_text()
    assert f"\nExecStart={exe()} run\n" in text
    assert "\nEnvironment=PROVIDER_AGENT_CONFIG=/etc/provider-agent/agent.toml\n" in text
    # Descriptors enough for every job whatever connects to the metrics port (config.md).
    assert "\nLimitNOFILE=65536\n" in text
    # Everything else is the shipped unit, line for line.
    template = TEMPLATE.read_text().splitlines()
    changed = [(a, b) for a, b in zip(template, text.splitlines(), strict=True) if a != b]
    assert [b for _, b in changed] == [f"ExecStart={exe()} run"]
    assert mode(unit) == 0o644

    assert mode(tmp_path / "etc/provider-agent") == 0o750
    written = tmp_path / "etc/provider-agent/agent.toml"
    assert mode(written) == 0o640
    loaded = config_module.load(written)
    assert loaded.identity.key_path == Path("/var/lib/provider-agent/identity.key")
    assert loaded.state.dir == Path("/var/lib/provider-agent")
    assert [(b.kind, str(b.url)) for b in loaded.backends] == [("vllm", "http://127.0.0.1:8000")]
    assert "# Coordinator" in written.read_text() or "# The marketplace" in written.read_text()
    assert any("1 backend(s) found" in line for line in report.lines)
    assert any("systemctl enable --now provider-agent" in line for line in report.lines)


def test_the_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (scripts/test installs it when it can)")
    install(root_target(tmp_path), FakeSystem().host())
    unit = tmp_path / "etc/systemd/system/provider-agent.service"
    done = subprocess.run(
        [analyze, "verify", str(unit)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == "", "verify warns: " + done.stderr


def test_a_custom_config_path_goes_into_the_unit(tmp_path: Path) -> None:
    install(root_target(tmp_path, "/srv/agent/agent.toml"), FakeSystem().host())
    unit = (tmp_path / "etc/systemd/system/provider-agent.service").read_text()
    assert "\nEnvironment=PROVIDER_AGENT_CONFIG=/srv/agent/agent.toml\n" in unit
    assert mode(tmp_path / "srv/agent") == 0o750
    config_module.load(tmp_path / "srv/agent/agent.toml")


def test_the_system_config_is_what_init_writes_with_system_paths() -> None:
    text = system_config(DETECTED)
    loaded = config_module.parse(text)
    assert loaded.identity.key_path == Path("/var/lib/provider-agent/identity.key")
    assert loaded.state.dir == Path("/var/lib/provider-agent")
    assert loaded.backends[0].kind == "vllm"
    assert "CHANGE ME" in text  # init's placeholder coordinator, marked for the operator


# --- idempotency, and what is never touched -------------------------------------------------------


def test_a_second_install_changes_nothing_and_says_so(tmp_path: Path) -> None:
    install(root_target(tmp_path), FakeSystem().host())
    before = snapshot(tmp_path)
    report = install(root_target(tmp_path), FakeSystem().host())
    assert snapshot(tmp_path) == before
    assert "unchanged" in report.lines[0]


def test_a_changed_unit_is_replaced_and_a_loose_directory_tightened(tmp_path: Path) -> None:
    install(root_target(tmp_path), FakeSystem().host())
    unit = tmp_path / "etc/systemd/system/provider-agent.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=60", "WatchdogSec=5"))
    os.chmod(tmp_path / "etc/provider-agent", 0o755)
    report = install(root_target(tmp_path), FakeSystem().host())
    assert "WatchdogSec=60" in unit.read_text()
    assert mode(tmp_path / "etc/provider-agent") == 0o750
    assert any("replace the changed" in line for line in report.lines)


def test_an_existing_config_and_identity_key_are_never_touched(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc/provider-agent"
    config_dir.mkdir(parents=True, mode=0o750)
    config = config_dir / "agent.toml"
    config.write_text(OPERATOR_CONFIG)
    os.chmod(config, 0o600)
    key = tmp_path / "var/lib/provider-agent/identity.key"
    load_or_create(key)
    kept = {p: (p.read_bytes(), p.stat()) for p in (config, key)}

    report = install(root_target(tmp_path), FakeSystem().host())

    for path, (data, info) in kept.items():
        now = path.stat()
        assert path.read_bytes() == data
        assert (now.st_mode, now.st_ino, now.st_mtime_ns) == (
            info.st_mode,
            info.st_ino,
            info.st_mtime_ns,
        )
    assert any("kept as it is (valid, 1 backend(s))" in line for line in report.lines)


def test_an_existing_config_dir_of_someone_else_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir(mode=0o755)
    os.chmod(tmp_path / "srv", 0o755)
    (tmp_path / "srv/agent.toml").write_text(OPERATOR_CONFIG)
    install(root_target(tmp_path, "/srv/agent.toml"), FakeSystem().host())
    assert mode(tmp_path / "srv") == 0o755


# --- a broken config stops everything -------------------------------------------------------------

BROKEN = {
    "syntax": b"[coordinator\nurl = 1\n",
    "wrong type": b"[coordinator]\nurl = 5\n[pricing]\ndefault_input_per_1m = 1\n",
    "insecure": OPERATOR_CONFIG.replace("wss://", "ws://").encode(),
    "empty": b"",
    "not utf-8": OPERATOR_CONFIG.encode("utf-16"),
    "control characters": OPERATOR_CONFIG.replace("ollama", "oll\x01ama").encode(),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_config_stops_the_install_with_78_before_anything(
    tmp_path: Path, case: str
) -> None:
    config = tmp_path / "etc/provider-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_bytes(BROKEN[case])
    before = snapshot(tmp_path)

    done = cli("service", "install", "--root", str(tmp_path))

    assert done.returncode == 78, done.stderr
    assert done.stderr.startswith("config error: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before  # no unit, no mode change

    system = FakeSystem()
    with pytest.raises(ConfigError):
        install(managed_target(tmp_path), system.host())
    assert system.changes == []  # no group, no daemon-reload, nothing enabled


# --- dry run, root, and the systemctl calls -------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    system = FakeSystem()
    report = install(managed_target(tmp_path), system.host(), dry_run=True)
    assert list(tmp_path.iterdir()) == []
    assert system.changes == [] and system.chowned == []
    text = "\n".join(report.lines)
    assert "dry run, nothing written" in text
    for step in (
        f"create the system group {CONFIG_GROUP}",
        "create /etc/provider-agent/ (0750",
        "write /etc/provider-agent/agent.toml",
        "write /etc/systemd/system/provider-agent.service",
        "systemctl daemon-reload",
    ):
        assert step in text


def test_not_root_without_root_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    host = FakeSystem().host()
    host.euid = 1000
    with pytest.raises(ServiceError, match="needs root"):
        install(Target(root=tmp_path, manage=True), host)
    with pytest.raises(ServiceError, match="needs root"):
        uninstall(Target(root=tmp_path, manage=True), host)
    assert list(tmp_path.iterdir()) == []


def test_a_machine_without_systemd_is_refused_before_anything(tmp_path: Path) -> None:
    system = FakeSystem()
    host = system.host()
    host.booted = lambda: False
    for command in (install, uninstall):
        with pytest.raises(ServiceError, match="systemd is not running on this machine"):
            command(managed_target(tmp_path), host)
    assert system.calls == [] and list(tmp_path.iterdir()) == []


def test_not_root_on_the_command_line_exits_1() -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*nobody, sys.executable, "-c", "pass"], check=False).returncode != 0:
        pytest.skip("this Python cannot run as nobody here")
    probe = [*nobody, sys.executable, "-c", "import provider_agent"]
    if subprocess.run(probe, check=False, capture_output=True).returncode != 0:
        pytest.skip("nobody cannot read this checkout (e.g. a clone inside a 0700 directory)")
    for action in ("install", "uninstall"):
        done = cli("service", action, user=nobody)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert "needs root" in done.stderr and done.stdout == ""


def test_a_first_install_creates_the_group_enables_and_starts(tmp_path: Path) -> None:
    config = tmp_path / "etc/provider-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text(OPERATOR_CONFIG)
    os.chmod(config, 0o644)
    system = FakeSystem()
    install(managed_target(tmp_path), system.host())
    assert system.changes == [
        ("groupadd", "--system", CONFIG_GROUP),
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "--now", "provider-agent"),
    ]
    assert system.chowned == [(tmp_path / "etc/provider-agent", 0, GID)]
    # The second run: nothing to do, not even a daemon-reload.
    system.calls.clear()
    report = install(managed_target(tmp_path), system.host())
    assert system.changes == []
    assert "unchanged" in report.lines[0]


def test_a_fresh_config_is_enabled_but_not_started_until_it_is_edited(tmp_path: Path) -> None:
    system = FakeSystem(groups={CONFIG_GROUP: GID})
    report = install(managed_target(tmp_path), system.host())
    assert system.changes == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "provider-agent"),
    ]
    config = tmp_path / "etc/provider-agent/agent.toml"
    assert (config, 0, GID) in system.chowned
    assert any("not started: set [coordinator] url" in line for line in report.lines)


def test_no_start_enables_only(tmp_path: Path) -> None:
    (tmp_path / "etc/provider-agent").mkdir(parents=True)
    (tmp_path / "etc/provider-agent/agent.toml").write_text(OPERATOR_CONFIG)
    system = FakeSystem(groups={CONFIG_GROUP: GID})
    install(managed_target(tmp_path), system.host(), start=False)
    assert ("systemctl", "enable", "provider-agent") in system.changes
    assert not system.active


def test_a_changed_unit_restarts_the_service_only_when_it_runs(tmp_path: Path) -> None:
    (tmp_path / "etc/provider-agent").mkdir(parents=True)
    (tmp_path / "etc/provider-agent/agent.toml").write_text(OPERATOR_CONFIG)
    running = FakeSystem(groups={CONFIG_GROUP: GID})
    install(managed_target(tmp_path), running.host())
    unit = tmp_path / "etc/systemd/system/provider-agent.service"

    unit.write_text("[Service]\nExecStart=/old/provider-agent run\n")
    running.calls.clear()
    install(managed_target(tmp_path), running.host())
    assert running.changes == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "try-restart", "provider-agent"),
    ]

    unit.write_text("[Service]\nExecStart=/old/provider-agent run\n")
    stopped = FakeSystem(enabled=True, active=False, groups={CONFIG_GROUP: GID})
    report = install(managed_target(tmp_path), stopped.host())
    assert stopped.changes == [("systemctl", "daemon-reload")]
    assert any("enabled but not running" in line for line in report.lines)


def test_an_unreadable_existing_config_is_opened_to_the_service_group(tmp_path: Path) -> None:
    config = tmp_path / "etc/provider-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text(OPERATOR_CONFIG)
    os.chmod(config, 0o600)
    system = FakeSystem(groups={CONFIG_GROUP: GID})
    install(managed_target(tmp_path), system.host())
    assert (config, 0, GID) in system.chowned
    assert mode(config) == 0o640
    assert config.read_text() == OPERATOR_CONFIG


def test_a_failing_systemctl_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "etc/provider-agent").mkdir(parents=True)
    (tmp_path / "etc/provider-agent/agent.toml").write_text(OPERATOR_CONFIG)
    system = FakeSystem(groups={CONFIG_GROUP: GID}, failing="enable")
    with pytest.raises(ServiceError) as caught:
        install(managed_target(tmp_path), system.host())
    assert str(caught.value) == (
        "systemctl enable --now provider-agent failed: Failed to enable unit: Access denied"
    )


# --- paths a unit cannot hold or the service cannot reach ----------------------------------------


@pytest.mark.parametrize("name", ["my agent", "100%", "a$b", 'q"uote', "back\\slash", "tab\there"])
def test_paths_systemd_would_misread_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ServiceError, match="cannot go into a unit file"):
        install(root_target(tmp_path, f"/etc/{name}/agent.toml"), FakeSystem().host())
    venv = tmp_path / name / "bin"
    venv.mkdir(parents=True)
    script = venv / "provider-agent"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    with pytest.raises(ServiceError, match="cannot go into a unit file"):
        install(root_target(tmp_path), FakeSystem().host(), executable=script)
    assert not (tmp_path / "etc").exists()


def test_an_installation_the_service_cannot_reach_is_refused(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "bin").mkdir(parents=True)
    script = closed / "bin/provider-agent"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    closed.chmod(0o700)
    host = FakeSystem().host()
    host.installation = lambda exe: [exe]
    with pytest.raises(ServiceError, match=r"\(mode 0700\) is closed to other users"):
        install(managed_target(tmp_path), host, executable=script)
    host.installation = lambda _: [Path("/home/op/provider-agent/.venv/bin/provider-agent")]
    with pytest.raises(ServiceError, match="under /home"):
        install(managed_target(tmp_path), host, executable=script)
    missing = tmp_path / "nowhere/provider-agent"
    with pytest.raises(ServiceError, match="scripts/install"):
        install(root_target(tmp_path), FakeSystem().host(), executable=missing)


# --- uninstall ------------------------------------------------------------------------------------


def test_uninstall_removes_the_unit_and_keeps_config_identity_and_state(tmp_path: Path) -> None:
    install(root_target(tmp_path), FakeSystem().host())
    key = tmp_path / "var/lib/provider-agent/identity.key"
    load_or_create(key)
    outbox = tmp_path / "var/lib/provider-agent/outbox.sqlite3"
    outbox.write_bytes(b"undelivered")
    config = tmp_path / "etc/provider-agent/agent.toml"
    kept = {p: p.read_bytes() for p in (key, outbox, config)}

    done = cli("service", "uninstall", "--root", str(tmp_path))

    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "etc/systemd/system/provider-agent.service").exists()
    assert {p: p.read_bytes() for p in kept} == kept
    for where in ("/etc/provider-agent/", "/var/lib/provider-agent/identity.key"):
        assert where in done.stdout
    assert "undelivered billing records" in done.stdout

    again = cli("service", "uninstall", "--root", str(tmp_path))
    assert again.returncode == 0 and "not installed" in again.stdout


def test_uninstall_stops_and_disables_a_running_service(tmp_path: Path) -> None:
    (tmp_path / "etc/provider-agent").mkdir(parents=True)
    (tmp_path / "etc/provider-agent/agent.toml").write_text(OPERATOR_CONFIG)
    system = FakeSystem(groups={CONFIG_GROUP: GID})
    install(managed_target(tmp_path), system.host())
    system.calls.clear()
    uninstall(managed_target(tmp_path), system.host())
    assert system.changes == [
        ("systemctl", "disable", "--now", "provider-agent"),
        ("systemctl", "daemon-reload"),
    ]
    assert not system.active and not system.enabled
    assert (tmp_path / "etc/provider-agent/agent.toml").read_text() == OPERATOR_CONFIG


def test_the_command_line_installs_under_a_root(tmp_path: Path) -> None:
    (tmp_path / "etc/provider-agent").mkdir(parents=True)
    (tmp_path / "etc/provider-agent/agent.toml").write_text(OPERATOR_CONFIG)
    done = cli("service", "install", "--root", str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would:" in done.stdout
    assert not (tmp_path / "etc/systemd").exists()
    done = cli("service", "install", "--root", str(tmp_path), "--no-start")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "etc/systemd/system/provider-agent.service").exists()
    assert done.stderr == ""


# --- --root must be a directory other than / (cli.md, settled 2026-12-06) ------------------------

LIVE_UNIT = Path("/etc/systemd/system/provider-agent.service")
#: --root values that mean this machine's own / (were the check to regress, a real install would
#: act on it: install is tried with --dry-run only, which refuses the same way; uninstall only
#: where no unit is installed here, so that there is nothing it could remove).
LIVE_ROOTS = [
    ("", "is empty"),
    ("  ", "is empty"),
    ("/", "is / itself"),
    ("//", "is / itself"),
    ("{t}/..{t_parents}", "is / itself"),
    ("{t}/to-root", "is / itself"),
]
OTHER_ROOTS = [("{t}/missing", "no such directory"), ("{t}/file", "is not a directory")]
ACTIONS = [("install", "--dry-run"), ("install", "--no-start"), ("uninstall",)]


@pytest.mark.parametrize(
    ("root", "fragment", "action"),
    [(*root, ("install", "--dry-run")) for root in LIVE_ROOTS]
    + [
        pytest.param(
            *root,
            ("uninstall",),
            marks=pytest.mark.skipif(LIVE_UNIT.exists(), reason="a live unit is installed"),
        )
        for root in LIVE_ROOTS
    ]
    + [(*root, action) for root in OTHER_ROOTS for action in ACTIONS],
)
def test_a_root_that_is_not_a_directory_other_than_slash_exits_2_and_writes_nothing(
    tmp_path: Path, root: str, fragment: str, action: tuple[str, ...]
) -> None:
    """`--root ""` used to install into the live /. Nothing is written, nothing is removed."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "to-root").symlink_to("/")
    value = root.format(t=tmp_path, t_parents="/.." * len(tmp_path.parts))
    before = snapshot(tmp_path)
    live_before = LIVE_UNIT.exists(), Path("/etc/provider-agent").exists()
    done = cli("service", *action, "--root", value)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"service {action[0]}: --root ") and fragment in done.stderr
    assert snapshot(tmp_path) == before
    assert (LIVE_UNIT.exists(), Path("/etc/provider-agent").exists()) == live_before


# --- releases: the first one built from a checkout, an earlier install moved to them -------------


def checkout_install(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout as README leaves it before releases: a clone with its own `.venv` (only the
    script's path matters to install: it says where the checkout is)."""
    origin = git_source.origin(tmp_path / "origin")
    checkout = git_source.checkout(origin, tmp_path / "opt/provider-agent")
    script = checkout / ".venv/bin/provider-agent"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    return checkout, script


def test_an_install_of_the_earlier_layout_moves_to_releases_once(tmp_path: Path) -> None:
    """The unit ran the checkout's `.venv`: install builds the first release from the
    checkout's HEAD, points the unit at `current`, restarts the running service (draining);
    a second run changes nothing."""
    checkout, script = checkout_install(tmp_path)
    head = git_source.head(checkout)
    root = tmp_path / "root"
    config = root / "etc/provider-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text(OPERATOR_CONFIG)
    unit = root / "etc/systemd/system/provider-agent.service"
    unit.parent.mkdir(parents=True)
    earlier = render_unit(TEMPLATE.read_text(), script, PurePosixPath(DEFAULT_CONFIG))
    unit.write_text(earlier)
    system = FakeSystem(enabled=True, active=True, groups={CONFIG_GROUP: GID})
    host = system.host()
    host.executable = lambda: script
    layout = Layout(checkout)

    plan = install(managed_target(root), host, dry_run=True)
    text = "\n".join(plan.lines)
    assert f"build the first release from {checkout}'s HEAD {head[:12]}, version " in text
    assert f"moved to releases: the unit ran {script}, now {layout.stable_executable}" in text
    assert not layout.releases.exists() and unit.read_text() == earlier

    report = install(managed_target(root), host)

    assert system.changes == [
        ("build", str(checkout), head),
        ("systemctl", "daemon-reload"),
        ("systemctl", "try-restart", "provider-agent"),
    ]
    assert current_commit(layout) == head
    (release,) = read_releases(layout)
    assert f"\nExecStart={layout.stable_executable} run\n" in unit.read_text()
    done = subprocess.run(
        [str(layout.stable_executable), "--version"], capture_output=True, text=True, check=False
    )
    assert done.stdout == f"provider-agent {release.version}\n"
    assert any(line.startswith("  build the first release") for line in report.lines)

    system.calls.clear()
    again = install(managed_target(root), host)
    assert system.changes == []
    assert again.lines[0].endswith("unchanged (already installed as it should be)")
    assert f"releases: current is {head[:12]} ({release.version})" in "\n".join(again.lines)
    assert read_releases(layout) == [release]


def test_a_checkout_that_is_not_a_git_repository_is_refused(tmp_path: Path) -> None:
    bare = tmp_path / "opt/provider-agent"
    script = bare / ".venv/bin/provider-agent"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    host = FakeSystem(groups={CONFIG_GROUP: GID}).host()
    host.executable = lambda: script
    with pytest.raises(ServiceError) as caught:
        install(managed_target(tmp_path / "root"), host)
    assert str(caught.value) == (
        f"{bare} is not a git checkout: the service runs releases built from its commits; "
        "install from a clone of the repository (README: Install)"
    )
    assert not (bare / "releases").exists()


def test_root_installs_build_no_release_and_say_where_it_comes_from(tmp_path: Path) -> None:
    checkout, script = checkout_install(tmp_path)
    report = install(root_target(tmp_path / "root"), FakeSystem().host(), executable=script)
    unit = (tmp_path / "root/etc/systemd/system/provider-agent.service").read_text()
    assert f"\nExecStart={checkout}/current/.venv/bin/provider-agent run\n" in unit
    assert not (checkout / "releases").exists()
    assert any(f"no release in {checkout}/releases yet" in line for line in report.lines)
