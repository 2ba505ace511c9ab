"""Socket-level balancing of the host's own connections to nft-plane frontends.

A TCP ``connect()`` made in the host's network namespace to a frontend on a loopback address
is given a backend's address by a ``cgroup/connect4`` BPF program on the cgroup v2 root, before
the SYN is sent: the connection then goes straight to the backend, with no per-packet NAT. The
backend is drawn from the same weighted slot table as the DNAT map, by the same rule: at random
(``weighted``) or in turn (``round-robin``). Everything else keeps going through the nftables
DNAT rules, which stay installed for every service: connections from other hosts and from apps'
own network namespaces, connections to the host's non-loopback addresses, ``hash-source``
services (from the host every source address is the same), and every connection while the
lb driver is down.

Lifetime: the program is attached through a BPF link held by this process; when the driver
exits, for any reason, the kernel detaches it and the host's connections fall back to DNAT.
Nothing is pinned, so nothing outlives the driver. Connections already made stay as they are.

A visible difference from DNAT: the client's ``getpeername()`` shows the backend's address.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from corral_lb import _bpf
from corral_lb._bpf import insn, ld_imm64
from corral_lb.backend import Backend

SO_NETNS_COOKIE = 71
MAX_SERVICES = 4096
POLICIES = {"weighted": 0, "round-robin": 1}  # the rest stay with DNAT

# struct bpf_sock_addr offsets
_USER_IP4, _USER_PORT, _PROTOCOL = 4, 24, 36


class SocketLbUnavailable(Exception):
    """This host cannot run the program (no cgroup v2, no BPF, old kernel): DNAT only."""


def cgroup2_root(mounts: Path = Path("/proc/self/mounts")) -> Path:
    """The mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``)."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    raise SocketLbUnavailable("no cgroup v2 hierarchy is mounted")


def _key(host: str, port: int) -> bytes:
    """Map key as the program builds it: ``user_ip4`` then ``user_port``, network order."""
    return socket.inet_aton(host) + struct.pack("!H", port) + b"\0\0"


def value_size(slots: int) -> int:
    """u32 turn counter, u32 policy, then ``slots`` x (u32 address, u32 port)."""
    return 8 + 8 * slots


def program(map_fd: int, netns_cookie: int, slots: int) -> bytes:
    """The connect4 program (see the module docstring); ``slots`` is a power of two."""
    if slots <= 0 or slots & (slots - 1):
        raise ValueError(f"slots must be a power of two (the pick masks with it), not {slots}")
    pick, out = 26, 33  # instruction indexes of the labels, checked below
    code = [
        insn(0xBF, 6, 1),                          # 0  r6 = ctx
        insn(0x61, 1, 6, _PROTOCOL),               # 1  r1 = ctx->protocol
        insn(0x55, 1, 0, out - 3, 6),              # 2  if r1 != IPPROTO_TCP goto out
        insn(0xBF, 1, 6),                          # 3  r1 = ctx
        insn(0x85, imm=_bpf.FN_GET_NETNS_COOKIE),  # 4  r0 = netns cookie of the socket
        ld_imm64(1, netns_cookie),                 # 5-6 r1 = the host's
        insn(0x5D, 0, 1, out - 8),                 # 7  if r0 != r1 goto out
        insn(0x61, 1, 6, _USER_IP4),               # 8  key.ip4 = ctx->user_ip4
        insn(0x63, 10, 1, -8),                     # 9
        insn(0x61, 1, 6, _USER_PORT),              # 10 key.port = ctx->user_port
        insn(0x63, 10, 1, -4),                     # 11
        ld_imm64(1, map_fd, map_fd=True),          # 12-13 r1 = &services
        insn(0xBF, 2, 10),                         # 14 r2 = fp
        insn(0x07, 2, 0, 0, -8),                   # 15 r2 = &key
        insn(0x85, imm=_bpf.FN_MAP_LOOKUP_ELEM),   # 16 r0 = services[key]
        insn(0x15, 0, 0, out - 18, 0),             # 17 if !r0 goto out
        insn(0xBF, 7, 0),                          # 18 r7 = service
        insn(0x61, 1, 7, 4),                       # 19 r1 = service->policy
        insn(0x15, 1, 0, 23 - 21, 1),              # 20 if r1 == round-robin goto 23
        insn(0x85, imm=_bpf.FN_GET_PRANDOM_U32),   # 21 r0 = random
        insn(0x05, 0, 0, pick - 23),               # 22 goto pick
        insn(0xB7, 1, 0, 0, 1),                    # 23 r1 = 1
        insn(0xC3, 7, 1, 0, 0x01),                 # 24 r1 = atomic fetch_add(service->turn, r1)
        insn(0xBF, 0, 1),                          # 25 r0 = r1
        insn(0x57, 0, 0, 0, slots - 1),            # 26 pick: r0 &= slots - 1
        insn(0x67, 0, 0, 0, 3),                    # 27 r0 <<= 3
        insn(0x0F, 7, 0),                          # 28 r7 = &service->slot[r0]
        insn(0x61, 1, 7, 8),                       # 29 ctx->user_ip4 = slot.ip4
        insn(0x63, 6, 1, _USER_IP4),               # 30
        insn(0x61, 1, 7, 12),                      # 31 ctx->user_port = slot.port
        insn(0x63, 6, 1, _USER_PORT),              # 32
        insn(0xB7, 0, 0, 0, 1),                    # 33 out: r0 = 1 (allow the connect)
        insn(0x95),                                # 34 exit
    ]
    blob = b"".join(code)
    assert blob[pick * 8] == 0x57 and blob[out * 8] == 0xB7
    return blob


class SocketBalancer:
    """The connect4 program, its map of frontends, and the link that keeps it attached."""

    def __init__(self, slots: int, cgroup: Path | None = None) -> None:
        if os.geteuid() != 0:
            raise SocketLbUnavailable("needs root")
        self.slots = slots
        root = cgroup if cgroup is not None else cgroup2_root()
        with socket.socket() as s:
            try:
                cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                        "little")
            except OSError as exc:
                raise SocketLbUnavailable(f"SO_NETNS_COOKIE: {exc}") from None
        fds: list[int] = []
        try:
            self.map_fd = _bpf.map_create(_bpf.MAP_TYPE_HASH, 8, value_size(slots),
                                          MAX_SERVICES)
            fds.append(self.map_fd)
            self.prog_fd = _bpf.prog_load(
                _bpf.PROG_TYPE_CGROUP_SOCK_ADDR, program(self.map_fd, cookie, slots),
                expected_attach_type=_bpf.ATTACH_CGROUP_INET4_CONNECT, name="corral_lb_conn")
            fds.append(self.prog_fd)
            cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self.link_fd = _bpf.link_create(self.prog_fd, cg,
                                                _bpf.ATTACH_CGROUP_INET4_CONNECT)
            finally:
                os.close(cg)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise SocketLbUnavailable(f"cgroup/connect4 program on {root}: {exc}") from None
        self.cgroup = root
        self._keys: dict[tuple[str, int], bytes] = {}

    @staticmethod
    def handles(listen: tuple[str, int], policy: str) -> list[tuple[str, int]]:
        """The frontends this program translates for a service (none: DNAT only)."""
        host, port = listen
        if policy not in POLICIES:
            return []
        if host in ("", "0.0.0.0"):  # noqa: S104 - matches, does not bind
            return [("127.0.0.1", port)]
        return [(host, port)] if host.startswith("127.") else []

    def set(self, listen: tuple[str, int], policy: str, table: Sequence[Backend]) -> None:
        """Point the service's frontends at ``table`` (``slots`` entries, as the DNAT map);
        an empty table removes them, so connects fall through to DNAT (which refuses)."""
        frontends = self.handles(listen, policy)
        if not table or len(table) != self.slots:
            for fe in frontends:
                self.remove(fe)
            return
        value = struct.pack("<II", 0, POLICIES[policy]) + b"".join(
            socket.inet_aton(b.host) + struct.pack("!H", b.port) + b"\0\0" for b in table)
        for fe in frontends:
            key = _key(*fe)
            _bpf.map_update(self.map_fd, key, value)
            self._keys[fe] = key

    def remove(self, frontend: tuple[str, int]) -> None:
        """Forget one frontend (its connections go through DNAT again)."""
        self._keys.pop(frontend, None)
        _bpf.map_delete(self.map_fd, _key(*frontend))

    def table(self, frontend: tuple[str, int]) -> list[tuple[str, int]] | None:
        """The slot table the program holds for ``frontend`` (for status and tests)."""
        raw = _bpf.map_lookup(self.map_fd, _key(*frontend), value_size(self.slots))
        if raw is None:
            return None
        out = []
        for i in range(self.slots):
            off = 8 + 8 * i
            out.append((socket.inet_ntoa(raw[off:off + 4]),
                        struct.unpack("!H", raw[off + 4:off + 6])[0]))
        return out

    def close(self) -> None:
        """Detach the program (closing the link) and free the map."""
        for fd in (self.link_fd, self.prog_fd, self.map_fd):
            os.close(fd)
        self._keys.clear()
