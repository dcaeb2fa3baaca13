"""The earnings ledger's read side and `provider-agent earnings`, on real sqlite files written by
the real Outbox, read while the writer still has the file open."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from provider_agent.errors import NoLedger, OutboxError
from provider_agent.store.engine import FILE_NAME
from provider_agent.store.ledger import (
    CSV_HEADER,
    LedgerReader,
    Period,
    parse_day,
    parse_period,
    render_totals,
    usdc,
    write_csv,
)
from provider_agent.store.outbox import LedgerEntry, Outbox

ROOT = Path(__file__).resolve().parents[2]
HEADER_LINE = (
    "time,job_id,model,backend,outcome,tokens_in,tokens_out,usage_source,"
    "input_per_1m,output_per_1m,amount_micro_usdc"
)


def at(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 UTC time."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# (time, job_id, model, backend, outcome, tokens in, tokens out, source, prices)
JOBS = [
    ("2025-03-01T00:00:00", "a", "llama3.1:8b", "ollama", "job_done", 1000, 500, "reported"),
    ("2025-03-01T23:59:59.999", "b", "llama3.1:8b", "vllm", "job_done", 7, 3, "estimated"),
    ("2025-03-02T00:00:00", "c", 'qwen, "big"', "vllm", "backend_error", 0, 0, "reported"),
    (
        "2025-03-02T12:00:00",
        "d",
        'qwen, "big"',
        "vllm",
        "job_done",
        2_000_000,
        1_000_000,
        "reported",
    ),
    ("2025-03-03T00:00:00", "e", "llama3.1:8b", "ollama", "cancelled", 50, 10, "reported"),
]
PRICES = (300_000, 600_000)


async def write_jobs(state: Path, outbox: Outbox | None = None, clock: Clock | None = None) -> None:
    own = outbox is None
    clock = clock or Clock()
    outbox = outbox or await Outbox.open(state, clock=clock)
    for when, job_id, model, backend, outcome, tokens_in, tokens_out, source in JOBS:
        clock.now = at(when)
        entry = LedgerEntry(model, backend, outcome, tokens_in, tokens_out, source, *PRICES)  # type: ignore[arg-type]
        await outbox.finish(job_id, f'{{"job_id":"{job_id}"}}', entry)
    if own:
        await outbox.aclose()


# a: 1000×0.3 + 500×0.6 = 600; b: 2.1 + 1.8 = 3.9 → 4; d: 600000 + 600000 = 1200000
AMOUNTS = {"a": 600, "b": 4, "c": 0, "d": 1_200_000, "e": 0}


async def test_totals_by_day_model_and_backend(tmp_path: Path) -> None:
    await write_jobs(tmp_path)
    with LedgerReader(tmp_path / FILE_NAME) as reader:
        by_day = reader.totals("day", Period())
        assert [
            (t.key, t.jobs, t.failed, t.tokens_in, t.tokens_out, t.amount_micro_usdc)
            for t in by_day
        ] == [
            ("2025-03-01", 2, 0, 1007, 503, 604),
            ("2025-03-02", 2, 1, 2_000_000, 1_000_000, 1_200_000),
            (
                "2025-03-03",
                1,
                1,
                0,
                0,
                0,
            ),  # a failed job earns nothing, and its tokens are not billed
        ]
        by_model = {
            t.key: (t.jobs, t.failed, t.amount_micro_usdc) for t in reader.totals("model", Period())
        }
        assert by_model == {"llama3.1:8b": (3, 1, 604), 'qwen, "big"': (2, 1, 1_200_000)}
        by_backend = {
            t.key: (t.jobs, t.amount_micro_usdc) for t in reader.totals("backend", Period())
        }
        assert by_backend == {"ollama": (2, 600), "vllm": (3, 1_200_004)}
        assert sum(t.amount_micro_usdc for t in by_day) == sum(AMOUNTS.values())


async def test_the_period_is_since_inclusive_until_exclusive_in_utc(tmp_path: Path) -> None:
    await write_jobs(tmp_path)
    with LedgerReader(tmp_path / FILE_NAME) as reader:

        def ids(since: str | None, until: str | None) -> list[str]:
            return [str(row[1]) for row in reader.rows(parse_period(since, until))]

        assert ids("2025-03-01", "2025-03-02") == ["a", "b"]  # 23:59:59.999 is still the 1st
        assert ids("2025-03-02", "2025-03-03") == ["c", "d"]  # midnight belongs to the new day
        assert ids("2025-03-03", None) == ["e"]
        assert ids(None, "2025-03-01") == []
        assert ids(None, None) == ["a", "b", "c", "d", "e"]
        assert reader.totals("day", parse_period("2025-04-01", None)) == []


async def test_csv_has_the_contract_header_and_every_row(tmp_path: Path) -> None:
    await write_jobs(tmp_path)
    out = io.StringIO()
    with LedgerReader(tmp_path / FILE_NAME) as reader:
        write_csv(reader.rows(Period()), out)
    text = out.getvalue()
    assert text.splitlines()[0] == HEADER_LINE == ",".join(CSV_HEADER)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["job_id"] for row in rows] == ["a", "b", "c", "d", "e"]
    assert {row["job_id"]: int(row["amount_micro_usdc"]) for row in rows} == AMOUNTS
    assert rows[0]["time"] == "2025-03-01T00:00:00.000Z"
    assert rows[1]["time"] == "2025-03-01T23:59:59.999Z"
    assert rows[2]["model"] == 'qwen, "big"'  # quoted, and read back intact
    assert rows[1]["usage_source"] == "estimated"
    assert (rows[0]["input_per_1m"], rows[0]["output_per_1m"]) == ("300000", "600000")


async def test_the_ledger_is_read_while_the_agent_writes(tmp_path: Path) -> None:
    clock = Clock()
    async with await Outbox.open(tmp_path, clock=clock) as outbox:
        await write_jobs(tmp_path, outbox, clock)
        # Committed rows sit in the WAL, not yet in the main file: a reader must still see them.
        assert (tmp_path / f"{FILE_NAME}-wal").stat().st_size > 0
        with LedgerReader(tmp_path / FILE_NAME) as reader:
            assert sum(t.jobs for t in reader.totals("day", Period())) == 5
            # A reader in the middle of a read does not block the writer...
            rows = reader.rows(Period())
            first = next(rows)
            clock.now = at("2025-03-04T00:00:00")
            entry = LedgerEntry("m", "ollama", "job_done", 1, 1, "reported", *PRICES)
            with anyio.fail_after(5):
                await outbox.finish("late", '{"job_id":"late"}', entry)
            assert first[1] == "a" and len(list(rows)) == 4  # ...and keeps its snapshot
            assert sum(t.jobs for t in reader.totals("day", Period())) == 6
        # The reader's connection cannot write.
        uri = f"{(tmp_path / FILE_NAME).as_uri()}?mode=ro"
        with (
            sqlite3.connect(uri, uri=True) as db,
            pytest.raises(sqlite3.OperationalError, match="readonly"),
        ):
            db.execute("DELETE FROM ledger")


def test_a_missing_or_broken_ledger(tmp_path: Path) -> None:
    with pytest.raises(NoLedger):
        LedgerReader(tmp_path / FILE_NAME)
    assert not (tmp_path / FILE_NAME).exists()  # reading never creates the file
    (tmp_path / FILE_NAME).write_bytes(os.urandom(4096))
    with pytest.raises(OutboxError, match="not a database"):
        LedgerReader(tmp_path / FILE_NAME)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "2025-1-1",
        "20250101",
        "2025-W01-1",
        "2025-01-01T00:00",
        "01/02/2025",
        "2025-01-01\n",
        "２０２５-01-01",
        "2025-01-01\x1b[2J",
        "9" * 10_000,
        "yesterday",
    ],
)
def test_a_date_that_is_not_yyyy_mm_dd_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a date; write YYYY-MM-DD") as caught:
        parse_day(text, "--since")
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 120


@pytest.mark.parametrize("text", ["2025-02-29", "2025-13-01", "2025-00-10", "2025-04-31"])
def test_a_day_that_does_not_exist_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="no such day"):
        parse_day(text, "--until")


def test_dates_are_utc_midnights_and_the_period_must_not_be_empty() -> None:
    assert parse_day("2024-02-29", "--since") == int(at("2024-02-29T00:00:00")) * 1000
    assert parse_day("1970-01-01", "--since") == 0
    for since, until in (("2025-01-02", "2025-01-01"), ("2025-01-01", "2025-01-01")):
        with pytest.raises(ValueError, match="--since must be a day before --until"):
            parse_period(since, until)


def test_usdc_is_exact() -> None:
    assert usdc(0) == "0.000000"
    assert usdc(1) == "0.000001"
    assert usdc(1_200_004) == "1.200004"
    assert usdc(123_456_789_012_345_678) == "123456789012.345678"


def test_the_table_escapes_names_and_totals_every_column() -> None:
    from provider_agent.store.ledger import Total

    table = render_totals(
        [Total("evil\x1b[31m", 2, 1, 10, 20, 5), Total("", 1, 0, 1, 1, 1_000_000)], "model"
    )
    assert "\x1b" not in table and "evil\\x1b[31m" in table
    lines = table.splitlines()
    assert lines[0].split() == ["MODEL", "JOBS", "FAILED", "TOKENS", "IN", "TOKENS", "OUT", "USDC"]
    assert lines[3].split() == ["TOTAL", "3", "1", "11", "21", "1.000005"]
    empty = render_totals([], "day")
    assert "(no jobs in this period)" in empty and "TOTAL" in empty


# -- the command, as an operator runs it --------------------------------------------------------


def earnings(
    tmp_path: Path, *args: str, state: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[coordinator]\nurl = "wss://coord.example/provider/connect"\n'
        "[pricing]\ndefault_input_per_1m = 1\ndefault_output_per_1m = 2\n"
        f'[state]\ndir = "{state or tmp_path / "state"}"\n'
    )
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PROVIDER_AGENT_") and k != "STATE_DIRECTORY"
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "provider_agent", "earnings", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_earnings_end_to_end(tmp_path: Path) -> None:
    anyio.run(write_jobs, tmp_path / "state")

    result = earnings(tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "DAY"
    assert lines[1].split() == ["2025-03-01", "2", "0", "1007", "503", "0.000604"]
    assert [line.split()[0] for line in lines[1:4]] == ["2025-03-01", "2025-03-02", "2025-03-03"]
    assert lines[4].split() == ["TOTAL", "5", "2", "2001007", "1000503", "1.200604"]

    result = earnings(tmp_path, "--by", "backend", "--since", "2025-03-02")
    assert result.returncode == 0
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:4]] == [
        ["ollama", "1"],
        ["vllm", "2"],
        ["TOTAL", "3"],
    ]

    result = earnings(tmp_path, "--csv", "--until", "2025-03-02")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [
        HEADER_LINE,
        "2025-03-01T00:00:00.000Z,a,llama3.1:8b,ollama,job_done,1000,500,reported,300000,600000,600",
        "2025-03-01T23:59:59.999Z,b,llama3.1:8b,vllm,job_done,7,3,estimated,300000,600000,4",
    ]


def test_earnings_reads_state_directory_when_set(tmp_path: Path) -> None:
    anyio.run(write_jobs, tmp_path / "systemd-state")
    result = earnings(
        tmp_path,
        "--csv",
        state=tmp_path / "elsewhere",
        env={"STATE_DIRECTORY": str(tmp_path / "systemd-state")},
    )
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 6


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--since", "2025-3-1"),
            "earnings: --since '2025-3-1': not a date; write YYYY-MM-DD (UTC)",
        ),
        (("--until", "2025-02-30"), "earnings: --until '2025-02-30': no such day"),
        (("--since", "2026-13-01"), "earnings: --since '2026-13-01': no such day"),
        (("--since", "-2026-01-01"), "earnings: --since '-2026-01-01': not a date"),
        (("--since", "2025-03-02", "--until", "2025-03-01"), "earnings: --since must be a day"),
        (("--since", "\x1b[2J"), "earnings: --since '\\x1b[2J': not a date"),
    ],
)
def test_earnings_bad_dates_are_one_line_exit_2(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    """cli.md (settled): a bad DATE is an invalid argument (2), not a configuration error."""
    anyio.run(write_jobs, tmp_path / "state")
    result = earnings(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_earnings_without_state_says_where_it_looked(tmp_path: Path) -> None:
    result = earnings(tmp_path, state=tmp_path / "never-ran")
    assert result.returncode == 78
    assert f"no ledger at {tmp_path / 'never-ran' / FILE_NAME}" in result.stderr
    assert result.stderr.count("\n") == 1 and "[state] dir" in result.stderr
    assert not (tmp_path / "never-ran").exists()


def test_earnings_on_a_corrupt_store_is_one_line_exit_1(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / FILE_NAME).write_bytes(b"\x00garbage" * 1000)
    result = earnings(tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "not a database" in result.stderr and "Traceback" not in result.stderr


def test_earnings_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    async def many() -> None:
        async with await Outbox.open(tmp_path / "state") as outbox:
            entry = LedgerEntry("m", "ollama", "job_done", 1, 1, "reported", 1, 1)

            async def finish(first: int) -> None:
                for n in range(first, 5_000, 50):
                    await outbox.finish(f"job-{n:05d}", "{}", entry)

            async with anyio.create_task_group() as tasks:
                for first in range(50):
                    tasks.start_soon(finish, first)

    anyio.run(many)
    config_run = earnings(tmp_path, "--csv")  # writes agent.toml; the full output works
    assert config_run.returncode == 0 and len(config_run.stdout.splitlines()) == 5_001
    shell = (
        f"{sys.executable} -m provider_agent earnings --csv --config {tmp_path / 'agent.toml'}"
        " | head -n 2"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.stdout.splitlines()[0] == HEADER_LINE
    assert result.stderr == "" and result.returncode == 0


async def test_totals_of_rows_with_the_largest_figures_are_exact_never_an_overflow(
    tmp_path: Path,
) -> None:
    """Rows a store may hold (each figure up to 2^63-1, as an older agent wrote them for a
    backend's absurd usage) add up exactly: sqlite's own sum() raised "integer overflow"."""
    big = 2**63 - 1
    async with await Outbox.open(tmp_path) as outbox:
        for job_id in ("x", "y", "z"):
            entry = LedgerEntry("m", "b", "job_done", big, big, "reported", 0, 0)
            await outbox.finish(job_id, f'{{"job_id":"{job_id}"}}', entry)
        with sqlite3.connect(tmp_path / FILE_NAME) as db:
            db.execute("UPDATE ledger SET amount_micro_usdc = ?", (big,))
    with LedgerReader(tmp_path / FILE_NAME) as reader:
        [total] = reader.totals("model", Period())
    assert (total.jobs, total.tokens_in, total.tokens_out) == (3, 3 * big, 3 * big)
    assert total.amount_micro_usdc == 3 * big
    assert "TOTAL" in render_totals([total], "model")
