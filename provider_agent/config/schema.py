"""agent.toml: the pydantic models (the schema, written once).

The contract is `shared/spec/config.md`. Every rule there is enforced here, so every command that
reads the file applies all of them, and every error is one line naming the file and the key path,
worded for the operator (never Python's or pydantic's wording). Every number is bounded, so a
value that validates cannot crash the encoder, a timer or a semaphore later.
"""

from __future__ import annotations

import ipaddress
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from provider_agent.config.messages import number_text
from provider_agent.errors import ConfigRuleError

# Defined once, in protocol.py; re-exported (the `as`) for the modules that import it from here.
from provider_agent.link.protocol import WireFormat as WireFormat  # noqa: PLC0414
from provider_agent.safe_text import printable

BackendKind = Literal["vllm", "llamacpp", "lmstudio", "ollama", "openrouter", "venice"]
LogLevel = Literal["error", "warn", "info", "debug", "trace"]

LOCAL_KINDS: frozenset[str] = frozenset({"vllm", "llamacpp", "lmstudio", "ollama"})
BYOK_KINDS: frozenset[str] = frozenset({"openrouter", "venice"})
DEFAULT_PRIORITY: dict[str, int] = {
    "vllm": 0,
    "llamacpp": 1,
    "lmstudio": 2,
    "ollama": 3,
    "venice": 4,
    "openrouter": 5,
}
ENROLLMENT_ENV = "PROVIDER_AGENT_ENROLLMENT_CODE"
#: Every price, configured or resolved, is at most this (micro-USDC per 1M tokens = USD 10^9):
#: far above any real price and well inside the wire's 64-bit integers.
MAX_PRICE: Final = 10**15
MAX_TOKENS_PER_MINUTE: Final = 10**15
#: `priority` only orders routes; the bound keeps it an ordinary number.
MAX_PRIORITY: Final = 1_000_000
#: Strings that name things (backend names, model ids, aliases) are at most this many characters.
MAX_NAME_CHARS: Final = 256
#: A unix socket path (108 bytes on Linux) lives in `state.dir`.
MAX_STATE_DIR_BYTES: Final = 90
#: Written by `init` when the coordinator's address is not known: `.invalid` never resolves, so an
#: agent started on an unedited file fails loudly instead of talking to a stranger.
PLACEHOLDER_COORDINATOR_URL: Final = "wss://coordinator.example.invalid/provider/connect"
#: Host names reserved for examples (RFC 2606): a coordinator there is a placeholder.
_PLACEHOLDER_HOSTS = re.compile(r"(.*\.)?(example\.(com|net|org)|[^.]+\.(example|invalid|test))")
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[\w.-]+):(?P<port>[0-9]{1,5})")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f]")
_NETLOC = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[^:]*))?")
_HOST_LABEL = re.compile(r"[\w-]{1,63}")


def _number(kind: str) -> Any:
    """A TOML number and nothing else: a quoted number or a boolean is an error, everywhere."""

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            what = "a string in quotes" if isinstance(value, str) else _toml_type(value)
            raise ValueError(f"must be {kind} written without quotes, not {what}")
        if kind == "an integer" and isinstance(value, float):
            raise ValueError("must be an integer (a whole number, without a decimal point)")
        return value

    return BeforeValidator(check)


def _toml_type(value: Any) -> str:
    names = {
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return next((n for t, n in names.items() if isinstance(value, t)), "a date or time")


def _between(low: float, high: float) -> Any:
    """An inclusive range, said as one (NaN and infinities fall outside it)."""

    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise ValueError(f"must be between {number_text(low)} and {number_text(high)}")
        return value

    return AfterValidator(check)


Int = Annotated[int, _number("an integer"), Field(strict=True)]
Float = Annotated[float, _number("a number")]
Price = Annotated[Int, _between(0, MAX_PRICE)]
DefaultPrice = Annotated[Int, _between(1, MAX_PRICE)]


def _name_rule(value: str) -> str:
    """Strings that name things: non-empty, printable, at most MAX_NAME_CHARS characters."""
    if not value.strip():
        raise ValueError("must not be empty (or only spaces)")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"is {len(value)} characters long: at most {MAX_NAME_CHARS}")
    if not value.isprintable():
        raise ValueError("must not contain control characters (newline, tab, escape, ...)")
    return value


Name = Annotated[str, Field(strict=True), AfterValidator(_name_rule)]


def _path_text(value: Any) -> Any:
    """A path is a non-empty quoted string without control characters (Path("") would be ".")."""
    if not isinstance(value, str):
        raise ValueError(f"must be a path in quotes, not {_toml_type(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


def _expand(value: Path) -> Path:
    try:
        return value.expanduser()
    except RuntimeError:  # "~someone" for a user that does not exist
        raise ValueError("starts with ~user for a user that does not exist") from None


FilePath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_expand)]


def _state_directory() -> Path | None:
    """systemd's `StateDirectory=` (first entry), which wins over the configured paths."""
    value = os.environ.get("STATE_DIRECTORY", "")
    return Path(value.split(":")[0]) if value else None


def _default_key_path() -> Path:
    state = _state_directory()
    return state / "identity.key" if state else Path("~/.provider-agent/identity.key").expanduser()


def _default_state_dir() -> Path:
    return _state_directory() or _xdg_state_dir()


def _xdg_state_dir() -> Path:
    """The default without systemd: `$XDG_STATE_HOME/provider-agent` (an absolute one; the XDG
    spec says to ignore a relative one), else `~/.local/state/provider-agent`."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path("~/.local/state").expanduser()
    return base / "provider-agent"


# --- URLs ----------------------------------------------------------------------------------------


def parse_url(value: str, *, example: str, credentials: str) -> SplitResult:
    """Parse a URL as config.md demands: a host, a port in 1-65535 when given, no query or
    fragment, no user:password@. `example` shows the expected form in errors; `credentials` says
    where credentials go instead. Raises ValueError with an operator's message (never echoing the
    URL, which may hold a password)."""
    if any(char.isspace() or not char.isprintable() for char in value):
        raise ValueError("must not contain spaces or control characters")
    if "://" not in value:
        raise ValueError(f"must be a URL like {example}")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError("is not a valid URL (an IPv6 address needs both [ and ])") from None
    if "@" in parts.netloc:
        raise ValueError(f"must not contain user:password@ ({credentials})")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query (?...) or a fragment (#...)")
    netloc = _NETLOC.fullmatch(parts.netloc)
    if netloc is None:
        raise ValueError("has a malformed host (an IPv6 address goes in brackets: [::1])")
    host, port = netloc["host"], netloc["port"]
    if not host:
        raise ValueError(f"has no host: expected a URL like {example}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("has an invalid IPv6 address between [ and ]") from None
    elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError("has an invalid host name")
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("has an invalid port: a port is a number from 1 to 65535")
    return parts


def _insecure_allowed(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("allow_insecure"))


class _Section(BaseModel):
    """Every table rejects unknown keys: they are almost always typos."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OperatorConfig(_Section):
    display_name: Name | None = None
    wallet: str | None = None
    contact_email: Name | None = None

    @field_validator("wallet")
    @classmethod
    def _wallet_is_base58(cls, value: str | None) -> str | None:
        if value is not None and not _BASE58.fullmatch(value):
            raise ValueError("must be a Solana base58 address (32-44 base58 characters)")
        return value


class CoordinatorConfig(_Section):
    url: str
    enrollment_code: Name | None = None
    heartbeat_interval_s: Annotated[Float, _between(1, 300)] = 15

    @field_validator("url")
    @classmethod
    def _secure_websocket(cls, value: str, info: ValidationInfo) -> str:
        parts = parse_url(
            value,
            example="wss://host/provider/connect",
            credentials="the agent signs in with its identity key and enrollment_code",
        )
        if parts.scheme == "wss" or (parts.scheme == "ws" and _insecure_allowed(info)):
            return value
        if parts.scheme == "ws":
            raise ValueError(
                "ws:// is not encrypted: use wss://, or pass --allow-insecure for testing"
            )
        raise ValueError(
            f"scheme {parts.scheme!r} is not allowed: use wss:// (or ws:// with --allow-insecure)"
        )

    @property
    def is_placeholder(self) -> bool:
        """The host is one reserved for examples (init's `# CHANGE ME` one, example.net, ...)."""
        host = urlsplit(self.url).hostname or ""
        return bool(_PLACEHOLDER_HOSTS.fullmatch(host.lower()))


class IdentityConfig(_Section):
    key_path: FilePath = Field(default_factory=_default_key_path)


class DiscoveryConfig(_Section):
    interval_s: Annotated[Float, _between(5, 86400)] = 300
    timeout_s: Annotated[Float, _between(1, 60)] = 5


class BackendConfig(_Section):
    kind: BackendKind
    url: str | None = None
    api_key_env: str | None = None
    markup: Annotated[Decimal, _between(0, 10)] = Decimal(0)
    models: list[Name] | None = None
    name: Name | None = None
    priority: Annotated[Int, _between(-MAX_PRIORITY, MAX_PRIORITY)] | None = None
    aliases: dict[Name, Name] = Field(default_factory=dict)
    formats: Annotated[list[WireFormat], Field(min_length=1)] | None = None
    max_concurrent: Annotated[Int, _between(1, 256)] | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = parse_url(
            value,
            example="http://127.0.0.1:8000",
            credentials="put the API key in the environment variable named by api_key_env",
        )
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        # Never echo the value: an operator may have pasted the key itself here.
        if value is not None and not (_ENV_NAME.fullmatch(value) and len(value) <= MAX_NAME_CHARS):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits and _), "
                "not the API key itself"
            )
        return value

    @field_validator("markup", mode="before")
    @classmethod
    def _exact_markup(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            what = "a string in quotes" if isinstance(value, str) else _toml_type(value)
            raise ValueError(f"must be a number written without quotes, not {what}")
        # TOML floats arrive as binary floats; str() gives back the decimal the operator wrote.
        return str(value) if isinstance(value, float) else value

    @model_validator(mode="after")
    def _kind_rules(self, info: ValidationInfo) -> BackendConfig:
        if self.kind in LOCAL_KINDS:
            if self.url is None:
                raise ValueError(f"url: required for kind {self.kind!r} (the server root)")
            if "v1" in urlsplit(self.url).path.lower().split("/"):
                raise ValueError("url: must be the server root, without /v1")
            if "markup" in self.model_fields_set:  # config.md: whatever its value, 0 included
                raise ValueError(f"markup: only for openrouter/venice, not for kind {self.kind!r}")
            return self
        if self.api_key_env is None:
            raise ValueError(f"api_key_env: required for kind {self.kind!r}")
        # A BackendConfig built in code (a test's fake upstream) has no context; a file read by
        # `parse` always has one, and there the API key must not travel in clear text.
        in_clear = self.url is not None and self.url.lower().startswith("http:")
        if in_clear and info.context is not None and not _insecure_allowed(info):
            raise ValueError(
                "url: http:// would send the API key in clear text: use https://, "
                "or pass --allow-insecure for testing"
            )
        return self

    @property
    def label(self) -> str:
        """The backend's name in logs and tables: `name`, else `<kind>:<url>`, else
        `<kind>:<api_key_env>` for a BYOK backend without url (so two keys are two names)."""
        if self.name:
            return self.name
        return f"{self.kind}:{self.url or self.api_key_env}"

    @property
    def effective_priority(self) -> int:
        return DEFAULT_PRIORITY[self.kind] if self.priority is None else self.priority

    @property
    def is_byok(self) -> bool:
        return self.kind in BYOK_KINDS


class ModelPrice(_Section):
    input_per_1m: Price
    output_per_1m: Price


class PricingConfig(_Section):
    default_input_per_1m: DefaultPrice
    default_output_per_1m: DefaultPrice
    models: dict[Name, ModelPrice] = Field(default_factory=dict)


class LimitsConfig(_Section):
    #: The global ceiling of jobs in flight (protocol.md §9: every route's limit is at most it).
    max_concurrent: Annotated[Int, _between(1, 256)] = 8
    max_tokens_per_minute: Annotated[Int, _between(1, MAX_TOKENS_PER_MINUTE)] | None = None
    #: protocol.md §9: each route's concurrency learned from its time to first byte; false keeps
    #: the ceilings as fixed limits.
    adaptive: Annotated[bool, Field(strict=True)] = True
    #: Recent times to first byte above this × the route's unloaded baseline lower its limit.
    ttfb_tolerance: Annotated[Float, _between(1.1, 10)] = 1.5


class ObservabilityConfig(_Section):
    prometheus_addr: str = "127.0.0.1:9821"
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("prometheus_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "":
            return value
        match = _HOST_PORT.fullmatch(value)
        valid = match is not None and 0 < int(match["port"]) < 65536
        if match is not None and match["host"].startswith("["):
            try:
                ipaddress.IPv6Address(match["host"][1:-1])
            except ValueError:
                valid = False
        if not valid:
            raise ValueError('must be "HOST:PORT" (or "" to disable the HTTP endpoint)')
        return value

    @property
    def listen(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP endpoint, or None when disabled."""
        match = _HOST_PORT.fullmatch(self.prometheus_addr)
        return (match["host"].strip("[]"), int(match["port"])) if match else None


class TelemetryConfig(_Section):
    gpu: Literal["auto", "off"] = "auto"


class LedgerConfig(_Section):
    keep_days: Annotated[Int, _between(1, 3650)] = 400


class StateConfig(_Section):
    dir: FilePath = Field(default_factory=_default_state_dir)
    drain_timeout_s: Annotated[Float, _between(0, 3600)] = 60

    @field_validator("dir")
    @classmethod
    def _state_directory_wins(cls, value: Path) -> Path:
        return _state_directory() or value

    def too_long(self) -> str | None:
        """Why the directory actually used — `$STATE_DIRECTORY`, `[state] dir` or the default,
        wherever it came from — breaks the 90-byte limit (config.md, settled 2026-12-06); None
        when it does not."""
        size = len(os.fsencode(self.dir))
        if size <= MAX_STATE_DIR_BYTES:
            return None
        limit = (
            f"is {size} bytes long: at most {MAX_STATE_DIR_BYTES} "
            "(the control socket's path must fit a unix socket address)"
        )
        shown = printable(str(self.dir), limit=None)
        if _state_directory() is not None:
            return f"$STATE_DIRECTORY {shown} {limit}"
        if "dir" in self.model_fields_set:
            return f"{shown} {limit}"
        return (
            f"the default {shown} ($XDG_STATE_HOME or ~/.local/state) {limit}: set [state] dir "
            "to a shorter path"
        )


class Config(_Section):
    """The whole agent.toml."""

    operator: OperatorConfig = Field(default_factory=OperatorConfig)
    coordinator: CoordinatorConfig
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    backends: list[BackendConfig] = Field(default_factory=list)
    pricing: PricingConfig
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    state: StateConfig = Field(default_factory=StateConfig)

    @model_validator(mode="after")
    def _state_dir_fits(self) -> Config:
        problem = self.state.too_long()
        if problem is not None:
            raise ConfigRuleError("state.dir", problem)
        return self

    @model_validator(mode="after")
    def _no_duplicate_backends(self) -> Config:
        # Names are unique *including the defaults* (`label`): logs, metrics and routes name a
        # backend by it.
        names: dict[str, int] = {}
        endpoints: dict[tuple[str, str], int] = {}
        for index, backend in enumerate(self.backends):
            what = "api_key_env" if backend.is_byok else "url"
            key = (backend.kind, str(getattr(backend, what)))
            if key in endpoints:
                raise ConfigRuleError(
                    f"backends[{index}].{what}",
                    f"duplicate backend: same kind and {what} as backends[{endpoints[key]}]",
                )
            endpoints[key] = index
            label = backend.label
            if label in names:
                hint = "" if backend.name else " (the default name; set a distinct `name`)"
                raise ConfigRuleError(
                    f"backends[{index}].name",
                    f"duplicate name {label!r}{hint}: also backends[{names[label]}]",
                )
            names[label] = index
        return self

    @property
    def enrollment_code(self) -> str | None:
        """The environment's code wins over the file's."""
        return os.environ.get(ENROLLMENT_ENV) or self.coordinator.enrollment_code


# --- finding and reading the file ----------------------------------------------------------------
