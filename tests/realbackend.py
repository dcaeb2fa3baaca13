"""A real llama.cpp backend for tests: llama-cpp-python's OpenAI-compatible server on loopback.

The server (`python -m llama_cpp.server`) serves the tiny random-weights GGUF of `tests.tiny_gguf`,
written into a temporary directory at test time. llama-cpp-python is compiled when the test
environment is installed (`scripts/install --dev`); when that failed, the tests that need it are
skipped with the reason — never silently.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_gguf import write_tiny_llama_gguf

MODEL_ALIAS = "tiny-llama"
N_CTX = 512
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
BUILD_LOG = ".venv/llama-cpp-build.log"


def require_llamacpp_server() -> None:
    """Skip the calling test when `llama_cpp.server` cannot be imported, saying why."""
    try:
        importlib.import_module("llama_cpp.server")
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        pytest.skip(
            f"llama-cpp-python[server] is not installed or not importable ({exc!r}): its build "
            f"failed or was skipped, see {BUILD_LOG} (scripts/install --dev builds it)"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; returns (status, body) for any HTTP status, raises only on transport errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[int, bytes]:
    """POST `body` as JSON; returns (status, raw response bytes) for any HTTP status."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _log_tail(log_path: Path, n: int = 40) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "\n".join(lines[-n:])


def _wait_until_ready(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"llama_cpp.server exited with {proc.returncode} before answering; its log:\n"
                + _log_tail(log_path)
            )
        with contextlib.suppress(OSError):
            status, _ = http_get(f"{base_url}/v1/models", timeout=2.0)
            if status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(
        f"llama_cpp.server did not answer GET /v1/models within {START_TIMEOUT_S:.0f} s; its log:\n"
        + _log_tail(log_path)
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def llamacpp_server(workdir: Path) -> Iterator[str]:
    """Write the tiny GGUF into `workdir`, serve it, yield the base URL (no `/v1`), stop it.

    Skips (pytest.skip) when llama-cpp-python's server is not importable.
    """
    require_llamacpp_server()
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = workdir / "tiny-llama.gguf"
    write_tiny_llama_gguf(model_path)
    log_path = workdir / "llama-cpp-server.log"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(N_CTX),
        "--n_threads",
        "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            _wait_until_ready(proc, base_url, log_path)
            yield base_url
        finally:
            _stop(proc)


def parse_sse(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE byte stream, in order (other fields and comments dropped)."""
    payloads = []
    for line in raw.decode().splitlines():
        if line.startswith("data:"):
            payloads.append(line[len("data:") :].strip())
    return payloads
