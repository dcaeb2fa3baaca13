"""`provider-agent run` as a real process: real signals, real coordinator, real exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from provider_agent.dev.coordinator import DevCoordinator
from tests.agent_harness import ProcessLines, agent_where, write_config

#: `python -c` that lowers the open-file limit to argv[1], then runs the command line.
_WITH_NOFILE = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "runpy.run_module('provider_agent', run_name='__main__', alter_sys=True)"
)


@asynccontextmanager
async def agent_process(
    config: Path, *args: str, nofile: int | None = None
) -> AsyncIterator[ProcessLines]:
    """`provider-agent run --config CONFIG ARGS` as a child process (with at most `nofile` open
    files when given, as a unit's LimitNOFILE= would set)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROVIDER_AGENT_ENROLLMENT_CODE", None)
    python = [sys.executable, "-m", "provider_agent"]
    if nofile is not None:
        python = [sys.executable, "-c", _WITH_NOFILE, str(nofile)]
    command = [*python, "run", "--config", str(config), *args]
    async with await anyio.open_process(command, env=env) as process:
        agent = ProcessLines(process)
        async with anyio.create_task_group() as group:
            group.start_soon(agent.collect)
            try:
                yield agent
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def test_sigterm_drains_closes_1001_and_exits_0(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, coord.ws_url, drain_timeout_s=10)
    async with agent_process(cfg, "--allow-insecure") as agent:
        await coord.wait_for(lambda c: c.connected(), timeout=20)
        started = time.perf_counter()
        agent.signal(signal.SIGTERM)
        with anyio.fail_after(10):  # the drain budget: nothing is in flight, so far less
            code = await agent.process.wait()
        stopped_in = time.perf_counter() - started
    assert code == 0
    assert stopped_in < 10
    record = next(iter(coord.agents.values()))
    assert record.capabilities is not None
    assert record.capabilities.models == [] and record.capabilities.metadata.status == "draining"
    assert coord.attempts[-1].close_code == 1001
    assert not coord.violations


async def test_sigint_when_idle_stops_within_a_second(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, coord.ws_url)
    async with agent_process(cfg, "--allow-insecure") as agent:
        await coord.wait_for(lambda c: c.connected(), timeout=20)
        started = time.perf_counter()
        agent.signal(signal.SIGINT)
        with anyio.fail_after(5):
            code = await agent.process.wait()
        elapsed = time.perf_counter() - started
    assert code == 0
    assert elapsed < 1.0, f"idle stop took {elapsed:.2f}s"
    assert coord.attempts[-1].close_code == 1001


async def test_sighup_applies_a_valid_file_and_keeps_a_broken_one_out(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, coord.ws_url, heartbeat_interval_s=1)
    async with agent_process(cfg, "--allow-insecure") as agent:
        record = await agent_where(coord, lambda a: a.capabilities_count >= 2, timeout=20)
        # A valid change: a new global limit shows up in the next capabilities, same session.
        cfg.write_text(cfg.read_text() + "[limits]\nmax_concurrent = 3\n")
        agent.signal(signal.SIGHUP)
        await coord.wait_for(
            lambda c: (
                record.capabilities is not None
                and record.capabilities.limits.max_concurrent_total == 3
            )
        )
        assert record.connections == 1
        # A broken file: logged in one line, the running config kept, the session untouched.
        cfg.write_text(cfg.read_text() + "[limits]\nmax_concurrent = 3\n")  # duplicate table
        agent.signal(signal.SIGHUP)
        line = await agent.wait_for_line("reload failed")
        assert "duplicate" in line and str(cfg) in line
        beats = record.heartbeat_count
        await coord.wait_for(lambda c: record.heartbeat_count >= beats + 2)
        assert record.connections == 1 and coord.connected() == [record.provider_id]
        assert agent.process.returncode is None
        agent.signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await agent.process.wait() == 0


async def test_config_error_exits_78_with_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    async with agent_process(cfg) as agent:  # no --allow-insecure: ws:// is refused
        with anyio.fail_after(20):
            code = await agent.process.wait()
    assert code == 78
    errors = [line for line in agent.lines if line.strip()]
    assert len(errors) == 1
    assert "coordinator.url" in errors[0] and "wss://" in errors[0]
    assert "--allow-insecure" in errors[0]


@asynccontextmanager
async def black_hole() -> AsyncIterator[tuple[str, anyio.Event]]:
    """A TCP server that accepts connections and never answers (a wedged backend); the event
    is set once something connected."""
    connected = anyio.Event()

    async def hold(stream: anyio.abc.SocketStream) -> None:
        connected.set()
        await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hold)
        try:
            yield f"http://127.0.0.1:{port}", connected
        finally:
            group.cancel_scope.cancel()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_during_the_first_discovery_pass_ends_it_at_once(
    coord: DevCoordinator, tmp_path: Path, signum: signal.Signals
) -> None:
    async with black_hole() as (url, probed):
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(url,))
        cfg.write_text(cfg.read_text().replace("timeout_s = 2", "timeout_s = 20"))
        async with agent_process(cfg, "--allow-insecure") as agent:
            with anyio.fail_after(20):
                await probed.wait()  # the first pass is now waiting on the black hole
            started = time.perf_counter()
            agent.signal(signum)
            with anyio.fail_after(10):
                code = await agent.process.wait()
            elapsed = time.perf_counter() - started
    assert code == 0
    assert elapsed < 3.0, f"stop took {elapsed:.2f}s with a 20 s pass in progress"
    assert not any("agent started" in line for line in agent.lines)
    assert not coord.attempts  # it never dialled


async def test_sigkill_with_a_job_in_flight_reports_connection_lost_after_restart(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    from provider_agent.link.protocol import JobError
    from tests.agent_harness import fake_vllm

    async with fake_vllm("m") as backend:
        backend.gate = anyio.Event()  # the job is still streaming when the agent dies
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with agent_process(cfg, "--allow-insecure") as agent:
            record = await agent_where(
                coord, lambda a: a.capabilities is not None and a.capabilities.models, timeout=20
            )
            await coord.send_job(record.provider_id, "m", {"messages": []}, job_id="killed-job")
            await coord.wait_for(lambda c: c.jobs["killed-job"].bytes_relayed > 0, timeout=20)
            agent.process.kill()
            await agent.process.wait()
        assert coord.jobs["killed-job"].terminal is None
        async with agent_process(cfg, "--allow-insecure") as agent:
            job = await coord.wait_for(
                lambda c: c.jobs["killed-job"] if c.jobs["killed-job"].terminal else None,
                timeout=20,
            )
            agent.signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await agent.process.wait() == 0
        backend.gate.set()
    assert isinstance(job.terminal, JobError) and job.terminal.error_code == "connection_lost"
    assert job.terminal_count == 1
    assert len(backend.bodies) == 1  # never run again
    coord.assert_no_violations()


@pytest.mark.parametrize("breakage", ["corrupt", "file_as_dir"])
async def test_an_unusable_outbox_stops_the_start_loudly_with_exit_1(
    tmp_path: Path, breakage: str
) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    state = tmp_path / "state"
    if breakage == "corrupt":
        state.mkdir()
        (state / "outbox.sqlite3").write_bytes(b"this is not a database" * 100)
    else:
        state.write_text("a file where the state directory must be")
    async with agent_process(cfg, "--allow-insecure") as agent:
        with anyio.fail_after(20):
            code = await agent.process.wait()
    assert code == 1
    errors = [line for line in agent.lines if "ERROR" in line or "error" in line]
    assert errors and "outbox" in errors[-1].lower()
    assert not any("Traceback" in line for line in agent.lines)
    assert not any("agent started" in line for line in agent.lines)


# --- one agent per state dir (protocol.md §8) -----------------------------------------------------


def state_view(state: Path) -> tuple[list[str], dict[str, int], list[tuple[str, str]], str]:
    """What a second agent could have changed in `state`: the names there, the in-flight
    journal's open jobs (with their relayed bytes), the outbox's terminal frames, the lock's
    pid."""
    import sqlite3

    from provider_agent.store.engine import FILE_NAME as OUTBOX
    from provider_agent.store.journal import FILE_NAME as JOURNAL
    from provider_agent.store.journal import replay

    open_jobs, _ = replay((state / JOURNAL).read_bytes())
    db = sqlite3.connect(f"{(state / OUTBOX).as_uri()}?mode=ro", uri=True)
    try:
        frames = db.execute("SELECT job_id, frame FROM frames ORDER BY seq").fetchall()
    finally:
        db.close()
    return (
        sorted(p.name for p in state.iterdir()),
        {job_id: job.bytes_relayed for job_id, job in open_jobs.items()},
        frames,
        (state / "agent.lock").read_text(),
    )


async def test_a_second_run_on_the_same_state_dir_exits_78_naming_it_and_changes_nothing(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """The operator's slip: `provider-agent --config <the same file>` (no subcommand means
    `run`) while the agent runs with a job in flight. The second one used to report that job
    as an orphan (`connection_lost`, earning 0) before failing on the port, and the first
    agent's real `job_done` was then discarded as a repeat."""
    from provider_agent.link.protocol import JobDone
    from tests.agent_harness import fake_vllm, free_port

    async with fake_vllm("m") as backend:
        backend.gate = anyio.Event()  # the first agent's job stays in flight meanwhile
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(backend.url,),
            prometheus_addr=f"127.0.0.1:{free_port()}",
        )
        state = tmp_path / "state"
        async with agent_process(cfg, "--allow-insecure") as first:
            record = await agent_where(
                coord, lambda a: a.capabilities is not None and a.capabilities.models, timeout=20
            )
            await coord.send_job(record.provider_id, "m", {"messages": []}, job_id="in-flight")
            await coord.wait_for(lambda c: c.jobs["in-flight"].bytes_relayed > 0, timeout=20)
            before = state_view(state)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT_")}
            second_agent = [sys.executable, "-m", "provider_agent", "--config", str(cfg)]
            with anyio.fail_after(30):
                second = await anyio.run_process(
                    [*second_agent, "--allow-insecure"], check=False, env=env
                )
            after = state_view(state)
            backend.gate.set()
            job = await coord.wait_for(
                lambda c: c.jobs["in-flight"] if c.jobs["in-flight"].terminal else None,
                timeout=20,
            )
            first.signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert await first.process.wait() == 0
    assert second.returncode == 78
    lines = second.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"state dir error: {state}: in use by another provider-agent")
    assert f"(pid {first.process.pid})" in lines[0]
    assert second.stdout == b""
    assert after == before
    assert "in-flight" in before[1] and before[2] == []  # in flight, no terminal frame yet
    assert before[3] == f"{first.process.pid}\n"
    assert isinstance(job.terminal, JobDone) and job.terminal_count == 1
    assert len(backend.bodies) == 1
    coord.assert_no_violations()


async def test_the_state_dir_is_free_again_once_the_agent_is_gone(tmp_path: Path) -> None:
    """The lock dies with its process, SIGKILL included: the next start is not refused."""
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    for stop in (signal.SIGKILL, signal.SIGTERM):
        async with agent_process(cfg, "--allow-insecure") as agent:
            await agent.wait_for_line("agent started", timeout=20)
            assert (tmp_path / "state" / "agent.lock").read_text() == f"{agent.process.pid}\n"
            agent.signal(stop)
            with anyio.fail_after(10):
                code = await agent.process.wait()
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
        assert not any("state dir error" in line for line in agent.lines)


# --- only regular files where the agent reads one (config.md, settled) ---------------------------


@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        ("state/pause.json", os.mkfifo, "a FIFO"),
        ("state/inflight.jsonl", os.mkfifo, "a FIFO"),
        ("state/outbox.sqlite3", os.mkfifo, "a FIFO"),
        ("state/outbox.sqlite3-wal", os.mkfifo, "a FIFO"),
        ("state/pause.json", os.mkdir, "a directory"),
        ("state/agent.lock", os.mkfifo, "a FIFO"),
        ("identity.key", os.mkfifo, "a FIFO"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
async def test_a_fifo_or_directory_where_the_agent_reads_a_file_is_exit_78_not_a_hang(
    tmp_path: Path, name: str, make: Callable[[Path], None], kind: str
) -> None:
    """A FIFO at pause.json used to hang the start for good (opening it waits for a writer)."""
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    (tmp_path / "state").mkdir()
    path = tmp_path / name
    make(path)
    async with agent_process(cfg, "--allow-insecure") as agent:
        with anyio.fail_after(20):
            code = await agent.process.wait()
    assert code == 78
    lines = [line for line in agent.lines if line.strip()]
    assert len(lines) == 1, lines
    assert f"{path}: " in lines[0] and f"is {kind}" in lines[0]
    assert "not a regular file" in lines[0] and "Traceback" not in lines[0]


#: Modules a connected agent with no job has no use for (benchmarks.md: the idle agent's RSS,
#: "keep heavy imports out of paths that do not need them"): the job readers and httptools load
#: with the first job, the withdrawn-route probe with the first probe, and cryptography's
#: `serialization` (SSH, PKCS#7/#12 and every cipher, ~3 MB) never.
NOT_LOADED_WHILE_IDLE = (
    "httptools",
    "provider_agent.backends.lean",
    "provider_agent.backends.stream",
    "provider_agent.jobs.one_completion",
    "cryptography.hazmat.primitives.serialization",
    "provider_agent.ops.upgrade",
    "provider_agent.dev",
)


def test_the_daemon_leaves_the_job_path_unloaded_until_a_job_needs_it() -> None:
    code = (
        "import sys\n"
        "import provider_agent.cli, provider_agent.daemon, provider_agent.agent\n"
        f"print([m for m in {NOT_LOADED_WHILE_IDLE!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
