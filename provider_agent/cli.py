"""The `provider-agent` command line (shared/spec/cli.md). Thin: each command calls one function.

Exit codes: 0 ok, 1 other failure, 2 an invalid argument (one line saying which and why), 78
(EX_CONFIG) for any configuration or identity error, so a systemd unit with
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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TextIO, cast

from provider_agent import __version__

if TYPE_CHECKING:
    from provider_agent.config import Config
    from provider_agent.discovery.run_pass import PassResult
    from provider_agent.observe.status import AgentStatus

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_CONFIG = 78
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
    }
)
#: Commands whose output already says everything the log would (`doctor` grades each check).
_SILENT = frozenset({"doctor"})
#: Operator commands that read local state or ask the running agent, never dialling the
#: coordinator or a backend: a ws:// coordinator URL does not stop them (cli.md, settled).
_LOCAL_ONLY = frozenset({"status", "earnings", "pause", "resume"})
#: Options whose value may start with `-` (`pause --for -5m`): passed to argparse joined
#: (`--for=-5m`), so that the value reaches the check that says why it is wrong.
_DASH_VALUES = frozenset({"--for", "--since", "--until"})


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line saying which and why (cli.md: exit 2)."""

    def error(self, message: str) -> NoReturn:
        from provider_agent.safe_text import printable

        self.exit(EX_USAGE, f"{self.prog}: {printable(message, 300)} (see --help)\n")


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
    selftest.add_argument(
        "--all", action="store_true", help="every BYOK model too, not only the cheapest of each"
    )
    command("demo", "the whole loop on loopback: simulated backends, coordinator, agent")
    return parser


class _OutputError(Exception):
    """Writing stdout failed; `closed` when the reader went away (EPIPE)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or "input/output error")
        self.closed = isinstance(error, BrokenPipeError)


class _GuardedOutput:
    """stdout, with its write errors told apart from every other OSError a command may meet."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            raise _OutputError(exc) from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise _OutputError(exc) from exc

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


#: `sim-backend --kind` choices (provider_agent.dev.sim.backend.KINDS; kept here so that building
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
            code = stop.code if isinstance(stop.code, int) else EX_FAILURE
        sys.stdout.flush()
        return code
    except _OutputError as exc:
        _discard(guarded.stream)
        if exc.closed:
            return EX_OK
        print(f"error: cannot write the output: {exc}", file=sys.stderr)
        return EX_FAILURE
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
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


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
    if command == "dev-coordinator":
        return _dev_coordinator(args.listen)
    if command == "sim-backend":
        from provider_agent.dev.sim.backend import run_command

        return run_command(args)
    if command == "init":
        return _init(args.output, args.force)
    if command == "service":
        return _service(args)
    if command == "demo":
        from provider_agent.dev.demo import demo_command

        return demo_command(args.log_level)
    config_path = _config_path(args)
    if command == "run":
        from provider_agent.daemon import run_daemon

        return run_daemon(config_path, args.allow_insecure, args.log_level)
    config = _load(config_path, args)
    if command == "validate":
        return _validate(config)
    if command == "discover":
        return _discover(config, as_json=args.json)
    if command == "identity":
        return _identity(config)
    if command == "status":
        return _status(config, config_path, as_json=args.json)
    if command == "earnings":
        from provider_agent.store.ledger import earnings_command

        return earnings_command(config.state.dir, args.since, args.until, args.by, as_csv=args.csv)
    if command in ("pause", "resume"):
        return _pause_or_resume(config, command, args)
    if command == "doctor":
        from provider_agent.ops.doctor import doctor_command

        return doctor_command(config, config_path, as_json=args.json)
    if command == "selftest":
        from provider_agent.ops.selftest import selftest_command

        return selftest_command(config, as_json=args.json, include_all=args.all)
    raise AssertionError(command)


def _config_path(args: argparse.Namespace) -> Path:
    from provider_agent.config import resolve_path

    return resolve_path(args.config)


def _load(path: Path, args: argparse.Namespace) -> Config:
    from provider_agent import config as config_module
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


def _validate(config: Config) -> int:
    if not config.backends:
        print("warning: no [[backends]] configured: nothing will be offered", file=sys.stderr)
    if config.coordinator.is_placeholder:
        print(
            "warning: coordinator.url is still a placeholder (a host reserved for examples, like "
            "the `# CHANGE ME` one `init` writes): set the marketplace's wss:// address",
            file=sys.stderr,
        )
    print(f"ok: {len(config.backends)} backend(s)")
    return EX_OK


def _discover(config: Config, *, as_json: bool) -> int:
    from provider_agent.backends.base import new_http_session
    from provider_agent.discovery.run_pass import run_pass
    from provider_agent.link.protocol import encode
    from provider_agent.runtime import Stopped, run_until_signal

    async def one_pass() -> PassResult:
        async with new_http_session(config.limits.max_concurrent) as http:
            return await run_pass(config, http)

    result = run_until_signal(one_pass)
    if isinstance(result, Stopped):
        return result.exit_code
    if as_json:
        print(encode(result.catalog.capabilities))
    else:
        print(render_discovery(result))
    return EX_OK


def render_discovery(result: PassResult) -> str:
    """The readable `discover` table: the backends, then the advertised models. Columns fit
    their content (a backend's name keeps its port); text from outside is escaped. LISTED is
    what a backend reported, ADVERTISED how many advertised models it serves."""
    from provider_agent.safe_text import printable

    serving: dict[str, int] = {}
    for routes in result.catalog.routes.values():
        for name in {route.backend for route in routes}:
            serving[name] = serving.get(name, 0) + 1
    backend_rows: list[list[str]] = []
    errors: dict[int, str] = {}
    for report in result.reports:
        if report.error:
            errors[len(backend_rows)] = f"    error: {printable(report.error, 500)}"
        backend_rows.append(
            [
                printable(report.name, 300),
                report.kind,
                "ok" if report.ok else "FAIL",
                f"{report.health.latency_ms:.0f}ms",
                str(len(report.models)),
                str(serving.get(report.name, 0)),
                ",".join(sorted(report.formats)) or "-",
            ]
        )
    lines = _columns(
        ["BACKEND", "KIND", "HEALTH", "LATENCY", "LISTED", "ADVERTISED", "FORMATS"],
        backend_rows,
        right=(3, 4, 5),
        after=errors,
    )
    if not result.reports:
        lines.append("(no backends configured)")
    lines.append("")
    offers = result.catalog.capabilities.models
    model_rows = [
        [
            printable(offer.model_id, 300),
            offer.backend,
            str(offer.context_window) if offer.context_window is not None else "?",
            str(offer.input_per_1m),
            str(offer.output_per_1m),
            ",".join(offer.formats),
        ]
        for offer in offers
    ]
    lines += _columns(
        ["MODEL", "BACKEND", "CONTEXT", "IN/1M", "OUT/1M", "FORMATS"], model_rows, right=(2, 3, 4)
    )
    if not offers:
        lines.append("(no model advertised)")
    lines.append("")
    lines.append("prices: USDC micro-units per 1M tokens")
    return "\n".join(lines)


def _columns(
    headers: list[str],
    rows: list[list[str]],
    *,
    right: Sequence[int] = (),
    after: dict[int, str] | None = None,
) -> list[str]:
    """A header and rows with each column as wide as its widest cell (`right`: right-aligned
    columns); `after[i]` is a line printed under row i."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    out = [line(headers)]
    for index, row in enumerate(rows):
        out.append(line(row))
        if after and index in after:
            out.append(after[index])
    return out


def _status(config: Config, config_path: Path, *, as_json: bool) -> int:
    import anyio

    from provider_agent.observe.http_api import StatusUnavailable, fetch_status, status_url

    listen = config.observability.listen
    if listen is None:
        print(
            f'status: the HTTP endpoint is disabled (observability.prometheus_addr = "" in '
            f"{config_path}): set an address, restart the agent, then ask again",
            file=sys.stderr,
        )
        return EX_FAILURE
    try:
        current = anyio.run(fetch_status, status_url(*listen))
    except StatusUnavailable as exc:
        print(f"status: {exc}", file=sys.stderr)
        return EX_FAILURE
    print(current.model_dump_json(indent=2) if as_json else render_status(current))
    return EX_OK


def render_status(status: AgentStatus) -> str:
    """`status` for a person: a summary (the pause, when paused), the backends, the models and
    their routes, withdrawn routes, the GPUs, the jobs running and the last errors. Everything in
    it came from whatever answered on the agent's port: every string is escaped, whichever
    field it is in (`_escaped`), before any of it is laid out."""
    from provider_agent.safe_text import printable

    status = _escaped(status)
    jobs, session, window = status.jobs, status.session, status.rate_window
    if session.authenticated and session.connected_for_s is not None:
        link = f"authenticated for {_span(session.connected_for_s)}"
    else:
        link = session.state
    limit = f"of {window.limit} ({window.fill:.0%})" if window.limit is not None else "(no limit)"
    outbox = status.outbox
    if outbox.depth is None:
        waiting = f"unknown ({printable(outbox.error)})"
    else:
        waiting = f"{outbox.depth} terminal frame(s) unconfirmed"
        if outbox.oldest_age_s is not None:
            waiting += f", oldest {_span(outbox.oldest_age_s)}"
    lines = [
        f"provider-agent {printable(status.agent_version)}, up {_span(status.uptime_s)} "
        f"(since {status.started_at})",
        f"provider_id: {printable(status.provider_id or 'none')}",
        f"session: {link} ({session.attempts} connection attempt(s), "
        f"{session.reconnects} reconnect(s))",
        f"readiness: {printable(status.readiness.reason)}",
        f"advertising: {status.models_advertised} model(s) ({printable(status.advertising)})",
        *_pause_lines(status),
        f"jobs: {jobs.in_flight} in flight of {jobs.max_concurrent}; last 60 s: "
        f"TTFB p50 {jobs.p50_ttfb_ms:.0f} ms, p95 {jobs.p95_ttfb_ms:.0f} ms, "
        f"{jobs.tokens_per_sec_p50:g} tokens/s, error rate {jobs.error_rate_60s:.1%}",
        f"outbox: {waiting}",
        f"rate window: {window.tokens_last_60s} tokens in the last 60 s {limit}",
        f"last discovery pass: {status.last_pass_at or 'not finished yet'}",
        "",
    ]
    errors: dict[int, str] = {}
    backend_rows: list[list[str]] = []
    for backend in status.backends:
        if backend.error:
            errors[len(backend_rows)] = f"    error: {printable(backend.error, 500)}"
        latency = f"{backend.latency_ms:.0f}ms" if backend.latency_ms is not None else "-"
        health = "ok" if backend.healthy else "FAIL"
        if backend.healthy and backend.probe_skipped:
            health = "ok (jobs)"
        backend_rows.append(
            [
                printable(backend.name, 300),
                backend.kind,
                health,
                latency,
                str(backend.models_listed),
            ]
        )
    lines += _columns(
        ["BACKEND", "KIND", "HEALTH", "LATENCY", "LISTED"], backend_rows, right=(3, 4), after=errors
    )
    if not status.backends:
        lines.append("(no backends configured)")
    lines.append("")
    model_rows = [
        [
            printable(model.model_id, 300),
            str(model.context_window) if model.context_window is not None else "?",
            ",".join(model.formats),
            ", ".join(printable(route.backend, 300) for route in model.routes),
        ]
        for model in status.models
    ]
    lines += _columns(["MODEL", "CONTEXT", "FORMATS", "ROUTES"], model_rows, right=(1,))
    if not status.models:
        lines.append("(no model to serve)")
    lines += _withdrawn_lines(status) + _gpu_lines(status)
    if jobs.running:
        lines.append("")
        job_rows = [
            [
                printable(job.job_id, 128),
                printable(job.model_id, 300),
                printable(job.backend or "-", 300),
                _span(job.age_s),
                str(job.bytes_relayed),
            ]
            for job in jobs.running
        ]
        lines += _columns(["JOB", "MODEL", "BACKEND", "AGE", "BYTES"], job_rows, right=(3, 4))
    if status.last_errors:
        lines += ["", "last errors (newest first):"]
        lines += [
            f"  {note.at} {note.source} {printable(note.code)}: {printable(note.message, 500)}"
            for note in status.last_errors
        ]
    return "\n".join(lines)


#: No field of a real `/status` comes near this; one that does is cut (with a marker).
_STATUS_TEXT_LIMIT = 1000


def _escaped(status: AgentStatus) -> AgentStatus:
    """`status` with every string in it made printable (control characters, terminal escape
    sequences, bidi overrides shown as escapes; each at most _STATUS_TEXT_LIMIT characters)."""
    from provider_agent.observe.status import AgentStatus
    from provider_agent.safe_text import printable

    def walk(value: object) -> object:
        if isinstance(value, str):
            return printable(value, _STATUS_TEXT_LIMIT)
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        return value

    return AgentStatus.model_validate(walk(status.model_dump()))


def _withdrawn_lines(status: AgentStatus) -> list[str]:
    """Routes withdrawn for failing jobs, a row each."""
    from provider_agent.safe_text import printable

    if not status.withdrawn_routes:
        return []
    rows = [
        [
            printable(route.backend, 300),
            printable(route.model, 300),
            route.since,
            printable(route.last_code or "-"),
            str(route.probes),
            _span(route.next_probe_in_s) if route.next_probe_in_s is not None else "-",
        ]
        for route in status.withdrawn_routes
    ]
    return [
        "",
        "withdrawn routes (their last jobs failed; a one-token completion brings one back):",
        *_columns(
            ["BACKEND", "MODEL", "SINCE", "LAST FAILURE", "PROBES", "NEXT PROBE"],
            rows,
            right=(4, 5),
        ),
    ]


def _gpu_lines(status: AgentStatus) -> list[str]:
    """The last GPU sample, a row per GPU and why an unhealthy one is."""
    from provider_agent.safe_text import printable

    if not status.gpus:
        return []
    faults: dict[int, str] = {}
    rows: list[list[str]] = []
    for gpu in status.gpus:
        if gpu.faults:
            shown = "; ".join(printable(fault, 300) for fault in gpu.faults)
            faults[len(rows)] = f"    unhealthy: {shown}"
        rows.append(
            [
                str(gpu.index),
                printable(gpu.name or "?", 100),
                _memory(gpu.memory_used_mb, gpu.memory_total_mb),
                f"{gpu.utilization_pct}%" if gpu.utilization_pct is not None else "-",
                f"{gpu.temperature_c} C" if gpu.temperature_c is not None else "-",
                f"{gpu.power_w:g} W" if gpu.power_w is not None else "-",
                "ok" if gpu.healthy else "FAIL",
            ]
        )
    header = ["GPU", "NAME", "MEMORY", "UTIL", "TEMP", "POWER", "HEALTH"]
    return ["", *_columns(header, rows, right=(0, 2, 3, 4, 5), after=faults)]


def _pause_lines(status: AgentStatus) -> list[str]:
    """`paused: …` while paused (until when, the time left, why); nothing otherwise."""
    from provider_agent.safe_text import printable

    pause = status.paused
    if pause is None:
        return []
    if pause.until is not None:
        left = f" ({_span(pause.left_s)} left)" if pause.left_s is not None else ""
        when = f"until {pause.until}{left}"
    else:
        when = "until `provider-agent resume`"
    why = f"; reason: {printable(pause.reason, 500)}" if pause.reason else ""
    return [f"paused: since {pause.since}, {when}{why}"]


def _memory(used_mb: int | None, total_mb: int | None) -> str:
    """`70211/81559 MiB`, with `?` for what the device did not say."""
    if used_mb is None and total_mb is None:
        return "-"
    shown = [str(v) if v is not None else "?" for v in (used_mb, total_mb)]
    return f"{shown[0]}/{shown[1]} MiB"


def _span(seconds: float) -> str:
    """A duration as a person reads it: 45s, 12m 03s, 3h 04m, 2d 03h."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _identity(config: Config) -> int:
    from provider_agent.link.identity import load_or_create

    identity = load_or_create(config.identity.key_path)
    if identity.created:
        print(
            f"identity: created a new key at {identity.path} (mode 0600); back it up: "
            "it is this provider's identity",
            file=sys.stderr,
        )
    print(f"public_key: {identity.public_key_b64}")
    print(f"provider_id: {identity.provider_id or 'none'}")
    print(f"key_file: {identity.path}")
    return EX_OK


def _pause_or_resume(config: Config, command: str, args: argparse.Namespace) -> int:
    """`pause` / `resume`: one request over the running agent's control socket."""
    import anyio

    from provider_agent.ops import pause as control

    try:
        for_s = (
            control.parse_duration(args.for_)
            if command == "pause" and args.for_ is not None
            else None
        )
        reason = args.reason if command == "pause" else None
        if reason is not None:
            control.check_reason(reason)
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EX_USAGE
    op: Literal["pause", "resume"] = "pause" if command == "pause" else "resume"
    request = control.ControlRequest(op=op, for_s=for_s, reason=reason)
    try:
        reply = anyio.run(control.call, config.state.dir, request)
    except control.ControlError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EX_FAILURE
    if reply.paused is not None:
        print(f"paused: no models advertised {reply.paused.describe()}")
    elif reply.changed:
        print("resumed: models are advertised again")
    else:
        print("not paused: nothing to resume")
    return EX_OK


def _init(output_option: str, force: bool) -> int:
    import anyio

    from provider_agent.ops.init_config import OutputError, run_init

    if not output_option.strip():
        print("init: --output is empty: give the path of the file to write", file=sys.stderr)
        return EX_FAILURE
    output = Path(output_option)
    try:
        path, detected = anyio.run(run_init, output, force)
    except OutputError as exc:
        print(f"init: {exc}", file=sys.stderr)
        return EX_FAILURE
    except FileExistsError:
        print(f"init: {output} exists; pass --force to overwrite it", file=sys.stderr)
        return EX_FAILURE
    except OSError as exc:
        print(f"init: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return EX_FAILURE
    found = ", ".join(f"{d.kind} at {d.url}" for d in detected) or "no local backend"
    print(f"wrote {path} ({found}); edit [coordinator] url and [pricing], then `validate`")
    return EX_OK


def _service(args: argparse.Namespace) -> int:
    from provider_agent.ops import service
    from provider_agent.safe_text import printable

    if args.root is not None:
        problem = service.root_problem(args.root)
        if problem is not None:
            shown = printable(repr(args.root), 300)
            print(f"service {args.service_command}: --root {shown}: {problem}", file=sys.stderr)
            return EX_USAGE
    target = service.target_for(args.config, args.root)
    try:
        if args.service_command == "install":
            report = service.install(
                target, service.Host(), start=not args.no_start, dry_run=args.dry_run
            )
        else:
            report = service.uninstall(target, service.Host())
    except service.ServiceError as exc:
        print(f"service {args.service_command}: {exc}", file=sys.stderr)
        return EX_FAILURE
    print("\n".join(report.lines))
    return EX_OK


def _dev_coordinator(listen: str) -> int:
    import anyio

    from provider_agent.dev.coordinator import parse_listen, serve

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        print(f"dev-coordinator: {exc}", file=sys.stderr)
        return 2  # a usage error, as argparse's own
    from provider_agent.runtime import event_loop_options, settle_heap

    settle_heap()
    try:
        anyio.run(serve, host, port, backend_options=event_loop_options())
    except KeyboardInterrupt:
        pass  # SIGINT before the signal handlers were installed: a requested stop all the same
    except OSError as exc:
        print(f"dev-coordinator: cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr)
        return EX_FAILURE
    return EX_OK
