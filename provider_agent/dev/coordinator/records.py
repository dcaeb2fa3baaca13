"""What the reference coordinator saw, as plain data: for tests to assert on and for GET /agents.

No I/O here. Every history is bounded by `HISTORY`, so a long run stays small.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from provider_agent.link.protocol import Capabilities, Heartbeat, JobDone, JobError, ModelOffer

#: Bound of every history kept (timestamps, violations, attempts, jobs).
HISTORY: Final = 10_000
#: Excerpt of an offending frame kept in a violation.
EXCERPT_CHARS: Final = 300

Outcome = Literal["open", "refused", "flapped", "auth_failed", "authenticated", "not_websocket"]
ClosedBy = Literal["agent", "coordinator", "connection"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def excerpt(text: str | bytes) -> str:
    """A short, printable stand-in for a frame (binary frames by their size only)."""
    if isinstance(text, bytes):
        return f"<{len(text)} bytes binary>"
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


@dataclass(frozen=True)
class Violation:
    """One thing an agent sent that breaks the contract."""

    reason: str
    provider_id: str | None
    frame: str
    at: datetime = field(default_factory=utcnow)

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "frame": self.frame, "at": iso(self.at)}


@dataclass
class ConnectionAttempt:
    """One connection attempt on /provider/connect; `at` is `time.monotonic()` (backoff checks)."""

    index: int
    at: float
    outcome: Outcome = "open"
    provider_id: str | None = None
    #: Code of the close frame the agent sent (1001 on a graceful stop); None if none came.
    close_code: int | None = None
    close_reason: str | None = None
    #: Code of the close frame this coordinator sent (drop, flap, auth_failed, shutdown).
    sent_close_code: int | None = None
    closed_by: ClosedBy | None = None
    ended_at: float | None = None


@dataclass
class AgentRecord:
    """Everything seen from one provider (one public key), across its connections."""

    provider_id: str
    pubkey: str
    agent_version: str = ""
    connected: bool = False
    connections: int = 0
    #: The first enrollment code the agent presented, if any.
    enrollment_code: str | None = None
    #: The code presented on each authenticated connection (None where none was sent).
    enrollment_codes: deque[str | None] = field(default_factory=lambda: deque(maxlen=HISTORY))
    capabilities: Capabilities | None = None
    capabilities_count: int = 0
    capabilities_times: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last_heartbeat: Heartbeat | None = None
    last_heartbeat_at: datetime | None = None
    heartbeat_count: int = 0
    heartbeat_times: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    unknown_frames: int = 0
    violations: deque[Violation] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def offers(self) -> dict[str, ModelOffer]:
        """The latest advertised models by id (empty before the first capabilities)."""
        if self.capabilities is None:
            return {}
        return {offer.model_id: offer for offer in self.capabilities.models}

    def to_json(self) -> dict[str, Any]:
        caps, beat = self.capabilities, self.last_heartbeat
        return {
            "provider_id": self.provider_id,
            "pubkey": self.pubkey,
            "connected": self.connected,
            "agent_version": self.agent_version,
            "enrollment_code": self.enrollment_code,
            "capabilities": caps.model_dump(mode="json") if caps is not None else None,
            "capabilities_count": self.capabilities_count,
            "last_heartbeat": beat.model_dump(mode="json") if beat is not None else None,
            "last_heartbeat_at": iso(self.last_heartbeat_at),
            "heartbeat_count": self.heartbeat_count,
            "connections": self.connections,
            "unknown_frames": self.unknown_frames,
            "violations": [v.to_json() for v in self.violations],
        }


@dataclass
class JobRecord:
    """One job: dispatched here (over HTTP or by `send_job`), or known only from a terminal frame
    (e.g. re-sent after a restart of this coordinator: `dispatched_at` is then None)."""

    job_id: str
    provider_id: str
    model_id: str | None = None
    format: str | None = None
    dispatched_at: float | None = None
    #: `job` frames sent for this id (above 1: the same job_id sent again).
    sent: int = 0
    #: The connection attempt the latest `job` frame went out on.
    sent_on: int | None = None
    bytes_relayed: int = 0
    chunk_frames: int = 0
    #: `time.monotonic()` when the first `job_chunk` arrived (benchmarks: added time to first
    #: token is measured here, at the coordinator).
    first_chunk_at: float | None = None
    #: A chunk came on another connection than `sent_on` (bytes may have been lost in between).
    chunks_elsewhere: bool = False
    #: The relayed bytes, kept for jobs no HTTP client waits on (`send_job(keep_data=True)`).
    data: bytearray | None = None
    #: The first terminal frame; repeats are counted, not kept (one billing record per job).
    terminal: JobDone | JobError | None = None
    #: Every terminal frame received for this job_id, repeats included.
    terminal_count: int = 0
    finished_at: float | None = None

    @property
    def resends(self) -> int:
        """Terminal frames received beyond the first (the agent's outbox re-sending)."""
        return max(0, self.terminal_count - 1)

    def to_json(self) -> dict[str, Any]:
        term = self.terminal
        return {
            "job_id": self.job_id,
            "provider_id": self.provider_id,
            "model_id": self.model_id,
            "format": self.format,
            "sent": self.sent,
            "bytes_relayed": self.bytes_relayed,
            "chunk_frames": self.chunk_frames,
            "dispatched_at": self.dispatched_at,
            "first_chunk_at": self.first_chunk_at,
            "terminal": term.model_dump(mode="json") if term is not None else None,
            "terminal_count": self.terminal_count,
        }
