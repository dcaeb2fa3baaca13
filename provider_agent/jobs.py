"""The job executor: owns every job's task, knows what is in flight, and answers each job once.

The daemon hands it inbound job frames (`submit`, `cancel`, `reject`); it owns the jobs task
group, so the daemon's shutdown can wait for it to go idle, cancel what is left, and flush.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from provider_agent.metrics import JobStats
from provider_agent.outbound import Outbound
from provider_agent.protocol import ErrorCode, Job, JobError, encode

log = logging.getLogger(__name__)


class Executor:
    """Jobs in flight and their terminal frames."""

    def __init__(self, outbound: Outbound, stats: JobStats) -> None:
        self.outbound = outbound
        self.stats = stats
        self._group: anyio.abc.TaskGroup | None = None
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self.stats.in_flight

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The jobs task group; lives until the daemon cancels it."""
        async with anyio.create_task_group() as self._group:
            task_status.started()
            await anyio.sleep_forever()

    def submit(self, job: Job) -> None:
        """A `job` frame: this build refuses (a refusal, not a serving failure) so the
        coordinator routes it elsewhere."""
        log.warning("job refused job_id=%s: this build does not run jobs", job.job_id)
        self._answer(job.job_id, "out_of_capacity", "this agent build does not run jobs yet")

    def reject(self, job_id: str, reason: str) -> None:
        """A `job` frame that could not be parsed but whose id could be read."""
        log.warning("malformed job job_id=%s: %s", job_id, reason)
        self._answer(job_id, "bad_request", reason)

    def cancel(self, job_id: str) -> None:
        log.debug("cancel for a job not in flight job_id=%s", job_id)

    async def wait_idle(self) -> None:
        """Returns once no job is in flight."""
        while self.stats.in_flight:
            idle = anyio.Event()
            self.stats.on_idle = idle.set
            await idle.wait()

    async def cancel_all(self) -> None:
        """Cancel every job still running and wait for their terminal frames."""

    async def flush(self) -> None:
        """Make sure every terminal frame is in the outbox."""

    def _answer(self, job_id: str, code: ErrorCode, message: str) -> None:
        self.outbound.terminal(
            job_id, encode(JobError(job_id=job_id, error_code=code, message=message))
        )
