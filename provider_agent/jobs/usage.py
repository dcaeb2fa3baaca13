"""Token usage of a streamed job, read from the upstream bytes as they pass (sans-I/O).

`UsageMeter.feed()` takes each chunk as the relay reads it and never looks at a byte twice: it
keeps only the unfinished last line, and parses each SSE `data:` line with orjson once. It also
watches for the stream's end marker (`data: [DONE]` for openai, `message_stop` for anthropic)
and for an error event in mid-stream.

Where the numbers come from (the last report seen wins):
- openai: a `usage` object on any chunk (the `include_usage` chunk with `choices: []`; vLLM's
  `continuous_usage_stats`, OpenRouter and Venice, which always send one): `prompt_tokens`
  (cached prompt tokens are already part of it) and `completion_tokens`. llama.cpp's `timings`
  (`prompt_n + cache_n`, `predicted_n`) stand in when there is no `usage`; when both are there
  input is the larger of the two, so cache hits are never dropped.
- anthropic: `message_start.message.usage` and any `message_delta.usage` — input is
  `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`, output is
  `message_delta.usage.output_tokens` (cumulative; `message_start`'s is a placeholder).

When a side has no report (llama-cpp-python's server never sends usage; a stream that broke
off) it is estimated and `Usage.estimated` is set:
- output = max(content deltas, ceil(content characters / 4)). A delta is one choice's delta
  with text (`content`, `reasoning_content`, `reasoning`) or `tool_calls`, or an empty `content`
  outside the role and finish chunks (a token that is an incomplete UTF-8 sequence); anthropic
  counts `text_delta`, `thinking_delta` and `input_json_delta` events. Servers that batch tokens
  into one delta are caught by the characters-over-four bound.
- input = ceil(characters of the request's message text / 4) + 4 per message (the chat
  template's overhead), counting `messages[].content` (strings and text parts), anthropic's
  `system`, and a legacy `prompt`.

Figures outside 0–10^12 (MAX_BELIEVED) are not believed (protocol.md §8): a backend that sent
one is not believed at all, so the whole job is billed on the estimate, and `disbelieved` names
the fields, for one warning. No figure from a
backend can make the job's frame or ledger row fail.

SSE handling: lines end in `\\n` or `\\r\\n`; `:` comments, `id:` and `retry:` are skipped; the
`event:` name holds until the blank line that ends the event; a `data:` line that is not JSON is
skipped (no backend splits JSON over several data lines). A line longer than MAX_LINE_BYTES is
dropped unread, so a garbage stream cannot grow memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from provider_agent.config.schema import WireFormat
from provider_agent.jobs.upstream import error_message
from provider_agent.safe_text import MESSAGE_LIMIT, printable

#: Longest SSE line kept for parsing; longer ones are dropped (usage lines are tiny).
MAX_LINE_BYTES = 4 * 1024 * 1024
#: The largest token count believed from a backend (protocol.md §8).
MAX_BELIEVED = 10**12
#: Characters per token and tokens per message of the estimates (see the module docstring).
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
_TEXT_KEYS = ("content", "reasoning_content", "reasoning")
_ANTHROPIC_DELTA_TEXT = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
}
_ANTHROPIC_INPUT_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@dataclass(frozen=True)
class Usage:
    """Tokens of one job; `estimated` when any side had no upstream report."""

    input: int
    output: int
    estimated: bool


class UsageMeter:
    """Incremental reader of one job's upstream SSE body: usage, end marker, error event."""

    def __init__(self, fmt: WireFormat, request: Mapping[str, Any]) -> None:
        self._openai = fmt == "openai"
        self._request = request
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._dropping = False
        self._event = b""
        self._ended = False
        self._error: str | None = None
        self._deltas = 0
        self._chars = 0
        self._input: int | None = None
        self._output: int | None = None
        self._timings_input: int | None = None
        self._timings_output: int | None = None
        self._disbelieved: dict[str, None] = {}

    # --- what the relay asks -----------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The stream's end marker was seen (`data: [DONE]` / `message_stop`)."""
        return self._ended

    @property
    def error(self) -> str | None:
        """The message of the first error event in the stream (printable, trimmed), if any."""
        return self._error

    @property
    def disbelieved(self) -> tuple[str, ...]:
        """The usage fields this backend reported outside 0–10^12 (not believed)."""
        return tuple(self._disbelieved)

    @property
    def output_so_far(self) -> int:
        """Output tokens counted so far (for the rate window): the estimate's rule, or the
        upstream's running count when it reports one and that is larger."""
        counted = max(self._deltas, -(-self._chars // CHARS_PER_TOKEN))
        return max(counted, self._reported_output() or 0)

    def result(self) -> Usage:
        """The job's usage: upstream's report where there is one, the estimate elsewhere."""
        input_tokens = self._reported_input()
        output_tokens = self._reported_output()
        if self._disbelieved:
            input_tokens = output_tokens = None
        estimated = input_tokens is None or output_tokens is None
        if input_tokens is None:
            input_tokens = estimate_input_tokens(self._request)
        if output_tokens is None:
            output_tokens = max(self._deltas, -(-self._chars // CHARS_PER_TOKEN))
        return Usage(input_tokens, output_tokens, estimated)

    # --- bytes in ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take the next chunk of the body, as it came (any split, any size)."""
        if not data:
            return
        lines = data.split(b"\n")
        last = lines.pop()
        if lines:
            if self._partial:
                self._partial.append(lines[0])
                first = b"".join(self._partial)
                self._partial.clear()
                self._partial_size = 0
                if not self._dropping:
                    self._line(first)
                self._dropping = False
            elif self._dropping:
                self._dropping = False
            else:
                self._line(lines[0])
            for line in lines[1:]:
                self._line(line)
        if last:
            self._keep(last)

    def _keep(self, piece: bytes) -> None:
        if self._dropping:
            return
        self._partial_size += len(piece)
        if self._partial_size > MAX_LINE_BYTES:
            self._partial.clear()
            self._partial_size = 0
            self._dropping = True
            return
        self._partial.append(piece)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._event = b""
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()

    def _data(self, value: bytes) -> None:
        if value == b"[DONE]":
            if self._openai:
                self._ended = True
            return
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        if self._openai:
            self._openai_chunk(obj)
        else:
            self._anthropic_event(obj)

    # --- openai ------------------------------------------------------------------------------

    def _openai_chunk(self, chunk: dict[str, Any]) -> None:
        if chunk.get("error") not in (None, False):
            self._fail(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._input = self._figure(usage, "prompt_tokens", self._input)
            self._output = self._figure(usage, "completion_tokens", self._output)
        timings = chunk.get("timings")
        if isinstance(timings, dict):
            prompt = self._figure(timings, "prompt_n")
            cached = self._figure(timings, "cache_n")
            if prompt is not None:
                self._timings_input = self._believed("timings", prompt + (cached or 0))
            self._timings_output = self._figure(timings, "predicted_n", self._timings_output)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._openai_choice(choice, chunk)

    def _openai_choice(self, choice: dict[str, Any], chunk: dict[str, Any]) -> None:
        finish = choice.get("finish_reason")
        if finish == "error":
            self._fail(chunk)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        counted = False
        for key in _TEXT_KEYS:
            text = delta.get(key)
            if isinstance(text, str) and text:
                self._chars += len(text)
                counted = True
        calls = delta.get("tool_calls")
        if isinstance(calls, list) and calls:
            counted = True
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    self._chars += len(arguments)
        if counted or (delta.get("content") == "" and "role" not in delta and finish is None):
            self._deltas += 1

    # --- anthropic ---------------------------------------------------------------------------

    def _anthropic_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if self._event == b"error" or kind == "error":
            self._fail(event)
            return
        if not isinstance(kind, str):
            kind = self._event.decode("utf-8", "replace")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                key = _ANTHROPIC_DELTA_TEXT.get(str(delta.get("type")))
                text = delta.get(key) if key is not None else None
                if isinstance(text, str):
                    self._chars += len(text)
                    self._deltas += 1
        elif kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._anthropic_input(usage)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._anthropic_input(usage)
                self._output = self._figure(usage, "output_tokens", self._output)
        elif kind == "message_stop":
            self._ended = True

    def _anthropic_input(self, usage: dict[str, Any]) -> None:
        parts = [self._figure(usage, key) for key in _ANTHROPIC_INPUT_KEYS]
        if all(part is None for part in parts):
            return
        total = self._believed("input_tokens", sum(part or 0 for part in parts))
        if total is not None:
            self._input = total if self._input is None else max(self._input, total)

    # --- shared ------------------------------------------------------------------------------

    def _figure(
        self, report: Mapping[str, Any], key: str, default: int | None = None
    ) -> int | None:
        """A token count from a backend's report: a JSON integer in 0–10^12, else `default`
        (absent, not a count, or a number outside 0–10^12: then remembered, and the job is
        estimated)."""
        value = report.get(key)
        if _absurd(value):
            self._disbelieved[key] = None
            return default
        return _count(value, default)

    def _believed(self, key: str, value: int | None, default: int | None = None) -> int | None:
        if value is None or value <= MAX_BELIEVED:
            return value
        self._disbelieved[key] = None
        return default

    def _fail(self, event: dict[str, Any]) -> None:
        if self._error is None:
            message = error_message(event) or "an error event without a message"
            self._error = printable(message, MESSAGE_LIMIT, message=True)

    def _reported_input(self) -> int | None:
        if self._input is None or self._timings_input is None:
            return self._input if self._input is not None else self._timings_input
        return max(self._input, self._timings_input)

    def _reported_output(self) -> int | None:
        return self._output if self._output is not None else self._timings_output


def estimate_input_tokens(request: Mapping[str, Any]) -> int:
    """The documented input estimate: ceil(message text characters / 4) + 4 per message."""
    messages = request.get("messages")
    messages = messages if isinstance(messages, list) else []
    chars = text_chars(request.get("system")) + text_chars(request.get("prompt"))
    count = 0
    for message in messages:
        if isinstance(message, dict):
            count += 1
            chars += text_chars(message.get("content"))
    return -(-chars // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * count


def text_chars(content: Any) -> int:
    """Characters of text in a message's content: a string, or (nested) lists of strings and
    parts with `text` / `content`. Walked without recursion, so no nesting depth breaks it."""
    total = 0
    stack = [content]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item[key] for key in ("text", "content") if key in item)
    return total


def _absurd(value: object) -> bool:
    """A number no token count can be: outside 0–10^12 (past 2^64 orjson reads a float), NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not 0 <= value <= MAX_BELIEVED


def _count(value: Any, default: int | None = None) -> int | None:
    """A token count from JSON (a non-negative int, not a bool), else `default`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default
