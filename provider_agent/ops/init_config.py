"""`provider-agent init`: find the local inference servers and write a commented agent.toml.

Detection probes the four default ports at once and fingerprints whatever answers by what it says,
not by the port it is on (llama.cpp may well listen on vLLM's 8000). The fingerprints (backend-apis
reference §0), tried in this order on each port:

    GET /                 "Ollama is running"                                  ⇒ ollama
    GET /api/v0/models    entries with `state`/`compatibility_type`            ⇒ lmstudio
                          (LM Studio answers 200 to unknown paths: a bare 200 proves nothing)
    GET /v1/models        entries `owned_by: "vllm"`, or `GET /version` →
                          {"version": …} while /v1 wants an API key           ⇒ vllm
    GET /v1/models        entries `owned_by: "llamacpp"`, or an OpenAI listing
                          with `GET /health` → {"status": "ok"} (or 503 while
                          loading), or any OpenAI listing on the llama.cpp
                          port (llama-cpp-python: `owned_by: "me"`, no /health) ⇒ llamacpp

A port where nothing answers GET / at the HTTP level holds no server. Every request has a timeout
and a capped read, and nothing here raises for a backend's sake: an odd answer is "not detected".

The other steps of setting up are here too: `validate` (the file written, once edited) and
`identity` (the key that names this provider).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import aiohttp
import anyio
import orjson
import tomlkit
from tomlkit.items import AoT, Table

from provider_agent.backends.base import (
    LISTING_CAP_BYTES,
    USER_AGENT,
    new_http_session,
    read_capped,
)
from provider_agent.config import load as config_load
from provider_agent.config.schema import PLACEHOLDER_COORDINATOR_URL, BackendKind, Config
from provider_agent.errors import BackendError, ExitCode, OutputError
from provider_agent.store.atomic import write_atomic

#: The default port of each local kind, probed in this order (also the order of the results).
DEFAULT_PORTS: Final[Mapping[str, int]] = MappingProxyType(
    {"vllm": 8000, "llamacpp": 8080, "lmstudio": 1234, "ollama": 11434}
)
#: Body cap for `GET /`: llama.cpp serves its web UI there, which is no business of ours.
_ROOT_CAP = 64 * 1024
#: How many of a backend's models the generated file lists in a comment.
_MODELS_SHOWN = 20
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_KIND_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {"vllm": "vLLM", "llamacpp": "llama.cpp", "lmstudio": "LM Studio", "ollama": "Ollama"}
)


@dataclass(frozen=True)
class Detected:
    """A local inference server that answered: what it is, its root URL, the models it lists."""

    kind: BackendKind
    url: str
    models: list[str] = field(default_factory=list)


# --- detection ------------------------------------------------------------------------------------


async def detect_local_backends(
    http: aiohttp.ClientSession,
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    timeout_s: float = 2,
) -> list[Detected]:
    """Probe `ports` (kind → port; default the four default ports) on `host` concurrently and
    return what answered, in the order of `ports`. The kind names only say which port is
    llama.cpp's (for its last-resort fingerprint); what a port runs is read from its answers."""
    probes = list((DEFAULT_PORTS if ports is None else ports).items())
    found: list[Detected | None] = [None] * len(probes)
    # A port can cost a handful of sequential requests; bound the whole port, not just each one.
    budget = timeout_s * 6

    async def probe(index: int, default_kind: str, port: int) -> None:
        with anyio.move_on_after(budget):
            found[index] = await _fingerprint(
                _Port(http, _root_url(host, port), timeout_s), default_kind
            )

    async with anyio.create_task_group() as group:
        for index, (default_kind, port) in enumerate(probes):
            group.start_soon(probe, index, default_kind, port)
    unique: dict[str, Detected] = {}  # a port listed twice is one server
    for detected in found:
        if detected is not None:
            unique.setdefault(detected.url, detected)
    return list(unique.values())


def _root_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}"


class _Port:
    """GETs against one server root: (status, body), or None when there was no HTTP answer."""

    def __init__(self, http: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
        self.http = http
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get(self, path: str, cap: int = LISTING_CAP_BYTES) -> tuple[int, bytes] | None:
        try:
            async with self.http.get(
                self.url + path,
                headers={"User-Agent": USER_AGENT},
                timeout=self.timeout,
                allow_redirects=False,
            ) as response:
                try:
                    return response.status, await read_capped(response, cap)
                except BackendError:  # too big: it answered, but not with anything we want
                    return response.status, b""
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def get_json(self, path: str) -> tuple[int, Any] | None:
        """(status, parsed JSON), or (status, None) when the body is not JSON."""
        reply = await self.get(path)
        if reply is None:
            return None
        status, body = reply
        try:
            return status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return status, None


async def _fingerprint(port: _Port, default_kind: str) -> Detected | None:
    root = await port.get("/", cap=_ROOT_CAP)
    if root is None:
        return None
    if root[0] == 200 and root[1].lstrip().startswith(b"Ollama is running"):
        return Detected("ollama", port.url, await _ollama_models(port))

    lmstudio = await port.get_json("/api/v0/models")
    if lmstudio is not None and lmstudio[0] == 200 and _is_lmstudio_listing(lmstudio[1]):
        return Detected("lmstudio", port.url, _lmstudio_models(lmstudio[1]))

    v1 = await port.get_json("/v1/models")
    listing = _openai_listing(v1[1]) if v1 is not None and v1[0] == 200 else None
    owners = {entry.get("owned_by") for entry in listing or []}
    if "vllm" in owners:
        return Detected("vllm", port.url, _ids(listing))
    if v1 is not None and v1[0] in (401, 403) and await _has_vllm_version(port):
        return Detected("vllm", port.url, [])  # started with --api-key: /v1 is guarded
    if listing is None:
        return None
    if "llamacpp" in owners or default_kind == "llamacpp" or await _llamacpp_health(port):
        return Detected("llamacpp", port.url, _ids(listing))
    return None


async def _ollama_models(port: _Port) -> list[str]:
    reply = await port.get_json("/api/tags")
    if reply is None or reply[0] != 200 or not isinstance(reply[1], dict):
        return []
    models = reply[1].get("models")
    if not isinstance(models, list):
        return []
    names = [m.get("name") or m.get("model") for m in models if isinstance(m, dict)]
    return [name for name in names if isinstance(name, str) and name]


def _is_lmstudio_listing(body: Any) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return False
    entries = [e for e in body["data"] if isinstance(e, dict)]
    if any("state" in e or "compatibility_type" in e for e in entries):
        return True
    # LM Studio with nothing downloaded: only it serves this path, as an empty OpenAI-ish list.
    return body["data"] == [] and body.get("object") == "list"


def _lmstudio_models(body: Any) -> list[str]:
    return [
        entry["id"]
        for entry in body["data"]
        if isinstance(entry, dict)
        and isinstance(entry.get("id"), str)
        and entry.get("type", "llm") in ("llm", "vlm")
    ]


def _openai_listing(body: Any) -> list[dict[str, Any]] | None:
    """The `data` entries of an OpenAI `/v1/models` answer, or None when it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    return [e for e in body["data"] if isinstance(e, dict) and isinstance(e.get("id"), str)]


def _ids(listing: list[dict[str, Any]] | None) -> list[str]:
    return [str(entry["id"]) for entry in listing or []]


async def _has_vllm_version(port: _Port) -> bool:
    reply = await port.get_json("/version")
    return (
        reply is not None
        and reply[0] == 200
        and isinstance(reply[1], dict)
        and isinstance(reply[1].get("version"), str)
    )


async def _llamacpp_health(port: _Port) -> bool:
    """`{"status": "ok"}`, or llama.cpp's own 503 while it loads the model."""
    reply = await port.get_json("/health")
    if reply is None or not isinstance(reply[1], dict):
        return False
    status, body = reply
    if status == 200:
        return bool(body.get("status") == "ok")
    error = body.get("error")
    return (
        status == 503 and isinstance(error, dict) and bool(error.get("message") == "Loading model")
    )


# --- the file -------------------------------------------------------------------------------------

_HEADER = """\
provider-agent configuration, written by `provider-agent init`.

Check it with `provider-agent validate`; every key, its default and range is described in
agent.toml.example. Unknown keys are errors. `~` is expanded in paths."""

_OPERATOR = """\
[operator]                        # optional, metadata only
display_name  = "my-rtx-4090"
wallet        = "<Solana base58 address, 32-44 characters>"
contact_email = "ops@example.com\""""

_NO_BACKENDS = """\
No local inference server answered on the default ports (vLLM 8000, llama.cpp 8080,
LM Studio 1234, Ollama 11434). Start one and run `provider-agent init --force` again, or add
it by hand (`url` is the server root, without /v1):

[[backends]]
kind = "ollama"                   # vllm | llamacpp | lmstudio | ollama
url  = "http://127.0.0.1:11434\""""

_BYOK = """\
Resell a bring-your-own-key provider at its list price plus a markup (the key itself stays in
the environment variable named by api_key_env, or in $CREDENTIALS_DIRECTORY/<api_key_env>):

[[backends]]
kind        = "openrouter"        # or "venice"
api_key_env = "OPENROUTER_API_KEY"
markup      = 0.10                # price = upstream × (1 + markup), range 0–10
models      = ["meta-llama/llama-3.3-70b-instruct"]   # optional allow-list"""

_BACKEND_KEYS = """\
Optional per backend: models = [...] (allow-list of native ids), name, priority (lower wins),
aliases = { "native-id" = "advertised-id" }, formats = ["openai", "anthropic"],
max_concurrent (1-256), api_key_env (Bearer token for a server started with an API key)."""


def render_config(
    detected: Sequence[Detected], coordinator_url: str = PLACEHOLDER_COORDINATOR_URL
) -> str:
    """A commented, valid agent.toml with `detected` as its [[backends]]. Pure: no I/O."""
    doc = tomlkit.document()
    _comments(doc, _HEADER + "\n\n" + _OPERATOR)
    doc.add(tomlkit.nl())
    change_me = "CHANGE ME" if coordinator_url == PLACEHOLDER_COORDINATOR_URL else ""
    doc.add(
        "coordinator",
        _table(
            "The marketplace coordinator: wss:// only (ws:// needs --allow-insecure).",
            ("url", coordinator_url, change_me),
            ("heartbeat_interval_s", 15, "seconds, 1-300"),
            after="One-time enrollment code; $PROVIDER_AGENT_ENROLLMENT_CODE wins over it.\n"
            'enrollment_code = "POD-ENROLL-<code from the marketplace>"',
        ),
    )
    doc.add(
        "identity",
        _table(
            "The identity key, created 0600 on first run. Default: $STATE_DIRECTORY/identity.key\n"
            "under systemd, else:\n"
            'key_path = "~/.provider-agent/identity.key"'
        ),
    )
    doc.add(
        "discovery",
        _table(
            "How often the backends are asked what they serve.",
            ("interval_s", 300, "seconds between passes, 5-86400"),
            ("timeout_s", 5, "per-backend budget for one pass, 1-60"),
        ),
    )
    doc.add(tomlkit.nl())

    if detected:
        _comments(doc, "Local inference servers found by `provider-agent init`.\n" + _BACKEND_KEYS)
        backends = AoT([])
        for backend in detected:
            backends.append(_backend_table(backend))
        doc.add("backends", backends)
    else:
        _comments(doc, _NO_BACKENDS + "\n\n" + _BACKEND_KEYS)
    doc.add(tomlkit.nl())
    _comments(doc, _BYOK)
    doc.add(tomlkit.nl())

    doc.add(
        "pricing",
        _table(
            "Prices in USDC micro-units (1 USDC = 1 000 000) per 1M tokens; defaults must be > 0.\n"
            "Local models use [pricing.models] when listed there, else these defaults.",
            ("default_input_per_1m", 300000, ""),
            ("default_output_per_1m", 600000, ""),
            after="\nPer model, keyed by the advertised id (after aliases):\n"
            '[pricing.models."meta-llama/Llama-3.1-70B-Instruct"]\n'
            "input_per_1m  = 400000\n"
            "output_per_1m = 800000",
        ),
    )
    doc.add(
        "limits",
        _table(
            "Jobs in flight at once across all backends, 1-256.",
            ("max_concurrent", 8, ""),
            after="Tokens per minute across all jobs; absent = unlimited.\n"
            "max_tokens_per_minute = 2_000_000",
        ),
    )
    doc.add(
        "observability",
        _table(
            'HTTP endpoint for /metrics, /healthz, /readyz, /status, as "HOST:PORT"; "" disables.',
            ("prometheus_addr", "127.0.0.1:9821", ""),
            ("log_level", "info", "error | warn | info | debug | trace"),
            ("log_format", "text", "text | json"),
        ),
    )
    doc.add(
        "telemetry",
        _table(
            "GPU telemetry: auto reads NVML when present (silently absent otherwise).",
            ("gpu", "auto", "auto | off"),
        ),
    )
    doc.add(
        "ledger",
        _table(
            "The local earnings record (`provider-agent earnings`).",
            ("keep_days", 400, "older rows are pruned, 1-3650"),
        ),
    )
    doc.add(
        "state",
        _table(
            "Outbox, ledger and control socket; $STATE_DIRECTORY (systemd) wins; at most 90\n"
            'bytes. Default: dir = "~/.local/state/provider-agent"',
            ("drain_timeout_s", 60, "SIGTERM waits this long for jobs in flight, 0-3600"),
        ),
    )
    return tomlkit.dumps(doc)


def _backend_table(backend: Detected) -> Table:
    table = tomlkit.table()
    name = _KIND_NAMES.get(backend.kind, backend.kind)
    count = len(backend.models)
    listed = f"listing {count} model(s)" if count else "listing no models yet"
    _comments(table, f"{name}, found at {backend.url}, {listed}.")
    table.add("kind", backend.kind)
    table.add("url", backend.url)
    if backend.models:
        shown = tomlkit.array()
        shown.extend(backend.models[:_MODELS_SHOWN])
        more = f" (and {count - _MODELS_SHOWN} more)" if count > _MODELS_SHOWN else ""
        # The ids come from the server: tomlkit quotes and escapes them, so none can break out
        # of the comment line.
        _comments(table, f"To sell only some of them{more}:\nmodels = {shown.as_string()}")
    return table


def _table(comment: str, *keys: tuple[str, Any, str], after: str = "") -> Table:
    """A table: its comment, then (key, value, end-of-line note) entries, then `after` lines."""
    table = tomlkit.table()
    _comments(table, comment)
    for key, value, note in keys:
        table.add(key, value)
        if note:
            table[key].comment(note)
    if after:
        _comments(table, after)
    return table


def _comments(container: Any, text: str) -> None:
    """Add `text` as comment lines, one per line; control characters (which TOML forbids in a
    comment, and which could end it) become "?"."""
    for line in text.split("\n"):
        clean = _CONTROL.sub("?", line).rstrip()
        container.add(tomlkit.comment(clean) if clean else tomlkit.nl())


# --- writing --------------------------------------------------------------------------------------


def _writable_target(path: Path, force: bool) -> Path:
    """Check `--output` before any probing: its directory exists (created parents would hide a
    typo), it is not a directory, and without `force` nothing is there yet (FileExistsError)."""
    try:
        path = path.expanduser()
    except RuntimeError:
        raise OutputError(f"{path}: ~user names a user that does not exist") from None
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"{path}: the directory {parent} {what} (create it first)")
    if path.is_dir():
        raise OutputError(f"{path} is a directory: name the file to write, e.g. {path}/agent.toml")
    if not force and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} exists (use --force to overwrite it)")
    return path


def write_config(path: Path, text: str, force: bool) -> None:
    """Write `text` to `path` atomically. Without `force` an existing file is never replaced:
    FileExistsError. The file gets the usual mode of a new file (0o666 less the umask)."""
    path = _writable_target(path, force)
    try:
        write_atomic(path, text.encode(), mode=None, replace=force)
    except FileExistsError:
        raise FileExistsError(f"{path} exists (use --force to overwrite it)") from None


# --- the commands ---------------------------------------------------------------------------------


async def run_init(output: Path, force: bool) -> tuple[Path, list[Detected]]:
    """`provider-agent init`: probe, render, check, write. Returns the path written and what was
    found. FileExistsError (before any probing) when `output` exists and `force` is off."""
    output = await anyio.to_thread.run_sync(_writable_target, output, force)
    async with new_http_session(8) as http:
        detected = await detect_local_backends(http)
    text = render_config(detected)
    config_load.parse(text, file=str(output))  # what we write must be what `validate` accepts
    await anyio.to_thread.run_sync(write_config, output, text, force)
    return output, detected


def init_command(output_option: str, force: bool) -> int:
    """`provider-agent init`: 0, the file written; 1 when it cannot be (one line saying why)."""
    if not output_option.strip():
        print("init: --output is empty: give the path of the file to write", file=sys.stderr)
        return ExitCode.FAILURE
    output = Path(output_option)
    try:
        path, detected = anyio.run(run_init, output, force)
    except OutputError as exc:
        print(f"init: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except FileExistsError:
        print(f"init: {output} exists; pass --force to overwrite it", file=sys.stderr)
        return ExitCode.FAILURE
    except OSError as exc:
        print(f"init: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.FAILURE
    found = ", ".join(f"{d.kind} at {d.url}" for d in detected) or "no local backend"
    print(f"wrote {path} ({found}); edit [coordinator] url and [pricing], then `validate`")
    return ExitCode.OK


def validate_command(config: Config) -> int:
    """`provider-agent validate`, once the file loaded: `ok: <n> backend(s)`, warnings on stderr."""
    if not config.backends:
        print("warning: no [[backends]] configured: nothing will be offered", file=sys.stderr)
    if config.coordinator.is_placeholder:
        print(
            "warning: coordinator.url is still a placeholder (a host reserved for examples, like "
            "the `# CHANGE ME` one `init` writes): set the marketplace's wss:// address",
            file=sys.stderr,
        )
    print(f"ok: {len(config.backends)} backend(s)")
    return ExitCode.OK


def identity_command(config: Config) -> int:
    """`provider-agent identity`: load the identity key, or create it, and print it."""
    from provider_agent.link.identity import load_or_create

    identity = load_or_create(config.identity.key_path)
    if identity.created:
        print(
            f"identity: created a new key at {identity.path} (mode 0600); back it up: "
            "it is this provider's identity",
            file=sys.stderr,
        )
    print(f"public_key: {identity.public_key_b64}")
    print(f"provider_id: {identity.provider_id or 'none'}")
    print(f"key_file: {identity.path}")
    return ExitCode.OK
