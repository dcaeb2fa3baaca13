"""Serving jobs end to end: the reference coordinator → the agent → loopback backends.

Every test ends asserting the coordinator saw no contract problem and, where jobs ran, that each
job got exactly one terminal frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import cast

import anyio
import orjson
import pytest

from provider_agent.backends import Registry
from provider_agent.clock import Timings
from provider_agent.dev.coordinator import DevCoordinator, JobRecord
from provider_agent.discovery.catalog import Price, Route
from provider_agent.errors import OutboxError
from provider_agent.jobs.executor import Executor, ExecutorHooks
from provider_agent.jobs.ratelimit import TokenWindow
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import Job, JobDone, JobError, decode
from provider_agent.observe.heartbeat import JobStats
from provider_agent.ops.selftest import MemoryStore
from tests.agent_harness import (
    agent_where,
    fake_vllm,
    running_agent,
    sse_chunk,
    write_config,
)

REQUEST = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def serving(coord: DevCoordinator, model: str = "m") -> str:
    """Wait until the agent advertises `model`; its provider_id."""
    agent = await agent_where(
        coord,
        lambda a: (
            a.capabilities is not None and any(o.model_id == model for o in a.capabilities.models)
        ),
    )
    return agent.provider_id


async def finished(coord: DevCoordinator, job_id: str, timeout: float = 10) -> JobRecord:  # noqa: ASYNC109
    return await coord.wait_for(
        lambda c: done if (done := c.jobs.get(job_id)) and done.terminal is not None else None,
        timeout,
    )


async def test_bytes_relayed_verbatim_and_job_done_carries_the_backends_usage(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m", tokens=20) as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST)
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobDone)
    assert (
        bytes(record.data or b"") == backend.streamed[0]
    )  # every upstream byte, in order, unaltered
    assert record.terminal.tokens.input == 7 and record.terminal.tokens.output == 20
    assert record.terminal.usage_source is None  # reported by the backend, not estimated
    sent = backend.bodies[0]
    assert sent["stream"] is True and sent["model"] == "m"
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == REQUEST["messages"] and sent["max_tokens"] == 8
    coord.assert_no_violations()


@pytest.mark.parametrize("failure", ["refused", 500, 404, 429, 503])
async def test_fallback_before_the_first_byte_gives_one_job_done(
    coord: DevCoordinator, tmp_path: Path, failure: str | int
) -> None:
    async with AsyncExitStack() as stack, fake_vllm("m") as good:
        bad = await stack.enter_async_context(fake_vllm("m"))
        if failure != "refused":
            bad.status = int(failure)
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(bad.url, good.url))
        async with running_agent(cfg):
            pid = await serving(coord)
            if failure == "refused":
                await stack.aclose()  # discovered, then gone: connections are refused
            job = await coord.send_job(pid, "m", REQUEST)
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobDone), record.terminal
    assert record.terminal_count == 1
    assert len(bad.bodies) == (0 if failure == "refused" else 1) and len(good.bodies) == 1
    coord.assert_no_violations()


async def test_every_route_failing_ends_with_the_last_failures_code(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as one, fake_vllm("m") as two:
        one.status, two.status = 500, 404
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(one.url, two.url))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST)
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobError)
    assert record.terminal.error_code == "model_not_loaded"  # 404 was the last failure
    assert record.terminal.tokens_emitted == 0 and record.terminal_count == 1
    coord.assert_no_violations()


async def test_bad_request_does_not_fall_back(coord: DevCoordinator, tmp_path: Path) -> None:
    async with fake_vllm("m") as one, fake_vllm("m") as two:
        one.status = 400
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(one.url, two.url))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST)
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobError) and record.terminal.error_code == "bad_request"
    assert not two.bodies  # the client's mistake is not retried elsewhere
    coord.assert_no_violations()


async def test_least_loaded_route_among_equal_priority(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as one, fake_vllm("m") as two:
        one.gate = anyio.Event()
        two.gate = anyio.Event()
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(one.url, two.url))
        async with running_agent(cfg):
            pid = await serving(coord)
            first = await coord.send_job(pid, "m", REQUEST)
            await one.started.wait()  # the first job holds backend one
            second = await coord.send_job(pid, "m", REQUEST)
            await two.started.wait()  # so the second goes to the idle backend two
            one.gate.set()
            two.gate.set()
            await finished(coord, first.job_id)
            await finished(coord, second.job_id)
    assert len(one.bodies) == 1 and len(two.bodies) == 1
    coord.assert_no_violations()


async def test_out_of_capacity_at_once_never_queued(coord: DevCoordinator, tmp_path: Path) -> None:
    async with fake_vllm("m") as backend:
        backend.gate = anyio.Event()
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(backend.url,),
            extra="[limits]\nmax_concurrent = 1\n",
        )
        async with running_agent(cfg):
            pid = await serving(coord)
            first = await coord.send_job(pid, "m", REQUEST)
            await backend.started.wait()
            second = await coord.send_job(pid, "m", REQUEST)
            refused = await finished(coord, second.job_id)
            assert isinstance(refused.terminal, JobError)
            assert refused.terminal.error_code == "out_of_capacity"
            assert coord.jobs[first.job_id].terminal is None  # the first still runs
            backend.gate.set()
            done = await finished(coord, first.job_id)
    assert isinstance(done.terminal, JobDone) and len(backend.bodies) == 1
    coord.assert_no_violations()


@pytest.mark.parametrize(
    ("model", "fmt", "code"),
    [("nope", "openai", "model_not_loaded"), ("m", "anthropic", "unsupported_format")],
)
async def test_refusals_for_unknown_models_and_formats(
    coord: DevCoordinator, tmp_path: Path, model: str, fmt: str, code: str
) -> None:
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, model, REQUEST, fmt=fmt)  # type: ignore[arg-type]
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobError) and record.terminal.error_code == code
    assert not backend.bodies


async def test_rate_limited_once_the_token_window_is_spent(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m", tokens=10) as backend:
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            backend_urls=(backend.url,),
            extra="[limits]\nmax_tokens_per_minute = 5\n",
        )
        async with running_agent(cfg):
            pid = await serving(coord)
            first = await finished(coord, (await coord.send_job(pid, "m", REQUEST)).job_id)
            second = await finished(coord, (await coord.send_job(pid, "m", REQUEST)).job_id)
    assert isinstance(first.terminal, JobDone)  # the window was open when it arrived
    assert isinstance(second.terminal, JobError)
    assert second.terminal.error_code == "rate_limited"
    coord.assert_no_violations()


async def test_cancel_aborts_upstream_and_answers_cancelled_once(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as backend:
        backend.gate = anyio.Event()
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST)
            await backend.started.wait()
            await coord.wait_for(lambda c: c.jobs[job.job_id].bytes_relayed > 0)
            await coord.cancel_job(job.job_id)
            await coord.cancel_job(job.job_id)  # idempotent
            record = await finished(coord, job.job_id)
            with anyio.fail_after(5):
                await backend.disconnected.wait()  # the backend saw the connection close
    assert isinstance(record.terminal, JobError) and record.terminal.error_code == "cancelled"
    assert record.terminal.tokens_emitted == record.bytes_relayed > 0
    assert record.terminal_count == 1
    coord.assert_no_violations()


async def test_deadline_aborts_upstream_with_backend_timeout(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as backend:
        backend.gate = anyio.Event()  # never opened: the stream outlives its deadline
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST, deadline_ms=300)
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobError)
    assert record.terminal.error_code == "backend_timeout"
    assert record.terminal.tokens_emitted == record.bytes_relayed > 0
    coord.assert_no_violations()


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b'data: {"error":{"message":"CUDA error: out of memory"}}\n\n', "CUDA error"),
        (b"", "ended before data: [DONE]"),
    ],
)
async def test_error_event_or_eof_without_done_after_bytes_is_backend_error(
    coord: DevCoordinator, tmp_path: Path, tail: bytes, expected: str
) -> None:
    from aiohttp import web

    body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n' + tail

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST)
            record = await finished(coord, job.job_id)
    finally:
        await runner.cleanup()
    assert isinstance(record.terminal, JobError)
    assert record.terminal.error_code == "backend_error"
    assert expected in record.terminal.message
    assert bytes(record.data or b"") == body and record.terminal.tokens_emitted == len(body)
    coord.assert_no_violations()


async def test_a_repeated_job_id_gets_the_same_frame_and_never_runs_twice(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST, job_id="job-repeat-1")
            first = await finished(coord, job.job_id)
            assert first.terminal is not None
            stored = first.terminal.model_dump()
            await coord.send_job(pid, "m", REQUEST, job_id="job-repeat-1")
            await coord.wait_for(lambda c: c.jobs["job-repeat-1"].terminal_count >= 2)
    assert len(backend.bodies) == 1  # executed once
    record = coord.jobs["job-repeat-1"]
    assert record.terminal is not None and record.terminal.model_dump() == stored
    coord.assert_no_violations()  # a repeat that differed would be a violation


async def test_a_malformed_job_gets_bad_request_once(coord: DevCoordinator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, coord.ws_url)
    async with running_agent(cfg):
        pid = (await agent_where(coord, lambda a: a.connected)).provider_id
        bad = orjson.dumps({"type": "job", "job_id": "bad-1", "model_id": "m", "request": 7})
        await coord.send(pid, bad.decode())
        await coord.wait_for(lambda c: "bad-1" in c.jobs and c.jobs["bad-1"].terminal is not None)
        await coord.send(pid, bad.decode())
        await coord.wait_for(lambda c: c.jobs["bad-1"].terminal_count >= 2)
    terminal = coord.jobs["bad-1"].terminal
    assert isinstance(terminal, JobError) and terminal.error_code == "bad_request"


async def test_a_repeat_that_arrives_while_its_refusal_is_stored_is_not_run(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """A refused `job` and a runnable one with the same id, handed over back to back (as the
    reader does with frames it reads in one go, before the refusal is stored): the refusal is the
    id's one terminal frame, and the repeat is ignored, never run (bench/fuzz.py found it)."""
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg) as daemon:
            await serving(coord)
            daemon.agent.jobs.reject(
                "twin-1", "invalid job: request: Input should be a valid dictionary"
            )
            daemon.agent.jobs.submit(Job(job_id="twin-1", model_id="m", request=REQUEST))
            daemon.agent.jobs.submit(Job(job_id="twin-2", model_id="unknown", request=REQUEST))
            daemon.agent.jobs.submit(Job(job_id="twin-2", model_id="m", request=REQUEST))
            await coord.wait_for(
                lambda c: all(c.jobs.get(j) and c.jobs[j].terminal for j in ("twin-1", "twin-2"))
            )
    assert not backend.bodies  # neither repeat reached the backend
    first, second = coord.jobs["twin-1"], coord.jobs["twin-2"]
    assert isinstance(first.terminal, JobError) and first.terminal.error_code == "bad_request"
    assert isinstance(second.terminal, JobError)
    assert second.terminal.error_code == "model_not_loaded"
    assert first.chunk_frames == second.chunk_frames == 0
    coord.assert_no_violations()


async def test_a_request_the_agent_cannot_encode_again_is_bad_request_without_a_traceback(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON nested deeper than the encoder goes (orjson reads 1024 levels, writes 254) is the
    client's mistake: `bad_request`, nothing sent upstream, no internal error (bench/fuzz.py)."""
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            for depth in (300, 1000):
                job = {"type": "job", "job_id": f"deep-{depth}", "model_id": "m", "request": "@"}
                nested = '{"messages":' + "[" * depth + "1" + "]" * depth + "}"
                await coord.send(pid, orjson.dumps(job).decode().replace('"@"', nested))
            await coord.wait_for(
                lambda c: all(
                    c.jobs.get(j) and c.jobs[j].terminal for j in ("deep-300", "deep-1000")
                )
            )
    for job_id in ("deep-300", "deep-1000"):
        terminal = coord.jobs[job_id].terminal
        assert isinstance(terminal, JobError) and terminal.error_code == "bad_request"
        assert "cannot be encoded as JSON" in terminal.message
    assert not backend.bodies
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's mistake"


async def test_coordinator_killed_right_after_a_job_resends_its_frame_after_reconnect(
    tmp_path: Path,
) -> None:
    async with fake_vllm("m") as backend, DevCoordinator(host="127.0.0.1", port=0) as coord:
        port = coord.port
        coord.ack_enabled = False
        coord.pong_enabled = False  # nothing confirms: the frame stays in the outbox
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            job = await coord.send_job(pid, "m", REQUEST, job_id="job-survives")
            first = await finished(coord, job.job_id)
            assert isinstance(first.terminal, JobDone)
            await coord.aclose()  # the coordinator dies with the frame unconfirmed
            async with DevCoordinator(host="127.0.0.1", port=port) as again:
                resent = await again.wait_for(
                    lambda c: (
                        c.jobs.get("job-survives")
                        if c.jobs.get("job-survives") and c.jobs["job-survives"].terminal
                        else None
                    ),
                    timeout=15,
                )
                assert resent.terminal is not None
                assert resent.terminal.model_dump() == first.terminal.model_dump()
                assert resent.terminal_count == 1
    assert len(backend.bodies) == 1


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_each_format_is_relayed_verbatim_from_the_simulator(
    coord: DevCoordinator, tmp_path: Path, fmt: str
) -> None:
    from provider_agent.dev.sim.core import SimBackend

    async with SimBackend("vllm", ["m"], tokens=12, tokens_per_s=0, anthropic=True) as sim:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(sim.base_url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
            job = await coord.send_job(pid, "m", request, fmt=fmt)  # type: ignore[arg-type]
            record = await finished(coord, job.job_id)
    assert isinstance(record.terminal, JobDone), record.terminal
    assert record.terminal.tokens.output == 12 and record.terminal.usage_source is None
    data = bytes(record.data or b"")
    marker = b"data: [DONE]" if fmt == "openai" else b"message_stop"
    assert marker in data and data.count(b"\n\n") > 12
    [seen] = [r for r in sim.requests if r.path.endswith(("/chat/completions", "/messages"))]
    assert seen.path.endswith("/messages" if fmt == "anthropic" else "/chat/completions")
    coord.assert_no_violations()


async def test_a_job_whose_frames_stall_past_the_send_deadline_ends_connection_lost(
    tmp_path: Path,
) -> None:
    """A coordinator that stops reading: the socket's buffers fill, the job's lane passes the
    backpressure mark, and after `send_stall_s` (5 s in production, 0.3 s here) the job ends
    `connection_lost` (kept in the outbox)."""
    from aiohttp import web
    from websockets.asyncio.server import ServerConnection, serve

    from provider_agent.link.protocol import AuthOk, Job, encode

    stop_reading = anyio.Event()
    release = anyio.Event()

    async def stalling_coordinator(ws: ServerConnection) -> None:
        await ws.send('{"type":"auth_challenge","nonce":"bm9uY2U="}')
        await ws.recv()  # auth_response
        await ws.send(encode(AuthOk(provider_id="prov_stall")))
        await ws.recv()  # the first frame after auth: then never read again
        await ws.send(encode(Job(job_id="stalled", model_id="m", request={"messages": []})))
        stop_reading.set()
        await release.wait()

    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 8000 + b'"}}]}\n\n'

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "object": "model"}]})

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(8000):  # ~64 MiB, far beyond every buffer on the way
            await response.write(chunk)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", flood)
    runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    backend_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        # The scripted coordinator never reads the agent's close frame (it sits behind the
        # unread chunks): its own closing handshake would wait websockets' default 10 s.
        async with serve(
            stalling_coordinator, "127.0.0.1", 0, compression=None, close_timeout=0.1
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            cfg = write_config(
                tmp_path, f"ws://127.0.0.1:{port}", backend_urls=(backend_url,), drain_timeout_s=0
            )
            # The socket is stuck: the stall deadline is the point; the graceful close cannot
            # finish anyway, so do not wait long for it either.
            async with running_agent(
                cfg, timings=Timings(send_stall_s=0.3, close_session_s=0.3)
            ) as daemon:
                with anyio.fail_after(10):
                    await stop_reading.wait()
                    jobs = daemon.agent.jobs
                    while not jobs.outbox.in_store("stalled") or jobs.running:  # noqa: ASYNC110 (no event for a job's end)
                        await anyio.sleep(0.02)
                frame = await daemon.agent.jobs.outbox.stored_frame("stalled")
            release.set()
    finally:
        release.set()
        await runner.cleanup()
    assert frame is not None
    stored = orjson.loads(frame)
    assert stored["error_code"] == "connection_lost" and stored["tokens_emitted"] > 1024 * 1024
    assert "could not be sent" in stored["message"]  # the stall ended it, not a lost socket


async def test_ledger_totals_equal_the_job_dones_the_coordinator_received(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """One ledger row per terminal frame: the ledger's job_done tokens and amount equal what the
    coordinator was told, and a refused or failed job earns nothing."""
    from provider_agent.store.ledger import LedgerReader, Period

    async with fake_vllm("m", tokens=5) as one, fake_vllm("m", tokens=5) as two:
        two.status = 500  # the fallback route fails now and then
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(one.url, two.url))
        async with running_agent(cfg):
            pid = await serving(coord)
            sent = []
            for i in range(6):
                model = "m" if i % 3 else "unknown-model"  # two refusals among them
                job = await coord.send_job(pid, model, REQUEST)
                sent.append(await finished(coord, job.job_id))
    done = [r.terminal for r in sent if isinstance(r.terminal, JobDone)]
    assert len(done) == 4
    with LedgerReader(tmp_path / "state" / "outbox.sqlite3") as ledger:
        rows = list(ledger.rows(Period(None, None)))
        totals = {t.key: t for t in ledger.totals("model", Period(None, None))}
    assert len(rows) == len(sent)  # one row per terminal frame, none lost, none doubled
    assert {str(row[1]) for row in rows} == {r.job_id for r in sent}
    by_job = {str(row[1]): row for row in rows}
    for record in sent:
        row = by_job[record.job_id]
        outcome, tokens_in, tokens_out, amount = row[4], row[5], row[6], row[10]
        if isinstance(record.terminal, JobDone):
            assert outcome == "job_done"
            assert (tokens_in, tokens_out) == (
                record.terminal.tokens.input,
                record.terminal.tokens.output,
            )
            assert amount == -(-(7 * 300_000 + 5 * 600_000) // 1_000_000)  # ceil, list price
        else:
            assert isinstance(record.terminal, JobError) and outcome == record.terminal.error_code
            assert amount == 0
    done_in = sum(t.tokens.input for t in done)
    done_out = sum(t.tokens.output for t in done)
    total = totals["m"]
    assert (total.jobs, total.tokens_in, total.tokens_out) == (4, done_in, done_out)
    assert totals["unknown-model"].jobs == totals["unknown-model"].failed == 2


FIRST_PIECE = sse_chunk({"choices": [{"index": 0, "delta": {"content": "hi"}}]})


class OneBackend:
    """A registry of one backend whose stream yields `pieces()` (a stand-in: the tests below
    look at what the executor does between two pieces, which a real socket cannot pin down)."""

    def __init__(self, pieces: Callable[[], AsyncIterator[bytes]]) -> None:
        self.pieces = pieces
        self.opened = 0

    def get(self, _: str) -> OneBackend:
        return self

    @asynccontextmanager
    async def stream(self, *_: object, **__: object) -> AsyncIterator[AsyncIterator[bytes]]:
        self.opened += 1
        yield self.pieces()


def executor_of(store: MemoryStore, outbound: Outbound, backend: OneBackend) -> Executor:
    route = Route("b", "vllm", "m", Price(1, 1), frozenset({"openai"}), None, None, 0, 0)
    hooks = ExecutorHooks(
        routes=lambda: {"m": (route,)},
        registry=lambda: cast(Registry, backend),
        max_concurrent=lambda: 4,
        status=lambda: "ready",
        backend_failed=lambda _: None,
    )
    return Executor(outbound, JobStats(), store, hooks, TokenWindow(None))


class AcceptOnCue(MemoryStore):
    """A job store whose accept record is stored only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.cue = anyio.Event()
        self.stored = False

    async def accept(self, job_id: str, model_id: str) -> None:
        await self.cue.wait()
        await super().accept(job_id, model_id)
        self.stored = True


async def test_no_byte_of_a_job_is_handed_on_before_its_accept_record_is_stored() -> None:
    """Write-ahead: the coordinator may see a chunk only of a job that a crash would report as
    `connection_lost` after the restart (CI once SIGKILLed the agent in that window)."""
    store, outbound = AcceptOnCue(), Outbound()
    #: When the relay asks for the second piece: (accept stored?, the first piece handed on?).
    asked_again: list[tuple[bool, int]] = []

    async def pieces() -> AsyncIterator[bytes]:
        yield FIRST_PIECE
        asked_again.append((store.stored, outbound.pending("j1")))
        yield b"data: [DONE]\n\n"

    executor = executor_of(store, outbound, OneBackend(pieces))
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
        await anyio.wait_all_tasks_blocked()  # the relay has gone as far as it can
        assert outbound.pending("j1") == 0 and not asked_again
        store.cue.set()
        frame = await store.ended("j1")
        group.cancel_scope.cancel()
    assert asked_again == [(True, len(FIRST_PIECE))]
    assert isinstance(decode(frame), JobDone)


async def test_bytes_read_after_a_job_was_stopped_are_not_sent() -> None:
    """A cancel (or a lost connection) lands at the relay's next await; what the reader hands
    over before that belongs to a job that is ending, and never leaves as a chunk."""
    store, outbound = MemoryStore(), Outbound()

    async def pieces() -> AsyncIterator[bytes]:
        yield FIRST_PIECE
        executor.cancel("j1")
        yield b"data: [DONE]\n\n"  # no await in between: the cancel has not landed yet

    executor = executor_of(store, outbound, OneBackend(pieces))
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
        frame = decode(await store.ended("j1"))
        group.cancel_scope.cancel()
    assert isinstance(frame, JobError) and frame.error_code == "cancelled"
    assert outbound.pending("j1") == len(FIRST_PIECE)  # the second piece never joined it


class UnwritableStore(MemoryStore):
    """The state directory is full (while `full`): nothing can be recorded as accepted."""

    full = True

    async def accept(self, job_id: str, model_id: str) -> None:
        if self.full:
            raise OutboxError("outbox /state/inflight.jsonl: cannot write: No space left on device")
        await super().accept(job_id, model_id)


async def test_a_job_that_cannot_be_recorded_is_never_started_and_the_store_counts_as_failing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A journal that cannot be written (a full disk) is the store failing (protocol.md §8):
    that job is answered `out_of_capacity` without starting, new jobs are refused until a retry
    interval has passed, and then the next job is tried again."""
    store, outbound = UnwritableStore(), Outbound()

    backend = OneBackend(one_stream)
    executor = executor_of(store, outbound, backend)
    executor.store_retry_s = 0.05
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
        frame = decode(await store.ended("j1"))
        assert executor.store_problem is not None
        executor.submit(Job(job_id="j2", model_id="m", request=REQUEST))  # refused at once
        refused = decode(await store.ended("j2"))
        with anyio.fail_after(10):
            while executor.store_problem is not None:  # noqa: ASYNC110 (the executor's timer)
                await anyio.sleep(0.01)
        store.full = False
        executor.submit(Job(job_id="j3", model_id="m", request=REQUEST))  # space is back
        served: object = decode(await store.ended("j3"))
        group.cancel_scope.cancel()
    for answer in (frame, refused):
        assert isinstance(answer, JobError) and answer.error_code == "out_of_capacity"
        assert "No space left" in answer.message
    assert isinstance(served, JobDone)
    assert backend.opened == 1  # only j3 started upstream: nothing relayed that is not recorded
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)  # one line, no traceback


class FullFor(MemoryStore):
    """A store whose disk is full while `full` is set: no frame can be written."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True
        self.tries = 0
        self._tried = anyio.Event()

    async def tried(self, count: int) -> None:
        """Returns once `finish` was called `count` times in all."""
        while self.tries < count:
            await self._tried.wait()

    async def finish(self, job_id: str, frame: str, ledger: object) -> str:
        self.tries += 1
        self._tried.set()
        self._tried = anyio.Event()
        if self.full:
            raise OutboxError("outbox /state/outbox.sqlite3: the disk is full")
        return await super().finish(job_id, frame, None)


async def test_a_terminal_frame_that_cannot_be_stored_is_kept_retried_and_sent_once_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """protocol.md §8: a frame the store refuses is kept in memory and stored again until it is,
    sent only once stored; meanwhile new jobs are refused `out_of_capacity` naming the store,
    one error line says so (not one per try), and nothing ever reaches the task group."""
    store, outbound = FullFor(), Outbound()

    async def pieces() -> AsyncIterator[bytes]:
        yield FIRST_PIECE
        yield b"data: [DONE]\n\n"

    executor = executor_of(store, outbound, OneBackend(pieces))
    executor.store_retry_s = 0.01
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
        await executor.wait_idle()
        assert executor.store_problem is not None and "disk is full" in executor.store_problem
        executor.submit(Job(job_id="j2", model_id="m", request=REQUEST))  # refused meanwhile
        executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))  # a repeat: not run
        await store.tried(6)  # tried again and again, never sent
        assert outbound.take().terminal_ids == [] and executor.unstored == 2
        store.full = False  # space freed
        done, refused = decode(await store.ended("j1")), decode(await store.ended("j2"))
        await anyio.wait_all_tasks_blocked()
        assert outbound.take().terminal_ids == ["j1", "j2"]  # in the order they ended
        assert executor.store_problem is None
        executor.submit(Job(job_id="j3", model_id="m", request=REQUEST))  # served again
        assert isinstance(decode(await store.ended("j3")), JobDone)
        group.cancel_scope.cancel()
    assert isinstance(done, JobDone)
    assert isinstance(refused, JobError) and refused.error_code == "out_of_capacity"
    assert "disk is full" in refused.message and "/state/" in refused.message
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "disk is full" in errors[0]
    assert not any(r.exc_info for r in caplog.records)


# --- issue 19: what a hostile backend or coordinator cannot do any more -----------------------


async def test_a_backends_absurd_usage_is_billed_on_the_estimate_and_costs_nobody_anything(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """protocol.md §8: `completion_tokens` ≥ 2^63 once took the agent down with every job in
    flight; now that job is estimated with one warning naming the backend, and the others run."""
    from provider_agent.store.ledger import LedgerReader, Period

    async with fake_vllm("m", tokens=4) as backend:
        backend.usage = {"prompt_tokens": 7, "completion_tokens": 2**63, "total_tokens": 2**64 - 1}
        backend.gate = anyio.Event()
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            jobs = []
            for _ in range(3):  # three streams held open at once
                backend.started = anyio.Event()
                jobs.append(await coord.send_job(pid, "m", REQUEST))
                await backend.started.wait()
            backend.gate.set()  # all three end together, each with the absurd figure
            records = [await finished(coord, job.job_id) for job in jobs]
            backend.usage = None
            after = await finished(coord, (await coord.send_job(pid, "m", REQUEST)).job_id)
    for record in records:
        assert isinstance(record.terminal, JobDone) and record.terminal.usage_source == "estimated"
        assert record.terminal.tokens.output == 4 and record.terminal.tokens.output < 10**12
    assert isinstance(after.terminal, JobDone) and after.terminal.usage_source is None
    warnings = [r.getMessage() for r in caplog.records if "not believed" in r.getMessage()]
    assert len(warnings) == 3 and all(f"backend=vllm:{backend.url}" in w for w in warnings)
    assert not any(r.exc_info for r in caplog.records)
    with LedgerReader(tmp_path / "state" / "outbox.sqlite3") as ledger:
        [total] = ledger.totals("model", Period())
    assert total.jobs == 4 and total.tokens_out == 4 * 4
    coord.assert_no_violations()


async def test_whatever_happens_while_a_job_ends_stays_with_that_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing built while ending one job may reach the jobs task group (it ended the agent):
    a figure no ledger row holds (a price of 2^63-1 × 10^7 tokens) ends that job `internal`."""
    store, outbound = MemoryStore(), Outbound()
    usage: dict[str, object] = {
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 10**7},
    }

    async def pieces() -> AsyncIterator[bytes]:
        yield FIRST_PIECE + sse_chunk(usage) + b"data: [DONE]\n\n"

    executor = executor_of(store, outbound, OneBackend(pieces))
    priced = Route("b", "vllm", "m", Price(1, 2**63 - 1), frozenset({"openai"}), None, None, 0, 0)
    executor.hooks.routes = lambda: {"m": (priced,)}
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
        ended = decode(await store.ended("j1"))
        executor.hooks.routes = lambda: {"m": (dataclasses.replace(priced, price=Price(1, 1)),)}
        executor.submit(Job(job_id="j2", model_id="m", request=REQUEST))  # the agent goes on
        served = decode(await store.ended("j2"))
        group.cancel_scope.cancel()
    assert isinstance(ended, JobError) and ended.error_code == "internal"
    assert ended.tokens_emitted > 0
    assert isinstance(served, JobDone) and served.tokens.output == 10**7
    assert [r.levelname for r in caplog.records if r.exc_info] == ["ERROR"]


async def test_a_repeat_whose_frame_expired_before_the_prune_is_run_as_a_new_job(
    tmp_path: Path,
) -> None:
    """protocol.md §8: a repeat is never unanswered. 24 h after its delivery the job_id is new,
    even while the hourly prune has not yet forgotten it."""
    from provider_agent.store.outbox import Outbox

    now = [1_750_000_000.0]
    backend = OneBackend(one_stream)
    async with await Outbox.open(tmp_path, clock=lambda: now[0]) as outbox:
        outbound = Outbound()
        executor = executor_of(MemoryStore(), outbound, backend)
        executor.outbox = outbox
        async with anyio.create_task_group() as group:
            await group.start(executor.run)
            executor.submit(Job(job_id="j", model_id="m", request=REQUEST))
            await executor.wait_idle()
            await outbox.delivered(["j"])
            executor.submit(Job(job_id="j", model_id="m", request=REQUEST))  # within 24 h
            await anyio.wait_all_tasks_blocked()
            assert backend.opened == 1  # answered with the stored frame, not run again
            now[0] += 24 * 3600 + 1
            assert outbox.in_store("j")  # no prune has run
            executor.submit(Job(job_id="j", model_id="m", request=REQUEST))
            await anyio.wait_all_tasks_blocked()
            await executor.wait_idle()
            group.cancel_scope.cancel()
        assert backend.opened == 2
        assert outbound.take().terminal_ids == ["j", "j", "j"]
        assert len(await outbox.undelivered()) == 1  # the new run's frame, to be delivered


async def one_stream() -> AsyncIterator[bytes]:
    yield FIRST_PIECE
    yield b"data: [DONE]\n\n"


async def test_a_jobs_first_bytes_are_recorded_as_they_are_relayed(tmp_path: Path) -> None:
    """protocol.md §8: `tokens_emitted` after a crash is at least the bytes recorded, and the
    first relayed bytes are recorded at once (it was 0 when the agent died in the first second)."""
    from provider_agent.store.journal import FILE_NAME as JOURNAL
    from provider_agent.store.journal import replay
    from provider_agent.store.outbox import Outbox

    recorded: list[int] = []

    async def pieces() -> AsyncIterator[bytes]:
        yield FIRST_PIECE
        jobs, _ = replay((tmp_path / JOURNAL).read_bytes())  # what a killed agent leaves
        recorded.append(jobs["j1"].bytes_relayed)
        yield b"data: [DONE]\n\n"

    async with await Outbox.open(tmp_path) as outbox:
        executor = executor_of(MemoryStore(), Outbound(), OneBackend(pieces))
        executor.outbox = outbox
        async with anyio.create_task_group() as group:
            await group.start(executor.run)
            executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
            await anyio.wait_all_tasks_blocked()
            await executor.wait_idle()
            group.cancel_scope.cancel()
    assert recorded == [len(FIRST_PIECE)]


async def test_one_models_404_does_not_sideline_the_other_models_of_its_backend(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """protocol.md §8: the 10 s skip is per route. A 404 for m1 on backend one (the model was
    unloaded) once sent every model of that backend elsewhere for 10 s."""
    async with fake_vllm("m1", "m2") as one, fake_vllm("m2") as two:
        one.statuses = {"m1": 404}
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(one.url, two.url))
        async with running_agent(cfg):
            pid = await serving(coord, "m2")
            failed = await finished(coord, (await coord.send_job(pid, "m1", REQUEST)).job_id)
            served = await finished(coord, (await coord.send_job(pid, "m2", REQUEST)).job_id)
    assert isinstance(failed.terminal, JobError)
    assert failed.terminal.error_code == "model_not_loaded"
    assert isinstance(served.terminal, JobDone)
    assert [b["model"] for b in one.bodies] == ["m1", "m2"] and two.bodies == []
    coord.assert_no_violations()


async def test_integers_beyond_64_bits_reach_the_backend_exactly(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """protocol.md §8: the same JSON values (they reached the backend as floats)."""
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            request = '{"messages":[],"seed":18446744073709551616,"x":[-99999999999999999999999]}'
            await coord.send(
                pid, '{"type":"job","job_id":"big","model_id":"m","request":' + request + "}"
            )
            record = await finished(coord, "big")
    assert isinstance(record.terminal, JobDone)
    assert backend.bodies[0]["seed"] == 2**64 and backend.bodies[0]["x"] == [-(10**23) + 1]


async def test_frames_that_cannot_be_answered_are_dropped_with_one_line_per_10_s(
    coord: DevCoordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """protocol.md §8: a `job` without an answerable job_id (control characters, over 128) is
    logged at most once per 10 s for all such frames; a bad format is `unsupported_format`; a
    model_id breaking the model-id rule is `bad_request` and is never stored whole (50 frames
    of 1 MiB model ids once wrote 694 MiB into the ledger)."""
    async with fake_vllm("m") as backend:
        cfg = write_config(tmp_path, coord.ws_url, backend_urls=(backend.url,))
        async with running_agent(cfg):
            pid = await serving(coord)
            for i in range(30):
                job_id = "x" * 129 if i % 2 else f"j{i}\u001b[2J"
                await coord.send(
                    pid,
                    orjson.dumps(
                        {"type": "job", "job_id": job_id, "model_id": "m", "request": {}}
                    ).decode(),
                )
            huge = "m" * (1024 * 1024)
            for i in range(20):
                await coord.send(
                    pid,
                    orjson.dumps(
                        {"type": "job", "job_id": f"long{i}", "model_id": huge, "request": {}}
                    ).decode(),
                )
            await coord.send(
                pid, '{"type":"job","job_id":"fmt","model_id":"m","request":{},"format":"xml"}'
            )
            fmt = await finished(coord, "fmt")
            longs = [await finished(coord, f"long{i}") for i in range(20)]
            served = await finished(coord, (await coord.send_job(pid, "m", REQUEST)).job_id)
    assert isinstance(fmt.terminal, JobError) and fmt.terminal.error_code == "unsupported_format"
    for record in longs:
        assert isinstance(record.terminal, JobError) and record.terminal.error_code == "bad_request"
    assert isinstance(served.terminal, JobDone)  # the session lived through all of it
    dropped = [r for r in caplog.records if "malformed frame dropped" in r.getMessage()]
    assert len(dropped) == 1
    assert (tmp_path / "state" / "outbox.sqlite3").stat().st_size < 1024 * 1024
    assert not any(
        len(r.getMessage()) > 2000 for r in caplog.records
    )  # no log line carries a model id whole


async def test_refusals_waiting_for_a_failing_store_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood of jobs while the disk is full cannot grow memory without end: past
    MAX_UNSTORED waiting frames a refusal (which bills nothing) is dropped, not kept."""
    from provider_agent.jobs import executor as jobs

    monkeypatch.setattr(jobs, "MAX_UNSTORED", 3)
    store, outbound = FullFor(), Outbound()
    executor = executor_of(store, outbound, OneBackend(one_stream))
    executor.store_retry_s = 3600
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        for i in range(10):
            executor.submit(Job(job_id=f"r{i}", model_id="unknown", request=REQUEST))
        await anyio.wait_all_tasks_blocked()
        assert executor.unstored == 3 and executor.store_problem is not None
        group.cancel_scope.cancel()
