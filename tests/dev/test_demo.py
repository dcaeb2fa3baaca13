"""`provider-agent demo` as a person runs it: a real process, its stdout read as it comes."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from provider_agent.config.load import load
from provider_agent.dev.demo import BACKENDS, SHARED, agent_config, content_of

#: cli.md: the demo runs in under 30 s (here a generous bound; it takes a few seconds).
BUDGET_S = 30.0
#: The README's first set-up command, after `bash scripts/install`.
FIRST_COMMAND = "bash scripts/install && .venv/bin/provider-agent demo"
README = Path(__file__).resolve().parents[2] / "README.md"
#: The installed console script, as the README runs it (`python -m` outside a virtualenv).
SCRIPT = Path(sys.executable).with_name("provider-agent")
COMMAND = (
    [str(SCRIPT), "demo"] if SCRIPT.exists() else [sys.executable, "-m", "provider_agent", "demo"]
)


@dataclass
class Output:
    """What a process wrote to stdout, read by read (each read as it came)."""

    reads: list[bytes] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def text(self) -> str:
        return b"".join(self.reads).decode()

    def last_lines(self) -> list[bytes]:
        """After each read, the (maybe unfinished) last line of everything read so far."""
        seen = b""
        lines = []
        for chunk in self.reads:
            seen += chunk
            lines.append(seen.rsplit(b"\n", 1)[-1])
        return lines

    async def collect(self, process: Process) -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            self.reads.append(chunk)
            self.changed.set()
            self.changed = anyio.Event()

    async def wait_for(self, needle: str, timeout: float = BUDGET_S) -> None:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while needle not in self.text:
                await self.changed.wait()


async def run_demo(interrupt_after: str | None = None) -> tuple[int, str, str, Output, float]:
    """Run the demo; with `interrupt_after`, SIGINT once that text is on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_AGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    output = Output()
    async with await anyio.open_process(COMMAND, env=env) as process:
        async with anyio.create_task_group() as group:
            group.start_soon(output.collect, process)
            if interrupt_after is not None:
                await output.wait_for(interrupt_after)
                process.send_signal(signal.SIGINT)
            with anyio.fail_after(BUDGET_S * 2):
                code = await process.wait()
        assert process.stderr is not None
        err = b"".join([chunk async for chunk in process.stderr]).decode()
    return code, output.text, err, output, time.monotonic() - started


def state_dir_of(out: str) -> Path:
    found = re.search(r"\(state in (\S+)\)", out)
    assert found is not None, out
    return Path(found.group(1))


async def test_the_demo_shows_the_whole_loop_and_exits_0_within_its_budget() -> None:
    code, out, err, output, elapsed = await run_demo()
    assert code == 0, err
    assert elapsed < BUDGET_S
    assert "Traceback" not in err
    # the capabilities arrive: three models, the shared one with two routes
    assert re.search(r"capabilities arrived from prov_[0-9a-f]+:", out)
    assert re.search(rf"{re.escape(SHARED)} .* via sim-vllm, sim-ollama", out)
    # jobs stream through the coordinator's OpenAI front, the tokens printed as they come
    assert out.count("| Hello from the simulated backend.") == 4
    # at the end of some read, a job's line held its first tokens but not yet its last
    assert any(
        re.fullmatch(rb" +job \d .*\| Hello.*", last) and not last.endswith(b"backend.")
        for last in output.last_lines()
    ), output.reads
    assert "served by sim-vllm" in out and "served by sim-ollama" in out
    # a backend is killed: the shared model falls back, its own model is withdrawn
    assert "sim-vllm is killed" in out
    assert re.search(r"served by sim-ollama \(sim-vllm is down: the agent fell back", out)
    assert (
        "capabilities update: qwen-2.5-7b withdrawn; offered now: llama-3.1-8b, mistral-7b" in out
    )
    assert "HTTP 404" in out and "model_not_found" in out
    # a graceful stop and a summary with what the ledger says
    assert "it closed its session with 1001" in out
    assert "jobs sent: 5: 4 job_done, 0 job_error, 1 refused by the coordinator" in out
    assert re.search(r"TOTAL +4 +0 +\d+ +24 +0\.0000\d\d", out), out
    assert "contract problems the coordinator saw: none" in out
    # identity and state lived in a temporary directory, now gone
    assert not state_dir_of(out).exists()


async def test_sigint_mid_demo_stops_it_gracefully_and_exits_0() -> None:
    code, out, err, _, elapsed = await run_demo(interrupt_after="3. Jobs")
    assert code == 0, err
    assert elapsed < BUDGET_S
    assert "interrupted: stopping the agent" in out
    assert "it closed its session with 1001" in out
    assert "4. sim-vllm is killed" not in out  # the script did not go on
    assert "Traceback" not in err
    assert not state_dir_of(out).exists()


def test_a_closed_stdout_ends_the_demo_quietly() -> None:
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)
    started = time.monotonic()
    try:
        result = subprocess.run(
            COMMAND, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert time.monotonic() - started < BUDGET_S


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b'data: {"choices":[{"index":0,"delta":{"content":" from"}}]}\n', " from"),
        (b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n', None),
        (b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n', None),
        (b"data: [DONE]\n", None),
        (b": keepalive\n", None),
        (b"data: not json\n", None),
        (b"data: [1, 2]\n", None),
        (b'data: {"choices":[{"delta":{"content":7}}]}\n', None),
    ],
)
def test_content_of_reads_only_text_deltas(line: bytes, text: str | None) -> None:
    assert content_of(line) == text


def test_the_agent_config_it_writes_is_valid_and_keeps_state_in_its_directory(
    tmp_path: Path,
) -> None:
    urls = {name: f"http://127.0.0.1:{9000 + i}" for i, name in enumerate(BACKENDS)}
    path = tmp_path / "agent.toml"
    path.write_text(agent_config(tmp_path, "ws://127.0.0.1:1/provider/connect", urls))
    config = load(path, allow_insecure=True)
    assert config.state.dir == tmp_path / "state"
    assert config.identity.key_path == tmp_path / "identity.key"
    assert [b.label for b in config.backends] == list(BACKENDS)
    assert config.observability.prometheus_addr == ""  # the demo opens no metrics port


def test_the_readmes_first_command_is_install_then_demo() -> None:
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    first_block = quickstart.split("```sh\n", 1)[1]
    assert first_block.splitlines()[0] == FIRST_COMMAND
