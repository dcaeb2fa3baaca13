"""A store that cannot take terminal frames (protocol.md §8): a real full filesystem (a small
tmpfs, as root) under a running agent, and a database locked by another process. Nothing is sent
that was not stored, nothing stored is dropped, new jobs are refused meanwhile, `/readyz` says
why, and once the store works the kept frames go out."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from provider_agent.dev.coordinator import DevCoordinator
from provider_agent.link.lanes import Outbound
from provider_agent.link.protocol import Job, JobDone, JobError, decode
from provider_agent.ops.selftest import MemoryStore
from provider_agent.store.engine import FILE_NAME
from provider_agent.store.outbox import Outbox
from tests.agent_harness import fake_vllm, free_port, running_agent, write_config
from tests.jobs.test_executor import REQUEST, OneBackend, executor_of, finished, one_stream, serving


@contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a real full filesystem) needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; the file, to delete when space is due."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        block = b"\0" * 65536
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                out.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


async def readyz(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status, await r.text()


async def test_a_full_disk_keeps_the_frame_refuses_new_jobs_and_sends_once_space_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with small_tmpfs(tmp_path / "state"):
        async with (
            DevCoordinator(host="127.0.0.1", port=0) as coord,
            fake_vllm("m", tokens=5) as backend,
        ):
            backend.gate = anyio.Event()
            cfg = write_config(
                tmp_path,
                coord.ws_url,
                backend_urls=(backend.url,),
                prometheus_addr=f"127.0.0.1:{port}",
            )
            async with running_agent(cfg) as daemon:
                daemon.agent.jobs.store_retry_s = 0.05
                pid = await serving(coord)
                assert (await readyz(port))[0] == 200
                served = await coord.send_job(pid, "m", REQUEST)
                await backend.started.wait()
                filler = fill(tmp_path / "state")
                backend.gate.set()  # the job ends on a full disk
                await daemon.agent.jobs.wait_idle()
                status, reason = await readyz(port)
                refused = await coord.send_job(pid, "m", REQUEST)
                await anyio.wait_all_tasks_blocked()
                assert served.terminal is None and refused.terminal is None  # nothing unstored
                assert status == 503 and "cannot store billing records" in reason
                assert "disk is full" in reason and str(tmp_path / "state") in reason
                filler.unlink()  # space is back
                done = await finished(coord, served.job_id)
                turned_away = await finished(coord, refused.job_id)
                after = await finished(coord, (await coord.send_job(pid, "m", REQUEST)).job_id)
                assert (await readyz(port))[0] == 200
    assert isinstance(done.terminal, JobDone) and done.terminal_count == 1
    assert isinstance(turned_away.terminal, JobError)
    assert turned_away.terminal.error_code == "out_of_capacity"
    assert isinstance(after.terminal, JobDone)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot be stored" in errors[0]  # one line, not one per try
    assert not any(r.exc_info for r in caplog.records)
    coord.assert_no_violations()


HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


async def test_a_database_locked_by_another_process_keeps_the_frame_until_it_is_released(
    tmp_path: Path,
) -> None:
    outbound = Outbound()
    async with await Outbox.open(tmp_path, busy_timeout_s=0.1) as outbox:
        executor = executor_of(MemoryStore(), outbound, OneBackend(one_stream))
        executor.outbox = outbox
        executor.store_retry_s = 0.05
        holder = await anyio.open_process(
            [sys.executable, "-c", HOLD_LOCK, str(tmp_path / FILE_NAME)]
        )
        async with holder, anyio.create_task_group() as group:
            assert holder.stdout is not None and holder.stdin is not None
            said = BufferedByteReceiveStream(holder.stdout)
            assert await said.receive_until(b"\n", 100) == b"locked"
            await group.start(executor.run)
            executor.submit(Job(job_id="j1", model_id="m", request=REQUEST))
            await executor.wait_idle()
            assert executor.store_problem is not None
            assert "locked by another process" in executor.store_problem
            assert outbound.take().terminal_ids == [] and executor.unstored == 1
            await holder.stdin.aclose()  # the other process lets go
            assert await holder.wait() == 0
            async for batch in outbound.batches():  # the first thing there is to send
                assert batch.terminal_ids == ["j1"]
                break
            group.cancel_scope.cancel()
        assert executor.store_problem is None and executor.unstored == 0
        [(job_id, frame)] = await outbox.undelivered()
    assert job_id == "j1" and isinstance(decode(frame), JobDone)
