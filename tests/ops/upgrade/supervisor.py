"""A service manager in the test process for `upgrade`'s end-to-end tests where systemd is not
PID 1: it keeps the parts of the unit's contract that `upgrade` relies on, for real processes.

- `Type=notify`, `NotifyAccess=main`: each start gets its own `$NOTIFY_SOCKET` (a datagram
  socket read here); the unit is `activating/start` until the process sends `READY=1`, then
  `active/running`; `STOPPING=1` makes it `deactivating`.
- Every start gets a new InvocationID; MainPID is the process while it runs, ExecMainPID and
  ExecMainStatus stay after it exits.
- `restart` (what `systemctl restart --no-block` does): SIGTERM to the main process only
  (`KillMode=mixed`), wait for its exit however long its drain takes, then start the command
  again — which runs whatever `current` points at by then.
- `Restart=always`, `RestartSec=`, `RestartPreventExitStatus=78`: an exit nobody asked for
  leaves the unit `activating/auto-restart` for `restart_s`, then starts it again; exit 78 leaves
  it `failed`.

The tests that need the rest of systemd (the real unit, its sandbox, journald, `systemctl`) run
in a systemd container (tests/deploy). Everything the processes log is kept per pid
(`last_words`); journal notes are kept in `notes`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from provider_agent.ops.upgrade.rules import UnitState

_T = TypeVar("_T")


@dataclass
class _Run:
    invocation: str
    process: subprocess.Popen[str]
    notify: socket.socket
    stop_asked: bool = False
    exited: bool = False


@dataclass
class Supervisor:
    """One service: `argv` started with `env`, kept as described above."""

    argv: Sequence[str]
    env: Mapping[str, str]
    restart_s: float = 0.5
    name: str = "provider-agent"
    notes: list[str] = field(default_factory=list)
    #: Every process started: (invocation, pid).
    starts: list[tuple[str, int]] = field(default_factory=list)
    #: The moment (time.monotonic) each restart was asked for.
    restarts_asked: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._run: _Run | None = None
        self._active, self._sub, self._invocation = "inactive", "dead", ""
        self._exec_pid = 0
        self._exec_status: int | None = None
        self._result = "success"
        self._restart_after_stop = False
        self._words: dict[int, list[str]] = {}
        self._sockets = Path(tempfile.mkdtemp(prefix="pa-notify-", dir="/tmp"))
        self._threads: list[threading.Thread] = []

    # --- the ServiceManager contract ------------------------------------------------------------

    def state(self) -> UnitState:
        with self._changed:
            run = self._run
            return UnitState(
                active=self._active,
                sub=self._sub,
                main_pid=run.process.pid if run is not None and not run.exited else 0,
                invocation=self._invocation,
                exec_main_pid=self._exec_pid,
                exec_main_status=self._exec_status,
                result=self._result,
            )

    def restart(self) -> None:
        with self._changed:
            self.restarts_asked.append(time.monotonic())
            run = self._run
            if run is None or run.exited:
                self._spawn()
                return
            self._restart_after_stop = True
            self._stop(run)

    def note(self, message: str) -> None:
        with self._changed:
            self.notes.append(message)
            self._changed.notify_all()

    def last_words(self, pid: int) -> str | None:
        with self._changed:
            lines = self._words.get(pid, [])
            return lines[-1] if lines else None

    # --- for the tests ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._changed:
            self._spawn()

    def close(self, timeout_s: float = 60) -> None:
        """Stop the service (draining) and wait for its process; nothing is started again."""
        with self._changed:
            self._restart_after_stop = False
            run = self._run
            if run is not None and not run.exited:
                self._stop(run)
        self.wait(lambda: self._active in ("inactive", "failed") or None, timeout_s, "stopped")
        for thread in self._threads:
            thread.join(timeout_s)
        shutil.rmtree(self._sockets, ignore_errors=True)

    def wait(self, predicate: Callable[[], _T | None], timeout_s: float, what: str) -> _T:
        """Until `predicate()` (called under the lock, after every change) is truthy."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not within {timeout_s:g}s: {what} ({self.state()})")
                self._changed.wait(left)

    def logged(self, pid: int) -> list[str]:
        with self._changed:
            return list(self._words.get(pid, []))

    # --- inside (the lock held) -------------------------------------------------------------------

    def _spawn(self) -> None:
        invocation = uuid.uuid4().hex
        path = self._sockets / f"{invocation[:8]}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(path))
        notify.settimeout(0.2)
        process = subprocess.Popen(
            list(self.argv),
            env={**self.env, "NOTIFY_SOCKET": str(path)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        run = _Run(invocation, process, notify)
        self._run = run
        self._invocation = invocation
        self._active, self._sub = "activating", "start"
        self._exec_pid, self._exec_status, self._result = process.pid, None, "success"
        self._words[process.pid] = []
        self.starts.append((invocation, process.pid))
        for target in (self._read_notify, self._read_log_and_wait):
            thread = threading.Thread(target=target, args=(run,), daemon=True)
            thread.start()
            self._threads.append(thread)
        self._changed.notify_all()

    def _stop(self, run: _Run) -> None:
        run.stop_asked = True
        self._active, self._sub = "deactivating", "stop-sigterm"
        run.process.send_signal(signal.SIGTERM)
        self._changed.notify_all()

    def _read_notify(self, run: _Run) -> None:
        while True:
            with self._changed:
                if run.exited:
                    run.notify.close()
                    return
            try:
                message = run.notify.recv(4096).decode("utf-8", "replace")
            except TimeoutError:
                continue
            with self._changed:
                if self._run is not run or run.exited:
                    continue
                fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
                if fields.get("READY") == "1" and not run.stop_asked:
                    self._active, self._sub = "active", "running"
                if fields.get("STOPPING") == "1":
                    self._active, self._sub = "deactivating", "stop-sigterm"
                self._changed.notify_all()

    def _read_log_and_wait(self, run: _Run) -> None:
        assert run.process.stderr is not None
        for line in run.process.stderr:
            with self._changed:
                self._words[run.process.pid].append(line.rstrip("\n"))
        code = run.process.wait()
        with self._changed:
            run.exited = True
            self._exec_status = code if code >= 0 else -code
            if self._run is not run:
                return
            if run.stop_asked:
                self._active, self._sub = "inactive", "dead"
                if self._restart_after_stop:
                    self._restart_after_stop = False
                    self._spawn()
            elif code == 78:
                self._active, self._sub, self._result = "failed", "failed", "exit-code"
            else:
                self._active, self._sub, self._result = "activating", "auto-restart", "exit-code"
                timer = threading.Timer(self.restart_s, self._auto_restart, args=(run,))
                timer.daemon = True
                timer.start()
            self._changed.notify_all()

    def _auto_restart(self, run: _Run) -> None:
        with self._changed:
            if self._run is run and self._sub == "auto-restart":
                self._spawn()
