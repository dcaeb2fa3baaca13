"""Which frames an agent sends break `protocol.md`, and how. Pure: text or records in, reasons out.

This is the coordinator's own reading of the contract, written apart from the agent's `protocol`
models (which are lenient on purpose): strict types (a number is a number, not "2"), every bound
and cross-field rule protocol.md states, and the per-job rules (chunks only for a job sent to that
agent and before its end, one terminal frame per job_id, a repeat identical to the first). Each
reason is one line a failing test can show.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from provider_agent.dev.coordinator.records import JobRecord
from provider_agent.link.protocol import (
    SERVING_FAILURES,
    ErrorCode,
    Frame,
    JobDone,
    JobError,
    encode,
)

#: One `job_chunk` frame carries at most this much JSON (a coordinator's default frame limit).
MAX_CHUNK_FRAME_BYTES: Final = 1024 * 1024
MAX_JOB_ID_CHARS: Final = 128
MAX_MODEL_ID_CHARS: Final = 256
#: What an agent sends after `auth_ok`.
AGENT_TYPES: Final = frozenset({"capabilities", "heartbeat", "job_chunk", "job_done", "job_error"})
#: Frame types only a coordinator sends; an agent sending one has its direction wrong.
COORDINATOR_TYPES: Final = frozenset(
    {"auth_challenge", "auth_ok", "auth_failed", "job", "job_cancel", "job_ack", "config_update"}
)
#: ISO-8601 UTC with a `Z`, as every timestamp on the wire (`2026-11-26T22:15:08.123Z`).
_UTC_Z: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
_ERRORS_SHOWN: Final = 3

WireFormat = Literal["openai", "anthropic"]
JobId = Annotated[str, Field(min_length=1, max_length=MAX_JOB_ID_CHARS)]
Count = Annotated[int, Field(ge=0)]
Amount = Annotated[float, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(min_length=1)]


class _Rule(BaseModel):
    """A frame as the contract describes it; unknown fields are allowed (the protocol grows)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class AuthResponseRule(_Rule):
    type: Literal["auth_response"]
    pubkey: Text
    signature: Text
    agent_version: Text
    enrollment_code: str | None = None


class MeasuredRule(_Rule):
    ttft_ms_p50: Amount
    tokens_per_sec_p50: Amount
    samples: Positive
    window_s: Annotated[float, Field(gt=0)]


class OfferRule(_Rule):
    model_id: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_ID_CHARS)]
    input_per_1m: Count
    output_per_1m: Count
    max_concurrent: Positive
    backend: Text
    formats: Annotated[list[WireFormat], Field(min_length=1)]
    #: Omitted when unknown; present as null is a problem (see `_capabilities_problems`).
    context_window: Positive | None = None
    measured: MeasuredRule | None = None


class LimitsRule(_Rule):
    max_concurrent_total: Positive
    max_tokens_per_minute: Positive | None


class MetadataRule(_Rule):
    agent_version: Text
    status: Literal["ready", "draining", "paused"]
    hostname: str | None = None


class CapabilitiesRule(_Rule):
    type: Literal["capabilities"]
    models: list[OfferRule]
    limits: LimitsRule
    metadata: MetadataRule


class GpuRule(_Rule):
    """One GPU; a field the device does not support is omitted, so only these two are required."""

    index: Count
    healthy: bool
    uuid: str | None = None
    name: str | None = None
    memory_total_mb: Amount | None = None
    memory_used_mb: Amount | None = None
    utilization_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    temperature_c: float | None = None
    power_w: Amount | None = None


class RouteBeatRule(_Rule):
    """protocol.md §9: a route's limit is at least 1."""

    backend: str
    model: str
    limit: Annotated[int, Field(ge=1)]
    in_flight: Count
    ttfb_baseline_ms: Amount | None = None


class HeartbeatRule(_Rule):
    type: Literal["heartbeat"]
    queue_depth: Count
    tokens_per_sec_p50: Amount
    p50_latency_ms: Amount
    p95_latency_ms: Amount
    error_rate_60s: Annotated[float, Field(ge=0, le=1)]
    last_error_at: str | None
    last_error_code: ErrorCode | None
    gpus: list[GpuRule] | None = None
    backends: list[RouteBeatRule] | None = None


class JobChunkRule(_Rule):
    type: Literal["job_chunk"]
    job_id: JobId
    data: str


class TokensRule(_Rule):
    input: Count
    output: Count
    input_tokens: Count
    output_tokens: Count


class JobDoneRule(_Rule):
    type: Literal["job_done"]
    job_id: JobId
    tokens: TokensRule
    duration_ms: Count
    usage_source: Literal["estimated"] | None = None


class JobErrorRule(_Rule):
    type: Literal["job_error"]
    job_id: JobId
    error_code: ErrorCode
    message: str
    tokens_emitted: Count


_RULES: Final[dict[str, type[_Rule]]] = {
    "auth_response": AuthResponseRule,
    "capabilities": CapabilitiesRule,
    "heartbeat": HeartbeatRule,
    "job_chunk": JobChunkRule,
    "job_done": JobDoneRule,
    "job_error": JobErrorRule,
}


@dataclass(frozen=True)
class Verdict:
    """What the contract says about one frame an agent sent."""

    #: The frame's `type`, when one could be read.
    kind: str | None
    problems: tuple[str, ...] = ()
    #: The parsed JSON object, when the text was one.
    data: dict[str, Any] | None = None
    #: False for a well-formed frame of a type protocol.md does not name: ignored, no problem.
    known: bool = True
    #: A valid `job_chunk`'s decoded bytes.
    chunk: bytes | None = None


def check_agent_frame(text: str | bytes, *, handshake: bool = False) -> Verdict:
    """Judge one frame an agent sent: during the handshake only `auth_response` is expected,
    after it only what an agent sends (§2–§5)."""
    if isinstance(text, bytes):
        return Verdict(None, ("binary frame (frames are text)",))
    prefix = "handshake: " if handshake else ""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return Verdict(None, (f"{prefix}not JSON: {exc}",))
    if not isinstance(data, dict):
        return Verdict(None, (f"{prefix}not a JSON object",))
    kind = data.get("type")
    if not isinstance(kind, str):
        return Verdict(None, (f"{prefix}no string `type`",), data)
    if handshake and kind != "auth_response":
        return Verdict(kind, (f"handshake: expected auth_response (got type={kind})",), data)
    if not handshake and (kind in COORDINATOR_TYPES or kind == "auth_response"):
        return Verdict(kind, (f"{kind} is not a frame an agent sends now",), data)
    if kind == "job_chunk" and _plain_chunk(data):
        # The hot path (every relayed token): the shape a model would check, checked by hand.
        chunk, problems = _chunk_problems(JobChunkRule.model_construct(**data), text)
        return Verdict(kind, tuple(problems), data, chunk=chunk)
    rule = _RULES.get(kind)
    if rule is None:
        return Verdict(kind, (), data, known=False)
    parsed, problems = _validate(rule, kind, data)
    if parsed is None:
        return Verdict(kind, tuple(prefix + p for p in problems), data)
    chunk = None
    if isinstance(parsed, JobChunkRule):
        chunk, more = _chunk_problems(parsed, text)
        problems += more
    else:
        problems += _frame_problems(parsed)
    return Verdict(kind, tuple(prefix + p for p in problems), data, chunk=chunk)


def contract_problems(frame: Frame) -> list[str]:
    """The problems of one of this package's frames as it goes on the wire (empty: fine)."""
    return list(check_agent_frame(encode(frame)).problems)


def chunk_problems(job: JobRecord | None, provider_id: str, job_id: str) -> list[str]:
    """A chunk belongs to a job sent to this agent, before that job's terminal frame."""
    if job is None or job.dispatched_at is None or job.provider_id != provider_id:
        return [f"job_chunk for a job not sent to this agent: {job_id}"]
    if job.terminal is not None:
        return [f"job_chunk after the terminal frame: {job_id}"]
    return []


def terminal_problems(
    job: JobRecord | None, provider_id: str, frame: JobDone | JobError, attempt: int
) -> list[str]:
    """A terminal frame closes a job of this agent's once; a repeat (the outbox re-sending, or the
    answer to a repeated `job`) is the same frame. `attempt` is the connection it came on."""
    if job is None:
        return []  # unknown here, e.g. sent before this coordinator restarted: nothing to compare
    problems: list[str] = []
    if job.provider_id != provider_id:
        problems.append(f"terminal frame for another provider's job {frame.job_id}")
    if job.terminal is not None:
        if frame.model_dump() != job.terminal.model_dump():
            problems.append(f"resent terminal frame differs: {frame.job_id}")
        return problems
    same_connection = job.sent == 1 and job.sent_on == attempt and not job.chunks_elsewhere
    if (
        isinstance(frame, JobError)
        and same_connection
        and not problems
        and frame.tokens_emitted != job.bytes_relayed
    ):
        problems.append(
            f"job_error.tokens_emitted is {frame.tokens_emitted} but {job.bytes_relayed} bytes "
            f"came in job_chunk frames: {frame.job_id}"
        )
    return problems


# --- the rules the models cannot express --------------------------------------------------------


def _validate(rule: type[_Rule], kind: str, data: dict[str, Any]) -> tuple[_Rule | None, list[str]]:
    """Strictly first (the usual, cheap path); a frame that only passes with coercion is loosely
    typed (still judged further); one that fails both is invalid (judged no further)."""
    try:
        return rule.model_validate(data, strict=True), []
    except ValidationError as strict_error:
        try:
            lax = rule.model_validate(data)
        except ValidationError as error:
            return None, [f"invalid {kind}: {_describe(error)}"]
        return lax, [f"{kind} is loosely typed: {_describe(strict_error)}"]


def _describe(error: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in item['loc']) or '(frame)'}: {item['msg']}"
        for item in error.errors()
    ]
    more = f" (and {len(parts) - _ERRORS_SHOWN} more)" if len(parts) > _ERRORS_SHOWN else ""
    return "; ".join(parts[:_ERRORS_SHOWN]) + more


def _frame_problems(frame: _Rule) -> list[str]:
    if isinstance(frame, CapabilitiesRule):
        return _capabilities_problems(frame)
    if isinstance(frame, HeartbeatRule):
        return _heartbeat_problems(frame)
    if isinstance(frame, JobDoneRule):
        tokens = frame.tokens
        if tokens.input != tokens.input_tokens or tokens.output != tokens.output_tokens:
            return ["job_done.tokens: input/output differ from input_tokens/output_tokens"]
    return []


def _show(model_id: str) -> str:
    return repr(model_id if len(model_id) <= 60 else model_id[:60] + "…")


def _capabilities_problems(caps: CapabilitiesRule) -> list[str]:
    problems: list[str] = []
    ids = [offer.model_id for offer in caps.models]
    if ids != sorted(ids):
        problems.append("capabilities.models not sorted by model_id")
    if len(set(ids)) != len(ids):
        problems.append("capabilities.models has duplicate model_id")
    for offer in caps.models:
        where = f"capabilities.models[{_show(offer.model_id)}]"
        if not offer.model_id.isprintable():
            problems.append(f"{where}.model_id has control or unprintable characters")
        elif offer.model_id.isspace():
            problems.append(f"{where}.model_id is only whitespace")
        if len(set(offer.formats)) != len(offer.formats):
            problems.append(f"{where}.formats repeats a format")
        problems.extend(
            f"{where}.{name} is null (omit it when unknown)"
            for name in ("context_window", "measured")
            if name in offer.model_fields_set and getattr(offer, name) is None
        )
        if offer.max_concurrent > caps.limits.max_concurrent_total:
            problems.append(f"{where}.max_concurrent above limits.max_concurrent_total")
    status = caps.metadata.status
    if status != "ready" and caps.models:
        problems.append(f"capabilities: {status} but models is not empty")
    return problems


def _heartbeat_problems(beat: HeartbeatRule) -> list[str]:
    problems: list[str] = []
    if beat.p95_latency_ms < beat.p50_latency_ms:
        problems.append("heartbeat.p95_latency_ms below p50_latency_ms")
    if (beat.last_error_at is None) != (beat.last_error_code is None):
        problems.append("heartbeat.last_error_at and last_error_code disagree on null")
    if beat.last_error_at is not None and not _is_utc_z(beat.last_error_at):
        problems.append(
            f"heartbeat.last_error_at is not ISO-8601 UTC ending in Z: {beat.last_error_at!r}"
        )
    if beat.last_error_code is not None and beat.last_error_code not in SERVING_FAILURES:
        problems.append(
            f"heartbeat.last_error_code {beat.last_error_code} is not a serving-side failure"
        )
    for gpu in beat.gpus or []:
        total, used = gpu.memory_total_mb, gpu.memory_used_mb
        if total is not None and used is not None and used > total:
            problems.append(f"heartbeat.gpus[{gpu.index}].memory_used_mb above memory_total_mb")
    indices = [gpu.index for gpu in beat.gpus or []]
    if len(set(indices)) != len(indices):
        problems.append("heartbeat.gpus has duplicate index")
    return problems


def _is_utc_z(text: str) -> bool:
    if not _UTC_Z.fullmatch(text):
        return False
    seconds, _, _ = text[:-1].partition(".")  # the fraction's digits are the pattern's concern
    try:
        datetime.fromisoformat(seconds + "+00:00")
    except ValueError:
        return False
    return True


def _plain_chunk(data: dict[str, Any]) -> bool:
    """A `job_chunk` with exactly its three fields, a job_id of 1–128 characters and string data:
    what JobChunkRule accepts, decided without building the model."""
    job_id = data.get("job_id")
    return (
        len(data) == 3
        and isinstance(job_id, str)
        and 0 < len(job_id) <= 128
        and isinstance(data.get("data"), str)
    )


def _chunk_problems(chunk: JobChunkRule, text: str) -> tuple[bytes | None, list[str]]:
    problems: list[str] = []
    size = len(text) if text.isascii() else len(text.encode())
    if size > MAX_CHUNK_FRAME_BYTES:
        problems.append(f"job_chunk is {size} bytes, over the 1 MiB one frame may carry")
    try:
        data = base64.b64decode(chunk.data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        return None, [*problems, "job_chunk.data is not base64"]
    return data, problems
