"""System calls the filter decides on, run by the system python3 inside a sandboxed instance.

Prints one JSON object: each entry is "ok" when the call succeeded, else the errno name it
failed with. Run once under the seccomp filter and once without it (same sandbox otherwise),
the two answers show what the filter alone refuses.
"""

import ctypes
import errno
import json
import mmap
import os
import platform
import socket

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
R: dict[str, object] = {}
X86_64 = platform.machine() == "x86_64"
# x86_64 numbers; on other architectures only the portable entries are attempted
NR = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
      "clone3": 435, "get_mempolicy": 239, "personality": 135, "ioctl": 16, "getpid": 39}


def outcome(rc):
    if rc >= 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def sysc(name, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(NR[name]), *args)
    return rc, outcome(rc)


def attempt_socket(name, family, kind, proto=0):
    try:
        socket.socket(family, kind, proto).close()
        R[name] = "ok"
    except OSError as e:
        R[name] = errno.errorcode.get(e.errno, str(e.errno))


if X86_64:
    # io_uring: setup with a real parameter block, enter and register on a bad descriptor
    params = (ctypes.c_char * 120)()
    fd, R["io_uring_setup"] = sysc("io_uring_setup", ctypes.c_uint(4), params)
    if fd >= 0:
        os.close(fd)
    R["io_uring_enter"] = sysc("io_uring_enter", -1, 0, 0, 0, None, 0)[1]
    R["io_uring_register"] = sysc("io_uring_register", -1, 0, None, 0)[1]
    # an unlisted call any unprivileged process may make: read its own NUMA policy
    mode = ctypes.c_int()
    R["get_mempolicy"] = sysc("get_mempolicy", ctypes.byref(mode), None, ctypes.c_ulong(0),
                              None, ctypes.c_ulong(0))[1]
    # clone3 answers ENOSYS under the filter (libc falls back to clone); EINVAL otherwise
    R["clone3"] = sysc("clone3", None, ctypes.c_size_t(0))[1]
    # personality: the query is allowed, disabling ASLR (ADDR_NO_RANDOMIZE) is not
    persona, R["personality_query"] = sysc("personality", ctypes.c_ulong(0xFFFFFFFF))
    rc, R["personality_no_aslr"] = sysc("personality", ctypes.c_ulong(0x0040000))
    if rc >= 0:
        sysc("personality", ctypes.c_ulong(persona))
    # ioctl compares the request's low 32 bits: high garbage does not hide TIOCSTI, and a
    # sign-extended request with bit 31 set (FS_IOC_GETFLAGS) still reaches the driver
    flag = ctypes.c_char(b"x")
    R["tiocsti_high_bits"] = sysc("ioctl", 0, ctypes.c_ulong(0xFFFFFFFF00005412),
                                  ctypes.byref(flag))[1]
    value = ctypes.c_long()
    R["getflags_sign_extended"] = sysc("ioctl", 0, ctypes.c_ulong(0xFFFFFFFF80086601),
                                       ctypes.byref(value))[1]
    r, w = os.pipe()
    os.write(w, b"abc")
    count = ctypes.c_int()
    R["fionread"] = sysc("ioctl", r, ctypes.c_ulong(0x541B), ctypes.byref(count))[1]
    R["fionread_bytes"] = count.value
    # the 32-bit ABI: getpid through int 0x80 (i386 number 20), from machine code in an
    # executable mapping; the x32 ABI: getpid with the x32 bit set
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    eax = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
    R["i386_getpid"] = "ok" if eax > 0 else errno.errorcode.get(-eax, str(-eax))
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(0x40000000 | NR["getpid"]))
    R["x32_getpid"] = outcome(rc)
# socket families: the four an app speaks, and two it does not
attempt_socket("socket_inet", socket.AF_INET, socket.SOCK_STREAM)
attempt_socket("socket_inet6", socket.AF_INET6, socket.SOCK_DGRAM)
attempt_socket("socket_unix", socket.AF_UNIX, socket.SOCK_STREAM)
attempt_socket("socket_netlink", socket.AF_NETLINK, socket.SOCK_RAW, 0)
attempt_socket("socket_vsock", 40, socket.SOCK_STREAM)
attempt_socket("socket_alg", 38, socket.SOCK_SEQPACKET)
try:
    socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    R["socketpair_unix"] = "ok"
except OSError as e:
    R["socketpair_unix"] = errno.errorcode.get(e.errno, str(e.errno))
R["alive"] = True  # nothing above killed the process
print(json.dumps(R))
