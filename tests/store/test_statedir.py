"""Who holds a state dir: the pid `doctor` names, read from the kernel's table of locks without
touching the lock (a probe that took it, even for a moment, could make a starting agent exit
78). The parser table-tested; then real locks held by this process and by another one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provider_agent.ops import doctor
from provider_agent.store import statedir
from provider_agent.store.statedir import LOCK_FILE, flock_holder, lock_holder

TABLE = (
    "1: POSIX  ADVISORY  READ 26389 fe:00:2884782 128 128\n"
    "2: FLOCK  ADVISORY  WRITE 4242 fe:01:77 0 EOF\n"
    "2: -> FLOCK  ADVISORY  WRITE 5151 fe:01:77 0 EOF\n"
    "3: FLOCK  ADVISORY  READ 6161 fe:01:78 0 EOF\n"
    "4: FLOCK  ADVISORY  WRITE -1 08:10:99 0 EOF\n"
    "5: FLOCK  ADVISORY  WRITE 7373 zz:01:80 0 EOF\n"
    "6: FLOCK  ADVISORY  WRITE 8484 08:10:100 0 EOF\n"
)


@pytest.mark.parametrize(
    ("name", "major", "minor", "inode", "pid"),
    [
        ("the holder, not the process waiting for it", 0xFE, 1, 77, 4242),
        ("a shared lock is no agent's", 0xFE, 1, 78, None),
        ("a holder the kernel cannot name in this namespace", 0x08, 0x10, 99, None),
        ("a line that does not parse is skipped", 0xFE, 1, 80, None),
        ("device numbers are hexadecimal, the inode decimal", 0x08, 0x10, 100, 8484),
        ("a POSIX lock on the inode is not the agent's flock", 0xFE, 0, 2884782, None),
        ("nothing on that file", 0xFE, 1, 76, None),
    ],
)
def test_the_flock_holder_in_a_proc_locks_table(
    name: str, major: int, minor: int, inode: int, pid: int | None
) -> None:
    assert flock_holder(TABLE, major, minor, inode) == pid, name


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="no /proc/locks (not Linux)")
def test_the_holder_is_this_process_then_another_then_nobody(tmp_path: Path) -> None:
    assert lock_holder(tmp_path) is None  # no lock file yet
    with statedir.lock(tmp_path):
        assert lock_holder(tmp_path) == os.getpid()
    assert lock_holder(tmp_path) is None  # released, the file stays
    code = (
        "import sys, pathlib; from provider_agent.store import statedir\n"
        "held = statedir.lock(pathlib.Path(sys.argv[1])); print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert lock_holder(tmp_path) == child.pid
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(child.pid)
        child.communicate("")
    assert lock_holder(tmp_path) is None


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="no /proc/locks (not Linux)")
async def test_doctor_names_a_holder_whose_socket_does_not_answer(tmp_path: Path) -> None:
    """A process holds the state dir but answers nothing (starting, or stuck): doctor says which
    pid, not merely that no agent runs."""
    [check] = await doctor.check_agent(tmp_path)
    assert check.grade == "warn" and "pid" not in check.detail  # nobody: as before
    with statedir.lock(tmp_path):
        [check] = await doctor.check_agent(tmp_path)
    assert check.grade == "warn"
    assert f"pid {os.getpid()} holds {tmp_path}" in check.detail
    assert check.hint is not None and f"kill {os.getpid()}" in check.hint
