"""Run a command under the system-call sandbox a systemd unit file asks for, without systemd.

`python -m tests.unit_sandbox UNIT -- COMMAND…` reads the unit's `SystemCallFilter=`,
`SystemCallErrorNumber=`, `RestrictAddressFamilies=` and `MemoryDenyWriteExecute=`, installs the
same seccomp filters systemd would (through libseccomp, which systemd itself uses), and execs
COMMAND. The syscall groups (`@system-service`, …) are expanded by `systemd-analyze syscall-filter`,
so they are this systemd's own lists. With `--kill` a call outside the allow-list kills the process
(SIGSYS) instead of failing with the unit's errno: nothing outside the list may even be tried.

This is how tests/test_systemd.py checks that the agent really runs under the unit's hardening
here, where systemd is not PID 1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
PROT_WRITE = 0x2
PROT_EXEC = 0x4
SHM_EXEC = 0o100000
#: Always permitted by systemd whatever the filter says (systemd.exec(5), SystemCallFilter=).
ALWAYS_ALLOWED = ("execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn")


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


@dataclass(frozen=True)
class Sandbox:
    """The syscall-level settings of one unit file."""

    allowed: frozenset[str] | None  # None: no SystemCallFilter=
    error_number: int | None  # None: a denied call kills the process (systemd's default)
    address_families: frozenset[int] | None  # None: no RestrictAddressFamilies=
    deny_write_execute: bool


def syscall_groups() -> dict[str, list[str]]:
    """Every `@group` systemd knows, as its direct members (names and nested @groups)."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw.startswith(" "):
            current = groups.setdefault(line, []) if line.startswith("@") else None
        elif current is not None:
            current.append(line)
    return groups


def expand(names: Iterable[str], groups: Mapping[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        if name.startswith("@"):
            found |= expand(groups[name], groups)
        else:
            found.add(name)
    return found


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Each `Key=` of the unit's [Service] section, in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and line and not line.startswith(("#", ";")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def sandbox_of(unit: Path, groups: Mapping[str, list[str]]) -> Sandbox:
    """systemd's reading of the filter settings: the first `SystemCallFilter=` decides whether
    it is an allow-list; later `~` lines take away from it, later plain lines add to it."""
    settings = unit_settings(unit)
    allowed: set[str] | None = None
    for value in settings.get("SystemCallFilter", []):
        deny = value.startswith("~")
        names = expand(value.removeprefix("~").split(), groups)
        if allowed is None:
            if deny:
                raise ValueError("a deny-list-first SystemCallFilter= is not modelled here")
            allowed = set(ALWAYS_ALLOWED)
        allowed = allowed - names if deny else allowed | names
    error_names = settings.get("SystemCallErrorNumber", [])
    error_number = getattr(errno, error_names[-1]) if error_names else None
    families: frozenset[int] | None = None
    for value in settings.get("RestrictAddressFamilies", []):
        families = frozenset(int(getattr(__import__("socket"), name)) for name in value.split())
    mdwe = settings.get("MemoryDenyWriteExecute", ["no"])[-1] in ("yes", "true", "1", "on")
    return Sandbox(None if allowed is None else frozenset(allowed), error_number, families, mdwe)


class _Seccomp:
    """A thin ctypes binding of the libseccomp calls used here."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        self.lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        self.lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        )
        self.lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        self.lib.seccomp_release.argtypes = (ctypes.c_void_p,)

    def load(self, default: int, rules: Iterable[tuple[int, str, tuple[ArgCmp, ...]]]) -> None:
        """One filter: `default` for every call no rule matches. Filters stack, as systemd's do."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, name, comparisons in rules:
                number = self.lib.seccomp_syscall_resolve_name(name.encode())
                if number < 0:  # not a syscall of this architecture (socketcall on x86-64, …)
                    continue
                array = (ArgCmp * max(1, len(comparisons)))(*comparisons)
                result = self.lib.seccomp_rule_add_array(
                    ctx, action, number, len(comparisons), array
                )
                if result < 0:
                    raise OSError(-result, f"seccomp_rule_add({name})")
            result = self.lib.seccomp_load(ctx)
            if result < 0:
                raise OSError(-result, "seccomp_load")
        finally:
            self.lib.seccomp_release(ctx)


def apply(sandbox: Sandbox, *, kill: bool) -> None:
    """Install the sandbox's filters on this process (and so on whatever it execs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    seccomp = _Seccomp()
    if sandbox.deny_write_execute:
        eperm = scmp_act_errno(errno.EPERM)
        write_exec = PROT_WRITE | PROT_EXEC
        seccomp.load(
            SCMP_ACT_ALLOW,
            [
                (eperm, "mmap", (ArgCmp(2, SCMP_CMP_MASKED_EQ, write_exec, write_exec),)),
                (eperm, "mprotect", (ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC),)),
                (eperm, "pkey_mprotect", (ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC),)),
                (eperm, "shmat", (ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC),)),
            ],
        )
    if sandbox.address_families is not None:
        refused = scmp_act_errno(errno.EAFNOSUPPORT)
        top = max(sandbox.address_families)
        rules = [
            (refused, "socket", (ArgCmp(0, SCMP_CMP_EQ, family, 0),))
            for family in range(top)
            if family not in sandbox.address_families
        ]
        rules.append((refused, "socket", (ArgCmp(0, SCMP_CMP_GT, top, 0),)))
        seccomp.load(SCMP_ACT_ALLOW, rules)
    if sandbox.allowed is not None:
        if kill or sandbox.error_number is None:
            default = SCMP_ACT_KILL_PROCESS
        else:
            default = scmp_act_errno(sandbox.error_number)
        seccomp.load(default, [(SCMP_ACT_ALLOW, name, ()) for name in sorted(sandbox.allowed)])


def main(argv: list[str]) -> None:
    kill = "--kill" in argv
    argv = [arg for arg in argv if arg != "--kill"]
    split = argv.index("--")
    unit, command = Path(argv[split - 1]), argv[split + 1 :]
    sandbox = sandbox_of(unit, syscall_groups())
    apply(sandbox, kill=kill)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
