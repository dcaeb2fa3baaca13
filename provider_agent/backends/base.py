"""What every backend adapter is, and the OpenAI-compatible base most of them share.

An adapter answers three questions for discovery — is the server up (`health`), what does it
serve (`list_models`), which wire formats does it speak (`formats`) — and runs a job's upstream
request (`stream`, built in `backends.stream`). HTTP lives in this package and only here: every
discovery call has a timeout, every body is read with a size cap, and all adapters share the
agent's one pooled session.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import anyio
import orjson

from provider_agent import __version__
from provider_agent.config.schema import BackendConfig, WireFormat
from provider_agent.discovery.listing import Health, ModelInfo, UpstreamPrice
from provider_agent.errors import BackendAuthError, BackendError, RouteFailure
from provider_agent.jobs.upstream import FirstBytes
from provider_agent.safe_text import printable

#: `Health`, `ModelInfo` and `UpstreamPrice` live in the I/O-free `listing` module; they are
#: re-exported here for the adapters and older imports.
__all__ = [
    "LISTING_CAP_BYTES",
    "USER_AGENT",
    "Backend",
    "Health",
    "ModelInfo",
    "UpstreamPrice",
    "new_http_session",
    "openai_entries",
    "positive_int",
    "read_api_key",
    "read_capped",
]

LISTING_CAP_BYTES = 8 * 1024 * 1024
USER_AGENT = f"provider-agent/{__version__}"
#: Pool connections beyond `limits.max_concurrent`, for probes, so no job queues behind them.
POOL_HEADROOM = 32
#: The Messages API version sent with `anthropic` jobs.
ANTHROPIC_VERSION = "2023-06-01"
#: At most this much of the discovery budget is kept back to answer after per-model details.
DETAIL_MARGIN_MAX_S = 0.5
#: How much of an error body a message quotes.
ERROR_EXCERPT_CHARS = 200


def new_http_session(max_concurrent: int) -> aiohttp.ClientSession:
    """The agent's one pooled client session. The pool admits every allowed job stream at once
    plus headroom for probes: a hidden queue in the pool would look like a slow backend."""
    connector = aiohttp.TCPConnector(limit=max_concurrent + POOL_HEADROOM, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        auto_decompress=True,
    )


def read_api_key(env_name: str) -> str | None:
    """The key from the environment, else `$CREDENTIALS_DIRECTORY/<env_name>` (systemd
    LoadCredential=). Read at use; never stored."""
    value = os.environ.get(env_name)
    if value:
        return value.strip()
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / env_name
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return None


class Backend:
    """An OpenAI-compatible server. Subclasses override only what their server does differently."""

    kind: ClassVar[str]
    #: Used when the config gives no url (BYOK kinds).
    default_url: ClassVar[str | None] = None
    #: Path (under `url`) of the OpenAI-compatible API; BYOK bases already include /api/v1.
    api_prefix: ClassVar[str] = "/v1"
    health_path: ClassVar[str | None] = "/health"
    #: Plain-HTTP jobs are read by `LeanStream`, https ones by the pooled aiohttp session (see
    #: `backends.stream`); tests turn this off to hold the aiohttp reader to the same contract.
    lean_reader: ClassVar[bool] = True

    def __init__(self, config: BackendConfig, http: aiohttp.ClientSession, timeout_s: float = 5):
        self.config = config
        self.http = http
        self.timeout_s = timeout_s
        base = config.url or self.default_url
        if base is None:
            raise ValueError(f"{config.label}: no url")
        self.base_url = base.rstrip("/")

    @property
    def name(self) -> str:
        return self.config.label

    # --- credentials -----------------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """Bearer header from `api_key_env`; BackendAuthError naming the variable when unset."""
        env_name = self.config.api_key_env
        if env_name is None:
            return {}
        key = read_api_key(env_name)
        if key is None:
            raise BackendAuthError(
                f"no API key: environment variable {env_name} is unset "
                "(nor is $CREDENTIALS_DIRECTORY/" + env_name + ")"
            )
        if not key.isprintable() or " " in key:
            raise BackendAuthError(
                f"the API key in {env_name} contains spaces or control characters "
                "(a stray line break?)"
            )
        return {"Authorization": f"Bearer {key}"}

    # --- HTTP helpers ----------------------------------------------------------------------------

    def api_url(self, path: str) -> str:
        return f"{self.base_url}{self.api_prefix}{path}"

    async def get_raw(
        self, url: str, *, cap: int = LISTING_CAP_BYTES, params: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """GET with timeout, auth and size cap → (status, body); transport errors → BackendError."""
        return await self.request_raw("GET", url, cap=cap, params=params)

    async def request_raw(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        cap: int = LISTING_CAP_BYTES,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        headers = self.auth_headers()
        data = orjson.dumps(json_body) if json_body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.http.request(
                method, url, headers=headers, data=data, params=params, timeout=timeout
            ) as response:
                return response.status, await read_capped(response, cap)
        except BackendError as exc:  # oversize body: say which request it was
            raise BackendError(f"{method} {_path_of(url)}: {exc}") from None
        except TimeoutError:
            raise BackendError(
                f"{method} {_path_of(url)}: no answer within {self.timeout_s:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise BackendError(f"{method} {_path_of(url)}: {_describe(exc)}") from None

    async def get_json(
        self, url: str, *, params: Mapping[str, str] | None = None, ok_only: bool = True
    ) -> Any:
        """GET and parse JSON; a non-2xx status, garbage or an oversize body is a BackendError."""
        status, body = await self.get_raw(url, params=params)
        return self.parse_json(status, body, f"GET {_path_of(url)}", ok_only=ok_only)

    async def post_json(self, url: str, payload: Any) -> Any:
        status, body = await self.request_raw("POST", url, json_body=payload)
        return self.parse_json(status, body, f"POST {_path_of(url)}")

    @staticmethod
    def parse_json(
        status: int,
        body: bytes,
        what: str,
        *,
        ok_only: bool = True,
        loads: Callable[[bytes], Any] = orjson.loads,
    ) -> Any:
        """The JSON of an answer; `loads=listing.exact_json` keeps numbers exact."""
        if status in (401, 403):
            raise BackendAuthError(f"{what}: HTTP {status} (credentials rejected)")
        if ok_only and not 200 <= status < 300:
            raise BackendError(f"{what}: HTTP {status}{_error_detail(body)}")
        try:
            return loads(body)
        except ValueError:  # orjson.JSONDecodeError and json's errors are ValueErrors
            raise BackendError(f"{what}: response is not JSON") from None

    # --- discovery -------------------------------------------------------------------------------

    async def health(self) -> Health:
        """Liveness. Never raises: a failure is a Health with ok=False and the reason."""
        started = time.perf_counter()
        try:
            await self.check_health()
        except BackendError as exc:
            return Health(False, _ms_since(started), str(exc))
        return Health(True, _ms_since(started))

    async def check_health(self) -> None:
        """Raise BackendError unless the server is up and ready. Default: `GET /health` is 2xx."""
        assert self.health_path is not None
        status, body = await self.get_raw(f"{self.base_url}{self.health_path}")
        if not 200 <= status < 300:
            raise BackendError(f"GET {self.health_path}: HTTP {status}{_error_detail(body)}")

    async def list_models(self) -> list[ModelInfo]:
        """Models from `GET /v1/models` (OpenAI listing). Subclasses add context windows etc."""
        listing = await self.get_json(self.api_url("/models"))
        return [ModelInfo(native_id=entry["id"]) for entry in openai_entries(listing)]

    def detail_budget_s(self) -> float:
        """Seconds this adapter may spend on optional per-model details (Ollama's `/api/show`,
        llama.cpp router's `/props`) before the caller's deadline, keeping a margin to answer
        with the models it already knows; infinite when the caller set no deadline."""
        margin = min(DETAIL_MARGIN_MAX_S, self.timeout_s / 10)
        return anyio.current_effective_deadline() - anyio.current_time() - margin

    async def detect_formats(self) -> frozenset[WireFormat]:
        """Wire formats the server is known to speak beyond `openai`; default: openai only."""
        return frozenset({"openai"})

    async def formats(self) -> frozenset[WireFormat]:
        """`formats` from the config when set, else what the server is known to speak."""
        if self.config.formats is not None:
            return frozenset(self.config.formats)
        return await self.detect_formats()

    # --- jobs (the relay is built on these) ------------------------------------------------------

    def stream_url(self, wire_format: WireFormat) -> str:
        """Where a streamed job of this wire format is POSTed: `/chat/completions` (openai) or
        `/messages` (anthropic) under the API prefix."""
        path = "/chat/completions" if wire_format == "openai" else "/messages"
        return self.api_url(path)

    def stream_headers(self, wire_format: WireFormat) -> dict[str, str]:
        """The headers of a job's POST: ours only (nothing from the coordinator is forwarded).
        `Accept-Encoding: identity` keeps the bytes as the backend wrote them; BackendAuthError
        when the API key is missing."""
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            **self.auth_headers(),
        }
        if wire_format == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
        return headers

    def stream(
        self,
        fmt: WireFormat,
        body: bytes,
        deadline: float,
        *,
        first_bytes: FirstBytes | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """One job's upstream request (see `backends.stream`): `async with` it for the body's
        bytes; failures are StreamFailed. `deadline` is an absolute `anyio.current_time()` for
        the whole job; the discovery timeout (`timeout_s`) does not apply here. The lean reader
        may hand the first bytes to `first_bytes` instead of yielding them."""
        # Imported with the first job, not at startup: an agent that has not served one yet
        # carries neither reader nor httptools (the idle RSS target, benchmarks.md).
        from provider_agent.backends.lean import LeanStream
        from provider_agent.backends.stream import AiohttpStream, RefusedStream

        try:
            headers = self.stream_headers(fmt)
        except BackendAuthError as exc:
            message = printable(f"{self.config.kind}: {exc}")
            return RefusedStream(RouteFailure("auth_rejected_by_backend", message, fallback=True))
        bearer = headers.get("Authorization", "").removeprefix("Bearer ")
        secrets = (bearer,) if bearer else ()
        url = self.stream_url(fmt)
        if self.lean_reader and url.startswith("http://"):
            headers["User-Agent"] = USER_AGENT
            return LeanStream(
                url,
                headers,
                body,
                deadline,
                kind=self.config.kind,
                secrets=secrets,
                first_bytes=first_bytes,
            )
        return AiohttpStream(
            self.http, url, headers, body, deadline, kind=self.config.kind, secrets=secrets
        )


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """Read the whole body, refusing more than `cap` bytes (a backend's garbage never eats RAM)."""
    if response.content_length is not None and response.content_length > cap:
        raise BackendError(f"response body of {response.content_length} bytes exceeds {cap}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > cap:
            raise BackendError(f"response body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def openai_entries(listing: Any) -> list[dict[str, Any]]:
    """The `data` entries of an OpenAI-style model listing that have a string `id`."""
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise BackendError("model listing has no `data` list")
    return [e for e in listing["data"] if isinstance(e, dict) and isinstance(e.get("id"), str)]


def positive_int(value: Any) -> int | None:
    """An int > 0 from JSON, else None (bools, strings, nulls and zeros are 'unknown')."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _error_detail(body: bytes) -> str:
    """A short excerpt of an error body for a log line, escaped (a backend's bytes never reach a
    terminal or a log raw) and cut."""
    text = body[: ERROR_EXCERPT_CHARS * 4].decode("utf-8", "replace").strip()
    return f": {printable(text, limit=ERROR_EXCERPT_CHARS)}" if text else ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return f"{type(exc).__name__}: {printable(str(exc))}" if str(exc) else type(exc).__name__


def _path_of(url: str) -> str:
    """The path part of a URL, for messages (keeps hosts of BYOK providers out of the noise)."""
    after_scheme = url.split("://", 1)[-1]
    slash = after_scheme.find("/")
    return after_scheme[slash:] if slash >= 0 else "/"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
