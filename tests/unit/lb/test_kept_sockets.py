"""The lb's frontend sockets across a restart of its process, against a fake kernel that keeps
them in the kernel's own ``SocketStore`` (a dup stands for pidfd_getfd: same process).

A "process" of the driver is a ``KeptSockets``; a crash is its sockets closed without a
release; the next process gets what the kernel hands a driver's next process."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError, ErrorCode
from corral.socketstore import SocketStore
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from corral_lb.listener import Listener
from corral_lb.sockets import FreshSockets, FrontendSocket, KeptSockets, OpenCount, http_key


class FakeKernel:
    """socket.keep/list/release as the kernel serves them, for driver "lb"."""

    def __init__(self, store: SocketStore | None = None) -> None:
        self.store = store or SocketStore()
        self.calls: list[str] = []
        self.refuse: set[str] = set()

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        args = args or {}
        self.calls.append(op)
        if op in self.refuse:
            raise CorralError(f"unknown operation {op!r}", code=ErrorCode.UNKNOWN_OPERATION)
        if op == "socket.keep":
            assert args["pid"] == os.getpid()
            kept, replaced = self.store.keep("lb", args["key"], os.dup(args["fd"]))
            return {**kept.as_json(), "replaced": replaced}
        if op == "socket.list":
            return {"sockets": [k.as_json() for k in self.store.list("lb")]}
        if op == "socket.release":
            return {"released": self.store.release("lb", args["key"])}
        raise AssertionError(op)

    def inherited(self) -> dict[str, socket.socket]:
        """What the next process of the driver starts with."""
        return {k: socket.socket(fileno=os.dup(fd))
                for k, fd in self.store.inherited("lb").items()}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_the_next_process_takes_the_kept_socket_back_and_nothing_is_refused(
        tmp_path: Path) -> None:
    """Process 1 opens a frontend (kept); it dies with connections open and one client
    waiting in the backlog; meanwhile a new client is not refused; process 2 gets the same
    socket back without binding (no keep needed), accepts both waiting clients, and reports
    the connections process 1 had open as cut."""
    kernel = FakeKernel()
    port = _port()
    key = http_key("127.0.0.1", port)

    async def first() -> tuple[int, list[socket.socket]]:
        ks = KeptSockets(kernel, tmp_path)
        sock = await ks.open(key, "127.0.0.1", port)
        listener = Listener(lambda c, p: True)  # takes every client, never releases
        listener.start(sock)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        while listener.accepted < 3:
            await asyncio.sleep(0.01)
        listener._stop()  # stop accepting: the next client waits in the backlog
        clients.append(socket.create_connection(("127.0.0.1", port)))
        inode = _inode(sock)
        os.close(sock.detach())  # the process dies: no close(), no release, no freeze
        return inode, clients

    inode, clients = asyncio.run(first())
    assert kernel.calls == ["socket.keep"]
    late = socket.create_connection(("127.0.0.1", port), timeout=2)  # not refused

    async def second() -> tuple[FrontendSocket, dict[str, Any]]:
        ks = KeptSockets(kernel, tmp_path, inherited=kernel.inherited())
        sock = await ks.open(key, "127.0.0.1", port)
        assert isinstance(sock, FrontendSocket)
        await ks.sync()
        listener = Listener(lambda c, p: True)
        listener.start(sock)
        while listener.accepted < 2:
            await asyncio.sleep(0.01)
        return sock, listener.metrics()

    sock, metrics = asyncio.run(second())
    assert _inode(sock) == inode
    assert kernel.calls == ["socket.keep", "socket.list"]  # taken back, not kept again
    assert metrics["accepted"] == 2  # the one waiting in the backlog, and the late one
    assert metrics["cut_by_last_restart"] == 3 and metrics["cut_by_restart"] == 3
    for c in [*clients, late]:
        c.close()
    sock.close()
    kernel.store.close()


def test_counts_add_up_over_restarts_and_an_orderly_close_counts_what_it_cuts(
        tmp_path: Path) -> None:
    """cut_by_restart sums every earlier process's open connections; a listener that closes
    (an orderly stop) leaves the count it had, not the zero its closing connections reach."""
    path = tmp_path / "x.open"
    c = OpenCount(path, "tcp:a", cut_by_restart=5)
    c.set(4)
    c.freeze()
    c.set(0)  # the connections the close cuts end after the freeze
    assert OpenCount.read(path) == ("tcp:a", 4, 5)
    c2 = OpenCount(path, "tcp:a", cut_by_restart=9, cut_by_last_restart=4)
    assert OpenCount.read(path) == ("tcp:a", 0, 9)
    c2.remove()
    assert not path.exists()


def test_a_moved_frontend_gets_a_new_socket_and_the_kernel_drops_the_old(
        tmp_path: Path) -> None:
    """An inherited socket on another address than the frontend now wants is closed; the new
    one is kept under the key, replacing the kernel's copy of the old (its port refuses)."""
    kernel = FakeKernel()
    old_port, new_port = _port(), _port()

    async def run() -> None:
        ks = KeptSockets(kernel, tmp_path)
        s = await ks.open("tcp:db", "127.0.0.1", old_port)
        s.close()
        ks2 = KeptSockets(kernel, tmp_path, inherited=kernel.inherited())
        s2 = await ks2.open("tcp:db", "127.0.0.1", new_port)
        assert s2.getsockname()[1] == new_port
        assert [k.port for k in kernel.store.list("lb")] == [new_port]
        s2.close()

    asyncio.run(run())
    assert _refused(old_port)
    kernel.store.close()


def test_sync_keeps_again_what_a_restarted_kernel_lost_and_releases_the_rest(
        tmp_path: Path) -> None:
    """After a kernel restart (an empty store) sync keeps every open frontend again; keys the
    kernel holds for no open frontend, and inherited sockets no frontend took, are released
    and closed."""
    kernel = FakeKernel()
    a, gone = _port(), _port()

    async def run() -> None:
        ks = KeptSockets(kernel, tmp_path)
        await ks.open("tcp:a", "127.0.0.1", a)
        s_gone = await ks.open("tcp:gone", "127.0.0.1", gone)
        s_gone.close()  # the process dies; app "gone" is downed before the next one syncs
        inherited = kernel.inherited()
        ks2 = KeptSockets(kernel, tmp_path, inherited=inherited)
        s_a = await ks2.open("tcp:a", "127.0.0.1", a)
        await ks2.sync()
        assert [k.key for k in kernel.store.list("lb")] == ["tcp:a"]
        assert inherited["tcp:gone"].fileno() == -1
        assert len(list(tmp_path.glob("*.open"))) == 1
        kernel.store.close()
        kernel.store = SocketStore()  # the kernel was killed and started again
        await ks2.sync()
        [k] = kernel.store.list("lb")
        assert k.key == "tcp:a" and k.inode == _inode(s_a)
        before = len(kernel.calls)
        await ks2.sync()  # nothing to do when the kernel already has it
        assert kernel.calls[before:] == ["socket.list"]
        s_a.close()

    asyncio.run(run())
    assert _refused(gone)
    kernel.store.close()


def test_a_kernel_that_does_not_keep_sockets_leaves_frontends_working(tmp_path: Path) -> None:
    """socket.keep refused (an older kernel, no listen_sockets grant): the frontend still gets
    its socket; only a restart would refuse its clients."""
    kernel = FakeKernel()
    kernel.refuse = {"socket.keep", "socket.list", "socket.release"}
    port = _port()

    async def run() -> None:
        ks = KeptSockets(kernel, tmp_path)
        s = await ks.open("tcp:a", "127.0.0.1", port)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        await ks.sync()
        await ks.release("tcp:a")
        s.close()

    asyncio.run(run())


def test_the_balancer_keeps_frontends_releases_on_detach_and_not_on_close(
        tmp_path: Path) -> None:
    """Attaching an HTTP and a TCP app keeps both frontends' sockets under http:<host>:<port>
    and tcp:<app>; detaching one releases it; closing the balancer (the process stops)
    releases nothing; frontend metrics carry the cut figures."""
    kernel = FakeKernel()
    hport, tport = _port(), _port()

    async def run() -> None:
        lb = Balancer()
        lb.sockets = KeptSockets(kernel, tmp_path / "c")
        await lb.attach("web", load_lb_config(
            {"name": "web.test", "frontend": f"127.0.0.1:{hport}", "mode": "http"}, app="web"))
        await lb.attach("db", load_lb_config(
            {"name": "db.test", "frontend": f"127.0.0.1:{tport}", "mode": "tcp"}, app="db"))
        assert sorted(k.key for k in kernel.store.list("lb")) == [
            f"http:127.0.0.1:{hport}", "tcp:db"]
        fe = lb.metrics("web")["services"][0]["frontend"]
        assert fe["cut_by_restart"] == 0 and fe["cut_by_last_restart"] == 0
        await lb.detach("db")
        assert [k.key for k in kernel.store.list("lb")] == [f"http:127.0.0.1:{hport}"]
        await lb.close()
        assert isinstance(lb.sockets, FreshSockets)
        assert [k.key for k in kernel.store.list("lb")] == [f"http:127.0.0.1:{hport}"]

    asyncio.run(run())
    assert not _refused(hport)  # the kernel's copy listens on for the next process
    assert _refused(tport)
    kernel.store.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_an_inherited_socket_under_another_key_is_taken_not_bound_again(
        tmp_path: Path, host: str) -> None:
    """A next process whose key for an address changed takes the inherited socket on that
    address (binding anew would fail while the kernel's copy listens) and keeps it under the
    new key; sync releases the old one."""
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    kernel = FakeKernel()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]

    async def run() -> None:
        ks = KeptSockets(kernel, tmp_path)
        (await ks.open("old", host, port)).close()
        ks2 = KeptSockets(kernel, tmp_path, inherited=kernel.inherited())
        s = await ks2.open("edge:http", host, port)
        await ks2.sync()
        [k] = kernel.store.list("lb")
        assert k.key == "edge:http" and k.inode == _inode(s)
        s.close()

    asyncio.run(run())
    kernel.store.close()
