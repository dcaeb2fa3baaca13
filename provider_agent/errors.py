"""The agent's exceptions, grouped by whose fault a failure is.

    AgentError                      base of everything the agent raises on purpose
    ├── ConfigError                 the operator's agent.toml (exit 78); names file and key path
    ├── IdentityError               the identity key file is unreadable or does not match (exit 78)
    ├── StateDirError               the state dir is another agent's (locked), or holds something
                                    other than a regular file where the agent reads one (exit 78)
    ├── BackendError                a backend misbehaved: unreachable, bad status, garbage, too big
    │   ├── BackendAuthError        the backend refused our credentials (or none were found)
    │   └── StreamFailed            a job's upstream stream failed; carries its RouteFailure
    ├── CoordinatorError            the coordinator broke the protocol or refused us
    │   └── AuthFailed              the coordinator said `auth_failed`
    └── OutboxError                 the on-disk outbox/ledger is corrupt, unwritable or missing;
                                    the daemon exits 1 rather than lose a billing record

A backend's or the coordinator's failure is never the agent's death: callers catch these at the
edge of the operation they belong to (one probe, one job, one session) and carry on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from provider_agent.jobs.upstream import RouteFailure


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
