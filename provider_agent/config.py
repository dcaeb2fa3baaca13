"""agent.toml: the pydantic models (the schema, written once) and `load()`.

The contract is `shared/spec/config.md`. Every rule there is enforced here, so every command that
reads the file applies all of them, and every error is one line naming the file and the key path.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from provider_agent.errors import ConfigError

BackendKind = Literal["vllm", "llamacpp", "lmstudio", "ollama", "openrouter", "venice"]
WireFormat = Literal["openai", "anthropic"]
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
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(?P<port>\d{1,5})")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f]")

# Numbers are strict: TOML is typed, so `max_concurrent = "8"` or `= true` is a mistake to report,
# not something to coerce. (Floats still accept TOML integers: `interval_s = 300` is fine.)
StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]


def _state_directory() -> Path | None:
    """systemd's `StateDirectory=` (first entry), which wins over the configured paths."""
    value = os.environ.get("STATE_DIRECTORY", "")
    return Path(value.split(":")[0]) if value else None


def _default_key_path() -> Path:
    state = _state_directory()
    return state / "identity.key" if state else Path("~/.provider-agent/identity.key").expanduser()


def _default_state_dir() -> Path:
    return _state_directory() or Path("~/.local/state/provider-agent").expanduser()


class _Section(BaseModel):
    """Every table rejects unknown keys: they are almost always typos."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OperatorConfig(_Section):
    display_name: str | None = None
    wallet: str | None = None
    contact_email: str | None = None

    @field_validator("wallet")
    @classmethod
    def _wallet_is_base58(cls, value: str | None) -> str | None:
        if value is not None and not _BASE58.fullmatch(value):
            raise ValueError("must be a Solana base58 address (32-44 base58 characters)")
        return value


class CoordinatorConfig(_Section):
    url: str
    enrollment_code: str | None = None
    heartbeat_interval_s: Annotated[StrictFloat, Field(ge=1, le=300)] = 15

    @field_validator("url")
    @classmethod
    def _secure_scheme(cls, value: str, info: ValidationInfo) -> str:
        allow_insecure = bool(info.context and info.context.get("allow_insecure"))
        scheme, sep, rest = value.partition("://")
        if not sep or not rest:
            raise ValueError("must be a wss:// URL")
        if scheme == "wss" or (scheme == "ws" and allow_insecure):
            return value
        if scheme == "ws":
            raise ValueError(
                "ws:// is not encrypted: use wss://, or pass --allow-insecure for testing"
            )
        raise ValueError(
            f"scheme {scheme!r} is not allowed: use wss:// (or ws:// with --allow-insecure)"
        )


class IdentityConfig(_Section):
    key_path: Path = Field(default_factory=_default_key_path)

    @field_validator("key_path")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class DiscoveryConfig(_Section):
    interval_s: Annotated[StrictFloat, Field(ge=5, le=86400)] = 300
    timeout_s: Annotated[StrictFloat, Field(ge=1, le=60)] = 5


class BackendConfig(_Section):
    kind: BackendKind
    url: str | None = None
    api_key_env: str | None = None
    markup: Annotated[Decimal, Field(ge=0, le=10)] = Decimal(0)
    models: list[str] | None = None
    name: Annotated[str, Field(min_length=1)] | None = None
    priority: StrictInt | None = None
    aliases: dict[str, str] = Field(default_factory=dict)
    formats: Annotated[list[WireFormat], Field(min_length=1)] | None = None
    max_concurrent: Annotated[StrictInt, Field(ge=1, le=256)] | None = None

    @field_validator("url")
    @classmethod
    def _http_root(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        # Never echo the value: an operator may have pasted the key itself here.
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits and _), "
                "not the API key itself"
            )
        return value

    @field_validator("markup", mode="before")
    @classmethod
    def _exact_markup(cls, value: Any) -> Any:
        # TOML floats arrive as binary floats; str() gives back the decimal the operator wrote.
        return str(value) if isinstance(value, float) else value

    @model_validator(mode="after")
    def _kind_rules(self) -> BackendConfig:
        if self.kind in LOCAL_KINDS:
            if self.url is None:
                raise ValueError(f"url: required for kind {self.kind!r} (the server root)")
            if self.url.endswith("/v1"):
                raise ValueError("url: must be the server root, without /v1")
            if self.markup != 0:
                raise ValueError(f"markup: only for openrouter/venice, not for kind {self.kind!r}")
        elif self.api_key_env is None:
            raise ValueError(f"api_key_env: required for kind {self.kind!r}")
        return self

    @property
    def label(self) -> str:
        """The backend's name in logs and tables: `name`, else `<kind>:<url>`, else `<kind>`."""
        if self.name:
            return self.name
        return f"{self.kind}:{self.url}" if self.url else self.kind

    @property
    def effective_priority(self) -> int:
        return DEFAULT_PRIORITY[self.kind] if self.priority is None else self.priority

    @property
    def is_byok(self) -> bool:
        return self.kind in BYOK_KINDS


class ModelPrice(_Section):
    input_per_1m: Annotated[StrictInt, Field(ge=0)]
    output_per_1m: Annotated[StrictInt, Field(ge=0)]


class PricingConfig(_Section):
    default_input_per_1m: Annotated[StrictInt, Field(gt=0)]
    default_output_per_1m: Annotated[StrictInt, Field(gt=0)]
    models: dict[str, ModelPrice] = Field(default_factory=dict)


class LimitsConfig(_Section):
    max_concurrent: Annotated[StrictInt, Field(ge=1, le=256)] = 8
    max_tokens_per_minute: Annotated[StrictInt, Field(ge=1)] | None = None


class ObservabilityConfig(_Section):
    prometheus_addr: str = "127.0.0.1:9090"
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("prometheus_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "":
            return value
        match = _HOST_PORT.fullmatch(value)
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError('must be "HOST:PORT" (or "" to disable the HTTP endpoint)')
        return value

    @property
    def listen(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP endpoint, or None when disabled."""
        match = _HOST_PORT.fullmatch(self.prometheus_addr)
        return (match["host"].strip("[]"), int(match["port"])) if match else None


class StateConfig(_Section):
    dir: Path = Field(default_factory=_default_state_dir)
    drain_timeout_s: Annotated[StrictFloat, Field(ge=0, le=3600)] = 60

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return _state_directory() or value.expanduser()


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
    state: StateConfig = Field(default_factory=StateConfig)

    @model_validator(mode="after")
    def _no_duplicate_backends(self) -> Config:
        # Names are unique *including the defaults* (`label`): logs, metrics and routes name a
        # backend by it, so two unnamed openrouter backends with different keys would collide.
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


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--config`, else $PROVIDER_AGENT_CONFIG, else the XDG file if present, else ./agent.toml."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidate = xdg / "provider-agent" / "agent.toml"
    return candidate if candidate.exists() else Path("agent.toml")


def load(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> Config:
    """Read and validate agent.toml; raise ConfigError (one line, key path named) on any problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            file, "", "no such file (create one with `provider-agent init`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"cannot read: {exc}") from None
    return parse(text, file=file, allow_insecure=allow_insecure)


def parse(text: str, *, file: str = "agent.toml", allow_insecure: bool = False) -> Config:
    """Validate TOML text as agent.toml (what `load` does after reading the file)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", _toml_message(str(exc))) from None
    try:
        return Config.model_validate(data, context={"allow_insecure": allow_insecure})
    except ValidationError as exc:
        raise _first_error(file, exc) from None


def _toml_message(message: str) -> str:
    """tomllib says "Cannot overwrite a value" for a repeated key; say `duplicate` plainly."""
    if message.startswith(("Cannot overwrite", "Cannot declare")):
        where = message[message.find("(") :] if "(" in message else ""
        return f"TOML syntax error: duplicate key or table {where}".rstrip()
    return f"TOML syntax error: {message}"


def _first_error(file: str, exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    # A misspelt key also makes the real one "missing": name the typo, it is the cause.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, _KeyedError):
        return ConfigError(file, ctx_error.key, _one_line(ctx_error.message))
    key = _key_path(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling against agent.toml.example)"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif message.startswith(("url: ", "markup: ", "api_key_env: ")):
        field, _, message = message.partition(": ")
        key = f"{key}.{field}"
    return ConfigError(file, key, _one_line(message))


def _one_line(message: str) -> str:
    """Errors are one line, whatever text (a key, a value) ended up inside them."""
    return " ".join(message.split())


def _key_path(loc: tuple[int | str, ...]) -> str:
    """('backends', 1, 'url') → 'backends[1].url'; models-table keys are quoted when needed."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            # A JSON string is a valid TOML basic string: quotes, newlines etc. come out escaped.
            # Line and paragraph separators, which json leaves raw, are escaped as well.
            quoted = _UNPRINTABLE.sub(
                lambda m: f"\\u{ord(m[0]):04x}", json.dumps(part, ensure_ascii=False)
            )
            out += f".{quoted}" if out else quoted
    return out
