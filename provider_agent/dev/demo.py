"""`provider-agent demo`: the whole loop on loopback, in one process, in a few seconds.

Two simulated backends (`SimBackend`: one model on both, one on each), the reference coordinator
(`DevCoordinator`) and the agent (`Daemon`), its identity and state in a temporary directory.
The script: the agent's capabilities arrive at the coordinator; a few jobs go through the
coordinator's OpenAI front (`POST /v1/chat/completions`), their tokens printed as they stream;
the backend serving the shared model is killed, so the next job for it falls back to the other
backend before its first byte, and the discovery pass that failure triggers withdraws the dead
backend's own model; the agent stops gracefully; a summary says what happened and what the
agent's ledger recorded.

stdout is the output, for a person; the agent logs only errors (to stderr) unless `--log-level`
asks for more, so that its lines do not break into the streamed tokens. Everything started lives
inside `run_demo`'s context managers, so when it returns every port is closed and the temporary
directory is gone. SIGTERM/SIGINT cut the script short; the agent still stops (without waiting
for a job in flight) and the exit is 0. A closed stdout (`| head`) ends it the same way, quietly.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import aiohttp
import anyio
import anyio.abc
import orjson
import tomlkit

from provider_agent.config.load import load
from provider_agent.daemon import Daemon
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.errors import OutboxError
from provider_agent.link.identity import load_or_create
from provider_agent.link.protocol import Capabilities, JobDone, JobError
from provider_agent.observe import logs
from provider_agent.runtime import first_of
from provider_agent.safe_text import printable
from provider_agent.store.engine import FILE_NAME
from provider_agent.store.ledger import LedgerReader, Period, render_totals, usdc

SHARED: Final = "llama-3.1-8b"
#: Backend name → (kind, the models it serves); the first model is on both.
BACKENDS: Final = {
    "sim-vllm": ("vllm", (SHARED, "qwen-2.5-7b")),
    "sim-ollama": ("ollama", (SHARED, "mistral-7b")),
}
#: One sentence of the simulator's text, slow enough to watch it stream.
TOKENS: Final = 6
TOKENS_PER_S: Final = 8.0
PRICE_IN: Final = 300_000
PRICE_OUT: Final = 600_000
#: Each step waits at most this long for what it expects (the whole demo takes a few seconds).
STEP_TIMEOUT_S: Final = 15.0
JOB_INDENT: Final = " " * 9

_T = TypeVar("_T")


class DemoFailed(Exception):
    """A step did not happen as expected; the message says which, for a person."""


class Narrator:
    """The demo's stdout. The first write that fails (a closed pipe) is kept in `error` and sets
    `gone`; later writes are skipped. The demo then stops early and `demo_command` raises the
    kept error once everything is closed, so the command line reports it as for any command."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.gone = anyio.Event()

    def say(self, text: str = "", end: str = "\n") -> None:
        if self.error is not None:
            return
        try:
            sys.stdout.write(text + end)
            sys.stdout.flush()
        except Exception as exc:  # whatever the (guarded) stdout raises: re-raised after cleanup
            self.error = exc
            self.gone.set()


@dataclass
class Served:
    """One job the demo sent, as the HTTP client and the coordinator saw it."""

    model: str
    status: int
    terminal: JobDone | JobError | None = None
    backend: str | None = None
    refusal: str | None = None


@dataclass
class Outcome:
    """How the script ended; `signalled` is set by SIGTERM/SIGINT."""

    signalled: anyio.Event
    completed: bool = False
    failure: str | None = None


# --- pure helpers --------------------------------------------------------------------------------


def content_of(line: bytes) -> str | None:
    """The text delta of one SSE line of an OpenAI chat stream, if it carries one."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return None
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    text = delta.get("content") if isinstance(delta, dict) else None
    return text if isinstance(text, str) and text else None


def agent_config(workdir: Path, ws_url: str, backend_urls: dict[str, str]) -> str:
    """The demo agent's agent.toml: identity and state under `workdir`, no metrics endpoint."""
    document: dict[str, Any] = {
        "coordinator": {"url": ws_url},
        "identity": {"key_path": str(workdir / "identity.key")},
        "discovery": {"interval_s": 300, "timeout_s": 2},
        "state": {"dir": str(workdir / "state"), "drain_timeout_s": 5},
        "observability": {"prometheus_addr": ""},
        "backends": [
            {"name": name, "kind": BACKENDS[name][0], "url": url}
            for name, url in backend_urls.items()
        ],
        "pricing": {"default_input_per_1m": PRICE_IN, "default_output_per_1m": PRICE_OUT},
    }
    return tomlkit.dumps(document)


def offered(capabilities: Capabilities | None) -> list[str]:
    return [m.model_id for m in capabilities.models] if capabilities is not None else []


def summary_lines(jobs: list[Served]) -> list[str]:
    """Jobs by outcome and their tokens, as the coordinator saw them."""
    done = [j.terminal for j in jobs if isinstance(j.terminal, JobDone)]
    failed = [j for j in jobs if isinstance(j.terminal, JobError)]
    refused = [j for j in jobs if j.terminal is None]
    tokens_in = sum(t.tokens.input for t in done)
    tokens_out = sum(t.tokens.output for t in done)
    lines = [
        f"  jobs sent: {len(jobs)}: {len(done)} job_done, {len(failed)} job_error, "
        f"{len(refused)} refused by the coordinator before reaching the agent",
        f"  tokens of the jobs done: {tokens_in} in, {tokens_out} out",
    ]
    lines += [
        f"  job_error {printable(j.model)}: {j.terminal.error_code}"
        for j in failed
        if isinstance(j.terminal, JobError)
    ]
    return lines


# --- the script ----------------------------------------------------------------------------------


class Demo:
    """The running pieces and what the script saw."""

    def __init__(
        self,
        out: Narrator,
        workdir: Path,
        sims: dict[str, SimBackend],
        coord: DevCoordinator,
        http: aiohttp.ClientSession,
        *,
        signalled: anyio.Event,
    ) -> None:
        self.out = out
        self.workdir = workdir
        self.sims = sims
        self.coord = coord
        self.http = http
        self.jobs: list[Served] = []
        self.outcome = Outcome(signalled)

    async def run(self) -> None:
        """Start the agent, run the script until it ends (or a signal, or stdout going away),
        then stop the agent gracefully."""
        path = self.workdir / "agent.toml"
        urls = {name: sim.base_url for name, sim in self.sims.items()}
        path.write_text(agent_config(self.workdir, self.coord.ws_url, urls))
        config = load(path, allow_insecure=True)
        daemon = Daemon(
            config,
            load_or_create(config.identity.key_path),
            config_path=path,
            allow_insecure=True,
            handle_signals=False,
        )
        stopped = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(self._run_agent, daemon, stopped)
            await first_of(
                lambda: self._script(daemon),
                self.out.gone.wait,
                self.outcome.signalled.wait,
                stopped.wait,
            )
            outcome = self.outcome
            if outcome.signalled.is_set():
                self.out.say("\ninterrupted: stopping the agent")
            elif stopped.is_set() and not outcome.completed and outcome.failure is None:
                outcome.failure = "the agent stopped before the demo ended"
            elif outcome.completed:
                self.out.say("\n5. The agent stops gracefully: draining, then close 1001")
            daemon.request_stop(force=self.outcome.signalled.is_set())
            await stopped.wait()
            group.cancel_scope.cancel()
        code = next((a.close_code for a in reversed(self.coord.attempts) if a.provider_id), None)
        closed = f"; it closed its session with {code}" if code is not None else ""
        self.out.say(f"   the agent stopped{closed}")

    async def _run_agent(self, daemon: Daemon, stopped: anyio.Event) -> None:
        try:
            await daemon.run()
        except OutboxError as exc:
            self.outcome.failure = f"the agent could not start: {exc}"
        finally:
            stopped.set()

    async def _script(self, daemon: Daemon) -> None:
        try:
            await self._steps(daemon)
            self.outcome.completed = True
        except DemoFailed as exc:
            self.outcome.failure = str(exc)

    async def _steps(self, daemon: Daemon) -> None:
        say = self.out.say
        say("1. Two simulated backends and the reference coordinator, on loopback")
        for name, sim in self.sims.items():
            models = ", ".join(m.name for m in sim.models)
            say(f"   {name:<11} ({sim.kind}) at {sim.url}, serving {models}")
        say(f"   coordinator  agents connect to {self.coord.ws_url}")
        say(f"                clients POST to {self.coord.http_url}/v1/chat/completions")

        say("\n2. The agent starts, discovers the backends, connects and advertises")
        record = await self._expect(
            lambda c: next((a for a in c.agents.values() if a.capabilities), None),
            "the agent's first capabilities",
        )
        say(f"   capabilities arrived from {record.provider_id}:")
        routes = daemon.agent.catalog.routes
        assert record.capabilities is not None
        for offer in record.capabilities.models:
            via = ", ".join(r.backend for r in routes.get(offer.model_id, ()))
            say(
                f"   {offer.model_id:<13} {usdc(offer.input_per_1m)} in / "
                f"{usdc(offer.output_per_1m)} out USDC per 1M tokens, "
                f"{'+'.join(offer.formats)}, via {via}"
            )

        say("\n3. Jobs through the coordinator's OpenAI front, tokens as they stream")
        order = [SHARED] + [m for _, served in BACKENDS.values() for m in served if m != SHARED]
        for model in order:
            await self._job(model)
        first = self.jobs[0].backend
        if first is None:
            raise DemoFailed(f"no backend was seen serving the first job ({SHARED})")
        own = next(m for m in BACKENDS[first][1] if m != SHARED)

        say(f"\n4. {first} is killed (its port closes, like a crashed server)")
        count = record.capabilities_count
        await self.sims[first].kill()
        await self._job(SHARED, note=f"{first} is down: the agent fell back before the first byte")
        update = await self._expect(
            lambda c: (
                a
                if (a := c.agents.get(record.provider_id)) is not None
                and a.capabilities_count > count
                and own not in offered(a.capabilities)
                else None
            ),
            f"a capabilities update without {own}",
        )
        say(
            f"   capabilities update: {own} withdrawn; offered now: "
            f"{', '.join(offered(update.capabilities))}"
        )
        await self._job(own)

    async def _job(self, model: str, note: str = "") -> None:
        """POST one chat completion to the coordinator, printing its tokens as they come."""
        number = len(self.jobs) + 1
        before = {name: len(sim.completions) for name, sim in self.sims.items()}
        self.out.say(f"   job {number}  {model:<13} | ", end="")
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Say hello ({number})."}],
            "max_tokens": 32,
        }
        try:
            with anyio.fail_after(STEP_TIMEOUT_S):
                served = await self._stream(body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DemoFailed(f"job {number} ({model}) did not complete: {exc!r}") from None
        self.jobs.append(served)
        if served.refusal is not None:
            self.out.say(f"{JOB_INDENT}not sent to the agent: {served.refusal}")
            return
        changed = [n for n, sim in self.sims.items() if len(sim.completions) > before[n]]
        served.backend = changed[-1] if changed else None
        terminal = served.terminal
        if isinstance(terminal, JobDone):
            tokens = f"{terminal.tokens.input} in / {terminal.tokens.output} out tokens"
            line = f"job_done: {tokens}, served by {served.backend}"
        elif isinstance(terminal, JobError):
            line = f"job_error {terminal.error_code}: {printable(terminal.message)}"
        else:
            line = "no terminal frame"
        self.out.say(f"{JOB_INDENT}{line}{f' ({note})' if note else ''}")

    async def _stream(self, body: dict[str, Any]) -> Served:
        url = f"{self.coord.http_url}/v1/chat/completions"
        async with self.http.post(url, json=body) as response:
            served = Served(body["model"], response.status)
            if response.status != 200:
                error = (await response.json(content_type=None)).get("error", {})
                self.out.say(f"HTTP {response.status}")
                served.refusal = f"{error.get('code')}: {printable(error.get('message'))}"
                return served
            async for line in response.content:
                piece = content_of(line)
                if piece is not None:
                    self.out.say(printable(piece), end="")
            self.out.say()
            job_id = response.headers["X-Job-Id"]
        record = await self.coord.wait_for(
            lambda c: c.jobs[job_id] if c.jobs[job_id].terminal is not None else None,
            STEP_TIMEOUT_S,
        )
        served.terminal = record.terminal
        return served

    async def _expect(
        self,
        predicate: Callable[[DevCoordinator], _T | Literal[False] | None],
        what: str,
    ) -> _T:
        try:
            return await self.coord.wait_for(predicate, STEP_TIMEOUT_S)
        except TimeoutError:
            raise DemoFailed(f"{what} did not come within {STEP_TIMEOUT_S:g} s") from None


async def run_demo(out: Narrator, signalled: anyio.Event) -> int:
    """The demo; 0 when it ran to its end or was stopped (`signalled`), 1 when a step failed."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="provider-agent-demo-") as tmp:
        workdir = Path(tmp)
        out.say(f"provider-agent demo: everything on loopback, in this process (state in {tmp})\n")
        async with (
            SimBackend(
                BACKENDS["sim-vllm"][0],
                list(BACKENDS["sim-vllm"][1]),
                tokens=TOKENS,
                tokens_per_s=TOKENS_PER_S,
            ) as first,
            SimBackend(
                BACKENDS["sim-ollama"][0],
                list(BACKENDS["sim-ollama"][1]),
                tokens=TOKENS,
                tokens_per_s=TOKENS_PER_S,
            ) as second,
            DevCoordinator(host="127.0.0.1", port=0) as coord,
            aiohttp.ClientSession() as http,
        ):
            sims = {"sim-vllm": first, "sim-ollama": second}
            demo = Demo(out, workdir, sims, coord, http, signalled=signalled)
            await demo.run()
            violations = [v.reason for v in coord.violations]
        outcome = demo.outcome
        out.say("\nSummary")
        for line in summary_lines(demo.jobs):
            out.say(line)
        ledger = workdir / "state" / FILE_NAME
        if ledger.is_file():
            out.say(
                f"  the agent's ledger ({FILE_NAME}), as `provider-agent earnings --by backend`:"
            )
            with LedgerReader(ledger) as reader:
                table = render_totals(reader.totals("backend", Period()), "backend")
            for line in table.splitlines():
                out.say(f"    {line}")
        out.say(
            "  contract problems the coordinator saw: "
            + ("; ".join(violations) if violations else "none")
        )
    elapsed = time.monotonic() - started
    out.say(f"  {elapsed:.1f} s; backends, coordinator and agent stopped, {tmp} removed")
    if outcome.failure is not None:
        print(f"demo: {outcome.failure}", file=sys.stderr)
        return 1
    if violations:
        print("demo: the coordinator saw contract problems (above)", file=sys.stderr)
        return 1
    return 0


def demo_command(log_level: str | None = None) -> int:
    """`provider-agent demo`. The agent's log lines would interleave with the narrative on a
    terminal, so only errors are logged unless `--log-level` asks for more."""
    if log_level is None:
        logs.setup("error")

    async def main() -> tuple[int, Exception | None]:
        out = Narrator()
        signalled = anyio.Event()
        async with anyio.create_task_group() as group:
            await group.start(_watch_signals, signalled)
            code = await run_demo(out, signalled)
            group.cancel_scope.cancel()
        return code, out.error

    code, output_error = anyio.run(main)
    if output_error is not None:
        raise output_error
    return code


async def _watch_signals(
    signalled: anyio.Event, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Installed first, so that no SIGTERM/SIGINT meets its default action during the demo."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        task_status.started()
        async for _ in received:
            signalled.set()
