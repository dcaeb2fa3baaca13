"""Logging set-up: one line per event, text for a terminal or JSON for journald/Loki.

Modules log with `logging.getLogger(__name__)` and key=value fields in the message; no secret is
ever passed to a log call, and the one library that would log them (websockets' frame trace at
debug) is held at INFO.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from provider_agent.safe_text import printable

TRACE = 5
LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, one line per event whatever the message holds: control
    characters (from a backend, a coordinator's reason) are escaped and URL credentials cut out
    (`text.printable`); a traceback keeps its line breaks and nothing else."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = printable(record.message, None)
        return super().formatMessage(safe)

    def formatException(self, ei: Any) -> str:
        return _safe_lines(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception text when present),
    the message made safe as in `TextFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": printable(record.getMessage(), None),
        }
        if record.exc_info:
            entry["exc"] = _safe_lines(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def _safe_lines(text: str) -> str:
    """A traceback with each line made safe and the line breaks kept."""
    return "\n".join(printable(line, None) for line in text.split("\n"))


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for stderr; safe to call again (reload) to change level/format."""
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    # Third-party chatter stays quiet unless the operator asked for debug.
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.DEBUG
    for name in ("aiohttp.access", "asyncio"):
        logging.getLogger(name).setLevel(quiet)
    # The websocket library's debug output is a frame trace: it would print the auth frame
    # (enrollment code) and every job's content. Never below INFO, at any level we are given.
    logging.getLogger("websockets").setLevel(max(quiet, logging.INFO))


class Throttle:
    """At most one line per `every_s` for one kind of event that may repeat without end (frames
    a coordinator floods, a store that keeps failing): `due(now)` is None when this one is
    passed over, else how many were passed over since the last line (for that line to say)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.held = 0
        self._next_at: float | None = None

    def due(self, now: float) -> int | None:
        if self._next_at is not None and now < self._next_at:
            self.held += 1
            return None
        self._next_at = now + self.every_s
        held, self.held = self.held, 0
        return held

    def reset(self) -> int:
        """Start afresh (the condition ended); returns how many were held back."""
        held, self.held, self._next_at = self.held, 0, None
        return held
