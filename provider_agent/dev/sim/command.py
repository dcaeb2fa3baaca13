"""`provider-agent sim-backend`: one simulator, served until SIGTERM or SIGINT. It prints one stdout
line, `sim-backend: KIND serving MODELS at BASE_URL`, because scripts read the URL from it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from decimal import Decimal, InvalidOperation

import anyio

from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.dev.sim.records import DEFAULT_PORTS, SimModel
from provider_agent.errors import ExitCode


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) → (host, port); ValueError for anything else."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT with a port of 0-65535, not {text!r}")
    if not host.isprintable() or any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(f"--listen must be HOST:PORT with a port of 0-65535, not {text!r}")
    return host, int(port)


def parse_model(spec: str, context_window: int) -> SimModel:
    """`NAME` or `NAME=CTX` from `--model`."""
    name, sep, context = spec.rpartition("=")
    if not sep:
        return SimModel(spec, context_window)
    if not name or not (context.isascii() and context.isdigit()):
        raise ValueError(f"--model must be NAME or NAME=CTX (CTX a whole number), not {spec!r}")
    return SimModel(name, int(context))


def sim_from_args(args: argparse.Namespace) -> SimBackend:
    """The simulator `sim-backend`'s options describe; ValueError with a one-line reason."""
    default_port = DEFAULT_PORTS.get(args.kind, 0)
    listen = args.listen if args.listen is not None else f"127.0.0.1:{default_port}"
    host, port = parse_listen(listen)
    models = [parse_model(spec, args.context) for spec in args.model] if args.model else None
    if args.fault_count is not None and args.fault is None:
        raise ValueError("--fault-count needs --fault")
    fault = Fault.from_spec(args.fault, args.fault_count, args.fault_scope) if args.fault else None
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env!r} is unset")
    try:
        prices = Decimal(args.price_in), Decimal(args.price_out)
    except InvalidOperation:
        raise ValueError("--price-in and --price-out must be decimal numbers") from None
    if not all(p.is_finite() and p >= 0 for p in prices):
        raise ValueError("--price-in and --price-out must be ≥ 0")
    if args.context < 1:
        raise ValueError("--context must be ≥ 1")
    return SimBackend(
        args.kind,
        models,
        context_window=args.context,
        tokens=args.tokens,
        tokens_per_s=args.tokens_per_s,
        ttft_s=args.ttft_ms / 1000,
        # `--slots N` and `--prefill-s-per-1k S`; absent from a parser without them.
        slots=getattr(args, "slots", None),
        prefill_s_per_1k=getattr(args, "prefill_s_per_1k", 0.0),
        api_key=api_key,
        anthropic=not args.no_anthropic,
        price_in_usd_per_1m=prices[0],
        price_out_usd_per_1m=prices[1],
        fault=fault,
        host=host,
        port=port,
    )


async def serve_until_signalled(sim: SimBackend) -> None:
    """Serve until SIGTERM or SIGINT; the one stdout line says where (scripts read the URL)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with sim:
            names = ", ".join(m.name for m in sim.models)
            try:
                print(f"sim-backend: {sim.kind} serving {names} at {sim.base_url}", flush=True)
            except BrokenPipeError:
                return  # nobody reads stdout: end quietly
            async for _ in signals:
                return


def run_command(args: argparse.Namespace) -> int:
    """`provider-agent sim-backend`: 0 after SIGTERM/SIGINT; a bad option is one line and exit
    2; an address it cannot listen on, one line and exit 1."""
    try:
        sim = sim_from_args(args)
    except ValueError as exc:
        print(f"sim-backend: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        anyio.run(serve_until_signalled, sim)
    except KeyboardInterrupt:  # SIGINT before the receiver was installed
        pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"sim-backend: cannot listen on {sim.host}:{sim.port}: {reason}", file=sys.stderr)
        return 1
    return 0
