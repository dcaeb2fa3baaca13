"""The coordinator session against the reference coordinator, on real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import tempfile
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from statistics import mean

import aiohttp
import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tenacity import AsyncRetrying, RetryCallState
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from provider_agent.clock import Timings
from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.errors import Fault, FaultKind
from provider_agent.link.identity import load, load_or_create
from provider_agent.link.protocol import (
    KNOWN_TYPES,
    Job,
)
from provider_agent.link.session import PolicyWait, Session, SessionHooks
from provider_agent.link.state import ReconnectPolicy, Redial
from tests.agent_harness import (
    agent_where,
    fake_vllm,
    fast_policy,
    free_port,
    running_agent,
    write_config,
)
from tests.link.session_pair import plain_capabilities, plain_heartbeat


@pytest.fixture
async def coord() -> DevCoordinator:  # type: ignore[misc]
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def test_handshake_capabilities_and_enrollment_once(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("meta-llama/Llama-3.1-8B-Instruct") as backend:
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(backend.url,), enrollment_code="POD-ENROLL-1"
        )
        async with running_agent(cfg):
            agent = await agent_where(coord, lambda a: a.capabilities_count >= 1)
            assert agent.enrollment_code == "POD-ENROLL-1"
            assert agent.capabilities is not None
            [offer] = agent.capabilities.models
            assert offer.model_id == "meta-llama/Llama-3.1-8B-Instruct"
            assert offer.context_window == 4096 and offer.backend == "vllm"
            # auth_ok asks for a pass; its result is pushed too.
            await agent_where(coord, lambda a: a.capabilities_count >= 2)
        assert load(tmp_path / "identity.key").provider_id == agent.provider_id
        # Second run: provider_id is stored, so no enrollment code is sent.
        async with running_agent(cfg):
            await agent_where(coord, lambda a: a.connections == 2 and a.connected)
        assert list(agent.enrollment_codes) == ["POD-ENROLL-1", None]
    assert not coord.violations


async def test_auth_failed_backs_off_and_retries(coord: DevCoordinator, tmp_path: Path) -> None:
    coord.fail_auth_next(3, reason="not enrolled")
    policy = fast_policy()
    async with running_agent(write_config(tmp_path, coord.ws_url), policy):
        await coord.wait_for(lambda c: c.connected(), timeout=10)
    outcomes = [a.outcome for a in coord.attempts]
    assert outcomes[:3] == ["auth_failed"] * 3
    assert len(coord.attempts) >= 4
    coord.assert_no_violations()


async def test_wrong_first_frame_is_a_pre_auth_failure_then_retry(tmp_path: Path) -> None:
    answers: list[str] = []
    three_attempts = anyio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "heartbeat"}))
        try:
            answers.append(str(await ws.recv()))
        except ConnectionClosed:
            answers.append("<closed>")
        if len(answers) >= 3:
            three_attempts.set()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/provider/connect"
        async with running_agent(write_config(tmp_path, url)):
            with anyio.fail_after(10):
                await three_attempts.wait()
    assert answers[:3] == ["<closed>"] * 3  # the agent never answered a wrong first frame


async def test_capabilities_after_every_periodic_pass(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, coord.ws_url, interval_s=5)
    async with running_agent(cfg) as daemon:
        await agent_where(coord, lambda a: a.capabilities_count >= 2)
        passes_before = daemon.agent.discovery.passes if daemon.agent.discovery else 0
        await agent_where(coord, lambda a: a.capabilities_count >= 3, timeout=8)
        assert daemon.agent.discovery.passes > passes_before
    coord.assert_no_violations()


async def test_heartbeats_keep_cadence_and_validate(coord: DevCoordinator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, coord.ws_url, heartbeat_interval_s=1)
    async with running_agent(cfg):
        agent = await agent_where(coord, lambda a: a.heartbeat_count >= 4)
    times = list(agent.heartbeat_times)
    gaps = [b - a for a, b in pairwise(times[1:])]  # the first beat goes out with auth_ok
    assert all(0.8 < g < 2.0 for g in gaps), gaps
    beat = agent.last_heartbeat
    assert beat is not None and beat.queue_depth == 0 and beat.error_rate_60s == 0
    assert not coord.violations


async def test_agent_comes_back_after_ten_coordinator_kills(tmp_path: Path) -> None:
    first = DevCoordinator(host="127.0.0.1", port=0)
    await first.start()
    port = first.port
    url = first.ws_url
    await first.aclose()
    cfg = write_config(tmp_path, url)
    async with running_agent(cfg, fast_policy(cap_s=0.3)) as daemon:
        for _ in range(10):
            async with DevCoordinator(host="127.0.0.1", port=port) as coordinator:
                await coordinator.wait_for(lambda c: c.connected(), timeout=10)
        assert daemon.agent.session.attempts >= 10


async def test_flapping_coordinator_makes_delays_grow(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    coord.flap_next(20, code=1011)  # an error close: 1001/1012 would be planned cycles
    policy = fast_policy(cap_s=0.4)
    async with running_agent(write_config(tmp_path, coord.ws_url), policy):
        await coord.wait_for(lambda c: c.connected(), timeout=30)
        times = [a.at for a in list(coord.attempts)[:21]]
    gaps = [b - a for a, b in pairwise(times)]
    assert len(gaps) == 20
    assert mean(gaps[-5:]) > 2 * mean(gaps[:5])
    assert policy.ceiling_s() == 0.4  # escalated to the cap, not reset by the flaps
    coord.assert_no_violations()


async def test_planned_coordinator_restarts_neither_escalate_nor_wait_long(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    coord.flap_next(6, code=1012)  # a coordinator deploy, six times over
    policy = fast_policy(cap_s=30.0)
    policy.planned_spread_s = 0.05
    async with running_agent(write_config(tmp_path, coord.ws_url), policy):
        await coord.wait_for(lambda c: c.connected(), timeout=10)
    assert policy.failures == 0  # planned cycles are not failures
    gaps = [b.at - a.at for a, b in pairwise(list(coord.attempts)[:7])]
    assert len(gaps) == 6 and max(gaps) < 5.0  # never the 30 s cap


async def test_backoff_resets_after_a_healthy_session(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    policy = fast_policy(cap_s=5.0, healthy_after_s=0.0)
    policy.failures = 8  # as if after a long outage
    async with running_agent(write_config(tmp_path, coord.ws_url), policy):
        await coord.wait_for(lambda c: c.connected(), timeout=10)
        await coord.drop()
        await coord.wait_for(lambda c: len(c.connected()) == 1 and len(c.attempts) >= 2)
    assert policy.failures <= 1
    attempts = list(coord.attempts)
    assert attempts[1].at - (attempts[0].ended_at or 0) < 1.0  # immediate, not ~5 s
    coord.assert_no_violations()


async def test_garbage_frames_never_end_the_session(coord: DevCoordinator, tmp_path: Path) -> None:
    garbage: list[str | bytes] = [
        "",
        "not json",
        "[]",
        "null",
        '{"type":5}',
        '{"type":"job"}',
        '{"type":"job","job_id":"x","model_id":1}',
        '{"type":"job_cancel"}',
        '{"type":"unknown_kind","a":1}',
        '{"type":"auth_challenge","nonce":"AAAA"}',
        '{"type":"config_update"}',
        b"\x00\xff binary",
        "\ud7ff" * 1000,
        json.dumps({"type": "job", "job_id": "y" * 500, "model_id": "m", "request": {}}),
    ]
    async with running_agent(write_config(tmp_path, coord.ws_url, heartbeat_interval_s=1)):
        agent = await agent_where(coord, lambda a: a.connected)
        for frame in garbage:
            await coord.send(agent.provider_id, frame)
        seen = agent.heartbeat_count
        await agent_where(coord, lambda a: a.heartbeat_count >= seen + 2)
        assert agent.connections == 1 and coord.connected() == [agent.provider_id]
    # the job frame with a readable id but a bad body got exactly one bad_request record
    assert coord.jobs["x"].terminal is not None
    assert coord.jobs["x"].terminal.error_code == "bad_request"  # type: ignore[union-attr]
    coord.assert_no_violations()


async def test_graceful_stop_sends_draining_then_closes_1001_without_leaking_tasks(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        tasks_before = asyncio.all_tasks()
        async with running_agent(cfg) as daemon:
            agent = await agent_where(coord, lambda a: a.capabilities_count >= 1)
        assert daemon.agent.draining
        await coord.wait_for(lambda c: not c.connected())
    assert agent.capabilities is not None
    assert agent.capabilities.models == []
    assert agent.capabilities.metadata.status == "draining"
    assert coord.attempts[-1].close_code == 1001
    leftover = {t for t in asyncio.all_tasks() if t not in tasks_before}
    assert leftover == set(), leftover
    coord.assert_no_violations()


async def test_reload_with_a_new_coordinator_url_reconnects_there(tmp_path: Path) -> None:
    async with (
        DevCoordinator(host="127.0.0.1", port=0) as first,
        DevCoordinator(host="127.0.0.1", port=0) as second,
    ):
        cfg = write_config(tmp_path, first.ws_url)
        async with running_agent(cfg) as daemon:
            await first.wait_for(lambda c: c.connected())
            cfg.write_text(cfg.read_text().replace(first.ws_url, second.ws_url))
            assert await daemon.reload() is True
            await second.wait_for(lambda c: c.connected())
            await first.wait_for(lambda c: not c.connected())


async def post_chat(url: str, model: str) -> tuple[int, bytes]:
    """One streamed completion through the coordinator's OpenAI front: (status, body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        ) as response,
    ):
        return response.status, await response.read()


async def test_drain_waits_for_in_flight_jobs_and_a_second_stop_skips_it(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as backend, anyio.create_task_group() as clients:
        backend.gate = anyio.Event()  # the job stays in flight until the gate opens
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(backend.url,),
            drain_timeout_s=600,
            heartbeat_interval_s=1,
        )
        async with running_agent(cfg) as daemon:
            await agent_where(coord, lambda a: a.capabilities is not None and a.capabilities.models)
            clients.start_soon(post_chat, coord.http_url, "m")
            await backend.started.wait()
            daemon.request_stop()
            agent = await agent_where(
                coord,
                lambda a: (
                    a.capabilities is not None and a.capabilities.metadata.status == "draining"
                ),
            )
            beats = agent.heartbeat_count
            await agent_where(coord, lambda a: a.heartbeat_count >= beats + 2)  # keeps beating
            assert agent.last_heartbeat is not None and agent.last_heartbeat.queue_depth == 1
            assert coord.connected() == [agent.provider_id]  # still draining, still connected
            with anyio.fail_after(5):  # far below the 600 s budget: the second stop forces it
                daemon.request_stop()
                await coord.wait_for(lambda c: not c.connected())
        backend.gate.set()
    assert coord.attempts[-1].close_code == 1001
    [record] = coord.finished.values()  # the cancelled job still got its one terminal frame
    assert record.terminal is not None and record.terminal.type == "job_error"
    assert record.terminal.error_code == "shutting_down" and record.terminal_count == 1
    coord.assert_no_violations()


async def test_drain_ends_when_the_last_job_finishes(coord: DevCoordinator, tmp_path: Path) -> None:
    async with fake_vllm("m") as backend, anyio.create_task_group() as clients:
        backend.gate = anyio.Event()
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,), drain_timeout_s=600)
        async with running_agent(cfg) as daemon:
            await agent_where(coord, lambda a: a.capabilities is not None and a.capabilities.models)
            clients.start_soon(post_chat, coord.http_url, "m")
            await backend.started.wait()
            daemon.request_stop()
            await agent_where(
                coord,
                lambda a: (
                    a.capabilities is not None and a.capabilities.metadata.status == "draining"
                ),
            )
            assert coord.connected()
            with anyio.fail_after(5):
                backend.gate.set()
                await coord.wait_for(lambda c: not c.connected())
    assert coord.attempts[-1].close_code == 1001
    [record] = coord.finished.values()
    assert record.terminal is not None and record.terminal.type == "job_done"
    coord.assert_no_violations()


async def test_an_oversize_inbound_frame_ends_only_that_session(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with running_agent(write_config(tmp_path, coord.ws_url)):
        agent = await agent_where(coord, lambda a: a.connected)
        await coord.send(agent.provider_id, "x" * (16 * 1024 * 1024 + 1))
        await coord.wait_for(lambda c: c.attempts[0].close_code == 1009)
        await agent_where(coord, lambda a: a.connections == 2 and a.connected, timeout=10)
    coord.assert_no_violations()


garbage_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(["type", "job_id", "model_id", "request", "format", "deadline_ms", "x"]),
        st.one_of(
            st.sampled_from([*sorted(KNOWN_TYPES), "job", "nope"]),
            st.text(max_size=20),
            st.integers(),
            st.none(),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        ),
        max_size=6,
    ).map(json.dumps),
)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(garbage_frames, min_size=1, max_size=25))
def test_random_garbage_never_ends_the_session(frames: list[str | bytes]) -> None:
    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as directory:
            async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
                cfg = write_config(Path(directory), coordinator.ws_url, heartbeat_interval_s=1)
                async with running_agent(cfg):
                    agent = await agent_where(coordinator, lambda a: a.connected)
                    for frame in frames:
                        await coordinator.send(agent.provider_id, frame)
                    seen = agent.heartbeat_count
                    await agent_where(coordinator, lambda a: a.heartbeat_count >= seen + 1)
                    assert agent.connections == 1 and agent.connected

    anyio.run(scenario)


async def wait_until(predicate: object, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Poll a condition of the agent's own state (it has no event to await), bounded."""
    assert callable(predicate)
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (the agent's state has no event to await)
            await anyio.sleep(0.01)


async def test_a_failing_identity_save_is_a_local_fault_and_does_not_redial_in_a_loop(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from provider_agent.link.state import State

    cfg = write_config(tmp_path, coord.ws_url)
    async with running_agent(cfg) as daemon:

        def disk_full(provider_id: str) -> bool:
            raise OSError(28, "No space left on device")

        daemon.agent.session.identity.save_provider_id = disk_full  # type: ignore[method-assign]
        await coord.wait_for(lambda c: len(c.attempts) >= 1 and c.attempts[0].ended_at)
        await wait_until(lambda: daemon.agent.session.state is State.IDLE)
        assert len(coord.attempts) == 1  # no redial storm: a local fault waits >= 30 s
    [line] = [r.getMessage() for r in caplog.records if "fault=local" in r.getMessage()]
    assert "No space left on device" in line and "cannot connect" not in line
    delay = float(line.rsplit("next_delay_s=", 1)[1])
    assert delay >= 30
    assert any(r.levelname == "ERROR" and "on our side" in r.getMessage() for r in caplog.records)


async def test_each_shutdown_step_has_a_deadline(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_config(tmp_path, coord.ws_url, drain_timeout_s=1)
    hung: list[str] = []

    def hanging(name: str):  # type: ignore[no-untyped-def]
        async def body() -> None:
            hung.append(name)
            await anyio.sleep_forever()

        return body

    quick = Timings(cancel_jobs_s=0.2, flush_outbox_s=0.2)
    async with running_agent(cfg, timings=quick) as daemon:
        await coord.wait_for(lambda c: c.connected())
        daemon.agent.jobs.wait_idle = hanging("wait")  # type: ignore[method-assign]
        daemon.agent.jobs.cancel_all = hanging("cancel")  # type: ignore[method-assign]
        daemon.agent.jobs.flush = hanging("flush")  # type: ignore[method-assign]
        started = anyio.current_time()
    elapsed = anyio.current_time() - started
    assert hung == ["wait", "cancel", "flush"]
    assert elapsed < 5  # 1 + 0.2 + 0.2 and the close, never stuck on a hung step
    late = [r.getMessage() for r in caplog.records if "passed its deadline" in r.getMessage()]
    assert len(late) == 3 and "'wait for in-flight jobs'" in late[0]
    assert coord.attempts[-1].close_code == 1001  # the session still closed properly


async def test_a_second_stop_cuts_the_drain_wait_short(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "provider_agent.daemon")
    cfg = write_config(tmp_path, coord.ws_url, drain_timeout_s=600)
    waiting = anyio.Event()

    async def never_idle() -> None:
        waiting.set()
        await anyio.sleep_forever()

    async with running_agent(cfg) as daemon:
        await coord.wait_for(lambda c: c.connected())
        daemon.agent.jobs.wait_idle = never_idle  # type: ignore[method-assign]
        daemon.request_stop()
        await waiting.wait()
        with anyio.fail_after(5):  # far below the 600 s budget
            daemon.request_stop()
            await coord.wait_for(lambda c: not c.connected())
    assert any("cut short by a second signal" in r.getMessage() for r in caplog.records)
    assert coord.attempts[-1].close_code == 1001


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's end of sd_notify: a datagram socket named by $NOTIFY_SOCKET (read with
    `_datagrams`)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield server


def _datagrams(server: socket.socket) -> list[str]:
    """What the agent has said to systemd since the last call."""
    messages: list[str] = []
    while True:
        try:
            messages.append(server.recv(4096).decode())
        except BlockingIOError:
            return messages


async def test_sd_notify_ready_after_the_first_pass_then_reloading_ready_and_stopping(
    coord: DevCoordinator, tmp_path: Path, notify_socket: socket.socket
) -> None:
    cfg = write_config(tmp_path, coord.ws_url)
    async with running_agent(cfg) as daemon:
        await coord.wait_for(lambda c: c.connected())
        assert await daemon.reload() is True
    messages = _datagrams(notify_socket)
    kinds = [m.split("=", 1)[0] for m in messages if not m.startswith("STATUS=")]
    assert kinds[:1] == ["READY"]
    assert any(m.startswith("STATUS=session") for m in messages)
    reloading = next(i for i, m in enumerate(messages) if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in messages[reloading]
    assert "READY=1" in messages[reloading + 1 :][0] or any(
        m.startswith("READY=1") for m in messages[reloading + 1 :]
    )
    stopping = next(i for i, m in enumerate(messages) if m.startswith("STOPPING=1"))
    assert stopping > reloading
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[stopping:])


async def test_sd_notify_status_says_at_once_when_the_link_is_lost(
    coord: DevCoordinator, tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Not at the next watchdog tick (30 s): `systemctl status` shows the lost session."""
    async with running_agent(write_config(tmp_path, coord.ws_url)):
        await agent_where(coord, lambda a: a.capabilities_count >= 2)  # handshake + pass
        _datagrams(notify_socket)  # what startup said
        assert await coord.drop() == 1
        said: list[str] = []
        with anyio.fail_after(10):  # until it is back: redialled, passed, pushed
            while not any(m.startswith("STATUS=session authenticated") for m in said):
                said += _datagrams(notify_socket)
                await anyio.sleep(0.01)
    lost = [i for i, m in enumerate(said) if m.startswith("STATUS=session idle")]
    back = [i for i, m in enumerate(said) if m.startswith("STATUS=session authenticated")]
    assert lost and lost[0] < back[0], said


@pytest.mark.parametrize("healthy", [True, False])
async def test_watchdog_pings_only_while_the_session_makes_progress(
    coord: DevCoordinator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    notify_socket: socket.socket,
    healthy: bool,
) -> None:
    """WATCHDOG=1 every half period while authenticated; a handshake that hangs (a coordinator
    that never sends its challenge) stops it after two periods, so systemd would restart us."""

    hanging = anyio.Event()
    release = anyio.Event()

    async def silent(ws: ServerConnection) -> None:
        hanging.set()
        await release.wait()

    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    async with serve(silent, "127.0.0.1", 0) as stuck:
        port = next(iter(stuck.sockets)).getsockname()[1]
        url = coord.ws_url if healthy else f"ws://127.0.0.1:{port}/provider/connect"
        async with running_agent(write_config(tmp_path, url)):
            if healthy:
                await coord.wait_for(lambda c: c.connected())
            else:
                await hanging.wait()
            await anyio.sleep(0.3)  # the stuck threshold (two periods) passes
            _datagrams(notify_socket)  # what came before is not the point
            await anyio.sleep(0.5)  # ten pings' worth of time
            pings = [m for m in _datagrams(notify_socket) if m == "WATCHDOG=1"]
        release.set()
    if healthy:
        assert len(pings) >= 5
    else:
        assert pings == []


async def test_out_of_cycle_passes_are_spaced_however_often_they_are_asked_for(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """protocol.md §2: out-of-cycle discovery passes at most once per 10 s (here 0.5 s), so a
    flapping coordinator (a pass asked for at every auth_ok) cannot make the agent probe in a
    loop; the periodic pass is unaffected."""
    cfg = write_config(tmp_path, coord.ws_url)
    async with running_agent(cfg, out_of_cycle_pass_s=0.5) as daemon:
        await coord.wait_for(lambda c: c.connected())
        before = daemon.agent.discovery.passes
        started = anyio.current_time()
        for _ in range(20):
            daemon.agent.passes.request()
            await anyio.sleep(0.05)  # asked for every 50 ms for a second
        passes = daemon.agent.discovery.passes - before
        elapsed = anyio.current_time() - started
    assert 1 <= passes <= elapsed / 0.5 + 1
    coord.assert_no_violations()


# --- the reconnect loop (tenacity) on a bare Session ----------------------------------------------


class Ceiling(random.Random):
    """A fake rng whose uniform(a, b) is always b: every backoff is its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def an_hour() -> ReconnectPolicy:
    """Every failed attempt waits an hour: a test sees the loop's sleep, never its end."""
    return ReconnectPolicy(base_s=3600, cap_s=3600, rng=Ceiling())


class NoJobs:
    """An `InboundSink` for sessions that are sent no jobs."""

    def submit(self, job: Job) -> None:
        raise AssertionError(f"unexpected job {job.job_id}")

    def cancel(self, job_id: str) -> None:
        raise AssertionError(f"unexpected cancel {job_id}")

    def reject(self, job_id: str, reason: str, code: str) -> None:
        raise AssertionError(f"unexpected reject {job_id}")

    async def confirmed(self, job_ids: Sequence[str]) -> None:
        return None

    def connection_lost(self) -> None:
        return None


class Bare:
    """A `Session` with no daemon around it: its hooks record what the loop does."""

    def __init__(self, tmp_path: Path, url: str, policy: ReconnectPolicy) -> None:
        self.url = url
        self.faults: list[Fault | None] = []
        self.waiting = anyio.Event()  # set by on_reconnect: the loop is about to sleep
        self.authenticated = anyio.Event()
        self.outcome: list[str] = []
        self.session = Session(
            SessionHooks(
                url=lambda: self.url,
                enrollment_code=lambda: None,
                heartbeat_interval_s=lambda: 15.0,
                capabilities=plain_capabilities,
                heartbeat=plain_heartbeat,
                on_authenticated=self.authenticated.set,
                on_reconnect=self._reconnecting,
            ),
            load_or_create(tmp_path / "identity.key"),
            NoJobs(),
            policy=policy,
        )

    def _reconnecting(self, fault: Fault | None) -> None:
        self.faults.append(fault)
        self.waiting.set()

    async def run(self) -> None:
        """`Session.run()`, noting whether it returned or was cancelled."""
        try:
            await self.session.run()
        except anyio.get_cancelled_exc_class():
            self.outcome.append("cancelled")
            raise
        self.outcome.append("returned")


async def test_cancelling_the_session_while_it_waits_to_redial_ends_it_at_once(
    tmp_path: Path,
) -> None:
    bare = Bare(tmp_path, f"ws://127.0.0.1:{free_port()}/provider/connect", an_hour())
    async with anyio.create_task_group() as group:
        group.start_soon(bare.run)
        with anyio.fail_after(10):
            await bare.waiting.wait()  # refused, logged, about to sleep an hour
        started = anyio.current_time()
        group.cancel_scope.cancel()
    assert anyio.current_time() - started < 1.0
    assert bare.outcome == ["cancelled"]  # the cancellation came out as itself, not retried
    assert bare.session.attempts == 1
    [fault] = bare.faults
    assert fault is not None and fault.kind is FaultKind.NETWORK


async def test_cancelling_a_connected_session_ends_it_at_once(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    bare = Bare(tmp_path, coord.ws_url, an_hour())
    async with anyio.create_task_group() as group:
        group.start_soon(bare.run)
        with anyio.fail_after(10):
            await bare.authenticated.wait()
        started = anyio.current_time()
        group.cancel_scope.cancel()
    assert anyio.current_time() - started < 1.0
    assert bare.outcome == ["cancelled"]
    assert bare.faults == [] and bare.session.attempts == 1  # never counted as a failure
    await coord.wait_for(lambda c: not c.connected())
    coord.assert_no_violations()


async def test_a_keyboard_interrupt_in_an_attempt_is_not_retried(tmp_path: Path) -> None:
    bare = Bare(tmp_path, "", an_hour())
    interrupt = KeyboardInterrupt()

    def url() -> str:
        raise interrupt

    bare.session.hooks.url = url
    with anyio.fail_after(5), pytest.raises(KeyboardInterrupt) as caught:
        await bare.session.run()
    assert caught.value is interrupt  # the very exception, out of tenacity untouched
    assert bare.session.attempts == 1 and bare.faults == []


async def test_reconnect_cuts_the_backoff_wait_short_and_close_ends_the_loop(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "provider_agent.link.session")
    bare = Bare(tmp_path, f"ws://127.0.0.1:{free_port()}/provider/connect", an_hour())
    async with anyio.create_task_group() as group:
        group.start_soon(bare.run)
        with anyio.fail_after(10):
            await bare.waiting.wait()  # an hour to wait
            bare.url = coord.ws_url
            bare.session.reconnect()  # the URL changed: dial now
            await bare.authenticated.wait()
        assert bare.session.attempts == 2
        bare.session.close()
    assert bare.outcome == ["returned"]
    assert coord.attempts[-1].close_code == 1001
    logged = [r.getMessage() for r in caplog.records]
    assert "coordinator session closed (going away)" in logged
    coord.assert_no_violations()


async def test_close_while_waiting_to_redial_returns_at_once(tmp_path: Path) -> None:
    bare = Bare(tmp_path, f"ws://127.0.0.1:{free_port()}/provider/connect", an_hour())
    async with anyio.create_task_group() as group:
        group.start_soon(bare.run)
        with anyio.fail_after(10):
            await bare.waiting.wait()
        started = anyio.current_time()
        bare.session.close()
    assert anyio.current_time() - started < 1.0
    assert bare.outcome == ["returned"] and bare.session.attempts == 1


async def test_a_requested_reconnect_redials_at_once_and_resets_the_backoff(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    policy = an_hour()
    bare = Bare(tmp_path, coord.ws_url, policy)
    async with anyio.create_task_group() as group:
        group.start_soon(bare.run)
        await coord.wait_for(lambda c: c.connected())
        policy.failures = 7  # as if after an outage: a fault now would wait an hour
        bare.session.reconnect()
        await coord.wait_for(lambda c: len(c.attempts) == 2 and len(c.connected()) == 1)
        assert bare.faults == [None] and policy.failures == 0
        bare.session.close()
    assert coord.attempts[0].close_code == 1000 and coord.attempts[1].close_code == 1001
    coord.assert_no_violations()


async def test_one_log_line_and_one_hook_call_per_ended_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = Bare(
        tmp_path,
        f"ws://127.0.0.1:{free_port()}/provider/connect",
        ReconnectPolicy(base_s=0.001, cap_s=0.001, rng=Ceiling()),
    )
    five = anyio.Event()

    def reconnecting(fault: Fault | None) -> None:
        bare.faults.append(fault)
        if len(bare.faults) == 5:
            bare.session.close()
            five.set()

    bare.session.hooks.on_reconnect = reconnecting
    with anyio.fail_after(10):
        await bare.run()
    assert five.is_set() and bare.outcome == ["returned"]
    lines = [r.getMessage() for r in caplog.records if "coordinator connection" in r.getMessage()]
    assert len(lines) == 5
    for number, line in enumerate(lines, start=1):
        assert line.startswith(f"coordinator connection attempt={number} ended fault=network")
        assert line.endswith("next_delay_s=0.001")
    assert all(f is not None and f.kind is FaultKind.NETWORK for f in bare.faults)


def test_policy_wait_asks_the_policy_about_the_attempts_redial() -> None:
    policy = ReconnectPolicy(failures=2, rng=Ceiling())
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    state.set_result(Redial(Fault(FaultKind.LOCAL, "disk full"), None, 1.0))
    assert PolicyWait(policy)(state) == 30.0 and policy.failures == 3  # 4 s, lifted to 30 s
    state.set_result(Redial(None, None, 2.0, requested=True))
    assert PolicyWait(policy)(state) == 0.0 and policy.failures == 0
