"""The `discover` and `status` commands and their tables for a person (shared/spec/cli.md).

Every string in a table came from outside (a backend, whatever answered on the agent's port) and
is escaped before it is laid out; columns fit their content.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from provider_agent.clock import human_duration
from provider_agent.errors import ExitCode

if TYPE_CHECKING:
    from provider_agent.config.schema import Config
    from provider_agent.discovery.run_pass import PassResult
    from provider_agent.observe.status import AgentStatus, RouteStatus


def discover_command(config: Config, *, as_json: bool) -> int:
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
    return ExitCode.OK


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
    lines = columns(
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
    lines += columns(
        ["MODEL", "BACKEND", "CONTEXT", "IN/1M", "OUT/1M", "FORMATS"], model_rows, right=(2, 3, 4)
    )
    if not offers:
        lines.append("(no model advertised)")
    lines.append("")
    lines.append("prices: USDC micro-units per 1M tokens")
    return "\n".join(lines)


def columns(
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


def status_command(config: Config, config_path: Path, *, as_json: bool) -> int:
    import anyio

    from provider_agent.errors import StatusUnavailable
    from provider_agent.observe.http_api import fetch_status, status_url

    listen = config.observability.listen
    if listen is None:
        print(
            f'status: the HTTP endpoint is disabled (observability.prometheus_addr = "" in '
            f"{config_path}): set an address, restart the agent, then ask again",
            file=sys.stderr,
        )
        return ExitCode.FAILURE
    try:
        current = anyio.run(fetch_status, status_url(*listen))
    except StatusUnavailable as exc:
        print(f"status: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    print(current.model_dump_json(indent=2) if as_json else render_status(current))
    return ExitCode.OK


def render_status(status: AgentStatus) -> str:
    """`status` for a person: a summary (the pause, when paused), the backends, the models and
    their routes, withdrawn routes, the GPUs, the jobs running and the last errors. Everything in
    it came from whatever answered on the agent's port: every string is escaped, whichever
    field it is in (`_escaped`), before any of it is laid out."""
    from provider_agent.safe_text import printable

    status = _escaped(status)
    jobs, session, window = status.jobs, status.session, status.rate_window
    if session.authenticated and session.connected_for_s is not None:
        link = f"authenticated for {human_duration(session.connected_for_s)}"
    else:
        link = session.state
    limit = f"of {window.limit} ({window.fill:.0%})" if window.limit is not None else "(no limit)"
    outbox = status.outbox
    if outbox.depth is None:
        waiting = f"unknown ({printable(outbox.error)})"
    else:
        waiting = f"{outbox.depth} terminal frame(s) unconfirmed"
        if outbox.oldest_age_s is not None:
            waiting += f", oldest {human_duration(outbox.oldest_age_s)}"
    lines = [
        f"provider-agent {printable(status.agent_version)}, up {human_duration(status.uptime_s)} "
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
    lines += columns(
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
            ", ".join(_route_text(route) for route in model.routes),
        ]
        for model in status.models
    ]
    lines += columns(["MODEL", "CONTEXT", "FORMATS", "ROUTES"], model_rows, right=(1,))
    if any(route.limit is not None for model in status.models for route in model.routes):
        lines.append(
            "(n/m: the route's concurrency limit, learned from its time to first byte, of its "
            "ceiling; jobs beyond it are refused out_of_capacity)"
        )
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
                human_duration(job.age_s),
                str(job.bytes_relayed),
            ]
            for job in jobs.running
        ]
        lines += columns(["JOB", "MODEL", "BACKEND", "AGE", "BYTES"], job_rows, right=(3, 4))
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


def _route_text(route: RouteStatus) -> str:
    """`backend (3/8, 120 ms)`: the route's limit of its ceiling and its unloaded time."""
    from provider_agent.safe_text import printable

    name = printable(route.backend, 300)
    if route.limit is None:
        return name
    baseline = f", {route.ttfb_baseline_ms:g} ms" if route.ttfb_baseline_ms is not None else ""
    return f"{name} ({route.limit}/{route.ceiling}{baseline})"


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
            human_duration(route.next_probe_in_s) if route.next_probe_in_s is not None else "-",
        ]
        for route in status.withdrawn_routes
    ]
    return [
        "",
        "withdrawn routes (their last jobs failed; a one-token completion brings one back):",
        *columns(
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
    return ["", *columns(header, rows, right=(0, 2, 3, 4, 5), after=faults)]


def _pause_lines(status: AgentStatus) -> list[str]:
    """`paused: …` while paused (until when, the time left, why); nothing otherwise."""
    from provider_agent.safe_text import printable

    pause = status.paused
    if pause is None:
        return []
    if pause.until is not None:
        left = f" ({human_duration(pause.left_s)} left)" if pause.left_s is not None else ""
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
