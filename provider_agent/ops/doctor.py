"""`provider-agent doctor`: graded checks of this host, each with a fix hint (cli.md).

One command an operator runs when something is wrong. Each check is `ok`, `warn` or `fail`;
exit 1 when any fails. It never changes anything: files are only looked at (the outbox is opened
read-only, the identity key only read), the coordinator is taken as far as its `auth_challenge`
and no further (no `auth_response`: no enrollment code is spent and the running agent's session
is never displaced), and the only request that does work is one tiny completion per backend
(the cheapest model of a BYOK backend), which touches no outbox, ledger or statistics.

The grading rules are pure functions at the top; the probes that feed them are below.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from provider_agent.backends import Registry
from provider_agent.backends.base import USER_AGENT, new_http_session
from provider_agent.clock import human_duration
from provider_agent.config.schema import BackendConfig, Config
from provider_agent.discovery.catalog import Route
from provider_agent.discovery.run_pass import BackendReport, PassResult, run_pass
from provider_agent.errors import ControlError, IdentityError, NotRunning
from provider_agent.jobs.one_completion import tiny_completion
from provider_agent.link.identity import load as load_identity
from provider_agent.link.protocol import AuthChallenge, GpuSample, decode
from provider_agent.observe.telemetry import PACKAGE_MISSING, GpuTelemetry, Nvml, load_nvml
from provider_agent.ops import pause as control
from provider_agent.safe_text import printable
from provider_agent.store.engine import FILE_NAME as OUTBOX_FILE
from provider_agent.store.engine import describe_sqlite_error
from provider_agent.store.outbox import UNDELIVERED_KEEP_S
from provider_agent.store.statedir import lock_holder

Grade = Literal["ok", "warn", "fail"]

#: Free space in the state dir below which the outbox and ledger are at risk.
FREE_FAIL_BYTES = 100 * 1024 * 1024
FREE_WARN_BYTES = 1024 * 1024 * 1024
#: Clock skew against the coordinator's `Date` (which has 1 s resolution).
SKEW_WARN_S = 10.0
SKEW_FAIL_S = 300.0
#: Undelivered billing records: worth a look after this long, and at risk (dropped at
#: UNDELIVERED_KEEP_S) after the second.
OUTBOX_WARN_AGE_S = 86400.0
OUTBOX_FAIL_AGE_S = UNDELIVERED_KEEP_S - 86400
#: Each network step (resolve, connect, TLS, upgrade, first frame) gets this long.
STEP_TIMEOUT_S = 10.0
#: The tiny completion per backend (a cold model may take a while to load).
COMPLETION_TIMEOUT_S = 30.0
NVML_TIMEOUT_S = 5.0
TEXT_LIMIT = 300
UNIT_HINT = (
    "run it with the unit in systemd/provider-agent.service (`provider-agent service install`)"
)


@dataclass(frozen=True)
class Check:
    """One graded result; `hint` says what to do about anything but ok."""

    name: str
    grade: Grade
    detail: str
    hint: str | None = None


# --- pure grading --------------------------------------------------------------------------------


def overall(checks: Sequence[Check]) -> int:
    """The exit code: 1 when any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.grade == "fail" for c in checks) else 0


def grade_key_mode(path: Path, mode: int) -> Check:
    bits = stat.S_IMODE(mode)
    if not stat.S_ISREG(mode):
        return Check(
            "identity", "fail", f"{path} is not a regular file", "point key_path at the key file"
        )
    if bits & 0o077:
        return Check(
            "identity",
            "fail",
            f"{path} has mode {bits:04o}: others can read the secret key",
            f"chmod 600 {path}",
        )
    return Check("identity", "ok", f"{path} (mode {bits:04o})")


def grade_free_space(path: Path, free: int) -> Check:
    shown = f"{free / 1024**3:.1f} GiB free at {path}"
    if free < FREE_FAIL_BYTES:
        hint = "free disk space: the outbox cannot store billing records without it"
        return Check("disk space", "fail", shown, hint)
    if free < FREE_WARN_BYTES:
        return Check("disk space", "warn", shown, "free some disk space soon")
    return Check("disk space", "ok", shown)


def grade_skew(skew_s: float) -> Check:
    """`skew_s`: our clock minus the coordinator's (positive: ours is ahead)."""
    shown = f"{abs(skew_s):.0f}s {'ahead of' if skew_s > 0 else 'behind'} the coordinator"
    hint = "synchronise the clock (e.g. `timedatectl set-ntp true`)"
    if abs(skew_s) > SKEW_FAIL_S:
        return Check("clock", "fail", shown + ": timestamps on billing records are wrong", hint)
    if abs(skew_s) > SKEW_WARN_S:
        return Check("clock", "warn", shown, hint)
    return Check("clock", "ok", f"within {max(1.0, abs(skew_s)):.0f}s of the coordinator")


def grade_outbox(depth: int, oldest_s: float | None) -> Check:
    if depth == 0 or oldest_s is None:
        return Check("outbox", "ok", "every billing record delivered")
    shown = f"{depth} billing record(s) not confirmed by the coordinator, oldest {_ago(oldest_s)}"
    if oldest_s >= OUTBOX_FAIL_AGE_S:
        hint = (
            f"records older than {UNDELIVERED_KEEP_S // 86400} days are dropped: restore the "
            "coordinator connection now (they are re-sent after every auth_ok)"
        )
        return Check("outbox", "fail", shown, hint)
    if oldest_s >= OUTBOX_WARN_AGE_S:
        hint = "check the coordinator connection: they are re-sent after every auth_ok"
        return Check("outbox", "warn", shown, hint)
    return Check("outbox", "ok", shown + " (in transit)")


def grade_hardening(status_text: str, uid: int) -> Check:
    """Hardening as the kernel applies it to this process (`/proc/self/status`), under systemd."""
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in status_text.splitlines())
    )
    missing: list[str] = []
    if fields.get("NoNewPrivs") != "1":
        missing.append("NoNewPrivileges")
    if fields.get("Seccomp") != "2":
        missing.append("a system call filter")
    if fields.get("CapEff", "0").strip("0"):
        missing.append("an empty capability set")
    if uid == 0:
        missing.append("a non-root user")
    if missing:
        return Check("systemd", "warn", "the unit lacks " + ", ".join(missing), UNIT_HINT)
    return Check(
        "systemd", "ok", "hardened: NoNewPrivileges, system call filter, no capabilities, not root"
    )


def pick_route(routes: Mapping[str, Sequence[Route]], backend: BackendConfig) -> Route | None:
    """The route of `backend` to try: the first advertised model of a local backend, the
    cheapest of a BYOK one (the completion costs the operator money there)."""
    mine = [r for mid in sorted(routes) for r in routes[mid] if r.backend == backend.label]
    if not mine:
        return None
    if backend.is_byok:
        return min(mine, key=lambda r: r.price.input_per_1m + r.price.output_per_1m)
    return mine[0]


def render(checks: Sequence[Check]) -> str:
    """The text report: one line per check, its hint under it, a summary last."""
    width = max((len(c.name) for c in checks), default=0)
    lines: list[str] = []
    for check in checks:
        grade = check.grade.upper() if check.grade != "ok" else "ok"
        lines.append(f"{grade:<4}  {check.name:<{width}}  {check.detail}")
        if check.hint and check.grade != "ok":
            lines.append(f"{'':<4}  {'':<{width}}  fix: {check.hint}")
    counts = {grade: sum(c.grade == grade for c in checks) for grade in ("ok", "warn", "fail")}
    lines.append(f"\n{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> str:
    return orjson.dumps(
        {"ok": overall(checks) == 0, "checks": [asdict(c) for c in checks]}
    ).decode()


def _ago(seconds: float) -> str:
    return human_duration(seconds) + " ago"


# --- the checks ----------------------------------------------------------------------------------


def check_config(config: Config, path: Path) -> list[Check]:
    path = path.absolute()
    checks = [Check("config", "ok", f"{path}: {len(config.backends)} backend(s)")]
    if not config.backends:
        checks[0] = Check(
            "config",
            "warn",
            f"{path}: no [[backends]]: nothing will be offered",
            "add a backend (`provider-agent init` writes one for each local server it finds)",
        )
    if config.coordinator.is_placeholder:
        checks.append(
            Check(
                "config",
                "fail",
                f"coordinator.url is still a placeholder ({config.coordinator.url})",
                "set [coordinator] url to the marketplace's wss:// address",
            )
        )
    return checks


def check_identity(config: Config) -> list[Check]:
    path = config.identity.key_path
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return [
            Check(
                "identity",
                "warn",
                f"no key at {path} yet",
                "`provider-agent identity` creates it (so does the first `run`); back it up",
            )
        ]
    except OSError as exc:
        return [Check("identity", "fail", f"{path}: {exc.strerror or exc}", _RUN_AS_AGENT)]
    graded = grade_key_mode(path, mode)
    if graded.grade != "ok":
        return [graded]
    try:
        identity = load_identity(path)
    except IdentityError as exc:
        hint = (
            _RUN_AS_AGENT
            if "Permission denied" in str(exc)
            else "restore the key from its backup (a new key is a new provider)"
        )
        return [Check("identity", "fail", str(exc), hint)]
    if identity.provider_id is not None:
        return [Check("identity", "ok", f"{graded.detail}, provider_id {identity.provider_id}")]
    if config.enrollment_code is None:
        return [
            Check(
                "identity",
                "warn",
                f"{graded.detail}: not enrolled yet and no enrollment code configured",
                "set [coordinator] enrollment_code (or PROVIDER_AGENT_ENROLLMENT_CODE)",
            )
        ]
    return [Check("identity", "ok", f"{graded.detail}: enrolls at the next connection")]


_RUN_AS_AGENT = "run doctor as the agent's user (or root)"


def check_state_dir(directory: Path) -> list[Check]:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    checks: list[Check] = []
    if existing != directory:
        if os.access(existing, os.W_OK | os.X_OK):
            checks.append(Check("state dir", "ok", f"{directory} (created at the first start)"))
        else:
            checks.append(
                Check(
                    "state dir",
                    "fail",
                    f"{directory} does not exist and {existing} is not writable",
                    "create it for the agent's user, or set [state] dir to a writable place",
                )
            )
    elif not directory.is_dir():
        checks.append(
            Check("state dir", "fail", f"{directory} is not a directory", "set [state] dir")
        )
    elif not os.access(directory, os.W_OK | os.X_OK):
        checks.append(
            Check(
                "state dir",
                "fail",
                f"{directory} is not writable by this user",
                f"chown it to the agent's user, or {_RUN_AS_AGENT}",
            )
        )
    elif stat.S_IMODE(directory.stat().st_mode) & 0o077:
        bits = stat.S_IMODE(directory.stat().st_mode)
        checks.append(
            Check(
                "state dir",
                "warn",
                f"{directory} has mode {bits:04o}: others can read the ledger",
                f"chmod 700 {directory}",
            )
        )
    else:
        checks.append(Check("state dir", "ok", f"{directory} (writable)"))
    try:
        checks.append(grade_free_space(existing, shutil.disk_usage(existing).free))
    except OSError as exc:
        checks.append(Check("disk space", "warn", f"{existing}: {exc.strerror or exc}", None))
    return checks


def check_systemd(environ: Mapping[str, str]) -> list[Check]:
    """Only under systemd (it sets INVOCATION_ID for every process it starts)."""
    if not environ.get("INVOCATION_ID"):
        return []
    try:
        status_text = Path("/proc/self/status").read_text()
    except OSError as exc:
        return [Check("systemd", "warn", f"/proc/self/status: {exc.strerror or exc}", UNIT_HINT)]
    return [grade_hardening(status_text, os.getuid())]


async def check_agent(state_dir: Path) -> list[Check]:
    """Whether an agent runs with this state dir, and whether it is paused (asks; changes
    nothing)."""
    holder = lock_holder(state_dir)
    running = "running" if holder is None else f"running (pid {holder})"
    try:
        reply = await control.call(
            state_dir, control.ControlRequest(op="status"), timeout_s=STEP_TIMEOUT_S
        )
    except NotRunning as exc:
        if holder is not None:  # starting, or stuck: its socket is not answering
            detail = f"pid {holder} holds {state_dir}, but {exc}"
            hint = (
                f"if it stays so, restart it: `systemctl restart provider-agent` (or kill {holder})"
            )
            return [Check("agent", "warn", detail, hint)]
        hint = "start it: `provider-agent run`, or `systemctl start provider-agent`"
        return [Check("agent", "warn", str(exc), hint)]
    except ControlError as exc:
        detail = str(exc) if holder is None else f"pid {holder} holds {state_dir}; {exc}"
        return [Check("agent", "warn", detail, _RUN_AS_AGENT)]
    if reply.paused is not None:
        detail = f"{running}, paused {reply.paused.describe()}"
        return [Check("agent", "warn", detail, "`provider-agent resume` when maintenance is done")]
    return [Check("agent", "ok", f"{running}, not paused")]


async def check_backends(config: Config) -> list[Check]:
    """Each backend: health and listing (a discovery pass), then one tiny completion through
    the job path for the model `pick_route` chooses."""
    if not config.backends:
        return []
    async with new_http_session(max(len(config.backends), 1)) as http:
        result = await run_pass(config, http)
        registry = Registry.build(config, http)
        checks: list[Check | None] = [None] * len(config.backends)

        async def one(index: int, backend: BackendConfig, report: BackendReport) -> None:
            checks[index] = await _check_backend(index, backend, report, result, registry)

        async with anyio.create_task_group() as group:
            for index, (backend, report) in enumerate(
                zip(config.backends, result.reports, strict=True)
            ):
                group.start_soon(one, index, backend, report)
    return [c for c in checks if c is not None]


async def _check_backend(
    index: int,
    backend: BackendConfig,
    report: BackendReport,
    result: PassResult,
    registry: Registry,
) -> Check:
    name = f"backend {printable(backend.label, 120)}"
    if not report.ok:
        detail = printable(report.error or "unhealthy", TEXT_LIMIT)
        return Check(name, "fail", detail, _backend_hint(index, backend, detail))
    health = f"healthy ({report.health.latency_ms:.0f} ms), {len(report.models)} model(s) listed"
    route = pick_route(result.catalog.routes, backend)
    if route is None:
        hint = "see `provider-agent discover` for why each model is left out"
        return Check(name, "warn", f"{health}, none advertised", hint)
    probe = await tiny_completion(registry.get(backend.label).stream, route, COMPLETION_TIMEOUT_S)
    model = printable(route.native_id, 120)
    if not probe.ok:
        detail = f"{health}; a one-token completion of {model} failed: {probe.error}"
        detail = printable(detail, TEXT_LIMIT)
        return Check(name, "fail", detail, _backend_hint(index, backend, detail))
    return Check(
        name, "ok", f"{health}; a one-token completion of {model} took {probe.ttft_ms or 0:.0f} ms"
    )


def _backend_hint(index: int, backend: BackendConfig, detail: str) -> str:
    where = f"backends[{index}]"
    if backend.api_key_env and any(
        word in detail for word in ("API key", "auth_rejected", "401", "403")
    ):
        return f"check the API key in ${backend.api_key_env} (or $CREDENTIALS_DIRECTORY)"
    if backend.is_byok:
        return f"check {where} and the provider's status; `provider-agent discover` shows more"
    return (
        f"is the server running at {backend.url}? start it, or correct {where}.url; "
        "`provider-agent discover` shows more"
    )


async def check_coordinator(config: Config) -> list[Check]:
    """DNS, TCP, TLS (wss), the WebSocket upgrade and the `auth_challenge`; then the clock
    against the upgrade's `Date` header. Stops at the challenge: nothing is signed or sent."""
    url = config.coordinator.url
    if config.coordinator.is_placeholder:
        return []  # the config check already failed it
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    name = "coordinator"
    try:
        with anyio.fail_after(STEP_TIMEOUT_S):
            await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        detail = f"cannot resolve {host}: {_why(exc)}"
        return [
            Check(name, "fail", detail, "check the host in coordinator.url and this host's DNS")
        ]
    try:
        with anyio.fail_after(STEP_TIMEOUT_S):
            stream = await anyio.connect_tcp(host, port)
            await stream.aclose()
    except (OSError, TimeoutError) as exc:
        detail = f"cannot connect to {host}:{port}: {_why(exc)}"
        hint = f"is the coordinator up, and does the firewall allow outbound port {port}?"
        return [Check(name, "fail", detail, hint)]
    if secure:
        try:
            with anyio.fail_after(STEP_TIMEOUT_S):
                secured = await anyio.connect_tcp(
                    host, port, tls=True, ssl_context=ssl.create_default_context()
                )
                await secured.aclose()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            detail = f"TLS with {host}:{port} failed: {_why(exc)}"
            hint = "check this host's clock and CA certificates (the ca-certificates package)"
            return [Check(name, "fail", detail, hint)]
    return await _upgrade(url, name)


async def _upgrade(url: str, name: str) -> list[Check]:
    started = time.perf_counter()
    try:
        with anyio.fail_after(2 * STEP_TIMEOUT_S):
            async with connect(
                url,
                open_timeout=STEP_TIMEOUT_S,
                close_timeout=2,
                compression=None,
                user_agent_header=USER_AGENT,
            ) as ws:
                received_at = time.time()
                date = ws.response.headers.get("Date") if ws.response is not None else None
                first = await ws.recv()
                elapsed = (time.perf_counter() - started) * 1000
                await ws.close(1000, "doctor: checked")
    except InvalidStatus as exc:
        status = exc.response.status_code
        detail = f"the WebSocket upgrade at {url} was refused: HTTP {status}"
        return [Check(name, "fail", detail, "check the path in coordinator.url")]
    except (OSError, TimeoutError, WebSocketException) as exc:
        detail = f"no WebSocket session at {url}: {_why(exc)}"
        return [Check(name, "fail", detail, "check coordinator.url; is the coordinator up?")]
    frame = decode(first)
    if not isinstance(frame, AuthChallenge):
        detail = f"{url} answered the upgrade but sent no auth_challenge first"
        hint = "coordinator.url does not point at a marketplace coordinator: check it"
        return [Check(name, "fail", detail, hint)]
    checks = [Check(name, "ok", f"{url}: auth_challenge received in {elapsed:.0f} ms")]
    when = email.utils.parsedate_to_datetime(date) if date else None
    if when is None or when.tzinfo is None:
        checks.append(Check("clock", "warn", "the coordinator sent no usable Date header", None))
    else:
        checks.append(grade_skew(received_at - when.timestamp()))
    return checks


async def check_outbox(state_dir: Path) -> list[Check]:
    path = state_dir / OUTBOX_FILE
    try:
        found = await anyio.to_thread.run_sync(_read_depth, path)
    except sqlite3.Error as exc:
        detail = f"{path}: {describe_sqlite_error(exc)}"
        return [Check("outbox", "fail", detail, _RUN_AS_AGENT)]
    if found is None:
        return [Check("outbox", "ok", f"no outbox at {path} yet (created at the first start)")]
    return [grade_outbox(*found)]


def _read_depth(path: Path) -> tuple[int, float | None] | None:
    """(worker thread) Undelivered frames and the age of the oldest, read-only; None when
    there is no outbox yet. With the agent running (its write-ahead log exists) the read goes
    through the log like any reader's; without it the file is opened immutable, so that not
    even sqlite's -wal and -shm files are created."""
    if not path.exists() or path.stat().st_size == 0:  # empty: the agent makes it an outbox
        return None
    running = path.with_name(path.name + "-wal").exists()
    flags = "mode=ro" if running else "mode=ro&immutable=1"
    db = sqlite3.connect(f"{path.as_uri()}?{flags}", uri=True, timeout=5)
    try:
        count, oldest_ms = db.execute(
            "SELECT count(*), min(finished_ms) FROM frames WHERE delivered_ms IS NULL"
        ).fetchone()
    finally:
        db.close()
    if oldest_ms is None:
        return int(count), None
    return int(count), max(0.0, time.time() - oldest_ms / 1000)


async def check_nvml(config: Config, load: Callable[[], Nvml | str] = load_nvml) -> list[Check]:
    """NVML through the agent's own telemetry (the same sampling the heartbeat uses: a worker
    thread under a deadline, since a wedged driver can hang it): the driver and each GPU."""
    if config.telemetry.gpu == "off":
        return [Check("nvml", "ok", "GPU telemetry is off ([telemetry] gpu)")]
    device = nvidia_device_present()
    nvml = load()
    if isinstance(nvml, str):
        if not device:
            return [Check("nvml", "ok", "no NVIDIA driver: no GPU telemetry")]
        if nvml == PACKAGE_MISSING:
            hint = "install nvidia-ml-py into the agent's environment"
            return [Check("nvml", "warn", "NVIDIA driver present, nvidia-ml-py missing", hint)]
        detail = printable(f"NVIDIA device present, but {nvml}", TEXT_LIMIT)
        return [Check("nvml", "fail", detail, "check `nvidia-smi` (is the driver installed?)")]
    telemetry = GpuTelemetry(
        lambda: nvml, init_timeout_s=NVML_TIMEOUT_S, sample_timeout_s=NVML_TIMEOUT_S
    )
    found = await telemetry.sample()
    problem = printable(telemetry.problem or "no answer", TEXT_LIMIT)
    if telemetry.absent:  # NVML itself would not start
        if not device:
            return [Check("nvml", "ok", f"no NVIDIA driver: no GPU telemetry ({problem})")]
        return [Check("nvml", "fail", problem, "check `nvidia-smi`")]
    if found is None or telemetry.problem is not None:
        detail = f"{problem} (a wedged driver?)"
        return [Check("nvml", "fail", detail, "check `nvidia-smi`; a wedged GPU needs a reset")]
    return [grade_gpus(found, telemetry.faults, telemetry.driver)]


def grade_gpus(
    gpus: Sequence[GpuSample], faults: Mapping[int, Sequence[str]], driver: str | None
) -> Check:
    """The GPUs of one telemetry sample: fail when any is unhealthy (saying why)."""
    head = f"driver {driver}: " if driver else ""
    shown = ", ".join(
        f"{gpu.index}: {gpu.name or '?'}"
        + (f" ({gpu.temperature_c} C)" if gpu.temperature_c is not None else "")
        for gpu in gpus
    )
    detail = printable(f"{head}{len(gpus)} GPU(s)" + (f": {shown}" if shown else ""), TEXT_LIMIT)
    sick = [gpu for gpu in gpus if not gpu.healthy]
    if not sick:
        return Check("nvml", "ok", detail)
    why = "; ".join(
        f"GPU {gpu.index}: " + ", ".join(faults.get(gpu.index, ("unhealthy",))) for gpu in sick
    )
    hint = "check `nvidia-smi -q` and the kernel log (XIDs); a GPU in a bad state needs a reset"
    return Check("nvml", "fail", printable(f"{detail}; {why}", TEXT_LIMIT), hint)


def nvidia_device_present() -> bool:
    """Whether an NVIDIA kernel driver is loaded (its control device or its /proc entry)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {STEP_TIMEOUT_S:g}s"
    if isinstance(exc.__cause__, OSError):  # anyio: "All connection attempts failed" from …
        exc = exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return printable(exc.verify_message or str(exc), TEXT_LIMIT)
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not aiohttp's wording
    if isinstance(exc, OSError) and exc.strerror:
        return printable(exc.strerror, TEXT_LIMIT)
    return printable(str(exc) or type(exc).__name__, TEXT_LIMIT)


async def run_checks(config: Config, config_path: Path) -> list[Check]:
    """Every check, in the order they are shown; the network ones run concurrently."""
    checks = check_config(config, config_path) + check_identity(config)
    checks += check_state_dir(config.state.dir) + check_systemd(os.environ)
    probes: list[Callable[[], Awaitable[list[Check]]]] = [
        lambda: check_agent(config.state.dir),
        lambda: check_backends(config),
        lambda: check_coordinator(config),
        lambda: check_nvml(config),
        lambda: check_outbox(config.state.dir),
    ]
    found: list[list[Check]] = [[] for _ in probes]

    async def run(index: int) -> None:
        found[index] = await probes[index]()

    async with anyio.create_task_group() as group:
        for index in range(len(probes)):
            group.start_soon(run, index)
    for more in found:
        checks += more
    return checks


def doctor_command(config: Config, config_path: Path, *, as_json: bool) -> int:
    """0 all ok or warn, 1 any fail; a SIGINT (130) or SIGTERM (0) abandons the checks at once
    (they may be waiting up to a step's timeout on a backend that never answers)."""
    from provider_agent.runtime import Stopped, run_until_signal

    checks = run_until_signal(lambda: run_checks(config, config_path))
    if isinstance(checks, Stopped):
        return checks.exit_code
    print(to_json(checks) if as_json else render(checks))
    return overall(checks)
