"""A completion stream's bytes. Every kind's stream is encoded once when it starts
(`StreamFrames`), so that each token is then one write, whoever paces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from provider_agent.dev.sim.faults import Fault, absurd_sse

#: The text of a response: these words, cycled, one per token.
WORDS: Final = ("Hello", " from", " the", " simulated", " backend", ".")
DONE: Final = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


@dataclass(frozen=True)
class StreamFrames:
    """A stream's bytes, encoded once when it starts: each token is then one write."""

    #: Written right after the headers (OpenRouter's keepalive comment), or empty.
    preamble: bytes
    #: Token 0 with whatever opens the stream before it (role chunk, `message_start` …).
    first: bytes
    #: Token i ≥ 1 is `tokens[i % len(WORDS)]`.
    tokens: tuple[bytes, ...]
    #: The mid-stream error and what the kind sends after it.
    error: bytes
    #: (tokens sent, truncated by max_tokens, elapsed seconds) → finish, usage, end marker.
    closing: Callable[[int, bool, float], bytes]


def response_text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


def absurd_frames(frames: StreamFrames, fault: Fault) -> StreamFrames:
    """`frames` with every token count they report replaced by the `usage` fault's figure."""
    closing = frames.closing

    def absurd_closing(n: int, truncated: bool, elapsed: float) -> bytes:
        return absurd_sse(closing(n, truncated, elapsed), fault)

    return dataclasses.replace(
        frames, first=absurd_sse(frames.first, fault), closing=absurd_closing
    )
