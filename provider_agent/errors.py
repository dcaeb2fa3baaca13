"""Every exception of the agent, grouped by whose fault a failure is.

    AgentError                      base of everything the agent raises on purpose
    ├── ConfigError                 the operator's agent.toml (exit 78); names file and key path
    │   └── ConfigRuleError         a cross-field rule inside the schema (also a ValueError, so
    │                               pydantic reports it); knows its own key path
    ├── IdentityError               the identity key file is unreadable or does not match (exit 78)
    ├── StateDirError               the state dir is another agent's (locked), or holds something
    │                               other than a regular file where the agent reads one (exit 78)
    ├── OutboxError                 the on-disk outbox/ledger is corrupt, unwritable or missing;
    │   │                           the daemon exits 1 rather than lose a billing record
    │   └── NoLedger                no ledger where the config says the state is (`earnings`)
    ├── BackendError                a backend misbehaved: unreachable, bad status, garbage, too big
    │   ├── BackendAuthError        the backend refused our credentials (or none were found)
    │   └── StreamFailed            a job's upstream stream failed; carries its RouteFailure
    ├── UnencodableRequest          a client's request that cannot be written as JSON again
    ├── CoordinatorError            the coordinator broke the protocol or refused us
    │   ├── AuthFailed              the coordinator said `auth_failed`
    │   └── SessionFailure          the link's core decided this connection failed
    ├── LocalFault                  our own side failed while serving a session (disk, a bug)
    ├── InvalidTransition           the link's I/O fed its core an impossible event (a bug)
    └── CommandError                a command cannot go on; `str()` is the operator's one line
        ├── ServiceError            `service install/uninstall`
        ├── UpgradeError            `upgrade`: a step cannot go on (nothing switched yet)
        ├── ControlError            the pause control socket; NotRunning: nobody answers
        ├── StatusUnavailable       `status` could not read a running agent
        ├── OutputError             `init --output` names a place it will not write to
        └── StdoutError             writing stdout failed (EPIPE when the reader went away)

`Fault` and `FaultKind` are the data that says whose fault a session's end was; `RouteFailure`
what one route's failure means for a job. A backend's or the coordinator's failure is never the
agent's death: callers catch these at the edge of the operation they belong to (one probe, one
job, one session) and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a leaf module; only the annotation needs it (keeps `--help` light)
    from provider_agent.link.protocol import ErrorCode


class AgentError(Exception):
    """Base class: every failure the agent anticipates."""


class ConfigError(AgentError):
    """agent.toml is wrong; `str()` is the one line an operator sees."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {message}")


class ConfigRuleError(ConfigError, ValueError):
    """A cross-field rule's failure that knows its own key path (raised inside the schema's
    validators, where pydantic only passes ValueErrors through; the loader names the file)."""

    def __init__(self, key: str, message: str) -> None:
        ValueError.__init__(self, message)
        self.file = ""
        self.key = key
        self.message = message


class IdentityError(AgentError):
    """The identity key file cannot be used (unreadable, corrupt, or key halves disagree)."""


class StateDirError(AgentError):
    """The state dir cannot be this agent's: another agent holds its lock, or a file the agent
    reads there is not a regular file (a FIFO would hang the start); `str()` is the one line."""


class BackendError(AgentError):
    """A backend answered badly or not at all; the message never holds an API key."""


class BackendAuthError(BackendError):
    """The backend rejected our credentials, or no credentials could be found."""


class StreamFailed(BackendError):
    """A job's upstream request failed; `.failure` says with which protocol code, in a message
    fit to send, and whether the next route may be tried (only before the first byte)."""

    def __init__(self, failure: RouteFailure) -> None:
        self.failure = failure
        super().__init__(failure.message)


class CoordinatorError(AgentError):
    """The coordinator broke the protocol (wrong frame, bad handshake)."""


class AuthFailed(CoordinatorError):
    """The coordinator refused the handshake with `auth_failed`."""


class OutboxError(AgentError):
    """The outbox store is unusable; `str()` is the one line an operator sees, naming the file."""


@dataclass(frozen=True)
class RouteFailure:
    """Why one route could not serve a job: the protocol code, a printable message (no secrets,
    at most MESSAGE_LIMIT characters), and whether the next route should be tried."""

    code: ErrorCode
    message: str
    fallback: bool
    #: The backend answered 429: busy, not broken (route health leaves its streak alone).
    throttled: bool = False


class UnencodableRequest(AgentError, ValueError):
    """A job's request that was read but cannot be written again as JSON (the client's
    mistake: `bad_request`)."""


class FaultKind(Enum):
    NETWORK = "network"  # retry with backoff
    COORDINATOR = "coordinator"  # retry with backoff; logged as the coordinator's doing
    PLANNED = "planned"  # the coordinator restarts (close 1001/1012): redial soon, no escalation
    LOCAL = "local"  # ours: disk, identity file, a bug; logged loudly, never blamed on the network


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    detail: str


class LocalFault(AgentError):
    """Wraps a failure of our own side met while serving a session (e.g. storing the
    provider_id), so that `classify` never mistakes a full disk for a network problem."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {cause}")
        self.cause = cause


class SessionFailure(CoordinatorError):
    """The core decided this connection failed (wrong frame, auth_failed)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.detail)
        self.fault = fault


class CommandError(AgentError):
    """A command cannot go on; `str()` is the one line a person sees."""


class StdoutError(CommandError):
    """Writing stdout failed; `closed` when the reader went away (EPIPE)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or "input/output error")
        self.closed = isinstance(error, BrokenPipeError)


class InvalidTransition(AgentError):
    """The I/O layer fed an event the current state cannot have (a bug, not bad input)."""


class ServiceError(CommandError):
    """Install or uninstall cannot go on; `str()` is the one line a person sees (exit 1)."""


class UpgradeError(CommandError):
    """`upgrade` cannot go on; `str()` is the one line a person sees (exit 1)."""


class ControlError(CommandError):
    """The control socket could not be used; `str()` is the one line an operator sees."""


class NotRunning(ControlError):
    """No agent answers on the control socket."""


class NoLedger(OutboxError):
    """There is no ledger file where the config says the agent keeps its state."""


class StatusUnavailable(CommandError):
    """`status` could not read a running agent; `str()` is the one line the operator sees."""


class OutputError(CommandError):
    """`--output` names a place `init` will not write to; `str()` is the operator's line."""


class ExitCode(IntEnum):
    """How a command ends (shared/spec/cli.md, exit codes; 78 is sysexits' EX_CONFIG)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 78
    INTERRUPTED = 130
