"""`provider-agent upgrade`: a new release built beside the running one, gated, switched with a
drain, watched — and switched back by itself when it does not come up healthy.

    fetch → target → changes → build → gate → schema → switch → restart → watch → prune
                                                                  └─ failed: switch back, restart

- **build** (`build.build`): releases/<commit>/ with its own venv; the running agent is
  not touched.
- **gate**: the new code's `--version`; `validate` of the service's config; `selftest --local
  --json`, one tiny completion per local route recording nothing. Any failure stops here, with
  nothing switched.
- **schema**: the target must open the outbox as it is; when the release before it could not
  open the outbox once the target has run (`rules.schema_plan`), `--yes` is asked for.
- **switch**: `current` → the new release (`releases.switch`, one rename), a journal line, then a
  restart through the service manager: SIGTERM, the old process drains its jobs (nothing lost),
  the new one starts from `current`.
- **watch** (`rules.judge` over what is polled): READY, `/readyz` 200 and an
  authenticated session of the new version within `--watch`, and no restart in that window.
  Otherwise `current` goes back, the service restarts, and the command says why in one line and
  exits 1.

`--rollback` runs the same switch and watch to the release before the current one (gated first:
the older code must accept today's config); `--list` shows the releases. Each step prints one
line with the time since the command started. Everything outside files and git goes through
`Machine`, whose service manager a test may replace (`unit_control.ServiceManager`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from provider_agent.clock import human_duration
from provider_agent.config import load as config_module
from provider_agent.errors import ExitCode, OutboxError, UpgradeError
from provider_agent.ops.service import (
    DEFAULT_CONFIG,
    UNIT_DIR,
    UNIT_NAME,
    configured_path,
    exec_start,
    this_executable,
)
from provider_agent.ops.upgrade.build import (
    Git,
    base_python,
    build,
    describe,
    last_line,
    release_env,
)
from provider_agent.ops.upgrade.releases import (
    Layout,
    Release,
    current_commit,
    layout_of,
    mark_failed,
    previous,
    read_release,
    read_releases,
    remove,
    render_list,
    running_release,
    short,
    switch,
    to_prune,
    write_release,
)
from provider_agent.ops.upgrade.rules import (
    Expect,
    HttpView,
    Observation,
    SchemaPlan,
    Verdict,
    changes,
    gate_selftest,
    judge,
    parse_watch,
    schema_plan,
)
from provider_agent.ops.upgrade.unit_control import (
    ServiceManager,
    Systemd,
    backend_health,
    probe_http,
)
from provider_agent.safe_text import printable
from provider_agent.store.engine import FILE_NAME, file_schema, readable_by

DEFAULT_WATCH_S: Final = 120.0
DEFAULT_KEEP: Final = 3
#: Beyond `[state] drain_timeout_s`: the old process's exit and the new one's first line.
STOP_MARGIN_S: Final = 60.0
GATE_TIMEOUT_S: Final = 60.0
#: The selftest's completions take up to 30 s each (selftest.DEADLINE_MS), one at a time.
SELFTEST_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True)
class Installation:
    """Where the releases live and what the service runs with."""

    layout: Layout
    config_path: Path
    #: The agent's HTTP endpoint ([observability] prometheus_addr); None: disabled.
    listen: tuple[str, int] | None
    state_dir: Path
    drain_timeout_s: float
    #: Passed on to the gate's validate and selftest (a ws:// coordinator in tests).
    allow_insecure: bool = False


@dataclass(frozen=True)
class Options:
    to: str | None = None
    dry_run: bool = False
    watch_s: float = DEFAULT_WATCH_S
    keep: int = DEFAULT_KEEP
    yes: bool = False


@dataclass
class Machine:
    """Everything `upgrade` does outside the releases' files and git."""

    service: ServiceManager = field(default_factory=Systemd)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    python: Path = field(default_factory=base_python)
    probe: Callable[[tuple[str, int]], HttpView] = probe_http
    #: The running agent's backends and their health (`/status`), for the gate.
    backends: Callable[[tuple[str, int]], dict[str, bool] | None] = backend_health
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000
    poll_s: float = 1.0
    #: The release this very process runs from is never pruned under it.
    own_pid: int = field(default_factory=os.getpid)


class Steps:
    """One line per step, with the time since the command started."""

    def __init__(self, clock: Callable[[], float], out: Callable[[str], None]) -> None:
        self._clock = clock
        self._start = clock()
        self._out = out
        self.last = "start"

    def say(self, step: str, text: str) -> None:
        self.last = step
        self._out(f"[{self._clock() - self._start:7.1f}s] {step}: {text}")


# --- the commands --------------------------------------------------------------------------------


def upgrade(inst: Installation, options: Options, machine: Machine, steps: Steps) -> None:
    """Build, gate, switch, watch; UpgradeError (one line, exit 1) when it did not end with the
    target running healthily (after switching back when it had switched)."""
    layout = inst.layout
    _need_endpoint(inst)
    git = Git(layout.root, machine.env)
    current = _current(layout)
    unit = machine.service.state()
    running = _release_or(layout, running_release(layout, unit.main_pid), current)

    upstream = git.upstream()
    remote = upstream[0] if upstream else git.default_remote()
    if remote is not None:
        git.fetch(remote)
        steps.say("fetch", f"{remote}: done")
    else:
        steps.say("fetch", "no remote: the commits already in the checkout")
    ref = options.to if options.to is not None else (upstream[1] if upstream else None)
    if ref is None:
        raise UpgradeError(
            f"{layout.root}: the checked-out branch tracks no upstream: give --to REF"
        )
    target = git.resolve(ref, remote if options.to is not None else None)
    version = git.version_at(target) or "unknown"
    named = "" if target.startswith(ref) else f"{printable(ref, 100)} is "
    steps.say(
        "target",
        f"{named}{short(target)}, version {printable(version, 60)}; running {describe(running)}",
    )
    if target == running.commit and target == current.commit:
        steps.say("done", f"already running {describe(running)}: nothing to do")
        return
    forward = git.log(running.commit, target)
    back = len(git.log(target, running.commit))
    steps.say("changes", changes(forward, back))
    if options.dry_run:
        steps.say(
            "dry run",
            f"would build releases/{short(target)} (or reuse it), gate it, switch current, "
            f"restart {machine.service.name} and watch it for {human_duration(options.watch_s)}; "
            "nothing was changed",
        )
        return

    built = build(
        layout, git, target, python=machine.python, env=machine.env, now_ms=machine.wall_ms()
    )
    steps.say(
        "build",
        f"releases/{short(target)}: "
        + (f"built in {human_duration(built.seconds)}" if built.fresh else "already built, reused"),
    )
    new = built.release.model_copy(update={"installed_ms": machine.wall_ms(), "failed": None})
    write_release(layout, new)
    gate(inst, new, machine, steps)
    plan = _schema(inst, running, new)
    if not plan.runs:
        raise UpgradeError(f"{describe(new)} cannot open the outbox: {plan.line}; nothing switched")
    if not plan.back and not options.yes:
        raise UpgradeError(f"{plan.line}; nothing switched: run again with --yes to accept that")
    steps.say("schema", plan.line)
    switch_and_watch(
        inst, running, new, options=options, machine=machine, steps=steps, what="upgrade"
    )


def rollback(inst: Installation, options: Options, machine: Machine, steps: Steps) -> None:
    """`upgrade --rollback`: back to the release installed before the current one."""
    layout = inst.layout
    _need_endpoint(inst)
    current = _current(layout)
    unit = machine.service.state()
    running = _release_or(layout, running_release(layout, unit.main_pid), current)
    target = previous(read_releases(layout), running.commit)
    if target is None:
        raise UpgradeError(
            f"no release before {describe(running)} to go back to (upgrade --list shows them)"
        )
    steps.say("target", f"back from {describe(running)} to {describe(target)}")
    if options.dry_run:
        steps.say(
            "dry run",
            f"would gate {short(target.commit)}, switch current, restart "
            f"{machine.service.name} and watch it for {human_duration(options.watch_s)}; "
            "nothing was changed",
        )
        return
    gate(inst, target, machine, steps)
    outbox = _file_schema(inst)
    if outbox is not None and not readable_by(*outbox, target.schema_version):
        raise UpgradeError(
            f"{describe(target)} cannot open the outbox (schema {outbox[0]}, readable from "
            f"{outbox[1] if outbox[1] is not None else outbox[0]}; it knows "
            f"{target.schema_version}): nothing switched"
        )
    switch_and_watch(
        inst, running, target, options=options, machine=machine, steps=steps, what="rollback"
    )


def list_releases(inst: Installation, machine: Machine, out: Callable[[str], None]) -> None:
    layout = inst.layout
    try:
        running = running_release(layout, machine.service.state().main_pid)
    except UpgradeError:
        running = None
    for line in render_list(read_releases(layout), current_commit(layout), running):
        out(line)


# --- the steps -----------------------------------------------------------------------------------


def gate(inst: Installation, release: Release, machine: Machine, steps: Steps) -> None:
    """The release's own code, before anything is switched: its version, the service's config,
    one completion per local route."""
    exe = str(inst.layout.executable(release.commit))
    insecure = ["--allow-insecure"] if inst.allow_insecure else []
    config = ["--config", str(inst.config_path), *insecure]
    env = release_env(machine.env)

    done = _run([exe, "--version"], env, GATE_TIMEOUT_S)
    said = done.stdout.strip()
    if done.returncode != 0 or said != f"provider-agent {release.version}":
        raise UpgradeError(
            f"gate: {short(release.commit)} --version said {printable(said, 100)!r} "
            f"(exit {done.returncode}), not provider-agent {release.version}; nothing switched"
        )
    steps.say("gate", f"--version: {printable(said, 100)}")

    done = _run([exe, *config, "validate"], env, GATE_TIMEOUT_S)
    if done.returncode != 0:
        raise UpgradeError(
            f"gate: {short(release.commit)} does not accept {inst.config_path}: "
            f"{last_line(done.stderr + done.stdout)}; nothing switched"
        )
    steps.say("gate", f"validate {inst.config_path}: {last_line(done.stdout)}")

    running = machine.backends(inst.listen) if inst.listen is not None else None
    done = _run([exe, *config, "selftest", "--local", "--json"], env, SELFTEST_TIMEOUT_S)
    ok, line = gate_selftest(done.returncode, done.stdout, running)
    if not ok:
        why = line if done.returncode in (0, 1) else f"{line}: {last_line(done.stderr)}"
        raise UpgradeError(
            f"gate: selftest through {short(release.commit)}: {why}; nothing switched"
        )
    steps.say("gate", f"selftest: {line}")


def switch_and_watch(
    inst: Installation,
    old: Release,
    new: Release,
    *,
    options: Options,
    machine: Machine,
    steps: Steps,
    what: str,
) -> None:
    """Switch `current` from `old` to `new`, restart, watch; switch back when `new` does not
    come up healthy (UpgradeError saying why, and whether `old` came back)."""
    layout, service = inst.layout, machine.service
    unit = service.state()
    if not unit.up:
        switch(layout, new.commit)
        service.note(f"{what}: current is now {describe(new)} (the service is not running)")
        steps.say("switch", f"current → {short(new.commit)} (was {short(old.commit)})")
        steps.say(
            "restart",
            f"the service is {unit.active}: not started; `systemctl start {service.name}` "
            f"runs {describe(new)}",
        )
        _prune(inst, options.keep, machine, steps)
        return
    service.note(f"{what}: switching {service.name} from {describe(old)} to {describe(new)}")
    switch(layout, new.commit)
    steps.say("switch", f"current → {short(new.commit)} (was {short(old.commit)})")
    service.restart()
    steps.say(
        "restart",
        f"{service.name}: the old process drains its jobs, then {short(new.commit)} starts",
    )
    expect = Expect(
        old_invocation=unit.invocation,
        version=new.version,
        watch_s=options.watch_s,
        stop_limit_s=inst.drain_timeout_s + STOP_MARGIN_S,
    )
    verdict = watch(inst, expect, machine, steps, commit=new.commit)
    if verdict.phase == "healthy":
        service.note(f"{what}: {service.name} runs {describe(new)}")
        steps.say("watch", f"healthy: no restart in {human_duration(options.watch_s)}")
        _prune(inst, options.keep, machine, steps)
        steps.say("done", f"running {describe(new)}")
        return

    why = verdict.why
    words = service.last_words(verdict.pid) if verdict.pid else None
    if words:
        why += f"; its last line: {words}"
    mark_failed(layout, new.commit, verdict.why)
    steps.say("watch", f"failed: {why}")
    failed = f"{describe(new)} did not come up healthy: {why}"
    outbox = _file_schema(inst)
    if outbox is not None and not readable_by(*outbox, old.schema_version):
        service.note(f"{what}: {failed}; not switched back: {describe(old)} cannot open the outbox")
        raise UpgradeError(
            f"{failed}; not switched back: {describe(old)} cannot open the outbox it left "
            f"(schema {outbox[0]}): fix forward (upgrade --to a fixed commit)"
        )
    service.note(f"{what}: {failed}; switching back to {describe(old)}")
    before = service.state()
    switch(layout, old.commit)
    steps.say("rollback", f"current → {short(old.commit)}")
    service.restart()
    back = watch(
        inst,
        Expect(
            old_invocation=before.invocation,
            version=old.version,
            watch_s=options.watch_s,
            stop_limit_s=inst.drain_timeout_s + STOP_MARGIN_S,
            hold=False,
        ),
        machine,
        steps,
        commit=old.commit,
        back=True,
    )
    if back.phase != "healthy":
        service.note(f"{what}: {describe(old)} did not come back either: {back.why}")
        raise UpgradeError(
            f"{failed}; switched back to {describe(old)}, which did not come up either: {back.why}"
        )
    service.note(f"{what}: switched back: {service.name} runs {describe(old)}")
    raise UpgradeError(f"{failed}; switched back to {describe(old)}")


def watch(
    inst: Installation,
    expect: Expect,
    machine: Machine,
    steps: Steps,
    *,
    commit: str,
    back: bool = False,
) -> Verdict:
    """Poll the unit and the endpoint until `judge` is final; the new process's start and its
    readiness on one line each (`back`: the release switched back to)."""
    assert inst.listen is not None
    observations: list[Observation] = []
    start = machine.clock()
    said_start = said_ready = False
    while True:
        unit = machine.service.state()
        observations.append(Observation(machine.clock() - start, unit, machine.probe(inst.listen)))
        verdict = judge(observations, expect)
        if verdict.started_at is not None and not said_start:
            said_start = True
            pid = f"pid {verdict.pid}" if verdict.pid else "no pid yet"
            if back:
                steps.say("rollback", f"{short(commit)} started ({pid})")
            else:
                stopped = human_duration(verdict.started_at)
                steps.say(
                    "restart",
                    f"the old process stopped within {stopped}; {short(commit)} started ({pid})",
                )
        if verdict.ready_at is not None and not said_ready and verdict.started_at is not None:
            said_ready = True
            after = human_duration(verdict.ready_at - verdict.started_at)
            seen = f"READY, /readyz 200, authenticated as {expect.version}"
            if back:
                steps.say("rollback", f"{short(commit)} ready again after {after}: {seen}")
            else:
                until = human_duration(expect.watch_s)
                steps.say(
                    "watch", f"ready after {after}: {seen}; watched for {until} from its start"
                )
        if verdict.final:
            return verdict
        machine.sleep(machine.poll_s)


def _prune(inst: Installation, keep: int, machine: Machine, steps: Steps) -> None:
    """Keep the newest `keep` releases; never the current one, the running one, or the one
    this process runs from."""
    layout = inst.layout
    try:
        running = running_release(layout, machine.service.state().main_pid)
    except UpgradeError:
        running = None
    own = running_release(layout, machine.own_pid)
    protected = [current_commit(layout), running, own]
    doomed = to_prune(read_releases(layout), keep, protected)
    for commit in doomed:
        remove(layout, commit, protected)
    kept = len(read_releases(layout))
    removed = f"removed {', '.join(short(c) for c in doomed)}; " if doomed else ""
    steps.say("prune", f"{removed}{kept} release(s) kept (--keep {keep})")


# --- helpers -------------------------------------------------------------------------------------


def _need_endpoint(inst: Installation) -> None:
    if inst.listen is None:
        raise UpgradeError(
            f'the agent\'s HTTP endpoint is disabled (observability.prometheus_addr = "" in '
            f"{inst.config_path}): upgrade watches the new release through /readyz and /status"
        )


def _current(layout: Layout) -> Release:
    commit = current_commit(layout)
    release = read_release(layout, commit) if commit is not None else None
    if release is None:
        raise UpgradeError(
            f"no current release in {layout.root}: run `provider-agent service install` from "
            "the checkout first (it builds the first release)"
        )
    return release


def _release_or(layout: Layout, commit: str | None, fallback: Release) -> Release:
    found = read_release(layout, commit) if commit is not None else None
    return found or fallback


def _file_schema(inst: Installation) -> tuple[int, int | None] | None:
    try:
        return file_schema(inst.state_dir / FILE_NAME)
    except OutboxError as exc:
        raise UpgradeError(str(exc)) from None


def _schema(inst: Installation, running: Release, new: Release) -> SchemaPlan:
    return schema_plan(
        _file_schema(inst),
        (running.schema_version, running.readable_from),
        (new.schema_version, new.readable_from),
    )


def _run(
    argv: list[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=timeout,
            check=False,
            cwd="/",
        )
    except FileNotFoundError:
        raise UpgradeError(f"gate: {argv[0]} not found; nothing switched") from None
    except subprocess.TimeoutExpired:
        raise UpgradeError(
            f"gate: {Path(argv[0]).name} {' '.join(argv[-2:])} did not finish within "
            f"{human_duration(timeout)}; nothing switched"
        ) from None


# --- the command line ----------------------------------------------------------------------------


def find_installation(
    config: str | None,
    install_dir: str | None,
    *,
    allow_insecure: bool = False,
    unit_path: Path = Path(str(UNIT_DIR / UNIT_NAME)),
    executable: Path | None = None,
) -> Installation:
    """The releases (`--install-dir`, else the installed unit's ExecStart, else this executable's
    installation) and the service's config (`--config`, else the unit's, else the default);
    ConfigError (78) for a config the running code cannot read."""
    try:
        unit_text: str | None = unit_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        unit_text = None
    except (OSError, UnicodeDecodeError) as exc:
        raise UpgradeError(f"cannot read {unit_path}: {getattr(exc, 'strerror', exc)}") from None
    if install_dir is not None:
        layout = Layout(Path(os.path.abspath(install_dir)))
    elif unit_text is not None:
        runs = exec_start(unit_text)
        found = layout_of(Path(runs)) if runs is not None else None
        if found is None:
            raise UpgradeError(
                f"the service runs {runs}, not a release: run `sudo {runs} service install` once "
                "to move it to releases (README: Upgrading)"
            )
        layout = found
    else:
        own = executable or this_executable()
        found = layout_of(own)
        if found is None:
            raise UpgradeError(
                f"no {unit_path} and {own} is not a release: install the service first "
                "(`provider-agent service install`), or pass --install-dir"
            )
        layout = found
    path = Path(config) if config else None
    if path is None and unit_text is not None:
        unit_config = configured_path(unit_text)
        path = Path(unit_config) if unit_config is not None else None
    path = path or Path(DEFAULT_CONFIG)
    loaded = config_module.load(path, allow_insecure=True)
    return Installation(
        layout=layout,
        config_path=path,
        listen=loaded.observability.listen,
        state_dir=loaded.state.dir,
        drain_timeout_s=loaded.state.drain_timeout_s,
        allow_insecure=allow_insecure,
    )


class _Stopped(BaseException):
    """SIGTERM arrived: the command ends where it is (exit 0, cli.md)."""


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stopped

    previous_handler = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _print(line: str) -> None:
    print(line, flush=True)


def upgrade_command(
    *,
    config: str | None,
    install_dir: str | None,
    allow_insecure: bool,
    to: str | None,
    dry_run: bool,
    watch: str,
    keep: int,
    yes: bool,
    go_back: bool,
    show: bool,
) -> int:
    """`provider-agent upgrade`: 0 upgraded, nothing to do, or a dry run; 1 it did not end with
    the target running healthily (after switching back when it had switched), or it cannot go
    on; 2 a bad option; 78 the service's config cannot be read."""
    try:
        watch_s = parse_watch(watch)
    except ValueError as exc:
        print(f"upgrade: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if keep < 1:
        print(f"upgrade: --keep {keep}: keep at least 1 release", file=sys.stderr)
        return ExitCode.USAGE
    if install_dir is not None and not os.path.isdir(install_dir):
        print(
            f"upgrade: --install-dir {printable(install_dir, 200)!r}: no such directory",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    machine = Machine()
    steps = Steps(time.monotonic, _print)
    options = Options(to=to, dry_run=dry_run, watch_s=watch_s, keep=keep, yes=yes)
    try:
        inst = find_installation(config, install_dir, allow_insecure=allow_insecure)
        if show:
            list_releases(inst, machine, _print)
            return ExitCode.OK
        if os.geteuid() != 0:
            raise UpgradeError("upgrade needs root: run it with sudo (--list does not)")
        if not os.path.isdir("/run/systemd/system"):
            raise UpgradeError("systemd is not running on this machine (no /run/systemd/system)")
        with _stop_on_sigterm():
            (rollback if go_back else upgrade)(inst, options, machine, steps)
    except UpgradeError as exc:
        print(f"upgrade: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except (_Stopped, KeyboardInterrupt) as stop:
        print(
            f"upgrade: stopped during {steps.last}: `provider-agent upgrade --list` shows which "
            "release is current now",
            file=sys.stderr,
        )
        return ExitCode.OK if isinstance(stop, _Stopped) else ExitCode.INTERRUPTED
    return ExitCode.OK
