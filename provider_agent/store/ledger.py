"""The read side of the earnings ledger, and the `earnings` command (cli.md).

The ledger lives in the outbox's sqlite file (`outbox.py` writes it, one row per terminal frame).
This module only reads: it opens the file read-only, which WAL allows while the agent writes, and
it never creates the file. Periods are [since, until) in UTC days.
"""

from __future__ import annotations

import csv
import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal, TextIO

from provider_agent.clock import utc_ms
from provider_agent.errors import ExitCode, NoLedger, OutboxError
from provider_agent.safe_text import printable
from provider_agent.store.engine import FILE_NAME, describe_sqlite_error

Grouping = Literal["day", "model", "backend"]
GROUPINGS: tuple[Grouping, ...] = ("day", "model", "backend")
CSV_HEADER = (
    "time",
    "job_id",
    "model",
    "backend",
    "outcome",
    "tokens_in",
    "tokens_out",
    "usage_source",
    "input_per_1m",
    "output_per_1m",
    "amount_micro_usdc",
)
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_KEYS: dict[Grouping, str] = {
    "day": "strftime('%Y-%m-%d', time_ms / 1000, 'unixepoch')",
    "model": "model",
    "backend": "backend",
}
_NO_END = 2**62


@dataclass(frozen=True)
class Period:
    """[since_ms, until_ms) in milliseconds since the epoch; None = unbounded."""

    since_ms: int | None = None
    until_ms: int | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        return (
            self.since_ms if self.since_ms is not None else -_NO_END,
            self.until_ms if self.until_ms is not None else _NO_END,
        )


@dataclass(frozen=True)
class Total:
    """One line of the totals table. Tokens and amount count completed jobs only: a failed job
    earns nothing (it is counted in `failed`)."""

    key: str
    jobs: int
    failed: int
    tokens_in: int
    tokens_out: int
    amount_micro_usdc: int


def parse_day(text: str, option: str) -> int:
    """`YYYY-MM-DD` (UTC) → ms at its midnight; ValueError with the line an operator sees."""
    shown = ascii(text[:40]) + ("…" if len(text) > 40 else "")
    if not _DAY.fullmatch(text):
        raise ValueError(f"{option} {shown}: not a date; write YYYY-MM-DD (UTC)")
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option} {shown}: no such day") from None
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1000


def parse_period(since: str | None, until: str | None) -> Period:
    period = Period(
        parse_day(since, "--since") if since is not None else None,
        parse_day(until, "--until") if until is not None else None,
    )
    since_ms, until_ms = period.bounds
    if since_ms >= until_ms:
        raise ValueError("--since must be a day before --until (the period is [since, until))")
    return period


class LedgerReader:
    """A read-only view of the ledger; safe while the agent writes (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise NoLedger(f"no ledger at {path}")
        try:
            self._db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
            self._db.execute("SELECT 1 FROM ledger LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"ledger {path}: {describe_sqlite_error(exc)}") from None

    def __enter__(self) -> LedgerReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def totals(self, by: Grouping, period: Period) -> list[Total]:
        """One Total per day, model or backend in the period, sorted by that key."""
        key = _KEYS[by]
        done_in = "CASE WHEN outcome = 'job_done' THEN tokens_in ELSE 0 END"
        done_out = "CASE WHEN outcome = 'job_done' THEN tokens_out ELSE 0 END"
        query = (
            f"SELECT {key} AS k, count(*), coalesce(sum(outcome != 'job_done'), 0),"
            f" {_exact_sum(done_in)}, {_exact_sum(done_out)}, {_exact_sum('amount_micro_usdc')}"
            " FROM ledger WHERE time_ms >= ? AND time_ms < ? GROUP BY k ORDER BY k"
        )
        try:
            return [
                Total(name, jobs, failed, *(high << 32 | low for high, low in _pairs(sums)))
                for name, jobs, failed, *sums in self._db.execute(query, period.bounds)
            ]
        except sqlite3.Error as exc:
            raise OutboxError(f"ledger {self.path}: {describe_sqlite_error(exc)}") from None

    def rows(self, period: Period) -> Iterator[tuple[str | int, ...]]:
        """Every row of the period, oldest first, as the CSV columns (time as ISO 8601 UTC)."""
        try:
            cursor = self._db.execute(
                "SELECT time_ms, job_id, model, backend, outcome, tokens_in, tokens_out,"
                " usage_source, input_per_1m, output_per_1m, amount_micro_usdc"
                " FROM ledger WHERE time_ms >= ? AND time_ms < ? ORDER BY time_ms, id",
                period.bounds,
            )
            for time_ms, *rest in cursor:
                yield (
                    iso_time(time_ms),
                    *(printable(v, limit=None) if isinstance(v, str) else v for v in rest),
                )
        except sqlite3.Error as exc:
            raise OutboxError(f"ledger {self.path}: {describe_sqlite_error(exc)}") from None


def _exact_sum(column: str) -> str:
    """SQL summing a non-negative 64-bit column without sqlite's "integer overflow": its high
    and low 32 bits are summed apart (each sum fits in 64 bits for 2^31 rows), and joined again
    in Python's unbounded ints — a row with an absurd figure can never break `earnings`."""
    return f"coalesce(sum(({column}) >> 32), 0), coalesce(sum(({column}) & 4294967295), 0)"


def _pairs(sums: list[int]) -> Iterator[tuple[int, int]]:
    return zip(sums[::2], sums[1::2], strict=True)


def iso_time(time_ms: int) -> str:
    return utc_ms(time_ms / 1000)


def usdc(micro: int) -> str:
    """Exact decimal USDC from integer micro-USDC."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def render_totals(totals: list[Total], by: Grouping) -> str:
    """The readable table, with a TOTAL line; names from outside are escaped."""
    header = (by.upper(), "JOBS", "FAILED", "TOKENS IN", "TOKENS OUT", "USDC")
    lines = [
        [_printable(t.key), *map(str, _numbers(t)[:4]), usdc(t.amount_micro_usdc)] for t in totals
    ]
    grand = [sum(column) for column in zip(*(_numbers(t) for t in totals), strict=True)] or [0] * 5
    footer = ["TOTAL", *map(str, grand[:4]), usdc(grand[4])]
    width = [max(len(row[i]) for row in [list(header), *lines, footer]) for i in range(6)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        first = cells[0].ljust(width[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], width[1:], strict=True))])

    out = [line(header)]
    out += [line(row) for row in lines] or ["(no jobs in this period)"]
    out += [line(footer), "amounts: gross at list price; failed jobs earn nothing"]
    return "\n".join(out)


def _numbers(total: Total) -> tuple[int, int, int, int, int]:
    return (total.jobs, total.failed, total.tokens_in, total.tokens_out, total.amount_micro_usdc)


def _printable(text: str) -> str:
    return printable(text, limit=None) or "-"


def write_csv(rows: Iterator[tuple[str | int, ...]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)


def earnings_command(
    state_dir: Path, since: str | None, until: str | None, by: Grouping, *, as_csv: bool
) -> int:
    """`provider-agent earnings`: 0; 2 for a bad DATE or period (an invalid argument, cli.md
    settled); 78 for no ledger where the config says."""
    try:
        period = parse_period(since, until)
    except ValueError as exc:
        print(f"earnings: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    path = state_dir / FILE_NAME
    try:
        with LedgerReader(path) as reader:
            if as_csv:
                write_csv(reader.rows(period), sys.stdout)
            else:
                print(render_totals(reader.totals(by, period), by))
            sys.stdout.flush()
    except NoLedger:
        print(
            f"earnings: no ledger at {path}: the agent keeps it in its state dir ([state] dir,"
            " or $STATE_DIRECTORY under systemd); point [state] dir at it",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    except OutboxError as exc:
        print(f"earnings: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except BrokenPipeError:
        # `earnings --csv | head`: the reader left; end quietly (and keep Python's exit flush
        # from complaining about the closed pipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except OSError as exc:
        print(f"earnings: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
