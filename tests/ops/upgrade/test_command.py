"""`upgrade` end to end, without systemd: real git repositories, real release builds (each its
own venv), the real agent of each release serving the reference coordinator and a simulated
backend, restarted by `tests/ops/supervisor.py` (the unit's contract kept in the test process).

The tests run in file order on one installation, each leaving the service running, as an
operator would use it: release A is installed; a dry run changes nothing; `upgrade` to B (a
version bump) with a job in flight runs B and the job finishes; a second `upgrade` says there is
nothing to do; `upgrade --to C` (whose agent exits at start) ends with B running again and the
reason, the job in flight at the time finished; `--list` shows them; `--rollback` goes back to A;
D, whose outbox schema A cannot open, needs `--yes`, runs, and leaves no way back (A is pruned).
No billing record is lost in any of it: the ledger holds exactly the coordinator's terminal
frames. The systemd side of the same story runs in a systemd container (tests/deploy).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from provider_agent.dev.coordinator import DevCoordinator, JobRecord
from provider_agent.dev.sim.core import SimBackend
from provider_agent.errors import UpgradeError
from provider_agent.link.protocol import JobDone
from provider_agent.ops.upgrade.build import Git, base_python, build, release_env
from provider_agent.ops.upgrade.command import (
    Installation,
    Machine,
    Options,
    Steps,
    _stop_on_sigterm,
    _Stopped,
    find_installation,
    list_releases,
    rollback,
    upgrade,
)
from provider_agent.ops.upgrade.releases import (
    Layout,
    current_commit,
    read_release,
    read_releases,
    running_release,
    switch,
)
from provider_agent.ops.upgrade.rules import UnitState
from provider_agent.ops.upgrade.unit_control import ServiceManager
from provider_agent.store.engine import FILE_NAME, file_schema
from tests import git_source
from tests.agent_harness import free_port, write_config
from tests.ops.upgrade.supervisor import Supervisor

MODEL: Final = "tiny-chat"
#: A job that streams for a few seconds: in flight while the restart drains it.
JOB_TOKENS: Final = 40
TOKENS_PER_S: Final = 10.0
WATCH: Final = Options(watch_s=5, keep=3)
EXIT_AT_START: Final = (
    "provider_agent/daemon.py",
    (
        'raise (78)."""\n',
        'raise (78)."""\n    import sys\n\n'
        '    print("this release exits at start", file=sys.stderr)\n    return 3\n',
    ),
)


@dataclass
class JobAtRestart:
    """The service manager, with a job sent to the agent just before each of the next
    `restarts` restarts and streaming when the restart is asked for."""

    inner: Supervisor
    portal: BlockingPortal
    coordinator: DevCoordinator
    restarts: int = 0
    jobs: list[JobRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def state(self) -> UnitState:
        return self.inner.state()

    def restart(self) -> None:
        if self.restarts > 0:
            self.restarts -= 1
            self.jobs.append(in_flight(self.portal, self.coordinator))
        self.inner.restart()

    def note(self, message: str) -> None:
        self.inner.note(message)

    def last_words(self, pid: int) -> str | None:
        return self.inner.last_words(pid)


def in_flight(portal: BlockingPortal, coordinator: DevCoordinator) -> JobRecord:
    """Send a job and return once its first bytes have reached the coordinator."""
    provider = portal.call(
        partial(coordinator.wait_for, lambda c: next(iter(c.connected()), None), timeout=60)
    )
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": JOB_TOKENS,
    }
    record = portal.call(partial(coordinator.send_job, provider, MODEL, request))
    portal.call(partial(coordinator.wait_for, lambda _: record.first_chunk_at, timeout=30))
    assert record.terminal is None
    return record


Command = Callable[[Installation, Options, Machine, Steps], None]


@dataclass
class Rig:
    portal: BlockingPortal
    coordinator: DevCoordinator
    origin: Path
    inst: Installation
    supervisor: Supervisor
    commits: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def machine(self, service: ServiceManager | None = None) -> Machine:
        return Machine(service=service or self.supervisor, poll_s=0.2)

    def run(
        self, command: Command, options: Options, service: ServiceManager | None = None
    ) -> list[str]:
        """Run `upgrade` or `rollback`; the step lines it printed."""
        lines: list[str] = []
        steps = Steps(time.monotonic, lines.append)
        try:
            command(self.inst, options, self.machine(service), steps)
        except UpgradeError as exc:
            raise Failed(str(exc), lines) from None
        return lines

    def running(self) -> str | None:
        """The commit of the release the service's process runs."""
        return running_release(self.inst.layout, self.supervisor.state().main_pid)

    def ready(self) -> None:
        """Wait until the service is READY and its agent authenticated."""
        self.supervisor.wait(lambda: self.supervisor.state().ready or None, 90, "READY")
        self.portal.call(partial(self.coordinator.wait_for, lambda c: c.connected(), timeout=60))


class Failed(Exception):
    def __init__(self, line: str, steps: list[str]) -> None:
        super().__init__(line)
        self.line = line
        self.steps = steps


def snapshot(layout: Layout) -> tuple[str | None, list[tuple[str, int, str | None]], list[str]]:
    releases = [(r.commit, r.installed_ms, r.failed) for r in read_releases(layout)]
    return current_commit(layout), releases, sorted(os.listdir(layout.releases))


def ledger_rows(state: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(f"{(state / FILE_NAME).as_uri()}?mode=ro", uri=True) as db:
        return db.execute("SELECT job_id, outcome FROM ledger ORDER BY id").fetchall()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("upgrade")
    origin = git_source.origin(base / "origin")
    checkout = git_source.checkout(origin, base / "opt-provider-agent")
    layout = Layout(checkout)
    a = git_source.head(checkout)
    built = build(
        layout, Git(checkout, os.environ), a, python=base_python(), env=os.environ, now_ms=1
    )
    switch(layout, a)
    with start_blocking_portal() as portal:
        coordinator = portal.call(DevCoordinator, "127.0.0.1", 0)
        portal.call(coordinator.start)
        sim = portal.call(
            partial(SimBackend, "vllm", [MODEL], tokens=JOB_TOKENS, tokens_per_s=TOKENS_PER_S)
        )
        portal.call(sim.start)
        etc = base / "etc"
        etc.mkdir()
        config = write_config(
            etc,
            coordinator.ws_url,
            backend_urls=(sim.base_url,),
            drain_timeout_s=30,
            prometheus_addr=f"127.0.0.1:{free_port()}",
        )
        inst = find_installation(
            str(config), str(checkout), allow_insecure=True, unit_path=base / "no-unit"
        )
        env = {
            k: v for k, v in release_env(os.environ).items() if not k.startswith("PROVIDER_AGENT")
        }
        supervisor = Supervisor(
            [str(layout.stable_executable), "--config", str(config), "--allow-insecure", "run"], env
        )
        supervisor.start()
        rig = Rig(portal, coordinator, origin, inst, supervisor)
        rig.commits["A"], rig.versions["A"] = a, built.release.version
        try:
            rig.ready()
            yield rig
        finally:
            supervisor.close()
            portal.call(sim.aclose)
            portal.call(coordinator.aclose)


def test_the_installation_runs_release_a(rig: Rig) -> None:
    assert rig.running() == rig.commits["A"]
    lines: list[str] = []
    list_releases(rig.inst, rig.machine(), lines.append)
    assert lines[1].startswith("* ") and rig.commits["A"][:12] in lines[1]
    assert lines[1].endswith("current")


def test_a_dry_run_says_what_would_change_and_changes_nothing(rig: Rig) -> None:
    rig.commits["B"], rig.versions["B"] = git_source.bump_version(rig.origin, "b")
    before = snapshot(rig.inst.layout)
    invocation = rig.supervisor.state().invocation

    lines = rig.run(upgrade, Options(dry_run=True))

    text = "\n".join(lines)
    assert (
        f"origin/main is {rig.commits['B'][:12]}, version {rig.versions['B']}; "
        f"running {rig.versions['A']} ({rig.commits['A'][:12]})"
    ) in text
    assert f"1 commit(s): {rig.commits['B'][:12]} version {rig.versions['B']}" in text
    assert "nothing was changed" in lines[-1]
    assert snapshot(rig.inst.layout) == before
    assert rig.supervisor.state().invocation == invocation  # not restarted
    assert rig.supervisor.notes == []


def test_upgrade_to_b_with_a_job_in_flight_runs_b_and_the_job_finishes(rig: Rig) -> None:
    service = JobAtRestart(rig.supervisor, rig.portal, rig.coordinator, restarts=1)

    lines = rig.run(upgrade, WATCH, service)

    steps = [line.split("] ", 1)[1].split(":", 1)[0] for line in lines]
    assert steps == [
        "fetch",
        "target",
        "changes",
        "build",
        "gate",
        "gate",
        "gate",
        "schema",
        "switch",
        "restart",
        "restart",
        "watch",
        "watch",
        "prune",
        "done",
    ]
    assert all(line.startswith("[") and "s] " in line for line in lines)
    assert lines[-1].endswith(f"done: running {rig.versions['B']} ({rig.commits['B'][:12]})")
    assert rig.running() == rig.commits["B"]
    assert current_commit(rig.inst.layout) == rig.commits["B"]
    (job,) = service.jobs
    assert isinstance(job.terminal, JobDone), job.terminal
    assert job.finished_at is not None and job.finished_at > rig.supervisor.restarts_asked[-1]
    assert rig.supervisor.notes[0].startswith(
        f"upgrade: switching provider-agent from {rig.versions['A']}"
    )
    assert rig.supervisor.notes[-1] == (
        f"upgrade: provider-agent runs {rig.versions['B']} ({rig.commits['B'][:12]})"
    )


def test_a_second_upgrade_to_the_running_commit_changes_nothing(rig: Rig) -> None:
    before = snapshot(rig.inst.layout)
    invocation = rig.supervisor.state().invocation
    lines = rig.run(upgrade, WATCH)
    assert lines[-1].endswith(
        f"done: already running {rig.versions['B']} ({rig.commits['B'][:12]}): nothing to do"
    )
    assert snapshot(rig.inst.layout) == before
    assert rig.supervisor.state().invocation == invocation


def test_an_upgrade_whose_agent_exits_at_start_ends_with_b_running_again(rig: Rig) -> None:
    path, edit = EXIT_AT_START
    rig.commits["C"] = git_source.commit(rig.origin, "an agent that exits at start", {path: edit})
    service = JobAtRestart(rig.supervisor, rig.portal, rig.coordinator, restarts=1)

    with pytest.raises(Failed) as caught:
        rig.run(upgrade, Options(to=rig.commits["C"][:10], watch_s=5), service)

    c = f"{rig.versions['B']} ({rig.commits['C'][:12]})"
    b = f"{rig.versions['B']} ({rig.commits['B'][:12]})"
    assert caught.value.line == (
        f"{c} did not come up healthy: the new process exited (exit status 3); systemd is "
        f"restarting it; its last line: this release exits at start; switched back to {b}"
    )
    steps = [line.split("] ", 1)[1] for line in caught.value.steps]
    assert steps[-4].startswith("watch: failed: the new process exited (exit status 3)")
    assert steps[-3] == f"rollback: current → {rig.commits['B'][:12]}"
    assert steps[-2].startswith(f"rollback: {rig.commits['B'][:12]} started (pid ")
    assert steps[-1].startswith(f"rollback: {rig.commits['B'][:12]} ready again after ")
    rig.ready()
    assert rig.running() == rig.commits["B"]
    assert current_commit(rig.inst.layout) == rig.commits["B"]
    failed = read_release(rig.inst.layout, rig.commits["C"])
    assert failed is not None and failed.failed is not None
    (job,) = service.jobs
    assert isinstance(job.terminal, JobDone), job.terminal
    assert rig.supervisor.notes[-2].startswith(f"upgrade: {c} did not come up healthy")
    assert rig.supervisor.notes[-1] == f"upgrade: switched back: provider-agent runs {b}"


def test_the_list_marks_the_running_release_and_the_failed_one(rig: Rig) -> None:
    lines: list[str] = []
    list_releases(rig.inst, rig.machine(), lines.append)
    rows = lines[1:-1]
    assert [row.lstrip("* ").split()[0] for row in rows] == [
        rig.commits[n][:12] for n in ("C", "B", "A")
    ]
    assert "rolled back: the new process exited" in rows[0]
    assert rows[1].startswith("*") and rows[1].endswith("current")


def test_rollback_by_hand_goes_back_to_a(rig: Rig) -> None:
    lines = rig.run(rollback, WATCH)
    assert lines[0].endswith(
        f"target: back from {rig.versions['B']} ({rig.commits['B'][:12]}) to "
        f"{rig.versions['A']} ({rig.commits['A'][:12]})"
    )
    assert rig.running() == rig.commits["A"]
    assert lines[-1].endswith(f"done: running {rig.versions['A']} ({rig.commits['A'][:12]})")
    with pytest.raises(Failed, match="no release before"):
        rig.run(rollback, WATCH)


def strict_schema_edit() -> dict[str, tuple[str, str]]:
    """A release whose outbox schema the earlier ones cannot open: one more migration, and
    READABLE_FROM raised to it."""
    return {
        "provider_agent/store/engine.py": (
            "\n)\nassert len(_SCHEMA) == SCHEMA_VERSION\n",
            '\n    """\n    CREATE TABLE payouts (id INTEGER PRIMARY KEY, amount INTEGER);\n'
            '    """,\n)\nassert len(_SCHEMA) == SCHEMA_VERSION\n',
        ),
    }


def test_a_release_past_which_there_is_no_way_back_needs_yes(rig: Rig) -> None:
    engine = rig.origin / "provider_agent/store/engine.py"
    version = int(engine.read_text().split("\nSCHEMA_VERSION = ", 1)[1].split("\n", 1)[0])
    edits = strict_schema_edit()
    path, (good, exits) = EXIT_AT_START
    edits[path] = (exits, good)  # C's agent exited at start: D's runs
    edits["provider_agent/__init__.py"] = (
        f'__version__ = "{rig.versions["B"]}"',
        f'__version__ = "{rig.versions["B"]}.d"',
    )
    text = engine.read_text()
    for old, new in (
        (f"SCHEMA_VERSION = {version}\n", f"SCHEMA_VERSION = {version + 1}\n"),
        (f"READABLE_FROM = {version}\n", f"READABLE_FROM = {version + 1}\n"),
    ):
        assert text.count(old) == 1
        text = text.replace(old, new)
    engine.write_text(text)
    rig.commits["D"] = git_source.commit(rig.origin, "an outbox schema 2 cannot read", edits)
    assert git_source.version(rig.origin) == f"{rig.versions['B']}.d"
    invocation = rig.supervisor.state().invocation

    with pytest.raises(Failed) as caught:
        rig.run(upgrade, Options(to=rig.commits["D"], watch_s=5))
    assert caught.value.line == (
        f"the target migrates the outbox to schema {version + 1}, which the running release "
        f"(schema {version}) cannot open: going back to it would be impossible; nothing "
        "switched: run again with --yes to accept that"
    )
    assert current_commit(rig.inst.layout) == rig.commits["A"]
    assert rig.supervisor.state().invocation == invocation

    lines = rig.run(upgrade, Options(to=rig.commits["D"], watch_s=5, yes=True))
    assert f"prune: removed {rig.commits['A'][:12]}; 3 release(s) kept (--keep 3)" in lines[-2]
    assert lines[-1].endswith(f"done: running {rig.versions['B']}.d ({rig.commits['D'][:12]})")
    assert file_schema(rig.inst.state_dir / FILE_NAME) == (version + 1, version + 1)
    with pytest.raises(Failed) as refused:
        rig.run(rollback, WATCH)
    assert refused.value.line.endswith(
        f"cannot open the outbox (schema {version + 1}, readable from {version + 1}; it knows "
        f"{version}): nothing switched"
    )
    assert rig.running() == rig.commits["D"]


def test_no_billing_record_was_lost(rig: Rig) -> None:
    finished = rig.coordinator.finished
    assert len(finished) == 2
    assert all(isinstance(job.terminal, JobDone) for job in finished.values())
    assert sorted(ledger_rows(rig.inst.state_dir)) == sorted((j, "job_done") for j in finished)
    rig.coordinator.assert_no_violations()


# --- the command line ----------------------------------------------------------------------------


def test_the_installation_is_found_from_the_installed_unit(rig: Rig, tmp_path: Path) -> None:
    layout = rig.inst.layout
    unit = tmp_path / "provider-agent.service"
    config = rig.inst.config_path
    unit.write_text(
        f"[Service]\nEnvironment=PROVIDER_AGENT_CONFIG={config}\n"
        f"ExecStart={layout.stable_executable} run\n"
    )
    found = find_installation(None, None, unit_path=unit)
    assert (found.layout, found.config_path) == (layout, config)
    assert (found.listen, found.state_dir) == (rig.inst.listen, rig.inst.state_dir)

    earlier = layout.root / ".venv/bin/provider-agent"
    unit.write_text(f"[Service]\nExecStart={earlier} run\n")
    with pytest.raises(UpgradeError) as caught:
        find_installation(str(config), None, unit_path=unit)
    assert str(caught.value) == (
        f"the service runs {earlier}, not a release: run `sudo {earlier} service install` "
        "once to move it to releases (README: Upgrading)"
    )
    with pytest.raises(UpgradeError, match="is not a release: install the service first"):
        find_installation(str(config), None, unit_path=tmp_path / "none", executable=earlier)
    found = find_installation(
        str(config), None, unit_path=tmp_path / "none", executable=layout.stable_executable
    )
    assert found.layout == layout


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT")}
    return subprocess.run(
        [sys.executable, "-m", "provider_agent", "upgrade", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--watch", "0s"], "--watch '0s': must be longer than 0"),
        (["--watch", "-5m"], "--watch '-5m': not a duration"),
        (["--watch", "2h"], "--watch '2h': at most 1h"),
        (["--keep", "0"], "--keep 0: keep at least 1 release"),
        (["--keep", "x"], "invalid int value"),
        (["--rollback", "--to", "main"], "not allowed with argument"),
        (["--install-dir", "/nonexistent-dir"], "no such directory"),
    ],
)
def test_bad_options_exit_2_in_one_line(args: list[str], why: str) -> None:
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1 and why in done.stderr


def test_without_systemd_or_root_the_command_says_so(rig: Rig) -> None:
    where = ["--install-dir", str(rig.inst.layout.root), "--config", str(rig.inst.config_path)]
    listed = cli(*where, "--list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[1].split()[0] == rig.commits["D"][:12] and rows[1].endswith("current")
    assert rig.commits["A"][:12] not in listed.stdout  # pruned: --keep 3 after D
    assert rows[-1] == "* none: the service is not running"  # no systemd to ask here
    done = cli(*where, "--dry-run")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    if os.geteuid() == 0 and not os.path.isdir("/run/systemd/system"):
        assert done.stderr == (
            "upgrade: systemd is not running on this machine (no /run/systemd/system)\n"
        )
    elif os.geteuid() != 0:
        assert "needs root" in done.stderr
    missing = cli("--install-dir", str(rig.inst.layout.root), "--config", "/nonexistent/agent.toml")
    assert missing.returncode == 78 and missing.stderr.startswith("config error: ")


def test_a_sigterm_while_the_target_builds_leaves_nothing_half_done(rig: Rig) -> None:
    """A real SIGTERM (what `systemctl stop` of a unit running `upgrade` sends, or `kill`) while
    the target's venv is being made: the command stops there, the half-built release is gone,
    nothing was switched or restarted; the next `upgrade` builds it whole and runs it."""
    e, version = git_source.bump_version(rig.origin, "e")
    layout = rig.inst.layout
    before = snapshot(layout)
    invocation = rig.supervisor.state().invocation
    building = layout.directory(e) / ".venv"
    done = threading.Event()

    def signal_while_building() -> None:
        while not done.wait(0.02):
            if building.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    ignore = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a late one: harmless
    killer = threading.Thread(target=signal_while_building)
    killer.start()
    try:
        with pytest.raises(_Stopped), _stop_on_sigterm():
            rig.run(upgrade, WATCH)
    finally:
        done.set()
        killer.join()
        signal.signal(signal.SIGTERM, ignore)
    assert not layout.directory(e).exists()
    assert snapshot(layout) == before
    assert rig.supervisor.state().invocation == invocation
    assert rig.running() == rig.commits["D"]

    lines = rig.run(upgrade, WATCH)
    assert lines[-1].endswith(f"done: running {version} ({e[:12]})")
    assert rig.running() == e
