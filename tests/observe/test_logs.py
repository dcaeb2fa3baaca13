"""Log set-up: one line per event, JSON when asked for, no secret at any level."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.observe import logs
from tests.agent_harness import agent_where, fake_vllm, running_agent, write_config


def test_json_format_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("debug", "json")
    logging.getLogger("provider_agent.test").info("pass done backends_ok=%d", 3)
    [line] = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["msg"] == "pass done backends_ok=3"
    assert entry["logger"] == "provider_agent.test" and entry["ts"].endswith("+00:00")


def test_text_format_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("warn", "text")
    log = logging.getLogger("provider_agent.test")
    log.info("hidden")
    log.warning("shown key=value")
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING provider_agent.test: shown key=value" in err
    logs.setup("trace", "text")
    assert logging.getLogger().level == logs.TRACE


class Collect(logging.Handler):
    """Every record that reaches the root logger's handlers, formatted as the agent would."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.levels.append(record.levelno)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("websockets").setLevel(logging.NOTSET)


@pytest.mark.parametrize("level", ["debug", "trace"])
@pytest.mark.usefixtures("restore_logging")
async def test_debug_logs_never_carry_the_enrollment_code(
    level: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = "POD-ENROLL-SECRET-7F3A9C"
    logs.setup(level, "text")
    collect = Collect()
    logging.getLogger().addHandler(collect)
    async with (
        DevCoordinator(host="127.0.0.1", port=0) as coord,
        fake_vllm("meta-llama/Llama-3.1-8B-Instruct") as backend,
    ):
        cfg = write_config(
            tmp_path, coord.ws_url, backend_urls=(backend.url,), enrollment_code=code
        )
        async with running_agent(cfg):
            agent = await agent_where(coord, lambda a: a.capabilities_count >= 1)
            assert agent.enrollment_code == code  # it was sent, over this very session
    out = capsys.readouterr()
    assert code not in out.err and code not in out.out
    assert not [line for line in collect.lines if code in line]
    assert logging.DEBUG in collect.levels  # the debug output was on
    assert logging.getLogger("websockets.client").getEffectiveLevel() == logging.INFO


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.usefixtures("restore_logging")
def test_no_raw_control_character_or_credential_reaches_a_log_line(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("debug", fmt)
    log = logging.getLogger("provider_agent.test")
    log.warning("reason=%s", "\x1b[2J\x1b[31mred\r\n12:00:00 INFO forged\x00\x07\u202e")
    log.info("dialing wss://user:hunter2@coord.example/provider/connect")
    try:
        raise ValueError("bad\x1b[0m\rvalue")
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "hunter2" not in err and "\x1b" not in err and "\r" not in err and "\x00" not in err
    assert all(line.isprintable() for line in lines)
    if fmt == "text":
        assert "reason=\\x1b[2J\\x1b[31mred\\r\\n12:00:00 INFO forged\\x00\\x07\\u202e" in err
        assert "dialing wss://coord.example/provider/connect" in err
        assert lines[-1] == "ValueError: bad\\x1b[0m\\rvalue"  # the traceback keeps its lines
    else:
        entries = [json.loads(line) for line in lines]
        assert len(entries) == 3 and "\\x1b" in entries[0]["msg"]
        assert entries[2]["exc"].splitlines()[-1] == "ValueError: bad\\x1b[0m\\rvalue"
        assert all(line.isprintable() for line in entries[2]["exc"].splitlines())
