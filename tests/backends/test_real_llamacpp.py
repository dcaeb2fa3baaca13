"""Against a REAL llama.cpp backend: llama-cpp-python's server serving a tiny random-weights GGUF.

What that server (llama-cpp-python 0.3.x) really does, as recorded in
`tests/fixtures/llamacpp-python/` and asserted here:
- `GET /v1/models` lists the `--model_alias`, with no context window in it;
- there is no `/health` (nor `/props`): 404 with FastAPI's `{"detail":"Not Found"}`;
- a streamed chat completion is `data: {json}\\n\\n` events, then `data: [DONE]\\n\\n`; it ignores
  `stream_options.include_usage` — no usage chunk — so the agent has to estimate token counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.realbackend import MODEL_ALIAS, http_get, http_post_json, llamacpp_server, parse_sse

pytestmark = pytest.mark.realbackend

FIXTURES = Path(__file__).parent.parent / "fixtures" / "llamacpp-python"
STREAM_REQUEST: dict[str, Any] = {
    "model": MODEL_ALIAS,
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
    "temperature": 0,
    "seed": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.fixture(scope="module")
def llamacpp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llamacpp_server(tmp_path_factory.mktemp("llamacpp")) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def streamed(llamacpp_url: str) -> bytes:
    status, raw = http_post_json(f"{llamacpp_url}/v1/chat/completions", STREAM_REQUEST)
    assert status == 200, raw[:500]
    return raw


def _chunks(raw: bytes) -> list[dict[str, Any]]:
    payloads = parse_sse(raw)
    assert payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(isinstance(c, dict) for c in chunks)
    return chunks


def _shape(chunks: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """What does not vary between runs: each chunk's keys and its delta's keys."""
    return [
        (*sorted(c), *sorted(k for choice in c["choices"] for k in choice["delta"])) for c in chunks
    ]


def test_models_lists_the_alias_without_a_context_window(llamacpp_url: str) -> None:
    status, body = http_get(f"{llamacpp_url}/v1/models")
    assert status == 200
    listing = json.loads(body)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [MODEL_ALIAS]
    model = listing["data"][0]
    assert not {"max_model_len", "context_length", "meta", "n_ctx"} & set(model), model
    assert listing == json.loads((FIXTURES / "models.json").read_bytes())


def test_health_and_props_do_not_exist(llamacpp_url: str) -> None:
    for path in ("/health", "/props"):
        status, body = http_get(f"{llamacpp_url}{path}")
        assert (status, json.loads(body)) == (404, {"detail": "Not Found"}), path


def test_messages_route_does_not_exist(llamacpp_url: str) -> None:
    """What the adapter's Anthropic probe (`POST /v1/messages {}`) gets here: 404."""
    status, body = http_post_json(f"{llamacpp_url}/v1/messages", {})
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})


async def test_the_adapter_serves_without_slots_or_anthropic(llamacpp_url: str) -> None:
    """No `/props`: the model goes without a slot count (uncapped by it), nothing fails; the
    probe's 404 keeps the formats to `openai`."""
    from provider_agent.backends.base import ModelInfo, new_http_session
    from provider_agent.backends.llamacpp import LlamaCppBackend
    from provider_agent.config.schema import BackendConfig

    async with new_http_session(4) as http:
        backend = LlamaCppBackend(BackendConfig(kind="llamacpp", url=llamacpp_url), http, 10)
        assert (await backend.health()).ok
        assert await backend.list_models() == [ModelInfo(MODEL_ALIAS, slots=None)]
        assert await backend.formats() == frozenset({"openai"})


def test_stream_is_sse_ending_in_done_without_usage(streamed: bytes) -> None:
    assert streamed.startswith(b"data: {")
    assert streamed.endswith(b"\n\ndata: [DONE]\n\n")
    assert b"\r" not in streamed  # events are separated by LF LF, not CRLF
    events = streamed.decode().split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])

    chunks = _chunks(streamed)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {MODEL_ALIAS}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = [c for c in chunks if "content" in c["choices"][0]["delta"]]
    assert 1 <= len(content) <= 4  # greedy from fixed weights: some text, at most max_tokens
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    # stream_options.include_usage is ignored: if a version starts sending usage, the recorded
    # fixture and the token estimation path in the relay tests need revisiting.
    assert not any("usage" in c for c in chunks), "llama-cpp-python now streams usage"


def test_recorded_fixture_matches_the_live_stream(streamed: bytes) -> None:
    recorded = (FIXTURES / "chat-stream-include-usage.sse").read_bytes()
    assert _shape(_chunks(recorded)) == _shape(_chunks(streamed))


def test_discover_advertises_the_model(llamacpp_url: str, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        "[coordinator]\n"
        'url = "ws://127.0.0.1:9/provider/connect"\n'
        "[identity]\n"
        f"key_path = {json.dumps(str(tmp_path / 'identity.key'))}\n"
        "[state]\n"
        f"dir = {json.dumps(str(tmp_path / 'state'))}\n"
        "[[backends]]\n"
        'kind = "llamacpp"\n'
        f"url = {json.dumps(llamacpp_url)}\n"
        "[pricing]\n"
        "default_input_per_1m = 300000\n"
        "default_output_per_1m = 600000\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "provider_agent",
        "discover",
        "--json",
        "--config",
        str(cfg),
        "--allow-insecure",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    message = json.loads(proc.stdout)
    assert message["type"] == "capabilities"
    assert len(message["models"]) == 1, message["models"]
    model = message["models"][0]
    assert model["model_id"] == MODEL_ALIAS
    assert model["backend"] == "llamacpp"
    assert (model["input_per_1m"], model["output_per_1m"]) == (300000, 600000)
    assert model["formats"] == ["openai"]  # not the C++ server: no /props, so no /v1/messages
    assert "context_window" not in model  # the server reports none, so none is advertised


async def test_a_job_streams_through_the_agent_and_job_done_carries_usage(
    llamacpp_url: str, tmp_path: Path
) -> None:
    """The whole loop: an OpenAI client → the reference coordinator → the agent → the real
    server, tokens streamed back, and one job_done whose usage the agent had to estimate."""
    import aiohttp

    from provider_agent.dev.coordinator import DevCoordinator
    from provider_agent.link.protocol import JobDone
    from tests.agent_harness import agent_where, running_agent, write_config

    async with DevCoordinator(host="127.0.0.1", port=0) as coord:
        extra = f'[[backends]]\nkind = "llamacpp"\nurl = {json.dumps(llamacpp_url)}\n'
        cfg = write_config(tmp_path, coord.ws_url, extra=extra)
        async with running_agent(cfg):
            # Wait for the pass that follows auth_ok: llama-cpp-python's server interrupts a
            # stream in progress when any other request needing the model arrives (its
            # `interrupt_requests`, on by default), and a discovery probe is such a request.
            await agent_where(
                coord,
                lambda a: (
                    a.capabilities is not None
                    and a.capabilities.models
                    and a.capabilities_count >= 2
                ),
                timeout=30,
            )
            request = {k: v for k, v in STREAM_REQUEST.items() if k != "stream_options"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{coord.http_url}/v1/chat/completions", json=request) as response,
            ):
                assert response.status == 200
                body = await response.read()
            [record] = coord.finished.values()
    chunks = _chunks(body)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    # tokens from the real model came through (a random-weights model may decode to "")
    assert sum("content" in d for d in deltas) >= 1, record.terminal
    assert isinstance(record.terminal, JobDone)
    assert record.terminal.usage_source == "estimated"  # this server never reports usage
    assert record.terminal.tokens.output >= 1 and record.terminal.tokens.input >= 1
    assert record.terminal_count == 1
    coord.assert_no_violations()


# --- protocol.md §9: the learned limit comes down to the server's one-at-a-time ------------------

#: A longer answer than STREAM_REQUEST's, so a job waiting behind another waits for something.
LIMIT_REQUEST: dict[str, Any] = {
    **{k: v for k, v in STREAM_REQUEST.items() if k != "stream_options"},
    "max_tokens": 16,
}
CALM_JOBS = 6
BURST = 8
#: Bursts go on until a heartbeat shows the limit at the knee, at most this long, and then for
#: SETTLE_BEATS more heartbeats (one a second), each of which must show it there still.
CONVERGE_S = 12.0
SETTLE_BEATS = 3
KNEE = 2


def _route_limit(agent: Any) -> int | None:
    """The route's limit in the agent's last heartbeat (protocol.md §9: as last known good)."""
    beat = agent.last_heartbeat
    limits = [route.limit for route in (beat.backends or [])] if beat is not None else []
    return limits[0] if limits else None


@dataclass
class Settling:
    """What `_bursts_until_settled` saw."""

    #: The route's limit in the last heartbeat before the load (the ceiling: nothing learned).
    before: int | None
    #: (heartbeat count, the route's limit in it), once after each burst that a new one preceded.
    beats: list[tuple[int, int | None]] = field(default_factory=list)
    #: The first heartbeat count with the limit at most KNEE.
    settled_at: int | None = None
    #: Terminal frames of the burst jobs, by kind (`job_done` or the error code).
    outcomes: Counter[str] = field(default_factory=Counter)
    #: The capabilities' `max_concurrent` and `/status`' route `limit` at the end.
    advertised: int | None = None
    status_limit: int | None = None

    @property
    def settled(self) -> list[int | None]:
        """The limits from `settled_at` on."""
        at = self.settled_at
        return [limit for beat, limit in self.beats if at is not None and beat >= at]


async def _bursts_until_settled(backend_toml: str, tmp_path: Path) -> Settling:
    """An agent serving the real server: CALM_JOBS jobs one at a time (the unloaded baseline),
    then bursts of BURST jobs at once until a heartbeat shows the route's limit at most KNEE,
    and SETTLE_BEATS heartbeats more."""
    import anyio

    from provider_agent.dev.coordinator import DevCoordinator, JobRecord
    from provider_agent.link.protocol import JobDone, JobError
    from tests.agent_harness import agent_where, free_port, running_agent, write_config

    async def jobs(coord: DevCoordinator, pid: str, n: int) -> list[JobRecord]:
        records = [await coord.send_job(pid, MODEL_ALIAS, LIMIT_REQUEST) for _ in range(n)]
        await coord.wait_for(lambda _: all(r.terminal is not None for r in records), timeout=10)
        return records

    status_addr = f"127.0.0.1:{free_port()}"
    async with DevCoordinator(host="127.0.0.1", port=0) as coord:
        cfg = write_config(
            tmp_path,
            coord.ws_url,
            heartbeat_interval_s=1,
            prometheus_addr=status_addr,
            extra=backend_toml,
        )
        async with running_agent(cfg):
            # the pass that follows auth_ok is over (its probes would interrupt a stream), and
            # a heartbeat showed the route
            agent = await agent_where(
                coord,
                lambda a: (
                    a.capabilities is not None
                    and a.capabilities.models
                    and a.capabilities_count >= 2
                    and _route_limit(a) is not None
                ),
                timeout=30,
            )
            pid = agent.provider_id
            seen = Settling(before=_route_limit(agent))
            for _ in range(CALM_JOBS):
                [record] = await jobs(coord, pid, 1)
                assert isinstance(record.terminal, JobDone), record.terminal
            deadline = anyio.current_time() + CONVERGE_S
            while seen.settled_at is None or agent.heartbeat_count < seen.settled_at + SETTLE_BEATS:
                extra_s = 0 if seen.settled_at is None else SETTLE_BEATS + 1
                assert anyio.current_time() < deadline + extra_s, f"not settled: {seen}"
                for record in await jobs(coord, pid, BURST):
                    terminal = record.terminal
                    kind = terminal.error_code if isinstance(terminal, JobError) else "job_done"
                    seen.outcomes[kind] += 1
                if not seen.beats or seen.beats[-1][0] != agent.heartbeat_count:
                    seen.beats.append((agent.heartbeat_count, _route_limit(agent)))
                limit = seen.beats[-1][1]
                if seen.settled_at is None and limit is not None and limit <= KNEE:
                    seen.settled_at = agent.heartbeat_count
            assert agent.capabilities is not None
            [offer] = agent.capabilities.models
            seen.advertised = offer.max_concurrent
            status_code, body = await anyio.to_thread.run_sync(
                http_get, f"http://{status_addr}/status"
            )
            assert status_code == 200, body
            [model] = json.loads(body)["models"]
            [route] = model["routes"]
            seen.status_limit = route["limit"]
        coord.assert_no_violations()
    return seen


def _assert_settled_at_the_knee(seen: Settling) -> None:
    assert seen.before == 8, seen  # the ceiling: 8, from the config
    assert len(seen.settled) >= SETTLE_BEATS, seen
    assert all(limit is not None and limit <= KNEE for limit in seen.settled), seen
    # found by first bytes that came late, not by failures: jobs beyond the limit were refused
    # at once, the others done
    assert set(seen.outcomes) == {"job_done", "out_of_capacity"}, seen
    # moves of more than one are pushed at once: the 8 came down, to at most one above the knee
    assert seen.advertised is not None and seen.advertised <= KNEE + 1, seen
    # /status shows the same limit as the heartbeat (the last known good), never 0
    assert seen.status_limit is not None and 1 <= seen.status_limit <= KNEE, seen


async def test_the_learned_limit_comes_down_to_the_knee_as_llamacpp(
    llamacpp_url: str, tmp_path: Path
) -> None:
    """Kind llamacpp with the backend's own cap at 8: llama-cpp-python has no `/props`, so no
    slot count caps the route (ceiling 8), and its one-at-a-time serving is found by the
    controller: concurrent jobs queue inside the server and their first bytes come late."""
    backend = (
        f'[[backends]]\nkind = "llamacpp"\nurl = {json.dumps(llamacpp_url)}\nmax_concurrent = 8\n'
    )
    _assert_settled_at_the_knee(await _bursts_until_settled(backend, tmp_path))


async def test_the_learned_limit_comes_down_as_a_plain_openai_server(
    llamacpp_url: str, tmp_path: Path
) -> None:
    """The same server as an OpenAI-compatible backend whose `/props` nobody reads: kind
    lmstudio (health and models from `/v1/models`; kind vllm would leave it out, as its
    `/health` answers 404). Nothing but the times to first byte tells the controller, whose
    ceiling is the global `max_concurrent` (8)."""
    backend = f'[[backends]]\nkind = "lmstudio"\nurl = {json.dumps(llamacpp_url)}\n'
    _assert_settled_at_the_knee(await _bursts_until_settled(backend, tmp_path))
