"""The reference coordinator's HTTP front: OpenAI/Anthropic-style requests relayed to agents.

POST /v1/chat/completions (openai) and /v1/messages (anthropic) become `job` frames to a connected
agent serving the model; its `job_chunk` bytes stream back verbatim. GET /v1/models lists what the
connected agents serve, /agents and /jobs what the coordinator saw.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
import orjson
from aiohttp import web

from provider_agent.dev.coordinator.records import AgentRecord, JobRecord
from provider_agent.link.protocol import Job, JobDone, JobError, ModelOffer, WireFormat

log = logging.getLogger("provider_agent.dev.coordinator")

JOB_DEADLINE_MS: Final = 60_000
#: Beyond the job's deadline the agent owes a terminal frame; after this much more the HTTP
#: client gets a 504 from the coordinator itself.
DEADLINE_GRACE_S: Final = 10.0
#: Chunks waiting for a slow HTTP client; when full, the agent's reader waits (backpressure).
JOB_QUEUE_FRAMES: Final = 64

#: HTTP status answered for a `job_error` that arrives before any byte (others: 502).
HTTP_STATUS_FOR_ERROR: Final[dict[str, int]] = {
    "model_not_loaded": 404,
    "unsupported_format": 400,
    "bad_request": 400,
    "out_of_capacity": 429,
    "rate_limited": 429,
    "auth_rejected_by_backend": 502,
    "backend_timeout": 504,
}


def http_status_for(error_code: str) -> int:
    """The HTTP status a client gets for a `job_error` that came before any byte."""
    return HTTP_STATUS_FOR_ERROR.get(error_code, 502)


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """An OpenAI-style error object, so OpenAI clients show the code."""
    kind = (
        "rate_limit_error"
        if status == 429
        else "invalid_request_error"
        if status < 500
        else "server_error"
    )
    return {"error": {"message": message, "type": kind, "code": code}}


@dataclass(frozen=True)
class Refusal:
    """Why no agent can take a request, as the HTTP error to answer."""

    status: int
    code: str
    message: str


def pick_provider(
    offers: Mapping[str, Mapping[str, ModelOffer]],
    in_flight: Mapping[str, int],
    model: str,
    fmt: WireFormat,
    pinned: str | None = None,
) -> str | Refusal:
    """The connected provider to run `model` in `fmt`: of those advertising both, the one with
    the fewest jobs in flight here (ties: the lowest id). `pinned` (header X-Provider-Id)
    restricts the choice to one provider. `offers` maps each connected provider to its models."""
    serving = {
        pid: offer
        for pid, models in offers.items()
        if (pinned is None or pid == pinned) and (offer := models.get(model)) is not None
    }
    if not serving:
        return Refusal(404, "model_not_found", f"no connected agent serves model {model!r}")
    able = sorted(pid for pid, offer in serving.items() if fmt in offer.formats)
    if not able:
        return Refusal(400, "unsupported_format", f"no agent serves {model!r} as {fmt}")
    return min(able, key=lambda pid: in_flight.get(pid, 0))


class _Lost:
    """Sentinel: the agent's connection ended before the job's terminal frame."""


LOST: Final = _Lost()
Relayed = bytes | JobDone | JobError


class PendingJob:
    """A job whose HTTP client is still waiting: the agent's reader feeds it, the client's handler
    drains it. Bounded, so a slow client slows the agent's reader (backpressure), not memory."""

    def __init__(self, record: JobRecord, attempt: int) -> None:
        self.record = record
        #: The connection attempt the job went out on; only its frames feed this job.
        self.attempt = attempt
        self.lost = False
        self._send, self._receive = anyio.create_memory_object_stream[Relayed](JOB_QUEUE_FRAMES)
        #: The client's streaming response, once the handler hands it over (`stream_to`).
        self._sink: Callable[[bytes], Awaitable[None]] | None = None

    def stream_to(self, write: Callable[[bytes], Awaitable[None]]) -> bool:
        """The client's response streams: from now on the agent's reader writes the job's bytes
        to it itself (no hop through the handler's task per token). Only while nothing waits
        in the queue, so bytes keep their order; the handler still gets the terminal frame."""
        if self._receive.statistics().current_buffer_used:
            return False
        self._sink = write
        return True

    async def deliver(self, item: Relayed) -> None:
        """Queue for the client, waiting only while it is full (the agent's reader then reads
        every frame already received before yielding, so arrival stamps stay true under
        load); dropped once the client is gone. Bytes go straight to a streaming response."""
        sink = self._sink
        if sink is not None and isinstance(item, bytes):
            try:
                await sink(item)
            except ConnectionError:  # the client left: its handler ends (and cancels the job)
                log.debug("the client of job_id=%s left; bytes dropped", self.record.job_id)
                self._sink = None
                self._send.close()
            except RuntimeError:  # written after the handler ended the response (its deadline)
                if self._sink is sink:
                    raise
            return
        try:
            try:
                self._send.send_nowait(item)
            except anyio.WouldBlock:
                await self._send.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            log.debug("nobody waits for job_id=%s any more; frame dropped", self.record.job_id)

    async def next(self) -> Relayed | _Lost:
        """The next item; `LOST` once the connection ended and what it delivered is read."""
        try:
            return self._receive.receive_nowait()  # no checkpoint when one is waiting
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            return LOST
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            return LOST

    def mark_lost(self) -> None:
        """The agent's connection ended: nothing more comes."""
        self.lost = True
        self._send.close()

    def unstream(self) -> None:
        """The handler ends the response: bytes go to the queue again (and are dropped)."""
        self._sink = None

    def abandon(self) -> None:
        """The client is done: later deliveries are dropped, a blocked one goes on."""
        self._sink = None
        self._receive.close()
        self._send.close()


class Coordinator(Protocol):
    """What the front reads and dispatches through: the `DevCoordinator` of `server`, named here
    by what it offers (`server` builds the front, so the front does not import it)."""

    @property
    def agents(self) -> Mapping[str, AgentRecord]: ...

    @property
    def jobs(self) -> Mapping[str, JobRecord]: ...

    def connected(self) -> list[str]: ...

    def in_flight(self) -> Mapping[str, int]: ...

    def relaying(
        self, provider_id: str, job: Job
    ) -> AbstractAsyncContextManager[PendingJob | None]: ...


class HttpFront:
    """The HTTP routes, reading the coordinator's state and dispatching through it."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_post("/v1/chat/completions", self._handle_chat_completions)
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_get("/agents", self._handle_agents)
        app.router.add_get("/jobs", self._handle_jobs)

    async def _handle_models(self, _: web.Request) -> web.Response:
        owners: dict[str, list[str]] = {}
        for pid in self.coord.connected():
            for model_id in self.coord.agents[pid].offers():
                owners.setdefault(model_id, []).append(pid)
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": 0,
                "owned_by": "dev-coordinator",
                "providers": providers,
            }
            for model_id, providers in sorted(owners.items())
        ]
        return _json({"object": "list", "data": data})

    async def _handle_agents(self, _: web.Request) -> web.Response:
        agents = self.coord.agents
        return _json([agents[pid].to_json() for pid in sorted(agents)])

    async def _handle_jobs(self, _: web.Request) -> web.Response:
        return _json([job.to_json() for job in self.coord.jobs.values()])

    async def _handle_chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._run_job(request, "openai")

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._run_job(request, "anthropic")

    async def _run_job(self, request: web.Request, fmt: WireFormat) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "bad_request", "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "bad_request", "the body must be a JSON object with a string model")
        coord = self.coord
        offers = {pid: coord.agents[pid].offers() for pid in coord.connected()}
        picked = pick_provider(
            offers, coord.in_flight(), body["model"], fmt, request.headers.get("X-Provider-Id")
        )
        if isinstance(picked, Refusal):
            return _error(picked.status, picked.code, picked.message)
        job = Job(
            job_id=str(uuid.uuid4()),
            model_id=body["model"],
            request=body,
            format=fmt,
            deadline_ms=JOB_DEADLINE_MS,
        )
        async with coord.relaying(picked, job) as pending:
            if pending is None:
                return _error(502, "connection_lost", "the agent's connection ended")
            return await _relay(request, pending, job.deadline_ms / 1000 + DEADLINE_GRACE_S)


async def _relay(request: web.Request, pending: PendingJob, budget_s: float) -> web.StreamResponse:
    """Stream the agent's bytes to the HTTP client as they come; an error before the first byte
    becomes an HTTP error, after it the stream just ends."""
    record = pending.record
    response: web.StreamResponse | None = None
    with anyio.move_on_after(budget_s):
        while True:
            item = await pending.next()
            if isinstance(item, bytes):
                if response is None:
                    response = await _start_stream(request, record)
                await response.write(item)
                pending.stream_to(response.write)
                continue
            if response is not None:
                pending.unstream()
                await response.write_eof()
                return response
            if isinstance(item, JobDone):
                response = await _start_stream(request, record)
                await response.write_eof()
                return response
            if isinstance(item, JobError):
                status = http_status_for(item.error_code)
                return _error(status, item.error_code, item.message, record)
            return _error(502, "connection_lost", "the agent's connection ended", record)
    log.warning("job timed out job_id=%s", record.job_id)
    pending.unstream()
    if response is not None:
        await response.write_eof()
        return response
    return _error(504, "timeout", "no answer from the agent in time", record)


async def _start_stream(request: web.Request, record: JobRecord) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Job-Id": record.job_id,
            "X-Provider-Id": record.provider_id,
        }
    )
    await response.prepare(request)
    return response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, job: JobRecord | None = None) -> web.Response:
    response = _json(error_body(status, code, message), status)
    if job is not None:
        response.headers["X-Job-Id"] = job.job_id
        response.headers["X-Provider-Id"] = job.provider_id
    return response
