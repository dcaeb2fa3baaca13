"""protocol.md §8's rules on a backend's answer, end to end: the reference coordinator → the
agent → a raw loopback backend that answers its completions however a test scripts it (the
shapes an aiohttp server cannot make: a head with nothing after it, a body that never ends).

The reader-level contract is held in tests/test_stream.py; here, what the coordinator sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import orjson
import pytest

from provider_agent.dev.coordinator import DevCoordinator, JobRecord
from provider_agent.link.protocol import JobDone, JobError
from tests.agent_harness import agent_where, fake_vllm, running_agent, write_config

REQUEST = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
MODELS = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
EVENTS = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)

#: What the backend does once it read a completion request.
Completion = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawBackend:
    """A vLLM look-alike on a raw socket: `/health` and `/v1/models` answered (and closed),
    completions handed to `completion`; `completions` counts them."""

    completion: Completion
    url: str = ""
    completions: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            path = request_line.split(" ")[1]
            if path.startswith("/v1/chat/completions"):
                self.completions += 1
                await self.completion(writer)
                while await reader.read(65536):  # held until the client goes
                    pass
                return
            body = MODELS if path.startswith("/v1/models") else b""
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s"
                % (
                    b"200 OK" if path in ("/health", "/v1/models") else b"404 Not Found",
                    len(body),
                    body,
                )
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_backend(completion: Completion) -> AsyncIterator[RawBackend]:
    backend = RawBackend(completion)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    backend.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield backend
    finally:
        for writer in backend.writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def sse_head(writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    await writer.drain()


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as coordinator:
        yield coordinator


async def run_one_job(
    coord: DevCoordinator, tmp_path: Path, urls: tuple[str, ...], deadline_ms: int = 60_000
) -> JobRecord:
    cfg = write_config(tmp_path, coord.ws_url, backend_urls=urls)
    async with running_agent(cfg):
        agent = await agent_where(
            coord,
            lambda a: (
                a.capabilities is not None and any(o.model_id == "m" for o in a.capabilities.models)
            ),
        )
        job = await coord.send_job(agent.provider_id, "m", REQUEST, deadline_ms=deadline_ms)
        return await coord.wait_for(
            lambda c: (
                done if (done := c.jobs.get(job.job_id)) and done.terminal is not None else None
            ),
            15,
        )


async def test_a_backend_that_accepted_the_job_is_never_left_for_another_route(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """The first route answers a 2xx head and then closes before any body byte: it accepted
    the job (it may be generating; on BYOK, billing), so the job ends `backend_error` there —
    the second route never runs it a second time."""

    async def head_then_close(writer: asyncio.StreamWriter) -> None:
        await sse_head(writer)
        writer.close()

    async with raw_backend(head_then_close) as accepting, fake_vllm("m") as other:
        record = await run_one_job(coord, tmp_path, (accepting.url, other.url))
    assert isinstance(record.terminal, JobError), record.terminal
    assert record.terminal.error_code == "backend_error"
    assert "broke off after 0 bytes" in record.terminal.message
    assert record.terminal_count == 1 and record.terminal.tokens_emitted == 0
    assert accepting.completions == 1 and other.bodies == []
    coord.assert_no_violations()


async def test_a_job_ends_at_done_while_the_backend_keeps_the_connection_open(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    """`data: [DONE]`, then the backend neither ends the chunked body nor closes: the job is
    done at the marker, not `backend_timeout` at its deadline."""

    async def done_then_hold(writer: asyncio.StreamWriter) -> None:
        await sse_head(writer)
        writer.write(b"%x\r\n%s\r\n" % (len(EVENTS), EVENTS))
        await writer.drain()

    async with raw_backend(done_then_hold) as backend:
        with anyio.fail_after(30):
            record = await run_one_job(coord, tmp_path, (backend.url,), deadline_ms=3000)
    assert isinstance(record.terminal, JobDone), record.terminal
    assert bytes(record.data or b"") == EVENTS
    assert record.terminal.tokens.input == 7 and record.terminal.tokens.output == 1
    assert backend.completions == 1
    coord.assert_no_violations()


async def test_a_route_probe_ends_at_done_while_the_backend_keeps_the_connection_open(
    tmp_path: Path,
) -> None:
    """The one-token completion that brings a withdrawn route back (and `doctor`'s) ends at the
    marker too: such a backend was `backend_timeout` on every probe, so never restored."""
    from provider_agent.backends import Registry
    from provider_agent.backends.base import new_http_session
    from provider_agent.config.load import load
    from provider_agent.discovery.catalog import Price, Route
    from provider_agent.jobs.one_completion import tiny_completion

    async def done_then_hold(writer: asyncio.StreamWriter) -> None:
        await sse_head(writer)
        writer.write(b"%x\r\n%s\r\n" % (len(EVENTS), EVENTS))
        await writer.drain()

    async with raw_backend(done_then_hold) as backend:
        cfg = write_config(tmp_path, "ws://127.0.0.1:9/c", backend_urls=(backend.url,))
        config = load(cfg, allow_insecure=True)
        label = config.backends[0].label
        route = Route(label, "vllm", "m", Price(1, 1), frozenset({"openai"}), None, None, 0, 0)
        async with new_http_session(4) as http:
            adapter = Registry.build(config, http).get(label)
            with anyio.fail_after(10):
                result = await tiny_completion(adapter.stream, route, timeout_s=5)
    assert result.ok, result
