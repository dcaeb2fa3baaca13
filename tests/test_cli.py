"""The command line as an operator meets it: real processes, exit codes, stdout vs stderr."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from provider_agent import __version__
from provider_agent.config.schema import MAX_PRICE, MAX_PRIORITY, MAX_TOKENS_PER_MINUTE
from provider_agent.link.protocol import Capabilities
from tests.signals import stop_and_time

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "agent.toml.example"
FIXTURES = ROOT / "tests" / "fixtures"


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "provider_agent", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def minimal_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[coordinator]\nurl = "wss://coord.example/provider/connect"\n'
        f'[identity]\nkey_path = "{tmp_path / "id" / "identity.key"}"\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 2\n" + extra
    )
    return path


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"provider-agent {__version__}"


def test_discover_json_on_the_example_is_an_empty_valid_capabilities_message(
    tmp_path: Path,
) -> None:
    # The example's backends are not running here, and its BYOK key is not set.
    result = cli("discover", "--json", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    message = Capabilities.model_validate_json(result.stdout)
    assert message.models == [] and message.metadata.status == "ready"
    assert result.stdout.count("\n") == 1  # exactly the message, nothing else on stdout
    assert "left out" in result.stderr


def test_discover_table_names_each_backend(tmp_path: Path) -> None:
    result = cli("--config", str(EXAMPLE), "discover")  # global option before the command
    assert result.returncode == 0
    assert "KIND" in result.stdout and "ollama" in result.stdout and "FAIL" in result.stdout
    assert "(no model advertised)" in result.stdout


def test_validate_prints_the_backend_count() -> None:
    result = cli("validate", "--config", str(EXAMPLE))
    assert result.returncode == 0 and result.stdout.strip().startswith("ok: ")
    assert "backend(s)" in result.stdout


@pytest.mark.parametrize("command", ["validate", "discover", "identity", "run"])
def test_config_errors_exit_78_with_one_line(tmp_path: Path, command: str) -> None:
    path = minimal_config(tmp_path, "[limits]\nmax_concurent = 3\n")
    result = cli(command, "--config", str(path))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("config error: ") and "limits.max_concurent" in lines[0]


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = cli("validate", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78 and "no such file" in result.stderr


def test_env_names_the_config_file(tmp_path: Path) -> None:
    path = minimal_config(tmp_path)
    result = cli("validate", env={"PROVIDER_AGENT_CONFIG": str(path)}, cwd=tmp_path)
    assert result.returncode == 0 and "ok: 0 backend(s)" in result.stdout
    assert "no [[backends]]" in result.stderr


def test_identity_is_created_then_stable(tmp_path: Path) -> None:
    path = minimal_config(tmp_path)
    first = cli("identity", "--config", str(path))
    second = cli("identity", "--config", str(path))
    assert first.returncode == 0 and first.stdout == second.stdout
    lines = first.stdout.splitlines()
    assert lines[0].startswith("public_key: ") and lines[1] == "provider_id: none"
    key_file = tmp_path / "id" / "identity.key"
    assert lines[2] == f"key_file: {key_file}"
    assert f"created a new key at {key_file}" in first.stderr
    assert "created" not in second.stderr


def test_identity_mismatch_exits_78(tmp_path: Path) -> None:
    path = minimal_config(tmp_path)
    cli("identity", "--config", str(path))
    key_file = tmp_path / "id" / "identity.key"
    document = json.loads(key_file.read_text())
    document["public_key"] = "AAAA" + document["public_key"][4:]
    key_file.write_text(json.dumps(document))
    result = cli("identity", "--config", str(path))
    assert result.returncode == 78 and "does not match" in result.stderr
    assert document["secret_key"] not in result.stderr + result.stdout


def test_init_writes_a_valid_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "agent.toml"
    first = cli("init", "--output", str(out))
    assert first.returncode == 0, first.stderr
    assert out.exists()
    check = cli("validate", "--config", str(out))
    assert check.returncode == 0, check.stderr
    again = cli("init", "--output", str(out))
    assert again.returncode == 1 and "--force" in again.stderr
    assert cli("init", "--output", str(out), "--force").returncode == 0


def test_api_key_never_reaches_output(tmp_path: Path) -> None:
    secret = "sk-or-v1-THIS-MUST-NOT-LEAK-0123456789"
    path = minimal_config(
        tmp_path,
        '[[backends]]\nkind = "openrouter"\napi_key_env = "OR_KEY"\nurl = "http://127.0.0.1:9/api/v1"\n',
    )
    result = cli(
        "discover",
        "--config",
        str(path),
        "--log-level",
        "debug",
        "--allow-insecure",
        env={"OR_KEY": secret},
    )
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr


# --- global options, anywhere ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "--version"],
        ["discover", "--json", "--version"],
        ["identity", "--version"],
        ["init", "--version"],
        ["run", "--version"],
        ["dev-coordinator", "--version"],
        ["--version", "validate"],
    ],
)
def test_version_works_before_or_after_the_command(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"provider-agent {__version__}"


@pytest.mark.parametrize("position", ["before", "after"])
def test_allow_insecure_and_log_level_work_after_the_command(tmp_path: Path, position: str) -> None:
    path = minimal_config(tmp_path).read_text().replace("wss://coord.example", "ws://127.0.0.1:9")
    (tmp_path / "ws.toml").write_text(path)
    options = ["--allow-insecure", "--log-level", "error", "--config", str(tmp_path / "ws.toml")]
    args = [*options, "validate"] if position == "before" else ["validate", *options]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert cli("validate", "--config", str(tmp_path / "ws.toml")).returncode == 78


# --- where the config is looked for --------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "discover", "identity", "run"])
def test_missing_config_names_every_searched_place(tmp_path: Path, command: str) -> None:
    result = cli(command, cwd=tmp_path, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 78
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("config error: agent.toml: no such file")
    assert str(tmp_path / "xdg" / "provider-agent" / "agent.toml") in line
    assert str(tmp_path / "agent.toml") in line
    assert "--config" in line and "PROVIDER_AGENT_CONFIG" in line


@pytest.mark.parametrize("command", ["validate", "discover", "identity", "run"])
@pytest.mark.parametrize("empty", ["", " "])
def test_empty_config_option_is_refused_not_searched(
    tmp_path: Path, command: str, empty: str
) -> None:
    minimal_config(tmp_path)  # ./agent.toml exists: an empty --config must not fall back to it
    result = cli(command, "--config", empty, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip() == "config error: --config: is empty: give the path of agent.toml"


# --- stdout: a closed pipe is quiet, a full disk one line ----------------------------------------

OUTPUT_COMMANDS = [
    ["validate"],
    ["discover"],
    ["discover", "--json"],
    ["identity"],
    ["--version"],
    ["--help"],
    ["validate", "--help"],
]


def _config_args(tmp_path: Path) -> list[str]:
    path = minimal_config(tmp_path, '[[backends]]\nkind = "vllm"\nurl = "http://127.0.0.1:9"\n')
    return ["--config", str(path)]


@pytest.mark.parametrize("command", OUTPUT_COMMANDS, ids=" ".join)
def test_closed_stdout_is_a_quiet_exit(tmp_path: Path, command: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "provider_agent", *command, *_config_args(tmp_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    for noise in ("Traceback", "Broken pipe", "BrokenPipe", "Exception ignored", "error:"):
        assert noise not in result.stderr


@pytest.mark.parametrize("command", [*OUTPUT_COMMANDS, ["init"]], ids=" ".join)
def test_full_disk_is_one_line_exit_1(tmp_path: Path, command: list[str]) -> None:
    args = ["--output", str(tmp_path / "new.toml")] if command == ["init"] else []
    if command != ["init"]:
        args = _config_args(tmp_path)
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "provider_agent", *command, *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: cannot write the output: No space left on device"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert sum("cannot write the output" in line for line in lines) == 1


# --- init --output -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("{t}/nonexistent/dir/x.toml", "does not exist"),
        ("{t}/file/x.toml", "is not a directory"),
        ("{t}", "is a directory"),
        ("", "--output is empty"),
    ],
)
def test_init_refuses_an_output_it_would_have_to_invent(
    tmp_path: Path, output: str, fragment: str
) -> None:
    (tmp_path / "file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    result = cli("init", "--output", output.format(t=tmp_path))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("init: ") and fragment in line
    assert sorted(tmp_path.rglob("*")) == before


def test_validate_warns_about_inits_placeholder_coordinator(tmp_path: Path) -> None:
    out = tmp_path / "agent.toml"
    assert cli("init", "--output", str(out)).returncode == 0
    result = cli("validate", "--config", str(out))
    assert result.returncode == 0 and result.stdout.startswith("ok: ")
    assert "coordinator.url is still a placeholder" in result.stderr
    real = minimal_config(tmp_path).read_text().replace("coord.example", "api.marketplace.net")
    out.write_text(real)
    assert "placeholder" not in cli("validate", "--config", str(out)).stderr


# --- identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_path",
    [
        "{t}/file/identity.key",
        "{t}/file/deeper/identity.key",
        "/dev/null/identity.key",
        "/sys/identity.key",
        "{t}/" + "n" * 300,
    ],
)
def test_identity_that_cannot_be_created_exits_78_with_one_line(
    tmp_path: Path, key_path: str
) -> None:
    (tmp_path / "file").write_text("x")
    path = minimal_config(tmp_path)
    text = path.read_text().replace(
        str(tmp_path / "id" / "identity.key"), key_path.format(t=tmp_path)
    )
    path.write_text(text)
    for command in ("identity", "run"):
        result = cli(command, "--config", str(path))
        assert result.returncode == 78, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("identity error: ") and "cannot" in line
        assert "Traceback" not in result.stderr and "Errno" not in line


def test_identity_with_unknown_version_exits_78(tmp_path: Path) -> None:
    path = minimal_config(tmp_path)
    assert cli("identity", "--config", str(path)).returncode == 0
    key_file = tmp_path / "id" / "identity.key"
    document = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({**document, "version": 9}))
    result = cli("identity", "--config", str(path))
    assert result.returncode == 78 and "version 9" in result.stderr
    assert document["secret_key"] not in result.stderr


# --- errors a person meets through the command line ----------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xef\xbb\xbf[coordinator]\n", "byte-order mark"),
        ("[coordinator]\n".encode("utf-16"), "UTF-16"),
        ('[operator]\ndisplay_name = "Café"\n'.encode("latin-1"), "not UTF-8"),
        (b"x = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'[coordinator]\nurl = "wss://a/b"\n[coordinator]\n', "duplicate table [coordinator]"),
        (b'coordinator = "wss://a/b"\n', "coordinator: must be a table"),
        (b'[coordinator]\nurl = "wss://host:99999"\n', "port"),
        (b'[coordinator]\nurl = "wss:// "\n', "spaces"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_config_errors_through_the_command_line(
    tmp_path: Path, content: bytes, fragment: str, command: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    result = cli(command, "--config", str(path))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {path}: ")
    assert fragment in lines[0]
    for python in ("Traceback", "instance of", "<class", "twice", "codec", "RecursionError"):
        assert python not in lines[0]


def test_byok_over_http_needs_allow_insecure_on_the_command_line(tmp_path: Path) -> None:
    path = minimal_config(
        tmp_path,
        '[[backends]]\nkind = "venice"\napi_key_env = "V_KEY"\nurl = "http://127.0.0.1:9/api/v1"\n',
    )
    refused = cli("validate", "--config", str(path))
    assert refused.returncode == 78
    assert "--allow-insecure" in refused.stderr and "https://" in refused.stderr
    assert cli("validate", "--config", str(path), "--allow-insecure").returncode == 0


# --- what validate accepts, discover runs --------------------------------------------------------


class _FakeBackends(BaseHTTPRequestHandler):
    """vLLM at / and OpenRouter at /api/v1, answering with the recorded fixtures."""

    ROUTES: ClassVar[dict[str, tuple[int, bytes]]] = {
        "/health": (200, b""),
        "/v1/models": (200, (FIXTURES / "vllm" / "models.json").read_bytes()),
        "/api/v1/key": (200, (FIXTURES / "openrouter" / "key.json").read_bytes()),
        "/api/v1/models": (200, (FIXTURES / "openrouter" / "models.json").read_bytes()),
    }

    def do_GET(self) -> None:
        status, body = self.ROUTES.get(self.path.split("?")[0], (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the agent's output, not the server's."""


@pytest.fixture
def fake_backends() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeBackends)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _extreme_config(tmp_path: Path, url: str, *, high: bool) -> Path:
    """Every number at the top (or the bottom) of its range, names at their longest."""
    price = MAX_PRICE if high else 1
    long_name = "n" * 256

    def pick(top: Any, bottom: Any) -> Any:
        return top if high else bottom

    text = f"""
[coordinator]
url = "wss://api.marketplace.net/provider/connect"
heartbeat_interval_s = {pick(300, 1)}
[identity]
key_path = "{tmp_path / "id.key"}"
[discovery]
interval_s = {pick(86400, 5)}
timeout_s = {pick(60, 1)}
[[backends]]
kind = "vllm"
url = "{url}"
name = "{pick(long_name, "v")}"
priority = {pick(MAX_PRIORITY, -MAX_PRIORITY)}
max_concurrent = {pick(256, 1)}
aliases = {{ "{VLLM_MODEL}" = "{pick("a" * 256, "a")}" }}
[[backends]]
kind = "openrouter"
url = "{url}/api/v1"
api_key_env = "H7_OR_KEY"
markup = {pick(10, 0)}
max_concurrent = {pick(256, 1)}
[pricing]
default_input_per_1m = {price}
default_output_per_1m = {price}
[pricing.models."{pick("a" * 256, "a")}"]
input_per_1m = {pick(MAX_PRICE, 0)}
output_per_1m = {pick(MAX_PRICE, 0)}
[limits]
max_concurrent = {pick(256, 1)}
max_tokens_per_minute = {pick(MAX_TOKENS_PER_MINUTE, 1)}
[telemetry]
gpu = "{pick("auto", "off")}"
[ledger]
keep_days = {pick(3650, 1)}
[state]
dir = "{pick("/" + "s" * 89, "/s")}"
drain_timeout_s = {pick(3600, 0)}
"""
    path = tmp_path / f"extreme-{pick('high', 'low')}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("high", [True, False], ids=["top-of-every-range", "bottom"])
def test_discover_json_runs_on_every_bound_extreme(
    tmp_path: Path, fake_backends: str, high: bool
) -> None:
    path = _extreme_config(tmp_path, fake_backends, high=high)
    args = ["--config", str(path), "--allow-insecure"]
    assert cli("validate", *args).returncode == 0
    result = cli("discover", "--json", *args, env={"H7_OR_KEY": "sk-test"})
    assert result.returncode == 0, result.stderr
    message = Capabilities.model_validate_json(result.stdout)
    offers = {offer.model_id: offer for offer in message.models}
    assert message.limits.max_concurrent_total == (256 if high else 1)
    assert message.limits.max_tokens_per_minute == (MAX_TOKENS_PER_MINUTE if high else 1)
    price = MAX_PRICE if high else 1
    assert (offers["sql-lora"].input_per_1m, offers["sql-lora"].output_per_1m) == (price, price)
    if high:
        assert offers["a" * 256].input_per_1m == MAX_PRICE
    else:  # priced 0 in [pricing.models]: dropped with a word, as config.md says
        assert "a" not in offers and "resolved price is 0" in result.stderr
    assert len({o.backend for o in message.models}) == 2, result.stderr  # openrouter too
    table = cli("discover", *args, env={"H7_OR_KEY": "sk-test"})
    assert table.returncode == 0 and "Traceback" not in table.stderr


# --- packaging -----------------------------------------------------------------------------------


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in requires)


# --- invalid arguments: exit 2, one line (cli.md, settled 2026-12-06) ----------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "--bogus"], "unrecognized arguments: --bogus"),
        (["earnings", "--by", "week"], "argument --by: invalid choice: 'week'"),
        (["pause", "--for"], "argument --for: expected one argument"),
        (["nonsense-command"], "invalid choice: 'nonsense-command'"),
        (["validate", "--x\x1b[2J"], "unrecognized arguments: --x\\x1b[2J"),
    ],
)
def test_an_invalid_argument_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert "\x1b" not in result.stderr and "usage:" not in result.stderr


# --- commands that never dial: a ws:// coordinator does not stop them ----------------------------


def test_local_commands_take_a_ws_coordinator_without_allow_insecure(tmp_path: Path) -> None:
    """cli.md (settled): status, earnings, pause and resume need only what they use; `run`,
    which dials, still refuses ws:// without --allow-insecure."""
    state = tmp_path / "state"
    path = minimal_config(
        tmp_path, f'[state]\ndir = "{state}"\n[observability]\nprometheus_addr = ""\n'
    )
    path.write_text(path.read_text().replace("wss://coord.example", "ws://127.0.0.1:9"))
    status = cli("status", "--config", str(path))
    assert status.returncode == 1 and "the HTTP endpoint is disabled" in status.stderr
    for command in ("pause", "resume"):
        result = cli(command, "--config", str(path))
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(f"{command}: no agent is running")
    earnings = cli("earnings", "--config", str(path))
    assert earnings.returncode == 78 and "no ledger at" in earnings.stderr  # looked, not refused
    for result in (status, earnings):
        assert "coordinator.url" not in result.stderr
    for command in ("run", "validate"):
        refused = cli(command, "--config", str(path))
        assert refused.returncode == 78 and "coordinator.url" in refused.stderr


# --- the state dir actually used -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "pause", "resume", "earnings", "run"])
def test_a_state_directory_too_long_for_the_socket_exits_78_naming_it(
    tmp_path: Path, command: str
) -> None:
    """config.md (settled): the 90-byte limit holds for $STATE_DIRECTORY too; `pause` used to
    say that no agent runs (the socket path did not fit) while one ran."""
    long = tmp_path / ("s" * max(1, 100 - len(str(tmp_path))))
    path = minimal_config(tmp_path)
    result = cli(command, "--config", str(path), env={"STATE_DIRECTORY": str(long)})
    assert result.returncode == 78
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("config error: ")
    assert "state.dir: $STATE_DIRECTORY" in line and str(long) in line and "at most 90" in line
    assert not long.exists()


def test_an_identity_file_that_is_a_fifo_is_one_line_and_exit_78_not_a_hang(
    tmp_path: Path,
) -> None:
    path = minimal_config(tmp_path)
    key = tmp_path / "id" / "identity.key"
    key.parent.mkdir()
    os.mkfifo(key)
    result = cli("identity", "--config", str(path))  # cli() times out after 60 s
    assert result.returncode == 78
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"identity error: {key}: ")
    assert "FIFO" in line and "not a regular file" in line


# --- discover and doctor stop on a signal, also while a backend never answers --------------------


class _BlackHole:
    """A loopback TCP server that accepts connections and never answers; `accepted` is set once
    something connected."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)
            self.accepted.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.fixture
def black_hole() -> Iterator[_BlackHole]:
    hole = _BlackHole()
    try:
        yield hole
    finally:
        hole.close()


#: `python -c` that starts ARGV with SIGINT ignored, as a script's `command &` does (bash ignores
#: SIGINT in the background jobs of a non-interactive shell); exec keeps the pid.
_SIGINT_IGNORED = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


@pytest.mark.parametrize("command", ["discover", "doctor"])
@pytest.mark.parametrize(
    "stop",
    [
        (signal.SIGINT, 130, "a terminal"),
        (signal.SIGINT, 130, "a script, in the background"),
        (signal.SIGTERM, 0, "a terminal"),
    ],
    ids=lambda stop: f"{stop[0].name}-from-{stop[2].split(',')[0].split()[-1]}",
)
def test_discover_and_doctor_stop_promptly_on_a_signal(
    tmp_path: Path, black_hole: _BlackHole, command: str, stop: tuple[signal.Signals, int, str]
) -> None:
    """cli.md (settled): within a second, exit 130 for SIGINT and 0 for SIGTERM — even while a
    backend (and, for doctor, the coordinator) accepts the connection and never answers, with
    20 s allowed per backend. SIGINT used to be ignored for that long when the command was
    started in the background of a script, SIGTERM to kill it (143); `run` stops on both
    however it was started, and so do these."""
    signum, code, started_by = stop
    url = f"http://127.0.0.1:{black_hole.port}"
    path = minimal_config(
        tmp_path, f'[discovery]\ntimeout_s = 20\n[[backends]]\nkind = "vllm"\nurl = "{url}"\n'
    )
    path.write_text(
        path.read_text().replace("wss://coord.example", f"ws://127.0.0.1:{black_hole.port}")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT_")}
    args = [command, "--config", str(path), "--allow-insecure"]
    python = [sys.executable]
    if started_by == "a script, in the background":
        python = [sys.executable, "-c", _SIGINT_IGNORED]
    process = subprocess.Popen(
        [*python, "-m", "provider_agent", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if not black_hole.accepted.wait(30):
        stop_and_time(process, signal.SIGKILL)
        pytest.fail("the command never reached the backend")
    err, elapsed = stop_and_time(process, signum)
    assert process.returncode == code, err
    assert elapsed < 3.0, f"{command} took {elapsed:.1f}s to stop"
    assert "Traceback" not in err
