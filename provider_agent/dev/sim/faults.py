"""Misbehaviour on demand: the faults a simulator shows, and how a `usage` fault rewrites the
token counts a backend reports. A fault is data (a pydantic model) so that the command line
(`KIND[:ARG]`) and an out-of-process simulator (`POST /__sim/fault`, JSON) can set it too.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Each fault kind's command-line argument: (field, what it must be), or None.
_FAULT_ARGS: Final[dict[str, tuple[str, str] | None]] = {
    "refuse": None,
    "http": ("status", "STATUS needs a status of 400-599"),
    "hang": None,
    "die": ("after_tokens", "N needs a whole number of tokens ≥ 0"),
    "error": ("after_tokens", "N needs a whole number of tokens ≥ 0"),
    "slow_health": ("delay_s", "SECONDS needs 0-3600 seconds"),
    "loading": None,
    "usage": ("usage_figure", "JSON needs a JSON value"),
}
_FAULT_SPECS: Final = (
    "refuse, http:STATUS, hang, die:N, error:N, slow_health:SECONDS, loading, usage:JSON"
)
FaultKind = Literal["refuse", "http", "hang", "die", "error", "slow_health", "loading", "usage"]
#: The token counts a `usage` fault replaces: output, input (`total_tokens` goes with either).
_OUTPUT_FIGURES: Final = ("completion_tokens", "output_tokens", "predicted_n")
_INPUT_FIGURES: Final = ("prompt_tokens", "input_tokens", "prompt_n")
RouteClass = Literal["health", "discovery", "completion", "other"]


class Fault(BaseModel):
    """A misbehaviour, for every matching request (`count=None`) or the next `count` ones.

    - `refuse`: every new connection is reset before a byte is read (count: connections). A port
      that is really closed is `await sim.kill()` (closes the port and resets every connection,
      like a crash) and `await sim.restart()` (listens again on the same port).
    - `http` (`status`: 5xx, 404, 429 with `Retry-After`, 401, …): the kind's error body.
    - `hang`: read the request, never answer (until the client gives up, recorded, or the sim
      stops).
    - `die` (`after_tokens`): cut the connection after N tokens, without the end marker.
    - `error` (`after_tokens`): the kind's mid-stream error event after N tokens, then whatever
      that kind does next (`[DONE]`, or close without it; Ollama's `/v1` just ends the stream).
    - `slow_health` (`delay_s`) and `loading`: the kind's health probe answers late, or "not
      ready": 503 (llama.cpp's `Loading model` on every non-public path, with `meta: null`
      listings), LM Studio lists its models as not loaded; the other kinds answer 503 on their
      health probe.
    - `usage` (`usage_figure`, any JSON value, `usage_side`): the completion runs as usual, but
      every token count it reports says `usage_figure` instead — output (`completion_tokens`,
      `output_tokens`, llama.cpp's `predicted_n`), input (`prompt_tokens`, `input_tokens`,
      `prompt_n`) or both, with `total_tokens` too, in the usage chunk, `message_start`,
      `message_delta`, `timings` and whole answers alike. A figure beyond 64 bits is written
      exactly (`2**64`, `10**30`); a non-finite float as `NaN`/`Infinity`, which is not JSON (a
      backend's bug).

    `http` and `hang` apply to completions unless `scope="all"` (then to health and discovery
    too); `die`, `error` and `usage` to completions only; `slow_health` and `loading` count
    health probes. `sim.fault_queue` holds faults that follow, in order: each becomes `sim.fault`
    as soon as the one before is spent (its `count` reached; a fault without one is never spent),
    so that no request passes between them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    status: int = Field(500, ge=400, le=599, description="http: the status answered")
    after_tokens: int = Field(0, ge=0, description="die/error: tokens written first")
    delay_s: float = Field(2.0, ge=0, le=3600, description="slow_health: the delay")
    usage_figure: Any = Field(None, description="usage: reported instead of the token counts")
    usage_side: Literal["output", "input", "both"] = "output"
    count: int | None = Field(None, ge=1, description="matching requests it lasts; None: all")
    scope: Literal["completions", "all"] = "completions"

    @classmethod
    def from_spec(cls, spec: str, count: int | None = None, scope: str = "completions") -> Fault:
        """`KIND[:ARG]` from the command line: `http:503`, `die:5`, `error:3`, `slow_health:2.5`,
        `hang`, `loading`, `refuse`. ValueError with a one-line reason otherwise."""
        kind, _, arg = spec.partition(":")
        if kind not in _FAULT_ARGS:
            raise ValueError(f"--fault must be one of {_FAULT_SPECS}, not {spec!r}")
        fields: dict[str, Any] = {"kind": kind, "scope": scope}
        takes = _FAULT_ARGS[kind]
        if arg and takes is None:
            raise ValueError(f"--fault {kind} takes no argument, not {spec!r}")
        if arg and takes is not None:
            fields[takes[0]] = arg
        if kind == "usage":
            try:
                fields["usage_figure"] = json.loads(arg)
            except ValueError:
                raise ValueError(f"--fault usage:JSON needs a JSON value, not {spec!r}") from None
        try:
            fault = cls.model_validate(fields)
        except ValidationError:
            assert takes is not None  # kind and scope come from closed sets
            raise ValueError(f"--fault {kind}:{takes[1]}, not {spec!r}") from None
        if count is not None and count < 1:
            raise ValueError(f"--fault-count must be ≥ 1, not {count}")
        return fault.model_copy(update={"count": count})

    def applies_to(self, route: RouteClass) -> bool:
        if self.kind in ("slow_health", "loading"):
            return route == "health"
        if self.kind in ("die", "error", "usage"):
            return route == "completion"
        if self.kind in ("http", "hang"):
            return route == "completion" or (self.scope == "all" and route != "other")
        return False


def _figure_names(fault: Fault) -> tuple[str, ...]:
    side = fault.usage_side
    names = (_OUTPUT_FIGURES if side != "input" else ()) + (
        _INPUT_FIGURES if side != "output" else ()
    )
    return (*names, "total_tokens")


def absurd_usage(obj: Any, fault: Fault) -> Any:
    """`obj` (a chunk, an event or a whole answer) with the token counts it reports replaced by
    the `usage` fault's figure: in `usage`, `message.usage` (`message_start`) and `timings`."""
    if not isinstance(obj, dict):
        return obj
    names = _figure_names(fault)
    out = dict(obj)
    message = out.get("message")
    if isinstance(message, dict) and isinstance(message.get("usage"), dict):
        out["message"] = absurd_usage(message, fault)
    for part in ("usage", "timings"):
        report = out.get(part)
        if isinstance(report, dict):
            out[part] = {k: fault.usage_figure if k in names else v for k, v in report.items()}
    return out


def absurd_sse(data: bytes, fault: Fault) -> bytes:
    """SSE bytes with each `data:` line's token counts replaced (`absurd_usage`)."""
    lines = data.split(b"\n")
    for index, line in enumerate(lines):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            obj = orjson.loads(line[6:])
        except orjson.JSONDecodeError:
            continue
        changed = absurd_usage(obj, fault)
        if changed != obj:
            lines[index] = b"data: " + json.dumps(changed, separators=(",", ":")).encode()
    return b"\n".join(lines)
