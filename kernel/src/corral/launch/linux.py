"""Thin ctypes wrappers over the Linux syscalls the sandbox needs (namespaces, mounts, caps).

Every wrapper raises ``OSError`` with the errno on failure and allocates nothing beyond a few
Python objects, so that it is usable in a freshly forked child before ``execve``. This is the
one place in corral that speaks these syscalls; the launcher and the fs driver both use it.
It imports only ``ctypes`` and ``os``: the fork server (``_child``) loads it in a bare
interpreter.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# Namespace flags (linux/sched.h).
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

# Mount flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# mount_setattr (Linux >= 5.12): the one call that makes a whole bind tree read-only.
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

# prctl options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

_SYSCALLS: dict[str, dict[str, int]] = {
    # Only the calls glibc does not wrap; numbers differ per architecture.
    "x86_64": {"pivot_root": 155, "capset": 126, "mount_setattr": 442, "pidfd_getfd": 438},
    "aarch64": {"pivot_root": 41, "capset": 91, "mount_setattr": 442, "pidfd_getfd": 438},
}
_NR = _SYSCALLS.get(os.uname().machine, _SYSCALLS["x86_64"])

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A BPF program (raw ``sock_filter`` array) kept in memory as a ready ``sock_fprog``."""

    def __init__(self, code: bytes) -> None:
        if not code or len(code) % 8:
            raise ValueError(f"a BPF program is a non-empty multiple of 8 bytes, not {len(code)}")
        self.code = code
        self._buffer = ctypes.create_string_buffer(code, len(code))
        self.fprog = _SockFprog(len(code) // 8, ctypes.addressof(self._buffer))


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(path: str | bytes | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None = None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """mount(2); raises OSError."""
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        f"mount {target!r}",
    )


def umount2(target: str | bytes, flags: int = 0) -> None:
    """umount2(2); raises OSError."""
    _check(_libc.umount2(_b(target), flags), f"umount {target!r}")


def unshare(flags: int) -> None:
    """unshare(2); raises OSError."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2) into the namespace open at ``fd``; raises OSError."""
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    """pivot_root(2); raises OSError."""
    _check(
        _libc.syscall(_NR["pivot_root"], _b(new_root), _b(put_old)),
        "pivot_root",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); raises OSError."""
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl {option}")


def set_mount_attributes(target: str | bytes, readonly: bool, recursive: bool = True) -> None:
    """Make the mount at ``target`` nosuid, nodev and (with ``readonly``) read-only; with
    ``recursive`` every mount below it too (mount_setattr, Linux >= 5.12)."""
    flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0)
    attr = _MountAttr(flags, 0, 0, 0)
    at_fdcwd = -100
    _check(
        _libc.syscall(
            _NR["mount_setattr"],
            at_fdcwd,
            _b(target),
            AT_RECURSIVE if recursive else 0,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        ),
        f"mount_setattr {target!r}",
    )


def bind(source: str | bytes, target: str | bytes, readonly: bool) -> None:
    """Bind ``source`` (recursively) at ``target``, nosuid and nodev, read-only if asked."""
    mount(source, target, None, MS_BIND | MS_REC)
    set_mount_attributes(target, readonly)


def clear_capabilities(last_cap: int) -> None:
    """Drop every capability from the bounding, ambient, inheritable, permitted, effective sets.

    Call it while still privileged (dropping the bounding set needs CAP_SETPCAP), right before
    changing uid; after ``setresuid`` to a non-zero uid the kernel clears permitted/effective.
    """
    for cap in range(last_cap + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as err:
            if err.errno != 22:  # EINVAL: the running kernel does not know this capability
                raise
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def clear_capability_sets() -> None:
    """capset(2) with every set empty (always allowed: it only lowers)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_NR["capset"], ctypes.byref(header), ctypes.byref(data)), "capset")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy (close-on-exec) of descriptor ``target_fd`` of the process behind ``pidfd``.

    Needs ptrace access to that process (root, or its uid without Yama restrictions)."""
    return _check(_libc.syscall(_NR["pidfd_getfd"], pidfd, target_fd, 0),
                  f"pidfd_getfd(fd {target_fd})")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant privileges again (setuid bits, file caps)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_child_subreaper() -> None:
    """Make the calling process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def load_seccomp(program: SeccompProgram) -> None:
    """Install a prepared program as the calling thread's seccomp filter."""
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(program.fprog))


def last_capability() -> int:
    """The highest capability number the running kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40
