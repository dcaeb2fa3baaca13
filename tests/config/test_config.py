"""agent.toml: every rule of the contract, one failing example each, plus defaults and paths.

The failing cases are a table: (TOML text, expected key path, fragments the message must hold).
Every error must be one line starting with the file name and carry no chained traceback.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from pydantic import BaseModel

from provider_agent.config import load as config_load
from provider_agent.config import schema as config
from provider_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "agent.toml.example"

BASE: dict[str, Any] = {
    "coordinator": {"url": "wss://coord.example.net/provider/connect"},
    "pricing": {"default_input_per_1m": 300000, "default_output_per_1m": 600000},
}
OLLAMA = {"kind": "ollama", "url": "http://127.0.0.1:11434"}
LLAMACPP = {"kind": "llamacpp", "url": "http://127.0.0.1:8080"}
OPENROUTER = {"kind": "openrouter", "api_key_env": "OPENROUTER_API_KEY"}
VENICE = {"kind": "venice", "api_key_env": "VENICE_API_KEY"}
WALLET = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV"


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def doc(*, drop: tuple[str, ...] = (), **sections: Any) -> str:
    """A valid minimal agent.toml with `sections` merged in (and top-level `drop` keys removed)."""
    data = copy.deepcopy(BASE)
    _merge(data, sections)
    for key in drop:
        if "." in key:
            section, _, field = key.partition(".")
            del data[section][field]
        else:
            del data[key]
    return tomlkit.dumps(data)


def backends(*entries: dict[str, Any]) -> str:
    return doc(backends=list(entries))


def coordinator(**values: Any) -> str:
    return doc(coordinator=values)


def parse_error(text: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_load.parse(text, **kwargs)
    return caught.value


# (id, toml text, key path, fragments of the message) ----------------------------------------------
FAILING: list[tuple[str, str, str, tuple[str, ...]]] = [
    # TOML itself
    (
        "toml-syntax",
        '[coordinator]\nurl = "wss://x/y"\nheartbeat_interval_s = = 3\n',
        "",
        ("TOML syntax error", "line 3", "column"),
    ),
    (
        "toml-unterminated-string",
        '[coordinator]\nurl = "wss://x/y\n',
        "",
        ("TOML syntax error", "line 2"),
    ),
    (
        "toml-duplicate-key",
        '[coordinator]\nurl = "wss://a/b"\nurl = "wss://c/d"\n',
        "",
        ("duplicate", "line 3"),
    ),
    (
        "toml-duplicate-table",
        '[coordinator]\nurl = "wss://a/b"\n[coordinator]\nheartbeat_interval_s = 5\n',
        "",
        ("duplicate", "line 3"),
    ),
    # unknown keys, at every depth
    ("unknown-top-level", doc(coordinater={"url": "wss://a/b"}), "coordinater", ("unknown key",)),
    ("unknown-coordinator", coordinator(urll="wss://a/b"), "coordinator.urll", ("unknown key",)),
    (
        "typo-beats-missing",
        doc(drop=("coordinator.url",), coordinator={"ulr": "wss://a/b"}),
        "coordinator.ulr",
        ("unknown key",),
    ),
    ("unknown-operator", doc(operator={"email": "a@b"}), "operator.email", ("unknown key",)),
    (
        "unknown-backend-key",
        backends(OLLAMA, {**LLAMACPP, "modles": ["x"]}),
        "backends[1].modles",
        ("unknown key",),
    ),
    (
        "unknown-model-price-key",
        doc(pricing={"models": {"llama3.1:70b": {"input": 1, "output_per_1m": 2}}}),
        'pricing.models."llama3.1:70b".input',
        ("unknown key",),
    ),
    ("unknown-limits", doc(limits={"max_concurrency": 4}), "limits.max_concurrency", ("unknown",)),
    ("unknown-state", doc(state={"drain_timeout": 4}), "state.drain_timeout", ("unknown key",)),
    # required sections and keys
    ("missing-coordinator", doc(drop=("coordinator",)), "coordinator", ("missing",)),
    ("missing-coordinator-url", doc(drop=("coordinator.url",)), "coordinator.url", ("missing",)),
    ("missing-pricing", doc(drop=("pricing",)), "pricing", ("missing",)),
    (
        "missing-default-output",
        doc(drop=("pricing.default_output_per_1m",)),
        "pricing.default_output_per_1m",
        ("missing",),
    ),
    ("missing-kind", backends({"url": "http://a:1"}), "backends[0].kind", ("missing",)),
    # coordinator.url
    (
        "ws-needs-flag",
        coordinator(url="ws://a/b"),
        "coordinator.url",
        ("wss://", "--allow-insecure"),
    ),
    ("http-scheme", coordinator(url="https://a/b"), "coordinator.url", ("'https'", "wss://")),
    ("not-a-url", coordinator(url="coordinator.example.net"), "coordinator.url", ("wss://",)),
    ("empty-url", coordinator(url="wss://"), "coordinator.url", ("wss://",)),
    # ranges
    (
        "heartbeat-low",
        coordinator(heartbeat_interval_s=0),
        "coordinator.heartbeat_interval_s",
        ("1",),
    ),
    (
        "heartbeat-high",
        coordinator(heartbeat_interval_s=301),
        "coordinator.heartbeat_interval_s",
        ("300",),
    ),
    (
        "heartbeat-nan",
        '[coordinator]\nurl = "wss://a/b"\nheartbeat_interval_s = nan\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 1\n",
        "coordinator.heartbeat_interval_s",
        ("300",),
    ),
    ("interval-low", doc(discovery={"interval_s": 4}), "discovery.interval_s", ("5",)),
    ("interval-high", doc(discovery={"interval_s": 86401}), "discovery.interval_s", ("86400",)),
    ("timeout-low", doc(discovery={"timeout_s": 0.5}), "discovery.timeout_s", ("1",)),
    ("timeout-high", doc(discovery={"timeout_s": 61}), "discovery.timeout_s", ("60",)),
    ("markup-negative", backends({**OPENROUTER, "markup": -0.1}), "backends[0].markup", ("0",)),
    ("markup-high", backends({**OPENROUTER, "markup": 10.5}), "backends[0].markup", ("10",)),
    (
        "markup-inf",
        '[coordinator]\nurl = "wss://a/b"\n[pricing]\ndefault_input_per_1m = 1\n'
        'default_output_per_1m = 1\n[[backends]]\nkind = "venice"\napi_key_env = "V"\n'
        "markup = inf\n",
        "backends[0].markup",
        ("finite",),
    ),
    (
        "markup-on-local-kind",
        backends(OLLAMA, {**LLAMACPP, "markup": 0.1}),
        "backends[1].markup",
        ("openrouter/venice", "llamacpp"),
    ),
    (
        "backend-max-concurrent-low",
        backends({**OLLAMA, "max_concurrent": 0}),
        "backends[0].max_concurrent",
        ("1",),
    ),
    (
        "backend-max-concurrent-high",
        backends({**OLLAMA, "max_concurrent": 257}),
        "backends[0].max_concurrent",
        ("256",),
    ),
    (
        "limits-max-concurrent-low",
        doc(limits={"max_concurrent": 0}),
        "limits.max_concurrent",
        ("1",),
    ),
    (
        "limits-max-concurrent-high",
        doc(limits={"max_concurrent": 257}),
        "limits.max_concurrent",
        ("256",),
    ),
    (
        "tokens-per-minute-zero",
        doc(limits={"max_tokens_per_minute": 0}),
        "limits.max_tokens_per_minute",
        ("between 1 and 1_000_000_000_000_000",),
    ),
    ("drain-negative", doc(state={"drain_timeout_s": -1}), "state.drain_timeout_s", ("0",)),
    ("drain-high", doc(state={"drain_timeout_s": 3601}), "state.drain_timeout_s", ("3600",)),
    # pricing
    (
        "default-input-zero",
        doc(pricing={"default_input_per_1m": 0}),
        "pricing.default_input_per_1m",
        ("between 1 and",),
    ),
    (
        "default-output-zero",
        doc(pricing={"default_output_per_1m": 0}),
        "pricing.default_output_per_1m",
        ("between 1 and",),
    ),
    (
        "default-input-negative",
        doc(pricing={"default_input_per_1m": -5}),
        "pricing.default_input_per_1m",
        ("between 1 and",),
    ),
    (
        "model-price-negative",
        doc(pricing={"models": {"qwen/qwen3": {"input_per_1m": -1, "output_per_1m": 2}}}),
        'pricing.models."qwen/qwen3".input_per_1m',
        ("0",),
    ),
    (
        "model-price-missing-output",
        doc(pricing={"models": {"m": {"input_per_1m": 1}}}),
        "pricing.models.m.output_per_1m",
        ("missing",),
    ),
    # types: TOML is typed, nothing is coerced from strings or booleans
    (
        "string-for-int",
        doc(limits={"max_concurrent": "8"}),
        "limits.max_concurrent",
        ("integer", "without quotes", "not a string in quotes"),
    ),
    ("bool-for-int", doc(limits={"max_concurrent": True}), "limits.max_concurrent", ("integer",)),
    (
        "float-for-int",
        doc(pricing={"default_input_per_1m": 1.5}),
        "pricing.default_input_per_1m",
        ("integer",),
    ),
    (
        "string-for-float",
        doc(discovery={"interval_s": "300"}),
        "discovery.interval_s",
        ("number", "without quotes"),
    ),
    ("bool-priority", backends({**OLLAMA, "priority": True}), "backends[0].priority", ("integer",)),
    ("models-not-list", backends({**OLLAMA, "models": "llama3"}), "backends[0].models", ("list",)),
    ("backends-not-array", doc(backends={"kind": "ollama"}), "backends", ("list",)),
    # operator.wallet
    ("wallet-short", doc(operator={"wallet": WALLET[:31]}), "operator.wallet", ("base58", "32-44")),
    ("wallet-long", doc(operator={"wallet": WALLET + "abc"}), "operator.wallet", ("base58",)),
    (
        "wallet-bad-char",
        doc(operator={"wallet": "0" + WALLET[1:]}),
        "operator.wallet",
        ("base58",),
    ),
    # observability
    (
        "log-level-warning",
        doc(observability={"log_level": "warning"}),
        "observability.log_level",
        ("'warn'", "'trace'"),
    ),
    (
        "log-level-upper",
        doc(observability={"log_level": "INFO"}),
        "observability.log_level",
        ("'info'",),
    ),
    (
        "log-format-yaml",
        doc(observability={"log_format": "yaml"}),
        "observability.log_format",
        ("'text'", "'json'"),
    ),
    (
        "prometheus-port-only",
        doc(observability={"prometheus_addr": "9090"}),
        "observability.prometheus_addr",
        ("HOST:PORT",),
    ),
    (
        "prometheus-host-only",
        doc(observability={"prometheus_addr": "localhost"}),
        "observability.prometheus_addr",
        ("HOST:PORT",),
    ),
    (
        "prometheus-empty-host",
        doc(observability={"prometheus_addr": ":9090"}),
        "observability.prometheus_addr",
        ("HOST:PORT",),
    ),
    (
        "prometheus-port-range",
        doc(observability={"prometheus_addr": "127.0.0.1:70000"}),
        "observability.prometheus_addr",
        ("HOST:PORT",),
    ),
    (
        "prometheus-port-zero",
        doc(observability={"prometheus_addr": "127.0.0.1:0"}),
        "observability.prometheus_addr",
        ("HOST:PORT",),
    ),
    # backends: kinds, urls, keys
    (
        "unknown-kind",
        backends({"kind": "tgi", "url": "http://a:1"}),
        "backends[0].kind",
        ("'vllm'",),
    ),
    *[
        (f"{kind}-needs-url", backends({"kind": kind}), "backends[0].url", ("required", kind))
        for kind in ("vllm", "llamacpp", "lmstudio", "ollama")
    ],
    *[
        (
            f"{kind}-needs-api-key-env",
            backends(OLLAMA, {"kind": kind}),
            "backends[1].api_key_env",
            ("required", kind),
        )
        for kind in ("openrouter", "venice")
    ],
    (
        "local-url-with-v1",
        backends({"kind": "vllm", "url": "http://127.0.0.1:8000/v1"}),
        "backends[0].url",
        ("/v1",),
    ),
    (
        "local-url-with-v1-slash",
        backends({"kind": "vllm", "url": "http://127.0.0.1:8000/v1/"}),
        "backends[0].url",
        ("/v1",),
    ),
    (
        "url-not-http",
        backends({"kind": "ollama", "url": "127.0.0.1:11434"}),
        "backends[0].url",
        ("http://",),
    ),
    (
        "api-key-env-is-a-key",
        backends({**OPENROUTER, "api_key_env": "sk-or-v1-0123456789abcdef"}),
        "backends[0].api_key_env",
        ("environment variable", "not the API key"),
    ),
    (
        "formats-unknown",
        backends({**OLLAMA, "formats": ["grpc"]}),
        "backends[0].formats[0]",
        ("'openai'",),
    ),
    (
        "formats-empty",
        backends({**OLLAMA, "formats": []}),
        "backends[0].formats",
        ("not be empty",),
    ),
    ("name-empty", backends({**OLLAMA, "name": ""}), "backends[0].name", ("not be empty",)),
    # duplicates
    (
        "duplicate-kind-url",
        backends(OLLAMA, LLAMACPP, {**OLLAMA, "name": "again"}),
        "backends[2].url",
        ("duplicate", "backends[0]"),
    ),
    (
        "duplicate-kind-url-trailing-slash",
        backends(OLLAMA, {**OLLAMA, "url": "http://127.0.0.1:11434/", "name": "b"}),
        "backends[1].url",
        ("duplicate",),
    ),
    (
        "duplicate-byok-key-env",
        backends(OPENROUTER, {**OPENROUTER, "name": "or2", "markup": 0.2}),
        "backends[1].api_key_env",
        ("duplicate", "backends[0]"),
    ),
    (
        "duplicate-byok-key-env-other-url",
        backends(
            OPENROUTER, {**OPENROUTER, "url": "https://eu.openrouter.ai/api/v1", "name": "eu"}
        ),
        "backends[1].api_key_env",
        ("duplicate",),
    ),
    (
        "duplicate-name",
        backends({**OLLAMA, "name": "gpu0"}, {**LLAMACPP, "name": "gpu0"}),
        "backends[1].name",
        ("duplicate", "'gpu0'"),
    ),
    (
        "duplicate-default-name",
        backends(
            {**OPENROUTER, "url": "https://eu.example/api/v1"},
            {**OPENROUTER, "url": "https://eu.example/api/v1", "api_key_env": "OTHER_KEY"},
        ),
        "backends[1].name",
        ("duplicate", "'openrouter:https://eu.example/api/v1'", "set a distinct `name`"),
    ),
    (
        "name-equals-other-default",
        backends(OLLAMA, {**LLAMACPP, "name": "ollama:http://127.0.0.1:11434"}),
        "backends[1].name",
        ("duplicate",),
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragments"),
    [pytest.param(text, key, fragments, id=case) for case, text, key, fragments in FAILING],
)
def test_rule_violation_is_one_line_naming_key(
    text: str, key: str, fragments: tuple[str, ...]
) -> None:
    error = parse_error(text, file="conf/agent.toml")
    line = str(error)
    assert error.file == "conf/agent.toml"
    assert error.key == key
    assert line.startswith(f"conf/agent.toml: {key}: " if key else "conf/agent.toml: ")
    for fragment in fragments:
        assert fragment in error.message, (fragment, line)
    assert len(line.splitlines()) == 1
    assert "Traceback" not in line
    assert "pydantic" not in line.lower()
    assert "For further information" not in line
    # Raised `from None`: no chained exception for a traceback to show.
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_failing_table_covers_distinct_cases() -> None:
    ids = [case for case, *_ in FAILING]
    assert len(ids) == len(set(ids))


def test_api_key_env_error_never_echoes_the_value() -> None:
    secret = "sk-or-v1-f00dfacecafe0123456789"
    line = str(parse_error(backends({**OPENROUTER, "api_key_env": secret})))
    assert secret not in line
    assert "f00dface" not in line


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ('"display\\nname"', 'operator."display\\nname"'),
        ('"a\\rb"', 'operator."a\\rb"'),
        ('"line\\u2028sep"', 'operator."line\\u2028sep"'),
        ('"nel\\u0085x"', 'operator."nel\\u0085x"'),
        ('"quote\\"d"', 'operator."quote\\"d"'),
        ('"模型"', 'operator."模型"'),
    ],
)
def test_odd_unknown_key_stays_one_line(written: str, key: str) -> None:
    error = parse_error(doc() + f'\n[operator]\n{written} = "x"\n')
    assert len(str(error).splitlines()) == 1
    assert error.key == key


def test_ws_allowed_with_allow_insecure() -> None:
    cfg = config_load.parse(
        coordinator(url="ws://127.0.0.1:8765/provider/connect"), allow_insecure=True
    )
    assert cfg.coordinator.url == "ws://127.0.0.1:8765/provider/connect"


def test_http_refused_even_with_allow_insecure() -> None:
    error = parse_error(coordinator(url="http://127.0.0.1:8765/"), allow_insecure=True)
    assert error.key == "coordinator.url"


# --- boundaries that must pass -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "read", "expected"),
    [
        ({"coordinator": {"heartbeat_interval_s": 1}}, "coordinator.heartbeat_interval_s", 1),
        ({"coordinator": {"heartbeat_interval_s": 300}}, "coordinator.heartbeat_interval_s", 300),
        ({"discovery": {"interval_s": 5}}, "discovery.interval_s", 5),
        ({"discovery": {"interval_s": 86400}}, "discovery.interval_s", 86400),
        ({"discovery": {"timeout_s": 1}}, "discovery.timeout_s", 1),
        ({"discovery": {"timeout_s": 60}}, "discovery.timeout_s", 60),
        ({"discovery": {"timeout_s": 2.5}}, "discovery.timeout_s", 2.5),
        ({"limits": {"max_concurrent": 1}}, "limits.max_concurrent", 1),
        ({"limits": {"max_concurrent": 256}}, "limits.max_concurrent", 256),
        ({"limits": {"max_tokens_per_minute": 1}}, "limits.max_tokens_per_minute", 1),
        ({"state": {"drain_timeout_s": 0}}, "state.drain_timeout_s", 0),
        ({"state": {"drain_timeout_s": 3600}}, "state.drain_timeout_s", 3600),
        ({"backends": [{**OPENROUTER, "markup": 0}]}, "backends.0.markup", 0),
        ({"backends": [{**OPENROUTER, "markup": 10}]}, "backends.0.markup", 10),
        ({"backends": [{**OLLAMA, "max_concurrent": 1}]}, "backends.0.max_concurrent", 1),
        ({"backends": [{**OLLAMA, "max_concurrent": 256}]}, "backends.0.max_concurrent", 256),
        ({"operator": {"wallet": WALLET[:32]}}, "operator.wallet", WALLET[:32]),
        ({"operator": {"wallet": (WALLET * 2)[:44]}}, "operator.wallet", (WALLET * 2)[:44]),
    ],
)
def test_range_boundaries_accepted(sections: dict[str, Any], read: str, expected: Any) -> None:
    value: Any = config_load.parse(doc(**sections))
    for part in read.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    assert value == expected


@pytest.mark.parametrize("level", ["error", "warn", "info", "debug", "trace"])
def test_every_log_level_accepted(level: str) -> None:
    assert (
        config_load.parse(doc(observability={"log_level": level})).observability.log_level == level
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_log_format_accepted(fmt: str) -> None:
    assert config_load.parse(doc(observability={"log_format": fmt})).observability.log_format == fmt


@pytest.mark.parametrize(
    ("addr", "listen"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9090", ("::1", 9090)),
        ("", None),
    ],
)
def test_prometheus_addr(addr: str, listen: tuple[str, int] | None) -> None:
    cfg = config_load.parse(doc(observability={"prometheus_addr": addr}))
    assert cfg.observability.prometheus_addr == addr
    assert cfg.observability.listen == listen


def test_not_duplicates() -> None:
    """Same url under another kind, same key under another BYOK kind, two keys for one kind."""
    cfg = config_load.parse(
        backends(
            {"kind": "vllm", "url": "http://127.0.0.1:8000"},
            {"kind": "llamacpp", "url": "http://127.0.0.1:8000"},
            {"kind": "openrouter", "api_key_env": "SHARED"},
            {"kind": "venice", "api_key_env": "SHARED"},
            {"kind": "openrouter", "api_key_env": "SECOND", "name": "or-second"},
        )
    )
    assert [b.label for b in cfg.backends] == [
        "vllm:http://127.0.0.1:8000",
        "llamacpp:http://127.0.0.1:8000",
        "openrouter:SHARED",
        "venice:SHARED",
        "or-second",
    ]


def test_two_keys_of_one_byok_kind_are_two_default_names() -> None:
    cfg = config_load.parse(backends(OPENROUTER, {**OPENROUTER, "api_key_env": "OTHER_KEY"}))
    assert [b.label for b in cfg.backends] == [
        "openrouter:OPENROUTER_API_KEY",
        "openrouter:OTHER_KEY",
    ]


def test_local_kind_may_have_bearer_key_env() -> None:
    cfg = config_load.parse(backends({**OLLAMA, "api_key_env": "OLLAMA_TOKEN"}))
    assert cfg.backends[0].api_key_env == "OLLAMA_TOKEN"
    assert not cfg.backends[0].is_byok


def test_byok_url_kept_without_trailing_slash() -> None:
    cfg = config_load.parse(backends({**VENICE, "url": "https://api.venice.ai/api/v1/"}))
    assert cfg.backends[0].url == "https://api.venice.ai/api/v1"
    assert cfg.backends[0].label == "venice:https://api.venice.ai/api/v1"


# --- defaults ------------------------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv(config.ENROLLMENT_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_load.parse(doc())
    assert cfg.coordinator.heartbeat_interval_s == 15
    assert cfg.coordinator.enrollment_code is None
    assert cfg.enrollment_code is None
    assert cfg.discovery.interval_s == 300
    assert cfg.discovery.timeout_s == 5
    assert cfg.backends == []
    assert cfg.pricing.models == {}
    assert cfg.limits.max_concurrent == 8
    assert cfg.limits.max_tokens_per_minute is None
    assert cfg.observability.prometheus_addr == "127.0.0.1:9821"
    assert cfg.observability.listen == ("127.0.0.1", 9821)
    assert cfg.telemetry.gpu == "auto"
    assert cfg.ledger.keep_days == 400
    assert cfg.observability.log_level == "info"
    assert cfg.observability.log_format == "text"
    assert cfg.state.drain_timeout_s == 60
    assert cfg.identity.key_path == tmp_path / ".provider-agent" / "identity.key"
    assert cfg.state.dir == tmp_path / ".local" / "state" / "provider-agent"
    assert cfg.operator.display_name is None
    assert cfg.operator.wallet is None


def test_backend_defaults() -> None:
    backend = config_load.parse(backends(OLLAMA)).backends[0]
    assert backend.markup == Decimal(0)
    assert backend.models is None
    assert backend.name is None
    assert backend.priority is None
    assert backend.aliases == {}
    assert backend.formats is None
    assert backend.max_concurrent is None
    assert backend.api_key_env is None


@pytest.mark.parametrize(
    ("entry", "priority"),
    [
        ({"kind": "vllm", "url": "http://h:8000"}, 0),
        ({"kind": "llamacpp", "url": "http://h:8080"}, 1),
        ({"kind": "lmstudio", "url": "http://h:1234"}, 2),
        ({"kind": "ollama", "url": "http://h:11434"}, 3),
        ({"kind": "venice", "api_key_env": "K"}, 4),
        ({"kind": "openrouter", "api_key_env": "K"}, 5),
    ],
)
def test_priority_default_by_kind(entry: dict[str, Any], priority: int) -> None:
    backend = config_load.parse(backends(entry)).backends[0]
    assert backend.priority is None
    assert backend.effective_priority == priority
    explicit = config_load.parse(backends({**entry, "priority": -7})).backends[0]
    assert explicit.effective_priority == -7


def test_label_defaults() -> None:
    cfg = config_load.parse(
        backends(
            {"kind": "ollama", "url": "http://127.0.0.1:11434/"},
            OPENROUTER,
            {**VENICE, "url": "https://api.venice.ai/api/v1"},
            {**LLAMACPP, "name": "gpu0"},
        )
    )
    assert [b.label for b in cfg.backends] == [
        "ollama:http://127.0.0.1:11434",
        "openrouter:OPENROUTER_API_KEY",
        "venice:https://api.venice.ai/api/v1",
        "gpu0",
    ]


@pytest.mark.parametrize(
    ("written", "exact"),
    [
        ("0.1", "0.1"),
        ("0.10", "0.1"),
        ("0.15", "0.15"),
        ("2", "2"),
        ("0.333", "0.333"),
        ("1e-3", "0.001"),
    ],
)
def test_markup_is_exact_decimal(written: str, exact: str) -> None:
    text = doc() + f'\n[[backends]]\nkind = "openrouter"\napi_key_env = "K"\nmarkup = {written}\n'
    markup = config_load.parse(text).backends[0].markup
    assert isinstance(markup, Decimal)
    assert markup == Decimal(exact)
    # Not the binary float's expansion (0.1000000000000000055511151231257827...).
    assert len(markup.as_tuple().digits) <= 3


def test_markup_times_price_is_exact() -> None:
    text = doc() + '\n[[backends]]\nkind = "openrouter"\napi_key_env = "K"\nmarkup = 0.1\n'
    markup = config_load.parse(text).backends[0].markup
    assert Decimal("0.0000004") * (1 + markup) * 1_000_000 == Decimal("0.44")


def test_fields_keep_their_values() -> None:
    cfg = config_load.parse(
        doc(
            operator={"display_name": "rig", "wallet": WALLET, "contact_email": "ops@example.com"},
            coordinator={"enrollment_code": "POD-ENROLL-1", "heartbeat_interval_s": 7.5},
            backends=[
                {
                    **OLLAMA,
                    "models": ["llama3.1:70b"],
                    "aliases": {"llama3.1:70b": "meta-llama/Llama-3.1-70B-Instruct"},
                    "formats": ["openai", "anthropic"],
                    "max_concurrent": 3,
                    "name": "gpu0",
                    "priority": 9,
                }
            ],
            pricing={
                "models": {
                    "meta-llama/Llama-3.1-70B-Instruct": {"input_per_1m": 0, "output_per_1m": 5}
                }
            },
            limits={"max_tokens_per_minute": 2_000_000},
        )
    )
    assert cfg.operator.wallet == WALLET
    assert cfg.coordinator.heartbeat_interval_s == 7.5
    backend = cfg.backends[0]
    assert backend.models == ["llama3.1:70b"]
    assert backend.aliases == {"llama3.1:70b": "meta-llama/Llama-3.1-70B-Instruct"}
    assert backend.formats == ["openai", "anthropic"]
    assert (backend.max_concurrent, backend.label, backend.effective_priority) == (3, "gpu0", 9)
    price = cfg.pricing.models["meta-llama/Llama-3.1-70B-Instruct"]
    assert (price.input_per_1m, price.output_per_1m) == (0, 5)
    assert cfg.limits.max_tokens_per_minute == 2_000_000


# --- paths and environment -----------------------------------------------------------------------


def test_tilde_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_load.parse(doc(identity={"key_path": "~/keys/id.key"}, state={"dir": "~/state"}))
    assert cfg.identity.key_path == tmp_path / "keys" / "id.key"
    assert cfg.state.dir == tmp_path / "state"


def test_state_directory_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/sd:{tmp_path}/other")
    cfg = config_load.parse(doc())
    assert cfg.identity.key_path == tmp_path / "sd" / "identity.key"
    assert cfg.state.dir == tmp_path / "sd"
    # It wins over the configured state.dir too; an explicit key_path is the operator's choice.
    cfg = config_load.parse(
        doc(identity={"key_path": str(tmp_path / "k")}, state={"dir": "/elsewhere"})
    )
    assert cfg.state.dir == tmp_path / "sd"
    assert cfg.identity.key_path == tmp_path / "k"


def test_enrollment_code_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENROLLMENT_ENV, raising=False)
    from_file = config_load.parse(coordinator(enrollment_code="POD-ENROLL-FILE"))
    assert from_file.enrollment_code == "POD-ENROLL-FILE"
    monkeypatch.setenv(config.ENROLLMENT_ENV, "POD-ENROLL-ENV")
    assert from_file.enrollment_code == "POD-ENROLL-ENV"
    assert config_load.parse(doc()).enrollment_code == "POD-ENROLL-ENV"
    assert config.ENROLLMENT_ENV == "PROVIDER_AGENT_ENROLLMENT_CODE"


class TestResolvePath:
    @pytest.fixture(autouse=True)
    def _env(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.delenv(config_load.CONFIG_ENV, raising=False)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.chdir(tmp_path)

    def _xdg_file(self, base: Path) -> Path:
        path = base / "provider-agent" / "agent.toml"
        path.parent.mkdir(parents=True)
        path.write_text(doc())
        return path

    def test_explicit_wins(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self._xdg_file(tmp_path / "xdg")
        monkeypatch.setenv(config_load.CONFIG_ENV, str(tmp_path / "env.toml"))
        assert config_load.resolve_path(tmp_path / "cli.toml") == tmp_path / "cli.toml"
        assert config_load.resolve_path("~/cli.toml") == tmp_path / "home" / "cli.toml"

    def test_env_next(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self._xdg_file(tmp_path / "xdg")
        monkeypatch.setenv(config_load.CONFIG_ENV, str(tmp_path / "env.toml"))
        assert config_load.CONFIG_ENV == "PROVIDER_AGENT_CONFIG"
        assert config_load.resolve_path(None) == tmp_path / "env.toml"

    def test_xdg_when_it_exists(self, tmp_path: Path) -> None:
        (tmp_path / "agent.toml").write_text(doc())
        assert config_load.resolve_path(None) == Path("agent.toml")
        xdg = self._xdg_file(tmp_path / "xdg")
        assert config_load.resolve_path(None) == xdg

    def test_dot_config_when_xdg_unset(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("XDG_CONFIG_HOME")
        (tmp_path / "agent.toml").write_text(doc())
        assert config_load.resolve_path(None) == Path("agent.toml")
        path = self._xdg_file(tmp_path / "home" / ".config")
        assert config_load.resolve_path(None) == path

    def test_cwd_last(self, tmp_path: Path) -> None:
        (tmp_path / "agent.toml").write_text(doc())
        assert config_load.resolve_path(None) == Path("agent.toml")

    def test_nothing_found_names_every_place_searched(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as caught:
            config_load.resolve_path(None)
        line = str(caught.value)
        assert "no such file" in line and "\n" not in line
        assert str(tmp_path / "xdg" / "provider-agent" / "agent.toml") in line
        assert str(tmp_path / "agent.toml") in line
        assert "--config" in line and config_load.CONFIG_ENV in line and "init" in line

    def test_unset_xdg_is_named_as_dot_config(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("XDG_CONFIG_HOME")
        with pytest.raises(ConfigError) as caught:
            config_load.resolve_path(None)
        assert "~/.config/provider-agent/agent.toml" in str(caught.value)
        assert str(tmp_path / "home" / ".config" / "provider-agent" / "agent.toml") in str(
            caught.value
        )

    @pytest.mark.parametrize("empty", ["", " ", "\t"])
    def test_empty_config_option_is_refused(self, empty: str) -> None:
        with pytest.raises(ConfigError) as caught:
            config_load.resolve_path(empty)
        assert str(caught.value) == "--config: is empty: give the path of agent.toml"


# --- load() --------------------------------------------------------------------------------------


def test_load_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(backends(OLLAMA), encoding="utf-8")
    assert config_load.load(path).backends[0].kind == "ollama"
    assert config_load.load(str(path)).backends[0].label == "ollama:http://127.0.0.1:11434"


def test_load_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(backends(OLLAMA, OLLAMA), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        config_load.load(path)
    assert str(caught.value).startswith(f"{path}: backends[1].url: duplicate")


def test_load_passes_allow_insecure(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(coordinator(url="ws://127.0.0.1:8765/provider/connect"), encoding="utf-8")
    with pytest.raises(ConfigError, match="--allow-insecure"):
        config_load.load(path)
    assert config_load.load(path, allow_insecure=True).coordinator.url.startswith("ws://")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "cannot read"),
        (lambda p: p.write_bytes(b"[coordinator]\nurl = '\xff\xfe'\n"), "not UTF-8"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_load_unreadable_is_one_line(tmp_path: Path, make: Any, fragment: str) -> None:
    path = tmp_path / "agent.toml"
    make(path)
    with pytest.raises(ConfigError) as caught:
        config_load.load(path)
    line = str(caught.value)
    assert line.startswith(f"{path}: ")
    assert fragment in line
    assert "\n" not in line
    assert caught.value.__cause__ is None


# --- agent.toml.example --------------------------------------------------------------------------


def test_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = config_load.load(EXAMPLE)
    assert cfg.coordinator.url.startswith("wss://")
    kinds = [b.kind for b in cfg.backends]
    assert {"ollama", "llamacpp", "openrouter"} <= set(kinds)
    byok = next(b for b in cfg.backends if b.kind == "openrouter")
    assert byok.api_key_env
    assert byok.markup > 0
    assert byok.models
    assert byok.aliases
    assert cfg.pricing.models
    assert not re.search(r"url\s*=\s*\"ws://", EXAMPLE.read_text(encoding="utf-8"))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `list[X]`, `dict[str, X]`, `X | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        for arg in args:
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _all_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every key of the schema → its dotted path, found by walking the models recursively."""
    keys: dict[str, str] = {}
    for name, field in model.model_fields.items():
        keys[f"{prefix}{name}"] = name
        nested = _model_of(field.annotation)
        if nested is not None:
            keys.update(_all_keys(nested, f"{prefix}{name}."))
    return keys


def test_schema_walk_finds_nested_keys() -> None:
    keys = _all_keys(config.Config)
    assert {"backends.markup", "pricing.models.input_per_1m", "state.drain_timeout_s"} <= set(keys)
    assert len(keys) >= 35


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = []
    for path, name in _all_keys(config.Config).items():
        # Set (or shown commented out) as `name = …`, or opened as a table `[name]`/`[a.name…`.
        assignment = re.compile(rf"^[ \t]*(#[ \t]*)?{re.escape(name)}[ \t]*=", re.MULTILINE)
        table = re.compile(
            rf"^[ \t]*(#[ \t]*)?\[\[?([\w.]+\.)?{re.escape(name)}[\].]", re.MULTILINE
        )
        if not assignment.search(text) and not table.search(text):
            missing.append(path)
    assert missing == []


def test_example_has_comments_for_every_section() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in config.Config.model_fields:
        header = f"[[{name}]]" if name == "backends" else f"[{name}]"
        found = re.search(rf"^{re.escape(header)}\n(.*)$", text, re.MULTILINE)
        assert found is not None, f"no {header} table"
        assert found[1].startswith("#"), f"{header} is not followed by a comment"


# --- numbers: every one bounded, every one a TOML number ----------------------------------------

MAX = config.MAX_PRICE
#: (sections, key path, lowest accepted, highest accepted) for every number in the schema.
NUMBERS: list[tuple[str, str, Any, Any]] = [
    ("coordinator", "heartbeat_interval_s", 1, 300),
    ("discovery", "interval_s", 5, 86400),
    ("discovery", "timeout_s", 1, 60),
    ("pricing", "default_input_per_1m", 1, MAX),
    ("pricing", "default_output_per_1m", 1, MAX),
    ("pricing.models.m", "input_per_1m", 0, MAX),
    ("pricing.models.m", "output_per_1m", 0, MAX),
    ("limits", "max_concurrent", 1, 256),
    ("limits", "max_tokens_per_minute", 1, config.MAX_TOKENS_PER_MINUTE),
    ("ledger", "keep_days", 1, 3650),
    ("state", "drain_timeout_s", 0, 3600),
    ("backends[0]", "max_concurrent", 1, 256),
    ("backends[0]", "priority", -config.MAX_PRIORITY, config.MAX_PRIORITY),
    ("backends[0]", "markup", 0, 10),
]


def with_number(section: str, key: str, value: Any) -> str:
    """The minimal document with `section.key = value`, the value written as given (raw TOML)."""
    tables = {
        "coordinator": ['url = "wss://coord.example.net/provider/connect"'],
        "pricing": ["default_input_per_1m = 300000", "default_output_per_1m = 600000"],
    }
    if section == "backends[0]":
        tables["[backends]"] = ['kind = "openrouter"', 'api_key_env = "K"']
    elif section == "pricing.models.m":
        tables[section] = ["input_per_1m = 1", "output_per_1m = 1"]
    table = tables.setdefault("[backends]" if section == "backends[0]" else section, [])
    table[:] = [line for line in table if not line.startswith(f"{key} =")] + [f"{key} = {value}"]
    return "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in body) for name, body in tables.items()
    )


def _read(cfg: config.Config, section: str, key: str) -> Any:
    if section == "backends[0]":
        return getattr(cfg.backends[0], key)
    if section == "pricing.models.m":
        return getattr(cfg.pricing.models["m"], key)
    return getattr(getattr(cfg, section), key)


def _key(section: str, key: str) -> str:
    return f"{section}.{key}"


@pytest.mark.parametrize(("section", "key", "low", "high"), NUMBERS)
def test_every_number_accepts_both_ends_of_its_range(
    section: str, key: str, low: Any, high: Any
) -> None:
    for value in (low, high):
        assert _read(config_load.parse(with_number(section, key, value)), section, key) == value


@pytest.mark.parametrize(("section", "key", "low", "high"), NUMBERS)
def test_every_number_refuses_just_outside_and_far_outside(
    section: str, key: str, low: Any, high: Any
) -> None:
    outside = [low - 1, high + 1, high * 10**12 + 1, "99999999999999999999999", "-inf", "inf"]
    if section != "backends[0]" or key == "markup":
        outside.append("nan")
    for value in outside:
        error = parse_error(with_number(section, key, value))
        assert error.key == _key(section, key), (value, str(error))
        assert len(str(error).splitlines()) == 1
        if isinstance(value, int) or value.lstrip("-").isdigit():
            assert "between" in error.message or "integer" in error.message, str(error)


@pytest.mark.parametrize(("section", "key", "low", "high"), NUMBERS)
@pytest.mark.parametrize("written", ['"{v}"', "'{v}'", "true", "[{v}]", "1979-05-27"])
def test_every_number_refuses_a_quoted_number_and_other_types(
    section: str, key: str, low: Any, high: Any, written: str
) -> None:
    value = written.format(v=high)
    error = parse_error(with_number(section, key, value))
    assert error.key == _key(section, key)
    assert "without quotes" in error.message or "integer" in error.message, str(error)
    if written.startswith(("'", '"')):
        assert "not a string in quotes" in error.message


def test_quoted_markup_is_refused_like_every_other_number() -> None:
    error = parse_error(backends({**OPENROUTER, "markup": "0.10"}))
    assert error.key == "backends[0].markup"
    assert error.message == "must be a number written without quotes, not a string in quotes"


@pytest.mark.parametrize(
    ("section", "key"),
    [(s, k) for s, k, low, _ in NUMBERS if isinstance(low, int) and k != "markup"],
)
def test_float_for_an_integer_is_refused(section: str, key: str) -> None:
    field = _read_field(section, key)
    if field is int:
        error = parse_error(with_number(section, key, "2.5"))
        assert error.key == _key(section, key)
        assert "whole number" in error.message


def _read_field(section: str, key: str) -> Any:
    model: Any = {
        "backends[0]": config.BackendConfig,
        "pricing.models.m": config.ModelPrice,
    }.get(section) or config.Config.model_fields[section].annotation
    annotation = model.model_fields[key].annotation
    return int if "int" in str(annotation) else float


# --- TOML that the parser cannot take ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 5000 + "]" * 5000,
        "x = " + "{a = " * 3000 + "1" + "}" * 3000,
        "[operator]\ndisplay_name = " + "[" * 100_000,
        doc() + "\n[[backends]]\nkind = 'ollama'\nmodels = " + "[" * 4000 + "]" * 4000,
        doc() + "\n[pricing.models.m]\ninput_per_1m = " + "[{a = " * 2000 + "1}]" * 2000,
    ],
    ids=["arrays", "inline-tables", "unterminated", "in-a-known-key", "mixed"],
)
def test_deep_nesting_is_a_one_line_config_error(text: str) -> None:
    error = parse_error(text, file="deep.toml")
    assert str(error).startswith("deep.toml: ")
    assert "nested too deeply" in error.message or "TOML syntax error" in error.message
    assert len(str(error).splitlines()) == 1


def test_moderate_nesting_is_a_type_error_not_a_crash() -> None:
    error = parse_error(backends({**OLLAMA, "models": [[[["x"]]]]}))
    assert error.key == "backends[0].models[0]" and "string" in error.message


# --- encodings -----------------------------------------------------------------------------------

GOOD = backends(OLLAMA)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"\xef\xbb\xbf" + GOOD.encode(), ("UTF-8 byte-order mark",)),
        (GOOD.encode("utf-16"), ("UTF-16", "byte-order mark")),
        (GOOD.encode("utf-16-be"), ("NUL bytes", "UTF-16")),
        (GOOD.encode("utf-16-le"), ("NUL bytes", "UTF-16")),
        (b"\xfe\xff" + GOOD.encode("utf-16-be"), ("UTF-16",)),
        (GOOD.encode("utf-32"), ("UTF-32",)),
        (
            (GOOD + '[operator]\ndisplay_name = "Café"\n').encode("latin-1"),
            ("not UTF-8", "0xe9", "Latin-1"),
        ),
        (
            (GOOD + '[operator]\ndisplay_name = "‘quoted’"\n').encode("cp1252"),
            ("not UTF-8", "0x91", "line 12, column 17"),
        ),
        (b"\x80" + GOOD.encode(), ("not UTF-8", "line 1, column 1")),
    ],
    ids=[
        "utf8-bom",
        "utf16-bom",
        "utf16be",
        "utf16le",
        "utf16be-bom",
        "utf32",
        "latin1",
        "cp1252",
        "stray-byte",
    ],
)
def test_wrong_encoding_says_what_is_wrong(
    tmp_path: Path, data: bytes, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        config_load.load(path)
    line = str(caught.value)
    assert line.startswith(f"{path}: ") and "save it as UTF-8" in line
    for fragment in fragments:
        assert fragment in line, line
    assert "codec" not in line and "\n" not in line
    assert caught.value.__cause__ is None


def test_utf8_with_non_ascii_reads(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes((GOOD + '[operator]\ndisplay_name = "Café 模型"\n').encode())
    assert config_load.load(path).operator.display_name == "Café 模型"


@pytest.mark.parametrize(
    "source", ["/dev/zero", "huge"], ids=["endless-device", "larger-than-1MiB"]
)
def test_huge_input_is_refused_without_reading_it_all(tmp_path: Path, source: str) -> None:
    path = Path(source)
    if source == "huge":
        path = tmp_path / "agent.toml"
        path.write_text(GOOD + "#" * (config_load.MAX_FILE_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        config_load.load(path)


# --- URLs ----------------------------------------------------------------------------------------

BAD_URLS: list[tuple[str, str]] = [
    ("{s}:// ", "spaces"),
    ("{s}://host:99999", "port"),
    ("{s}://host:0", "port"),
    ("{s}://host:-1", "port"),
    ("{s}://host:80x", "port"),
    ("{s}://host:/", "port"),
    ("{s}://[::1:8000", "IPv6"),
    ("{s}://[zz::1]:80", "IPv6"),
    ("{s}://::1:8000", "brackets"),
    ("{s}://@", "user:password@"),
    ("{s}://admin:s3cret@host:1", "user:password@"),
    ("{s}://token@host", "user:password@"),
    ("{s}://host:1/path?x=", "query"),
    ("{s}://host:1/path?", "query"),
    ("{s}://host:1/#frag", "fragment"),
    ("{s}://", "no host"),
    ("{s}://:8000", "no host"),
    ("{s}:///path", "no host"),
    ("{s}://a..b/", "host name"),
    ("{s}://ho st/", "spaces"),
    ("{s}://host\t/", "spaces"),
    ("{s}://host/\x1b[31m", "control"),
    ("{s}://" + "a" * 64 + ".example/", "host name"),
    ("{s}//host", "like"),
    ("host:8000", "like"),
]


@pytest.mark.parametrize(("template", "fragment"), BAD_URLS)
@pytest.mark.parametrize("where", ["coordinator", "local", "byok"])
def test_urls_are_parsed_not_prefix_matched(where: str, template: str, fragment: str) -> None:
    scheme = {"coordinator": "wss", "local": "http", "byok": "https"}[where]
    url = template.format(s=scheme)
    if where == "coordinator":
        text, key = coordinator(url=url), "coordinator.url"
    elif where == "local":
        text, key = backends({**OLLAMA, "url": url}), "backends[0].url"
    else:
        text, key = backends({**OPENROUTER, "url": url}), "backends[0].url"
    error = parse_error(text, allow_insecure=True)
    assert error.key == key, str(error)
    assert fragment in error.message, str(error)
    assert len(str(error).splitlines()) == 1
    assert "s3cret" not in str(error)


@pytest.mark.parametrize("url", ["http://admin:s3cret@127.0.0.1:11434", "https://k@host/"])
def test_credentials_in_a_backend_url_point_at_api_key_env(url: str) -> None:
    error = parse_error(backends({**OLLAMA, "url": url}))
    assert "api_key_env" in error.message
    assert "s3cret" not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1/v1/models?x=",
        "http://h:1/v1/models",
        "http://h:1/V1",
        "http://h:1/proxy/v1/",
        "http://h:1/v1/?",
    ],
)
def test_no_v1_rule_sees_through_paths_and_queries(url: str) -> None:
    error = parse_error(backends({"kind": "vllm", "url": url}))
    assert error.key == "backends[0].url"
    assert "/v1" in error.message or "query" in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "https://gpu.example.net",
        "http://[::1]:11434",
        "http://[fe80::1]:1/",
        "http://localhost:65535/ollama",
        "http://münchen.example:1",
        "http://my_host.lan:8080",
        "HTTP://HOST:1",
    ],
)
def test_good_local_urls_pass(url: str) -> None:
    assert config_load.parse(backends({**OLLAMA, "url": url})).backends[0].url == url.rstrip("/")


@pytest.mark.parametrize("kind", ["openrouter", "venice"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/api/v1", "HTTP://api.example/api/v1"])
def test_byok_over_http_needs_allow_insecure(kind: str, url: str) -> None:
    entry = {"kind": kind, "api_key_env": "K", "url": url}
    error = parse_error(backends(entry))
    assert error.key == "backends[0].url"
    for fragment in ("https://", "--allow-insecure", "clear text"):
        assert fragment in error.message
    assert config_load.parse(backends(entry), allow_insecure=True).backends[0].url == url


@pytest.mark.parametrize("scheme", ["ftp", "file", "ws", "wss"])
def test_backend_url_scheme_is_http_or_https(scheme: str) -> None:
    error = parse_error(backends({**OLLAMA, "url": f"{scheme}://h:1"}), allow_insecure=True)
    assert error.key == "backends[0].url" and "http://" in error.message


@pytest.mark.parametrize(
    "url",
    [
        "wss://api.example.net/provider/connect",
        "wss://[::1]:8765/provider/connect",
        "wss://host:65535",
        "WSS://host/x",
    ],
)
def test_good_coordinator_urls_pass(url: str) -> None:
    assert config_load.parse(coordinator(url=url)).coordinator.url == url


@pytest.mark.parametrize(
    ("url", "placeholder"),
    [
        (config.PLACEHOLDER_COORDINATOR_URL, True),
        ("wss://api.example.net/provider/connect", True),
        ("wss://coord.example/x", True),
        ("wss://EXAMPLE.COM/x", True),
        ("wss://api.marketplace.net/provider/connect", False),
        ("wss://example.community/x", False),
        ("wss://[::1]:8765/provider/connect", False),
    ],
)
def test_placeholder_coordinator_is_recognised(url: str, placeholder: bool) -> None:
    assert config_load.parse(coordinator(url=url)).coordinator.is_placeholder is placeholder


# --- strings that name things, and paths ---------------------------------------------------------

BAD_NAMES: list[tuple[str, str]] = [
    ("", "empty"),
    ("   ", "empty"),
    ("a\nb", "control"),
    ("a\x00b", "control"),
    ("\x1b[31mred", "control"),
    ("tab\there", "control"),
    ("line\u2028sep", "control"),
    ("x" * 257, "257 characters"),
]


def _name_doc(where: str, name: str) -> tuple[str, str]:
    if where == "name":
        return backends({**OLLAMA, "name": name}), "backends[0].name"
    if where == "alias-target":
        return backends({**OLLAMA, "aliases": {"llama3": name}}), "backends[0].aliases.llama3"
    if where == "alias-key":
        return backends({**OLLAMA, "aliases": {name: "x"}}), "backends[0].aliases"
    if where == "models-entry":
        return backends({**OLLAMA, "models": ["ok", name]}), "backends[0].models[1]"
    price = {"input_per_1m": 1, "output_per_1m": 1}
    return doc(pricing={"models": {name: price}}), "pricing.models"


@pytest.mark.parametrize(("name", "fragment"), BAD_NAMES)
@pytest.mark.parametrize(
    "where", ["name", "alias-target", "alias-key", "models-entry", "price-key"]
)
def test_naming_strings_are_refused(where: str, name: str, fragment: str) -> None:
    text, key = _name_doc(where, name)
    error = parse_error(text)
    assert error.key.startswith(key), str(error)
    assert fragment in error.message, str(error)
    assert len(str(error).splitlines()) == 1
    assert "\x1b" not in str(error) and "\x00" not in str(error)


@pytest.mark.parametrize("name", ["x" * 256, "模型/é", "llama3.1:70b", "a b"])
@pytest.mark.parametrize(
    "where", ["name", "alias-target", "alias-key", "models-entry", "price-key"]
)
def test_naming_strings_at_the_limit_pass(where: str, name: str) -> None:
    text, _ = _name_doc(where, name)
    config_load.parse(text)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        ("  ", "empty"),
        ("a\x00b", "control"),
        ("~no-such-user-h7/x", "does not exist"),
        (5, "path in quotes"),
        (["a"], "path in quotes"),
    ],
)
@pytest.mark.parametrize("where", ["identity.key_path", "state.dir"])
def test_paths_are_not_empty_nor_odd(where: str, value: Any, fragment: str) -> None:
    section, _, key = where.partition(".")
    sections: dict[str, Any] = {section: {key: value}}
    error = parse_error(doc(**sections))
    assert error.key == where
    assert fragment in error.message, str(error)
    assert "<class" not in str(error)


@pytest.mark.parametrize(
    ("length", "ok"), [(90, True), (91, False), (400, False)], ids=["90", "91", "400"]
)
def test_state_dir_fits_a_socket_path(
    monkeypatch: pytest.MonkeyPatch, length: int, ok: bool
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    path = "/" + "d" * (length - 1)
    if ok:
        assert str(config_load.parse(doc(state={"dir": path})).state.dir) == path
        return
    error = parse_error(doc(state={"dir": path}))
    assert error.key == "state.dir" and "at most 90" in error.message


@pytest.mark.parametrize("kind", ["vllm", "llamacpp", "lmstudio", "ollama"])
@pytest.mark.parametrize("markup", [0, 0.0, 0.1, 10])
def test_markup_on_a_local_kind_is_an_error_whatever_its_value(kind: str, markup: float) -> None:
    """config.md (settled): `markup` on a local kind is an error, `0` included."""
    error = parse_error(backends({"kind": kind, "url": "http://127.0.0.1:8000", "markup": markup}))
    assert error.key == "backends[0].markup"
    assert "openrouter/venice" in error.message and kind in error.message


def test_the_state_dir_limit_holds_for_state_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """config.md (settled): the 90 bytes count for the directory actually used — here systemd's
    $STATE_DIRECTORY, which wins over a short [state] dir."""
    long = "/" + "s" * 90
    monkeypatch.setenv("STATE_DIRECTORY", long)
    for text in (doc(), doc(state={"dir": "/short"})):
        error = parse_error(text)
        assert error.key == "state.dir"
        assert "$STATE_DIRECTORY" in error.message and long in error.message
        assert "91 bytes" in error.message and "at most 90" in error.message
    monkeypatch.setenv("STATE_DIRECTORY", "/" + "s" * 89)
    assert config_load.parse(doc()).state.dir == Path("/" + "s" * 89)


@pytest.mark.parametrize("source", ["XDG_STATE_HOME", "HOME"])
def test_the_state_dir_limit_holds_for_the_default(
    monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    base = "/" + "b" * 80
    monkeypatch.setenv(source, base)
    expected = Path(base) / ("provider-agent" if source == "XDG_STATE_HOME" else ".local/state")
    if source == "HOME":
        expected /= "provider-agent"
    error = parse_error(doc())
    assert error.key == "state.dir"
    assert f"the default {expected} " in error.message and "set [state] dir" in error.message
    # An explicit [state] dir is the one used: the long default no longer matters.
    assert config_load.parse(doc(state={"dir": "/short"})).state.dir == Path("/short")


def test_the_default_state_dir_follows_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert config_load.parse(doc()).state.dir == tmp_path / "xdg" / "provider-agent"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec: ignore it
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_load.parse(doc()).state.dir == tmp_path / ".local/state/provider-agent"


def test_state_dir_limit_counts_bytes_after_expansion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("HOME", "/" + "h" * 80)
    error = parse_error(doc(state={"dir": "~/state-dir"}))
    assert "bytes" in error.message
    monkeypatch.setenv("HOME", "/h")
    assert config_load.parse(doc(state={"dir": "~/" + "é" * 40})).state.dir == Path(
        "/h/" + "é" * 40
    )
    error = parse_error(doc(state={"dir": "/" + "é" * 46}))  # 46 characters, 93 bytes
    assert "93 bytes" in error.message


# --- the new sections ----------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", ["auto", "off"])
def test_telemetry_gpu(gpu: str) -> None:
    assert config_load.parse(doc(telemetry={"gpu": gpu})).telemetry.gpu == gpu


@pytest.mark.parametrize("gpu", ["on", "AUTO", "", True])
def test_telemetry_gpu_refused(gpu: Any) -> None:
    error = parse_error(doc(telemetry={"gpu": gpu}))
    assert error.key == "telemetry.gpu" and "'auto'" in error.message and "'off'" in error.message


@pytest.mark.parametrize("section", ["telemetry", "ledger"])
def test_new_sections_reject_unknown_keys(section: str) -> None:
    sections: dict[str, Any] = {section: {"nope": 1}}
    assert parse_error(doc(**sections)).key == f"{section}.nope"


# --- every error is an operator's sentence -------------------------------------------------------

PYTHON_WORDING = (
    "instance of",
    "<class",
    "Input should",
    "Value error",
    "pydantic",
    "twice",
    "('",
    "codec",
    "Traceback",
    "Decimal(",
    "errors.pydantic.dev",
)


@pytest.mark.parametrize(
    "text",
    [
        'coordinator = "wss://a/b"\n[pricing]\ndefault_input_per_1m = 1\n',
        doc(identity={"key_path": 5}),
        doc(state={"dir": True}),
        '[coordinator]\nurl = "wss://a/b"\n[coordinator]\nurl = "wss://c/d"\n',
        '[pricing.models."a"]\ninput_per_1m = 1\n[pricing.models."a"]\n',
        doc(backends=["ollama"]),
        doc(backends=[{**OLLAMA, "aliases": ["x"]}]),
        doc(pricing={"models": "none"}),
        doc(pricing={"models": {"m": 5}}),
        doc(operator="me"),
        doc(coordinator={"url": 5}),
        doc(limits={"max_concurrent": 1.5}),
        doc(observability={"log_level": 3}),
        doc(backends=[{"kind": 1, "url": "http://h:1"}]),
        doc(backends=[{**OLLAMA, "formats": "openai"}]),
        doc(backends=[{**OPENROUTER, "markup": [1]}]),
        doc(backends=[{**OPENROUTER, "markup": True}]),
        doc(backends=[{**OLLAMA, "name": 7}]),
        '[coordinator]\nurl = "wss://a/b"\nx = {a = 1}\nx.b = 2\n',
        "a.b = 1\na.b.c = 2\n",
        "[[a]]\n[a]\n",
        'x = "\x1b"\n',
        "x = 1979-13-40\n",
    ],
)
def test_errors_are_written_for_a_person(text: str) -> None:
    line = str(parse_error(text))
    for python in PYTHON_WORDING:
        assert python not in line, line
    assert len(line.splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[coordinator]\nurl = "wss://a/b"\n[coordinator]\n',
            "agent.toml: TOML syntax error: duplicate table [coordinator] (at line 3, column 13)",
        ),
        (
            doc(operator="me"),
            "agent.toml: operator: must be a table (a [section] or { key = value })",
        ),
        (
            doc(identity={"key_path": 5}),
            "agent.toml: identity.key_path: must be a path in quotes, not a number",
        ),
    ],
)
def test_some_errors_word_for_word(text: str, expected: str) -> None:
    assert str(parse_error(text)) == expected
