"""The command line as an operator meets it: real processes, exit codes, stdout vs stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from provider_agent import __version__
from provider_agent.protocol import Capabilities

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "agent.toml.example"


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
    result = cli("discover", "--config", str(path), "--log-level", "debug", env={"OR_KEY": secret})
    assert result.returncode == 0
    assert secret not in result.stdout + result.stderr
