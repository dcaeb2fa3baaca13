"""PURE: the decisions of `upgrade`, over plain data; no I/O, no clock.

- `judge`: from what was observed since the restart (the unit's state, the agent's HTTP
  endpoint), is the new process healthy, failed (and why, in one line), or still to be watched;
- `schema_plan`: can the target release open the outbox as it is, and can the release before it
  still open it once the target has run;
- `gate_selftest`: a `selftest --local --json` run as the gate's verdict;
- `changes`, `parse_watch`, `span`: what the operator reads and types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from provider_agent.clock import human_duration, parse_duration
from provider_agent.store.engine import readable_by

#: How long `--watch` may be.
MAX_WATCH_S: Final = 3600.0


# --- what is observed ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitState:
    """The service as its manager reports it (`systemctl show`)."""

    active: str  # ActiveState: active, reloading, inactive, failed, activating, deactivating
    sub: str  # SubState: running, start, stop-sigterm, auto-restart, dead, …
    main_pid: int  # MainPID (0: none)
    #: InvocationID: new at every start of the unit, automatic restarts included.
    invocation: str
    exec_main_pid: int = 0  # ExecMainPID: the last main process, also after it exited
    exec_main_status: int | None = None  # ExecMainStatus: its exit status
    result: str = "success"  # Result

    @property
    def ready(self) -> bool:
        """Type=notify: running means READY=1 arrived."""
        return self.active in ("active", "reloading") and self.sub in ("running", "reload")

    @property
    def up(self) -> bool:
        """Started or starting (a restart would stop it first)."""
        return self.active in ("active", "reloading", "activating")


@dataclass(frozen=True)
class HttpView:
    """The agent's endpoint as seen from outside: `/readyz` and `/status`."""

    readyz: int | None = None  # the HTTP status; None: no answer
    reason: str = ""  # /readyz's body, or why nothing answered
    version: str | None = None  # /status agent_version
    authenticated: bool = False  # /status session.authenticated


@dataclass(frozen=True)
class Observation:
    at: float  # seconds since the restart was asked for
    unit: UnitState
    http: HttpView


@dataclass(frozen=True)
class Expect:
    #: The unit's invocation when the restart was asked for: until another one starts, what is
    #: seen is the old process stopping (draining) or the unit between stop and start.
    old_invocation: str
    version: str  # what the new process must say it runs
    watch_s: float  # how long after its start it must stay up (and be ready within)
    stop_limit_s: float  # how long the old process may take to drain, and the new one to start
    #: Watch the whole window (an upgrade); False: done once ready (coming back after a failure).
    hold: bool = True


Phase = Literal["stopping", "starting", "ready", "healthy", "failed"]


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    why: str = ""
    started_at: float | None = None  # when the new invocation was first seen
    pid: int = 0  # the new process (its last main pid, also once it has exited)
    ready_at: float | None = None  # when READY, /readyz 200 and the session were all seen

    @property
    def final(self) -> bool:
        return self.phase in ("healthy", "failed")


def judge(observations: Sequence[Observation], expect: Expect) -> Verdict:
    """The verdict after `observations` (oldest first). The new invocation must report READY,
    answer `/readyz` 200 and hold an authenticated session with the expected version within
    `watch_s` of its start, and (`hold`) not be restarted, replaced or stopped in that window."""
    started_at: float | None = None
    invocation = ""
    pid = 0
    seen_ready = seen_readyz = seen_session = False
    ready_at: float | None = None
    for obs in observations:
        unit, http = obs.unit, obs.http
        if started_at is None:
            if unit.invocation in ("", expect.old_invocation):
                if obs.at > expect.stop_limit_s:
                    return Verdict(
                        "failed",
                        f"no new process within {human_duration(expect.stop_limit_s)} of the "
                        f"restart (the unit is {unit.active}/{unit.sub})",
                    )
                continue
            started_at, invocation = obs.at, unit.invocation
        pid = unit.main_pid or unit.exec_main_pid or pid
        failure = _failure(unit, http, expect, invocation)
        if failure is not None:
            return Verdict("failed", failure, started_at, pid)
        seen_ready = seen_ready or unit.ready
        seen_readyz = seen_readyz or http.readyz == 200
        seen_session = seen_session or (http.authenticated and http.version == expect.version)
        if ready_at is None and seen_ready and seen_readyz and seen_session:
            ready_at = obs.at
    if started_at is None:
        return Verdict("stopping")
    last = observations[-1]
    if ready_at is not None and not expect.hold:
        return Verdict("healthy", "", started_at, pid, ready_at)
    if last.at >= started_at + expect.watch_s:
        if ready_at is None:
            missing = _missing(seen_ready, seen_readyz, seen_session, last.http, expect.version)
            return Verdict(
                "failed",
                f"not ready within {human_duration(expect.watch_s)}: {missing}",
                started_at,
                pid,
            )
        return Verdict("healthy", "", started_at, pid, ready_at)
    return Verdict("starting" if ready_at is None else "ready", "", started_at, pid, ready_at)


def _failure(unit: UnitState, http: HttpView, expect: Expect, invocation: str) -> str | None:
    status = f" (exit status {unit.exec_main_status})" if unit.exec_main_status else ""
    if unit.invocation != invocation:
        return "the new process was restarted by systemd"
    if unit.sub == "auto-restart":
        return f"the new process exited{status}; systemd is restarting it"
    if unit.active == "failed":
        return f"the service failed ({unit.result}){status}"
    if unit.active in ("inactive", "deactivating"):
        return f"the service stopped{status}"
    if http.version is not None and http.version != expect.version:
        return f"the agent answering runs version {http.version}, not {expect.version}"
    return None


def _missing(ready: bool, readyz: bool, session: bool, http: HttpView, version: str) -> str:
    parts = []
    if not ready:
        parts.append("no READY from the process")
    if not readyz:
        parts.append(f"/readyz: {http.reason or 'no answer'}")
    if not session:
        if http.version is None:
            parts.append("/status: no answer")
        else:
            parts.append(f"no authenticated session of version {version}")
    return "; ".join(parts)


# --- the outbox schema across the switch ---------------------------------------------------------


@dataclass(frozen=True)
class SchemaPlan:
    #: The target can open the outbox as it is now.
    runs: bool
    #: The release before it can still open the outbox once the target has run.
    back: bool
    line: str


def schema_plan(
    file: tuple[int, int | None] | None,
    current: tuple[int, int],
    target: tuple[int, int],
) -> SchemaPlan:
    """`file`: the outbox's (schema version, readable_from), None before the first start;
    `current`, `target`: each release's (schema_version, readable_from)."""
    now_version, now_from = file if file is not None else (0, None)
    if not readable_by(now_version, now_from, target[0]):
        need = now_from if now_from is not None else now_version
        return SchemaPlan(
            False,
            False,
            f"the outbox has schema {now_version}, which needs schema {need} or later; the "
            f"target knows {target[0]}",
        )
    if target[0] > now_version:
        after: tuple[int, int | None] = target
    else:
        after = (now_version, now_from)
    back = readable_by(after[0], after[1], current[0])
    if back:
        oldest = after[1] if after[1] is not None else after[0]
        line = f"outbox schema {after[0]} (readable from {oldest}): going back stays possible"
    else:
        line = (
            f"the target migrates the outbox to schema {after[0]}, which the running release "
            f"(schema {current[0]}) cannot open: going back to it would be impossible"
        )
    return SchemaPlan(True, back, line)


# --- the gate's selftest -------------------------------------------------------------------------


def gate_selftest(
    returncode: int, stdout: str, running: Mapping[str, bool] | None = None
) -> tuple[bool, str]:
    """`selftest --local --json`: ok when every row is ok (none tried: nothing local to try),
    except that a backend the running release finds unhealthy too (`running`: its `/status`
    backends; None when it did not answer) may fail without failing the gate — the new code
    must serve what the running one serves, not mend what is down. The line says what was
    tried, what failed, and what was not counted."""
    if returncode not in (0, 1):
        return False, f"exit {returncode}"
    try:
        report = json.loads(stdout)
        rows = [r for r in report["results"] if isinstance(r, dict)]
    except (ValueError, KeyError, TypeError):
        return False, "no report (not JSON)"
    down = {name for name, healthy in (running or {}).items() if not healthy}
    failed = [r for r in rows if not r.get("ok")]
    counted = [r for r in failed if r.get("backend") not in down]
    excused = sorted({str(r.get("backend")) for r in failed if r.get("backend") in down})
    note = (
        f"; not counted: {', '.join(excused)} (down for the running release too)" if excused else ""
    )
    if counted:
        first = counted[0]
        where = f"{first.get('model') or '-'} via {first.get('backend')}"
        return False, f"{len(counted)} of {len(rows)} failed; {where}: {first.get('error')}{note}"
    tried = len(rows) - len(failed)
    if not tried:
        return True, f"no local route to try{note}"
    return True, f"{tried} completion(s) through local routes ok{note}"


# --- what the operator reads and types -----------------------------------------------------------


def changes(log: Sequence[tuple[str, str]], back: int, shown: int = 5) -> str:
    """The commits between the running release and the target: `log` (newest first) forward,
    `back` commits of the running one the target does not have."""
    parts = []
    if log:
        subjects = "; ".join(f"{c[:12]} {s}" for c, s in log[:shown])
        more = f"; and {len(log) - shown} more" if len(log) > shown else ""
        parts.append(f"{len(log)} commit(s): {subjects}{more}")
    if back:
        parts.append(f"{back} commit(s) of the running release left out (going back)")
    return "; ".join(parts) or "no commit between them (the same tree)"


def parse_watch(text: str) -> float:
    """`--watch 90s`, `2m`, `1h` → seconds (no sign, no days); ValueError with the operator's
    line."""
    return parse_duration(
        text, "--watch", at_most_s=MAX_WATCH_S, at_most="1h", units="smh", signed=False
    )
