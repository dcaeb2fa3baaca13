"""sd_notify: tell systemd how the agent is doing (the `Type=notify` unit in systemd/).

The protocol is one datagram per message on the unix socket named by `$NOTIFY_SOCKET` (a path, or
`@name` for an abstract socket), each message `KEY=value` lines. Without the variable every call
is a no-op, so the daemon calls these unconditionally. A send never blocks and never raises into
the caller: systemd being busy or gone must not take the agent down; the first failure is logged
at debug level, later ones are not (a dead socket would otherwise log every watchdog tick).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

import anyio

from provider_agent.link.state import State

log = logging.getLogger("provider_agent.observe.systemd")

#: systemd reads a notification into a buffer of this size; a longer STATUS would be cut.
_STATUS_MAX_CHARS: Final = 1000
#: More than a day of extra time is a bug in the caller, not a drain.
_EXTEND_MAX_S: Final = 86_400
#: A newline inside STATUS= would start a new assignment; control characters go too.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")


class Notifier:
    """Sends READY, STATUS, RELOADING, STOPPING, EXTEND_TIMEOUT_USEC and WATCHDOG to systemd."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        """`address`: the socket as `socket.sendto` takes it (None: notifications are off).
        `watchdog_usec`: systemd's watchdog period for this process, if it has one."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through the environment (a no-op one when it did not)."""
        env = os.environ if environ is None else environ
        return cls(_address(env.get("NOTIFY_SOCKET", "")), _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (False outside systemd)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog()`: half of systemd's period, or None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> None:
        """Start-up (or a reload) is complete: config, identity and the first discovery pass."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """A one-line status shown by `systemctl status` (session state, models advertised)."""
        clean = _CONTROL.sub(" ", text).strip()[:_STATUS_MAX_CHARS]
        self._send(f"STATUS={clean}")

    def reloading(self) -> None:
        """A reload (SIGHUP) started; `ready()` ends it. MONOTONIC_USEC lets systemd tell this
        reload from an earlier one (it reads CLOCK_MONOTONIC, as we do)."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        """Draining started: systemd shows the unit as deactivating."""
        self._send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before systemd's start/stop timeout fires (sent while draining,
        so a drain_timeout_s above the unit's TimeoutStopSec is honoured)."""
        if not math.isfinite(seconds):
            log.debug("EXTEND_TIMEOUT_USEC not sent: %r seconds", seconds)
            return
        usec = round(min(max(seconds, 0.000001), _EXTEND_MAX_S) * 1_000_000)
        self._send(f"EXTEND_TIMEOUT_USEC={usec}")

    def watchdog(self) -> None:
        """The process is alive and making progress; systemd restarts it when these stop."""
        self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        data = message.encode("utf-8", errors="replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(data, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("systemd notification not delivered (%s); not logging further ones", exc)


def _address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an address: an absolute path, or `@name` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", errors="surrogateescape")
    if value:
        log.debug("NOTIFY_SOCKET %r is not a unix socket address; not notifying systemd", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process: WATCHDOG_PID unset or ours."""
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


async def keep_alive(
    notifier: Notifier,
    interval_s: float,
    session_state: Callable[[], State],
    notify_status: Callable[[], None],
) -> None:
    """WATCHDOG=1 only while the loop turns and the session makes progress (authenticated or
    waiting out a backoff); a stuck loop or a wedged handshake lets systemd restart us."""
    stuck_since: float | None = None
    while True:
        await anyio.sleep(interval_s)
        state = session_state()
        now = anyio.current_time()
        if state in (State.AUTHENTICATED, State.IDLE, State.STOPPED):
            stuck_since = None
        elif stuck_since is None:
            stuck_since = now
        if stuck_since is None or now - stuck_since < 2 * interval_s:
            notifier.watchdog()
        notify_status()
