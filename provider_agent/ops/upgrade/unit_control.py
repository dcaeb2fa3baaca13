"""The service as `upgrade` drives and watches it: systemd (`systemctl show`, `restart
--no-block`, the journal) and the agent's own HTTP endpoint (`/readyz`, `/status`).

`ServiceManager` is the seam: `Systemd` is the real one; a test may run the releases' agent under
another manager that keeps the same contract (states as `systemctl show` reports them, a restart
that stops the old process with SIGTERM and starts what `current` points at).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from provider_agent.errors import UpgradeError
from provider_agent.observe.http_api import asked_host
from provider_agent.ops.service import SERVICE, CommandResult, run_command
from provider_agent.ops.upgrade.build import last_line
from provider_agent.ops.upgrade.rules import HttpView, UnitState
from provider_agent.safe_text import printable

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
#: What `upgrade` writes in the journal is shown by `journalctl -u provider-agent`: journalctl
#: includes messages from root naming the unit in OBJECT_SYSTEMD_UNIT.
IDENTIFIER: Final = "provider-agent-upgrade"
PROPERTIES: Final = (
    "ActiveState",
    "SubState",
    "MainPID",
    "InvocationID",
    "ExecMainPID",
    "ExecMainStatus",
    "Result",
)
HTTP_TIMEOUT_S: Final = 2.0
_MAX_READYZ: Final = 64 * 1024
_MAX_STATUS: Final = 8 * 1024 * 1024


class ServiceManager(Protocol):
    """What `upgrade` needs of the service's manager."""

    @property
    def name(self) -> str: ...

    def state(self) -> UnitState:
        """The unit now; UpgradeError when the manager cannot say."""
        ...

    def restart(self) -> None:
        """Ask for a restart (the old process drains on SIGTERM) and return without waiting."""
        ...

    def note(self, message: str) -> None:
        """A line in the service's journal (best effort)."""
        ...

    def last_words(self, pid: int) -> str | None:
        """The last line process `pid` of the service logged, if any."""
        ...


def unit_state(shown: str) -> UnitState:
    """`systemctl show --property=…` output → UnitState. Pure."""
    values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    def number(key: str) -> int:
        try:
            return int(values.get(key, "0") or 0)
        except ValueError:
            return 0

    status = values.get("ExecMainStatus", "")
    return UnitState(
        active=values.get("ActiveState", "unknown"),
        sub=values.get("SubState", "unknown"),
        main_pid=number("MainPID"),
        invocation=values.get("InvocationID", ""),
        exec_main_pid=number("ExecMainPID"),
        exec_main_status=int(status) if status.isdigit() else None,
        result=values.get("Result", "success") or "success",
    )


@dataclass
class Systemd:
    """The unit under the system's systemd."""

    name: str = SERVICE
    run: Callable[[Sequence[str]], CommandResult] = run_command
    journal_socket: str = JOURNAL_SOCKET

    @property
    def unit(self) -> str:
        return f"{self.name}.service"

    def state(self) -> UnitState:
        result = self.run(
            ["systemctl", "show", f"--property={','.join(PROPERTIES)}", "--", self.unit]
        )
        if result.returncode != 0:
            raise UpgradeError(f"systemctl show {self.unit} failed: {last_line(result.output)}")
        return unit_state(result.output)

    def restart(self) -> None:
        result = self.run(["systemctl", "restart", "--no-block", "--", self.unit])
        if result.returncode != 0:
            raise UpgradeError(f"systemctl restart {self.unit} failed: {last_line(result.output)}")

    def note(self, message: str) -> None:
        journal_send(
            self.journal_socket,
            {
                "MESSAGE": printable(message, 2000),
                "PRIORITY": "5",
                "SYSLOG_IDENTIFIER": IDENTIFIER,
                "OBJECT_SYSTEMD_UNIT": self.unit,
            },
        )

    def last_words(self, pid: int) -> str | None:
        if pid <= 0:
            return None
        result = self.run(
            [
                "journalctl",
                "--no-pager",
                "--quiet",
                "--output=cat",
                "--lines=1",
                f"_SYSTEMD_UNIT={self.unit}",
                f"_PID={pid}",
            ]
        )
        if result.returncode != 0 or not result.output.strip():
            return None
        return last_line(result.output)


def journal_send(path: str, fields: dict[str, str]) -> bool:
    """One entry to journald's native socket (one datagram of KEY=value lines); False when
    there is no journal to write to."""
    payload = "".join(f"{key}={value}\n" for key, value in fields.items() if "\n" not in value)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
            journal.sendto(payload.encode("utf-8", "replace"), path)
    except OSError:
        return False
    return True


# --- the agent's HTTP endpoint -------------------------------------------------------------------


def probe_http(listen: tuple[str, int], timeout_s: float = HTTP_TIMEOUT_S) -> HttpView:
    """`/readyz` and `/status` of whatever answers at the agent's address (a wildcard bind is
    asked on loopback); a missing answer is a view with `readyz` None and the reason. `/status`
    is read as plain JSON for the few fields the watch needs, not through this release's
    `AgentStatus` (`http_api.fetch_status`): the process answering may be another release."""
    host, port = listen
    host = asked_host(host)
    try:
        code, body = _get(host, port, "/readyz", _MAX_READYZ, timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        return HttpView(None, f"no answer on {host}:{port} ({printable(why, 100)})")
    reason = printable(body.decode("utf-8", "replace").strip(), 300)
    try:
        status_code, status_body = _get(host, port, "/status", _MAX_STATUS, timeout_s)
        status = json.loads(status_body) if status_code == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        status = {}
    if not isinstance(status, dict):
        status = {}
    version = status.get("agent_version")
    session = status.get("session")
    authenticated = isinstance(session, dict) and session.get("authenticated") is True
    return HttpView(
        code, reason, printable(version, 100) if isinstance(version, str) else None, authenticated
    )


def backend_health(
    listen: tuple[str, int], timeout_s: float = HTTP_TIMEOUT_S
) -> dict[str, bool] | None:
    """The running agent's backends and whether its last pass found each healthy (`/status`);
    None when it does not answer."""
    host, port = listen
    host = asked_host(host)
    try:
        code, body = _get(host, port, "/status", _MAX_STATUS, timeout_s)
        status = json.loads(body) if code == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    backends = status.get("backends") if isinstance(status, dict) else None
    if not isinstance(backends, list):
        return None
    return {
        str(b["name"]): b.get("healthy") is True
        for b in backends
        if isinstance(b, dict) and "name" in b
    }


def _get(host: str, port: int, path: str, limit: int, timeout_s: float) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path, headers={"User-Agent": IDENTIFIER})
        response = connection.getresponse()
        return response.status, response.read(limit)
    finally:
        connection.close()
