"""socket.keep / socket.list / socket.release through the kernel's own dispatch, and the
supervisor handing a driver's kept sockets to its next process (and to no other).

The "driver" is this test process: its slot carries our pid and start time, so the kernel
lifts descriptors out of us with pidfd_getfd exactly as it does out of a driver process."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from corral.errors import CorralError, ErrorCode
from corral.host import HostConfig
from corral.kernel import Kernel
from corral.ledger import open_ledger
from corral.protocol import KEPT_FDS_ENV, Request
from corral.socketstore import SocketStore
from corral.supervisor import DriverSlot, Supervisor


def _listening(host: str = "127.0.0.1") -> socket.socket:
    return socket.create_server((host, 0))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _copies(fd: int) -> set[int]:
    """The descriptors of this process open on the same file as ``fd`` (``fd`` included)."""
    ident = os.fstat(fd)
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ident.st_dev, ident.st_ino):
            out.add(int(name))
    return out


class Harness:
    """A kernel (not running: no bus) with two drivers connected, both this process."""

    def __init__(self, tmp: Path) -> None:
        self.kernel = Kernel(HostConfig(), home_dir=tmp / "home", runtime=tmp / "run")
        me = psutil.Process()
        self.peers: dict[str, Any] = {}
        for name, features in (("lb", {"listen_sockets"}), ("lb2", {"listen_sockets"}),
                               ("cron", set())):
            peer = SimpleNamespace(identity=name.encode(), role="driver", uid=0)
            self.peers[name] = peer
            self.kernel.supervisor.slots[name] = DriverSlot(
                name, "lb", ["x"], state="running", pid=me.pid, start_time=me.create_time(),
                peer=peer, features=frozenset(features))  # type: ignore[arg-type]
        self._id = 0

    def call(self, driver: str, op: str, **args: Any) -> dict[str, Any]:
        self._id += 1
        req = Request(id=self._id, op=op, args=args)
        return asyncio.run(self.kernel.dispatch(self.peers[driver], req))

    def refused(self, driver: str, op: str, **args: Any) -> CorralError:
        with pytest.raises(CorralError) as info:
            self.call(driver, op, **args)
        return info.value

    def close(self) -> None:
        self.kernel.sockets.close()
        self.kernel.ledger.close()


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_kept_socket_outlives_the_drivers_copy_until_released(kernel: Harness) -> None:
    """socket.keep takes a copy: with the driver's own socket closed the port still accepts
    (clients wait in the backlog); socket.list shows key, address, the kernel's fd and the
    inode; socket.release closes the copy and the port refuses."""
    sock = _listening()
    port = sock.getsockname()[1]
    inode = os.fstat(sock.fileno()).st_ino
    kept = kernel.call("lb", "socket.keep", pid=os.getpid(), fd=sock.fileno(), key="tcp:shop")
    assert kept["replaced"] is False and kept["port"] == port and kept["inode"] == inode
    sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # queued in the kernel's copy: not refused
    [listed] = kernel.call("lb", "socket.list")["sockets"]
    assert listed == {"key": "tcp:shop", "host": "127.0.0.1", "port": port,
                      "fd": kept["fd"], "inode": inode}
    assert kernel.call("lb", "socket.release", key="tcp:shop") == {"released": True}
    assert _refused(port)
    with pytest.raises(OSError) as closed:
        os.fstat(kept["fd"])
    assert closed.value.errno == errno.EBADF
    assert kernel.call("lb", "socket.list") == {"sockets": []}
    assert kernel.call("lb", "socket.release", key="tcp:shop") == {"released": False}


def test_a_pid_that_is_not_the_drivers_own_is_refused(kernel: Harness) -> None:
    """The kernel lifts descriptors only out of the calling driver's own process (403)."""
    sock = _listening()
    err = kernel.refused("lb", "socket.keep", pid=os.getppid(), fd=sock.fileno(), key="k")
    assert err.code == ErrorCode.FORBIDDEN and "is not the process of driver 'lb'" in err.reason
    assert kernel.call("lb", "socket.list") == {"sockets": []}
    sock.close()


@pytest.mark.parametrize("kind", ["bound, not listening", "udp", "unix listening", "a file"])
def test_only_a_listening_tcp_socket_is_kept(kernel: Harness, tmp_path: Path,
                                             kind: str) -> None:
    """Anything but a listening TCP socket is refused (422), and the kernel keeps no copy of
    it (no descriptor leaks)."""
    if kind == "bound, not listening":
        thing: Any = socket.socket()
        thing.bind(("127.0.0.1", 0))
    elif kind == "udp":
        thing = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        thing.bind(("127.0.0.1", 0))
    elif kind == "unix listening":
        thing = socket.socket(socket.AF_UNIX)
        thing.bind(str(tmp_path / "s"))
        thing.listen()
    else:
        thing = open(tmp_path / "f", "w")
    err = kernel.refused("lb", "socket.keep", pid=os.getpid(), fd=thing.fileno(), key="k")
    assert err.code == ErrorCode.INVALID, err
    assert "listening" in err.reason, err.reason
    assert _copies(thing.fileno()) == {thing.fileno()}  # the kernel's copy was closed
    assert kernel.call("lb", "socket.list") == {"sockets": []}
    thing.close()


def test_keys_are_per_driver_and_only_listen_sockets_drivers_may_use_them(
        kernel: Harness) -> None:
    """Another driver neither sees, releases nor replaces a driver's key (the same key is
    its own); a driver without the listen_sockets feature may use none of the operations."""
    a, b = _listening(), _listening()
    kernel.call("lb", "socket.keep", pid=os.getpid(), fd=a.fileno(), key="http:0.0.0.0:80")
    assert kernel.call("lb2", "socket.list") == {"sockets": []}
    assert kernel.call("lb2", "socket.release", key="http:0.0.0.0:80") == {"released": False}
    mine = kernel.call("lb2", "socket.keep", pid=os.getpid(), fd=b.fileno(),
                       key="http:0.0.0.0:80")
    assert mine["replaced"] is False
    [theirs] = kernel.call("lb", "socket.list")["sockets"]
    assert theirs["port"] == a.getsockname()[1] and theirs["fd"] != mine["fd"]
    for op, args in (("socket.keep", {"pid": os.getpid(), "fd": a.fileno(), "key": "k"}),
                     ("socket.list", {}), ("socket.release", {"key": "http:0.0.0.0:80"})):
        err = kernel.refused("cron", op, **args)
        assert err.code == ErrorCode.FORBIDDEN and "listen_sockets" in err.reason, err
    assert len(kernel.call("lb", "socket.list")["sockets"]) == 1
    a.close()
    b.close()


def test_keeping_a_key_again_replaces_and_closes_the_old_copy(kernel: Harness) -> None:
    """A key kept again holds the new socket; the kernel's copy of the old one is closed."""
    old, new = _listening(), _listening()
    old_port = old.getsockname()[1]
    kernel.call("lb", "socket.keep", pid=os.getpid(), fd=old.fileno(), key="tcp:db")
    old.close()
    assert not _refused(old_port)
    again = kernel.call("lb", "socket.keep", pid=os.getpid(), fd=new.fileno(), key="tcp:db")
    assert again["replaced"] is True and again["port"] == new.getsockname()[1]
    assert _refused(old_port)
    new.close()


def test_bad_keys_and_clients_are_refused(kernel: Harness) -> None:
    """A key outside the schema is 422; a client may not use the operations (403)."""
    sock = _listening()
    err = kernel.refused("lb", "socket.keep", pid=os.getpid(), fd=sock.fileno(),
                         key="has space")
    assert err.code == ErrorCode.INVALID
    client = SimpleNamespace(identity=b"cli", role="client", uid=0)
    with pytest.raises(CorralError) as info:
        asyncio.run(kernel.kernel.dispatch(client, Request(id=1, op="socket.list")))  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.FORBIDDEN
    sock.close()


# ---- the supervisor: the next process inherits them -----------------------------------------

REPORT = """
import json, os, socket, sys, time
named = json.loads(os.environ.get("CORRAL_KEPT_FDS", "{}"))
out = {"named": named, "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")), "socks": {}}
for key, fd in named.items():
    s = socket.socket(fileno=fd)
    out["socks"][key] = [s.getsockname()[1],
                         s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]
    s.detach()
open(sys.argv[1] + ".tmp", "w").write(json.dumps(out))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def test_the_next_process_inherits_its_drivers_sockets_and_no_others(tmp_path: Path) -> None:
    """A driver's process starts with the sockets kept for that driver, at the numbers
    CORRAL_KEPT_FDS names, listening; another driver's kept sockets are not among its
    descriptors; a driver marked failed loses its kept sockets."""
    store = SocketStore()
    ours, theirs = _listening(), _listening()
    store.keep("lb", "http:127.0.0.1:1", os.dup(ours.fileno()))
    store.keep("other", "tcp:x", os.dup(theirs.fileno()))
    their_fd = store.inherited("other")["tcp:x"]
    report = tmp_path / "report.json"

    async def on_ready(slot: DriverSlot) -> None:
        return None

    sup = Supervisor(HostConfig(), open_ledger("sqlite:", tmp_path), env={},
                     log_dir=tmp_path / "drivers", on_ready=on_ready, sockets=store)
    sup.log_dir.mkdir()
    slot = DriverSlot("lb", "lb", [sys.executable, "-c", REPORT, str(report)])
    sup.slots["lb"] = slot

    async def main() -> dict[str, Any]:
        sup._spawn(slot)
        try:
            deadline = time.monotonic() + 20
            while not report.exists():
                assert time.monotonic() < deadline, "the driver process did not report"
                await asyncio.sleep(0.02)
            return json.loads(report.read_text())  # type: ignore[no-any-return]
        finally:
            await sup.stop(kill_drivers=True)

    got = asyncio.run(main())
    assert got["named"] == store.inherited("lb")
    fd = got["named"]["http:127.0.0.1:1"]
    assert got["socks"] == {"http:127.0.0.1:1": [ours.getsockname()[1], 1]}
    assert fd in got["fds"] and their_fd not in got["fds"], got
    assert KEPT_FDS_ENV == "CORRAL_KEPT_FDS"

    # flapping: the supervisor gives the driver up, and its sockets with it
    sup2 = Supervisor(HostConfig(restart_limit=0), open_ledger("sqlite:", tmp_path / "l2"),
                      env={}, log_dir=tmp_path / "drivers", on_ready=on_ready, sockets=store)
    crash = DriverSlot("lb", "lb", [sys.executable, "-c", "raise SystemExit(1)"])
    sup2.slots["lb"] = crash

    async def flap() -> None:
        sup2._spawn(crash)
        deadline = time.monotonic() + 20
        while crash.state != "failed":
            assert time.monotonic() < deadline, crash.state
            await asyncio.sleep(0.02)

    asyncio.run(flap())
    assert store.list("lb") == [] and len(store.list("other")) == 1
    ours.close()
    theirs.close()
    store.close()
