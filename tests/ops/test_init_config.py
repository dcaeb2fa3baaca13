"""`provider-agent init`: fingerprinting real loopback imitations of each server, the rendered
file, and the writer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from provider_agent.backends.base import USER_AGENT
from provider_agent.config import load as config_load
from provider_agent.config.schema import PLACEHOLDER_COORDINATOR_URL
from provider_agent.errors import OutputError
from provider_agent.ops import init_config
from provider_agent.ops.init_config import (
    DEFAULT_PORTS,
    Detected,
    detect_local_backends,
    render_config,
    run_init,
    write_config,
)

Serve = Callable[[web.Application], Awaitable[int]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- imitations of the four servers ---------------------------------------------------------------


def _app(routes: dict[str, Handler], catch_all: Handler | None = None) -> web.Application:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    if catch_all is not None:
        app.router.add_route("*", "/{tail:.*}", catch_all)
    return app


def _json(body: Any, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    return handler


def _text(body: str, status: int = 200, content_type: str = "text/plain") -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body, status=status, content_type=content_type)

    return handler


def ollama_app() -> web.Application:
    return _app(
        {
            "/": _text("Ollama is running"),
            "/api/version": _json({"version": "0.12.6"}),
            "/api/tags": _json(
                {
                    "models": [
                        {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 1},
                        {"name": "qwen3:8b", "model": "qwen3:8b", "size": 2},
                    ]
                }
            ),
            "/v1/models": _json(
                {"object": "list", "data": [{"id": "llama3.2:latest", "owned_by": "library"}]}
            ),
        }
    )


async def _lmstudio_anything(request: web.Request) -> web.Response:
    # LM Studio answers 200 to any path; this body even looks healthy and versioned.
    return web.json_response(
        {
            "error": f"Unexpected endpoint or method. ({request.method} {request.path})",
            "status": "ok",
            "version": "0.3.30",
        }
    )


def lmstudio_app() -> web.Application:
    return _app(
        {
            "/api/v0/models": _json(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "qwen2.5-7b-instruct",
                            "object": "model",
                            "type": "llm",
                            "compatibility_type": "gguf",
                            "state": "loaded",
                            "max_context_length": 32768,
                        },
                        {
                            "id": "text-embedding-nomic-embed-text-v1.5",
                            "object": "model",
                            "type": "embeddings",
                            "compatibility_type": "gguf",
                            "state": "not-loaded",
                        },
                        {
                            "id": "gemma-3-4b",
                            "object": "model",
                            "type": "vlm",
                            "compatibility_type": "mlx",
                            "state": "not-loaded",
                        },
                    ],
                }
            ),
            "/v1/models": _json(
                {
                    "object": "list",
                    "data": [
                        {"id": "qwen2.5-7b-instruct", "owned_by": "llamacpp"},
                        {"id": "gemma-3-4b", "owned_by": "vllm"},
                    ],
                }
            ),
        },
        catch_all=_lmstudio_anything,
    )


def vllm_app(*, api_key: bool = False) -> web.Application:
    listing = _json(
        {
            "object": "list",
            "data": [
                {
                    "id": "meta-llama/Llama-3.1-8B-Instruct",
                    "object": "model",
                    "owned_by": "vllm",
                    "max_model_len": 32768,
                },
                {"id": "sql-lora", "object": "model", "owned_by": "vllm", "max_model_len": None},
            ],
        }
    )
    return _app(
        {
            "/health": _text("", content_type="application/octet-stream"),
            "/version": _json({"version": "0.11.0"}),
            "/v1/models": _json({"error": "Unauthorized"}, 401) if api_key else listing,
        },
        catch_all=_json({"detail": "Not Found"}, 404),
    )


def llamacpp_app(*, root_bytes: int = 2000, owned_by: str = "llamacpp") -> web.Application:
    return _app(
        {
            "/": _text("<!doctype html>" + "x" * root_bytes, content_type="text/html"),
            "/health": _json({"status": "ok"}),
            "/props": _json({"default_generation_settings": {"n_ctx": 16384}, "build_info": "b1"}),
            "/v1/models": _json(
                {
                    "models": [{"name": "qwen2.5-7b-instruct", "model": "qwen2.5-7b-instruct"}],
                    "object": "list",
                    "data": [
                        {
                            "id": "qwen2.5-7b-instruct",
                            "object": "model",
                            "owned_by": owned_by,
                            "meta": {"n_ctx": 16384, "n_ctx_train": 32768},
                        }
                    ],
                }
            ),
        },
        catch_all=_json({"error": {"code": 404, "message": "File Not Found"}}, 404),
    )


def llama_cpp_python_app() -> web.Application:
    """llama-cpp-python's server: an OpenAI listing owned by "me", no /health."""
    return _app(
        {"/v1/models": _json({"object": "list", "data": [{"id": "local-gguf", "owned_by": "me"}]})},
        catch_all=_json({"detail": "Not Found"}, 404),
    )


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port: int = runner.addresses[0][1]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting is refused, and nobody else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# --- fingerprinting -------------------------------------------------------------------------------


async def test_each_kind_on_its_own_port(serve: Serve, http: aiohttp.ClientSession) -> None:
    ports = {
        "vllm": await serve(vllm_app()),
        "llamacpp": await serve(llamacpp_app()),
        "lmstudio": await serve(lmstudio_app()),
        "ollama": await serve(ollama_app()),
    }
    found = await detect_local_backends(http, ports=ports)
    assert found == [
        Detected("vllm", url(ports["vllm"]), ["meta-llama/Llama-3.1-8B-Instruct", "sql-lora"]),
        Detected("llamacpp", url(ports["llamacpp"]), ["qwen2.5-7b-instruct"]),
        Detected("lmstudio", url(ports["lmstudio"]), ["qwen2.5-7b-instruct", "gemma-3-4b"]),
        Detected("ollama", url(ports["ollama"]), ["llama3.2:latest", "qwen3:8b"]),
    ]


@pytest.mark.parametrize("slot", ["vllm", "llamacpp", "lmstudio", "ollama"])
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (vllm_app, "vllm"),
        (llamacpp_app, "llamacpp"),
        (lmstudio_app, "lmstudio"),
        (ollama_app, "ollama"),
    ],
)
async def test_kind_found_by_answers_not_by_port(
    serve: Serve,
    http: aiohttp.ClientSession,
    refused_port: int,
    *,
    slot: str,
    make: Callable[[], web.Application],
    kind: str,
) -> None:
    """Whichever default port a server sits on, it is named by what it answers."""
    port = await serve(make())
    ports = dict.fromkeys(DEFAULT_PORTS, refused_port) | {slot: port}
    found = await detect_local_backends(http, ports=ports)
    assert [(d.kind, d.url) for d in found] == [(kind, url(port))]


async def test_lmstudio_answering_200_to_everything_is_lmstudio(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    """Its catch-all 200 {"status": "ok", "version": …} and a /v1/models with vllm/llamacpp
    owners must not make it look like anything else, on any port."""
    port = await serve(lmstudio_app())
    for slot in ("llamacpp", "vllm"):
        found = await detect_local_backends(http, ports={slot: port})
        assert [d.kind for d in found] == ["lmstudio"]


async def test_port_listed_twice_is_one_server(serve: Serve, http: aiohttp.ClientSession) -> None:
    port = await serve(ollama_app())
    found = await detect_local_backends(http, ports={"ollama": port, "vllm": port})
    assert [(d.kind, d.url) for d in found] == [("ollama", url(port))]
    assert config_load.parse(render_config(found)).backends[0].url == url(port)


async def test_lmstudio_without_models(serve: Serve, http: aiohttp.ClientSession) -> None:
    app = _app(
        {"/api/v0/models": _json({"object": "list", "data": []})},
        catch_all=_lmstudio_anything,
    )
    port = await serve(app)
    assert await detect_local_backends(http, ports={"llamacpp": port}) == [
        Detected("lmstudio", url(port), [])
    ]


async def test_bare_200_everywhere_is_nothing(serve: Serve, http: aiohttp.ClientSession) -> None:
    """A server answering 200 to every path without any fingerprint is not detected."""
    port = await serve(_app({}, catch_all=_text("ok")))
    json_port = await serve(_app({}, catch_all=_json({"status": "ok", "version": "1"})))
    ports = {"vllm": port, "lmstudio": json_port}
    assert await detect_local_backends(http, ports=ports) == []


async def test_vllm_with_api_key(serve: Serve, http: aiohttp.ClientSession) -> None:
    """/v1 is guarded (401) but /version is public: vLLM, models unknown."""
    port = await serve(vllm_app(api_key=True))
    assert await detect_local_backends(http, ports={"vllm": port}) == [
        Detected("vllm", url(port), [])
    ]


async def test_401_without_version_is_nothing(serve: Serve, http: aiohttp.ClientSession) -> None:
    port = await serve(_app({}, catch_all=_json({"error": "Unauthorized"}, 401)))
    assert await detect_local_backends(http, ports={"vllm": port}) == []


async def test_llamacpp_with_big_web_ui(serve: Serve, http: aiohttp.ClientSession) -> None:
    """llama.cpp serves its web UI at /: more than the cap we read there, and still found."""
    port = await serve(llamacpp_app(root_bytes=300_000))
    found = await detect_local_backends(http, ports={"vllm": port})
    assert [d.kind for d in found] == ["llamacpp"]


async def test_llamacpp_by_health_when_owner_unknown(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    """Not on the llama.cpp port and not owned_by llamacpp: /health {"status":"ok"} decides."""
    port = await serve(llamacpp_app(owned_by="someone"))
    assert await detect_local_backends(http, ports={"vllm": port}) == [
        Detected("llamacpp", url(port), ["qwen2.5-7b-instruct"])
    ]


async def test_llamacpp_loading(serve: Serve, http: aiohttp.ClientSession) -> None:
    loading = _json({"error": {"code": 503, "message": "Loading model", "type": "x"}}, 503)
    app = _app(
        {
            "/": loading,
            "/health": loading,
            "/v1/models": _json({"object": "list", "data": [{"id": "m.gguf", "owned_by": "x"}]}),
        }
    )
    port = await serve(app)
    assert await detect_local_backends(http, ports={"lmstudio": port}) == [
        Detected("llamacpp", url(port), ["m.gguf"])
    ]


async def test_llama_cpp_python_only_on_llamacpp_port(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    """An OpenAI listing with owned_by "me" and no /health: llama.cpp as a last resort, but only
    on llama.cpp's port."""
    port = await serve(llama_cpp_python_app())
    assert await detect_local_backends(http, ports={"llamacpp": port}) == [
        Detected("llamacpp", url(port), ["local-gguf"])
    ]
    assert await detect_local_backends(http, ports={"vllm": port}) == []


async def test_unrelated_server_is_nothing(serve: Serve, http: aiohttp.ClientSession) -> None:
    port = await serve(_app({"/": _text("<html>router admin</html>", content_type="text/html")}))
    garbage = await serve(_app({}, catch_all=_text("not json {", content_type="application/json")))
    ports = {"vllm": port, "llamacpp": garbage, "ollama": port}
    assert await detect_local_backends(http, ports=ports) == []


async def test_nothing_answering(http: aiohttp.ClientSession, refused_port: int) -> None:
    ports = dict.fromkeys(DEFAULT_PORTS, refused_port)
    assert await detect_local_backends(http, ports=ports) == []


async def test_silent_port_times_out(http: aiohttp.ClientSession) -> None:
    """A port that accepts connections but never answers costs one timeout, not a hang."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await detect_local_backends(http, ports={"vllm": port}, timeout_s=0.2) == []
        assert loop.time() - started < 5


async def test_ports_probed_concurrently(serve: Serve, http: aiohttp.ClientSession) -> None:
    """Each server answers GET / only once all four have been asked: a sequential prober would
    time out on the first and find nothing."""
    arrived = 0
    everyone = asyncio.Event()

    async def root(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        if arrived == 4:
            everyone.set()
        await everyone.wait()
        return web.Response(text="Ollama is running")

    ports = {kind: await serve(_app({"/": root})) for kind in DEFAULT_PORTS}
    found = await detect_local_backends(http, ports=ports, timeout_s=5)
    assert [d.url for d in found] == [url(ports[kind]) for kind in DEFAULT_PORTS]
    assert {d.kind for d in found} == {"ollama"}


async def test_probes_send_user_agent(serve: Serve, http: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def root(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent", ""))
        return web.Response(text="Ollama is running")

    port = await serve(_app({"/": root}))
    assert await detect_local_backends(http, ports={"ollama": port}) == [
        Detected("ollama", url(port), [])
    ]
    assert seen == [USER_AGENT]


async def test_ipv6_host_is_bracketed(http: aiohttp.ClientSession, refused_port: int) -> None:
    found = await detect_local_backends(http, host="::1", ports={"vllm": refused_port})
    assert found == []
    assert init_config._root_url("::1", 8000) == "http://[::1]:8000"
    assert init_config._root_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"


def test_default_ports() -> None:
    assert dict(DEFAULT_PORTS) == {
        "vllm": 8000,
        "llamacpp": 8080,
        "lmstudio": 1234,
        "ollama": 11434,
    }


# --- render_config --------------------------------------------------------------------------------

FOUR = [
    Detected("vllm", "http://127.0.0.1:8000", ["meta-llama/Llama-3.1-8B-Instruct"]),
    Detected("llamacpp", "http://127.0.0.1:8080", ["qwen2.5-7b-instruct"]),
    Detected("lmstudio", "http://127.0.0.1:1234", []),
    Detected("ollama", "http://127.0.0.1:11434", ["llama3.2:latest", "qwen3:8b"]),
]


def _comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


@pytest.mark.parametrize("count", [0, 1, 4])
def test_render_parses(count: int) -> None:
    detected = FOUR[:count]
    text = render_config(detected)
    cfg = config_load.parse(text)
    assert [(b.kind, b.url) for b in cfg.backends] == [(d.kind, d.url) for d in detected]
    assert all(b.models is None for b in cfg.backends)  # all models sold unless narrowed
    assert cfg.coordinator.url == PLACEHOLDER_COORDINATOR_URL
    assert cfg.pricing.default_input_per_1m > 0
    assert len(_comment_lines(text)) >= 25
    sections = ("coordinator", "identity", "discovery", "pricing", "limits", "telemetry", "ledger")
    for section in (*sections, "state"):
        assert f"\n[{section}]\n#" in text, section
    assert "\n[observability]\n#" in text
    assert text.count("\n[[backends]]\n") == count


def test_render_none_detected_hints() -> None:
    text = render_config([])
    assert "No local inference server answered" in text
    assert '# kind = "ollama"' in text
    assert "# [[backends]]" in text
    assert "[[backends]]\n" not in text.replace("# [[backends]]\n", "")


def test_render_lists_models_in_comments() -> None:
    text = render_config(FOUR[3:])
    assert '# models = ["llama3.2:latest", "qwen3:8b"]' in text
    assert "Ollama, found at http://127.0.0.1:11434, listing 2 model(s)." in text


def test_render_many_models_shortened() -> None:
    many = Detected("ollama", "http://127.0.0.1:11434", [f"m{i}" for i in range(25)])
    text = render_config([many])
    assert "(and 5 more)" in text
    assert '"m19"' in text
    assert '"m20"' not in text
    assert config_load.parse(text).backends[0].kind == "ollama"


def test_render_hostile_model_ids_stay_in_comments() -> None:
    """Model ids come from the network: none may end its comment line and add config."""
    ids = [
        'x"]\n[[backends]]\nkind = "vllm"\nurl = "http://evil:1"',
        "tab\tnul\x00esc\x1bdel\x7fcr\r",
        "'''\"\"\"",
    ]
    text = render_config([Detected("llamacpp", "http://127.0.0.1:8080", ids)])
    cfg = config_load.parse(text)
    assert [b.kind for b in cfg.backends] == ["llamacpp"]
    assert "\x00" not in text
    assert "\r" not in text


def test_render_custom_coordinator() -> None:
    text = render_config([], coordinator_url="wss://market.example.org/provider/connect")
    assert config_load.parse(text).coordinator.url == "wss://market.example.org/provider/connect"
    assert "CHANGE ME" not in text
    assert "CHANGE ME" in render_config([])


def test_render_is_pure() -> None:
    assert render_config(FOUR) == render_config(list(FOUR))


# --- write_config ---------------------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_new_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    old_umask = os.umask(0o027)
    try:
        write_config(path, "# hello\n", force=False)
    finally:
        os.umask(old_umask)
    assert path.read_text(encoding="utf-8") == "# hello\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda t: t / "nonexistent" / "dir" / "x.toml", "does not exist"),
        (lambda t: t / "missing" / "x.toml", "does not exist"),
        (lambda t: (t / "file").write_text("x") and t / "file" / "x.toml", "is not a directory"),
        (lambda t: (t / "d").mkdir() or t / "d", "is a directory"),
        (lambda t: Path(""), "is a directory"),
        (lambda t: Path("~no-such-user-h7/agent.toml"), "does not exist"),
    ],
    ids=["deep-missing", "missing", "parent-is-file", "output-is-dir", "dot", "unknown-user"],
)
@pytest.mark.parametrize("force", [False, True])
def test_write_refuses_a_place_it_would_have_to_invent(
    tmp_path: Path, make: Callable[[Path], Path], fragment: str, force: bool
) -> None:
    path = make(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError) as caught:
        write_config(path, "# hello\n", force=force)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no directory created


def test_write_refuses_existing_without_force(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("mine\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match="--force"):
        write_config(path, "new\n", force=False)
    assert path.read_text(encoding="utf-8") == "mine\n"
    assert _leftovers(tmp_path) == []


def test_write_refuses_dangling_symlink_without_force(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.symlink_to(tmp_path / "nowhere.toml")
    with pytest.raises(FileExistsError):
        write_config(path, "new\n", force=False)
    assert not (tmp_path / "nowhere.toml").exists()


def test_write_force_replaces(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("mine\n", encoding="utf-8")
    write_config(path, "new\n", force=True)
    assert path.read_text(encoding="utf-8") == "new\n"
    assert _leftovers(tmp_path) == []


def test_write_race_loses_without_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file appears between the check and the write: still not overwritten."""
    path = tmp_path / "agent.toml"
    real_link = os.link

    def link_after_someone_else(src: Any, dst: Any) -> None:
        Path(dst).write_text("theirs\n", encoding="utf-8")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_someone_else)
    with pytest.raises(FileExistsError):
        write_config(path, "ours\n", force=False)
    assert path.read_text(encoding="utf-8") == "theirs\n"
    assert _leftovers(tmp_path) == []


# --- run_init -------------------------------------------------------------------------------------


async def test_run_init_writes_loadable_file(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_port: int
) -> None:
    ports = dict.fromkeys(DEFAULT_PORTS, refused_port) | {
        "ollama": await serve(ollama_app()),
        "llamacpp": await serve(llamacpp_app()),
    }
    monkeypatch.setattr(init_config, "DEFAULT_PORTS", ports)
    output = tmp_path / "agent.toml"
    written, found = await run_init(output, force=False)
    assert written == output
    assert [d.kind for d in found] == ["llamacpp", "ollama"]
    cfg = config_load.load(output)
    assert [(b.kind, b.url) for b in cfg.backends] == [(d.kind, d.url) for d in found]

    with pytest.raises(FileExistsError):
        await run_init(output, force=False)
    monkeypatch.setattr(init_config, "DEFAULT_PORTS", dict.fromkeys(DEFAULT_PORTS, refused_port))
    _, found = await run_init(output, force=True)
    assert found == []
    assert config_load.load(output).backends == []


async def test_run_init_refuses_before_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "agent.toml"
    output.write_text("mine\n", encoding="utf-8")

    async def must_not_probe(*args: Any, **kwargs: Any) -> list[Detected]:
        raise AssertionError("probed although the file exists")

    monkeypatch.setattr(init_config, "detect_local_backends", must_not_probe)
    with pytest.raises(FileExistsError):
        await run_init(output, force=False)
    assert output.read_text(encoding="utf-8") == "mine\n"
