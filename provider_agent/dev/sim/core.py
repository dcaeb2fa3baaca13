"""`SimBackend`: the simulator as a server. It puts the kinds' endpoints and the completions
together, listens on a real port (and can crash and come back, or refuse connections), sends each
request to its route through the fault it shows, and takes faults from outside its process
through `/__sim/`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable, Mapping
from functools import partial
from types import TracebackType
from typing import Any, Final, Self, cast

from aiohttp import web
from multidict import CIMultiDict
from pydantic import ValidationError

from provider_agent.dev.sim.answers import MESSAGES, json_response
from provider_agent.dev.sim.completions import Completions
from provider_agent.dev.sim.faults import Fault, RouteClass
from provider_agent.dev.sim.llamacpp import LlamacppEndpoints
from provider_agent.dev.sim.lmstudio import LmstudioEndpoints
from provider_agent.dev.sim.ollama import OllamaEndpoints
from provider_agent.dev.sim.openrouter import OpenrouterEndpoints
from provider_agent.dev.sim.records import BYOK_KINDS, SimRequest
from provider_agent.dev.sim.slots import valid_seconds, valid_slots
from provider_agent.dev.sim.state import Route, Routes
from provider_agent.dev.sim.venice import VeniceEndpoints
from provider_agent.dev.sim.vllm import VllmEndpoints

CONTROL_PREFIX: Final = "/__sim/"
MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class _Reset(asyncio.Protocol):
    """A connection refused the hard way: RST at once, before a byte is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cast(asyncio.Transport, transport).abort()  # uvloop's transports are not subclasses


class SimBackend(
    Completions,
    VllmEndpoints,
    LlamacppEndpoints,
    LmstudioEndpoints,
    OllamaEndpoints,
    OpenrouterEndpoints,
    VeniceEndpoints,
):
    """A simulated backend of one kind on a real loopback port (see the package docstring)."""

    def _build_routes(self) -> Routes:
        """Its kind's routes (each kind's module has them), with the completions' handlers; no
        `/messages` without the Anthropic API."""
        chat = Route("completion", self._chat)
        messages = Route("completion", self._messages)
        per_kind = {
            "vllm": self._vllm_routes,
            "llamacpp": self._llamacpp_routes,
            "lmstudio": self._lmstudio_routes,
            "ollama": self._ollama_routes,
            "openrouter": self._openrouter_routes,
            "venice": self._venice_routes,
        }
        routes = per_kind[self.kind](chat, messages)
        if not self.anthropic:
            routes = {(m, p): r for (m, p), r in routes.items() if not p.endswith("/messages")}
        return routes

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; `port` becomes the bound port when 0 was asked for."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a client that goes away cancels its handler (recorded).
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        self._runner = runner
        try:
            await self._listen()
        except BaseException:
            await runner.cleanup()
            self._runner = None
            raise

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> asyncio.BaseProtocol:
        if self._take_fault_where(lambda f: f.kind == "refuse") is not None:
            self.refused += 1
            self._changed()
            return _Reset()
        assert self._runner is not None and self._runner.server is not None
        return self._runner.server()

    async def aclose(self) -> None:
        """Stop: close the port, cut every stream and hung request, release everything."""
        self._closing = True
        self._stopping.set()
        self._close_port()
        self._abort_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def kill(self) -> None:
        """Like a crashed server: the port closes and every open connection is reset."""
        for rec in self.requests:
            if rec.outcome in ("open", "hung"):
                rec.outcome = "killed"
        self._close_port()
        self._abort_connections()
        await asyncio.sleep(0)  # let the aborted connections' handlers see it

    def _abort_connections(self) -> None:
        if self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

    async def restart(self) -> None:
        """Listen again on the same port after `kill()`."""
        if self._server is None:
            await self._listen()

    def _close_port(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        """The server root, `http://HOST:PORT`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What a `[[backends]]` url is for this kind: the root, or the BYOK API base."""
        return self.url + "/api/v1" if self.kind in BYOK_KINDS else self.url

    # --- dispatch ----------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._control(request)
        body = await request.read()
        rec = SimRequest(
            seq=len(self.requests),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDict(request.headers),
            body=body,
            received_monotonic=time.monotonic(),
            received_wall=time.time(),
        )
        self.requests.append(rec)
        self._changed()
        method = "GET" if request.method == "HEAD" else request.method
        route = self._routes.get((method, request.path))
        cls: RouteClass = route.cls if route is not None else "other"
        try:
            fault = self._take_fault_where(lambda f: f.applies_to(cls))
            rec.fault = fault
            response = await self._answer(request, rec, route, fault)
        except asyncio.CancelledError:
            if rec.outcome == "hung":
                rec.outcome = "open"
            self._gone(rec)
            raise
        finally:
            rec.finished_monotonic = time.monotonic()
            self._changed()
        rec.status = response.status
        if rec.outcome == "open":
            rec.outcome = "ok"
        return response

    async def _answer(
        self, request: web.Request, rec: SimRequest, route: Route | None, fault: Fault | None
    ) -> web.StreamResponse:
        anthropic_route = request.path.endswith("/messages")
        if fault is not None:
            if fault.kind == "hang":
                rec.outcome = "hung"
                await self._stopping.wait()  # until the client gives up, or the sim stops
                rec.outcome = "stopped"
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=503)
            if fault.kind == "http":
                return self._error(
                    fault.status,
                    MESSAGES.get(fault.status, "Simulated error."),
                    anthropic_route=anthropic_route,
                )
            if fault.kind == "slow_health":
                await asyncio.sleep(fault.delay_s)
        if route is None:
            return self._unknown_path(request)
        if self.api_key is not None and not route.public and not self._authorized(request):
            return self._error(401, MESSAGES[401], anthropic_route=anthropic_route)
        return await route.handler(request, rec)

    def _authorized(self, request: web.Request) -> bool:
        bearer = request.headers.get("Authorization", "")
        if bearer == f"Bearer {self.api_key}":
            return True
        return (
            request.path.endswith("/messages") and request.headers.get("x-api-key") == self.api_key
        )

    def _unknown_path(self, request: web.Request) -> web.Response:
        if self.kind == "lmstudio":  # "Returning 200 anyway"
            return json_response(
                {"error": f"Unexpected endpoint or method. ({request.method} {request.path})"}
            )
        if self.kind == "ollama":
            return web.Response(status=404, text="404 page not found")
        if self.kind == "vllm":
            return json_response({"detail": "Not Found"}, 404)
        if self.kind == "llamacpp":
            return self._error(404, "File Not Found")
        return self._error(404, "Not Found")

    async def _control(self, request: web.Request) -> web.Response:
        """`GET /__sim/state`, `POST /__sim/fault` (a Fault's JSON, a list of them, or null),
        `POST /__sim/slots` (`{"slots": N or null}`), `POST /__sim/prefill`
        (`{"prefill_s_per_1k": S, "ttft_s": S}`, either or both)."""
        if request.method == "GET" and request.path == CONTROL_PREFIX + "state":
            return json_response(
                {
                    "kind": self.kind,
                    "fault": self._fault.model_dump() if self._fault is not None else None,
                    "fault_queue": [f.model_dump() for f in self.fault_queue],
                    "served": dict(self.served),
                    "completed": dict(self.completed),
                    "refused": self.refused,
                    "active": self.active,
                    **self.saturation(),
                    "requests": [r.summary() for r in self.requests],
                }
            )
        if request.method == "POST" and request.path == CONTROL_PREFIX + "slots":
            return await self._set_knobs(request, {"slots": valid_slots}, required=True)
        if request.method == "POST" and request.path == CONTROL_PREFIX + "prefill":
            seconds = {n: partial(valid_seconds, n) for n in ("prefill_s_per_1k", "ttft_s")}
            return await self._set_knobs(request, seconds, required=False)
        if request.method == "POST" and request.path == CONTROL_PREFIX + "fault":
            try:  # the stdlib's parser: a usage figure may be beyond 64 bits, or NaN
                payload = json.loads(await request.read())
                given = (
                    [] if payload is None else payload if isinstance(payload, list) else [payload]
                )
                faults = [Fault.model_validate(f) for f in given]
            except (ValueError, ValidationError) as exc:
                return json_response({"error": f"not a fault: {exc}"}, 400)
            self.fault = faults[0] if faults else None
            self.fault_queue = faults[1:]
            return json_response({"fault": payload})
        return json_response({"error": "unknown control endpoint"}, 404)

    async def _set_knobs(
        self, request: web.Request, knobs: Mapping[str, Callable[[Any], Any]], *, required: bool
    ) -> web.Response:
        """Set knobs from a JSON object (each checked by its function; all of them if
        `required`, else at least one) and answer `saturation()`; 400 and nothing set if any
        is wrong. A slot count raised starts queued requests at once."""
        try:
            payload = json.loads(await request.read())
            if not isinstance(payload, dict) or not payload:
                raise ValueError("a JSON object is needed")
            unknown = payload.keys() - knobs.keys()
            missing = knobs.keys() - payload.keys() if required else set()
            if unknown or missing:
                raise ValueError(f"expected the keys {', '.join(knobs)}")
            values = {name: knobs[name](value) for name, value in payload.items()}
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        for name, value in values.items():
            setattr(self, name, value)
        return json_response(self.saturation())
