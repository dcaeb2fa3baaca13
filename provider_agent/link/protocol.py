"""Every wire frame of the coordinator protocol as a pydantic model; decode and encode. No sockets.

The contract is `shared/spec/protocol.md`. Frames accept unknown fields (the protocol grows
additively), and `decode()` never raises: garbage becomes a `BadFrame` the session logs and skips.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from provider_agent.safe_text import model_id_problem

ErrorCode = Literal[
    "out_of_capacity",
    "rate_limited",
    "model_not_loaded",
    "unsupported_format",
    "bad_request",
    "backend_unreachable",
    "backend_timeout",
    "auth_rejected_by_backend",
    "backend_error",
    "cancelled",
    "connection_lost",
    "shutting_down",
    "internal",
]
#: Failures of the serving side; only these count in the heartbeat's `error_rate_60s`.
SERVING_FAILURES: frozenset[str] = frozenset(
    {
        "backend_unreachable",
        "backend_timeout",
        "backend_error",
        "auth_rejected_by_backend",
        "internal",
        "connection_lost",
    }
)


WireFormat = Literal["openai", "anthropic"]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# --- handshake -----------------------------------------------------------------------------------


class AuthChallenge(_Frame):
    type: Literal["auth_challenge"] = "auth_challenge"
    nonce: str


class AuthResponse(_Frame):
    type: Literal["auth_response"] = "auth_response"
    pubkey: str
    signature: str
    agent_version: str
    enrollment_code: str | None = None


class AuthOk(_Frame):
    type: Literal["auth_ok"] = "auth_ok"
    provider_id: str


class AuthFailed(_Frame):
    type: Literal["auth_failed"] = "auth_failed"
    reason: str = ""


# --- capabilities and heartbeat ------------------------------------------------------------------


class Measured(_Frame):
    """What clients actually got from this host for one model over the last `window_s`
    (protocol.md §2): medians over the `job_done`s served, and how many there were."""

    ttft_ms_p50: float
    tokens_per_sec_p50: float
    samples: int
    window_s: int = 900


class ModelOffer(_Frame):
    """One advertised model in `capabilities.models`."""

    model_id: str
    input_per_1m: int
    output_per_1m: int
    max_concurrent: int
    backend: str
    context_window: int | None = None
    formats: list[WireFormat] = Field(default_factory=lambda: list[WireFormat](["openai"]))
    #: Absent until this agent has served the model in the window.
    measured: Measured | None = None


class CapabilityLimits(_Frame):
    max_concurrent_total: int
    max_tokens_per_minute: int | None


class CapabilityMetadata(_Frame):
    agent_version: str
    status: Literal["ready", "draining", "paused"] = "ready"
    #: Additive: when a pause with a duration ends (ISO-8601 UTC); absent for a pause that lasts
    #: until `resume`, and when not paused.
    paused_until: str | None = None


class Capabilities(_Frame):
    type: Literal["capabilities"] = "capabilities"
    models: list[ModelOffer]
    limits: CapabilityLimits
    metadata: CapabilityMetadata


class GpuSample(_Frame):
    """One GPU in `heartbeat.gpus` (protocol.md §3). A field the device does not support is left
    out (None is omitted on the wire); memory in MiB."""

    index: int
    healthy: bool
    uuid: str | None = None
    name: str | None = None
    memory_total_mb: int | None = None
    memory_used_mb: int | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None


class RouteBeat(_Frame):
    """One route in `heartbeat.backends` (protocol.md §9, additive): its concurrency limit (learned
    from its time to first byte, or its ceiling), its jobs in flight and its unloaded baseline."""

    backend: str
    model: str
    limit: int
    in_flight: int
    ttfb_baseline_ms: float | None = None


class Heartbeat(_Frame):
    type: Literal["heartbeat"] = "heartbeat"
    queue_depth: int
    tokens_per_sec_p50: float
    p50_latency_ms: float
    p95_latency_ms: float
    error_rate_60s: float
    last_error_at: str | None
    last_error_code: str | None
    #: Sent when NVML answers on this host, absent otherwise.
    gpus: list[GpuSample] | None = None
    #: Each served route's limit (protocol.md §9); absent before the first pass.
    backends: list[RouteBeat] | None = None


# --- jobs ----------------------------------------------------------------------------------------


#: protocol.md §8: a `job_id` the agent can answer (and store) is 1–128 printable characters.
JOB_ID_MAX_CHARS = 128


def readable_job_id(value: object) -> str | None:
    """`value` when it is a `job_id` the agent can answer (protocol.md §8), else None."""
    if isinstance(value, str) and 0 < len(value) <= JOB_ID_MAX_CHARS and value.isprintable():
        return value
    return None


def _answerable_job_id(value: str) -> str:
    if readable_job_id(value) is None:
        raise ValueError("must be 1-128 printable characters")
    return value


def _model_id_rule(value: str) -> str:
    problem = model_id_problem(value)
    if problem is not None:
        raise ValueError(f"breaks the model-id rule: {problem}")
    return value


def _null_is_absent(default: object) -> BeforeValidator:
    """`null` means the field's default (protocol.md §8: `format: null` is `openai`)."""
    return BeforeValidator(lambda value: default if value is None else value)


class Job(_Frame):
    type: Literal["job"] = "job"
    job_id: Annotated[str, AfterValidator(_answerable_job_id)]
    model_id: Annotated[str, AfterValidator(_model_id_rule)]
    request: dict[str, Any]
    format: Annotated[WireFormat, _null_is_absent("openai")] = "openai"
    #: A JSON integer: a string or a float is `bad_request` (protocol.md §8).
    deadline_ms: Annotated[int, _null_is_absent(60000), Field(gt=0, strict=True)] = 60000


class JobCancel(_Frame):
    type: Literal["job_cancel"] = "job_cancel"
    job_id: str


class JobAck(_Frame):
    type: Literal["job_ack"] = "job_ack"
    job_id: str


class JobChunk(_Frame):
    type: Literal["job_chunk"] = "job_chunk"
    job_id: str
    data: str


class TokenCounts(_Frame):
    input: int
    output: int
    input_tokens: int
    output_tokens: int


class JobDone(_Frame):
    type: Literal["job_done"] = "job_done"
    job_id: str
    tokens: TokenCounts
    duration_ms: int
    usage_source: Literal["estimated"] | None = None


class JobError(_Frame):
    type: Literal["job_error"] = "job_error"
    job_id: str
    error_code: ErrorCode
    message: str
    tokens_emitted: int = 0


class ConfigUpdate(_Frame):
    type: Literal["config_update"] = "config_update"


Frame = Annotated[
    AuthChallenge
    | AuthResponse
    | AuthOk
    | AuthFailed
    | Capabilities
    | Heartbeat
    | Job
    | JobCancel
    | JobAck
    | JobChunk
    | JobDone
    | JobError
    | ConfigUpdate,
    Field(discriminator="type"),
]
_FRAME: TypeAdapter[Frame] = TypeAdapter(Frame)
KNOWN_TYPES: frozenset[str] = frozenset(
    model.model_fields["type"].default
    for model in (
        AuthChallenge,
        AuthResponse,
        AuthOk,
        AuthFailed,
        Capabilities,
        Heartbeat,
        Job,
        JobCancel,
        JobAck,
        JobChunk,
        JobDone,
        JobError,
        ConfigUpdate,
    )
)


class UnknownFrame(BaseModel):
    """A well-formed frame of a type this agent does not know (logged at debug, ignored)."""

    type: str


class BadFrame(BaseModel):
    """Text that is not a valid frame. `job_id` is set when one could be read (so a broken `job`
    can still be answered), and `code` is what to answer it with: `unsupported_format` when the
    `format` alone is wrong, else `bad_request` (protocol.md §8)."""

    reason: str
    type: str | None = None
    job_id: str | None = None
    code: Literal["bad_request", "unsupported_format"] = "bad_request"


#: A run of digits that may be an integer orjson cannot hold exactly (outside -2^63 … 2^64-1).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


def _exact_int(literal: str) -> int | orjson.Fragment:
    """An integer literal as Python's int where orjson writes it back exactly, else as the literal
    itself (an `orjson.Fragment`, written back verbatim): no size is too big, none becomes a
    float, and no huge literal is converted at all (protocol.md §8: same JSON values)."""
    if len(literal) <= 21:
        value = int(literal)
        if _INT_MIN <= value <= _UINT_MAX:
            return value
    return orjson.Fragment(literal)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {literal[:20]}")
    return value


def _loads(text: str | bytes) -> Any:
    """JSON text → Python. orjson, unless the text has a digit run long enough to be an integer
    that orjson would turn into a float; then the stdlib's parser with exact integers, held to
    orjson's rules (strict UTF-8, no NaN or Infinity, finite floats)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _LONG_DIGITS.search(raw) is None:
        return orjson.loads(raw)
    data = json.loads(
        raw.decode("utf-8"),
        parse_int=_exact_int,
        parse_float=_finite_float,
        parse_constant=_reject_constant,
    )
    # orjson refuses an escaped lone surrogate (`"\\ud800"`); so must this path (rare: only
    # frames with a 19-digit run come here, so one more pass over the value is cheap enough).
    if _holds_lone_surrogate(data):
        raise ValueError("a string holds a lone surrogate")
    return data


def _holds_lone_surrogate(value: Any) -> bool:
    """True when a string anywhere in a parsed JSON value (keys included) is not valid UTF-8."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def decode(text: str | bytes) -> Frame | UnknownFrame | BadFrame:
    """Parse one inbound frame. Never raises."""
    try:
        data = _loads(text)
    except (orjson.JSONDecodeError, ValueError, RecursionError) as exc:
        return BadFrame(reason=f"not JSON: {exc}")
    if not isinstance(data, dict):
        return BadFrame(reason="not a JSON object")
    kind = data.get("type")
    job_id = readable_job_id(data.get("job_id"))
    if not isinstance(kind, str):
        return BadFrame(reason="no string `type`", job_id=job_id)
    if kind not in KNOWN_TYPES:
        return UnknownFrame(type=kind)
    try:
        return _FRAME.validate_python(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"][1:])
        fields = {error["loc"][1] for error in errors if len(error["loc"]) > 1}
        code: Literal["bad_request", "unsupported_format"] = (
            "unsupported_format" if kind == "job" and fields == {"format"} else "bad_request"
        )
        return BadFrame(
            reason=f"invalid {kind}: {where}: {first['msg']}", type=kind, job_id=job_id, code=code
        )


def encode(frame: _Frame) -> str:
    """Serialise one outbound frame (None-valued optional extensions are left out, except the
    fields the contract says are nullable)."""
    data = frame.model_dump(mode="json", exclude_none=True)
    if isinstance(frame, Heartbeat):
        data.setdefault("last_error_at", None)
        data.setdefault("last_error_code", None)
    elif isinstance(frame, Capabilities):
        data["limits"]["max_tokens_per_minute"] = frame.limits.max_tokens_per_minute
    return orjson.dumps(data).decode()
