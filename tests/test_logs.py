"""Log set-up: one line per event, JSON when asked for."""

from __future__ import annotations

import json
import logging

import pytest

from provider_agent import logs


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
