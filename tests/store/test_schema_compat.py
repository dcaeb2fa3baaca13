"""The outbox schema both ways across an upgrade: a newer release may add to the schema only what
the previous one still reads, and an older release opens such a file without changing it.

The rule is a pure function (table-tested). The migration forward and the rollback run the real
code of two releases: this tree as it is, and a copy of it whose `store/engine.py` adds a schema
version (a nullable column and a table, `READABLE_FROM` kept, as the rule allows), each in its own
Python process against one state directory holding undelivered billing records.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provider_agent.store.engine import (
    FILE_NAME,
    READABLE_FROM,
    SCHEMA_VERSION,
    compatibility,
    file_schema,
    readable_by,
)

PACKAGE = Path(__file__).resolve().parents[2] / "provider_agent"


@pytest.mark.parametrize(
    ("file_version", "readable_from", "ours", "expected"),
    [
        (0, None, 2, "create"),  # a new file
        (1, None, 2, "migrate"),
        (2, None, 2, "open"),  # written before the marker existed
        (2, 2, 2, "open"),
        (3, 2, 2, "open"),  # a newer release that only added
        (3, 3, 2, "refuse"),  # a newer release that changed what 2 reads
        (3, None, 2, "refuse"),  # newer, and says nothing: not ours to guess
        (4, 2, 3, "open"),
        (4, 4, 3, "refuse"),
        (2, 2, 3, "migrate"),
    ],
)
def test_what_a_release_does_with_a_file(
    file_version: int, readable_from: int | None, ours: int, expected: str
) -> None:
    assert compatibility(file_version, readable_from, ours) == expected
    assert readable_by(file_version, readable_from, ours) == (expected != "refuse")


def test_this_release_keeps_the_schema_readable_by_itself() -> None:
    assert READABLE_FROM <= SCHEMA_VERSION


# --- two releases, one state directory -----------------------------------------------------------

#: Opens the outbox in the state dir given, stores N billing records (a terminal frame and a
#: ledger row each, undelivered), optionally confirms every undelivered one, and prints what it saw.
SCRIPT = """
import json, sys
from pathlib import Path
import anyio
from provider_agent.store import engine
from provider_agent.store.outbox import LedgerEntry, Outbox

state, prefix, count, confirm = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]

def frame(job_id):
    return json.dumps({"type": "job_done", "job_id": job_id, "duration_ms": 5,
                       "tokens": {"input": 10, "output": 4, "input_tokens": 10,
                                  "output_tokens": 4}}, separators=(",", ":"))

async def main():
    async with await Outbox.open(state) as outbox:
        for n in range(count):
            job_id = f"{prefix}{n}"
            await outbox.accept(job_id, "m")
            entry = LedgerEntry("m", "vllm", "job_done", 10, 4, "reported", 300000, 600000)
            await outbox.finish(job_id, frame(job_id), entry)
        seen = [job_id for job_id, _ in await outbox.undelivered()]
        if confirm == "yes":
            await outbox.delivered(seen)
        return seen

print(json.dumps({"schema": engine.SCHEMA_VERSION, "undelivered": anyio.run(main)}))
"""


def release_tree(tmp_path: Path, name: str, schema: int, readable_from: int) -> Path:
    """A copy of this package; from `schema` 3 on its engine adds a nullable ledger column and a
    table in one more migration."""
    tree = tmp_path / name
    shutil.copytree(PACKAGE, tree / "provider_agent", ignore=shutil.ignore_patterns("__pycache__"))
    engine = tree / "provider_agent/store/engine.py"
    text = engine.read_text()
    if schema != SCHEMA_VERSION:
        edits = {
            f"\nSCHEMA_VERSION = {SCHEMA_VERSION}\n": f"\nSCHEMA_VERSION = {schema}\n",
            f"\nREADABLE_FROM = {READABLE_FROM}\n": f"\nREADABLE_FROM = {readable_from}\n",
            "\n)\nassert len(_SCHEMA) == SCHEMA_VERSION\n": (
                '\n    """\n    ALTER TABLE ledger ADD COLUMN region TEXT;\n'
                "    CREATE TABLE payouts (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL);\n"
                '    """,\n)\nassert len(_SCHEMA) == SCHEMA_VERSION\n'
            ),
        }
        for old, new in edits.items():
            assert text.count(old) == 1, f"engine.py no longer has {old!r}"
            text = text.replace(old, new)
        engine.write_text(text)
    return tree


def run_release(
    tree: Path, state: Path, prefix: str, count: int, *, confirm: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(state), prefix, str(count), "yes" if confirm else "no"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        timeout=60,
        check=False,
    )


def seen(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def ledger(state: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"{(state / FILE_NAME).as_uri()}?mode=ro", uri=True) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(ledger)")]
        region = "region" if "region" in columns else "NULL"
        return db.execute(f"SELECT job_id, amount_micro_usdc, {region} FROM ledger").fetchall()


def test_forward_and_back_with_undelivered_billing_records(tmp_path: Path) -> None:
    old = release_tree(tmp_path, "old", SCHEMA_VERSION, READABLE_FROM)
    new = release_tree(tmp_path, "new", SCHEMA_VERSION + 1, READABLE_FROM)
    state = tmp_path / "state"

    first = seen(run_release(old, state, "a", 2))
    assert first == {"schema": SCHEMA_VERSION, "undelivered": ["a0", "a1"]}
    assert file_schema(state / FILE_NAME) == (SCHEMA_VERSION, READABLE_FROM)

    # Forward: the newer release migrates the file and finds every record still to deliver.
    forward = seen(run_release(new, state, "b", 2))
    assert forward["undelivered"] == ["a0", "a1", "b0", "b1"]
    assert file_schema(state / FILE_NAME) == (SCHEMA_VERSION + 1, READABLE_FROM)

    # Back: the older release opens the newer file as it is and loses nothing.
    back = seen(run_release(old, state, "c", 1))
    assert back["undelivered"] == ["a0", "a1", "b0", "b1", "c0"]
    assert file_schema(state / FILE_NAME) == (SCHEMA_VERSION + 1, READABLE_FROM)
    rows = ledger(state)
    assert [row[0] for row in rows] == ["a0", "a1", "b0", "b1", "c0"]
    assert {row[1] for row in rows} == {6}  # ceil((10 × 0.3 + 4 × 0.6)) micro-USDC each
    assert {row[2] for row in rows} == {None}  # the older release never sets the new column
    with sqlite3.connect(state / FILE_NAME) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "payouts" in tables

    # The older one delivers them all; the newer one then has nothing left to send.
    assert len(seen(run_release(old, state, "d", 0, confirm=True))["undelivered"]) == 5
    assert seen(run_release(new, state, "e", 0))["undelivered"] == []


def test_an_older_release_refuses_a_file_it_may_not_read_and_leaves_it_untouched(
    tmp_path: Path,
) -> None:
    old = release_tree(tmp_path, "old", SCHEMA_VERSION, READABLE_FROM)
    strict = release_tree(tmp_path, "strict", SCHEMA_VERSION + 1, SCHEMA_VERSION + 1)
    state = tmp_path / "state"
    seen(run_release(old, state, "a", 1))
    seen(run_release(strict, state, "b", 1))
    before = (state / FILE_NAME).read_bytes()

    refused = run_release(old, state, "c", 1)

    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert (
        f"written by a newer provider-agent (schema {SCHEMA_VERSION + 1}, which needs schema "
        f"{SCHEMA_VERSION + 1} or later; this one knows {SCHEMA_VERSION}): upgrade the agent"
    ) in last
    assert (state / FILE_NAME).read_bytes() == before
    assert file_schema(state / FILE_NAME) == (SCHEMA_VERSION + 1, SCHEMA_VERSION + 1)
    assert seen(run_release(strict, state, "d", 0))["undelivered"] == ["a0", "b0"]
