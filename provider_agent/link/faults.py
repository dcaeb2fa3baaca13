"""Whose fault the end of one connection was, from the exception or close code that ended it
(the I/O side of the link: it knows websockets' and the OS's exceptions; `state.py` does not)."""

from __future__ import annotations

import errno
import socket

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from provider_agent.errors import (
    AgentError,
    BackendError,
    CoordinatorError,
    Fault,
    FaultKind,
    LocalFault,
    SessionFailure,
)

#: errno values that mean the local machine, not the network, is in trouble.
_LOCAL_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EMFILE}
)


PLANNED_CLOSE_CODES = frozenset({1001, 1012})


def classify(exc: BaseException) -> Fault:
    """Whose fault one failed connection is, from the exception that ended it."""
    if isinstance(exc, SessionFailure):
        return exc.fault
    if isinstance(exc, LocalFault):
        return Fault(FaultKind.LOCAL, str(exc))
    if isinstance(exc, ConnectionClosed):
        return classify_close(exc.rcvd.code if exc.rcvd is not None else None)
    if isinstance(exc, CoordinatorError | InvalidHandshake):
        return Fault(FaultKind.COORDINATOR, _text(exc))
    if isinstance(exc, InvalidURI):
        return Fault(FaultKind.LOCAL, f"coordinator url is not usable: {exc}")
    if isinstance(exc, TimeoutError):
        return Fault(FaultKind.NETWORK, "timed out")
    if isinstance(exc, socket.gaierror):
        return Fault(FaultKind.NETWORK, f"cannot resolve the coordinator's host ({exc.strerror})")
    if isinstance(exc, ConnectionError | BackendError):
        return Fault(FaultKind.NETWORK, f"cannot connect ({_text(exc)})")
    if isinstance(exc, OSError):
        if exc.errno in _LOCAL_ERRNOS or isinstance(
            exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | FileExistsError
        ):
            return Fault(FaultKind.LOCAL, f"local I/O failed ({_text(exc)})")
        return Fault(FaultKind.NETWORK, f"cannot connect ({_text(exc)})")
    if isinstance(exc, AgentError):
        return Fault(FaultKind.LOCAL, _text(exc))
    return Fault(FaultKind.LOCAL, f"internal error ({type(exc).__name__}: {exc})")


def classify_close(code: int | None) -> Fault:
    """A connection that ended with this close code from the coordinator (None: no close frame)."""
    if code in PLANNED_CLOSE_CODES:
        return Fault(FaultKind.PLANNED, f"coordinator restarting (close code {code})")
    if code is None:
        return Fault(FaultKind.NETWORK, "connection lost (no close frame)")
    return Fault(FaultKind.COORDINATOR, f"coordinator closed the connection (code {code})")


def _text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
