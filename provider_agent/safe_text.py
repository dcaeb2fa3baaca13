"""Text from outside, made safe: which model ids are acceptable, and how foreign text is shown.

Pure functions. Backends, their error bodies and the network decide what these strings contain;
nothing they send may steer a terminal (ESC sequences), forge a log line (CR, LF), hide itself
(NUL, bidirectional overrides), flood a line (100,000 characters) or print a URL's password.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: protocol.md §2: a `model_id` is 1–256 characters.
MODEL_ID_MAX_CHARS = 256
#: Where `printable` cuts by default: enough for an error body's gist on one line.
DEFAULT_LIMIT = 200
#: Longest upstream message the agent passes on (a RouteFailure's, a usage warning's).
MESSAGE_LIMIT = 300
REDACTED = "[redacted]"

_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")
_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;]+")
_WHITESPACE_RUN = re.compile(r"[\t\n\r\f\v]+")


def model_id_problem(value: str) -> str | None:
    """Why `value` cannot be advertised as a `model_id` (protocol.md §2: 1–256 characters,
    printable, no control characters, not only whitespace); None when it can. The reason reads
    after a count: "2 with control characters"."""
    if not value:
        return "empty"
    if len(value) > MODEL_ID_MAX_CHARS:
        return f"over {MODEL_ID_MAX_CHARS} characters"
    if any(_is_control(ch) for ch in value):
        return "with control characters"
    if not value.isprintable():
        return "with unprintable characters"
    if value.isspace():
        return "only whitespace"
    return None


def printable(
    value: object,
    limit: int | None = DEFAULT_LIMIT,
    *,
    secrets: Iterable[str] = (),
    message: bool = False,
) -> str:
    """`value` as one safe line: control and other unprintable characters as Python escapes
    (`\\x1b`, `\\r`, `\\x00`, `\\u202e`), the credentials of any URL in it (`user:pass@`) cut
    out, and at most `limit` characters (None: no cut), ending with how many were cut. Applying
    it again changes nothing (backslashes are left alone), so a caller need not know whether
    text was already made safe.

    `secrets` are replaced by "[redacted]" first. A `message` (an upstream's error text, passed
    on to the coordinator and the log) also has any `Bearer <token>` redacted and its runs of
    line breaks and tabs folded to one space."""
    text = str(value)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    if message:
        text = _BEARER.sub(f"Bearer {REDACTED}", text)
        text = _WHITESPACE_RUN.sub(" ", text).strip()
    if "@" in text:
        text = _USERINFO.sub("", text)
    if (limit is None or len(text) <= limit) and text.isprintable():
        return text
    if limit is None:
        return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    pieces = [ch if ch.isprintable() else _escape(ch) for ch in text[: limit + 1]]
    if len(text) <= limit and sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    room = limit - len(_cut_marker(len(text)))
    kept: list[str] = []
    length = 0
    for piece in pieces:
        if length + len(piece) > room:
            break
        kept.append(piece)
        length += len(piece)
    return "".join(kept) + _cut_marker(len(text) - len(kept))


def _cut_marker(dropped: int) -> str:
    return f"…(+{dropped} chars)"


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code < 0xA0


def _escape(ch: str) -> str:
    code = ord(ch)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
    if named is not None:
        return named
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
