"""The `provider-agent` command line (shared/spec/cli.md). Thin: each command calls one function.

Exit codes: 0 ok, 1 other failure, 78 (EX_CONFIG) for any configuration or identity error, so a
systemd unit with `RestartPreventExitStatus=78` does not loop on a broken file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from provider_agent import __version__

if TYPE_CHECKING:
    from provider_agent.config import Config
    from provider_agent.discovery import PassResult

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78
log = logging.getLogger("provider_agent.cli")
#: Commands whose stdout is the point: info-level chatter stays off unless asked for.
_QUIET = frozenset({"validate", "discover", "identity", "init"})


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global options, accepted before or after the subcommand."""
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
        help="accept a ws:// coordinator URL (testing only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provider-agent",
        description="Sell this machine's inference on the marketplace.",
    )
    parser.add_argument("--version", action="version", version=f"provider-agent {__version__}")
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
    coordinator = command("dev-coordinator", "the reference coordinator, for local testing")
    coordinator.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8765")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from provider_agent import logs
    from provider_agent.errors import ConfigError, IdentityError

    quiet_default = "warn" if args.command in _QUIET else "info"
    logs.setup(args.log_level or quiet_default)
    try:
        return _dispatch(args)
    except (ConfigError, IdentityError) as exc:
        kind = "config" if isinstance(exc, ConfigError) else "identity"
        _fail(args, f"{kind} error: {exc}")
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command or "run"
    if command == "dev-coordinator":
        return _dev_coordinator(args.listen)
    if command == "init":
        return _init(Path(args.output), args.force)
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
    raise AssertionError(command)


def _config_path(args: argparse.Namespace) -> Path:
    from provider_agent.config import resolve_path

    return resolve_path(args.config)


def _load(path: Path, args: argparse.Namespace) -> Config:
    from provider_agent import config as config_module
    from provider_agent import logs

    config = config_module.load(path, allow_insecure=args.allow_insecure)
    if args.log_level is None and args.command not in _QUIET:
        logs.setup(config.observability.log_level, config.observability.log_format)
    return config


def _fail(args: argparse.Namespace, line: str) -> None:
    if args.log_level in ("debug", "trace"):
        log.exception(line)
    print(line, file=sys.stderr)


def _validate(config: Config) -> int:
    if not config.backends:
        print("warning: no [[backends]] configured: nothing will be offered", file=sys.stderr)
    print(f"ok: {len(config.backends)} backend(s)")
    return EX_OK


def _discover(config: Config, *, as_json: bool) -> int:
    import anyio

    from provider_agent.backends.base import new_http_session
    from provider_agent.discovery import run_pass
    from provider_agent.protocol import encode

    async def one_pass() -> PassResult:
        async with new_http_session(config.limits.max_concurrent) as http:
            return await run_pass(config, http)

    result = anyio.run(one_pass)
    if as_json:
        print(encode(result.catalog.capabilities))
    else:
        print(render_discovery(result))
    return EX_OK


def render_discovery(result: PassResult) -> str:
    """The readable `discover` table: the backends, then the advertised models. Columns fit
    their content (a backend's name keeps its port); text from outside is escaped. LISTED is
    what a backend reported, ADVERTISED how many advertised models it serves."""
    from provider_agent.text import printable

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


def _identity(config: Config) -> int:
    from provider_agent.identity import load_or_create

    identity = load_or_create(config.identity.key_path)
    print(f"public_key: {identity.public_key_b64}")
    print(f"provider_id: {identity.provider_id or 'none'}")
    return EX_OK


def _init(output: Path, force: bool) -> int:
    import anyio

    from provider_agent.init_config import run_init

    try:
        path, detected = anyio.run(run_init, output, force)
    except FileExistsError:
        print(f"init: {output} exists; pass --force to overwrite it", file=sys.stderr)
        return EX_FAILURE
    except OSError as exc:
        print(f"init: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return EX_FAILURE
    found = ", ".join(f"{d.kind} at {d.url}" for d in detected) or "no local backend"
    print(f"wrote {path} ({found}); edit [coordinator] url and [pricing], then `validate`")
    return EX_OK


def _dev_coordinator(listen: str) -> int:
    import anyio

    from provider_agent.dev.coordinator import serve

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"dev-coordinator: --listen must be HOST:PORT, not {listen!r}", file=sys.stderr)
        return EX_FAILURE
    try:
        anyio.run(serve, host.strip("[]"), int(port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"dev-coordinator: cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr)
        return EX_FAILURE
    return EX_OK
