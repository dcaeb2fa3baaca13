"""Benchmark: 10,000 hostile inbound frames through a live session.

    .venv/bin/python bench/fuzz.py [--frames 10000] [--seed 7] [--near-limit 3]

The agent (`provider-agent run --log-level debug`, JSON logs) runs as a child process with two
backends: a simulated vLLM and a simulated OpenRouter that demands a BYOK key. The reference
coordinator (`DevCoordinator`, in this process) sends it frames from a seeded generator through
its `send` hook, after the agent authenticated, as fast as the socket takes them. The classes:
invalid JSON, wrong types in every field of every inbound frame type, missing fields, unknown and
non-string types, strings just under the 16 MiB frame limit (`--near-limit`), deep nesting (to
100,000 levels), non-UTF-8 (binary frames of invalid UTF-8, lone-surrogate escapes in text; a text
frame of invalid UTF-8 is a WebSocket protocol error that RFC 6455 answers with close 1007, not a
frame, so it is not sent), binary frames, colliding job ids (in flight and ended), cancels for
unknown jobs, acks for unknown jobs, handshake frames after the handshake, jobs for unknown
models, `request` not an object, absurd deadlines and formats, control characters and long
strings in ids — and, between them, well-formed jobs for both backends, so hostile frames meet
jobs in flight. The simulators are also told to report absurd usage figures for the first
completions (the `usage` fault, each figure for two): token counts of 2^63, 2^64, 10^30,
10^12 + 1, -1, ±1e300, 12.5, "12", true, null, [], {}, NaN and Infinity (not JSON), as output,
input or both, in OpenAI usage chunks and Anthropic `message_start` / `message_delta` events
(vLLM) and in OpenRouter's usage chunk; and to fail some completions (401, a mid-stream error,
a cut) from a third and two thirds of the way on, once those figures are served.

A frame is job-shaped when it is a JSON object (RFC 8259, as orjson reads it) with `"type":"job"`
and a `job_id` the agent can answer: a string of 1–128 printable characters (protocol.md §8,
`provider_agent.link.protocol.readable_job_id`); such a job_id must get exactly one distinct
terminal frame (repeats of it identical), and no other id any — a `job` with an unreadable job_id is
dropped. Where a job-shaped frame's fields alone decide its answer (§8), the answer is predicted
and checked: a `model_id` breaking the model-id rule (1–256 printable characters, not only
whitespace), a `request` not an object, or a `deadline_ms` that is not a positive JSON integer
→ `bad_request`; a `format` other than "openai", "anthropic" or null, and nothing else wrong →
`unsupported_format`.

Targets (shared/spec/benchmarks.md): the session survives every frame (the one exception, a
frame over 16 MiB that the agent closes with 1009, is sent last, and the agent must come back);
each job-shaped job_id gets exactly one distinct terminal frame; no traceback in the agent's log
(a debug-level one that a handled error attaches is shown, not counted); no frame the agent sends
breaks the contract (`check_agent_frame`, and no chunk after its job's terminal frame); memory
flat: the frames go in `--parts` parts, and VmRSS once the last part is answered is at most
`--rss-slack-mb` above VmRSS once the first part was (a leak grows with every part; what the
first part costs once — pools, caches, the allocator's high-water mark — is not a leak); and a
secrets canary — the OpenRouter key (in the agent's environment, used on every discovery and
job) and the enrollment code (sent once, in the first `auth_response`) — never seen in a log
line, a frame the agent sent after the handshake, a systemd STATUS notification
(`NOTIFY_SOCKET`), the HTTP endpoint's /metrics, /status, /healthz, /readyz (when this build
serves them) or `provider-agent status --json` (when it has that command).

And for the absurd usage figures (protocol.md §8: counts outside 0–10^12 are not believed, no
figure from a backend can stop the agent or another job): every job a simulator served with a
`usage` fault ends `job_done` with `usage_source: "estimated"`, or with an error that is not
the figure's doing (cancelled, backend_timeout, connection_lost, shutting_down); one whose
figure was a number outside 0–10^12 has exactly one "not believed" warning naming it; the
agent's process never exits before the final SIGTERM; and `provider-agent earnings` (totals and
`--csv`) still reads the ledger afterwards.

Prints a table and one summary line; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import orjson
from _common import AGENT, BenchError, Child, Table, free_port, rss_mb, run_bench

from provider_agent.dev.coordinator import DevCoordinator, check_agent_frame
from provider_agent.dev.sim.core import SimBackend
from provider_agent.dev.sim.faults import Fault
from provider_agent.link.protocol import readable_job_id

FRAME_LIMIT = 16 * 1024 * 1024
VLLM_MODEL = "m"
BYOK_MODEL = "meta-llama/llama-3.3-70b-instruct"
KEY_ENV = "FUZZ_OPENROUTER_KEY"
ENROLL_ENV = "PROVIDER_AGENT_ENROLLMENT_CODE"
TERMINAL_TYPES = frozenset({"job_done", "job_error"})
SETTLE_S = 2.0
ANSWER_WITHIN_S = 180.0
#: The largest token count a backend is believed (protocol.md §8).
MAX_BELIEVED = 10**12
#: Usage figures the simulators report (the `usage` fault), each for a few completions.
ABSURD_FIGURES: tuple[Any, ...] = (
    *(2**63, 2**64, 2**64 - 1, 10**30, MAX_BELIEVED + 1, -1, -(2**63) - 1),
    *(1e300, -1e300, 12.5, "12", True, None, [], {}, math.nan, math.inf),
)
BYOK_FIGURES: tuple[Any, ...] = (2**63, 2**64, 10**30, -1, 1e300, "12", None, math.nan)
USAGE_SIDES = ("output", "input", "both")
#: Completions each usage fault lasts.
USAGE_FAULT_COUNT = 2
#: How a job whose backend reported absurd usage may end besides an estimated `job_done`: ends
#: that are not the figure's doing.
NOT_THE_FIGURES_DOING = frozenset(
    {"cancelled", "backend_timeout", "connection_lost", "shutting_down"}
)


# --- the coordinator side -------------------------------------------------------------------------


class RecordingCoordinator(DevCoordinator):
    """The reference coordinator, keeping every frame an agent sends after its handshake."""

    def __init__(self) -> None:
        super().__init__(host="127.0.0.1", port=0)
        self.frames: list[str | bytes] = []

    async def _on_frame(self, link: Any, record: Any, text: str | bytes, *more: Any) -> None:
        self.frames.append(text)
        await super()._on_frame(link, record, text, *more)


# --- the hostile frames ---------------------------------------------------------------------------

#: Values of every JSON type, and the awkward ones of each.
WRONG_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    2**63,
    2**64 + 1,
    -(2**70),
    1e308,
    "",
    " ",
    "0",
    "60000",
    "null",
    "x" * 5000,
    "\u0000\u001b[31m\r\n",
    "é🚀\u202e",
    [],
    [1, 2],
    ["job"],
    {},
    {"a": 1},
    {"type": "job"},
)
JOB_FIELDS = ("type", "job_id", "model_id", "request", "format", "deadline_ms")


@dataclass(frozen=True)
class Hostile:
    kind: str
    payload: str | bytes


def job_frame(payload: str | bytes) -> dict[str, Any] | None:
    """The frame as JSON when it is job-shaped (a `job` with a job_id the agent can answer,
    protocol.md §8), else None."""
    if isinstance(payload, bytes):
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("type") != "job":
        return None
    return data if readable_job_id(data.get("job_id")) is not None else None


def job_shaped_id(payload: str | bytes) -> str | None:
    """The job_id that must get one terminal frame, or None (not a job frame one can answer)."""
    data = job_frame(payload)
    return data["job_id"] if data is not None else None


def breaks_model_id_rule(value: object) -> bool:
    """protocol.md §2: 1–256 characters, printable, no control characters, not only
    whitespace."""
    if not isinstance(value, str) or not 1 <= len(value) <= 256 or value.isspace():
        return True
    return not value.isprintable() or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)


def predicted_code(data: dict[str, Any]) -> str | None:
    """The error code a job-shaped frame must be answered with when its fields alone decide it
    (protocol.md §4, §8), else None (a job to run, or a figure this reading cannot tell)."""
    wrong = set()
    if breaks_model_id_rule(data.get("model_id")):
        wrong.add("model_id")
    if not isinstance(data.get("request"), dict):
        wrong.add("request")
    fmt = data.get("format")
    if fmt is not None and not (isinstance(fmt, str) and fmt in ("openai", "anthropic")):
        wrong.add("format")
    deadline = data.get("deadline_ms")
    if isinstance(deadline, float) and not abs(deadline) < 2**63:
        return None  # orjson reads a JSON integer beyond 64 bits as a float: cannot tell
    if deadline is not None and not (type(deadline) is int and deadline > 0):
        wrong.add("deadline_ms")
    if not wrong:
        return None
    return "unsupported_format" if wrong == {"format"} else "bad_request"


@dataclass
class Generator:
    rng: random.Random
    near_limit_left: int
    ids: list[str] = field(default_factory=list)

    def new_id(self) -> str:
        job_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.ids.append(job_id)
        return job_id

    def some_id(self) -> str:
        return self.rng.choice(self.ids) if self.ids and self.rng.random() < 0.7 else self.new_id()

    def valid_job(self, job_id: str | None = None) -> dict[str, Any]:
        model, fmt = self.rng.choice(
            [(VLLM_MODEL, "openai"), (VLLM_MODEL, "anthropic"), (BYOK_MODEL, "openai")]
        )
        request: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": self.rng.randint(1, 8),
            "user": f"fuzz-{self.rng.getrandbits(32)}",
        }
        return {
            "type": "job",
            "job_id": job_id or self.new_id(),
            "model_id": model,
            "request": request,
            "format": fmt,
            "deadline_ms": self.rng.choice([60000, 30000, 5000]),
        }

    def template(self) -> dict[str, Any]:
        kind = self.rng.choice(["job", "job", "job", "job_cancel", "job_ack", "config_update"])
        if kind == "job":
            return self.valid_job()
        if kind == "config_update":
            return {"type": "config_update", "settings": {"x": 1}}
        return {"type": kind, "job_id": self.some_id()}

    def dumps(self, data: Any) -> str:
        """JSON text (the standard library's: orjson refuses integers beyond 64 bits)."""
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    # one builder per class; each returns the frame's payload

    def invalid_json(self) -> str:
        valid = self.dumps(self.valid_job())
        return self.rng.choice(
            [
                "",
                "{",
                "}",
                "[",
                "nul",
                "{'type': 'job'}",
                valid[: self.rng.randrange(1, len(valid))],
                valid + " trailing",
                valid.replace('"deadline_ms":', '"deadline_ms":NaN,"x":', 1),
                valid.replace(",", ",,", 1),
                "\ufeff" + valid,
                "".join(
                    chr(self.rng.randrange(32, 127)) for _ in range(self.rng.randrange(1, 200))
                ),
                '{"type":"job","job_id":"' + self.new_id() + '"',
            ]
        )

    def wrong_type(self) -> str:
        frame = self.template()
        name = self.rng.choice([*frame.keys()] if self.rng.random() < 0.8 else JOB_FIELDS)
        frame[name] = self.rng.choice(WRONG_VALUES)
        return self.dumps(frame)

    def missing_fields(self) -> str:
        frame = self.template()
        for name in self.rng.sample(list(frame), k=self.rng.randint(1, len(frame))):
            del frame[name]
        return self.dumps(frame)

    def unknown_type(self) -> str:
        frame = self.valid_job()
        frame["type"] = self.rng.choice(
            [
                *("jobs", "JOB", "job ", "", "x" * 300, "\u0000", "é", "job_chunk", "job_done"),
                *(1, None, ["job"], {"job": 1}, True),
            ]
        )
        return self.dumps(frame)

    def near_limit(self) -> str:
        frame = self.rng.choice(
            [
                self.valid_job(),
                {**self.valid_job(), "model_id": "no-such-model"},
                {"type": "job_cancel", "job_id": self.new_id()},
                {"type": "surprise"},
            ]
        )
        frame["pad"] = ""
        room = FRAME_LIMIT - len(self.dumps(frame)) - self.rng.randint(1, 64)
        text = "é" if self.rng.random() < 0.5 else "a"  # two bytes in UTF-8, or one
        frame["pad"] = text * (room // len(text.encode()))
        return self.dumps(frame)

    def deep(self) -> str:
        depth = self.rng.choice([100, 1000, 1023, 1024, 1025, 5000, 100_000])
        opener, closer = ("[", "]") if self.rng.random() < 0.5 else ('{"a":', "}")
        frame = self.valid_job()
        frame[self.rng.choice(["request", "model_id", "job_id", "deadline_ms"])] = "@nest@"
        return self.dumps(frame).replace('"@nest@"', opener * depth + "1" + closer * depth)

    def non_utf8(self) -> str | bytes:
        choice = self.rng.randrange(4)
        if choice == 0:
            return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 300))) + (
                b"\xff\xfe\xc3\x28"
            )
        if choice == 1:
            return self.dumps(self.valid_job()).encode("utf-8").replace(b'"Say', b'"\xc3\x28Say')
        frame = self.dumps(self.valid_job())
        target = '"job_id":"' if choice == 2 else '"content":"'
        return frame.replace(target, target + "\\ud800", 1)

    def binary(self) -> bytes:
        if self.rng.random() < 0.5:
            return self.dumps(self.valid_job()).encode()
        return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(0, 2000)))

    def colliding(self) -> str:
        job_id = self.rng.choice(self.ids) if self.ids else self.new_id()
        frame = self.valid_job(job_id)
        if self.rng.random() < 0.3:
            frame["model_id"] = self.rng.choice(["no-such-model", BYOK_MODEL, VLLM_MODEL])
        return self.dumps(frame)

    def cancel(self) -> str:
        job_id = self.rng.choice([self.some_id(), self.new_id(), "", "x" * 200, "\u0000"])
        return self.dumps({"type": "job_cancel", "job_id": job_id})

    def ack(self) -> str:
        return self.dumps({"type": "job_ack", "job_id": self.rng.choice([self.new_id(), "?"])})

    def handshake(self) -> str:
        return self.dumps(
            self.rng.choice(
                [
                    {"type": "auth_challenge", "nonce": "AAAA"},
                    {"type": "auth_ok", "provider_id": "prov_other"},
                    {"type": "auth_failed", "reason": "no"},
                    {"type": "auth_response", "pubkey": "x", "signature": "y"},
                    {"type": "capabilities", "models": []},
                ]
            )
        )

    def unknown_model(self) -> str:
        frame = self.valid_job()
        frame["model_id"] = self.rng.choice(["no-such-model", "", " ", "m ", "M", "é" * 300])
        return self.dumps(frame)

    def request_not_object(self) -> str:
        frame = self.valid_job()
        frame["request"] = self.rng.choice([[], [1], "hello", 42, None, True, "{}"])
        return self.dumps(frame)

    def odd_values(self) -> str:
        frame = self.valid_job()
        frame[self.rng.choice(["deadline_ms", "format", "job_id"])] = self.rng.choice(
            [
                *(1, 0, -5, 2**53, 10**18, 2**63 - 1, "openai ", "ANTHROPIC", "x" * 128),
                *("x" * 129, "\n", "a\u0000b", "\u202e" * 64, "é" * 128),
            ]
        )
        return self.dumps(frame)

    def valid(self) -> str:
        return self.dumps(self.valid_job())

    def classes(self) -> dict[str, tuple[float, Callable[[], str | bytes]]]:
        return {
            "invalid JSON": (8, self.invalid_json),
            "wrong type": (14, self.wrong_type),
            "missing fields": (8, self.missing_fields),
            "unknown type": (5, self.unknown_type),
            "deep nesting": (3, self.deep),
            "non-UTF-8": (4, self.non_utf8),
            "binary": (4, self.binary),
            "colliding job_id": (8, self.colliding),
            "cancel, unknown job": (6, self.cancel),
            "ack, unknown job": (3, self.ack),
            "handshake after auth": (2, self.handshake),
            "unknown model": (6, self.unknown_model),
            "request not an object": (5, self.request_not_object),
            "odd values": (6, self.odd_values),
            "well-formed job": (18, self.valid),
        }

    def frames(self, count: int) -> list[Hostile]:
        classes = self.classes()
        names = list(classes)
        weights = [classes[name][0] for name in names]
        near = set(self.rng.sample(range(count), k=min(count, self.near_limit_left)))
        out = []
        for index in range(count):
            if index in near:
                out.append(Hostile("just under 16 MiB", self.near_limit()))
                continue
            name = self.rng.choices(names, weights)[0]
            out.append(Hostile(name, classes[name][1]()))
        return out


# --- watching the agent ---------------------------------------------------------------------------


@dataclass
class Watch:
    """What the agent shows outside its frames: systemd notifications, HTTP endpoint answers,
    `status --json`."""

    notify: socket.socket
    notifications: list[str] = field(default_factory=list)
    endpoint_texts: list[str] = field(default_factory=list)
    endpoint_served: bool = False
    status_text: str | None = None

    async def collect_notifications(self) -> None:
        while True:
            await anyio.wait_readable(self.notify)
            with contextlib.suppress(BlockingIOError):
                while True:
                    self.notifications.append(self.notify.recv(65536).decode(errors="replace"))

    async def read_endpoint(self, addr: str) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for path in ("/metrics", "/status", "/healthz", "/readyz"):
                try:
                    async with http.get(f"http://{addr}{path}") as response:
                        self.endpoint_texts.append(await response.text(errors="replace"))
                        self.endpoint_served = True
                except aiohttp.ClientError:
                    continue

    def read_status_command(self, config: Path) -> None:
        done = subprocess.run(
            [AGENT, "status", "--json", "--allow-insecure", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if "invalid choice" not in done.stderr:
            self.status_text = done.stdout + done.stderr


# --- the run --------------------------------------------------------------------------------------


def usage_faults(sims: tuple[SimBackend, ...]) -> dict[str, list[str]]:
    """Queue the `usage` faults on each simulator — every figure in turn, sides taking turns,
    each for USAGE_FAULT_COUNT completions, one after the other with no completion between
    (the simulator's `fault_queue`) — from the first job on, before the failures at a third of
    the way (`fail_next`). The figures per simulator kind, for the report."""
    figures = {}
    for sim in sims:
        values = ABSURD_FIGURES if sim.kind == "vllm" else BYOK_FIGURES
        figures[sim.kind] = [repr(value) for value in values]
        sim.fault_queue = [
            Fault(
                kind="usage",
                usage_figure=figure,
                usage_side=USAGE_SIDES[n % len(USAGE_SIDES)],
                count=USAGE_FAULT_COUNT,
            )
            for n, figure in enumerate(values)
        ]
    return figures


@dataclass
class Findings:
    sent: Counter[str]
    expected: dict[str, str]  # job_id → the class of the frame that first named it
    predicted: dict[str, str]  # job_id → the error code its first job-shaped frame must get
    #: request `user` (the simulators' job key) → the job_ids of the frames that carried it
    users: dict[str, set[str]]
    frames: list[str | bytes]
    session_ends: int
    oversize_closed: int | None
    came_back: bool
    rss_start: float
    rss_parts: list[float]
    log_text: str
    watch: Watch
    #: Completions the simulators served with a `usage` fault: (kind, job key, the fault).
    usage_served: list[tuple[str, str, Fault]]
    #: The figures each simulator was to report (kind → reprs).
    usage_figures: dict[str, list[str]]
    #: The agent had exited (or been started again) before the final SIGTERM.
    exited_early: bool
    final_exit: int | None
    earnings: list[tuple[str, int, str]]  # (command, exit status, stderr's last line)
    canaries: dict[str, str]
    byok_advertised: bool
    enrolled: bool
    wall_s: float


def agent_config(
    workdir: Path, coordinator: DevCoordinator, vllm: SimBackend, byok: SimBackend, metrics: str
) -> Path:
    path = workdir / "agent.toml"
    path.write_text(
        f'[coordinator]\nurl = "{coordinator.ws_url}"\n'
        f'[identity]\nkey_path = "{workdir / "identity.key"}"\n'
        f'[state]\ndir = "{workdir / "state"}"\n'
        f'[observability]\nprometheus_addr = "{metrics}"\nlog_format = "json"\n'
        f'[[backends]]\nkind = "vllm"\nurl = "{vllm.url}"\n'
        f'[[backends]]\nkind = "openrouter"\nurl = "{byok.base_url}"\napi_key_env = "{KEY_ENV}"\n'
        "[pricing]\ndefault_input_per_1m = 300000\ndefault_output_per_1m = 600000\n"
    )
    return path


def fail_next(sim: SimBackend, fault: Fault) -> None:
    """`fault` for the next completions, in place of any failure before it — but after the
    `usage` faults still queued: the failures withdraw the routes, and jobs after that reach
    no backend for the rest of the run, so the figures would meet none."""
    usage = [f for f in (sim.fault, *sim.fault_queue) if f is not None and f.kind == "usage"]
    if not usage:
        sim.fault, sim.fault_queue = fault, []
    else:
        sim.fault_queue = [*(f for f in sim.fault_queue if f.kind == "usage"), fault]


async def send_all(
    coordinator: RecordingCoordinator,
    provider_id: str,
    frames: list[Hostile],
    sims: tuple[SimBackend, SimBackend],
    *,
    first: int,
    total: int,
) -> None:
    """Send `frames` (numbered from `first` of `total`); at a third and two thirds of the way,
    the simulators start failing some completions (once the usage figures are served)."""
    vllm, byok = sims
    for index, frame in enumerate(frames, start=first):
        if index == total // 3:
            fail_next(byok, Fault(kind="http", status=401, count=25))
            fail_next(vllm, Fault(kind="error", after_tokens=1, count=25))
        if index == 2 * total // 3:
            fail_next(vllm, Fault(kind="die", after_tokens=1, count=25))
        await coordinator.send(provider_id, frame.payload)
        if index % 50 == 0:
            await anyio.lowlevel.checkpoint()  # the coordinator's reader keeps up with answers


async def quiet_rss(
    coordinator: RecordingCoordinator, expected: dict[str, str], agent: Child
) -> float:
    """VmRSS once every job-shaped id sent so far is answered (or the wait gave up), and a
    moment more: a second, different terminal frame would show by then too."""
    with contextlib.suppress(TimeoutError):
        await coordinator.wait_for(
            lambda _: answered(coordinator, expected), timeout=ANSWER_WITHIN_S
        )
    await anyio.sleep(SETTLE_S)
    return rss_mb(agent.pid) if agent.alive() else math.nan


def answered(coordinator: RecordingCoordinator, expected: dict[str, str]) -> bool:
    seen = set()
    for text in coordinator.frames:
        if isinstance(text, str) and '"job_' in text:
            data = orjson.loads(text)
            if data.get("type") in TERMINAL_TYPES:
                seen.add(data.get("job_id"))
    return expected.keys() <= seen


def served_with_usage_faults(sims: tuple[SimBackend, ...]) -> list[tuple[str, str, Fault]]:
    """(kind, job key, fault) of each completion a simulator served with a `usage` fault."""
    return [
        (sim.kind, rec.key, rec.fault)
        for sim in sims
        for rec in sim.requests
        if rec.key is not None and rec.fault is not None and rec.fault.kind == "usage"
    ]


def expectations(
    frames: list[Hostile],
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """From the frames to send: each job-shaped id and the class of the first frame naming it,
    the answers predicted from that frame's fields, and the job_ids each request `user` (the
    simulators' job key) was sent with."""
    expected: dict[str, str] = {}
    predicted: dict[str, str] = {}
    users: dict[str, set[str]] = {}
    for frame in frames:
        data = job_frame(frame.payload)
        if data is None:
            continue
        job_id = data["job_id"]
        if job_id not in expected:
            expected[job_id] = frame.kind
            if (code := predicted_code(data)) is not None:
                predicted[job_id] = code
        request = data.get("request")
        user = request.get("user") if isinstance(request, dict) else None
        if isinstance(user, str):
            users.setdefault(user, set()).add(job_id)
    return expected, predicted, users


async def run_fuzz(args: argparse.Namespace, workdir: Path) -> Findings:
    canaries = {
        "BYOK key": "sk-or-v1-canary-" + uuid.uuid4().hex,
        "enrollment code": "POD-ENROLL-CANARY" + uuid.uuid4().hex[:12].upper(),
    }
    frames = Generator(random.Random(args.seed), args.near_limit).frames(args.frames)
    expected, predicted, users = expectations(frames)
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    watch = Watch(notify)
    metrics = f"127.0.0.1:{free_port()}"
    async with (
        RecordingCoordinator() as coordinator,
        SimBackend("vllm", models=[VLLM_MODEL], tokens=6, tokens_per_s=0) as vllm,
        SimBackend("openrouter", tokens=6, tokens_per_s=0, api_key=canaries["BYOK key"]) as byok,
        anyio.create_task_group() as group,
    ):
        group.start_soon(watch.collect_notifications)
        config = agent_config(workdir, coordinator, vllm, byok, metrics)
        agent = Child(
            "agent",
            [AGENT, "run", "--allow-insecure", "--log-level", "debug", "--config", str(config)],
            workdir / "agent.log",
            env={
                KEY_ENV: canaries["BYOK key"],
                ENROLL_ENV: canaries["enrollment code"],
                "NOTIFY_SOCKET": str(notify_path),
                "PYTHONUNBUFFERED": "1",
            },
        )
        agent.start()
        try:
            record = await coordinator.wait_for(
                lambda c: next((a for a in c.agents.values() if a.offers()), None), timeout=60
            )
        except TimeoutError:
            raise BenchError(f"the agent did not connect:\n{agent.log_tail()}") from None
        provider_id = record.provider_id
        byok_advertised = BYOK_MODEL in record.offers()
        enrolled = record.enrollment_code == canaries["enrollment code"]
        rss_start = rss_mb(agent.pid)
        began = time.monotonic()
        sims = (vllm, byok)
        usage_figures = usage_faults(sims)
        rss_parts = []
        bounds = [args.frames * n // args.parts for n in range(args.parts + 1)]
        for start, stop in itertools.pairwise(bounds):
            part = frames[start:stop]
            await send_all(coordinator, provider_id, part, sims, first=start, total=args.frames)
            ids = {i: expected[i] for f in frames[:stop] if (i := job_shaped_id(f.payload))}
            rss_parts.append(await quiet_rss(coordinator, ids, agent))
        wall = time.monotonic() - began
        session_ends = sum(1 for a in coordinator.attempts if a.ended_at is not None)
        await watch.read_endpoint(metrics)
        await anyio.to_thread.run_sync(watch.read_status_command, config)

        oversize_closed, came_back = None, False
        if agent.alive() and session_ends == 0:
            attempts = len(coordinator.attempts)
            await coordinator.send(provider_id, "x" * (FRAME_LIMIT + 1))
            with contextlib.suppress(TimeoutError):
                await coordinator.wait_for(lambda c: c.attempts[0].ended_at, timeout=30)
                oversize_closed = coordinator.attempts[0].close_code
                await coordinator.wait_for(
                    lambda c: len(c.attempts) > attempts and c.connected(), timeout=90
                )
                came_back = True
        exited_early = not agent.alive() or agent.starts != 1
        final_exit = agent.stop(timeout=30)
        group.cancel_scope.cancel()
    notify.close()
    earnings = [run_earnings(config, extra) for extra in ([], ["--by", "model"], ["--csv"])]
    return Findings(
        sent=Counter(frame.kind for frame in frames),
        expected=expected,
        predicted=predicted,
        users=users,
        frames=list(coordinator.frames),
        session_ends=session_ends,
        oversize_closed=oversize_closed,
        came_back=came_back,
        rss_start=rss_start,
        rss_parts=rss_parts,
        log_text=agent.log.read_text(errors="replace"),
        watch=watch,
        usage_served=served_with_usage_faults(sims),
        usage_figures=usage_figures,
        exited_early=exited_early,
        final_exit=final_exit,
        earnings=earnings,
        canaries=canaries,
        byok_advertised=byok_advertised,
        enrolled=enrolled,
        wall_s=wall,
    )


def run_earnings(config: Path, extra: list[str]) -> tuple[str, int, str]:
    """`provider-agent earnings` over the ledger the run left: (command, exit status, the last
    line of stderr)."""
    argv = [AGENT, "earnings", *extra, "--allow-insecure", "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return " ".join(["earnings", *extra]), done.returncode, last


# --- judging --------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    missing: list[str]
    several: list[str]
    unexpected: list[str]
    problems: Counter[str]
    late_chunks: list[str]
    #: job_id → its terminal frame (the first one, parsed)
    terminal: dict[str, dict[str, Any]]


def judge_frames(frames: list[str | bytes], expected: dict[str, str]) -> Verdicts:
    terminals: dict[str, set[str]] = {}
    terminal: dict[str, dict[str, Any]] = {}
    problems: Counter[str] = Counter()
    late_chunks: list[str] = []
    for text in frames:
        verdict = check_agent_frame(text)
        for problem in verdict.problems:
            problems[problem.split(":")[0]] += 1
        data = verdict.data or {}
        job_id = data.get("job_id")
        if not isinstance(job_id, str):
            continue
        if data.get("type") in TERMINAL_TYPES:
            terminals.setdefault(job_id, set()).add(str(text))
            terminal.setdefault(job_id, data)
        elif data.get("type") == "job_chunk" and job_id in terminals:
            problems["job_chunk after the job's terminal frame"] += 1
            late_chunks.append(job_id)
    return Verdicts(
        missing=[job_id for job_id in expected if job_id not in terminals],
        several=[job_id for job_id, texts in terminals.items() if len(texts) > 1],
        unexpected=[job_id for job_id in terminals if job_id not in expected],
        problems=problems,
        late_chunks=late_chunks,
        terminal=terminal,
    )


def misanswered(f: Findings, v: Verdicts) -> dict[str, tuple[str, str]]:
    """job_id → (predicted code, what it got) where the answer is not the predicted one."""
    out = {}
    for job_id, code in f.predicted.items():
        data = v.terminal.get(job_id)
        if data is None:
            continue  # counted as unanswered
        got = str(data.get("error_code") or data.get("type"))
        if got != code:
            out[job_id] = (code, got)
    return out


#: The warning for figures not believed names the job and the backend (`kind:url`).
_NOT_BELIEVED = re.compile(r"not believed.* job_id=(?P<job_id>.*) backend=(?P<kind>[a-z]+):")


def _as_logged(job_id: str) -> str:
    """A job_id as the warning shows it: as it is (an answerable job_id is printable, and
    `text.printable` leaves printable text alone, surrounding spaces included)."""
    return job_id


def out_of_range_number(figure: Any) -> bool:
    """A figure §8 disbelieves with a warning: a JSON number outside 0–10^12 (NaN and Infinity
    are not JSON: the backend's line is unreadable, so there is nothing to disbelieve)."""
    if isinstance(figure, bool) or not isinstance(figure, int | float):
        return False
    return math.isfinite(figure) and not 0 <= figure <= MAX_BELIEVED


@dataclass
class UsageVerdict:
    jobs: int = 0
    #: Completions whose key no job_id, or several, carried (the agent's own probes: a
    #: withdrawn route is tried with a one-token completion of its own)
    ambiguous: int = 0
    estimated: int = 0
    other_ends: Counter[str] = field(default_factory=Counter)
    wrong: list[tuple[str, str, Any]] = field(default_factory=list)  # (job_id, end, figure)
    warned_once: int = 0
    warnings_off: list[tuple[str, int]] = field(default_factory=list)  # (job_id, warnings)
    figures: set[tuple[str, str]] = field(default_factory=set)  # (kind, repr) that reached a job
    unserved: list[tuple[str, str]] = field(default_factory=list)  # planned, reached none


def judge_usage(f: Findings, v: Verdicts) -> UsageVerdict:
    """How the jobs served with absurd usage figures ended, and their warnings."""
    warnings: Counter[tuple[str, str]] = Counter()  # (job_id as logged, backend kind)
    for line in f.log_text.splitlines():
        if "not believed" not in line:
            continue
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            named = _NOT_BELIEVED.search(entry.get("msg", ""))
            if entry.get("level") == "warning" and named is not None:
                warnings[named["job_id"], named["kind"]] += 1
    out = UsageVerdict()
    for kind, key, fault in f.usage_served:
        ids = f.users.get(key, set())
        if len(ids) != 1:
            out.ambiguous += 1
            continue
        (job_id,) = ids
        out.jobs += 1
        out.figures.add((kind, repr(fault.usage_figure)))
        data = v.terminal.get(job_id)
        if data is None:
            continue  # counted as unanswered
        if data.get("type") == "job_done":
            if data.get("usage_source") != "estimated":
                out.wrong.append((job_id, "job_done, usage believed", fault.usage_figure))
                continue
            out.estimated += 1
            if out_of_range_number(fault.usage_figure):
                count = warnings[_as_logged(job_id), kind]
                if count == 1:
                    out.warned_once += 1
                else:
                    out.warnings_off.append((job_id, count))
            continue
        code = str(data.get("error_code"))
        out.other_ends[code] += 1
        if code not in NOT_THE_FIGURES_DOING:
            out.wrong.append((job_id, code, fault.usage_figure))
    return out


@dataclass
class LogVerdict:
    tracebacks: int
    debug_tracebacks: int
    levels: Counter[str]


def judge_log(text: str) -> LogVerdict:
    tracebacks = debug_tracebacks = 0
    levels: Counter[str] = Counter()
    for line in text.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            tracebacks += "Traceback (most recent call last)" in line
            continue
        levels[entry.get("level", "?")] += 1
        if "exc" in entry or "Traceback (most recent call last)" in entry.get("msg", ""):
            if entry.get("level") == "debug":
                debug_tracebacks += 1
            else:
                tracebacks += 1
    return LogVerdict(tracebacks, debug_tracebacks, levels)


def canary_sightings(f: Findings) -> dict[str, int]:
    places = {
        "log": [f.log_text],
        "frames": [t if isinstance(t, str) else t.decode(errors="replace") for t in f.frames],
        "sd_notify": f.watch.notifications,
        "endpoint": f.watch.endpoint_texts,
        "status": [f.watch.status_text or ""],
    }
    return {
        f"{name} in {place}": sum(value in text for text in texts)
        for name, value in f.canaries.items()
        for place, texts in places.items()
    }


def usage_rows(table: Table, f: Findings, usage: UsageVerdict) -> None:
    planned = {(kind, figure) for kind, figures in f.usage_figures.items() for figure in figures}
    usage.unserved = sorted(planned - usage.figures)
    table.info(
        "jobs served with absurd usage figures",
        ", ".join(
            f"{kind} {sum(1 for k, _, _ in f.usage_served if k == kind)}"
            for kind in f.usage_figures
        ),
    )
    table.info("  ended job_done, estimated", str(usage.estimated))
    table.info(
        "  ended otherwise (not the figure's doing)",
        ", ".join(f"{k} {n}" for k, n in usage.other_ends.most_common()) or "0",
    )
    table.check(
        "  usage believed, or ended by the figure", str(len(usage.wrong)), "0", not usage.wrong
    )
    table.check(
        "  out of 0–10^12 without exactly one warning",
        f"{len(usage.warnings_off)} of {usage.warned_once + len(usage.warnings_off)}",
        "0",
        not usage.warnings_off,
    )
    table.check(
        "  figures that reached no job",
        f"{len(usage.unserved)} of {len(planned)}",
        "0",
        not usage.unserved,
    )


def usage_details(usage: UsageVerdict) -> None:
    for job_id, end, figure in usage.wrong[:3]:
        print(f"  usage figure {figure!r}: {end}: {job_id!r}")
    for job_id, count in usage.warnings_off[:3]:
        print(f"  {count} 'not believed' warnings: {job_id!r}")
    if usage.unserved:
        print("  figures no job met: " + ", ".join(f"{k} {r}" for k, r in usage.unserved))
    if usage.ambiguous:
        print(f"  {usage.ambiguous} usage-fault completions not of one job (the agent's probes)")


def report(args: argparse.Namespace, f: Findings) -> int:
    v = judge_frames(f.frames, f.expected)
    log = judge_log(f.log_text)
    wrong_codes = misanswered(f, v)
    usage = judge_usage(f, v)
    earnings_failed = [(cmd, rc, last) for cmd, rc, last in f.earnings if rc != 0]
    seen = canary_sightings(f)
    leaks = sum(seen.values())
    growth = f.rss_parts[-1] - f.rss_parts[0]
    print(
        f"fuzz benchmark: {sum(f.sent.values()):,} hostile frames in {f.wall_s:.1f} s "
        f"(seed {args.seed}), {len(f.expected):,} job-shaped job_ids; the agent sent "
        f"{len(f.frames):,} frames and {sum(log.levels.values()):,} log lines "
        f"({', '.join(f'{k} {n}' for k, n in sorted(log.levels.items()))})"
    )
    print("  sent: " + ", ".join(f"{k} {n}" for k, n in f.sent.most_common()))
    table = Table()
    table.check("session ends before the last frame", str(f.session_ends), "0", f.session_ends == 0)
    table.check(
        "frame > 16 MiB: close code, back",
        f"{f.oversize_closed}, {'yes' if f.came_back else 'no'}",
        "1009, yes",
        f.oversize_closed == 1009 and f.came_back,
    )
    table.check(
        "agent exits before the SIGTERM", "1" if f.exited_early else "0", "0", not f.exited_early
    )
    table.check("agent exit on SIGTERM", str(f.final_exit), "0", f.final_exit == 0)
    table.check("job_ids without a terminal frame", str(len(v.missing)), "0", not v.missing)
    table.check("job_ids with differing terminal frames", str(len(v.several)), "0", not v.several)
    table.check("terminal frames for other ids", str(len(v.unexpected)), "0", not v.unexpected)
    table.info("answers predicted from the fields (§8)", str(len(f.predicted)))
    table.check("  answered otherwise", str(len(wrong_codes)), "0", not wrong_codes)
    usage_rows(table, f, usage)
    table.check(
        "earnings after the run: failed commands",
        f"{len(earnings_failed)} of {len(f.earnings)}",
        "0",
        not earnings_failed,
    )
    table.check(
        "contract problems in sent frames", str(sum(v.problems.values())), "0", not v.problems
    )
    table.check("tracebacks in the log", str(log.tracebacks), "0", log.tracebacks == 0)
    table.info("  debug-level ones (handled)", str(log.debug_tracebacks))
    table.info(
        "RSS MB at start, after each part",
        " / ".join(f"{mb:.1f}" for mb in [f.rss_start, *f.rss_parts]),
    )
    table.check(
        "RSS growth MB after the first part",
        f"{growth:+.1f}",
        f"≤ {args.rss_slack_mb:g}",
        growth <= args.rss_slack_mb,
    )
    table.check(
        "BYOK backend in use", "yes" if f.byok_advertised else "no", "yes", f.byok_advertised
    )
    table.check(
        "enrollment code in auth_response", "yes" if f.enrolled else "no", "yes", f.enrolled
    )
    table.check("secrets seen", str(leaks), "0", leaks == 0)
    table.print()
    print(
        f"  secrets searched in: the log, {len(f.frames):,} frames, "
        f"{len(f.watch.notifications)} sd_notify messages, the HTTP endpoint "
        f"({'served' if f.watch.endpoint_served else 'not served by this build'}), "
        f"status --json ({'run' if f.watch.status_text is not None else 'not in this build'})"
    )
    for problem, count in v.problems.most_common(3):
        print(f"  contract ×{count}: {problem}")
    for job_id in sorted(set(v.late_chunks))[:3]:
        print(f"  job_chunk after the terminal frame: {job_id!r}")
    for job_id in v.missing[:3]:
        print(f"  no terminal frame: {job_id!r} ({f.expected[job_id]})")
    for job_id in v.several[:3]:
        print(f"  differing terminal frames: {job_id!r}")
    for job_id, (code, got) in list(wrong_codes.items())[:3]:
        print(f"  predicted {code}, got {got}: {job_id!r} ({f.expected[job_id]})")
    usage_details(usage)
    for cmd, rc, last in earnings_failed:
        print(f"  {cmd}: exit {rc}: {last}")
    for place, count in seen.items():
        if count:
            print(f"  canary: {place} ×{count}")
    print(
        f"\nfuzz: {'MISS ' + ', '.join(table.missed) if table.missed else 'ok'} — "
        f"{sum(f.sent.values()):,} frames: {f.session_ends} session ends, "
        f"{len(v.missing)} job_ids unanswered, {len(v.several)} answered twice differently, "
        f"{len(wrong_codes)} answered otherwise than predicted, {log.tracebacks} tracebacks, "
        f"RSS {growth:+.1f} MB, {leaks} secrets seen; {usage.jobs} jobs with absurd usage: "
        f"{usage.estimated} estimated, {len(usage.wrong)} believed or failed by it; "
        f"{int(f.exited_early)} agent exits"
    )
    return 1 if table.missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000, help="hostile frames (10000)")
    parser.add_argument("--seed", type=int, default=7, help="the generator's seed (7)")
    parser.add_argument("--near-limit", type=int, default=3, help="frames just under 16 MiB (3)")
    parser.add_argument("--parts", type=int, default=4, help="RSS read after each part (4)")
    parser.add_argument("--rss-slack-mb", type=float, default=10.0, help="flat means ≤ this (10)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep the logs")
    args = parser.parse_args()
    if args.frames < 10 or args.near_limit < 0 or not 2 <= args.parts <= args.frames:
        parser.error("--frames must be ≥ 10, --near-limit ≥ 0, --parts from 2 to --frames")
    os.environ.pop(ENROLL_ENV, None)

    def run() -> int:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            return report(args, asyncio.run(run_fuzz(args, args.keep)))
        with tempfile.TemporaryDirectory(prefix="fuzz-bench-") as workdir:
            return report(args, asyncio.run(run_fuzz(args, Path(workdir))))

    return run_bench(run)


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    sys.exit(main())
