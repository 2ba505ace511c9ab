"""Seccomp profiles: compiled once to BPF by libseccomp in the parent, loaded by the child.

The child of a fork must not call into libseccomp (it allocates and may take locks), so the
caller exports the filter program as raw ``sock_filter`` bytes; the fork server keeps them as a
prepared ``sock_fprog`` (``linux.SeccompProgram``) and the child only hands that to
``prctl(PR_SET_SECCOMP)``.

The ``default`` profile is an allow-list, as Docker's and Podman's default profiles are: the
calls in ``ALLOWED`` run, ``clone3`` answers ENOSYS, and every other call (the io_uring calls,
and whatever Linux adds later) fails with EPERM; nothing is ever killed, because programs
probe for features and must see an error. The list is Docker's default profile
(moby/moby ``profiles/seccomp/default.json``) minus the calls it grants only to containers
holding CAP_SYS_ADMIN, CAP_SYS_PTRACE and the like (an app holds no capability), minus the
calls corral refused before it had an allow-list (mounts and namespaces, keyrings, bpf, perf,
userfaultfd, handles, tracing, clock setting...), minus io_uring; docs/security.md says what
differs and why. It is defence in depth: the app already has no capabilities, a dropped uid
and no_new_privs, which refuse most of the dangerous calls on their own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass
from functools import cache

from corral.errors import LaunchError
from corral.launch import linux

TIOCSTI = 0x5412  # push a byte into a terminal's input queue
TIOCLINUX = 0x541C  # console tricks, including selection paste (same class of attack)
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
# personality(): Docker's values. PER_LINUX, PER_LINUX32 and UNAME26 (alone or together) only
# change what uname reports; 0xffffffff reads the persona. Refused: ADDR_NO_RANDOMIZE,
# READ_IMPLIES_EXEC, MMAP_PAGE_ZERO and the other bits that weaken the process's own hardening.
PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
LOW32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Arg:
    """A call allowed only when argument ``index`` passes one of ``alternatives``.

    Each alternative is a (mask, value) pair, true when ``arg & mask == value``; an int
    argument is compared on its low 32 bits only, as the kernel reads it, so that garbage in
    the high half can neither hide a refused value nor refuse an allowed one.
    """

    name: str
    index: int
    alternatives: tuple[tuple[int, int], ...]


def one_of(*values: int) -> tuple[tuple[int, int], ...]:
    """Alternatives matching an int argument equal to one of ``values``."""
    return tuple((LOW32, value) for value in values)


def none_of(*values: int) -> tuple[tuple[int, int], ...]:
    """Alternatives matching every int argument except ``values``.

    libseccomp has no masked not-equal, and refuses a rule whose action is the default one
    (EPERM here), so "anything but these" is spelt out as a set of disjoint prefixes: walking
    the bits from the top, each branch that leaves every excluded value behind is one
    alternative (at most 32 per excluded value).
    """
    found: list[tuple[int, int]] = []
    for bit in range(31, -1, -1):
        mask = (LOW32 << bit) & LOW32
        taken = {v & mask for v in values}
        for parent in sorted({v & (mask << 1) & LOW32 for v in values}):
            for child in (parent, parent | 1 << bit):
                if child not in taken:
                    found.append((mask, child))
    return tuple(found)


def bits_clear(bits: int) -> tuple[tuple[int, int], ...]:
    """The alternative matching an argument with none of ``bits`` set."""
    return ((bits, 0),)


NAMESPACE_BITS = sum(linux.NAMESPACE_FLAGS)

# The allow-list: one entry per group, each saying why its calls are allowed. A name libseccomp
# does not know on the running architecture is skipped (e.g. open, fork or arch_prctl on
# aarch64, which has only the *at variants); ARCH_SPECIFIC lists the names that do not exist
# on x86_64 at all.
ALLOWED: dict[str, tuple[str | Arg, ...]] = {
    # Every runtime's allocator, loader and JIT (V8, HotSpot) maps, protects and releases
    # memory; mlock is bounded by RLIMIT_MEMLOCK; memfd_create backs JIT code and shared
    # buffers; pkeys and shadow stacks harden the process's own memory.
    "memory": (
        "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync",
        "mlock", "mlock2", "mlockall", "munlock", "munlockall", "remap_file_pages",
        "memfd_create", "memfd_secret", "membarrier", "pkey_alloc", "pkey_free",
        "pkey_mprotect", "map_shadow_stack",
    ),
    # Reading and writing descriptors and walking the file system: what the mount view and
    # the app's uid permit (the root is read-only outside the app's rw grants). mknod makes
    # only FIFOs and sockets without CAP_MKNOD; chown only what the uid may.
    "files": (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "preadv2",
        "pwritev", "pwritev2", "lseek", "open", "openat", "openat2", "creat", "close",
        "close_range", "dup", "dup2", "dup3", "fcntl", "flock", "fsync", "fdatasync",
        "sync", "syncfs", "sync_file_range", "fallocate", "truncate", "ftruncate",
        "fadvise64", "readahead", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs",
        "fstatfs", "access", "faccessat", "faccessat2", "getdents", "getdents64", "getcwd",
        "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "rename", "renameat", "renameat2",
        "link", "linkat", "unlink", "unlinkat", "symlink", "symlinkat", "readlink",
        "readlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown",
        "fchownat", "lchown", "umask", "utime", "utimes", "utimensat", "futimesat", "mknod",
        "mknodat", "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr",
        "flistxattr", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
        "fremovexattr", "copy_file_range", "sendfile", "splice", "tee", "vmsplice", "pipe",
        "pipe2", "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    ),
    # Linux AIO (io_setup...): used by databases and the JDK; unlike io_uring it runs no
    # kernel worker on the app's behalf and has had a small attack surface.
    "async I/O": (
        "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    ),
    # Device and terminal control. Refused: TIOCSTI and TIOCLINUX, which push input into a
    # terminal the app may have inherited (escape item 13).
    "ioctl": (
        Arg("ioctl", 1, none_of(TIOCSTI, TIOCLINUX)),
    ),
    # Network and local sockets. socket() only for the families an app speaks: Unix, IPv4,
    # IPv6 and netlink (glibc's getaddrinfo and every runtime's interface listing read
    # routes and addresses over NETLINK_ROUTE). Refused: AF_PACKET (also needs CAP_NET_RAW),
    # AF_VSOCK (reaches the hypervisor, refused by Docker too), AF_ALG, and the rarely used
    # families (RDS, TIPC, X.25, CAN, Bluetooth...) where kernel bugs have clustered.
    "sockets": (
        Arg("socket", 0, one_of(AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)),
        Arg("socketpair", 0, one_of(AF_UNIX)),
        "bind", "listen", "accept", "accept4", "connect", "shutdown", "getsockname",
        "getpeername", "getsockopt", "setsockopt", "sendto", "sendmsg", "sendmmsg",
        "recvfrom", "recvmsg", "recvmmsg",
    ),
    # Event loops (asyncio, libuv, Java NIO, Go's netpoller) wait on descriptors, events,
    # signals and timers.
    "polling": (
        "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
        "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "signalfd",
        "signalfd4", "timerfd_create", "timerfd_settime", "timerfd_gettime",
    ),
    # Threads and child processes: shells fork and exec, subprocess vforks, every runtime
    # starts threads (clone) and synchronises them (futex, rseq, robust lists). clone only
    # without namespace flags; clone3 keeps its flags in memory a filter cannot read, so it
    # is not here but answers ENOSYS (ENOSYS_CALLS) and libc falls back to clone.
    "process and threads": (
        Arg("clone", 0, bits_clear(NAMESPACE_BITS)),
        "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
        "getpid", "getppid", "gettid", "getpgid", "setpgid", "getpgrp", "getsid", "setsid",
        "set_tid_address", "set_robust_list", "get_robust_list", "rseq", "futex",
        "futex_waitv", "futex_wake", "futex_wait", "futex_requeue", "restart_syscall",
        "arch_prctl", "prctl", "pidfd_open", "pidfd_send_signal", "process_mrelease",
        "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
        "sched_setparam", "sched_getscheduler", "sched_setscheduler", "sched_getattr",
        "sched_setattr", "sched_get_priority_max", "sched_get_priority_min",
        "sched_rr_get_interval", "getpriority", "setpriority", "getcpu", "ioprio_get",
        "ioprio_set",
    ),
    # Signals to the app's own processes (its pid namespace holds nothing else) and
    # handlers; Go and the JVM use alternate signal stacks.
    "signals": (
        "kill", "tgkill", "tkill", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
        "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigqueueinfo",
        "rt_tgsigqueueinfo", "sigaltstack", "pause",
    ),
    # Reading clocks, sleeping and timers. Setting or adjusting a clock is not here.
    "time": (
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
        "time", "times", "alarm", "getitimer", "setitimer", "timer_create", "timer_settime",
        "timer_gettime", "timer_getoverrun", "timer_delete",
    ),
    # Randomness for hash seeds, TLS and key generation (OpenSSL, Node, Go, the JDK).
    "randomness": (
        "getrandom",
    ),
    # Who the process is and what it may use. Without capabilities the set*id calls can
    # only give up ids, and setrlimit only lower hard limits.
    "identity and limits": (
        "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
        "setfsgid", "setgroups", "capget", "capset", "getrlimit", "setrlimit", "prlimit64",
        "getrusage", "uname", "sysinfo",
        Arg("personality", 0, one_of(*PERSONAS)),
    ),
    # SysV and POSIX IPC, private to the instance (its own ipc namespace): PostgreSQL,
    # shared-memory caches, POSIX semaphores.
    "ipc": (
        "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
        "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
        "mq_timedreceive", "mq_notify", "mq_getsetattr",
    ),
    # A program confining itself further (a nested seccomp filter, Landlock) only narrows
    # what it can do.
    "self-restriction": (
        "seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    ),
    # riscv64 JITs (V8, HotSpot) must flush the instruction cache through the kernel.
    "architecture": (
        "riscv_flush_icache",
    ),
}  # fmt: skip

# Names of ALLOWED that x86_64 does not have, with the architecture they belong to.
ARCH_SPECIFIC = {"riscv_flush_icache": "riscv64"}

# Refused with ENOSYS rather than EPERM: libc (glibc's clone wrapper, posix_spawn) falls back
# to clone only on ENOSYS. This is Docker's single ENOSYS entry.
ENOSYS_CALLS = ("clone3",)

DEFAULT_ERRNO = errno.EPERM

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_SCMP_ARCH_X86_64 = 0xC000003E
_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_FLTATR_CTL_OPTIMIZE = 8


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def allowed_names() -> list[str]:
    """Every call name of ``ALLOWED``, in table order (an ``Arg`` entry by its name)."""
    return [e.name if isinstance(e, Arg) else e for group in ALLOWED.values() for e in group]


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
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def resolves_on_x86_64(name: str) -> bool:
    """Whether libseccomp knows ``name`` as an x86_64 system call (used by the tests)."""
    return int(_libseccomp().seccomp_syscall_resolve_name_arch(_SCMP_ARCH_X86_64,
                                                                name.encode())) >= 0


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: _ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a syscall on this architecture (e.g. open, fork on aarch64)
    array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0:
        raise LaunchError(
            f"libseccomp refused the rule for {name}: {os.strerror(-rc)}", step="seccomp"
        )


def _compile_default() -> bytes:
    lib = _libseccomp()
    ctx = lib.seccomp_init(_act_errno(DEFAULT_ERRNO))
    if not ctx:
        raise LaunchError("seccomp_init failed", step="seccomp")
    try:
        # Only the native ABI is in the filter: a 32-bit (int 0x80) or x32 call from an x86_64
        # process meets the "bad architecture" action, which libseccomp makes a kill unless
        # told otherwise; it gets the default errno like any call not on the list.
        rc = lib.seccomp_attr_set(ctx, _SCMP_FLTATR_ACT_BADARCH, _act_errno(DEFAULT_ERRNO))
        if rc < 0:
            raise LaunchError(f"seccomp_attr_set: {os.strerror(-rc)}", step="seccomp")
        # a binary search over syscall numbers instead of ~280 comparisons in a row (2.5+)
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2)
        for group in ALLOWED.values():
            for entry in group:
                if isinstance(entry, str):
                    _rule(lib, ctx, _SCMP_ACT_ALLOW, entry)
                    continue
                for mask, value in entry.alternatives:
                    cmp = _ArgCmp(entry.index, _SCMP_CMP_MASKED_EQ, mask, value)
                    _rule(lib, ctx, _SCMP_ACT_ALLOW, entry.name, cmp)
        for name in ENOSYS_CALLS:
            _rule(lib, ctx, _act_errno(errno.ENOSYS), name)
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
