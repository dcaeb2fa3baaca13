"""What the benchmarks share: child processes that can be killed and started again, figures from
/proc, readiness polls, percentiles and the printed table.

Imported by `bench/*.py` run as scripts (`python bench/chaos.py`): the script's directory is on
`sys.path`, so `import _common` finds this file.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

#: The `provider-agent` entry point of the interpreter running the benchmark.
AGENT = str(Path(sys.executable).parent / "provider-agent")
READY_TIMEOUT_S = 30.0


class BenchError(Exception):
    """The benchmark could not run (a child failed to start, a peer never became ready)."""


# --- /proc ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def rss_mb(pid: int) -> float:
    """Resident memory now (VmRSS), MB = 2**20 bytes."""
    return _status_mb(pid, "VmRSS")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM), MB = 2**20 bytes."""
    return _status_mb(pid, "VmHWM")


# --- figures and output --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0–100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


@dataclass
class Table:
    """Rows of (figure, value, target, verdict); `check` records a target and whether it held."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    def info(self, name: str, value: str) -> None:
        self.rows.append((name, value, "", ""))

    def check(self, name: str, value: str, target: str, ok: bool) -> None:
        self.rows.append((name, value, target, verdict(ok)))
        if not ok:
            self.missed.append(name)

    def print(self) -> None:
        width = max((len(r[0]) for r in self.rows), default=0) + 2
        value_width = max((len(r[1]) for r in self.rows), default=0) + 2
        target_width = max(12, max((len(r[2]) for r in self.rows), default=0) + 2)
        for name, value, target, mark in self.rows:
            print(
                f"  {name:<{width}}{value:>{value_width}}   {target:<{target_width}}{mark}".rstrip()
            )


# --- child processes -----------------------------------------------------------------------------


@dataclass
class Child:
    """One child process that can be killed and started again with the same command; its output
    goes to one log file, appended across restarts."""

    name: str
    argv: Sequence[str]
    log: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        env = {**os.environ, **self.env} if self.env is not None else None
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                list(self.argv), stdout=sink, stderr=subprocess.STDOUT, env=env
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> int:
        """SIGKILL and reap; the exit status (-9)."""
        assert self.process is not None
        self.process.kill()
        return self.process.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in text)


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to append started children to; each is stopped on the way out, errors and ^C
    included."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            if child.alive():
                assert child.process is not None
                child.process.terminate()
        for child in reversed(started):
            with contextlib.suppress(BenchError):
                child.stop(timeout=10)


def run_bench(main: Callable[[], int]) -> int:
    """SIGTERM unwinds like ^C, so the children are stopped either way."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return main()
    except BenchError as exc:
        print(f"{Path(sys.argv[0]).stem}: cannot run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).stem}: interrupted", file=sys.stderr)
        return 130


def in_workdir(keep: Path | None, prefix: str, work: Callable[[Path], int]) -> int:
    """`work(directory)`: in `keep` (made if missing, left behind with the logs), else in a
    temporary directory named `prefix…`, removed after."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return work(keep)
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        return work(Path(workdir))


async def wait_http(
    http: aiohttp.ClientSession,
    url: str,
    ready: Callable[[object], bool] | None,
    watched: Sequence[Child],
    within_s: float = READY_TIMEOUT_S,
) -> object:
    """Poll `url` until it answers 200 and `ready(json)` holds (None: the 200 is enough); return
    the JSON (None without `ready`). Fails at once if a watched child exits."""
    import asyncio

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for child in watched:
            if not child.alive():
                raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            async with http.get(url) as response:
                if response.status == 200:
                    if ready is None:
                        return None
                    data = await response.json()
                    if ready(data):
                        return data
        await asyncio.sleep(0.05)
    tails = "\n".join(child.log_tail() for child in watched)
    raise BenchError(f"not ready within {within_s:.0f} s: {url}\n{tails}")


def agent_serves(model: str) -> Callable[[object], bool]:
    """For `wait_http` on the coordinator's /agents: some connected agent advertises `model`."""

    def ready(agents: object) -> bool:
        if not isinstance(agents, list):
            return False
        for agent in agents:
            caps = agent.get("capabilities") or {}
            if agent.get("connected") and any(
                m.get("model_id") == model for m in caps.get("models", [])
            ):
                return True
        return False

    return ready


def write_agent_config(
    directory: Path,
    coordinator_url: str,
    backends: str,
    *,
    prometheus_addr: str = "",
    log_format: str = "text",
    extra: str = "",
    heartbeat_interval_s: float | None = None,
) -> Path:
    """An agent.toml in `directory` (identity and state there too); `backends` is the
    `[[backends]]` TOML, `extra` more tables (not `[pricing]`, `[observability]` or
    `[coordinator]`: `heartbeat_interval_s` goes there, the default when None)."""
    path = directory / "agent.toml"
    heartbeat = (
        "" if heartbeat_interval_s is None else f"heartbeat_interval_s = {heartbeat_interval_s}\n"
    )
    path.write_text(
        f'[coordinator]\nurl = "{coordinator_url}"\n{heartbeat}'
        f'[identity]\nkey_path = "{directory / "identity.key"}"\n'
        f'[state]\ndir = "{directory / "state"}"\n'
        f'[observability]\nprometheus_addr = "{prometheus_addr}"\nlog_format = "{log_format}"\n'
        f"{backends}"
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
        f"{extra}"
    )
    return path
