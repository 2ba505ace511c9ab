"""The kernel data plane for real: nftables DNAT of loopback traffic to backend processes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter

import pytest

from conftest import require
from corral.testing import free_port as any_free_port
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from corral_lb.nft import TABLE, NftPlane, service_key
from integration.lb._harness import backends, get


def free_port() -> int:
    """A free port no conntrack entry names: a drain counts the established flows conntrack
    holds to a backend's port, and a host keeps stale ESTABLISHED entries for days (5 by
    default) after connections that ended unseen (e.g. in a removed network namespace); a
    new backend must not inherit one."""
    for _ in range(100):
        port = any_free_port()
        try:
            with open("/proc/net/nf_conntrack") as f:
                text = f.read()
        except OSError:
            return port
        if f"port={port} " not in text:
            return port
    return any_free_port()

FAST_HEALTH = {"interval": "100ms", "timeout": "500ms", "rise": 1, "fall": 1}


def nft_plane(socket_lb: bool = False) -> NftPlane:
    """A plane on the default table; ``socket_lb``: with connect-time translation, which must
    then be available (cgroup v2, BPF)."""
    require(shutil.which("nft") is not None, "needs nft (Debian nftables)")
    try:
        plane = NftPlane(socket_lb=socket_lb)
    except ImportError:
        require(False, "needs libnftables python bindings (pip-nftables + libnftables1)")
        raise
    if socket_lb:
        require(plane.socket_lb is not None, "needs a cgroup v2 hierarchy and BPF (root)")
    return plane


def ruleset() -> str:
    return subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True,
                          text=True).stdout


@pytest.mark.root
@pytest.mark.parametrize("socket_lb", [False, True], ids=["dnat", "socket_lb"])
@pytest.mark.parametrize("frontend", ["127.0.0.1:{port}", "{port}"])
def test_nft_dnat_balances_and_follows_membership(frontend: str, socket_lb: bool) -> None:
    """Weighted slots spread connections; removing a backend rewrites only its map. The same
    through DNAT and through connect-time translation of the host's own connections."""
    nft = nft_plane(socket_lb)
    pa, pb, fe = free_port(), free_port(), free_port()

    async def main() -> None:
        lb = Balancer(nft=nft)
        section = {"name": f"nft{fe}.test", "frontend": frontend.format(port=fe),
                   "plane": "nft", "mode": "tcp", "policy": "round-robin",
                   "health": FAST_HEALTH, "drain": "2s"}
        cfg = load_lb_config(section, app="svc")
        with backends(("a", pa), ("b", pb)):
            await lb.attach("svc", cfg)
            try:
                key = service_key(cfg.name)
                assert f"c_{key}" in ruleset()
                await lb.add_backend("svc", "a", "127.0.0.1", pa, wait=5)
                await lb.add_backend("svc", "b", "127.0.0.1", pb, wait=5)
                slots = Counter(nft.slots(cfg.name).values())
                assert slots == {("127.0.0.1", pa): 128, ("127.0.0.1", pb): 128}
                translated = nft.socket_frontends(cfg.name)
                assert translated == ([("127.0.0.1", fe)] if socket_lb else [])
                if socket_lb:  # the program holds the same slot table as the DNAT map
                    assert nft.socket_lb is not None
                    table = nft.socket_lb.table(("127.0.0.1", fe))
                    assert table == [nft.slots(cfg.name)[i] for i in range(len(table or []))]
                seen = Counter([(await get(fe))[1] for _ in range(20)])
                assert seen == {b"a": 10, b"b": 10}  # numgen inc over interleaved slots
                assert await lb.remove_backend("svc", "a")
                assert set(nft.slots(cfg.name).values()) == {("127.0.0.1", pb)}
                assert {(await get(fe))[1] for _ in range(6)} == {b"b"}
            finally:
                await lb.detach("svc")
            assert f"c_{key}" not in ruleset()

    try:
        asyncio.run(main())
    finally:
        nft.close()  # detach the connect4 program now, not at interpreter exit


@pytest.mark.root
@pytest.mark.parametrize("socket_lb", [False, True], ids=["dnat", "socket_lb"])
def test_nft_drain_waits_for_established_flows(socket_lb: bool) -> None:
    """A drained backend leaves the map at once but is reported busy while a flow is open,
    whether the flow was DNATed or translated at connect()."""
    nft = nft_plane(socket_lb)
    pa, fe = free_port(), free_port()

    async def main() -> None:
        lb = Balancer(nft=nft)
        cfg = load_lb_config({"name": f"drain{fe}.test", "frontend": f"127.0.0.1:{fe}",
                              "plane": "nft", "mode": "tcp", "health": FAST_HEALTH},
                             app="svc")
        with backends(("a", pa)):
            await lb.attach("svc", cfg)
            try:
                await lb.add_backend("svc", "a", "127.0.0.1", pa, wait=5)
                r, w = await asyncio.open_connection("127.0.0.1", fe)
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await r.readuntil(b"a")
                drain = asyncio.create_task(lb.remove_backend("svc", "a", drain=5))
                await asyncio.sleep(0.3)
                assert nft.slots(cfg.name) == {} and nft.socket_frontends(cfg.name) == []
                assert not drain.done()  # conntrack still holds the open flow
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and it keeps working
                await r.readuntil(b"a")
                w.close()
                assert await asyncio.wait_for(drain, 5) is True
            finally:
                await lb.detach("svc")

    try:
        asyncio.run(main())
    finally:
        nft.close()  # detach the connect4 program now, not at interpreter exit
