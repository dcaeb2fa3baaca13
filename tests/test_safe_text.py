"""Foreign text: which model ids are acceptable, and how text from outside is shown."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider_agent.safe_text import MODEL_ID_MAX_CHARS, model_id_problem, printable

HOSTILE_IDS = {
    "": "empty",
    " ": "only whitespace",
    "   ": "only whitespace",
    "llama\n3": "with control characters",
    "llama\x00": "with control characters",
    "\x1b[31mred\x1b[0m": "with control characters",
    "carriage\rreturn": "with control characters",
    "tab\there": "with control characters",
    "del\x7f": "with control characters",
    "c1\x9b31m": "with control characters",
    "x" * 100_000: f"over {MODEL_ID_MAX_CHARS} characters",
    "x" * (MODEL_ID_MAX_CHARS + 1): f"over {MODEL_ID_MAX_CHARS} characters",
    "rtl\u202eevil": "with unprintable characters",
    "zero\u200bwidth": "with unprintable characters",
    "line\u2028sep": "with unprintable characters",
}

VALID_IDS = [
    "llama3.1:8b",
    "meta-llama/Llama-3.1-70B-Instruct",
    "x",
    "x" * MODEL_ID_MAX_CHARS,
    "qwen2.5 7b",  # inner spaces are printable
    " leading-space",
    "模型-7b",
    "mistral-é-ü",
    "модель",
    "emoji-🦙",
]


@pytest.mark.parametrize(("value", "why"), HOSTILE_IDS.items(), ids=lambda v: printable(v, 24))
def test_hostile_model_ids_are_refused_with_the_reason(value: str, why: str) -> None:
    assert model_id_problem(value) == why


@pytest.mark.parametrize("value", VALID_IDS)
def test_valid_model_ids_including_unicode_are_accepted(value: str) -> None:
    assert model_id_problem(value) is None


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("a\r\nforged INFO line", "a\\r\\nforged INFO line"),
        ("nul\x00byte", "nul\\x00byte"),
        ("bell\x07", "bell\\x07"),
        ("c1\x9b", "c1\\x9b"),
        ("rtl\u202eoverride", "rtl\\u202eoverride"),
        ("non-char\U000e0001", "non-char\\U000e0001"),
        ("模型 é", "模型 é"),
        ("C:\\path\\n", "C:\\path\\n"),  # backslashes stay as they are
        ("http://admin:s3cret@10.0.0.5:8000", "http://10.0.0.5:8000"),
        ("vllm:https://user@h:1/x", "vllm:https://h:1/x"),
        ("to http://a:b@c@d/e and ws://u:p@q", "to http://d/e and ws://q"),
        ("mail me@example.com", "mail me@example.com"),  # not a URL: left alone
    ],
)
def test_printable_escapes_control_chars_and_credentials(raw: str, shown: str) -> None:
    assert printable(raw) == shown


@pytest.mark.parametrize("size", [201, 1000, 100_000])
def test_printable_cuts_long_text_and_says_how_much(size: int) -> None:
    shown = printable("y" * size, 200)
    assert len(shown) <= 200
    assert shown.startswith("y" * 150) and shown.endswith(" chars)")
    kept = shown.count("y")
    assert shown.endswith(f"…(+{size - kept} chars)")


def test_printable_cut_counts_escapes_against_the_limit() -> None:
    shown = printable("\x1b" * 500, 100)
    assert len(shown) <= 100 and "\x1b" not in shown
    assert shown.startswith("\\x1b\\x1b") and shown.endswith("chars)")


def test_printable_takes_any_object() -> None:
    assert printable(ValueError("bad\nthing")) == "bad\\nthing"
    assert printable(None) == "None"


@given(st.text(max_size=400), st.integers(30, 300))
def test_printable_is_safe_bounded_and_idempotent(text: str, limit: int) -> None:
    shown = printable(text, limit)
    assert shown.isprintable()
    assert len(shown) <= limit
    assert printable(shown, limit) == shown


def test_the_pure_catalog_does_not_load_the_http_stack() -> None:
    code = (
        "import sys, provider_agent.discovery.catalog, provider_agent.safe_text;"
        "import provider_agent.discovery.listing;"
        "assert 'aiohttp' not in sys.modules, 'aiohttp loaded'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_old_imports_from_backends_base_keep_working() -> None:
    from provider_agent.backends import base
    from provider_agent.discovery import listing

    assert base.ModelInfo is listing.ModelInfo
    assert base.UpstreamPrice is listing.UpstreamPrice
    assert base.Health is listing.Health


def test_printable_without_a_limit_escapes_but_never_cuts() -> None:
    assert printable("a\x1b" * 1000, None) == "a\\x1b" * 1000
    assert printable("z" * 100_000, None) == "z" * 100_000
