"""The few bpf(2) commands the lb driver needs, through ctypes (x86-64 and arm64).

No BPF toolchain is involved: :mod:`corral_lb.socket_lb` assembles its one small program with
:func:`insn`, and the kernel's verifier checks it at :func:`prog_load`, whose error carries the
verifier's log. Every function raises :class:`OSError` with the kernel's errno on failure;
every file descriptor returned belongs to the caller (close it with :func:`os.close`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_NR_BPF = {"x86_64": 321, "aarch64": 280}

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, PROG_LOAD = 0, 1, 2, 3, 5
LINK_CREATE = 28
# map and program types, attach types
MAP_TYPE_HASH = 1
PROG_TYPE_CGROUP_SOCK_ADDR = 18
ATTACH_CGROUP_INET4_CONNECT = 10
# helpers
FN_MAP_LOOKUP_ELEM, FN_GET_PRANDOM_U32, FN_GET_NETNS_COOKIE = 1, 7, 122

_ATTR_SIZE = 128  # larger than every union bpf_attr member used here; the tail stays zero

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytearray) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"bpf(2) syscall number unknown on {platform.machine()}")
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    r = int(_libc.syscall(nr, cmd, buf, len(attr)))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_imm64(dst: int, value: int, *, map_fd: bool = False) -> bytes:
    """``dst = value`` (two instruction slots); ``map_fd`` makes ``value`` a map reference."""
    lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    return (insn(0x18, dst, 1 if map_fd else 0, 0, struct.unpack("<i", struct.pack("<I", lo))[0])
            + insn(0, 0, 0, 0, struct.unpack("<i", struct.pack("<I", hi))[0]))


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map; returns its fd."""
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, 0)
    return _bpf(MAP_CREATE, attr)


def map_update(fd: int, key: bytes, value: bytes) -> None:
    """Create or replace one element (BPF_ANY)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
    _bpf(MAP_UPDATE_ELEM, attr)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """One element's value, or None when the key is absent."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, fd, 0, ctypes.addressof(k), ctypes.addressof(v))
    try:
        _bpf(MAP_LOOKUP_ELEM, attr)
    except FileNotFoundError:
        return None
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete one element; False when it was absent."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, fd, 0, ctypes.addressof(k))
    try:
        _bpf(MAP_DELETE_ELEM, attr)
    except FileNotFoundError:
        return False
    return True


def prog_load(prog_type: int, code: bytes, *, expected_attach_type: int = 0,
              name: str = "") -> int:
    """Load (and verify) a GPL program; returns its fd. OSError carries the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(code) // 8, ctypes.addressof(insns),
                     ctypes.addressof(license_), 1, len(log), ctypes.addressof(log))
    struct.pack_into("16s", attr, 48, name.encode()[:15])  # prog_name
    struct.pack_into("<I", attr, 68, expected_attach_type)
    try:
        return _bpf(PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip()
        raise OSError(exc.errno, f"{exc.strerror}{': ' + detail if detail else ''}") from None


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach ``prog_fd`` to ``target_fd`` (a cgroup directory) through a BPF link; returns the
    link's fd. The program stays attached exactly as long as the link fd is open."""
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(LINK_CREATE, attr)
