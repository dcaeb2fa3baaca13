"""`upgrade`'s decisions as tables: the watch verdict from what was observed, the outbox schema
across the switch, the gate's selftest, and what the operator reads and types. No I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from provider_agent.ops.upgrade.rules import (
    Expect,
    HttpView,
    Observation,
    UnitState,
    changes,
    gate_selftest,
    judge,
    parse_watch,
    schema_plan,
)
from provider_agent.ops.upgrade.unit_control import unit_state

OLD, NEW, AGAIN = "inv-old", "inv-new", "inv-again"
EXPECT = Expect(old_invocation=OLD, version="0.2.0", watch_s=60, stop_limit_s=90)

#: The unit as systemd shows it at each stage of a restart.
DRAINING = UnitState("deactivating", "stop-sigterm", 100, OLD)
BETWEEN = UnitState("inactive", "dead", 0, OLD, exec_main_pid=100, exec_main_status=0)
STARTING = UnitState("activating", "start", 200, NEW)
RUNNING = UnitState("active", "running", 200, NEW)
EXITED = UnitState("activating", "auto-restart", 0, NEW, exec_main_pid=200, exec_main_status=3)
RESTARTED = UnitState("activating", "start", 300, AGAIN)
FAILED = UnitState("failed", "failed", 0, NEW, 200, 1, "exit-code")
STOPPED = UnitState("inactive", "dead", 0, NEW, 200, 0)

SILENT = HttpView(None, "no answer on 127.0.0.1:9821 (Connection refused)")
OLD_DRAINING = HttpView(503, "not ready: draining", "0.1.0", True)
NOT_YET = HttpView(
    503, "not ready: not authenticated to the coordinator (session connecting)", "0.2.0"
)
READY = HttpView(200, "ready: authenticated, 1 of 1 backend(s) healthy", "0.2.0", True)
WRONG = HttpView(200, "ready", "0.1.0", True)


def seen(*steps: tuple[float, UnitState, HttpView]) -> list[Observation]:
    return [Observation(at, unit, http) for at, unit, http in steps]


CASES: dict[str, tuple[Sequence[Observation], Expect, str, str]] = {
    "still draining": (
        seen((1, DRAINING, OLD_DRAINING), (30, DRAINING, OLD_DRAINING)),
        EXPECT,
        "stopping",
        "",
    ),
    "between stop and start": (
        seen((1, DRAINING, SILENT), (2, BETWEEN, SILENT)),
        EXPECT,
        "stopping",
        "",
    ),
    "the old one never stops": (
        seen((1, DRAINING, OLD_DRAINING), (91, DRAINING, OLD_DRAINING)),
        EXPECT,
        "failed",
        "no new process within 1m 30s of the restart (the unit is deactivating/stop-sigterm)",
    ),
    "starting": (seen((1, DRAINING, SILENT), (2, STARTING, SILENT)), EXPECT, "starting", ""),
    "ready, still watched": (
        seen((2, STARTING, SILENT), (4, RUNNING, NOT_YET), (5, RUNNING, READY)),
        EXPECT,
        "ready",
        "",
    ),
    "ready and held for the window": (
        seen((2, STARTING, SILENT), (5, RUNNING, READY), (62, RUNNING, READY)),
        EXPECT,
        "healthy",
        "",
    ),
    "ready once is enough: a later 503 (a coordinator blip) is not a failure": (
        seen(
            (2, STARTING, SILENT),
            (5, RUNNING, READY),
            (30, RUNNING, NOT_YET),
            (62, RUNNING, NOT_YET),
        ),
        EXPECT,
        "healthy",
        "",
    ),
    "coming back: done once ready": (
        seen((2, STARTING, SILENT), (5, RUNNING, READY)),
        Expect(OLD, "0.2.0", 60, 90, hold=False),
        "healthy",
        "",
    ),
    "exits at start": (
        seen((1, DRAINING, SILENT), (2, STARTING, SILENT), (3, EXITED, SILENT)),
        EXPECT,
        "failed",
        "the new process exited (exit status 3); systemd is restarting it",
    ),
    "exited and already started again before we looked twice": (
        seen((2, STARTING, SILENT), (8, RESTARTED, SILENT)),
        EXPECT,
        "failed",
        "the new process was restarted by systemd",
    ),
    "restarted after being ready": (
        seen((2, RUNNING, READY), (40, RESTARTED, SILENT)),
        EXPECT,
        "failed",
        "the new process was restarted by systemd",
    ),
    "the start limit gave up": (
        seen((2, STARTING, SILENT), (3, FAILED, SILENT)),
        EXPECT,
        "failed",
        "the service failed (exit-code) (exit status 1)",
    ),
    "someone stopped it": (
        seen((2, RUNNING, READY), (10, STOPPED, SILENT)),
        EXPECT,
        "failed",
        "the service stopped",
    ),
    "never ready": (
        seen((2, STARTING, SILENT), (30, STARTING, SILENT), (62, STARTING, SILENT)),
        EXPECT,
        "failed",
        "not ready within 1m: no READY from the process; /readyz: no answer on 127.0.0.1:9821 "
        "(Connection refused); /status: no answer",
    ),
    "READY but never authenticated": (
        seen((2, RUNNING, NOT_YET), (62, RUNNING, NOT_YET)),
        EXPECT,
        "failed",
        "not ready within 1m: /readyz: not ready: not authenticated to the coordinator "
        "(session connecting); no authenticated session of version 0.2.0",
    ),
    "the old version answers": (
        seen((2, RUNNING, WRONG)),
        EXPECT,
        "failed",
        "the agent answering runs version 0.1.0, not 0.2.0",
    ),
    "nothing observed yet": ((), EXPECT, "stopping", ""),
}


@pytest.mark.parametrize("case", CASES)
def test_the_watch_verdict(case: str) -> None:
    observations, expect, phase, why = CASES[case]
    verdict = judge(observations, expect)
    assert (verdict.phase, verdict.why) == (phase, why)


def test_the_verdict_says_when_and_which_process() -> None:
    verdict = judge(
        seen((1, DRAINING, SILENT), (2.5, STARTING, SILENT), (6, RUNNING, READY)), EXPECT
    )
    assert (verdict.started_at, verdict.ready_at, verdict.pid) == (2.5, 6, 200)
    failed = judge(seen((2, STARTING, SILENT), (3, EXITED, SILENT)), EXPECT)
    assert failed.pid == 200  # the process that exited, for its last log line
    assert failed.final and not judge(seen((2, STARTING, SILENT)), EXPECT).final


def test_systemctl_show_output_becomes_a_unit_state() -> None:
    shown = (
        "ActiveState=activating\nSubState=auto-restart\nMainPID=0\n"
        "InvocationID=0123abcd\nExecMainPID=4242\nExecMainStatus=3\nResult=exit-code\n"
    )
    assert unit_state(shown) == UnitState(
        "activating", "auto-restart", 0, "0123abcd", 4242, 3, "exit-code"
    )
    empty = unit_state("ActiveState=inactive\nSubState=dead\nMainPID=\nExecMainStatus=\n")
    assert (empty.main_pid, empty.exec_main_status, empty.invocation) == (0, None, "")


@pytest.mark.parametrize(
    ("file", "current", "target", "runs", "back"),
    [
        ((2, 2), (2, 2), (2, 2), True, True),  # the same schema
        (None, (2, 2), (3, 2), True, True),  # no outbox yet; the target only adds
        ((2, 2), (2, 2), (3, 2), True, True),  # it migrates, 2 still reads it
        ((2, 2), (2, 2), (3, 3), True, False),  # it migrates to what 2 cannot read: --yes
        ((2, None), (2, 2), (3, 3), True, False),
        ((3, 2), (3, 2), (2, 2), True, True),  # going down to 2: 3 said 2 may read it
        ((3, 3), (3, 3), (2, 2), False, False),  # 2 cannot open what 3 wrote
        ((3, None), (3, 3), (2, 2), False, False),
        ((4, 2), (4, 2), (3, 2), True, True),  # 3 opens 4's file and leaves it at 4
    ],
)
def test_the_outbox_schema_across_the_switch(
    file: tuple[int, int | None] | None,
    current: tuple[int, int],
    target: tuple[int, int],
    runs: bool,
    back: bool,
) -> None:
    plan = schema_plan(file, current, target)
    assert (plan.runs, plan.back) == (runs, back)
    if runs and not back:
        assert "going back to it would be impossible" in plan.line
    if runs and back:
        assert "going back stays possible" in plan.line


def report(*rows: dict[str, object]) -> str:
    return json.dumps({"ok": all(r["ok"] for r in rows), "results": list(rows), "not_tried": []})


@pytest.mark.parametrize(
    ("code", "out", "ok", "line"),
    [
        (
            0,
            report({"ok": True, "model": "m", "backend": "b"}),
            True,
            "1 completion(s) through local routes ok",
        ),
        (1, report(), True, "no local route to try"),
        (
            1,
            report(
                {"ok": True, "model": "m", "backend": "a"},
                {"ok": False, "model": None, "backend": "b", "error": "discovery: refused"},
            ),
            False,
            "1 of 2 failed; - via b: discovery: refused",
        ),
        (78, "", False, "exit 78"),
        (0, "not json", False, "no report (not JSON)"),
        (0, '{"ok": true}', False, "no report (not JSON)"),
    ],
)
def test_the_gate_reads_the_selftest_report(code: int, out: str, ok: bool, line: str) -> None:
    assert gate_selftest(code, out) == (ok, line)


DOWN_TOO = report(
    {"ok": True, "model": "m", "backend": "gpu"},
    {"ok": False, "model": None, "backend": "never-answers", "error": "discovery: timeout"},
)


@pytest.mark.parametrize(
    ("running", "ok", "line"),
    [
        (
            {"gpu": True, "never-answers": False},
            True,
            "1 completion(s) through local routes ok; not counted: never-answers (down for "
            "the running release too)",
        ),
        # Healthy for the running release: the new code must serve it too.
        (
            {"gpu": True, "never-answers": True},
            False,
            "1 of 2 failed; - via never-answers: discovery: timeout",
        ),
        # The running release did not answer: nothing is excused.
        (None, False, "1 of 2 failed; - via never-answers: discovery: timeout"),
        # A backend the running release does not have (new in the config): counted.
        ({"gpu": True}, False, "1 of 2 failed; - via never-answers: discovery: timeout"),
    ],
)
def test_a_backend_down_for_the_running_release_too_does_not_fail_the_gate(
    running: dict[str, bool] | None, ok: bool, line: str
) -> None:
    assert gate_selftest(1, DOWN_TOO, running) == (ok, line)


def test_what_changes_between_two_releases() -> None:
    log = [(f"{n:040x}", f"change {n}") for n in range(7, 0, -1)]
    assert changes(log[:2], 0) == (
        f"2 commit(s): {log[0][0][:12]} change 7; {log[1][0][:12]} change 6"
    )
    assert changes(log, 0).endswith("; and 2 more")
    assert changes([], 3) == "3 commit(s) of the running release left out (going back)"
    assert changes([], 0) == "no commit between them (the same tree)"


@pytest.mark.parametrize(
    ("text", "seconds"), [("2m", 120), ("90s", 90), ("1h", 3600), ("0.5m", 30), (" 45s ", 45)]
)
def test_watch_durations(text: str, seconds: float) -> None:
    assert parse_watch(text) == seconds


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2", "not a duration"),
        ("-5m", "not a duration"),
        ("0s", "longer than 0"),
        ("2h", "at most 1h"),
        ("1d", "not a duration"),
    ],
)
def test_bad_watch_durations_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_watch(text)
