"""Maintenance pause: durations and reasons as operators type them, the persisted pause, the
control socket (real unix sockets, hostile clients included), the agent paused and resumed as
the reference coordinator sees it, and a pause that survives a restart of a real process."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from provider_agent.dev.coordinator import AgentRecord, DevCoordinator
from provider_agent.dev.sim.core import SimBackend
from provider_agent.errors import ControlError, NotRunning
from provider_agent.link.protocol import JobDone, JobError
from provider_agent.ops.pause import (
    MAX_LINE_BYTES,
    PAUSE_FILE,
    SOCKET_NAME,
    ControlRequest,
    Pause,
    call,
    check_reason,
    parse_duration,
)
from tests.agent_harness import agent_where, fake_vllm, running_agent, write_config
from tests.jobs.test_executor import REQUEST, finished, serving
from tests.test_clock import RFC3339_MS
from tests.test_daemon import agent_process

# --- what operators type -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), (" 2h ", 7200)],
)
def test_durations_are_a_number_with_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "2",  # no unit
        "h",  # no number
        "2x",  # unknown unit
        "2 h",  # inner space
        "-2h",  # negative
        "0s",  # nothing
        "1e3s",  # exponent
        "２h",  # a non-ASCII digit
        "367d",  # beyond a year
        "9" * 400 + "d",  # huge
        "2h\nresume",  # control characters
        "\x00",
    ],
)
def test_bad_durations_get_one_line_each(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert message.startswith("--for ") and "\n" not in message and len(message) < 200


@pytest.mark.parametrize(
    "reason", ["", "   ", "x" * 501, "two\nlines", "colour \x1b[31mred", "tab\there", "nul\x00"]
)
def test_bad_reasons_are_refused_with_one_line(reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_reason(reason)
    assert "\n" not in str(caught.value)


def test_a_reason_may_be_any_printable_line() -> None:
    assert check_reason("disk swap, back at 14:00 ✓ — Jörg") == "disk swap, back at 14:00 ✓ — Jörg"


# --- the persisted pause -------------------------------------------------------------------------


class Changes:
    """Counts the control's change notifications; `next()` waits for the following one."""

    def __init__(self) -> None:
        self.count = 0
        self._event = anyio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._event.set()
        self._event = anyio.Event()

    async def next(self) -> None:
        with anyio.fail_after(5):
            await self._event.wait()


async def test_a_pause_is_persisted_0600_and_taken_up_by_the_next_run(tmp_path: Path) -> None:
    changes = Changes()
    first = Pause(tmp_path, changes)
    await first.pause(3600, "disk swap")
    assert changes.count == 1
    path = tmp_path / PAUSE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Pause(tmp_path, lambda: None)
    again.load()
    assert again.paused is not None and again.paused.reason == "disk swap"
    view = again.view()
    assert view is not None and view.left_s is not None and 3590 < view.left_s <= 3600
    assert await again.resume()
    assert not path.exists() and again.paused is None
    assert not await again.resume()  # nothing to resume
    third = Pause(tmp_path, lambda: None)
    third.load()
    assert third.paused is None


async def test_a_pause_whose_time_ended_while_stopped_is_forgotten(tmp_path: Path) -> None:
    clock = [1000.0]
    control = Pause(tmp_path, lambda: None, clock=lambda: clock[0])
    await control.pause(60, None)
    clock[0] += 61
    later = Pause(tmp_path, lambda: None, clock=lambda: clock[0])
    later.load()
    assert later.paused is None and not (tmp_path / PAUSE_FILE).exists()


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"\xff\xfe\x00garbage", b"[]", b'{"since":"yesterday"}', b"{}"]
)
def test_an_unreadable_pause_file_keeps_the_agent_paused_until_resume(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / PAUSE_FILE).write_bytes(content)
    control = Pause(tmp_path, lambda: None)
    control.load()
    assert control.paused is not None and control.paused.until is None


async def test_a_pause_for_a_duration_ends_by_itself(tmp_path: Path) -> None:
    changes = Changes()
    control = Pause(tmp_path, changes)
    async with anyio.create_task_group() as group:
        await group.start(control.serve)
        await control.pause(0.2, "short")
        assert changes.count == 1 and control.paused is not None
        await changes.next()  # the timer ended it
        assert control.paused is None and not (tmp_path / PAUSE_FILE).exists()
        group.cancel_scope.cancel()


# --- the socket ----------------------------------------------------------------------------------


@asynccontextmanager
async def serving_control(tmp_path: Path) -> AsyncIterator[Pause]:
    """A Pause serving its socket in `tmp_path` for the body of the `async with`."""
    control = Pause(tmp_path, lambda: None)
    async with anyio.create_task_group() as group:
        await group.start(control.serve)
        yield control
        group.cancel_scope.cancel()
    assert not (tmp_path / SOCKET_NAME).exists()  # removed on the way out


async def raw(path: Path, data: bytes, *, close_write: bool = False) -> dict[str, object]:
    """Send bytes as they are; the one reply line, parsed."""
    async with await anyio.connect_unix(path) as stream:
        await stream.send(data)
        if close_write:
            await stream.send_eof()
        line = await BufferedByteReceiveStream(stream).receive_until(b"\n", MAX_LINE_BYTES)
    reply = orjson.loads(line)
    assert isinstance(reply, dict)
    return reply


async def test_the_socket_is_0600_and_pauses_resumes_and_reports(tmp_path: Path) -> None:
    async with serving_control(tmp_path) as served:
        await socket_checks(served, tmp_path)


async def socket_checks(served: Pause, tmp_path: Path) -> None:
    sock = tmp_path / SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    status = await call(tmp_path, ControlRequest(op="status"))
    assert status.ok and status.paused is None
    paused = await call(tmp_path, ControlRequest(op="pause", for_s=7200, reason="maintenance"))
    assert paused.changed and paused.paused is not None
    assert paused.paused.reason == "maintenance" and paused.paused.until is not None
    assert served.paused is not None
    resumed = await call(tmp_path, ControlRequest(op="resume"))
    assert resumed.changed and resumed.paused is None and served.paused is None
    again = await call(tmp_path, ControlRequest(op="resume"))
    assert again.ok and not again.changed


@pytest.mark.parametrize(
    ("data", "close_write"),
    [
        (b"\n", False),  # empty
        (b"not json\n", False),
        (b"[1,2]\n", False),
        (b'{"op":"reboot"}\n', False),  # unknown op
        (b'{"op":"pause","for_s":-5}\n', False),
        (b'{"op":"pause","for_s":1e308}\n', False),
        (b'{"op":"pause","reason":"a\\u001b[31m"}\n', False),  # control characters
        (b'{"op":"pause","reason":"' + b"x" * 600 + b'"}\n', False),
        (b'{"op":"pause","extra":1}\n', False),
        (b"\xff\xfe\xfd\n", False),  # not UTF-8
        (b'{"op":"pause"', True),  # no end of line
        (b"x" * (MAX_LINE_BYTES + 10) + b"\n", False),  # huge
        (b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n", False),  # deeply nested
    ],
)
async def test_hostile_requests_get_an_error_and_change_nothing(
    tmp_path: Path, data: bytes, close_write: bool
) -> None:
    async with serving_control(tmp_path) as served:
        reply = await raw(tmp_path / SOCKET_NAME, data, close_write=close_write)
        assert reply["ok"] is False and isinstance(reply["error"], str) and reply["error"]
        assert "\n" not in reply["error"]
        assert served.paused is None
        assert (await call(tmp_path, ControlRequest(op="status"))).ok  # still serving


async def test_no_agent_running_is_told_apart_from_other_failures(tmp_path: Path) -> None:
    with pytest.raises(NotRunning, match="no control socket"):
        await call(tmp_path, ControlRequest(op="status"))
    # A socket left by a killed agent: nobody answers.
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(tmp_path / SOCKET_NAME))
    leftover.close()
    with pytest.raises(NotRunning, match="nobody answers"):
        await call(tmp_path, ControlRequest(op="status"))
    (tmp_path / SOCKET_NAME).unlink()
    (tmp_path / SOCKET_NAME).write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        await call(tmp_path, ControlRequest(op="status"))


async def test_a_leftover_socket_is_replaced_and_a_live_one_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(tmp_path / SOCKET_NAME))
    leftover.close()
    first = Pause(tmp_path, lambda: None)
    second = Pause(tmp_path, lambda: None)
    async with anyio.create_task_group() as group:
        await group.start(first.serve)
        inode = (tmp_path / SOCKET_NAME).stat().st_ino
        await group.start(second.serve)  # same state dir: another agent answers there
        assert (tmp_path / SOCKET_NAME).stat().st_ino == inode
        await call(tmp_path, ControlRequest(op="pause"))
        assert first.paused is not None and second.paused is None
        group.cancel_scope.cancel()
    assert "another agent answers" in caplog.text


async def test_a_pause_that_cannot_be_persisted_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / PAUSE_FILE).mkdir()  # the atomic rename over a directory fails
    async with serving_control(tmp_path) as served:
        with pytest.raises(ControlError, match="cannot write"):
            await call(tmp_path, ControlRequest(op="pause"))
        assert served.paused is None


# --- the agent, paused ---------------------------------------------------------------------------


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


def status_is(
    status: str, *, models: bool | None = None, connection: int = 1
) -> Callable[[AgentRecord], bool]:
    def check(agent: AgentRecord) -> bool:
        caps = agent.capabilities
        return (
            caps is not None
            and agent.connections >= connection
            and caps.metadata.status == status
            and (models is None or bool(caps.models) == models)
        )

    return check


async def test_paused_agent_advertises_nothing_keeps_beating_finishes_jobs_refuses_new_ones(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m", tokens=3) as backend:
        backend.gate = anyio.Event()
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(backend.url,), heartbeat_interval_s=1
        )
        async with running_agent(cfg) as daemon:
            pid = await serving(coord)
            in_flight = await coord.send_job(pid, "m", REQUEST)
            await backend.started.wait()
            reply = await call(daemon.config.state.dir, ControlRequest(op="pause", reason="fan"))
            assert reply.paused is not None
            record = await agent_where(coord, status_is("paused"))
            assert record.capabilities is not None and record.capabilities.models == []
            beats = record.heartbeat_count
            await agent_where(coord, lambda a: a.heartbeat_count > beats)  # still beating
            refused = await coord.send_job(pid, "m", REQUEST)
            late = await finished(coord, refused.job_id)
            backend.gate.set()  # the job accepted before the pause finishes
            done = await finished(coord, in_flight.job_id)
            await call(daemon.config.state.dir, ControlRequest(op="resume"))
            await agent_where(coord, status_is("ready", models=True))
    # protocol.md §8: paused is `out_of_capacity`; `shutting_down` is for a stopping agent only
    assert isinstance(late.terminal, JobError) and late.terminal.error_code == "out_of_capacity"
    assert late.terminal.message == "paused for maintenance"
    assert isinstance(done.terminal, JobDone)
    assert len(backend.bodies) == 1  # the refused job never reached the backend
    coord.assert_no_violations()


async def test_a_pause_with_a_duration_says_until_when_and_ends_by_itself(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with SimBackend("vllm", ["m"], tokens_per_s=0) as sim:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(sim.base_url,))
        async with running_agent(cfg) as daemon:
            await serving(coord)
            await call(daemon.config.state.dir, ControlRequest(op="pause", for_s=2))
            paused = await agent_where(coord, status_is("paused"))
            assert paused.capabilities is not None
            until = paused.capabilities.model_dump()["metadata"]["paused_until"]
            assert isinstance(until, str) and RFC3339_MS.fullmatch(until), until
            await agent_where(coord, status_is("ready", models=True))
    coord.assert_no_violations()


# --- the command line, against a real agent process ----------------------------------------------


async def cli(config: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    command = [sys.executable, "-m", "provider_agent", *args, "--config", str(config)]
    done = await anyio.run_process([*command, "--allow-insecure"], check=False, env=env)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_pause_survives_a_restart_until_resume(coord: DevCoordinator, tmp_path: Path) -> None:
    async with SimBackend("vllm", ["m"], tokens_per_s=0) as sim:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(sim.base_url,))
        async with agent_process(cfg, "--allow-insecure") as agent:
            await agent_where(coord, status_is("ready", models=True), timeout=20)
            code, out, err = await cli(cfg, "pause", "--for", "2h", "--reason", "disk swap")
            assert (code, err) == (0, ""), err
            assert out.startswith("paused: no models advertised until ") and "disk swap" in out
            await agent_where(coord, status_is("paused"))
            agent.signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await agent.process.wait() == 0
        code, _, err = await cli(cfg, "resume")  # nothing runs: one line, exit 1
        assert code == 1 and err.count("\n") == 1 and "no agent is running" in err
        async with agent_process(cfg, "--allow-insecure"):
            # The new process, its new session: paused (it was draining when the first stopped).
            paused = status_is("paused", models=False, connection=2)
            await agent_where(coord, paused, timeout=20)
            code, out, _ = await cli(cfg, "resume")
            assert code == 0 and out == "resumed: models are advertised again\n"
            await agent_where(coord, status_is("ready", models=True, connection=2))
            code, out, _ = await cli(cfg, "resume")
            assert code == 0 and out == "not paused: nothing to resume\n"
    coord.assert_no_violations()


async def test_pause_with_nothing_running_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    code, out, err = await cli(cfg, "pause")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("pause: no agent is running") and str(tmp_path) in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--for", "soon"), "--for 'soon': not a duration"),
        (("--for", "0s"), "--for '0s': must be longer than 0"),
        (("--for", "-5m"), "--for '-5m': must be longer than 0"),
        (("--for=-5m",), "--for '-5m': must be longer than 0"),
        (("--for", "0"), "--for '0': not a duration"),
        (("--for", ""), "--for '': not a duration"),
        (("--for", "400d"), "--for '400d': at most 366d"),
        (("--reason", ""), "--reason is empty"),
        (("--reason", "a\nb"), "printable"),
    ],
)
async def test_bad_pause_options_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    """cli.md (settled): a bad or non-positive DURATION is an invalid argument: exit 2, one line
    saying which and why, and nothing asked of an agent."""
    cfg = write_config(tmp_path, "ws://127.0.0.1:9/provider/connect")
    code, out, err = await cli(cfg, "pause", *args)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("pause: ") and needle in err
