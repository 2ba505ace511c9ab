"""SECURITY.md promise 6 and escape item 17: the system-call filter is an allow-list.

The probes run inside a sandboxed app (tests/integration/fs/probes): syscalls.py twice, with
and without the filter and otherwise in the same sandbox, so that every refusal asserted here
is the filter's and not a missing capability's; programs.py runs real programs under it.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import require
from integration.fs.harness import PYTHON, Host, sandbox_host

pytestmark = pytest.mark.root

X86_64 = platform.machine() == "x86_64"


def io_uring_enabled() -> bool:
    """Whether this host lets an unprivileged process set up an io_uring (sysctl 0)."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return f.read().strip() == "0"
    except FileNotFoundError:
        return True  # kernels before 6.6 have no switch


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with sandbox_host() as h:
        yield h


@pytest.fixture(scope="module")
def calls(host: Host) -> dict[str, dict[str, Any]]:
    """syscalls.py in two apps' sandboxes: 'filtered' (the default profile) and 'bare'."""
    filtered = host.start(host.app("filtered"), [PYTHON, "syscalls.py"])
    bare = host.start(host.app("bare"), [PYTHON, "syscalls.py"], seccomp=False)
    return {"filtered": filtered.result(), "bare": bare.result()}


def test_io_uring_is_refused(calls: dict[str, dict[str, Any]]) -> None:
    """io_uring_setup, io_uring_enter and io_uring_register fail with EPERM; without the
    filter the same sandbox sets up a ring (where the host allows io_uring at all)."""
    if not X86_64:
        pytest.skip("the probe knows x86_64 syscall numbers only")
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert calls["filtered"][name] == "EPERM", (name, calls["filtered"][name])
    if io_uring_enabled():
        assert calls["bare"]["io_uring_setup"] == "ok"
    assert calls["bare"]["io_uring_enter"] == "EBADF"


def test_unlisted_call_is_refused(calls: dict[str, dict[str, Any]]) -> None:
    """get_mempolicy, which any process may call and the list leaves out (Docker grants it
    with CAP_SYS_NICE only), succeeds without the filter and fails with EPERM under it."""
    if not X86_64:
        pytest.skip("the probe knows x86_64 syscall numbers only")
    assert calls["bare"]["get_mempolicy"] == "ok"
    assert calls["filtered"]["get_mempolicy"] == "EPERM"


def test_clone3_answers_enosys(calls: dict[str, dict[str, Any]]) -> None:
    """clone3 gets ENOSYS (libc then falls back to clone), not EPERM; unfiltered it reaches
    the kernel, which rejects the empty argument block with EINVAL."""
    if not X86_64:
        pytest.skip("the probe knows x86_64 syscall numbers only")
    assert calls["filtered"]["clone3"] == "ENOSYS"
    assert calls["bare"]["clone3"] == "EINVAL"


def test_personality_query_only(calls: dict[str, dict[str, Any]]) -> None:
    """personality(0xffffffff) reads the persona; disabling ASLR is refused with EPERM."""
    if not X86_64:
        pytest.skip("the probe knows x86_64 syscall numbers only")
    assert calls["filtered"]["personality_query"] == "ok"
    assert calls["filtered"]["personality_no_aslr"] == "EPERM"
    assert calls["bare"]["personality_no_aslr"] == "ok"


def test_ioctl_is_judged_on_the_low_32_bits(calls: dict[str, dict[str, Any]]) -> None:
    """TIOCSTI with garbage in the high half is still refused; a sign-extended request and
    FIONREAD reach the driver as they do without the filter."""
    if not X86_64:
        pytest.skip("the probe knows x86_64 syscall numbers only")
    assert calls["filtered"]["tiocsti_high_bits"] == "EPERM"
    assert calls["bare"]["tiocsti_high_bits"] == "ENOTTY"  # stdin is /dev/null
    for run in ("filtered", "bare"):
        assert calls[run]["getflags_sign_extended"] == "ENOTTY", run
        assert calls[run]["fionread"] == "ok" and calls[run]["fionread_bytes"] == 3, run


def test_foreign_abis_get_an_errno_not_a_kill(calls: dict[str, dict[str, Any]]) -> None:
    """A 32-bit (int 0x80) or x32 call fails with EPERM and the process lives on; without the
    filter the 32-bit getpid works."""
    if not X86_64:
        pytest.skip("the 32-bit and x32 ABIs are x86_64's")
    assert calls["filtered"]["i386_getpid"] == "EPERM"
    assert calls["filtered"]["x32_getpid"] == "EPERM"
    assert calls["filtered"]["alive"] is True
    assert calls["bare"]["i386_getpid"] == "ok"


def test_socket_families(calls: dict[str, dict[str, Any]]) -> None:
    """Unix, IPv4, IPv6 and netlink sockets open; vsock and AF_ALG fail with EPERM."""
    for name in ("socket_inet", "socket_inet6", "socket_unix", "socket_netlink",
                 "socketpair_unix"):
        assert calls["filtered"][name] == "ok", (name, calls["filtered"][name])
    for name in ("socket_vsock", "socket_alg"):
        assert calls["filtered"][name] == "EPERM", (name, calls["filtered"][name])
        # unfiltered: it opens, or the kernel lacks the family; never the filter's EPERM
        assert calls["bare"][name] in ("ok", "EAFNOSUPPORT"), (name, calls["bare"][name])


def test_real_programs_work_under_the_filter(host: Host) -> None:
    """Python (threads, subprocess, asyncio), a shell pipeline, gcc building and running a C
    program (threads, fork/exec, mmap, sockets), Node serving HTTP and Java (compiling its
    source, threads, a child, HTTP) all run in a filtered sandbox."""
    for tool in ("gcc", "node", "java"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/setup.sh installs it)")
    run = host.start(host.app("programs"), [PYTHON, "programs.py"])
    result = run.result(timeout=300)
    failed = {k: v for k, v in result.items() if not k.endswith("_seconds") and v != "ok"}
    assert not failed, failed
    assert set(result) >= {"python_threads", "python_subprocess", "python_asyncio",
                           "shell_pipeline", "c_program", "node_http", "java"}
