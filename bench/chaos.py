"""Benchmark: nothing lost — jobs through a coordinator that keeps crashing, backends that die
and an agent that is SIGKILLed mid-work.

    .venv/bin/python bench/chaos.py [--jobs 300] [--concurrency 16] [--kills 20] [--burst 4]
        [--tokens 240] [--rate 8] [--seed 11] [--tmpfs-mb 32]

Processes on loopback: two simulated vLLM backends serving the same model (`provider-agent
sim-backend`), the reference coordinator (`DevCoordinator`, run by this file as a child with
`--serve-coordinator`, see "the journal" below) and the agent (`provider-agent run`). This process
is the HTTP client: chat completions through the coordinator's /v1/chat/completions, at most
`--concurrency` at a time. A request that does not end with `data: [DONE]` (the coordinator went
away, the agent, a backend) is sent again as a new request, so a new job, until it completes. The
load runs until `--jobs` requests have completed and the chaos plan is over, so that every kill
meets work in flight. Each request carries its own key in `user`; the simulator counts the
completions it served per key.

Chaos, from a plan drawn with `--seed`:
- the coordinator is SIGKILLed `--kills` times and started again at once. Most kills come a random
  1–6 s after the agent's session has lived past the agent's own healthy-session threshold
  (`ReconnectPolicy.healthy_after_s`, 30 s): a crash the agent should get over in about a second.
  `--burst` consecutive kills come 1–3 s after the agent reconnected: a crash loop, where the agent
  must back off instead — the run shows both;
- each backend is SIGKILLed once at a random moment and started again 2–5 s later. Before the
  kill the simulator is told to refuse new connections and its per-key counts are read, so no
  execution is forgotten with the process;
- the disk fills once (protocol.md §8, "a terminal frame that cannot be stored"): the agent's
  state dir is a small tmpfs of its own (`--tmpfs-mb`, mounted by this process: root only;
  without root, or where the mount fails, the phase is skipped and the run says so), and at a
  random moment of a healthy stretch a file there is written until ENOSPC and kept full (topped
  up) until the agent notices — /readyz 503 naming the store, at most 30 s: only a write that
  needs a new page fails — and 3–6 s more, then deleted. Meanwhile the agent keeps the terminal
  frames it cannot store in memory and sends them once stored, refuses new jobs (the clients
  retry, as they do) and answers /readyz 503 — it must not exit. The mount is undone however
  the run ends (`umount -l`); with `--keep` the state dir is copied out first;
- a second agent is started once, in another healthy stretch with jobs streaming, as an
  operator might by mistake: `provider-agent run` with the same config, then the same without
  the subcommand (`run` is the default). Each must exit 78 within a few seconds with one line
  naming the state dir and the running agent's pid, and change nothing: no connection to the
  coordinator, and the first agent's frames are counted below like every other;
- then the agent is SIGKILLed once with jobs streaming, and started again.

The journal: the reference coordinator keeps its records in memory, and a SIGKILL loses them. The
coordinator child is `DevCoordinator` with hooks that append one JSON line per event to a journal
file with one write(2) on an O_APPEND descriptor, which survives the writer's SIGKILL: each
connection attempt, each authenticated connection, each `job` dispatched (with its `user` key),
each terminal frame received (the frame itself) and each contract violation. A terminal frame is
journaled before the coordinator acks it and before it reads the next frame — so before it can
answer the ping that follows: a frame the agent counts as delivered is in the journal.

Counted at the end (targets from shared/spec/benchmarks.md and the issue):
- jobs dispatched; terminal frames de-duplicated by job_id; job_ids whose frames differ (0);
- jobs the agent accepted without a terminal frame at the coordinator (0). Accepted is what the
  agent's outbox (`outbox.sqlite3`, opened read-only) holds: a `job` frame lost in transit when a
  socket dropped reached no agent (protocol.md §5); those are shown for information;
- jobs run twice by a backend (0): `user` keys served more than once, over both simulators and
  all their lives;
- reconnect time, from the restarted coordinator listening to the agent's next auth_ok (p50 ≤ 2 s),
  and redials sooner than the delay the agent logged for them (0: the backoff is honoured);
- agent exits other than the deliberate kill (0; the final SIGTERM must exit 0), tracebacks in
  its log (0);
- the outbox empty at the end: no frame undelivered, no job open;
- `provider-agent earnings --csv`: one row per stored terminal frame, none doubled, and as many
  `job_done` rows as job_done frames journaled;
- contract violations the coordinator saw (0);
- the full disk: /readyz answered 503 naming the store within 30 s of the disk filling, the
  store failed and worked again after ("terminal frames cannot be stored" logged, then "stores
  terminal frames again"), /readyz 200 within 30 s of the space coming back, no agent exit, and
  how many terminal frames waited for the store (the jobs that ended or were refused while it
  failed) — their frames are in the counts above: none lost, none doubled;
- the second agent: exit 78, within SECOND_RUN_WITHIN_S, one line naming the dir and the pid,
  no connection to the coordinator (each of the two attempts).
Prints a table and one summary line; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import errno
import io
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from _common import (
    AGENT,
    BenchError,
    Child,
    Table,
    agent_serves,
    children,
    free_port,
    percentile,
    run_bench,
    wait_http,
    write_agent_config,
)
from aiohttp import web

from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.link.protocol import AuthResponse, Job, JobDone, JobError
from provider_agent.link.state import ReconnectPolicy
from provider_agent.store.journal import FILE_NAME as INFLIGHT_FILE
from provider_agent.store.journal import replay

MODEL = "m"
KEY_PREFIX = "chaos-"
TARGET_RECONNECT_P50_S = 2.0
#: How long a restarted coordinator may wait for the agent before the run gives up on it (the
#: backoff's cap is 60 s).
RECONNECT_GIVE_UP_S = 90.0
#: Log timestamps are cut to milliseconds.
LOG_TS_SLACK_S = 0.002
_WAIT_LOG = re.compile(r"next_delay_s=([0-9.]+)|reconnect in ([0-9.]+)s")
#: The file that fills the state dir's tmpfs.
FILLER = "chaos-disk-filler"
#: How long the disk stays full once the agent noticed (drawn); how long it may take to notice:
#: only a write that needs a new page fails (sqlite reuses its WAL, a journal line may fit in
#: the last page); how long the store may take to work again after.
FULL_FOR_S = (3.0, 6.0)
NOTICE_WITHIN_S = 30.0
STORE_BACK_WITHIN_S = 30.0
#: In /readyz's 503 while the store fails.
STORE_READYZ = "cannot store"
#: A second `run` on the same state dir exits 78 within this (cli.md: EX_CONFIG).
SECOND_RUN_WITHIN_S = 10.0
SECOND_RUN_EXIT = 78
#: What the agent logs when the store fails (either line may come first, and the other is then
#: held back for a minute), and when it works again (jobs/executor.py).
STORE_FAILING_LOGS = (
    "terminal frames cannot be stored",
    "delivery of terminal frames not recorded",
)
STORE_BACK_LOG = "stores terminal frames again"


# --- the journaling coordinator (a child process) -------------------------------------------------


class JournalingCoordinator(DevCoordinator):
    """The reference coordinator, journaling what a SIGKILL would otherwise take with it. The
    hooks are its internal steps (this benchmark is its only subclass)."""

    def __init__(self, journal_fd: int, host: str, port: int) -> None:
        super().__init__(host=host, port=port)
        self.journal_fd = journal_fd

    def note(self, event: str, **fields: Any) -> None:
        line = {"ev": event, "t": time.monotonic(), "wall": time.time(), **fields}
        os.write(self.journal_fd, orjson.dumps(line) + b"\n")

    async def _handle_connect(self, request: web.Request) -> web.StreamResponse:
        self.note("connect")
        return await super()._handle_connect(request)

    async def _admit(self, link: Any, frame: AuthResponse, pid: str) -> Any:
        record = await super()._admit(link, frame, pid)
        if record is not None:
            self.note("auth", provider_id=pid)
        return record

    def _dispatched(self, link: Any, job: Job) -> Any:
        self.note("dispatch", job_id=job.job_id, key=str(job.request.get("user", "")))
        return super()._dispatched(link, job)

    async def _on_terminal(
        self, link: Any, record: Any, frame: JobDone | JobError, text: str
    ) -> None:
        self.note("terminal", job_id=frame.job_id, kind=frame.type, frame=text)
        await super()._on_terminal(link, record, frame, text)

    def _violation(self, provider_id: str | None, reason: str, text: str | bytes) -> None:
        self.note("violation", reason=reason)
        super()._violation(provider_id, reason, text)


async def serve_coordinator(port: int, journal: Path) -> None:
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    coordinator = JournalingCoordinator(fd, "127.0.0.1", port)
    async with coordinator:
        coordinator.note("up", pid=os.getpid())
        await anyio.sleep_forever()


class Journal:
    """The coordinator's journal, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0

    def refresh(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return self.events
        with self.path.open("rb") as source:
            source.seek(self._offset)
            data = source.read()
        whole = data[: data.rfind(b"\n") + 1]
        self._offset += len(whole)
        self.events.extend(orjson.loads(line) for line in whole.splitlines() if line)
        return self.events

    async def wait(self, event: str, after: int, within_s: float) -> tuple[int, dict[str, Any]]:
        """The first `event` at an index ≥ `after` (index, event); TimeoutError after
        `within_s`."""
        with anyio.fail_after(within_s):
            while True:
                events = self.refresh()
                for index in range(after, len(events)):
                    if events[index]["ev"] == event:
                        return index, events[index]
                await anyio.sleep(0.02)


# --- the load (this process is the HTTP client) ---------------------------------------------------


@dataclass
class Attempt:
    key: str
    status: int | None = None
    complete: bool = False
    error: str | None = None


@dataclass
class Load:
    url: str
    jobs: int
    concurrency: int
    tokens: int
    attempts: list[Attempt] = field(default_factory=list)
    completed: int = 0
    #: Keys of requests whose stream has begun and not ended.
    streaming: set[str] = field(default_factory=set)
    #: Set when the chaos plan is over; the load stops once `jobs` completed after that.
    chaos_done: anyio.Event = field(default_factory=anyio.Event)
    _next: int = 0
    _stream_began: anyio.Event = field(default_factory=anyio.Event)

    async def wait_streaming(self, count: int) -> None:
        """Until at least `count` streams are running."""
        while len(self.streaming) < count:
            began = self._stream_began
            await began.wait()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=90)
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as http,
            anyio.create_task_group() as workers,
        ):
            for _ in range(self.concurrency):
                workers.start_soon(self._worker, http)

    def _more(self) -> bool:
        return self.completed < self.jobs or not self.chaos_done.is_set()

    async def _worker(self, http: aiohttp.ClientSession) -> None:
        while self._more():
            number, self._next = self._next, self._next + 1
            for retry in range(10_000):
                if await self._attempt(http, f"{KEY_PREFIX}{number}-{retry}"):
                    self.completed += 1
                    break
                await anyio.sleep(0.3)

    async def _attempt(self, http: aiohttp.ClientSession, key: str) -> bool:
        attempt = Attempt(key)
        self.attempts.append(attempt)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about chaos."}],
            "stream": True,
            "max_tokens": self.tokens,
            "user": key,
        }
        tail = b""
        try:
            async with http.post(f"{self.url}/v1/chat/completions", json=body) as response:
                attempt.status = response.status
                if response.status == 200:
                    async for data in response.content.iter_any():
                        if key not in self.streaming:
                            self.streaming.add(key)
                            self._stream_began.set()
                            self._stream_began = anyio.Event()
                        tail = (tail + data)[-64:]
                    attempt.complete = b"data: [DONE]" in tail
                else:
                    await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            attempt.error = type(exc).__name__
        finally:
            self.streaming.discard(key)
        return attempt.complete


# --- the full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def state_tmpfs(where: Path, size_mb: int) -> Iterator[tuple[Path | None, str]]:
    """`where` (made here) as a tmpfs of `size_mb` MiB: (the mount, "") — or (None, why not):
    mounting needs root. Unmounted (lazily: the agent may still hold files there) on the way
    out, whatever happens."""
    where.mkdir(parents=True, exist_ok=True)
    if size_mb <= 0:
        yield None, "--tmpfs-mb 0"
        return
    if os.geteuid() != 0:
        yield None, "mounting a tmpfs needs root"
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        yield None, f"mount failed: {mounted.stderr.strip() or mounted.returncode}"
        return
    try:
        yield where, ""
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write `path` (appending) until the filesystem says ENOSPC, down to single bytes; the
    bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


@dataclass
class FullDisk:
    """The full-disk phase, as it went."""

    skipped: str = ""  # why, when it did not run
    filling_wall: float | None = None  # when the filling began
    filled_bytes: int = 0
    full_wall: float | None = None  # when the file first hit ENOSPC
    freed_wall: float | None = None  # when it was deleted
    readyz: Counter[int] = field(default_factory=Counter)  # statuses while full
    noticed_s: float | None = None  # from full to /readyz 503 naming the store
    noticed_wall: float | None = None
    readyz_reason: str = ""  # that 503's body
    ready_again_s: float | None = None  # from the delete to /readyz 200


# --- the second agent -----------------------------------------------------------------------------


@dataclass
class SecondRun:
    """One attempt at a second agent on the same state dir."""

    argv: list[str]
    holder_pid: int
    streaming: int
    exit: int | None = None  # None: it did not exit within the limit (then killed)
    seconds: float = math.nan
    lines: list[str] = field(default_factory=list)
    #: Coordinator connections while it ran; None when the coordinator restarted meanwhile (then
    #: the running agent reconnects, and a connection tells nothing).
    connects: int | None = 0

    def names_dir_and_pid(self, state_dir: Path) -> bool:
        if len(self.lines) != 1:
            return False
        line = self.lines[0]
        return str(state_dir) in line and re.search(rf"\b{self.holder_pid}\b", line) is not None


def run_second(argv: list[str]) -> tuple[int | None, float, list[str]]:
    """Run a second agent; (exit status or None if still running after the limit, seconds, its
    non-empty output lines)."""
    began = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            timeout=SECOND_RUN_WITHIN_S * 3,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:  # run() killed it
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        return None, time.monotonic() - began, [ln for ln in text.splitlines() if ln.strip()]
    seconds = time.monotonic() - began
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    return done.returncode, seconds, lines


# --- the chaos ------------------------------------------------------------------------------------


@dataclass
class Restart:
    kind: str  # "healthy" or "burst"
    up_after_kill_s: float = float("nan")
    reconnect_s: float | None = None


@dataclass
class Chaos:
    args: argparse.Namespace
    workdir: Path
    journal: Journal
    coordinator: Child
    backends: list[Child]
    backend_ports: list[int]
    agent: Child
    load: Load
    rng: random.Random
    restarts: list[Restart] = field(default_factory=list)
    #: Per-key completions the simulators served, from the lives that ended (kills).
    served_before: Counter[str] = field(default_factory=Counter)
    backend_kills: int = 0
    agent_kill_wall: float | None = None
    agent_kill_streaming: int = 0
    agent_reconnect_s: float | None = None
    unexpected_exits: list[int] = field(default_factory=list)
    #: When each of those exits was seen (wall time).
    exit_walls: list[float] = field(default_factory=list)
    config: Path | None = None
    #: The agent's HTTP endpoint (`/readyz`), `http://HOST:PORT`.
    endpoint: str = ""
    #: The state dir's own tmpfs, or None (then no full-disk phase).
    tmpfs: Path | None = None
    disk: FullDisk = field(default_factory=FullDisk)
    second_runs: list[SecondRun] = field(default_factory=list)

    def plan(self) -> list[str]:
        kinds = ["healthy"] * self.args.kills
        if self.args.burst:
            first = self.rng.randrange(1, max(2, self.args.kills - self.args.burst + 1))
            for index in range(first, min(self.args.kills, first + self.args.burst)):
                kinds[index] = "burst"
        return kinds

    async def run(self) -> None:
        kinds = self.plan()
        # each backend dies during a different healthy stretch, so one always serves
        healthy = [index for index, kind in enumerate(kinds) if kind == "healthy"]
        backend_at = self.rng.sample(healthy, k=min(len(healthy), len(self.backends)))
        # the full disk and the second agent in healthy stretches of their own where there are
        # enough, from a generator of their own (the plan above stays what the seed made it)
        phase_rng = random.Random(f"{self.args.seed}-phases")
        spare = [index for index in healthy if index not in backend_at] or healthy
        disk_at = phase_rng.choice(spare) if self.tmpfs is not None else None
        second_at = phase_rng.choice([index for index in spare if index != disk_at] or spare)
        _, auth = await self._auth_after(0)
        async with anyio.create_task_group() as side:
            # the phases end (the disk freed, the store back) before the agent's SIGKILL
            async with anyio.create_task_group() as phases:
                for index, kind in enumerate(kinds):
                    for which, at in enumerate(backend_at):
                        if at == index:
                            side.start_soon(self._kill_backend, which, self.rng.uniform(3, 20))
                    if index == disk_at:
                        phases.start_soon(
                            self._fill_disk, phase_rng.uniform(2, 8), phase_rng.uniform(*FULL_FOR_S)
                        )
                    if index == second_at:
                        phases.start_soon(self._second_agent, phase_rng.uniform(3, 15))
                    if kind == "burst":
                        uptime = self.rng.uniform(1, 3)
                    else:
                        uptime = self.args.uptime_s + self.rng.uniform(1, 6)
                    await anyio.sleep(max(0.0, auth["t"] + uptime - time.monotonic()))
                    auth = await self._kill_coordinator(kind)
            await self._kill_agent()
        self.load.chaos_done.set()

    async def _auth_after(self, index: int) -> tuple[int, dict[str, Any]]:
        try:
            return await self.journal.wait("auth", index, RECONNECT_GIVE_UP_S)
        except TimeoutError:
            raise BenchError(
                f"the agent did not authenticate within {RECONNECT_GIVE_UP_S:g} s:\n"
                + self.agent.log_tail()
            ) from None

    async def _kill_coordinator(self, kind: str) -> dict[str, Any]:
        restart = Restart(kind)
        self.restarts.append(restart)
        seen = len(self.journal.refresh())
        killed_at = time.monotonic()
        self.coordinator.kill()
        self.coordinator.start()
        index, up = await self.journal.wait("up", seen, 30)
        restart.up_after_kill_s = up["t"] - killed_at
        _, auth = await self._auth_after(index)
        restart.reconnect_s = auth["t"] - up["t"]
        return auth

    async def _kill_backend(self, which: int, offset: float) -> None:
        await anyio.sleep(offset)
        url = f"http://127.0.0.1:{self.backend_ports[which]}/__sim"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/fault", json={"kind": "refuse"}) as response:
                response.raise_for_status()
            async with http.get(f"{url}/state") as response:
                self.served_before.update((await response.json())["served"])
            self.backends[which].kill()
            self.backend_kills += 1
            await anyio.sleep(self.rng.uniform(2, 5))
            self.backends[which].start()
            await wait_http(http, f"{url}/state", None, [self.backends[which]])

    async def _kill_agent(self) -> None:
        """SIGKILL with jobs streaming (half the concurrency at least), then start it again."""
        with anyio.fail_after(120):
            await self.load.wait_streaming(max(1, self.args.concurrency // 2))
        seen = len(self.journal.refresh())
        self.agent_kill_streaming = len(self.load.streaming)
        self.agent_kill_wall = time.time()
        killed_at = time.monotonic()
        self.agent.kill()  # and started again with no await between: the watcher never sees it
        self.agent.start()
        _, auth = await self._auth_after(seen)
        self.agent_reconnect_s = auth["t"] - killed_at

    async def _fill_disk(self, offset: float, hold: float) -> None:
        """Fill the state dir's filesystem `offset` s into a healthy stretch, keep it full
        (topping it up: the agent may free a page now and then) until /readyz says the store
        fails and `hold` s more (NOTICE_WITHIN_S at most without that), then free it; /readyz
        is read meanwhile, and after until it answers 200 again."""
        assert self.tmpfs is not None
        await anyio.sleep(offset)
        disk, filler = self.disk, self.tmpfs / FILLER
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            disk.filling_wall = time.time()
            try:
                disk.filled_bytes = await anyio.to_thread.run_sync(fill, filler)
                disk.full_wall = time.time()
                full = time.monotonic()
                until = full + NOTICE_WITHIN_S
                while time.monotonic() < until:
                    status, text = await self._readyz(http)
                    disk.readyz[status] += 1
                    if status == 503 and STORE_READYZ in text and disk.noticed_s is None:
                        disk.noticed_s = time.monotonic() - full
                        disk.noticed_wall = time.time()
                        disk.readyz_reason = text.strip()
                        until = time.monotonic() + hold
                    disk.filled_bytes += await anyio.to_thread.run_sync(fill, filler)
                    await anyio.sleep(0.25)
            finally:
                filler.unlink(missing_ok=True)
                disk.freed_wall = time.time()
            freed = time.monotonic()
            with anyio.move_on_after(STORE_BACK_WITHIN_S):
                while True:
                    status, _ = await self._readyz(http)
                    if status == 200:
                        disk.ready_again_s = time.monotonic() - freed
                        break
                    await anyio.sleep(0.2)

    async def _readyz(self, http: aiohttp.ClientSession) -> tuple[int, str]:
        """/readyz's status and body; 0 when it did not answer (the agent restarting)."""
        try:
            async with http.get(f"{self.endpoint}/readyz") as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0, ""

    async def _second_agent(self, offset: float) -> None:
        """`offset` s into a healthy stretch, with jobs streaming: a second agent on the same
        config, as `run` and as the bare command (`run` is the default)."""
        assert self.config is not None
        await anyio.sleep(offset)
        config = ["--allow-insecure", "--config", str(self.config)]
        for argv in ([AGENT, "run", *config], [AGENT, *config]):
            with anyio.move_on_after(60):
                await self.load.wait_streaming(max(1, self.args.concurrency // 2))
            attempt = SecondRun(argv, self.agent.pid, len(self.load.streaming))
            self.second_runs.append(attempt)
            seen = len(self.journal.refresh())
            attempt.exit, attempt.seconds, attempt.lines = await anyio.to_thread.run_sync(
                run_second, argv
            )
            await anyio.sleep(0.5)  # a connection it made would be journaled by now
            events = self.journal.refresh()[seen:]
            restarted = any(e["ev"] == "up" for e in events)
            attempt.connects = None if restarted else sum(e["ev"] == "connect" for e in events)

    async def watch_agent(self) -> None:
        """An agent exit nobody asked for is counted, and the agent started again."""
        while True:
            await anyio.sleep(0.1)
            if not self.agent.alive():
                assert self.agent.process is not None
                self.unexpected_exits.append(self.agent.process.returncode)
                self.exit_walls.append(time.time())
                self.agent.start()

    async def served_now(self) -> Counter[str]:
        served = Counter(self.served_before)
        async with aiohttp.ClientSession() as http:
            for port in self.backend_ports:
                async with http.get(f"http://127.0.0.1:{port}/__sim/state") as response:
                    served.update((await response.json())["served"])
        return served


# --- what the agent kept --------------------------------------------------------------------------


@dataclass
class Outbox:
    accepted: set[str]
    undelivered: int
    open_jobs: int


def read_outbox(state_dir: Path) -> Outbox:
    path = state_dir / "outbox.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        frames = {row[0] for row in db.execute("SELECT job_id FROM frames")}
        (undelivered,) = db.execute(
            "SELECT count(*) FROM frames WHERE delivered_ms IS NULL"
        ).fetchone()
    finally:
        db.close()
    journal = state_dir / INFLIGHT_FILE
    jobs = set(replay(journal.read_bytes())[0]) if journal.exists() else set()
    return Outbox(frames | jobs, int(undelivered), len(jobs))


async def wait_outbox_empty(state_dir: Path, within_s: float) -> Outbox:
    deadline = time.monotonic() + within_s
    while True:
        outbox = await anyio.to_thread.run_sync(read_outbox, state_dir)
        if (outbox.undelivered == 0 and outbox.open_jobs == 0) or time.monotonic() > deadline:
            return outbox
        await anyio.sleep(0.5)


def ledger_rows(config: Path) -> list[dict[str, str]]:
    done = subprocess.run(
        [AGENT, "earnings", "--csv", "--allow-insecure", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"provider-agent earnings --csv failed: {done.stderr.strip()}")
    return list(csv.DictReader(io.StringIO(done.stdout)))


@dataclass
class AgentLog:
    tracebacks: int
    waits: list[tuple[float, float]]  # (wall time logged, delay)
    #: Wall times of the lines saying the store fails, and that it works again.
    store_failing: list[float] = field(default_factory=list)
    store_back: list[float] = field(default_factory=list)
    #: Wall times of the lines for each job that ended or was refused (after its store).
    ends: list[float] = field(default_factory=list)

    def store_outage(self, since: float, seen: float | None) -> tuple[float, float] | None:
        """(first failure, back) of the store's first outage from `since` (wall time): from
        the first line saying it fails, or `seen` (when /readyz said so) if that came first, to
        the line saying it works again."""
        failed = sorted([t for t in self.store_failing if t >= since] + ([seen] if seen else []))
        back = [t for t in self.store_back if failed and t > failed[0]]
        return (failed[0], back[0]) if back else None


def read_agent_log(path: Path) -> AgentLog:
    log = AgentLog(0, [])
    for line in path.read_text(errors="replace").splitlines():
        if "Traceback (most recent call last)" in line:
            log.tracebacks += 1
        if not line.startswith("{"):
            continue
        entry = orjson.loads(line)
        msg = entry.get("msg", "")
        at = datetime.fromisoformat(entry["ts"]).timestamp()
        match = _WAIT_LOG.search(msg)
        if match:
            log.waits.append((at, float(match.group(1) or match.group(2))))
        elif any(line in msg for line in STORE_FAILING_LOGS):
            log.store_failing.append(at)
        elif STORE_BACK_LOG in msg:
            log.store_back.append(at)
        elif msg.startswith(("job ended ", "job refused ")):
            log.ends.append(at)
    return log


def early_redials(
    waits: list[tuple[float, float]], connects: list[float], agent_kill: float | None
) -> int:
    """Redials sooner than the delay the agent logged before them. The next sign of a redial is
    the next connection the coordinator saw or the next wait logged (a refused dial)."""
    early = 0
    marks = sorted([w[0] for w in waits] + connects)
    for logged, delay in waits:
        later = [m for m in marks if m > logged]
        if not later or (agent_kill is not None and logged <= agent_kill <= later[0]):
            continue
        if later[0] < logged + delay - LOG_TS_SLACK_S:
            early += 1
    return early


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Findings:
    chaos: Chaos
    served: Counter[str]
    outbox: Outbox
    ledger: list[dict[str, str]]
    log: AgentLog
    final_exit: int | None
    events: list[dict[str, Any]]
    wall_s: float
    state_dir: Path


async def run_chaos(args: argparse.Namespace, workdir: Path) -> Findings:
    ports = [free_port(), free_port()]
    coord_port = free_port()
    coord_url = f"http://127.0.0.1:{coord_port}"
    endpoint = f"127.0.0.1:{free_port()}"
    journal = Journal(workdir / "journal.jsonl")
    state_dir = workdir / "state"
    with state_tmpfs(state_dir, args.tmpfs_mb) as (tmpfs, skipped), children() as started:
        backends = [
            Child(
                f"backend{n}",
                [
                    *(AGENT, "sim-backend", "--kind", "vllm", "--listen", f"127.0.0.1:{port}"),
                    *("--model", MODEL, "--tokens", str(args.tokens)),
                    *("--tokens-per-s", str(args.rate)),
                ],
                workdir / f"backend{n}.log",
            )
            for n, port in enumerate(ports)
        ]
        coordinator = Child(
            "coordinator",
            [
                *(sys.executable, __file__, "--serve-coordinator", str(coord_port)),
                *("--journal", str(journal.path)),
            ],
            workdir / "coordinator.log",
        )
        backends_toml = "".join(
            f'[[backends]]\nkind = "vllm"\nurl = "http://127.0.0.1:{port}"\n' for port in ports
        )
        config = write_agent_config(
            workdir,
            f"ws://127.0.0.1:{coord_port}/provider/connect",
            backends_toml,
            prometheus_addr=endpoint,
            log_format="json",
            extra=f"[limits]\nmax_concurrent = {max(32, args.concurrency * 2)}\n",
        )
        agent = Child(
            "agent",
            [AGENT, "run", "--allow-insecure", "--config", str(config)],
            workdir / "agent.log",
        )
        for child in (*backends, coordinator):
            child.start()
            started.append(child)
        async with aiohttp.ClientSession() as http:
            for child, port in zip(backends, ports, strict=True):
                await wait_http(http, f"http://127.0.0.1:{port}/health", None, [child])
            await wait_http(http, f"{coord_url}/agents", lambda _: True, [coordinator])
            agent.start()
            started.append(agent)
            await wait_http(http, f"{coord_url}/agents", agent_serves(MODEL), [agent])
        load = Load(coord_url, args.jobs, args.concurrency, args.tokens)
        chaos = Chaos(
            args,
            workdir,
            journal,
            coordinator,
            backends,
            ports,
            agent,
            load,
            random.Random(args.seed),
            config=config,
            endpoint=f"http://{endpoint}",
            tmpfs=tmpfs,
            disk=FullDisk(skipped=skipped),
        )
        began = time.monotonic()
        async with anyio.create_task_group() as watching:
            watching.start_soon(chaos.watch_agent)
            async with anyio.create_task_group() as work:
                work.start_soon(load.run)
                await chaos.run()
            wall = time.monotonic() - began
            outbox = await wait_outbox_empty(state_dir, 60)
            watching.cancel_scope.cancel()
        outbox = await wait_outbox_empty(state_dir, 60)
        served = await chaos.served_now()
        final_exit = agent.stop(timeout=30)
        ledger = ledger_rows(config)
        coordinator.stop()
        if tmpfs is not None and args.keep is not None:  # the mount goes: keep a copy
            shutil.copytree(
                tmpfs,
                workdir / "state.copy",
                ignore=shutil.ignore_patterns(FILLER),
                dirs_exist_ok=True,
            )
    return Findings(
        chaos,
        served,
        outbox,
        ledger,
        read_agent_log(agent.log),
        final_exit,
        journal.refresh(),
        wall,
        state_dir,
    )


def reconnect_rows(table: Table, chaos: Chaos) -> float:
    """The reconnect figures; returns the p50 over all restarts."""
    times = {
        kind: [
            r.reconnect_s for r in chaos.restarts if r.kind == kind and r.reconnect_s is not None
        ]
        for kind in ("healthy", "burst")
    }
    every = [r.reconnect_s for r in chaos.restarts if r.reconnect_s is not None]
    p50 = percentile(every, 50)
    table.check(
        "reconnect s p50, every restart",
        f"{p50:.2f}",
        f"≤ {TARGET_RECONNECT_P50_S:g}",
        len(every) == len(chaos.restarts) and p50 <= TARGET_RECONNECT_P50_S,
    )
    for kind, label in (("healthy", "after a healthy session"), ("burst", "in the crash loop")):
        values = times[kind]
        table.info(
            f"  {label} ({len(values)})",
            f"p50 {percentile(values, 50):.2f} max {max(values, default=math.nan):.2f}",
        )
    return p50


def ledger_rows_check(
    table: Table, ledger: list[dict[str, str]], frames: set[str], done: int
) -> None:
    ids = Counter(row["job_id"] for row in ledger)
    lost, doubled = len(frames - ids.keys()), sum(1 for n in ids.values() if n > 1)
    table.check(
        "ledger rows lost / doubled", f"{lost} / {doubled}", "0 / 0", not lost and not doubled
    )
    ledger_done = sum(1 for row in ledger if row["outcome"] == "job_done")
    table.check("ledger job_done rows", str(ledger_done), f"= {done}", ledger_done == done)


def disk_rows(table: Table, f: Findings) -> str:
    """The full-disk phase's rows; its part of the summary line."""
    disk = f.chaos.disk
    if disk.skipped:
        table.info("full disk", f"skipped ({disk.skipped})")
        return f"full disk skipped ({disk.skipped})"
    if disk.filling_wall is None or disk.freed_wall is None:
        table.check("full disk: the phase ran", "no", "yes", False)
        return "full disk did not run"
    held = disk.freed_wall - (disk.full_wall or disk.freed_wall)
    table.info("full disk: MiB written, held s", f"{disk.filled_bytes / 2**20:.1f}, {held:.1f}")
    outage = f.log.store_outage(disk.filling_wall, disk.noticed_wall)
    table.check(
        "  store failed, then worked again", "yes" if outage else "no", "yes", outage is not None
    )
    waited = 0
    if outage is not None:
        waited = sum(1 for t in f.log.ends if outage[0] <= t <= outage[1])
        table.info("  store failed for s", f"{outage[1] - outage[0]:.1f}")
        table.info("  terminal frames that waited for it", str(waited))
    statuses = ", ".join(f"{code or 'no answer'} ×{n}" for code, n in sorted(disk.readyz.items()))
    table.info("  /readyz while full", statuses or "not read")
    noticed = disk.noticed_s
    table.check(
        "  /readyz 503 for the store, after s",
        f"{noticed:.1f}" if noticed is not None else "no",
        f"≤ {NOTICE_WITHIN_S:g}",
        noticed is not None,
    )
    back = disk.ready_again_s
    table.check(
        "  /readyz 200 again after freeing, s",
        f"{back:.1f}" if back is not None else "no",
        f"≤ {STORE_BACK_WITHIN_S:g}",
        back is not None,
    )
    until = disk.freed_wall + STORE_BACK_WITHIN_S
    exits = sum(1 for t in f.chaos.exit_walls if disk.filling_wall <= t <= until)
    table.check("  agent exits meanwhile", str(exits), "0", exits == 0)
    lasted = f"{outage[1] - outage[0]:.1f} s" if outage else "never"
    return f"full disk: store failed {lasted}, {waited} frames waited, {exits} exits"


def disk_details(f: Findings) -> None:
    """The terminal frames the coordinator got from the disk filling to STORE_BACK_WITHIN_S
    after it was freed, by outcome."""
    disk = f.chaos.disk
    if disk.filling_wall is None or disk.freed_wall is None:
        return
    until = disk.freed_wall + STORE_BACK_WITHIN_S
    codes = Counter(
        str(orjson.loads(e["frame"]).get("error_code", "job_done"))
        for e in f.events
        if e["ev"] == "terminal" and disk.filling_wall <= e["wall"] <= until
    )
    print(
        f"  terminal frames from the disk filling to {STORE_BACK_WITHIN_S:g} s after it was "
        "freed: " + (", ".join(f"{code} {n}" for code, n in codes.most_common()) or "none")
    )


def second_rows(table: Table, f: Findings, state_dir: Path) -> str:
    """The second agent's rows; its part of the summary line."""
    runs = f.chaos.second_runs
    table.check("second agent: attempts", str(len(runs)), "2", len(runs) == 2)
    for run in runs:
        how = "run" if "run" in run.argv[1:2] else "no subcommand"
        table.check(
            f"  {how}: exit, s, one line naming dir + pid",
            f"{run.exit}, {run.seconds:.1f}, {'yes' if run.names_dir_and_pid(state_dir) else 'no'}",
            f"{SECOND_RUN_EXIT}, ≤ {SECOND_RUN_WITHIN_S:g}, yes",
            run.exit == SECOND_RUN_EXIT
            and run.seconds <= SECOND_RUN_WITHIN_S
            and run.names_dir_and_pid(state_dir),
        )
        table.check(
            "    its connections to the coordinator",
            "n/a (restarted)" if run.connects is None else str(run.connects),
            "0",
            not run.connects,
        )
    exits = "/".join(str(run.exit) for run in runs) or "none"
    slowest = max((run.seconds for run in runs), default=math.nan)
    return f"second agent: exit {exits} within {slowest:.1f} s"


def second_details(f: Findings) -> None:
    for run in f.chaos.second_runs:
        how = "run" if "run" in run.argv[1:2] else "no subcommand"
        print(
            f"  second agent ({how}, {run.streaming} streams running, pid "
            f"{run.holder_pid} holding): " + (" | ".join(run.lines) or "(no output)")
        )


def report(args: argparse.Namespace, f: Findings) -> int:
    chaos, events = f.chaos, f.events
    dispatched = {e["job_id"] for e in events if e["ev"] == "dispatch"}
    frames: dict[str, set[str]] = {}
    for e in events:
        if e["ev"] == "terminal":
            frames.setdefault(e["job_id"], set()).add(e["frame"])
    codes = Counter(
        frame.get("error_code", frame["type"])
        for frame in (orjson.loads(next(iter(texts))) for texts in frames.values())
    )
    job_done = codes["job_done"]
    differing = sum(1 for texts in frames.values() if len(texts) > 1)
    without_terminal = f.outbox.accepted - frames.keys()
    twice = {k: n for k, n in f.served.items() if k.startswith(KEY_PREFIX) and n > 1}
    connects = [e["wall"] for e in events if e["ev"] == "connect"]
    early = early_redials(f.log.waits, connects, chaos.agent_kill_wall)
    violations = [e["reason"] for e in events if e["ev"] == "violation"]
    attempts = chaos.load.attempts
    outcomes = Counter(
        "complete" if a.complete else a.error or f"HTTP {a.status}" for a in attempts
    )
    print(
        f"chaos benchmark: {f.wall_s:.0f} s, {chaos.load.completed} requests completed of "
        f"{len(attempts)} sent ({args.concurrency} at a time, {args.tokens} tokens at "
        f"{args.rate:g}/s); coordinator killed {len(chaos.restarts)}×, backends "
        f"{chaos.backend_kills}×, agent once with {chaos.agent_kill_streaming} streams running"
    )
    print("  client outcomes: " + ", ".join(f"{k} {n}" for k, n in outcomes.most_common()))
    print("  terminal frames: " + ", ".join(f"{k} {n}" for k, n in codes.most_common()))
    table = Table()
    table.info("jobs dispatched", str(len(dispatched)))
    table.info("terminal frames, by job_id", f"{len(frames)} ({job_done} job_done)")
    table.check("job_ids with differing frames", str(differing), "0", differing == 0)
    table.info("jobs the agent accepted", str(len(f.outbox.accepted)))
    table.check(
        "accepted, no terminal frame", str(len(without_terminal)), "0", not without_terminal
    )
    table.info("lost in transit, not accepted", str(len(dispatched - f.outbox.accepted)))
    table.check("jobs run twice by a backend", str(len(twice)), "0", not twice)
    p50 = reconnect_rows(table, chaos)
    table.check("redials before the backoff", f"{early} of {len(f.log.waits)}", "0", early == 0)
    table.info("agent back after SIGKILL s", f"{chaos.agent_reconnect_s or math.nan:.2f}")
    exits = chaos.unexpected_exits
    table.check("agent exits not asked for", str(len(exits)), "0", not exits)
    table.check("agent exit on SIGTERM", str(f.final_exit), "0", f.final_exit == 0)
    table.check("agent tracebacks", str(f.log.tracebacks), "0", f.log.tracebacks == 0)
    empty = f.outbox.undelivered == 0 and f.outbox.open_jobs == 0
    table.check(
        "outbox undelivered / open",
        f"{f.outbox.undelivered} / {f.outbox.open_jobs}",
        "0 / 0",
        empty,
    )
    ledger_rows_check(table, f.ledger, set(frames), job_done)
    table.check("contract violations", str(len(violations)), "0", not violations)
    disk = disk_rows(table, f)
    second = second_rows(table, f, f.state_dir)
    table.print()
    if f.chaos.disk.readyz_reason:
        print(f"  /readyz while the disk was full: {f.chaos.disk.readyz_reason}")
    disk_details(f)
    second_details(f)
    for reason, count in Counter(violations).most_common(3):
        print(f"  violation ×{count}: {reason}")
    for job_id in sorted(without_terminal)[:3]:
        print(f"  accepted without a terminal frame: {job_id}")
    for key, count in sorted(twice.items())[:3]:
        print(f"  served {count}×: {key}")
    print(
        f"\nchaos: {'MISS ' + ', '.join(table.missed) if table.missed else 'ok'} — "
        f"{len(dispatched)} jobs dispatched, {len(frames)} terminal frames, "
        f"{len(without_terminal)} accepted without one, {len(twice)} run twice; reconnect p50 "
        f"{p50:.2f} s; {len(exits)} unplanned exits; outbox {f.outbox.undelivered} undelivered; "
        f"ledger {len(f.ledger)} rows; {disk}; {second}"
    )
    return 1 if table.missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs", type=int, default=300, help="requests to complete, at least (300)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests at a time (16)")
    parser.add_argument("--kills", type=int, default=20, help="coordinator kills (20)")
    parser.add_argument("--burst", type=int, default=4, help="of which in a crash loop (4)")
    parser.add_argument("--tokens", type=int, default=240, help="tokens per response (240)")
    parser.add_argument("--rate", type=float, default=8.0, help="tokens/s per stream (8)")
    parser.add_argument("--seed", type=int, default=11, help="the chaos plan's seed (11)")
    parser.add_argument(
        "--tmpfs-mb",
        type=int,
        default=32,
        help="the state dir's own tmpfs, filled once (32; 0: no tmpfs, no full-disk phase)",
    )
    parser.add_argument(
        "--uptime-s",
        type=float,
        default=ReconnectPolicy().healthy_after_s,
        help="a coordinator outside the crash loop lives this + 1–6 s after the agent connects "
        "(default: the agent's healthy-session threshold, 30 s; less makes every kill a flap)",
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="work in DIR and keep the logs and journal there"
    )
    parser.add_argument("--serve-coordinator", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--journal", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_coordinator is not None:
        import logging

        logging.basicConfig(level=logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(serve_coordinator, args.serve_coordinator, args.journal)
        return 0
    if min(args.jobs, args.concurrency, args.kills, args.tokens) < 1 or args.rate <= 0:
        parser.error("--jobs, --concurrency, --kills, --tokens and --rate must be positive")
    if not 0 <= args.burst < args.kills:
        parser.error("--burst must be ≥ 0 and below --kills")

    def run() -> int:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            return report(args, asyncio.run(run_chaos(args, args.keep)))
        with tempfile.TemporaryDirectory(prefix="chaos-bench-") as workdir:
            return report(args, asyncio.run(run_chaos(args, Path(workdir))))

    return run_bench(run)


if __name__ == "__main__":
    sys.exit(main())
