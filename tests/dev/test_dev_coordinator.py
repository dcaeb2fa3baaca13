"""The reference coordinator against a hand-written fake agent (websockets client) on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import ClientSession
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from provider_agent.dev.coordinator import (
    DevCoordinator,
    contract_problems,
    http_status_for,
    provider_id_for,
)
from provider_agent.link.protocol import (
    AuthResponse,
    Capabilities,
    CapabilityLimits,
    CapabilityMetadata,
    Frame,
    Heartbeat,
    JobChunk,
    JobDone,
    JobError,
    ModelOffer,
    TokenCounts,
    encode,
)
from tests.agent_harness import ProcessLines, agent_where, running_agent, write_config

SSE = [b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', b"data: [DONE]\n\n"]


def raw_pubkey(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def capabilities(*models: tuple[str, list[str]], status: str = "ready") -> Capabilities:
    offers = [
        ModelOffer(
            model_id=model_id,
            input_per_1m=300_000,
            output_per_1m=600_000,
            max_concurrent=4,
            backend="ollama",
            formats=formats,
        )
        for model_id, formats in sorted(models)
    ]
    return Capabilities(
        models=offers,
        limits=CapabilityLimits(max_concurrent_total=4, max_tokens_per_minute=None),
        metadata=CapabilityMetadata(agent_version="0.1.0", status=status),
    )


def heartbeat(queue_depth: int = 0) -> Heartbeat:
    return Heartbeat(
        queue_depth=queue_depth,
        tokens_per_sec_p50=41.5,
        p50_latency_ms=180,
        p95_latency_ms=420,
        error_rate_60s=0.0,
        last_error_at=None,
        last_error_code=None,
    )


def job_done(job_id: str) -> JobDone:
    counts = TokenCounts(input=3, output=2, input_tokens=3, output_tokens=2)
    return JobDone(job_id=job_id, tokens=counts, duration_ms=12)


@dataclass
class FakeAgent:
    """The agent side, written by hand: every frame explicit, reads bounded by a timeout."""

    ws: ClientConnection
    key: Ed25519PrivateKey

    @property
    def provider_id(self) -> str:
        return provider_id_for(raw_pubkey(self.key))

    async def send(self, frame: Frame | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else encode(frame))

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(5):
            data: dict[str, Any] = orjson.loads(await self.ws.recv())
        return data

    async def closed_code(self) -> int | None:
        """Read until the coordinator closes; the close code it sent (None: no close frame)."""
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await self.ws.recv()
        return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def answer_challenge(
    ws: ClientConnection,
    key: Ed25519PrivateKey,
    *,
    enrollment_code: str | None = None,
    forge: bool = False,
) -> dict[str, Any]:
    async with asyncio.timeout(5):
        challenge = orjson.loads(await ws.recv())
        assert challenge["type"] == "auth_challenge"
        nonce = base64.b64decode(challenge["nonce"])
        assert len(nonce) == 32
        signature = key.sign(b"not the nonce" if forge else nonce)
        response = AuthResponse(
            pubkey=b64(raw_pubkey(key)),
            signature=b64(signature),
            agent_version="0.1.0-test",
            enrollment_code=enrollment_code,
        )
        await ws.send(encode(response))
        reply: dict[str, Any] = orjson.loads(await ws.recv())
    return reply


@asynccontextmanager
async def agent(
    coord: DevCoordinator,
    key: Ed25519PrivateKey | None = None,
    *,
    enrollment_code: str | None = None,
    caps: Capabilities | None = None,
) -> AsyncIterator[FakeAgent]:
    """A connected, authenticated fake agent; with `caps`, already advertising them."""
    key = key or Ed25519PrivateKey.generate()
    async with connect(coord.ws_url, compression=None, max_size=None) as ws:
        reply = await answer_challenge(ws, key, enrollment_code=enrollment_code)
        assert reply == {"type": "auth_ok", "provider_id": provider_id_for(raw_pubkey(key))}
        fake = FakeAgent(ws, key)
        if caps is not None:
            count = coord.agents[fake.provider_id].capabilities_count
            await fake.send(caps)
            await coord.wait_for(lambda c: c.agents[fake.provider_id].capabilities_count > count)
        yield fake


@pytest.fixture
async def coord() -> AsyncIterator[DevCoordinator]:
    async with DevCoordinator(host="127.0.0.1", port=0) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


# --- handshake -----------------------------------------------------------------------------------


async def test_valid_signature_gets_a_stable_provider_id(coord: DevCoordinator) -> None:
    key = Ed25519PrivateKey.generate()
    async with agent(coord, key) as first:
        pid = first.provider_id
        assert coord.agents[pid].connected
    await coord.wait_for(lambda c: not c.agents[pid].connected)
    async with agent(coord, key) as second:
        assert second.provider_id == pid
    await coord.wait_for(lambda c: not c.agents[pid].connected)

    record = coord.agents[pid]
    assert pid.startswith("prov_") and len(pid) == len("prov_") + 16
    assert record.connections == 2
    assert record.agent_version == "0.1.0-test"
    assert record.pubkey == b64(raw_pubkey(key))
    assert [a.outcome for a in coord.attempts] == ["authenticated", "authenticated"]
    assert [a.close_code for a in coord.attempts] == [1000, 1000]
    assert all(a.closed_by == "agent" for a in coord.attempts)
    assert not coord.violations


async def test_close_code_of_a_graceful_stop_is_recorded(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        await fake.ws.close(code=1001, reason="going away")
    attempt = await coord.wait_for(lambda c: c.attempts[0].ended_at is not None and c.attempts[0])
    assert (attempt.close_code, attempt.close_reason, attempt.closed_by) == (
        1001,
        "going away",
        "agent",
    )


async def test_bad_signature_gets_auth_failed_and_a_closed_socket(coord: DevCoordinator) -> None:
    async with connect(coord.ws_url, compression=None) as ws:
        reply = await answer_challenge(ws, Ed25519PrivateKey.generate(), forge=True)
        assert reply == {"type": "auth_failed", "reason": "bad signature"}
        assert await FakeAgent(ws, Ed25519PrivateKey.generate()).closed_code() == 1008
    assert not coord.agents
    assert coord.attempts[0].outcome == "auth_failed"
    assert "bad signature" in coord.violations[0].reason


async def test_wrong_first_frame_gets_auth_failed(coord: DevCoordinator) -> None:
    async with connect(coord.ws_url, compression=None) as ws:
        async with asyncio.timeout(5):
            await ws.recv()
            await ws.send(encode(heartbeat()))
            reply = orjson.loads(await ws.recv())
    assert reply["type"] == "auth_failed"
    assert "heartbeat" in reply["reason"]
    assert coord.violations[0].provider_id is None


async def test_fail_auth_next_refuses_a_valid_agent_once(coord: DevCoordinator) -> None:
    coord.fail_auth_next(1, reason="enrollment required")
    key = Ed25519PrivateKey.generate()
    async with connect(coord.ws_url, compression=None) as ws:
        reply = await answer_challenge(ws, key)
    assert reply == {"type": "auth_failed", "reason": "enrollment required"}
    async with agent(coord, key):
        pass
    assert not coord.violations


async def test_enrollment_code_is_recorded(coord: DevCoordinator, http: ClientSession) -> None:
    key = Ed25519PrivateKey.generate()
    async with agent(coord, key, enrollment_code="POD-ENROLL-1234") as fake:
        pid = fake.provider_id
    await coord.wait_for(lambda c: not c.agents[pid].connected)
    async with agent(coord, key):
        pass
    record = coord.agents[pid]
    assert record.enrollment_code == "POD-ENROLL-1234"
    assert list(record.enrollment_codes) == ["POD-ENROLL-1234", None]
    async with http.get(f"{coord.http_url}/agents") as response:
        listed = await response.json()
    assert listed[0]["enrollment_code"] == "POD-ENROLL-1234"


async def test_newer_connection_replaces_the_older(coord: DevCoordinator) -> None:
    key = Ed25519PrivateKey.generate()
    async with agent(coord, key) as old, agent(coord, key) as new:
        assert await old.closed_code() == 4000
        assert coord.connected() == [new.provider_id]
        assert coord.agents[new.provider_id].connected


# --- what agents report --------------------------------------------------------------------------


async def test_capabilities_and_heartbeats_are_recorded_and_listed(
    coord: DevCoordinator, http: ClientSession
) -> None:
    async with agent(coord, caps=capabilities(("llama3.1:8b", ["openai"]))) as fake:
        pid = fake.provider_id
        await fake.send(capabilities(("llama3.1:8b", ["openai"]), ("qwen", ["openai"])))
        await fake.send(heartbeat(queue_depth=1))
        await fake.send(heartbeat(queue_depth=2))
        record = await coord.wait_for(
            lambda c: c.agents[pid].heartbeat_count == 2 and c.agents[pid]
        )
        async with http.get(f"{coord.http_url}/agents") as response:
            assert response.status == 200
            listed = await response.json()

    assert record.capabilities_count == 2
    assert len(record.capabilities_times) == 2
    assert len(record.heartbeat_times) == 2
    assert record.last_heartbeat == heartbeat(queue_depth=2)
    [entry] = listed
    assert entry["provider_id"] == pid
    assert entry["connected"] is True
    assert entry["agent_version"] == "0.1.0-test"
    assert [m["model_id"] for m in entry["capabilities"]["models"]] == ["llama3.1:8b", "qwen"]
    assert entry["capabilities_count"] == 2
    assert entry["last_heartbeat"]["queue_depth"] == 2
    assert entry["heartbeat_count"] == 2
    assert datetime.fromisoformat(entry["last_heartbeat_at"]).utcoffset() is not None
    assert entry["connections"] == 1
    assert entry["violations"] == []
    assert not coord.violations


async def test_invalid_frames_are_violations_and_keep_the_socket_open(
    coord: DevCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    async with agent(coord) as fake:
        pid = fake.provider_id
        await fake.send('{"type":"heartbeat","queue_depth":1}')
        await fake.send("not json")
        await fake.send(b"\x00binary")
        await fake.send('{"type":"auth_ok","provider_id":"x"}')
        loose = orjson.loads(encode(heartbeat())) | {"queue_depth": "2"}
        await fake.send(orjson.dumps(loose).decode())
        await fake.send('{"type":"from_the_future","x":1}')
        await fake.send(heartbeat())
        await coord.wait_for(lambda c: c.agents[pid].heartbeat_count == 2)
        await coord.send(pid, '{"type":"still_there"}')
        assert await fake.recv() == {"type": "still_there"}

    reasons = [v.reason for v in coord.violations]
    assert len(reasons) == 5, reasons
    assert reasons[0].startswith("invalid heartbeat")
    assert reasons[1].startswith("not JSON")
    assert reasons[2].startswith("binary frame")
    assert reasons[3].startswith("auth_ok is not a frame an agent sends")
    assert reasons[4].startswith("heartbeat is loosely typed: queue_depth")
    assert list(coord.agents[pid].violations) == list(coord.violations)
    assert coord.agents[pid].unknown_frames == 1
    assert "protocol violation" in caplog.text


def test_contract_problems_beyond_the_models() -> None:
    assert contract_problems(capabilities(("a", ["openai"]), ("b", ["anthropic"]))) == []
    unsorted = capabilities(("a", ["openai"]), ("b", ["openai"]))
    unsorted = unsorted.model_copy(update={"models": list(reversed(unsorted.models))})
    assert contract_problems(unsorted) == ["capabilities.models not sorted by model_id"]
    draining = capabilities(("a", ["openai"]), status="draining")
    assert contract_problems(draining) == ["capabilities: draining but models is not empty"]
    odd = job_done("j").model_copy(
        update={"tokens": TokenCounts(input=1, output=2, input_tokens=1, output_tokens=3)}
    )
    assert len(contract_problems(odd)) == 1
    assert contract_problems(heartbeat()) == []


# --- the HTTP front ------------------------------------------------------------------------------


async def test_models_is_the_union_of_connected_agents(
    coord: DevCoordinator, http: ClientSession
) -> None:
    one = capabilities(("a", ["openai"]), ("b", ["openai"]))
    two = capabilities(("b", ["openai"]), ("c", ["anthropic"]))
    async with (
        agent(coord, caps=one),
        agent(coord, caps=two),
        http.get(f"{coord.http_url}/v1/models") as response,
    ):
        listed = await response.json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["a", "b", "c"]
    assert all(m["object"] == "model" for m in listed["data"])
    assert len(listed["data"][1]["providers"]) == 2


async def serve_one_job(
    fake: FakeAgent, chunks: list[bytes], terminal: str = "done"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Answer the next job like an agent: chunks, then a terminal frame; return (job, ack)."""
    job = await fake.recv()
    for chunk in chunks:
        await fake.send(JobChunk(job_id=job["job_id"], data=b64(chunk)))
    if terminal == "done":
        await fake.send(job_done(job["job_id"]))
    else:
        await fake.send(
            JobError(
                job_id=job["job_id"],
                error_code=terminal,
                message=f"it failed: {terminal}",
                tokens_emitted=sum(map(len, chunks)),
            )
        )
    return job, await fake.recv()


@pytest.mark.parametrize(
    ("path", "fmt"), [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")]
)
async def test_a_job_streams_the_agents_bytes_verbatim(
    coord: DevCoordinator, http: ClientSession, path: str, fmt: str
) -> None:
    body = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "x": 1}
    caps = capabilities(("llama3.1:8b", ["openai", "anthropic"]))
    async with agent(coord, caps=caps) as fake, asyncio.TaskGroup() as tg:
        served = tg.create_task(serve_one_job(fake, SSE))
        async with http.post(f"{coord.http_url}{path}", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            received = await response.read()
    job, ack = served.result()

    assert received == b"".join(SSE)
    assert job["type"] == "job"
    assert (job["model_id"], job["format"], job["deadline_ms"]) == ("llama3.1:8b", fmt, 60000)
    assert job["request"] == body
    assert ack == {"type": "job_ack", "job_id": job["job_id"]}
    record = coord.finished[job["job_id"]]
    assert (record.bytes_relayed, record.chunk_frames, record.terminal_count) == (
        len(b"".join(SSE)),
        2,
        1,
    )
    assert response.headers["X-Job-Id"] == job["job_id"]
    assert not coord.violations


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("model_not_loaded", 404),
        ("unsupported_format", 400),
        ("bad_request", 400),
        ("out_of_capacity", 429),
        ("rate_limited", 429),
        ("auth_rejected_by_backend", 502),
        ("backend_timeout", 504),
        ("backend_unreachable", 502),
    ],
)
async def test_job_error_before_any_byte_is_an_http_error(
    coord: DevCoordinator, http: ClientSession, code: str, status: int
) -> None:
    assert http_status_for(code) == status
    async with (
        agent(coord, caps=capabilities(("m", ["openai"]))) as fake,
        asyncio.TaskGroup() as tg,
    ):
        served = tg.create_task(serve_one_job(fake, [], terminal=code))
        async with http.post(f"{coord.http_url}/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == status
            error = (await r.json())["error"]
    job, ack = served.result()
    assert error["code"] == code
    assert code in error["message"]
    assert ack["job_id"] == job["job_id"]
    terminal = coord.finished[job["job_id"]].terminal
    assert isinstance(terminal, JobError)
    assert terminal.error_code == code


async def test_job_error_after_bytes_just_ends_the_stream(
    coord: DevCoordinator, http: ClientSession
) -> None:
    async with (
        agent(coord, caps=capabilities(("m", ["openai"]))) as fake,
        asyncio.TaskGroup() as tg,
    ):
        served = tg.create_task(serve_one_job(fake, SSE[:1], terminal="backend_error"))
        async with http.post(f"{coord.http_url}/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 200
            assert await r.read() == SSE[0]
    job, _ = served.result()
    terminal = coord.finished[job["job_id"]].terminal
    assert isinstance(terminal, JobError)
    assert terminal.error_code == "backend_error"


async def test_requests_nobody_can_serve(coord: DevCoordinator, http: ClientSession) -> None:
    url = coord.http_url
    async with agent(coord, caps=capabilities(("m", ["openai"]))):
        async with http.post(f"{url}/v1/chat/completions", json={"model": "other"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
        async with http.post(f"{url}/v1/messages", json={"model": "m"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "unsupported_format"
        async with http.post(f"{url}/v1/chat/completions", data=b"{") as r:
            assert r.status == 400
    async with agent(coord, caps=capabilities(("m", ["openai"]), status="ready")) as fake:
        await fake.send(capabilities(status="draining"))
        await coord.wait_for(lambda c: c.agents[fake.provider_id].capabilities_count == 2)
        async with http.post(f"{url}/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 404


async def test_resent_terminal_frames_are_counted_once_billed(
    coord: DevCoordinator, http: ClientSession
) -> None:
    key = Ed25519PrivateKey.generate()
    async with agent(coord, key, caps=capabilities(("m", ["openai"]))) as fake:
        async with asyncio.TaskGroup() as tg:
            served = tg.create_task(serve_one_job(fake, SSE))
            async with http.post(f"{coord.http_url}/v1/chat/completions", json={"model": "m"}):
                pass
        job_id = served.result()[0]["job_id"]
    async with agent(coord, key) as again:
        await again.send(job_done(job_id))
        assert await again.recv() == {"type": "job_ack", "job_id": job_id}
        await again.send(job_done("job-from-before-a-restart"))
        assert (await again.recv())["job_id"] == "job-from-before-a-restart"
    record = coord.finished[job_id]
    assert (record.terminal_count, record.resends) == (2, 1)
    assert coord.finished["job-from-before-a-restart"].dispatched_at is None
    assert not coord.violations


async def test_a_different_resent_terminal_frame_is_a_violation(
    coord: DevCoordinator, http: ClientSession
) -> None:
    async with agent(coord, caps=capabilities(("m", ["openai"]))) as fake:
        async with asyncio.TaskGroup() as tg:
            served = tg.create_task(serve_one_job(fake, []))
            async with http.post(f"{coord.http_url}/v1/chat/completions", json={"model": "m"}):
                pass
        job_id = served.result()[0]["job_id"]
        await fake.send(JobError(job_id=job_id, error_code="internal", message="x"))
        await fake.send(JobChunk(job_id=job_id, data=b64(b"late")))
        await coord.wait_for(lambda c: len(c.violations) == 2)
    assert coord.violations[0].reason.startswith("resent terminal frame differs")
    assert coord.violations[1].reason.startswith("job_chunk after the terminal frame")
    assert isinstance(coord.finished[job_id].terminal, JobDone)


async def test_client_going_away_cancels_the_job(
    coord: DevCoordinator, http: ClientSession
) -> None:
    async with (
        agent(coord, caps=capabilities(("m", ["openai"]))) as fake,
        asyncio.TaskGroup() as tg,
    ):
        answer = tg.create_task(
            http.post(f"{coord.http_url}/v1/chat/completions", json={"model": "m"})
        )
        job = await fake.recv()
        await fake.send(JobChunk(job_id=job["job_id"], data=b64(SSE[0])))
        response = await answer
        assert await response.content.readexactly(len(SSE[0])) == SSE[0]
        response.close()
        assert await fake.recv() == {"type": "job_cancel", "job_id": job["job_id"]}


async def test_agent_lost_before_any_byte_is_a_502(
    coord: DevCoordinator, http: ClientSession
) -> None:
    async with (
        agent(coord, caps=capabilities(("m", ["openai"]))) as fake,
        asyncio.TaskGroup() as tg,
    ):
        answer = tg.create_task(
            http.post(f"{coord.http_url}/v1/chat/completions", json={"model": "m"})
        )
        await fake.recv()
        await coord.drop(fake.provider_id)
        response = await answer
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "connection_lost"
        response.release()


# --- test hooks ----------------------------------------------------------------------------------


async def test_refuse_next_answers_503_before_the_upgrade(coord: DevCoordinator) -> None:
    coord.refuse_next(2)
    for _ in range(2):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(coord.ws_url):
                pass
        assert refused.value.response.status_code == 503
    async with agent(coord):
        pass
    assert [a.outcome for a in coord.attempts] == ["refused", "refused", "authenticated"]
    times = [a.at for a in coord.attempts]
    assert times == sorted(times)


async def test_flap_next_closes_right_after_the_upgrade(coord: DevCoordinator) -> None:
    coord.flap_next(1)
    async with connect(coord.ws_url, compression=None) as ws:
        assert await FakeAgent(ws, Ed25519PrivateKey.generate()).closed_code() == 1012
    async with agent(coord):
        pass
    assert [a.outcome for a in coord.attempts] == ["flapped", "authenticated"]
    assert coord.attempts[0].sent_close_code == 1012


async def test_drop_abruptly_and_with_a_code(coord: DevCoordinator) -> None:
    key = Ed25519PrivateKey.generate()
    async with agent(coord, key) as fake:
        assert await coord.drop(fake.provider_id) == 1
        assert not coord.agents[fake.provider_id].connected
        assert await fake.closed_code() is None
    async with agent(coord, key) as fake:
        assert await coord.drop(code=4001) == 1
        assert await fake.closed_code() == 4001
    assert [a.closed_by for a in coord.attempts] == ["coordinator", "coordinator"]
    assert [a.sent_close_code for a in coord.attempts] == [None, 4001]


async def test_send_reaches_the_agent(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        await coord.send(fake.provider_id, heartbeat())
        assert (await fake.recv())["type"] == "heartbeat"
        await coord.send(fake.provider_id, b"\x01\x02")
        async with asyncio.timeout(5):
            assert await fake.ws.recv() == b"\x01\x02"
    with pytest.raises(LookupError):
        await coord.send("prov_nobody", "{}")


async def test_acks_can_be_withheld_or_delayed(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        pid = fake.provider_id
        coord.ack_enabled = False
        await fake.send(job_done("j1"))
        await coord.wait_for(lambda c: "j1" in c.finished)
        await coord.send(pid, '{"type":"marker"}')
        assert await fake.recv() == {"type": "marker"}

        coord.ack_enabled = True
        coord.delay_acks(0.2)
        await fake.send(job_done("j2"))
        await coord.wait_for(lambda c: "j2" in c.finished)
        await coord.send(pid, '{"type":"marker"}')
        assert await fake.recv() == {"type": "marker"}
        assert await fake.recv() == {"type": "job_ack", "job_id": "j2"}


async def test_pongs_can_be_withheld(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        pid = fake.provider_id

        async def answered() -> bool:
            """Ping, then a heartbeat and a marker behind it: a pong, if sent, came before."""
            pong = asyncio.ensure_future(await fake.ws.ping())
            count = coord.agents[pid].heartbeat_count
            await fake.send(heartbeat())
            await coord.wait_for(lambda c: c.agents[pid].heartbeat_count > count)
            await coord.send(pid, '{"type":"marker"}')
            await fake.recv()
            return pong.done()

        assert await answered()
        coord.pong_enabled = False
        assert not await answered()


async def test_oversized_frame_is_refused_with_1009(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        with contextlib.suppress(ConnectionClosed):  # the refusal may come while still sending
            await fake.send("x" * (16 * 1024 * 1024 + 1))
        assert await fake.closed_code() == 1009
    attempt = await coord.wait_for(lambda c: c.attempts[0].ended_at is not None and c.attempts[0])
    assert attempt.sent_close_code == 1009


async def test_shutdown_closes_agents_with_1001() -> None:
    async with DevCoordinator(port=0) as coord, agent(coord) as fake:
        await coord.aclose()
        assert await fake.closed_code() == 1001


async def test_wait_for_times_out(coord: DevCoordinator) -> None:
    with pytest.raises(TimeoutError):
        await coord.wait_for(lambda c: c.agents, timeout=0.05)


# --- jobs without an HTTP client (for the executor's tests) -------------------------------------


async def test_send_job_with_a_given_id_and_again_counts_terminals_raw_and_once(
    coord: DevCoordinator,
) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with agent(coord) as fake:
        pid = fake.provider_id
        record = await coord.send_job(pid, "m", request, job_id="job-1", fmt="anthropic")
        assert await fake.recv() == {
            "type": "job",
            "job_id": "job-1",
            "model_id": "m",
            "request": request,
            "format": "anthropic",
            "deadline_ms": 60000,
        }
        for chunk in SSE:
            await fake.send(JobChunk(job_id="job-1", data=b64(chunk)))
        await fake.send(job_done("job-1"))
        assert await fake.recv() == {"type": "job_ack", "job_id": "job-1"}

        again = await coord.send_job(pid, "m", request, job_id="job-1")
        assert (await fake.recv())["job_id"] == "job-1"
        await fake.send(job_done("job-1"))  # a finished job_id is answered with the same frame
        assert await fake.recv() == {"type": "job_ack", "job_id": "job-1"}

    assert again is record
    assert (record.sent, record.chunk_frames, bytes(record.data or b"")) == (2, 2, b"".join(SSE))
    assert (record.terminal_count, record.resends, coord.terminal_frames) == (2, 1, 2)
    assert list(coord.finished) == ["job-1"]
    assert coord.terminal_counts() == {"job-1": 2}
    coord.assert_no_violations()


async def test_send_job_picks_fresh_ids_and_needs_a_connected_agent(
    coord: DevCoordinator,
) -> None:
    async with agent(coord) as fake:
        first = await coord.send_job(fake.provider_id, "m", keep_data=False)
        second = await coord.send_job(fake.provider_id, "m")
        assert [(await fake.recv())["job_id"] for _ in range(2)] == [first.job_id, second.job_id]
        assert first.job_id != second.job_id and first.data is None
        pid = fake.provider_id
    await coord.wait_for(lambda c: not c.connected())
    with pytest.raises(LookupError, match="not connected"):
        await coord.send_job(pid, "m")


async def test_cancel_job_reaches_the_agent_it_was_sent_to(coord: DevCoordinator) -> None:
    async with agent(coord) as bystander, agent(coord) as fake:
        record = await coord.send_job(fake.provider_id, "m")
        await fake.recv()
        await coord.cancel_job(record.job_id)
        assert await fake.recv() == {"type": "job_cancel", "job_id": record.job_id}
        await coord.send(bystander.provider_id, '{"type":"marker"}')
        assert await bystander.recv() == {"type": "marker"}  # nothing before it
        with pytest.raises(LookupError, match="no job"):
            await coord.cancel_job("never-sent")
    await coord.wait_for(lambda c: not c.connected())
    with pytest.raises(LookupError, match="not connected"):
        await coord.cancel_job(record.job_id)


async def test_tokens_emitted_must_be_the_bytes_relayed(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        record = await coord.send_job(fake.provider_id, "m")
        await fake.recv()
        await fake.send(JobChunk(job_id=record.job_id, data=b64(b"12345")))
        await fake.send(JobError(job_id=record.job_id, error_code="backend_error", message="x"))
        await fake.recv()
    assert [v.reason for v in coord.violations] == [
        f"job_error.tokens_emitted is 0 but 5 bytes came in job_chunk frames: {record.job_id}"
    ]


async def test_an_oversize_chunk_is_a_violation_and_the_session_goes_on(
    coord: DevCoordinator,
) -> None:
    async with agent(coord) as fake:
        record = await coord.send_job(fake.provider_id, "m")
        await fake.recv()
        await fake.send(JobChunk(job_id=record.job_id, data=b64(b"x" * 800_000)))
        await coord.send(fake.provider_id, '{"type":"marker"}')
        assert await fake.recv() == {"type": "marker"}
        assert coord.connected() == [fake.provider_id]
    [violation] = coord.violations
    assert "over the 1 MiB one frame may carry" in violation.reason


async def test_without_acks_pings_are_still_answered(coord: DevCoordinator) -> None:
    coord.ack_enabled = False
    async with agent(coord) as fake:
        await fake.send(job_done("j1"))
        pong = await fake.ws.ping()
        async with asyncio.timeout(5):
            await pong
        await coord.send(fake.provider_id, '{"type":"marker"}')
        assert await fake.recv() == {"type": "marker"}  # no job_ack came before it
    assert coord.finished["j1"].terminal_count == 1


async def test_assert_no_violations_lists_what_was_seen(coord: DevCoordinator) -> None:
    async with agent(coord) as fake:
        await fake.send(heartbeat())
        await coord.wait_for(lambda c: c.agents[fake.provider_id].heartbeat_count == 1)
        coord.assert_no_violations()
        await fake.send(heartbeat().model_copy(update={"p95_latency_ms": 1}))
        await coord.wait_for(lambda c: c.violations)
    with pytest.raises(AssertionError, match="1 contract problem") as failed:
        coord.assert_no_violations()
    assert "heartbeat.p95_latency_ms below p50_latency_ms" in str(failed.value)
    assert fake.provider_id in str(failed.value)


async def test_a_real_agent_answers_a_job_and_its_repeat_alike(
    coord: DevCoordinator, tmp_path: Path
) -> None:
    async with running_agent(write_config(tmp_path, coord.ws_url)):
        pid = (await agent_where(coord, lambda a: a.connected)).provider_id
        record = await coord.send_job(pid, "no-such-model", job_id="job-x")
        await coord.wait_for(lambda c: record.terminal_count == 1)
        await coord.send_job(pid, "no-such-model", job_id="job-x")
        await coord.wait_for(lambda c: record.terminal_count == 2)
    assert isinstance(record.terminal, JobError)
    assert list(coord.finished) == ["job-x"]
    coord.assert_no_violations()


# --- `provider-agent dev-coordinator` as a real process -----------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_the_command_stops_on_a_signal_closes_1001_and_exits_0(
    signum: signal.Signals,
) -> None:
    command = [sys.executable, "-m", "provider_agent", "dev-coordinator", "--listen", "127.0.0.1:0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with await anyio.open_process(command, env=env) as process:
        running = ProcessLines(process)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(running.collect)
                listening = await running.wait_for_line("dev-coordinator listening", timeout=20)
                ws_url = listening.split("ws_url=")[1].split()[0]
                async with connect(ws_url, compression=None) as ws:
                    assert orjson.loads(await ws.recv())["type"] == "auth_challenge"
                    process.send_signal(signum)
                    closed = await FakeAgent(ws, Ed25519PrivateKey.generate()).closed_code()
                with anyio.fail_after(20):
                    code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert closed == 1001
    assert code == 0
    assert not any("Traceback" in line for line in running.lines), running.lines
    assert any(f"{signum.name} received, stopping" in line for line in running.lines)


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provider_agent", "dev-coordinator", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:99999", "nonsense", ":80x", "", "[::1:80", "host\x1b[2J:80"]
)
def test_a_bad_listen_address_is_one_line_and_exit_2(listen: str) -> None:
    result = run_command("--listen", listen)
    assert result.returncode == 2
    assert result.stderr.startswith("dev-coordinator: --listen")
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr
    assert result.stdout == ""


def test_an_address_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command("--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"dev-coordinator: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1
