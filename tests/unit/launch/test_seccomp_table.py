"""The default seccomp profile's table (corral.launch._seccomp.ALLOWED) and what it compiles to."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import random
from collections import Counter

import pytest

from corral.launch import linux
from corral.launch._seccomp import (
    ALLOWED,
    ARCH_SPECIFIC,
    ENOSYS_CALLS,
    TIOCLINUX,
    TIOCSTI,
    Arg,
    allowed_names,
    compiled_filter,
    none_of,
    one_of,
    resolves_on_x86_64,
)

# Calls no app may make (SECURITY.md escape items 4, 11, 12, 17 and the host-wide knobs).
NEVER = (
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen",
    "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "ptrace", "process_vm_readv",
    "process_vm_writev", "kcmp", "pidfd_getfd", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm", "syslog", "quotactl",
    "quotactl_fd", "lookup_dcookie", "vhangup", "nfsservctl", "uselib", "_sysctl",
    "fanotify_init", "sethostname", "setdomainname", "clone3",
)  # fmt: skip


def test_no_call_is_listed_twice() -> None:
    """Each call appears once in the whole table, in one group."""
    twice = [name for name, n in Counter(allowed_names()).items() if n > 1]
    assert twice == []


def test_every_name_is_an_x86_64_call_or_marked_arch_specific() -> None:
    """A typo would silently allow nothing: every name resolves on x86_64, except the
    ARCH_SPECIFIC ones, which do not (else they would not need the mark)."""
    unknown = [n for n in allowed_names() if n not in ARCH_SPECIFIC and not resolves_on_x86_64(n)]
    assert unknown == []
    assert [n for n in ARCH_SPECIFIC if resolves_on_x86_64(n)] == []
    assert set(ARCH_SPECIFIC) <= set(allowed_names())


def test_refused_calls_are_absent() -> None:
    """io_uring, the mount family, namespaces and the rest of the old deny list are not on it
    (clone3 only in ENOSYS_CALLS); the names are real calls, so absence means something."""
    assert [n for n in NEVER if n in allowed_names()] == []
    assert [n for n in NEVER if not resolves_on_x86_64(n)] == []
    assert ENOSYS_CALLS == ("clone3",)


def test_argument_checked_calls() -> None:
    """clone, ioctl, socket, socketpair and personality are allowed only through an Arg."""
    checked = {e.name for group in ALLOWED.values() for e in group if isinstance(e, Arg)}
    assert checked == {"clone", "ioctl", "socket", "socketpair", "personality"}
    assert not {"clone", "ioctl", "socket", "socketpair", "personality"} & {
        e for group in ALLOWED.values() for e in group if isinstance(e, str)}


def matches(alternatives: tuple[tuple[int, int], ...], value: int) -> int:
    return sum(1 for mask, want in alternatives if value & mask == want)


def test_none_of_matches_everything_but_the_excluded_values() -> None:
    """Every 32-bit request except TIOCSTI and TIOCLINUX matches exactly one alternative;
    those two match none."""
    alternatives = none_of(TIOCSTI, TIOCLINUX)
    assert matches(alternatives, TIOCSTI) == matches(alternatives, TIOCLINUX) == 0
    rng = random.Random(17)
    samples = [0, 0xFFFFFFFF, *range(0x5400, 0x5430), *(rng.getrandbits(32) for _ in range(20000))]
    for value in samples:
        if value not in (TIOCSTI, TIOCLINUX):
            assert matches(alternatives, value) == 1, hex(value)
    assert matches(one_of(1, 2), 2) == 1 and matches(one_of(1, 2), 3) == 0


def run_filtered(calls: list[tuple[int, ...]]) -> list[int]:
    """Each raw syscall's errno (0: it succeeded) in a forked child under the default filter."""
    program = linux.SeccompProgram(compiled_filter("default"))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            linux.set_no_new_privs()
            linux.load_seccomp(program)
            answers = []
            for nr, *args in calls:
                ctypes.set_errno(0)
                rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
                answers.append(0 if rc >= 0 else ctypes.get_errno())
            os.write(write_end, " ".join(map(str, answers)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [int(x) for x in out.split()]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers")
def test_compiled_filter_answers() -> None:
    """Under the filter: getpid works; io_uring_setup, get_mempolicy (unlisted) and
    TIOCSTI with high bits set get EPERM; clone3 gets ENOSYS; unshare(CLONE_NEWUSER) EPERM."""
    got = run_filtered([
        (39,),  # getpid
        (425, 1, 0),  # io_uring_setup(1, NULL)
        (239, 0, 0, 0, 0, 0),  # get_mempolicy
        (435, 0, 0),  # clone3(NULL, 0)
        (16, 0, 0xFFFFFFFF00000000 | TIOCSTI, 0),  # ioctl(0, TIOCSTI with high garbage)
        (272, 0x10000000),  # unshare(CLONE_NEWUSER)
    ])
    assert got == [0, errno.EPERM, errno.EPERM, errno.ENOSYS, errno.EPERM, errno.EPERM]
