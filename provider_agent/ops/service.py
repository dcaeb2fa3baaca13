"""`provider-agent service install|uninstall`: this installation as a hardened systemd service.

Three steps, so that the decisions can be tested without systemd and without root:
`survey` looks at the machine (files under the root, the group, `systemctl is-enabled/is-active`)
and renders what should be there; `plan_install`/`plan_uninstall` (pure) turn that into a list of
actions; `apply` performs them. `--dry-run` prints the plan and stops there. Everything outside
the files (systemctl, groupadd, chown, the effective uid, backend detection) goes through `Host`,
which the tests replace.

The unit is the shipped `systemd/provider-agent.service` with two lines set: `ExecStart=` (the
installation's stable `<install dir>/current/.venv/bin/provider-agent`, see `releases.py`) and
`Environment=PROVIDER_AGENT_CONFIG=` (the config path). Run from a checkout's own `.venv`, install
builds the first release from the checkout's HEAD when there is none (an installation of the
earlier layout, whose unit ran the checkout's `.venv`, is moved to releases this way; once there,
`upgrade` builds the next); run from a release, it keeps the releases as they are.
The service runs as a dynamic user that reads its config through the static group
`provider-agent-config`, which owns /etc/provider-agent (0750). A config is written only when none
exists, keys are never touched, and the config is validated before anything is enabled.
"""

from __future__ import annotations

import grp
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final, Literal

import tomlkit
from tomlkit.items import Table

from provider_agent.config import load as config_module
from provider_agent.config.schema import PLACEHOLDER_COORDINATOR_URL
from provider_agent.errors import ConfigError, ExitCode, ServiceError, UpgradeError
from provider_agent.ops.init_config import Detected, render_config, write_config
from provider_agent.ops.upgrade.build import Git, base_python, build
from provider_agent.ops.upgrade.releases import (
    Layout,
    Release,
    current_commit,
    layout_of,
    read_release,
    short,
    switch,
)
from provider_agent.safe_text import printable

SERVICE: Final = "provider-agent"
UNIT_NAME: Final = "provider-agent.service"
#: The static group that may read /etc/provider-agent; the unit's SupplementaryGroups=.
CONFIG_GROUP: Final = "provider-agent-config"
DEFAULT_CONFIG: Final = PurePosixPath("/etc/provider-agent/agent.toml")
UNIT_DIR: Final = PurePosixPath("/etc/systemd/system")
#: The unit's StateDirectory= (systemd keeps it in /var/lib/private/ behind a symlink).
STATE_DIR: Final = PurePosixPath("/var/lib/provider-agent")
CONFIG_DIR_MODE: Final = 0o750
CONFIG_FILE_MODE: Final = 0o640
UNIT_FILE_MODE: Final = 0o644
#: The shipped unit: the checkout's systemd/ directory (scripts/install installs editable) …
TEMPLATE: Final = Path(__file__).resolve().parents[2] / "systemd" / UNIT_NAME
#: … or, run from a release, the release's own copy beside its venv.
RELEASE_TEMPLATE: Final = Path(sys.prefix).parent / "systemd" / UNIT_NAME
#: ProtectHome=yes hides these from the service: an executable there cannot start.
_HIDDEN_BY_UNIT: Final = (
    PurePosixPath("/home"),
    PurePosixPath("/root"),
    PurePosixPath("/run/user"),
)
#: What systemd would read as quoting, escapes, specifiers or variables in a unit line.
_UNSAFE_IN_UNIT: Final = re.compile(r"[\s\"'\\%$\x00-\x1f\x7f]")
_EXEC_START: Final = re.compile(r"^ExecStart=.*$", re.MULTILINE)
_CONFIG_ENV: Final = re.compile(r"^Environment=PROVIDER_AGENT_CONFIG=(.*)$", re.MULTILINE)


# --- what the command touches outside the files --------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output: str


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run a system command (systemctl, groupadd); a missing program is exit 127."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return CommandResult(127, f"{argv[0]}: command not found")
    return CommandResult(done.returncode, (done.stdout + done.stderr).strip())


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _detect_local_backends() -> list[Detected]:
    import anyio

    from provider_agent.backends.base import new_http_session
    from provider_agent.ops.init_config import detect_local_backends

    async def probe() -> list[Detected]:
        async with new_http_session(8) as http:
            return await detect_local_backends(http)

    return anyio.run(probe)


def installation_paths(executable: Path) -> list[Path]:
    """The venv's script, the interpreter it runs, the standard library and the checkout (the
    package is installed editable)."""
    return [
        executable,
        Path(sys.executable).resolve(),
        Path(os.__file__).resolve().parent,
        Path(__file__).resolve().parent,
    ]


def this_executable() -> Path:
    """`provider-agent` of the virtual environment this Python runs from (not resolved: the venv's
    python is a symlink to the system one, and ExecStart must stay inside the venv)."""
    return Path(os.path.abspath(sys.executable)).parent / "provider-agent"


def build_first_release(layout: Layout, commit: str) -> Release:
    """Build releases/<commit>/ from the checkout's commit and point `current` at it."""
    built = build(
        layout,
        Git(layout.root, os.environ),
        commit,
        python=base_python(),
        env=os.environ,
        now_ms=time.time_ns() // 1_000_000,
    )
    switch(layout, commit)
    return built.release


@dataclass
class Host:
    """The machine as install sees it; tests replace the parts that need root or systemd."""

    run: Callable[[Sequence[str]], CommandResult] = run_command
    euid: int = field(default_factory=os.geteuid)
    group_id: Callable[[str], int | None] = _group_id
    chown: Callable[[Path, int, int], None] = os.chown
    detect: Callable[[], list[Detected]] = _detect_local_backends
    #: What the service's user must reach to run `executable` (checked when managing the system).
    installation: Callable[[Path], list[Path]] = installation_paths
    #: Whether systemd runs this machine (sd_booted(3): /run/systemd/system exists).
    booted: Callable[[], bool] = lambda: os.path.isdir("/run/systemd/system")
    #: The `provider-agent` this install is run as (a checkout's .venv, or a release's).
    executable: Callable[[], Path] = this_executable
    #: Builds the first release of a checkout and points `current` at it.
    first_release: Callable[[Layout, str], Release] = build_first_release


# --- options and the survey ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where things go. `root` is the directory the system paths live under ("/" normally, DIR
    with --root); `manage` is whether to run systemctl/groupadd and set ownership (not with
    --root, where the files are for another system or a package)."""

    root: Path
    manage: bool
    config: PurePosixPath = DEFAULT_CONFIG

    def under(self, path: PurePosixPath) -> Path:
        return self.root / path.relative_to("/")

    @property
    def unit(self) -> Path:
        return self.under(UNIT_DIR / UNIT_NAME)

    @property
    def config_file(self) -> Path:
        return self.under(self.config)

    @property
    def config_dir(self) -> Path:
        return self.under(self.config.parent)


def root_problem(root: str) -> str | None:
    """Why `--root DIR` cannot be installed under (cli.md, settled: a non-empty path to an
    existing directory other than `/`; anything else exits 2 and writes nothing); None when it
    can. `/` by any spelling (`//`, `/tmp/..`, a link to it) is the live system: that is what
    leaving `--root` out is for, with its root and systemd checks."""
    if not root.strip():
        return "is empty: give the directory to install under (or leave --root out)"
    if not os.path.exists(root):
        return "no such directory (--root installs under an existing directory)"
    if not os.path.isdir(root):
        return "is not a directory"
    if os.path.realpath(root) == "/":
        return "is / itself: to install into this system, leave --root out (as root)"
    return None


def target_for(config: str | None, root: str | None) -> Target:
    """The Target of `--config PATH` and `--root DIR` (relative paths are taken from here)."""
    config_path = PurePosixPath(os.path.abspath(os.path.expanduser(config))) if config else None
    return Target(
        root=Path(os.path.abspath(root)) if root else Path("/"),
        manage=root is None,
        config=config_path or DEFAULT_CONFIG,
    )


@dataclass(frozen=True)
class DirState:
    mode: int
    gid: int


@dataclass(frozen=True)
class Releases:
    """The installation's releases: the one `current` points at, or the checkout's HEAD to
    build the first one from."""

    layout: Layout
    current: Release | None
    head: str | None = None
    head_version: str | None = None
    #: The checkout has uncommitted changes (not in a release built from HEAD).
    dirty: bool = False


@dataclass(frozen=True)
class Survey:
    """What is there now, and what should be."""

    target: Target
    #: What the unit starts: `<install dir>/current/.venv/bin/provider-agent`.
    executable: Path
    releases: Releases
    #: What the installed unit starts now (None: no unit).
    runs_now: PurePosixPath | None
    unit_wanted: str
    unit_now: str | None
    config_dir: DirState | None
    config_now: DirState | None  # the config file's mode and group, None when there is none
    config_new: str | None  # the config to write when there is none
    config_summary: str  # "2 backend(s)", for the report
    placeholder_url: bool  # the config still points at init's placeholder coordinator
    key_path: PurePosixPath
    group: int | None  # the config group's gid (None: absent, or not looked up with --root)
    enabled: bool
    active: bool


def survey(target: Target, host: Host, executable: Path) -> Survey:
    """Look at the machine and validate the config the service will run with: ConfigError (78)
    for a broken config, ServiceError (1) for anything else that stops the install.
    `executable`: the `provider-agent` install runs as (a checkout's .venv, or a release's)."""
    if target.manage and host.euid != 0:
        raise ServiceError(
            "service install needs root: run it with sudo (or pass --root DIR to install the "
            "files under a directory)"
        )
    if target.manage and not host.booted():
        raise ServiceError(
            "systemd is not running on this machine (no /run/systemd/system): pass --root DIR "
            "to write the files only"
        )
    _check_unit_safe("the provider-agent executable", executable)
    _check_unit_safe("the config path", Path(target.config))
    if not os.access(executable, os.X_OK):
        raise ServiceError(
            f"no executable {executable}: run `bash scripts/install` in the checkout first"
        )
    if target.manage:
        _check_reachable_by_service(host.installation(executable), target.config)
    releases = survey_releases(executable, build=target.manage)
    stable = releases.layout.stable_executable
    _check_unit_safe("the provider-agent executable", stable)
    unit_wanted = render_unit(_read_template(), stable, target.config)
    unit_now = _read_text(target.unit)
    config_file = target.config_file

    config_new: str | None = None
    if config_file.exists() or config_file.is_symlink():
        loaded = config_module.load(config_file)
        config_now: DirState | None = _dir_state(config_file)
    else:
        config_new = system_config(host.detect())
        loaded = config_module.parse(config_new, file=str(target.config))
        config_now = None
    count = len(loaded.backends)
    placeholder = loaded.coordinator.url == PLACEHOLDER_COORDINATOR_URL

    group = host.group_id(CONFIG_GROUP) if target.manage else None
    enabled = active = False
    if target.manage:
        enabled = host.run(["systemctl", "is-enabled", "--quiet", SERVICE]).returncode == 0
        active = host.run(["systemctl", "is-active", "--quiet", SERVICE]).returncode == 0
    return Survey(
        target=target,
        executable=stable,
        releases=releases,
        runs_now=exec_start(unit_now) if unit_now is not None else None,
        unit_wanted=unit_wanted,
        unit_now=unit_now,
        config_dir=_dir_state(target.config_dir),
        config_now=config_now,
        config_new=config_new,
        config_summary=f"{count} backend(s)",
        placeholder_url=placeholder,
        key_path=PurePosixPath(loaded.identity.key_path),
        group=group,
        enabled=enabled,
        active=active,
    )


def survey_releases(executable: Path, *, build: bool) -> Releases:
    """The installation `executable` belongs to: a release's own (its layout as it is), or a
    checkout's `.venv` (`<checkout>/.venv/bin/provider-agent`), whose HEAD gives the first
    release when there is none and `build` (ServiceError when it is not a git checkout)."""
    layout = layout_of(executable) or Layout(executable.parent.parent.parent)
    try:
        commit = current_commit(layout)
        current = read_release(layout, commit) if commit is not None else None
        if current is not None or not build:
            return Releases(layout, current)
        if not (layout.root / ".git").exists():
            raise ServiceError(
                f"{layout.root} is not a git checkout: the service runs releases built from its "
                "commits; install from a clone of the repository (README: Install)"
            )
        git = Git(layout.root, os.environ)
        head = git.head()
        dirty = bool(git.run("status", "--porcelain", "--untracked-files=no").strip())
        return Releases(layout, None, head, git.version_at(head), dirty)
    except UpgradeError as exc:
        raise ServiceError(str(exc)) from None


def render_unit(template: str, executable: Path, config: PurePosixPath) -> str:
    """The shipped unit with ExecStart at `executable` and the config at `config`. Pure."""
    for pattern, what in ((_EXEC_START, "ExecStart="), (_CONFIG_ENV, "PROVIDER_AGENT_CONFIG")):
        if len(pattern.findall(template)) != 1:
            raise ServiceError(f"the shipped {UNIT_NAME} must set {what} exactly once")
    text = _EXEC_START.sub(lambda _: f"ExecStart={executable} run", template)
    return _CONFIG_ENV.sub(lambda _: f"Environment=PROVIDER_AGENT_CONFIG={config}", text)


def system_config(detected: Sequence[Detected]) -> str:
    """What `init` writes, with the identity and state where a system install keeps them, so that
    operator commands run from a shell (no $STATE_DIRECTORY there) find the daemon's files."""
    doc = tomlkit.parse(render_config(detected))
    for table, key, value in (
        ("identity", "key_path", STATE_DIR / "identity.key"),
        ("state", "dir", STATE_DIR),
    ):
        section = doc[table]
        assert isinstance(section, Table)
        item = tomlkit.item(str(value))
        item.comment("system install: in the service's StateDirectory")
        section.add(key, item)
    return tomlkit.dumps(doc)


def configured_path(unit_text: str) -> PurePosixPath | None:
    """The config path an installed unit runs with."""
    found = _CONFIG_ENV.search(unit_text)
    return PurePosixPath(found.group(1).strip()) if found else None


def exec_start(unit_text: str) -> PurePosixPath | None:
    """The executable an installed unit starts."""
    found = re.search(r"^ExecStart=(\S+)", unit_text, re.MULTILINE)
    return PurePosixPath(found.group(1)) if found else None


# --- the plans (pure) -----------------------------------------------------------------------------


ActionKind = Literal[
    "group", "mkdir", "chmod-dir", "config", "config-group", "release", "unit", "remove", "run"
]


@dataclass(frozen=True)
class Action:
    """One change. `kind` says what `apply` does; `line` is what the report says."""

    kind: ActionKind
    line: str
    path: Path | None = None
    text: str | None = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    notes: list[str]  # what is kept as it is, and what to do next


def plan_install(s: Survey, *, start: bool) -> Plan:
    """The actions that take the machine from `s` to an installed (and, with `start`, running)
    service; none when it already is."""
    files = _plan_files(s)
    if not s.target.manage:
        files.notes.append(
            "--root: ran no systemctl; on the target system: systemctl daemon-reload && "
            f"systemctl enable --now {SERVICE} (and the group: groupadd --system {CONFIG_GROUP})"
        )
        return files
    service = _plan_service(s, start=start)
    return Plan(files.actions + service.actions, files.notes + service.notes)


def _plan_files(s: Survey) -> Plan:
    """The group, the config directory, the config, the unit."""
    t = s.target
    actions: list[Action] = []
    notes: list[str] = []
    if t.manage and s.group is None:
        actions.append(Action("group", f"create the system group {CONFIG_GROUP}"))
    dir_mode = f"{CONFIG_DIR_MODE:04o}"
    group_note = f", group {CONFIG_GROUP}" if t.manage else ""
    if s.config_dir is None:
        line = f"create {t.config.parent}/ ({dir_mode}{group_note})"
        actions.append(Action("mkdir", line, t.config_dir))
    elif t.config.parent != DEFAULT_CONFIG.parent:
        notes.append(f"{t.config.parent}/: not ours, left as it is (the service must read it)")
    elif s.config_dir.mode != CONFIG_DIR_MODE or (t.manage and s.config_dir.gid != s.group):
        line = f"set {t.config.parent}/ to {dir_mode}{group_note}"
        actions.append(Action("chmod-dir", line, t.config_dir))
    if s.config_new is not None:
        actions.append(
            Action(
                "config",
                f"write {t.config} ({s.config_summary} found)",
                t.config_file,
                text=s.config_new,
            )
        )
    else:
        notes.append(f"{t.config}: kept as it is (valid, {s.config_summary})")
        if t.manage and s.config_now is not None and not _service_can_read(s.config_now, s.group):
            actions.append(
                Action(
                    "config-group",
                    f"make {t.config} readable to group {CONFIG_GROUP} (contents untouched)",
                    t.config_file,
                )
            )
    notes.append(f"identity key: {s.key_path} (never touched; created at first start if absent)")
    actions.extend(_plan_release(s, notes))
    if s.unit_now != s.unit_wanted:
        verb = "write" if s.unit_now is None else "replace the changed"
        actions.append(Action("unit", f"{verb} {UNIT_DIR / UNIT_NAME}", t.unit, s.unit_wanted))
    return Plan(actions, notes)


def _plan_release(s: Survey, notes: list[str]) -> list[Action]:
    """The first release, when there is none: built from the checkout's HEAD (not with --root,
    whose files are for another system)."""
    rel = s.releases
    root = rel.layout.root
    if s.runs_now is not None and Path(s.runs_now) != s.executable:
        notes.append(f"moved to releases: the unit ran {s.runs_now}, now {s.executable}")
    if rel.current is not None:
        notes.append(
            f"releases: current is {short(rel.current.commit)} ({rel.current.version}) in "
            f"{rel.layout.releases}; `provider-agent upgrade` builds the next"
        )
        return []
    if rel.head is None:
        notes.append(
            f"no release in {rel.layout.releases} yet: `provider-agent service install` "
            "without --root, on the target system, builds the first from the checkout"
        )
        return []
    if rel.dirty:
        notes.append(f"{root} has uncommitted changes: the release is built from HEAD without them")
    version = f", version {rel.head_version}" if rel.head_version else ""
    line = (
        f"build the first release from {root}'s HEAD {short(rel.head)}{version} into "
        f"{rel.layout.releases}/{short(rel.head)}/ and point {rel.layout.current} at it"
    )
    return [Action("release", line, root, rel.head)]


def _plan_service(s: Survey, *, start: bool) -> Plan:
    """systemctl: reload the manager after a unit change, enable (and start) a fresh install,
    restart a running service whose unit changed."""
    t = s.target
    actions: list[Action] = []
    notes: list[str] = []
    unit_changed = s.unit_now != s.unit_wanted
    if unit_changed:
        actions.append(_systemctl("daemon-reload"))
    # Started only on a fresh enable: an enabled service that is stopped was stopped by someone.
    start_now = start and not s.placeholder_url and not s.enabled and not s.active
    if start_now:
        actions.append(_systemctl("enable", "--now", SERVICE))
    elif not s.enabled:
        actions.append(_systemctl("enable", SERVICE))
    if s.active and unit_changed:
        if start:
            actions.append(_systemctl("try-restart", SERVICE))  # SIGTERM: drains first
        else:
            notes.append(f"running with the old unit: systemctl restart {SERVICE} to apply it")
    if not s.active and not start_now:
        if s.placeholder_url:
            why = f"set [coordinator] url (and enrollment_code, [pricing]) in {t.config}, then"
        elif not start:
            why = "--no-start; when you are ready:"
        else:
            why = "enabled but not running; to start it:"
        notes.append(f"not started: {why} systemctl start {SERVICE}")
    notes.append(f"logs: journalctl -u {SERVICE} -f")
    notes.append(f"the running agent: sudo {s.executable} --config {t.config} status")
    return Plan(actions, notes)


def plan_uninstall(target: Target, *, installed: bool, enabled_or_active: bool) -> Plan:
    """Stop (draining) and disable the service and remove its unit; keep everything else."""
    actions: list[Action] = []
    if target.manage and enabled_or_active:
        actions.append(_systemctl("disable", "--now", SERVICE))
    if installed:
        actions.append(Action("remove", f"remove {UNIT_DIR / UNIT_NAME}", target.unit))
        if target.manage:
            actions.append(_systemctl("daemon-reload"))
    return Plan(actions, [])


def _systemctl(*args: str) -> Action:
    argv = ("systemctl", *args)
    return Action("run", " ".join(argv), argv=argv)


def _service_can_read(file: DirState, group: int | None) -> bool:
    return bool(file.mode & stat.S_IROTH) or (
        group is not None and file.gid == group and bool(file.mode & stat.S_IRGRP)
    )


# --- applying -------------------------------------------------------------------------------------


def apply(plan: Plan, target: Target, host: Host) -> None:
    """Perform the actions in order; the first failure stops with a ServiceError."""
    for action in plan.actions:
        try:
            _apply_one(action, target, host)
        except OSError as exc:
            raise ServiceError(f"cannot {action.line}: {exc.strerror or exc}") from None


def _apply_one(action: Action, target: Target, host: Host) -> None:
    if action.kind == "run":
        _run_checked(host, action.argv)
    elif action.kind == "group":
        _run_checked(host, ("groupadd", "--system", CONFIG_GROUP))
    elif action.kind in ("mkdir", "chmod-dir"):
        assert action.path is not None
        action.path.parent.mkdir(parents=True, exist_ok=True)
        action.path.mkdir(mode=CONFIG_DIR_MODE, exist_ok=True)
        os.chmod(action.path, CONFIG_DIR_MODE)  # whatever the umask did
        _give_to_config_group(action.path, target, host)
    elif action.kind == "config":
        assert action.path is not None and action.text is not None
        write_config(action.path, action.text, force=False)
        os.chmod(action.path, CONFIG_FILE_MODE)
        _give_to_config_group(action.path, target, host)
    elif action.kind == "config-group":
        assert action.path is not None
        _give_to_config_group(action.path, target, host)
        os.chmod(action.path, stat.S_IMODE(os.stat(action.path).st_mode) | stat.S_IRGRP)
    elif action.kind == "release":
        assert action.path is not None and action.text is not None
        try:
            host.first_release(Layout(action.path), action.text)
        except UpgradeError as exc:
            raise ServiceError(f"cannot {action.line}: {exc}") from None
    elif action.kind == "unit":
        assert action.path is not None and action.text is not None
        _write_replacing(action.path, action.text, UNIT_FILE_MODE)
    elif action.kind == "remove":
        assert action.path is not None
        action.path.unlink(missing_ok=True)
    else:
        raise AssertionError(action.kind)


def _run_checked(host: Host, argv: Sequence[str]) -> None:
    result = host.run(argv)
    if result.returncode != 0:
        last = result.output.splitlines()[-1] if result.output else f"exit {result.returncode}"
        raise ServiceError(f"{' '.join(argv)} failed: {last}")


def _give_to_config_group(path: Path, target: Target, host: Host) -> None:
    if not target.manage:
        return
    gid = host.group_id(CONFIG_GROUP)
    if gid is None:
        raise ServiceError(f"the group {CONFIG_GROUP} does not exist after creating it")
    host.chown(path, 0, gid)


def _write_replacing(path: Path, text: str, mode: int) -> None:
    """Write atomically: a temporary file in the same directory, fsync, rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


# --- the commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    lines: list[str]


def install(
    target: Target,
    host: Host,
    *,
    start: bool = True,
    dry_run: bool = False,
    executable: Path | None = None,
) -> Report:
    """`service install`. Raises ConfigError (78) or ServiceError (1); returns what to print."""
    s = survey(target, host, executable or host.executable())
    plan = plan_install(s, start=start)
    where = "" if target.manage else f" under {target.root}"
    if dry_run:
        lines = [f"service install{where}: dry run, nothing written; would:"]
        lines += [f"  {a.line}" for a in plan.actions] or ["  nothing (already installed)"]
        return Report(lines + plan.notes)
    apply(plan, target, host)
    if plan.actions:
        lines = [f"service install{where}:"] + [f"  {a.line}" for a in plan.actions]
    else:
        lines = [f"service install{where}: unchanged (already installed as it should be)"]
    return Report(lines + plan.notes)


def uninstall(target: Target, host: Host) -> Report:
    """`service uninstall`: stop, disable, remove the unit; say where the kept files are."""
    if target.manage and host.euid != 0:
        raise ServiceError("service uninstall needs root: run it with sudo (or pass --root DIR)")
    if target.manage and not host.booted():
        raise ServiceError(
            "systemd is not running on this machine (no /run/systemd/system): pass --root DIR"
        )
    unit_text = _read_text(target.unit)
    enabled_or_active = False
    if target.manage:
        enabled_or_active = any(
            host.run(["systemctl", query, "--quiet", SERVICE]).returncode == 0
            for query in ("is-enabled", "is-active")
        )
    plan = plan_uninstall(
        target, installed=unit_text is not None, enabled_or_active=enabled_or_active
    )
    apply(plan, target, host)
    where = "" if target.manage else f" under {target.root}"
    if plan.actions:
        lines = [f"service uninstall{where}:"] + [f"  {a.line}" for a in plan.actions]
    else:
        lines = [f"service uninstall{where}: not installed ({UNIT_DIR / UNIT_NAME} is absent)"]
    return Report(lines + _kept(target, configured_path(unit_text or "") or target.config))


def _kept(target: Target, config: PurePosixPath) -> list[str]:
    key_path, state_dir = STATE_DIR / "identity.key", STATE_DIR
    try:
        loaded = config_module.load(target.under(config))
        key_path = PurePosixPath(loaded.identity.key_path)
        state_dir = PurePosixPath(loaded.state.dir)
    except ConfigError:
        pass  # a missing or broken config: the unit's defaults are where the files are
    return [
        "kept (delete them yourself if you mean to):",
        f"  config:   {config.parent}/ ({config.name})",
        f"  identity: {key_path} (this machine's marketplace identity: back it up)",
        f"  state:    {state_dir} (the outbox may hold undelivered billing records)",
    ]


def service_command(
    action: Literal["install", "uninstall"],
    config: str | None,
    root: str | None,
    *,
    start: bool = True,
    dry_run: bool = False,
) -> int:
    """`provider-agent service install|uninstall`: 0 done, what was done printed; 2 for a bad
    --root (cli.md); 1 when it cannot go on; ConfigError (78) for a config it cannot use."""
    if root is not None:
        problem = root_problem(root)
        if problem is not None:
            print(
                f"service {action}: --root {printable(repr(root), 300)}: {problem}", file=sys.stderr
            )
            return ExitCode.USAGE
    target = target_for(config, root)
    try:
        if action == "install":
            report = install(target, Host(), start=start, dry_run=dry_run)
        else:
            report = uninstall(target, Host())
    except ServiceError as exc:
        print(f"service {action}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    print("\n".join(report.lines))
    return ExitCode.OK


# --- small helpers --------------------------------------------------------------------------------


def _read_template() -> str:
    try:
        if not TEMPLATE.exists() and RELEASE_TEMPLATE.exists():
            return RELEASE_TEMPLATE.read_text(encoding="utf-8")
        return TEMPLATE.read_text(encoding="utf-8")
    except OSError as exc:
        raise ServiceError(
            f"cannot read the shipped unit {TEMPLATE}: {exc.strerror or exc} (service install "
            "runs from a checkout installed with scripts/install)"
        ) from None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _dir_state(path: Path) -> DirState | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return DirState(stat.S_IMODE(info.st_mode), info.st_gid)


def _check_unit_safe(what: str, path: Path) -> None:
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ServiceError(f"{what} is not valid UTF-8: {path!r}") from None
    if not path.is_absolute() or _UNSAFE_IN_UNIT.search(text):
        raise ServiceError(
            f"{what} {text!r} cannot go into a unit file as it is (spaces, quotes, backslashes, "
            "% and $ mean something there): move it to a plain path such as /opt/provider-agent"
        )


def _check_reachable_by_service(needed: list[Path], config: PurePosixPath) -> None:
    """The dynamic user must reach the installation: nothing under a directory ProtectHome=
    hides, every directory on the way open to others, each path readable and executable by them."""
    for path in [*needed, Path(config)]:
        pure = PurePosixPath(path)
        hidden = next((h for h in _HIDDEN_BY_UNIT if pure.is_relative_to(h)), None)
        if hidden is not None:
            raise ServiceError(
                f"{path} is under {hidden}, which the service cannot see (ProtectHome=): put the "
                "checkout in /opt/provider-agent, run `bash scripts/install` there, and install "
                "from it"
            )
    for path in needed:
        steps = [(parent, stat.S_IXOTH) for parent in reversed(path.parents)]
        for step, bits in [*steps, (path, stat.S_IROTH | stat.S_IXOTH)]:
            mode = step.stat().st_mode
            if mode & bits != bits:
                raise ServiceError(
                    f"{step} (mode {stat.S_IMODE(mode):04o}) is closed to other users, so the "
                    "service's user cannot run the installation: chmod o+rx it, or install from "
                    "/opt/provider-agent"
                )
