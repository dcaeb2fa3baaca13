"""agent.toml: the pydantic models (the schema, written once) and `load()`.

The contract is `shared/spec/config.md`. Every rule there is enforced here, so every command that
reads the file applies all of them, and every error is one line naming the file and the key path,
worded for the operator (never Python's or pydantic's wording). Every number is bounded, so a
value that validates cannot crash the encoder, a timer or a semaphore later.
"""

from __future__ import annotations

import ast
import codecs
import ipaddress
import json
import os
import re
import tomllib
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
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from provider_agent.errors import ConfigError

# Defined once, in protocol.py; re-exported (the `as`) for the modules that import it from here.
from provider_agent.link.protocol import WireFormat as WireFormat  # noqa: PLC0414

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
CONFIG_ENV = "PROVIDER_AGENT_CONFIG"
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
#: Larger than any real agent.toml by far; a bigger file is a mistake (or /dev/zero).
MAX_FILE_BYTES: Final = 1024 * 1024
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


def _between(low: int, high: int) -> Any:
    """An inclusive range, said as one (NaN and infinities fall outside it)."""

    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise ValueError(f"must be between {_number_text(low)} and {_number_text(high)}")
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
    max_concurrent: Annotated[Int, _between(1, 256)] = 8
    max_tokens_per_minute: Annotated[Int, _between(1, MAX_TOKENS_PER_MINUTE)] | None = None


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
        shown = _printable(str(self.dir))
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
            raise _KeyedError("state.dir", problem)
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
                raise _KeyedError(
                    f"backends[{index}].{what}",
                    f"duplicate backend: same kind and {what} as backends[{endpoints[key]}]",
                )
            endpoints[key] = index
            label = backend.label
            if label in names:
                hint = "" if backend.name else " (the default name; set a distinct `name`)"
                raise _KeyedError(
                    f"backends[{index}].name",
                    f"duplicate name {label!r}{hint}: also backends[{names[label]}]",
                )
            names[label] = index
        return self

    @property
    def enrollment_code(self) -> str | None:
        """The environment's code wins over the file's."""
        return os.environ.get(ENROLLMENT_ENV) or self.coordinator.enrollment_code


class _KeyedError(ValueError):
    """A cross-field rule's failure that knows its own key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


# --- finding and reading the file ----------------------------------------------------------------


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--config`, else $PROVIDER_AGENT_CONFIG, else the XDG file if present, else ./agent.toml.

    An empty `--config ""` is a ConfigError (not "not given"). When the search finds nothing, the
    ConfigError names every place it looked."""
    if explicit is not None:
        if not str(explicit).strip():
            raise ConfigError("--config", "", "is empty: give the path of agent.toml")
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    xdg_home = os.environ.get("XDG_CONFIG_HOME")
    xdg = Path(xdg_home or Path.home() / ".config") / "provider-agent" / "agent.toml"
    if xdg.exists():
        return xdg
    cwd = Path("agent.toml")
    if not cwd.exists():
        xdg_name = "$XDG_CONFIG_HOME" if xdg_home else "~/.config"
        where = _printable(str(xdg)), _printable(str(cwd.absolute()))
        raise ConfigError(
            "agent.toml",
            "",
            f"no such file; looked for {xdg_name}/provider-agent/agent.toml ({where[0]}) "
            f"and ./agent.toml ({where[1]}), as neither --config nor ${CONFIG_ENV} was given "
            "(create one with `provider-agent init`)",
        )
    return cwd


def load(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> Config:
    """Read and validate agent.toml; raise ConfigError (one line, key path named) on any problem."""
    file = _printable(str(path))
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            file, "", "no such file (create one with `provider-agent init`)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(file, "", "cannot read: it is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(file, "", f"is larger than {MAX_FILE_BYTES // 1024} KiB: not a config")
    return parse(decode(data, file), file=file, allow_insecure=allow_insecure)


def decode(data: bytes, file: str = "agent.toml") -> str:
    """UTF-8 without a byte-order mark, as TOML requires; anything else is a one-line ConfigError
    that says what the encoding problem is and what to do."""
    if data.startswith(codecs.BOM_UTF8):
        problem = "starts with a UTF-8 byte-order mark (BOM)"
    elif data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        problem = "is UTF-32 encoded (it starts with a UTF-32 byte-order mark)"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        problem = "is UTF-16 encoded (it starts with a UTF-16 byte-order mark)"
    elif b"\x00" in data:
        problem = "contains NUL bytes (is it UTF-16 encoded?)"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            problem = (
                f"is not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
                "(Latin-1 or Windows-1252?)"
            )
    raise ConfigError(file, "", f"{problem}: save it as UTF-8 without a byte-order mark")


def parse(text: str, *, file: str = "agent.toml", allow_insecure: bool = False) -> Config:
    """Validate TOML text as agent.toml (what `load` does after reading the file)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", _toml_message(str(exc))) from None
    except RecursionError:
        raise ConfigError(
            file, "", "arrays or inline tables are nested too deeply for the TOML parser"
        ) from None
    try:
        return Config.model_validate(data, context={"allow_insecure": allow_insecure})
    except ValidationError as exc:
        raise _first_error(file, exc) from None
    except RecursionError:
        raise ConfigError(file, "", "values are nested too deeply") from None


#: How tomllib writes a key in its messages: a tuple of strings, `('backends', 'x')`.
_KEY_TUPLE = re.compile(r"\((?:(?:'[^'\\]*'|\"[^\"\\]*\"),? ?)+\)")


def _toml_message(message: str) -> str:
    """tomllib's wording, made an operator's: `duplicate` said plainly, keys written as keys."""
    where = re.search(r"\((at line \d+, column \d+|at end of document)\)$", message)
    position = f" ({where[1]})" if where else ""
    if message.startswith("Cannot overwrite"):
        return f"TOML syntax error: duplicate key{position}"
    keys = _KEY_TUPLE.search(message)
    if keys is None:
        return f"TOML syntax error: {message}"
    parts = ast.literal_eval(keys[0])
    dotted = _printable(".".join(parts if isinstance(parts, tuple) else [parts]))
    if message.startswith("Cannot declare"):
        return f"TOML syntax error: duplicate table [{dotted}]{position}"
    return f"TOML syntax error: {message.replace(keys[0], dotted)}"


#: pydantic's error types, said the way an operator reads them.
_MESSAGES: Final = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (check the spelling against agent.toml.example)",
    "model_type": "must be a table (a [section] or { key = value })",
    "model_attributes_type": "must be a table (a [section] or { key = value })",
    "dict_type": 'must be a table, like { "key" = "value" }',
    "list_type": 'must be a list, like ["a", "b"]',
    "string_type": "must be a string in quotes",
    "bool_type": "must be true or false",
    "int_type": "must be an integer written without quotes",
    "int_parsing": "must be an integer written without quotes",
    "int_from_float": "must be an integer (a whole number, without a decimal point)",
    "float_type": "must be a number written without quotes",
    "float_parsing": "must be a number written without quotes",
    "finite_number": "must be a finite number",
    "decimal_type": "must be a number written without quotes",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}


def _first_error(file: str, exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    # A misspelt key also makes the real one "missing": name the typo, it is the cause.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, _KeyedError):
        return ConfigError(file, ctx_error.key, _one_line(ctx_error.message))
    key = _key_path(error["loc"])
    message = _human_message(error)
    if message.startswith(("url: ", "markup: ", "api_key_env: ")):
        field, _, message = message.partition(": ")
        key = f"{key}.{field}"
    return ConfigError(file, key, _one_line(message))


def _human_message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "less_than_equal": ("at most", "le"),
        "greater_than": ("greater than", "gt"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds and bounds[kind][1] in ctx:
        word, name = bounds[kind]
        return f"must be {word} {_number_text(ctx[name])}"
    if kind == "literal_error" and "expected" in ctx:
        return f"must be {ctx['expected']}"
    message = str(error["msg"])
    message = re.sub(r"^Input should be", "must be", message)
    return re.sub(r" or instance of \w+", "", message)


def _number_text(value: Any) -> str:
    """Large bounds the way TOML writes them (1_000_000_000_000_000), readable at a glance."""
    if isinstance(value, int) and abs(value) >= 100_000:
        return f"{value:_}"
    if isinstance(value, float | Decimal) and value == int(value):
        return str(int(value))
    return str(value)


def _one_line(message: str) -> str:
    """Errors are one line, whatever text (a key, a value) ended up inside them."""
    return " ".join(message.split())


def _printable(text: str) -> str:
    """Text from outside (a file name, a key) with control characters escaped."""
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _key_path(loc: tuple[int | str, ...]) -> str:
    """('backends', 1, 'url') → 'backends[1].url'; models-table keys are quoted when needed."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # pydantic's marker for "the key itself" (of the table entry just named)
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            # A JSON string is a valid TOML basic string: quotes, newlines etc. come out escaped.
            # Line and paragraph separators, which json leaves raw, are escaped as well.
            quoted = _printable(json.dumps(part, ensure_ascii=False))
            out += f".{quoted}" if out else quoted
    return out
