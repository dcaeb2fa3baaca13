"""The `provider-agent` command line (shared/spec/cli.md): the parser, and a table from each
command to its one `*_command` function, in the module of its concern (imported only when the
command runs, so that `--help` stays fast).

Exit codes (`errors.ExitCode`): 0 ok, 1 other failure, 2 an invalid argument (one line saying
which and why), 78 (EX_CONFIG) for any configuration or identity error, so a systemd unit with
`RestartPreventExitStatus=78` does not loop on a broken file; 130 for a SIGINT that stopped a
one-shot command (0 for SIGTERM).

Output: stdout is guarded for every command. A reader that went away (`| head`) ends the command
quietly (exit 0); any other failure to write it (`> /dev/full`) is one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from provider_agent import __version__
from provider_agent.errors import ExitCode, StdoutError

if TYPE_CHECKING:
    from provider_agent.config.schema import Config

log = logging.getLogger("provider_agent.cli")
#: Commands whose stdout is the point: info-level chatter stays off unless asked for.
_QUIET = frozenset(
    {
        "validate",
        "discover",
        "identity",
        "init",
        "earnings",
        "service",
        "status",
        "pause",
        "resume",
        "selftest",
        "demo",
        "upgrade",
    }
)
#: Commands whose output already says everything the log would (`doctor` grades each check).
_SILENT = frozenset({"doctor"})
#: Operator commands that read local state or ask the running agent, never dialling the
#: coordinator or a backend: a ws:// coordinator URL does not stop them (cli.md, settled).
_LOCAL_ONLY = frozenset({"status", "earnings", "pause", "resume"})
#: Options whose value may start with `-` (`pause --for -5m`): passed to argparse joined
#: (`--for=-5m`), so that the value reaches the check that says why it is wrong.
_DASH_VALUES = frozenset({"--for", "--since", "--until", "--watch", "--keep"})


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line saying which and why (cli.md: exit 2)."""

    def error(self, message: str) -> NoReturn:
        from provider_agent.safe_text import printable

        self.exit(ExitCode.USAGE, f"{self.prog}: {printable(message, 300)} (see --help)\n")


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global options, accepted before or after the subcommand."""
    parser.add_argument("--version", action="version", version=f"provider-agent {__version__}")
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="PATH", default=default, help="path of agent.toml")
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        choices=["error", "warn", "info", "debug", "trace"],
        default=default,
        help="error|warn|info|debug|trace (wins over log_level in the file)",
    )
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="accept a ws:// coordinator URL and http:// BYOK URLs (testing only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="provider-agent",
        description="Sell this machine's inference on the marketplace.",
    )
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    command("run", "the daemon: discovery loop, coordinator session, heartbeats, signals")
    command("validate", "check agent.toml and print `ok: <n> backend(s)`; no network")
    discover = command("discover", "one discovery pass against the real backends")
    discover.add_argument("--json", action="store_true", help="print the capabilities message")
    init = command("init", "detect local backends and write a commented agent.toml")
    init.add_argument("--output", metavar="PATH", default="agent.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    command("identity", "load or create the identity key and print it")
    status = command("status", "ask the running agent (its HTTP endpoint) how it is doing")
    status.add_argument("--json", action="store_true", help="print the /status object")
    earnings = command("earnings", "the local ledger of served jobs: totals, or rows as CSV")
    earnings.add_argument("--since", metavar="DATE", help="first day, YYYY-MM-DD (UTC)")
    earnings.add_argument("--until", metavar="DATE", help="day after the last, YYYY-MM-DD (UTC)")
    earnings.add_argument("--by", choices=["day", "model", "backend"], default="day")
    earnings.add_argument("--csv", action="store_true", help="every row as CSV, not totals")
    pause = command("pause", "maintenance: advertise no models until `resume` or --for ends")
    pause.add_argument("--for", dest="for_", metavar="DURATION", help="90s, 30m, 2h, 1d")
    pause.add_argument("--reason", metavar="TEXT", help="why (shown by status and in the log)")
    command("resume", "end a maintenance pause: advertise models again")
    doctor = command("doctor", "graded checks of this host with a fix hint each; changes nothing")
    doctor.add_argument("--json", action="store_true", help="the checks as one JSON object")
    _service_parser(command("service", "install or remove this installation as a systemd service"))
    coordinator = command("dev-coordinator", "the reference coordinator, for local testing")
    coordinator.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8765")
    _sim_backend_options(command("sim-backend", "a simulated backend, for tests and demos"))
    selftest = command("selftest", "one tiny completion through every advertised model")
    selftest.add_argument("--json", action="store_true", help="print the results as JSON")
    which = selftest.add_mutually_exclusive_group()
    which.add_argument(
        "--all", action="store_true", help="every BYOK model too, not only the cheapest of each"
    )
    which.add_argument(
        "--local",
        action="store_true",
        help="local backends only: no BYOK backend is discovered or tried (no key needed)",
    )
    command("demo", "the whole loop on loopback: simulated backends, coordinator, agent")
    _upgrade_parser(
        command(
            "upgrade",
            "build a new release beside the running one, gate it, switch with a drain, watch it; "
            "switch back by itself when it does not come up healthy",
        )
    )
    return parser


def _upgrade_parser(upgrade: argparse.ArgumentParser) -> None:
    which = upgrade.add_mutually_exclusive_group()
    which.add_argument(
        "--to", metavar="REF", help="a commit, tag or branch (default: the tracked upstream)"
    )
    which.add_argument(
        "--rollback", action="store_true", help="back to the release before the current one"
    )
    which.add_argument(
        "--list", dest="list_", action="store_true", help="the releases, the running one marked"
    )
    upgrade.add_argument(
        "--dry-run", action="store_true", help="fetch and say what would change; change nothing"
    )
    upgrade.add_argument(
        "--watch",
        metavar="DURATION",
        default="2m",
        help="how long the new release must stay up, ready, without a restart (default 2m)",
    )
    upgrade.add_argument(
        "--keep", metavar="N", type=int, default=3, help="releases to keep (default 3)"
    )
    upgrade.add_argument(
        "--yes",
        action="store_true",
        help="switch even when going back past the new release would be impossible",
    )
    upgrade.add_argument(
        "--install-dir",
        metavar="DIR",
        help="where releases/ and current are (default: from the installed unit)",
    )


class _GuardedOutput:
    """stdout, with its write errors told apart from every other OSError a command may meet."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            raise StdoutError(exc) from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise StdoutError(exc) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _service_parser(service: argparse.ArgumentParser) -> None:
    actions = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install",
        help="write the systemd unit and /etc/provider-agent, validate, enable and start",
        description="Install this installation as the systemd service provider-agent "
        "(--config defaults to /etc/provider-agent/agent.toml).",
    )
    _global_options(install, suppress=True)
    install.add_argument("--root", metavar="DIR", help="install under DIR; run no systemctl")
    install.add_argument("--no-start", action="store_true", help="enable, but do not start")
    install.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    uninstall = actions.add_parser(
        "uninstall",
        help="stop, disable and remove the service; keep config, identity and state",
        description="Stop (draining) and disable the service and remove its unit.",
    )
    _global_options(uninstall, suppress=True)
    uninstall.add_argument("--root", metavar="DIR", help="remove under DIR; run no systemctl")


#: `sim-backend --kind` choices (provider_agent.dev.sim.records.KINDS; kept here so that building
#: the parser imports nothing heavy).
SIM_KINDS = ("vllm", "llamacpp", "lmstudio", "ollama", "openrouter", "venice")


def _sim_backend_options(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--kind", required=True, choices=SIM_KINDS)
    sim.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="default 127.0.0.1 on the real server's port (8000, 8080, 1234, 11434); "
        "any free port for openrouter/venice",
    )
    sim.add_argument(
        "--model",
        metavar="NAME[=CTX]",
        action="append",
        help="a served model and its context window (repeat for more)",
    )
    sim.add_argument("--context", type=int, default=8192, metavar="N", help="default window")
    sim.add_argument("--tokens", type=int, default=16, metavar="N", help="tokens per response")
    sim.add_argument(
        "--tokens-per-s", type=float, default=40.0, metavar="R", help="0: as fast as possible"
    )
    sim.add_argument("--ttft-ms", type=float, default=0.0, metavar="MS", help="time to 1st token")
    sim.add_argument(
        "--slots",
        type=int,
        metavar="N",
        help="at most N completions at once; the rest queue (FIFO), as a saturated server does",
    )
    sim.add_argument(
        "--prefill-s-per-1k",
        type=float,
        default=0.0,
        metavar="S",
        help="prefill seconds per 1,000 prompt tokens (time to first byte grows with the prompt)",
    )
    sim.add_argument(
        "--fault",
        metavar="KIND[:ARG]",
        help="refuse, http:STATUS, hang, die:N, error:N, slow_health:SECONDS, loading, usage:JSON",
    )
    sim.add_argument("--fault-count", type=int, metavar="N", help="only the next N requests")
    sim.add_argument("--fault-scope", choices=["completions", "all"], default="completions")
    sim.add_argument(
        "--api-key-env", metavar="NAME", help="require the key held in this environment variable"
    )
    sim.add_argument("--price-in", default="0.5", metavar="USD", help="per 1M tokens (BYOK)")
    sim.add_argument("--price-out", default="1.5", metavar="USD", help="per 1M tokens (BYOK)")
    sim.add_argument("--no-anthropic", action="store_true", help="no /v1/messages")


def main(argv: Sequence[str] | None = None) -> int:
    guarded = _GuardedOutput(sys.stdout)
    sys.stdout = cast(TextIO, guarded)
    try:
        try:
            code = _main(argv)
        except SystemExit as stop:  # argparse: --version, --help, usage errors
            code = stop.code if isinstance(stop.code, int) else ExitCode.FAILURE
        sys.stdout.flush()
        return code
    except StdoutError as exc:
        _discard(guarded.stream)
        if exc.closed:
            return ExitCode.OK
        print(f"error: cannot write the output: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        sys.stdout = guarded.stream


def _discard(stream: TextIO) -> None:
    """Point stdout's descriptor at /dev/null, so the exit's own flush of what is still buffered
    cannot fail again (Python would print "Exception ignored ..." for it)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no descriptor (a test's capture): nothing to flush at exit
        pass


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(_joined_dash_values(sys.argv[1:] if argv is None else argv))
    from provider_agent.errors import ConfigError, IdentityError, StateDirError
    from provider_agent.observe import logs

    quiet_default = (
        "error" if args.command in _SILENT else "warn" if args.command in _QUIET else "info"
    )
    logs.setup(args.log_level or quiet_default)
    try:
        return _dispatch(args)
    except (ConfigError, IdentityError, StateDirError) as exc:
        kind = (
            "config"
            if isinstance(exc, ConfigError)
            else "identity"
            if isinstance(exc, IdentityError)
            else "state dir"
        )
        _fail(args, f"{kind} error: {exc}")
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _joined_dash_values(argv: Sequence[str]) -> list[str]:
    """`--for -5m` → `--for=-5m` (argparse would take `-5m` for an option and say only that
    `--for` expected one argument)."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else ""
        if arg in _DASH_VALUES and value[:1] == "-" and value[1:2].isdigit():
            out.append(f"{arg}={value}")
            index += 2
        else:
            out.append(arg)
            index += 1
    return out


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command or "run"
    plain = _PLAIN.get(command)
    if plain is not None:
        return plain(args)
    config_path = _config_path(args)
    return _CONFIGURED[command](args, _load(config_path, args), config_path)


def _config_path(args: argparse.Namespace) -> Path:
    from provider_agent.config.load import resolve_path

    return resolve_path(args.config)


def _load(path: Path, args: argparse.Namespace) -> Config:
    from provider_agent.config import load as config_module
    from provider_agent.observe import logs

    allow_insecure = args.allow_insecure or args.command in _LOCAL_ONLY
    config = config_module.load(path, allow_insecure=allow_insecure)
    if args.log_level is None and args.command not in _QUIET | _SILENT:
        logs.setup(config.observability.log_level, config.observability.log_format)
    return config


def _fail(args: argparse.Namespace, line: str) -> None:
    if args.log_level in ("debug", "trace"):
        log.exception(line)
    print(line, file=sys.stderr)


# --- the commands: each imports its `*_command` when it runs ------------------------------------


def _run(args: argparse.Namespace) -> int:
    from provider_agent import daemon

    return daemon.run_command(_config_path(args), args.allow_insecure, args.log_level)


def _dev_coordinator(args: argparse.Namespace) -> int:
    from provider_agent.dev.coordinator.server import dev_coordinator_command

    return dev_coordinator_command(args.listen)


def _sim_backend(args: argparse.Namespace) -> int:
    from provider_agent.dev.sim.command import run_command

    return run_command(args)


def _demo(args: argparse.Namespace) -> int:
    from provider_agent.dev.demo import demo_command

    return demo_command(args.log_level)


def _init(args: argparse.Namespace) -> int:
    from provider_agent.ops.init_config import init_command

    return init_command(args.output, args.force)


def _service(args: argparse.Namespace) -> int:
    from provider_agent.ops.service import service_command

    install = args.service_command == "install"  # only `install` has --no-start and --dry-run
    return service_command(
        args.service_command,
        args.config,
        args.root,
        start=not (install and args.no_start),
        dry_run=install and args.dry_run,
    )


def _upgrade(args: argparse.Namespace) -> int:
    from provider_agent.ops.upgrade.command import upgrade_command

    return upgrade_command(
        config=args.config,
        install_dir=args.install_dir,
        allow_insecure=args.allow_insecure,
        to=args.to,
        dry_run=args.dry_run,
        watch=args.watch,
        keep=args.keep,
        yes=args.yes,
        go_back=args.rollback,
        show=args.list_,
    )


def _validate(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.init_config import validate_command

    return validate_command(config)


def _identity(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.init_config import identity_command

    return identity_command(config)


def _discover(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.render import discover_command

    return discover_command(config, as_json=args.json)


def _status(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.render import status_command

    return status_command(config, path, as_json=args.json)


def _earnings(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.store.ledger import earnings_command

    return earnings_command(config.state.dir, args.since, args.until, args.by, as_csv=args.csv)


def _pause(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.pause import pause_command

    return pause_command(config.state.dir, args.for_, args.reason)


def _resume(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.pause import resume_command

    return resume_command(config.state.dir)


def _doctor(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.doctor import doctor_command

    return doctor_command(config, path, as_json=args.json)


def _selftest(args: argparse.Namespace, config: Config, path: Path) -> int:
    from provider_agent.ops.selftest import selftest_command

    return selftest_command(config, as_json=args.json, include_all=args.all, local_only=args.local)


#: Commands that load no config (`run` hands its path to the daemon, which loads it).
_PLAIN: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "dev-coordinator": _dev_coordinator,
    "sim-backend": _sim_backend,
    "demo": _demo,
    "init": _init,
    "service": _service,
    "upgrade": _upgrade,
}
#: Commands given the config, loaded (errors: exit 78), and its path.
_CONFIGURED: dict[str, Callable[[argparse.Namespace, Config, Path], int]] = {
    "validate": _validate,
    "identity": _identity,
    "discover": _discover,
    "status": _status,
    "earnings": _earnings,
    "pause": _pause,
    "resume": _resume,
    "doctor": _doctor,
    "selftest": _selftest,
}
