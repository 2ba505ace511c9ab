"""Seccomp profiles: compiled once to BPF by libseccomp in the parent, loaded by the child.

The child of a fork must not call into libseccomp (it allocates and may take locks), so the
caller exports the filter program as raw ``sock_filter`` bytes; the fork server keeps them as a
prepared ``sock_fprog`` (``linux.SeccompProgram``) and the child only hands that to
``prctl(PR_SET_SECCOMP)``.

The ``default`` profile is a deny list (everything else is allowed), aimed at the escape
attempts of SECURITY.md: it returns EPERM for the listed syscalls. It is defence in depth: the
app already has no capabilities, a dropped uid and no_new_privs, which refuse most of these
calls on their own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from functools import cache

from corral.errors import LaunchError
from corral.launch import linux

# Calls no app may make: mounts and namespaces, kernel keyrings, bpf, perf, userfaultfd,
# handle-based opens, cross-process memory access and tracing, module and kexec loading,
# host-wide clock/swap/reboot/accounting knobs.
DENIED_SYSCALLS: tuple[str, ...] = (
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "ptrace", "process_vm_readv",
    "process_vm_writev", "kcmp", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm", "syslog", "quotactl",
    "lookup_dcookie", "vhangup", "nfsservctl", "uselib", "_sysctl", "personality",
    "pidfd_getfd",
)  # fmt: skip

TIOCSTI = 0x5412  # push a byte into a terminal's input queue
TIOCLINUX = 0x541C  # console tricks, including selection paste (same class of attack)

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_SCMP_ARCH_X86 = 0x40000003
_SCMP_ARCH_X32 = 0x4000003E


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_lock = threading.Lock()


def _libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as err:
        raise LaunchError(
            "libseccomp.so.2 is not installed (Debian package libseccomp2)", step="seccomp"
        ) from err
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: _ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a syscall on this architecture (e.g. umount, iopl on aarch64)
    array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0:
        raise LaunchError(
            f"libseccomp refused the rule for {name}: {os.strerror(-rc)}", step="seccomp"
        )


def _compile_default() -> bytes:
    lib = _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise LaunchError("seccomp_init failed", step="seccomp")
    try:
        if os.uname().machine == "x86_64":
            # Without these, a 32-bit or x32 syscall would bypass the rules; libseccomp then
            # emits the same deny list for each ABI.
            for arch in (_SCMP_ARCH_X86, _SCMP_ARCH_X32):
                lib.seccomp_arch_add(ctx, arch)
        eperm = _act_errno(errno.EPERM)
        for name in DENIED_SYSCALLS:
            _rule(lib, ctx, eperm, name)
        # clone with any namespace flag; clone3 passes its flags in memory that a filter cannot
        # read, so it answers ENOSYS and libc falls back to clone (what Docker and runc do).
        for flag in linux.NAMESPACE_FLAGS:
            _rule(lib, ctx, eperm, "clone", _ArgCmp(0, _SCMP_CMP_MASKED_EQ, flag, flag))
        _rule(lib, ctx, _act_errno(errno.ENOSYS), "clone3")
        # ioctl's request is an int: compare only the low 32 bits so high garbage cannot hide it
        for request in (TIOCSTI, TIOCLINUX):
            _rule(lib, ctx, eperm, "ioctl", _ArgCmp(1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        read_end, write_end = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctx, write_end)
            os.close(write_end)
            write_end = -1
            if rc < 0:
                raise LaunchError(f"seccomp_export_bpf: {os.strerror(-rc)}", step="seccomp")
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    finally:
        lib.seccomp_release(ctx)


PROFILES = {"default": _compile_default}


@cache
def _compiled(profile: str) -> bytes:
    return PROFILES[profile]()


def compiled_filter(profile: str) -> bytes:
    """The BPF program of ``profile`` (compiled once per process); raises LaunchError."""
    if profile not in PROFILES:
        raise LaunchError(
            f"unknown seccomp profile {profile!r} (known: {', '.join(sorted(PROFILES))})",
            step="seccomp",
        )
    with _lock:
        return _compiled(profile)
